"""CIFAR-10: fetch and verify the official archive, split and normalize it, load the splits.

Downloads, checksums and extraction are torchvision's utilities. The batches are read with
pickle directly because torchvision.datasets.CIFAR10 checks each batch file against hard-coded
md5 sums, which a faithful mirror (re-encoded pixels) fails; the archive md5 from params is the
integrity check instead.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
from sklearn.model_selection import train_test_split
from torchvision.datasets.utils import calculate_md5, check_integrity, download_url, extract_archive

from pipeline.errors import DataError

ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
SPLITS = ("train", "val", "test")
DOWNLOAD_TIMEOUT_S = 60

@contextmanager
def replacing_dir(out_dir: Path) -> Iterator[Path]:
    """A staging folder beside out_dir that replaces it only if the block succeeds.

    A failed or interrupted stage leaves out_dir as it was: never half-written.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-staging-", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- download -------------------------------------------------------------------------------

def _local_path(location: str) -> Path | None:
    """The file that a local path or file:// URL names; None for a remote URL."""
    parsed = urlparse(location)
    if parsed.scheme in {"http", "https", "ftp"}:
        return None
    path = Path(url2pathname(parsed.path)) if parsed.scheme == "file" else Path(location).expanduser()
    if not path.is_file():
        raise DataError(f"data.url: no file at '{location}'. Give an existing local path or an http(s)/file URL.")
    return path


def download(url: str, md5: str, out_dir: Path) -> Path:
    """Fetch the archive into out_dir, verify its md5 and extract it there.

    Nothing is written to out_dir until the archive is verified and extracted: the work happens
    in a temporary folder beside it, moved into place at the end. A verified archive already in
    place is not fetched again.
    """
    out_dir = Path(out_dir)
    archive = out_dir / ARCHIVE_NAME
    if check_integrity(str(archive), md5) and not _missing_batches(out_dir / BATCH_DIR):
        print(f"{archive} is in place and its md5 matches {md5}: nothing to download")
        return archive
    local = _local_path(url)
    with replacing_dir(out_dir) as staging:
        staged = staging / ARCHIVE_NAME
        if local is not None:
            shutil.copyfile(local, staged)
        else:
            _fetch(url, staged)
        actual = calculate_md5(str(staged))
        if actual != md5:
            raise DataError(
                f"md5 mismatch for {url}: expected {md5} (data.md5), got {actual} "
                f"({staged.stat().st_size:,} bytes). The download is truncated or corrupt, or it is "
                "another archive: fetch it again, or if you trust this file set data.md5 to its md5. "
                "Nothing was kept."
            )
        _extract(staged, staging, url)
    print(f"verified {archive} (md5 {md5}) and extracted {out_dir / BATCH_DIR}")
    return archive


