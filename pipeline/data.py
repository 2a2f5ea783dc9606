"""CIFAR-10: fetch and verify the official archive, split and normalize it, load the splits.

Everything read from outside is untrusted and bounded, even an archive whose md5 matches data.md5
(a user sets data.md5 for any mirror):
- the transfer: a size cap (data.max_download_mb), an overall deadline and a stall detector, the md5
  computed while streaming, a few redirects at most;
- the extraction: only the official members, each once, as plain files, each under a size cap read
  from its header before any byte is written;
- the unpickling: an allow-list of the few numpy types the batches hold, arrays rebuilt only as numpy
  pickles them, and values checked by type and length before anything walks or prints them.
(torchvision.datasets.CIFAR10 would also check each batch against hard-coded md5 sums, which a
faithful mirror with re-encoded pixels fails.)
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import http.client
import io
import json
import os
import pickle
import pickletools
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from pipeline.errors import DataError

ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
README = "readme.html"  # in the official archive beside the batches
SPLITS = ("train", "val", "test")
DOWNLOAD_TIMEOUT_S = 60  # the longest wait for a connection or for any byte
DOWNLOAD_DEADLINE_S = 3600  # the whole transfer; beyond it, fetching by hand is the better way
STALL_WINDOW_S = 60  # a transfer that moves less than STALL_MIN_BYTES in this long has stalled
STALL_MIN_BYTES = 64 * 1024
MAX_REDIRECTS = 5
# Caps on each extracted member, from its tar header: the official files are 31 MB (a batch of
# 10,000 images; 45 MB when re-pickled by Python 3), 158 bytes (batches.meta) and 88 bytes (readme.html).
MEMBER_CAP_BYTES = {"batch": 64 * 2**20, META: 2**20, README: 2**20}
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


def download(url: str, md5: str, out_dir: Path, max_bytes: int = 512 * 2**20) -> Path:
    """Fetch the archive into out_dir, verify its md5 and extract it there.

    Nothing is written to out_dir until the archive is verified and extracted: the work happens
    in a temporary folder beside it, moved into place at the end. A verified archive already in
    place is not fetched again. An archive over `max_bytes` is refused as soon as that shows.
    """
    out_dir = Path(out_dir)
    archive = out_dir / ARCHIVE_NAME
    if archive.is_file() and _md5_of_file(archive) == md5 and not _missing_batches(out_dir / BATCH_DIR):
        print(f"{archive} is in place and its md5 matches {md5}: nothing to download")
        return archive
    local = _local_path(url)
    with replacing_dir(out_dir) as staging:
        staged = staging / ARCHIVE_NAME
        if local is not None:
            if local.stat().st_size > max_bytes:
                raise DataError(_too_large(url, max_bytes))
            shutil.copyfile(local, staged)
            actual = _md5_of_file(staged)
        else:
            actual = _fetch(url, staged, max_bytes)
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


def _md5_of_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _too_large(url: str, max_bytes: int) -> str:
    return (f"{url} is larger than {max_bytes / 2**20:,.0f} MiB (data.max_download_mb), and the official "
            "archive is 163 MiB: it is not CIFAR-10's python version. Nothing was kept. If you trust it, raise "
            "data.max_download_mb.")


class _FewRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS
    max_repeats = 1  # a URL seen twice is a loop


def _fetch(url: str, dest: Path, max_bytes: int) -> str:
    """Stream url into dest and return its md5. Bounded: at most max_bytes, DOWNLOAD_DEADLINE_S in
    all, and at least STALL_MIN_BYTES every STALL_WINDOW_S; every transport failure is a DataError."""
    advice = (f"If this machine is offline or the server misbehaves, download {ARCHIVE_NAME} yourself and set "
              "data.url to its local path (dvc exp run -S data.url=/path/to/archive), with data.md5 if it is "
              "not the official archive. Nothing was kept.")
    opener = urllib.request.build_opener(_FewRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "cifar10-resnet-pipeline"})
    digest, received, started = hashlib.md5(), 0, time.monotonic()
    window_start, window_bytes = started, 0
    try:
        with opener.open(request, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
            declared = response.headers.get("Content-Length", "")
            total = int(declared) if declared.isdigit() else None
            if total is not None and total > max_bytes:
                raise DataError(_too_large(url, max_bytes))
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {ARCHIVE_NAME}") as bar:
                while chunk := response.read1(1 << 20):  # read1: returns what arrived, so the clock is checked
                    received += len(chunk)
                    if received > max_bytes:
                        raise DataError(_too_large(url, max_bytes))
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
                    now = time.monotonic()
                    window_bytes += len(chunk)
                    if now - window_start >= STALL_WINDOW_S:
                        if window_bytes < STALL_MIN_BYTES:
                            raise DataError(f"downloading {url} stalled: {window_bytes:,} bytes in the last "
                                            f"{now - window_start:.0f} s. {advice}")
                        window_start, window_bytes = now, 0
                    if now - started > DOWNLOAD_DEADLINE_S:
                        raise DataError(f"downloading {url} took more than {DOWNLOAD_DEADLINE_S / 60:g} minutes "
                                        f"({received:,} bytes so far). {advice}")
            if total is not None and received != total:
                raise DataError(f"downloading {url} ended after {received:,} of {total:,} bytes. {advice}")
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            raise DataError(f"downloading {url} failed: more than {MAX_REDIRECTS} redirects, or a redirect loop "
                            f"(HTTP {exc.code}). Check data.url. {advice}") from None
        raise DataError(f"downloading {url} failed: HTTP {exc.code} {_short(exc.reason)}. Check data.url. "
                        f"{advice}") from None
    except urllib.error.URLError as exc:
        raise DataError(f"could not reach {url}: {_short(exc.reason)}. {advice}") from None
    except TimeoutError:
        raise DataError(f"downloading {url} stalled: no data for {DOWNLOAD_TIMEOUT_S} s. {advice}") from None
    except (http.client.HTTPException, OSError, ValueError) as exc:
        raise DataError(f"downloading {url} failed: the transfer broke off or is not valid HTTP "
                        f"({type(exc).__name__}: {_short(exc)}). {advice}") from None
    return digest.hexdigest()


def _short(value: object, limit: int = 200) -> str:
    """str(value) cut to `limit` characters; only for exceptions and strings, whose str is bounded."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


