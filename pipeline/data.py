"""CIFAR-10: fetch and verify the official archive, split and normalize it, load the splits.

Downloads and checksums are torchvision's utilities. An archive is untrusted even when its md5
matches data.md5 (a user sets data.md5 for any mirror), so extraction and reading are this module's
own: only regular files with the official member names are extracted, the batches are unpickled
with an allow-list of the few numpy types they contain, and their content is validated as soon as
it is read. (torchvision.datasets.CIFAR10 would also check each batch against hard-coded md5 sums,
which a faithful mirror with re-encoded pixels fails.)
"""

from __future__ import annotations

import codecs
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
from torchvision.datasets.utils import calculate_md5, check_integrity, download_url

from pipeline.errors import DataError

ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
README = "readme.html"  # in the official archive beside the batches
SPLITS = ("train", "val", "test")
DOWNLOAD_TIMEOUT_S = 60
NUM_CLASSES = 10
IMAGE_VALUES = 3 * 32 * 32
FULL_COUNTS = {"train": 50_000, "test": 10_000}  # the official release

@contextmanager
def replacing_dir(out_dir: Path) -> Iterator[Path]:
    """A staging folder beside out_dir that replaces it only if the block succeeds.

    A failed or interrupted stage leaves out_dir as it was: never half-written. Staging folders
    that a killed run left behind are removed first.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}-staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
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


def _expected_members() -> set[str]:
    return {f"{BATCH_DIR}/{name}" for name in [*TRAIN_BATCHES, TEST_BATCH, META, README]}


def _extract(archive: Path, dest: Path, url: str) -> None:
    """Extract the official members as plain files under dest; refuse anything else, naming it.

    No tarfile extraction is used: each member's bytes are copied to a path built from the expected
    names, so a link, an absolute path or a `..` in the archive cannot write outside dest.
    """
    wanted = _expected_members()
    (dest / BATCH_DIR).mkdir()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = member.name.removeprefix("./").rstrip("/")
                if member.isdir() and name == BATCH_DIR:
                    continue
                if name not in wanted or not member.isfile():
                    kind = "a link" if (member.issym() or member.islnk()) else \
                        "a folder" if member.isdir() else "a special file" if not member.isfile() else "a file"
                    official = ", ".join(sorted(n.split("/")[1] for n in wanted))
                    raise DataError(
                        f"the archive from {url} is not CIFAR-10's python version: it holds {kind} "
                        f"'{member.name}', and the official archive holds only the regular files {BATCH_DIR}/"
                        f"{{{official}}}. Refused before extracting it; nothing was kept. Use the official "
                        "archive or a faithful copy of it."
                    )
                source = tar.extractfile(member)
                with open(dest / name, "wb") as out:
                    shutil.copyfileobj(source, out)
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
    read_batches(dest / BATCH_DIR)  # the content, validated now rather than in a later stage


# --- reading the official batches ----------------------------------------------------------

def _missing_batches(batch_dir: Path) -> list[str]:
    return [n for n in [*TRAIN_BATCHES, TEST_BATCH, META] if not (batch_dir / n).is_file()]


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 pickles of bytes call (`_codecs.encode(text, 'latin1')`), for that codec only."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refused: a call of _codecs.encode with codec {encoding!r}")
    return text.encode("latin1")


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own function that rebuilds a pickled array


class BatchUnpickler(pickle.Unpickler):
    """Unpickles the official batch files and nothing else: only the globals that numpy arrays and
    Python 3's pickled bytes name are resolved; any other (os.system, builtins.eval, ...) is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 1's name
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 2's name
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[module, name]
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds only arrays, "
                                     "lists, strings and numbers")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            loaded = BatchUnpickler(f, encoding="latin1").load()  # the official files are Python 2 pickles
    except Exception as exc:
        raise DataError(f"{path} is not a CIFAR-10 batch: it does not unpickle as plain data ({exc}). "
                        "The archive is not CIFAR-10's python version; use the official one.") from None
    if not isinstance(loaded, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch: it holds a {type(loaded).__name__}, not a mapping")
    return loaded


def _batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 3072 uint8, labels N int64) of one batch file, validated."""
    batch = _unpickle(path)
    for key in ("data", "labels"):
        if key not in batch:
            raise DataError(f"{path} is not a CIFAR-10 batch: it has no '{key}' (keys: {sorted(map(str, batch))})")
    images = batch["data"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 \
            or images.shape[1] != IMAGE_VALUES:
        shown = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) \
            else type(images).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of N x {IMAGE_VALUES} (32x32 RGB images), got {shown}")
    try:
        labels = np.asarray(batch["labels"])
    except Exception:
        labels = np.asarray([])
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{path}: 'labels' must be a list of integers")
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(labels)} labels for {len(images)} images; each image needs one label")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = labels[(labels < 0) | (labels >= NUM_CLASSES)][0]
        raise DataError(f"{path}: label {int(bad)} is not a CIFAR-10 class (labels are 0 to {NUM_CLASSES - 1})")
    return images, labels.astype(np.int64)


def _class_names(path: Path) -> list[str]:
    names = _unpickle(path).get("label_names")
    if not isinstance(names, list) or len(names) != NUM_CLASSES or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: 'label_names' must be the {NUM_CLASSES} class names, got {names!r:.200}")
    return names


def read_batches(batch_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Train and test images as uint8 NCHW arrays, their labels, and the class names; validated.

    A full archive has 50,000 + 10,000 images; a smaller one (a test fixture) must have the same
    number of images in each of its five training batches.
    """
    missing = _missing_batches(batch_dir)
    if missing:
        raise DataError(f"{batch_dir} lacks {', '.join(missing)}: run the download stage first (dvc repro download)")
    classes = _class_names(batch_dir / META)
    train = [_batch(batch_dir / n) for n in TRAIN_BATCHES]
    x_test, y_test = _batch(batch_dir / TEST_BATCH)
    sizes = [len(y) for _, y in train]
    usual = max(set(sizes), key=sizes.count)
    for name, size in [*zip(TRAIN_BATCHES, sizes), (TEST_BATCH, len(y_test))]:
        if size == 0 or (name != TEST_BATCH and size != usual):
            raise DataError(f"{batch_dir / name}: {size} images, while the training batches hold {sizes}; "
                            "CIFAR-10's five training batches are of equal size and no batch is empty")
    counts = {"train": sum(sizes), "test": len(y_test)}
    if max(counts.values()) > min(FULL_COUNTS.values()) and counts != FULL_COUNTS:
        raise DataError(f"{batch_dir}: {counts['train']:,} training and {counts['test']:,} test images; the full "
                        f"CIFAR-10 has {FULL_COUNTS['train']:,} and {FULL_COUNTS['test']:,}")
    x_train = np.concatenate([x for x, _ in train]).reshape(-1, 3, 32, 32)
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test.reshape(-1, 3, 32, 32), y_test, classes


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