def _fetch(source: str, dest: Path) -> None:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torchvision opens URLs without a timeout
    try:
        download_url(source, str(dest.parent), dest.name)
    except urllib.error.HTTPError as exc:
        raise DataError(
            f"downloading {source} failed: HTTP {exc.code} {exc.reason}. Check data.url, or download "
            f"{ARCHIVE_NAME} yourself and set data.url to its local path."
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"could not reach {source}: {reason}. If this machine is offline, copy {ARCHIVE_NAME} here "
            "and set data.url to its path (dvc exp run -S data.url=/path/to/archive), with data.md5 "
            "if it is not the official archive."
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _extract(archive: Path, dest: Path, url: str) -> None:
    try:
        extract_archive(str(archive), str(dest))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(
            f"the archive from {url} matches data.md5 but cannot be extracted ({exc}): it is corrupt. "
            "Download it again from a good source and update data.md5. Nothing was kept."
        ) from None
    missing = _missing_batches(dest / BATCH_DIR)
    if missing:
        raise DataError(
            f"the archive from {url} is not CIFAR-10's python version: {BATCH_DIR}/ lacks {', '.join(missing)}. "
            "Nothing was kept."
        )


# --- reading the official batches ----------------------------------------------------------

def _missing_batches(batch_dir: Path) -> list[str]:
    return [n for n in [*TRAIN_BATCHES, TEST_BATCH, META] if not (batch_dir / n).is_file()]


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # the official files are Python 2 pickles


def read_batches(batch_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Train and test images as uint8 NCHW arrays, their labels, and the class names."""
    missing = _missing_batches(batch_dir)
    if missing:
        raise DataError(f"{batch_dir} lacks {', '.join(missing)}: run the download stage first (dvc repro download)")

    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        batches = [_unpickle(batch_dir / n) for n in names]
        images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
        return images, labels

    x_train, y_train = read(TRAIN_BATCHES)
    x_test, y_test = read([TEST_BATCH])
    classes = list(_unpickle(batch_dir / META)["label_names"])
    return x_train, y_train, x_test, y_test, classes


# --- normalize -----------------------------------------------------------------------------

def normalize(raw_dir: Path, out_dir: Path, val_size: int, seed: int, archive_md5: str) -> dict:
    """Split train into train/val (seeded, stratified), standardize with train statistics, write .npy files.

    Images are stored as float16 (CHW): half the bytes of float32 at far finer steps than the
    uint8 source has, and loaded straight into a tensor with no per-image work.
    """
    x_train, y_train, x_test, y_test, classes = read_batches(Path(raw_dir) / BATCH_DIR)
    per_class = np.bincount(y_train, minlength=len(classes))
    if not len(classes) <= val_size <= len(y_train) - len(classes):
        raise DataError(
            f"data.val_size={val_size} does not fit the {len(y_train)} training images: it must hold at least one "
            f"image per class and leave at least one per class for training (between {len(classes)} and "
            f"{len(y_train) - len(classes)})."
        )
    train_idx, val_idx = train_test_split(
        np.arange(len(y_train)), test_size=val_size, stratify=y_train, random_state=seed
    )
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)  # a stable order, whatever the split returns

    train_images = x_train[train_idx].astype(np.float64) / 255.0
    mean = train_images.mean(axis=(0, 2, 3))
    std = train_images.std(axis=(0, 2, 3))

    def standardize(images: np.ndarray) -> np.ndarray:
        scaled = images.astype(np.float64) / 255.0
        return ((scaled - mean[:, None, None]) / std[:, None, None]).astype(np.float16)

    splits = {
        "train": (standardize(x_train[train_idx]), y_train[train_idx]),
        "val": (standardize(x_train[val_idx]), y_train[val_idx]),
        "test": (standardize(x_test), y_test),
    }
    stats = {
        "mean": mean.tolist(),
        "std": std.tolist(),
        "classes": classes,
        "counts": {name: int(len(labels)) for name, (_, labels) in splits.items()},
        "train_per_class_source": per_class.tolist(),
        "archive_md5": archive_md5,
        "val_size": val_size,
        "seed": seed,
    }
    with replacing_dir(out_dir) as staging:
        for name, (images, labels) in splits.items():
            np.save(staging / f"{name}_images.npy", images)
            np.save(staging / f"{name}_labels.npy", labels.astype(np.int64))
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


# --- loading the normalized splits ---------------------------------------------------------

@dataclass
class Split:
    images: np.ndarray  # float16, N x 3 x 32 x 32, standardized
    labels: np.ndarray  # int64, N


def load_split(data_dir: Path, name: str) -> Split:
    data_dir = Path(data_dir)
    files = [data_dir / f"{name}_images.npy", data_dir / f"{name}_labels.npy"]
    for f in files:
        if not f.exists():
            raise DataError(f"{f} not found: run the normalize stage first (dvc repro normalize)")
    return Split(np.load(files[0]), np.load(files[1]))


def load_stats(data_dir: Path) -> dict:
    path = Path(data_dir) / "stats.json"
    if not path.exists():
        raise DataError(f"{path} not found: run the normalize stage first (dvc repro normalize)")
    return json.loads(path.read_text())