_TOTAL_CAP_BYTES = 6 * MEMBER_CAP_BYTES["batch"] + MEMBER_CAP_BYTES[META] + MEMBER_CAP_BYTES[README] + 2**20


class _CappedReader:
    """A file-like view of `source` that refuses to read more than `limit` bytes in all."""

    def __init__(self, source, limit: int, url: str) -> None:
        self.source, self.limit, self.url, self.read_so_far = source, limit, url, 0

    def read(self, size: int = -1) -> bytes:
        wanted = self.limit + 1 - self.read_so_far if size is None or size < 0 else size
        chunk = self.source.read(min(wanted, self.limit + 1 - self.read_so_far))
        self.read_so_far += len(chunk)
        if self.read_so_far > self.limit:
            raise DataError(f"the archive from {self.url} unpacks to more than {self.limit:,} bytes; the official "
                            "one unpacks to about 186 MB. It is not CIFAR-10's python version. Nothing was kept.")
        return chunk


def _expected_members() -> set[str]:
    return {f"{BATCH_DIR}/{name}" for name in [*TRAIN_BATCHES, TEST_BATCH, META, README]}


def _check_member(member: tarfile.TarInfo, name: str, wanted: set[str], seen: set[str], url: str) -> None:
    """Refuse, naming it, a member that is not one of the official files, comes twice or is too large."""
    if name not in wanted or not member.isfile():
        kind = "a link" if (member.issym() or member.islnk()) else \
            "a folder" if member.isdir() else "a special file" if not member.isfile() else "a file"
        official = ", ".join(sorted(n.split("/")[1] for n in wanted))
        raise DataError(
            f"the archive from {url} is not CIFAR-10's python version: it holds {kind} "
            f"'{_short(member.name)}', and the official archive holds only the regular files "
            f"{BATCH_DIR}/{{{official}}}. Refused before extracting it; nothing was kept. Use the "
            "official archive or a faithful copy of it."
        )
    if name in seen:
        raise DataError(f"the archive from {url} holds '{name}' twice: which copy is meant is not "
                        "known. The official archive holds each file once. Nothing was kept.")
    cap = MEMBER_CAP_BYTES.get(name.split("/")[1], MEMBER_CAP_BYTES["batch"])
    if member.size > cap:
        raise DataError(
            f"the archive from {url} is not CIFAR-10's python version: '{name}' is "
            f"{member.size:,} bytes, more than the {cap:,} allowed for it (the official one is far "
            "smaller). Refused before extracting it; nothing was kept."
        )


def _extract(archive: Path, dest: Path, url: str) -> None:
    """Extract the official members as plain files under dest; refuse anything else, naming it.

    No tarfile extraction is used: each member's bytes are copied to a path built from the expected
    names, so a link, an absolute path or a `..` in the archive cannot write outside dest.
    """
    wanted, seen = _expected_members(), set()
    (dest / BATCH_DIR).mkdir()
    try:
        # A stream through a reader that refuses more than the members' caps allow in all: tarfile
        # itself reads some headers (long names, pax records) whole into memory.
        with gzip.open(archive) as unzipped, \
                tarfile.open(fileobj=_CappedReader(unzipped, _TOTAL_CAP_BYTES, url), mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./").rstrip("/")
                if member.isdir() and name == BATCH_DIR and name not in seen:
                    seen.add(name)
                    continue
                _check_member(member, name, wanted, seen, url)
                seen.add(name)
                with open(dest / name, "wb") as out:
                    shutil.copyfileobj(tar.extractfile(member), out)  # member.size bytes: checked above
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(
            f"the archive from {url} matches data.md5 but cannot be extracted ({_short(exc)}): it is corrupt. "
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


def _reconstruct(subtype, shape, dtype_code):
    """numpy's _reconstruct, only as numpy's pickles call it: an empty ndarray that the pickle's state
    then fills (checked against the bytes it carries). Any other shape would allocate from a few bytes."""
    if subtype is not np.ndarray or tuple(shape) != (0,) or dtype_code != b"b":
        raise pickle.UnpicklingError("refused: an array rebuilt otherwise than numpy pickles one")
    return _RECONSTRUCT(subtype, shape, dtype_code)


def _plain_dtype(spec, align=False, copy=False) -> np.dtype:
    """np.dtype for the plain numeric types only: an object dtype would let the pickle build Python objects."""
    if not isinstance(spec, str) or len(spec) > 4:
        raise pickle.UnpicklingError("refused: a dtype that is not a plain numeric type")
    dtype = np.dtype(spec)
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"refused: dtype {dtype.str}, not a plain numeric type")
    return dtype


class BatchUnpickler(pickle.Unpickler):
    """Unpickles the official batch files and nothing else: only the globals that numpy arrays and
    Python 3's pickled bytes name are resolved, each narrowed to what those pickles do with it; any
    other (os.system, builtins.eval, ...) is refused. What it builds is bounded by the file's size."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1's name
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2's name
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _plain_dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[module, name]
        raise pickle.UnpicklingError(f"refused to load {_short(module, 80)}.{_short(name, 80)}: a CIFAR-10 batch "
                                     "holds only arrays, lists, strings and numbers")


# Opcodes that push exactly one new immutable leaf (a string, a number, a global), which a memo may
# share freely; a shared list, tuple or dict is what turns a few bytes into an exponential value.
_LEAF_OPS = {"GLOBAL", "STACK_GLOBAL", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING",
             "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "INT", "BININT", "BININT1",
             "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "NONE", "NEWTRUE", "NEWFALSE"}


def _refuse_shared_containers(payload: bytes) -> None:
    """Refuse a pickle that refers to one container twice (a memo lookup of anything but a leaf, or DUP).

    The pickles of the official batches share only strings and globals, so everything they build is a
    tree no larger than the file: walking, hashing or printing it takes time in proportion.
    """
    leaf_memo: dict[int, bool] = {}
    previous = None
    for opcode, arg, _ in pickletools.genops(payload):
        name = opcode.name
        if name == "DUP":
            raise pickle.UnpicklingError("refused: a shared reference (DUP)")
        if name in {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}:
            leaf_memo[len(leaf_memo) if name == "MEMOIZE" else int(arg)] = previous in _LEAF_OPS
        elif name in {"GET", "BINGET", "LONG_BINGET"} and not leaf_memo.get(int(arg), False):
            raise pickle.UnpicklingError("refused: a second reference to one list, tuple or dict")
        if name != "FRAME":
            previous = name


def _describe(value: object) -> str:
    """What a value is, in a few words, without walking it (an unpickled value may share references
    level by level, so that its repr would be exponentially long)."""
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, str):
        return f"the string {_short(repr(value), 60)}"
    return f"a {type(value).__name__}"


def _unpickle(path: Path) -> dict:
    try:
        payload = path.read_bytes()  # at most MEMBER_CAP_BYTES: extraction refused larger files
        _refuse_shared_containers(payload)
        loaded = BatchUnpickler(io.BytesIO(payload), encoding="latin1").load()  # the official files are Python 2 pickles
    except Exception as exc:
        raise DataError(f"{path} is not a CIFAR-10 batch: it does not unpickle as plain data ({_short(exc)}). "
                        "The archive is not CIFAR-10's python version; use the official one.") from None
    if not isinstance(loaded, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch: it holds a {type(loaded).__name__}, not a mapping")
    return loaded


def _batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 3072 uint8, labels N int64) of one batch file, validated."""
    batch = _unpickle(path)
    for key in ("data", "labels"):
        if key not in batch:
            keys = sorted(_short(repr(k), 40) for k in list(batch)[:20] if isinstance(k, str))
            raise DataError(f"{path} is not a CIFAR-10 batch: it has no '{key}' (its text keys: {keys})")
    images = batch["data"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 \
            or images.shape[1] != IMAGE_VALUES:
        raise DataError(f"{path}: 'data' must be a uint8 array of N x {IMAGE_VALUES} (32x32 RGB images), "
                        f"got {_describe(images)}")
    labels = batch["labels"]
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
        labels = labels.tolist()
    # Checked item by item before anything walks it deeper: a list of lists that share references,
    # a few kilobytes in the file, expands exponentially in numpy or in a repr.
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise DataError(f"{path}: 'labels' must be a list of integers, got {_describe(labels)}")
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(labels)} labels for {len(images)} images; each image needs one label")
    bad = next((v for v in labels if not 0 <= v < NUM_CLASSES), None)
    if bad is not None:
        shown = bad if abs(bad) < 10**9 else f"of {bad.bit_length()} bits"
        raise DataError(f"{path}: label {shown} is not a CIFAR-10 class (labels are 0 to {NUM_CLASSES - 1})")
    labels = np.asarray(labels, dtype=np.int64)
    return images, labels.astype(np.int64)


def _class_names(path: Path) -> list[str]:
    names = _unpickle(path).get("label_names")
    if not isinstance(names, list) or len(names) != NUM_CLASSES or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: 'label_names' must be the {NUM_CLASSES} class names, got {_describe(names)}")
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
