"""pipeline/data.py and the download/normalize stages, on the tiny official-layout archive.

Downloads go through a real HTTP server on 127.0.0.1 (and a port where nothing listens); the
command line runs as a subprocess. Nothing is mocked, and the real CIFAR-10 is never needed.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import re
import signal
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import config, data, paths
from pipeline.data import ARCHIVE_NAME, BATCH_DIR, META, TEST_BATCH, TRAIN_BATCHES, DataError
from pipeline.stages import download, normalize
from tests.conftest import CLASSES, ROOT, tiny_params, write_params

BATCH_FILES = [*TRAIN_BATCHES, TEST_BATCH, META]
SPLIT_FILES = [f"{s}_{kind}.npy" for s in data.SPLITS for kind in ("images", "labels")] + ["stats.json"]
VAL_SIZE = 50  # the tiny archive has 20 training images per class: 5 per class go to validation
OTHER_MD5 = "f" * 32


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder (relative name -> md5)."""
    return {str(p.relative_to(folder)): md5_of(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Staging folders a stage left beside its output."""
    return sorted(p.name for p in parent.glob(".*-staging-*")) if parent.exists() else []


def assert_nothing_kept(data_dir: Path) -> None:
    assert not (data_dir / "raw").exists(), "a failed download must not leave data/raw"
    assert leftovers(data_dir) == [], "a failed download must not leave its staging folder"


# --- servers and URLs --------------------------------------------------------------------------

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def bad_archives(tmp_path_factory, tiny_archive):
    """A second real HTTP server, serving a truncated copy of the tiny archive and a non-CIFAR archive.

    Yields (base URL, {name: (path, md5)}).
    """
    folder = tmp_path_factory.mktemp("bad-archives")
    payload = tiny_archive[0].read_bytes()
    truncated = folder / "truncated.tar.gz"
    truncated.write_bytes(payload[: len(payload) * 3 // 5])
    other = folder / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        text = b"not CIFAR-10\n"
        info = tarfile.TarInfo("some-dataset/readme.txt")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", {p.stem.split(".")[0]: (p, md5_of(p)) for p in (truncated, other)}
    server.shutdown()
    server.server_close()


@pytest.fixture
def dead_url():
    """A URL on 127.0.0.1 whose port is bound but not listening: every connection is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/{ARCHIVE_NAME}"


@pytest.fixture
def failure(request, tiny_archive, http_server, archive_url, bad_archives, dead_url):
    """The (url, md5, expected phrase) of one way a download can fail, by name."""
    good_md5 = tiny_archive[1]
    base, bad = bad_archives
    cases = {
        "md5_mismatch": (archive_url, OTHER_MD5, "md5 mismatch"),
        "truncated_right_md5": (f"{base}/truncated.tar.gz", good_md5, "md5 mismatch"),
        "truncated_own_md5": (f"{base}/truncated.tar.gz", bad["truncated"][1], "it is corrupt"),
        "not_cifar": (f"{base}/other.tar.gz", bad["other"][1], "not CIFAR-10's python version"),
        "unreachable": (dead_url, good_md5, "could not reach"),
        "http_404": (f"{http_server}/no-such-archive.tar.gz", good_md5, "HTTP 404"),
    }
    return cases[request.param]


ALL_FAILURES = ["md5_mismatch", "truncated_right_md5", "truncated_own_md5", "not_cifar", "unreachable", "http_404"]


# --- download ----------------------------------------------------------------------------------

def test_download_over_http_fetches_verifies_extracts_and_keeps_archive(tmp_path, archive_url, tiny_archive, capsys):
    source, md5 = tiny_archive
    out = tmp_path / "data" / "raw"
    archive = data.download(archive_url, md5, out)
    assert archive == out / ARCHIVE_NAME and md5_of(archive) == md5, "the verified archive is kept"
    assert sorted(p.name for p in (out / BATCH_DIR).iterdir()) == sorted(BATCH_FILES)
    with tarfile.open(source) as tar:  # extracted byte for byte
        for name in BATCH_FILES:
            assert (out / BATCH_DIR / name).read_bytes() == tar.extractfile(f"{BATCH_DIR}/{name}").read()
    assert "verified" in capsys.readouterr().out
    assert leftovers(tmp_path / "data") == []


def test_second_download_does_not_fetch_again(tmp_path, archive_url, tiny_archive, dead_url, capsys):
    md5 = tiny_archive[1]
    out = tmp_path / "raw"
    data.download(archive_url, md5, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    # The server is out of reach now: only a download that is skipped can succeed.
    assert data.download(dead_url, md5, out) == out / ARCHIVE_NAME
    assert "nothing to download" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before, "nothing was rewritten"


def test_download_with_a_batch_missing_fetches_again(tmp_path, archive_url, tiny_archive, dead_url):
    md5 = tiny_archive[1]
    out = tmp_path / "raw"
    data.download(archive_url, md5, out)
    (out / BATCH_DIR / "data_batch_3").unlink()
    # A verified archive alone is not "in place": the extraction is incomplete, so it must fetch.
    with pytest.raises(DataError, match="could not reach"):
        data.download(dead_url, md5, out)
    data.download(archive_url, md5, out)
    assert (out / BATCH_DIR / "data_batch_3").is_file()


@pytest.mark.parametrize("form", ["path", "file_url"])
def test_local_path_and_file_url_are_accepted(tmp_path, tiny_archive, form):
    source, md5 = tiny_archive
    url = str(source) if form == "path" else source.as_uri()
    out = tmp_path / "raw"
    assert data.download(url, md5, out) == out / ARCHIVE_NAME
    assert md5_of(out / ARCHIVE_NAME) == md5
    assert all((out / BATCH_DIR / name).is_file() for name in BATCH_FILES)
    assert source.is_file(), "the source archive is copied, not moved"


@pytest.mark.parametrize("form", ["path", "file_url"])
def test_missing_local_archive_fails_clearly(tmp_path, tiny_archive, form):
    missing = tmp_path / "nowhere" / ARCHIVE_NAME
    url = str(missing) if form == "path" else missing.as_uri()
    with pytest.raises(DataError, match="no file at"):
        data.download(url, tiny_archive[1], tmp_path / "data" / "raw")
    assert_nothing_kept(tmp_path / "data")


@pytest.mark.parametrize("failure", ALL_FAILURES, indirect=True)
def test_failed_download_raises_data_error_and_keeps_nothing(tmp_path, failure):
    url, md5, phrase = failure
    with pytest.raises(DataError) as info:
        data.download(url, md5, tmp_path / "data" / "raw")
    message = str(info.value)
    assert phrase in message and url in message
    assert_nothing_kept(tmp_path / "data")


def test_md5_mismatch_message_gives_both_checksums(tmp_path, bad_archives, tiny_archive):
    base, bad = bad_archives
    with pytest.raises(DataError) as info:
        data.download(f"{base}/truncated.tar.gz", tiny_archive[1], tmp_path / "raw")
    assert tiny_archive[1] in str(info.value) and bad["truncated"][1] in str(info.value)
    assert "data.md5" in str(info.value)


@pytest.mark.parametrize("failure", ["md5_mismatch", "truncated_own_md5", "not_cifar", "unreachable", "http_404"],
                         indirect=True)
def test_failed_download_of_another_url_keeps_good_raw_data(tmp_path, archive_url, tiny_archive, failure):
    out = tmp_path / "data" / "raw"
    data.download(archive_url, tiny_archive[1], out)
    good = snapshot(out)
    url, md5, phrase = failure
    md5 = OTHER_MD5 if md5 == tiny_archive[1] else md5  # another archive, so that it is fetched
    with pytest.raises(DataError, match=phrase):
        data.download(url, md5, out)
    assert snapshot(out) == good, "a failed download must not lose the data in place"
    assert leftovers(tmp_path / "data") == []


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("failure", ["truncated_right_md5", "unreachable"], indirect=True)
def test_cli_failed_download_exits_nonzero_with_message_and_no_outputs(tmp_path, failure):
    url, md5, phrase = failure
    write_params(tmp_path, tiny_params(url, md5))
    result = run_cli("download", cwd=tmp_path)
    assert result.returncode != 0
    assert "error:" in result.stderr and phrase in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_kept(tmp_path / "data")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir()), "no partial outputs"


@pytest.mark.parametrize("flags, bar_expected", [([], True), (["--no-progress"], False)])
def test_cli_download_shows_its_progress_bar_unless_no_progress(tmp_path, archive_url, tiny_archive, flags,
                                                                 bar_expected):
    write_params(tmp_path, tiny_params(archive_url, tiny_archive[1]))
    result = run_cli("download", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("100%|" in result.stderr) == bar_expected, result.stderr  # tqdm writes its bar to stderr


# --- normalize ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory, tiny_archive) -> Path:
    out = tmp_path_factory.mktemp("raw") / "raw"
    data.download(str(tiny_archive[0]), tiny_archive[1], out)
    return out


@pytest.fixture(scope="module")
def source(tiny_archive) -> dict[str, np.ndarray]:
    """The archive's images and labels, read straight from the tar file (not through pipeline.data)."""
    with tarfile.open(tiny_archive[0]) as tar:
        def batch(name: str) -> dict:
            return pickle.load(tar.extractfile(f"{BATCH_DIR}/{name}"), encoding="latin1")

        train = [batch(n) for n in TRAIN_BATCHES]
        test = batch(TEST_BATCH)
    return {
        "x_train": np.concatenate([b["data"] for b in train]).reshape(-1, 3, 32, 32),
        "y_train": np.concatenate([b["labels"] for b in train]),
        "x_test": test["data"].reshape(-1, 3, 32, 32),
        "y_test": np.asarray(test["labels"]),
    }


def run_normalize(raw_dir: Path, out: Path, tiny_archive, val_size: int = VAL_SIZE, seed: int = 0) -> dict:
    return data.normalize(raw_dir, out, val_size, seed, tiny_archive[1])


@pytest.fixture(scope="module")
def normalized(tmp_path_factory, raw_dir, tiny_archive) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("normalized") / "normalized"
    return out, run_normalize(raw_dir, out, tiny_archive)


def splits(out: Path) -> dict[str, data.Split]:
    return {name: data.load_split(out, name) for name in data.SPLITS}


def test_normalize_split_is_stratified_with_val_size_images(normalized, source):
    out, stats = normalized
    loaded = splits(out)
    assert stats["counts"] == {"train": 200 - VAL_SIZE, "val": VAL_SIZE, "test": 100}
    assert np.bincount(loaded["val"].labels, minlength=10).tolist() == [VAL_SIZE // 10] * 10
    assert np.bincount(loaded["train"].labels, minlength=10).tolist() == [20 - VAL_SIZE // 10] * 10
    assert np.array_equal(loaded["test"].labels, source["y_test"]), "the test split keeps its order"
    for name, split in loaded.items():
        assert split.images.dtype == np.float16 and split.images.shape == (stats["counts"][name], 3, 32, 32)
        assert split.labels.dtype == np.int64


def test_normalize_val_size_not_divisible_by_classes_stays_stratified(tmp_path, raw_dir, tiny_archive):
    stats = run_normalize(raw_dir, tmp_path / "normalized", tiny_archive, val_size=55)
    per_class = np.bincount(data.load_split(tmp_path / "normalized", "val").labels, minlength=10)
    assert stats["counts"]["val"] == 55 and per_class.sum() == 55
    assert set(per_class.tolist()) <= {5, 6}


def test_normalized_train_split_has_zero_mean_unit_std_per_channel(normalized):
    images = data.load_split(normalized[0], "train").images.astype(np.float64)
    np.testing.assert_allclose(images.mean(axis=(0, 2, 3)), 0.0, atol=1e-2)
    np.testing.assert_allclose(images.std(axis=(0, 2, 3)), 1.0, atol=1e-2)


def test_val_and_test_are_standardized_with_train_statistics(normalized, source):
    out, stats = normalized
    loaded = splits(out)
    mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
    assert mean.shape == std.shape == (3,)

    # Undo the standardization and find each stored image among the raw training images.
    index = {row.tobytes(): i for i, row in enumerate(source["x_train"])}
    assert len(index) == len(source["x_train"])

    def raw_indices(split: data.Split) -> np.ndarray:
        pixels = np.rint((split.images.astype(np.float64) * std[:, None, None] + mean[:, None, None]) * 255)
        assert pixels.min() >= 0 and pixels.max() <= 255
        return np.array([index[row.tobytes()] for row in pixels.astype(np.uint8)])

    train_idx, val_idx = raw_indices(loaded["train"]), raw_indices(loaded["val"])
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(200)), "a partition of train"
    assert np.array_equal(loaded["train"].labels, source["y_train"][train_idx])
    assert np.array_equal(loaded["val"].labels, source["y_train"][val_idx])

    # The statistics are those of the train split only, recomputed here from the raw pixels.
    train_pixels = source["x_train"][train_idx].astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, train_pixels.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, train_pixels.std(axis=(0, 2, 3)), rtol=1e-12)
    all_pixels = source["x_train"].astype(np.float64) / 255.0
    assert not np.allclose(mean, all_pixels.mean(axis=(0, 2, 3)), rtol=0, atol=1e-9), "validation images leaked in"

    def standardized(images: np.ndarray) -> np.ndarray:
        return (images.astype(np.float64) / 255.0 - mean[:, None, None]) / std[:, None, None]

    np.testing.assert_allclose(loaded["val"].images.astype(np.float64), standardized(source["x_train"][val_idx]),
                               atol=1e-2)
    np.testing.assert_allclose(loaded["test"].images.astype(np.float64), standardized(source["x_test"]), atol=1e-2)


def test_stats_json_records_mean_std_classes_counts_and_archive_md5(normalized, tiny_archive):
    out, stats = normalized
    saved = json.loads((out / "stats.json").read_text())
    assert saved == stats == data.load_stats(out)
    assert {"mean", "std", "classes", "counts", "archive_md5"} <= saved.keys()
    assert len(saved["mean"]) == len(saved["std"]) == 3 and all(s > 0 for s in saved["std"])
    assert saved["classes"] == CLASSES
    assert saved["counts"] == {"train": 150, "val": 50, "test": 100}
    assert saved["archive_md5"] == tiny_archive[1]
    assert saved["val_size"] == VAL_SIZE and saved["seed"] == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(SPLIT_FILES)


def test_normalize_is_deterministic_byte_for_byte(tmp_path, raw_dir, normalized, tiny_archive):
    first = snapshot(normalized[0])
    run_normalize(raw_dir, tmp_path / "again", tiny_archive)
    assert snapshot(tmp_path / "again") == first
    run_normalize(raw_dir, tmp_path / "again", tiny_archive)  # over its own output
    assert snapshot(tmp_path / "again") == first
    assert leftovers(tmp_path) == []


def test_another_seed_gives_another_split(tmp_path, raw_dir, normalized, tiny_archive):
    stats = run_normalize(raw_dir, tmp_path / "seed1", tiny_archive, seed=1)
    assert stats["seed"] == 1 and stats["counts"] == normalized[1]["counts"]
    val0, val1 = data.load_split(normalized[0], "val"), data.load_split(tmp_path / "seed1", "val")
    assert np.bincount(val1.labels, minlength=10).tolist() == [5] * 10, "still stratified"
    assert not np.array_equal(val0.images, val1.images)
    assert stats["mean"] != normalized[1]["mean"]


@pytest.mark.parametrize("val_size", [500, 191])
def test_val_size_that_does_not_fit_raises_data_error(tmp_path, raw_dir, tiny_archive, val_size):
    out = tmp_path / "normalized"
    with pytest.raises(DataError, match=f"data.val_size={val_size}"):
        run_normalize(raw_dir, out, tiny_archive, val_size=val_size)
    assert not out.exists() and leftovers(tmp_path) == []


def test_failed_normalize_keeps_previous_output(tmp_path, raw_dir, tiny_archive):
    out = tmp_path / "normalized"
    run_normalize(raw_dir, out, tiny_archive)
    before = snapshot(out)
    with pytest.raises(DataError):
        run_normalize(raw_dir, out, tiny_archive, val_size=500)
    assert snapshot(out) == before


def test_normalize_without_raw_data_says_to_download_first(tmp_path, tiny_archive):
    with pytest.raises(DataError, match="run the download stage first"):
        run_normalize(tmp_path / "raw", tmp_path / "normalized", tiny_archive)
    assert not (tmp_path / "normalized").exists()


def test_loading_splits_before_normalize_says_to_normalize_first(tmp_path):
    with pytest.raises(DataError, match="run the normalize stage first"):
        data.load_split(tmp_path, "train")
    with pytest.raises(DataError, match="run the normalize stage first"):
        data.load_stats(tmp_path)


# --- the stages, as DVC runs them (cwd = the project) --------------------------------------------

def test_download_and_normalize_stages_write_their_outputs(project, tiny_archive):
    cfg = config.load()
    download.run(cfg)
    normalize.run(cfg)
    assert md5_of(paths.RAW / ARCHIVE_NAME) == cfg.data.md5
    assert all((paths.RAW / BATCH_DIR / name).is_file() for name in BATCH_FILES)
    assert sorted(p.name for p in paths.NORMALIZED.iterdir()) == sorted(SPLIT_FILES)
    stats = data.load_stats(paths.NORMALIZED)
    assert stats["counts"]["val"] == cfg.data.val_size and stats["archive_md5"] == cfg.data.md5
    assert sorted(p.name for p in Path("data").iterdir()) == ["normalized", "raw"], "no staging folder left"


# --- untrusted archives: nothing runs, nothing lands outside, bad content is named at once ------

class _RunsCode:
    """A pickle that, if unpickled without restrictions, creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _member(tar: tarfile.TarFile, name: str, payload: bytes = b"", kind: bytes = tarfile.REGTYPE,
            target: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mtime = kind, target, len(payload), 0
    tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)


def _official_batches(tiny_archive) -> dict[str, bytes]:
    with tarfile.open(tiny_archive[0]) as tar:
        return {m.name.split("/")[-1]: tar.extractfile(m).read() for m in tar if m.isfile()}


def _archive(folder: Path, members: list[tuple], batches: dict[str, bytes]) -> tuple[str, str]:
    """An archive with the tiny archive's batches (some replaced) and extra members; (file URL, md5)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ARCHIVE_NAME
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in batches.items():
            _member(tar, f"{BATCH_DIR}/{name}", payload)
        for member in members:
            _member(tar, *member)
    return path.as_uri(), md5_of(path)


def _batch(data, labels) -> bytes:
    return pickle.dumps({"data": data, "labels": labels}, protocol=2)


def test_a_batch_that_runs_code_when_unpickled_is_refused_and_runs_nothing(tmp_path, tiny_archive):
    marker = tmp_path / "marker"
    batches = {**_official_batches(tiny_archive), "data_batch_1": pickle.dumps(_RunsCode(marker), protocol=2)}
    url, md5 = _archive(tmp_path / "mirror", [], batches)
    with pytest.raises(DataError, match="data_batch_1.*refused to load posix.system|data_batch_1.*refused"):
        data.download(url, md5, tmp_path / "data" / "raw")
    assert not marker.exists(), "unpickling ran the archive's code"
    assert_nothing_kept(tmp_path / "data")
    # Already extracted by someone else: normalize refuses it too, and runs nothing.
    raw = tmp_path / "raw" / BATCH_DIR
    raw.mkdir(parents=True)
    for name, payload in batches.items():
        (raw / name).write_bytes(payload)
    with pytest.raises(DataError, match="data_batch_1"):
        data.read_batches(raw)
    assert not marker.exists()


@pytest.mark.parametrize("members", [
    [("../../outside/x", b"escaped")],
    [("{outside}/x", b"escaped")],  # an absolute path
    [(f"{BATCH_DIR}/link", b"", tarfile.SYMTYPE, "{outside}"), (f"{BATCH_DIR}/link/x", b"escaped")],
    [(f"{BATCH_DIR}/hard", b"", tarfile.LNKTYPE, "{outside}/x")],
    [("../../pipeline/stages/normalize.py", b"print('replaced')")],
], ids=["dotdot", "absolute", "symlink", "hardlink", "source-file"])
def test_archive_members_that_would_write_outside_are_refused(tmp_path, tiny_archive, members):
    outside = tmp_path / "outside"
    members = [tuple(str(v).format(outside=outside) if isinstance(v, str) else v for v in m) for m in members]
    url, md5 = _archive(tmp_path / "mirror", members, _official_batches(tiny_archive))
    project = tmp_path / "project"
    with pytest.raises(DataError, match="not CIFAR-10's python version: it holds"):
        data.download(url, md5, project / "data" / "raw")
    assert not outside.exists(), "a member was written outside the staging folder"
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == \
        ["mirror/" + ARCHIVE_NAME]
    assert_nothing_kept(project / "data")


BAD_CONTENT = {
    "label_10": ("data_batch_2", lambda x, y: _batch(x, [10] + y[1:]), "label 10 is not a CIFAR-10 class"),
    "label_minus_1": ("data_batch_3", lambda x, y: _batch(x, [-1] + y[1:]), "label -1 is not a CIFAR-10 class"),
    "test_label_only": ("test_batch", lambda x, y: _batch(x, y[:-1] + [12]), "label 12"),
    "small_images": ("data_batch_1", lambda x, y: _batch(x[:, :768].copy(), y), "N x 3072"),
    "label_count": ("data_batch_1", lambda x, y: _batch(x, y[:-3]), "labels for 40 images"),
    "data_not_array": ("data_batch_4", lambda x, y: _batch(x.tolist(), y), "'data' must be a uint8 array"),
    "not_a_pickle": ("data_batch_5", lambda x, y: b"\x00garbage" * 10, "does not unpickle"),
    "no_labels": ("data_batch_5", lambda x, y: pickle.dumps({"data": x}, protocol=2), "has no 'labels'"),
    "nine_classes": ("batches.meta", lambda x, y: pickle.dumps({"label_names": CLASSES[:9]}, protocol=2),
                     "the 10 class names"),
    "nested_labels": ("data_batch_1", lambda x, y: _batch(x, [[v] for v in y]),
                      "'labels' must be a list of integers, got a list of 40 items"),
    "huge_label": ("data_batch_2", lambda x, y: _batch(x, [10**5000] + y[1:]), "label of 16610 bits"),
    "unequal_batches": ("data_batch_1", lambda x, y: _batch(x[:-2].copy(), y[:-2]), "of equal size"),
}


@pytest.mark.parametrize("case", list(BAD_CONTENT))
def test_bad_content_fails_the_download_naming_the_file_and_keeps_nothing(tmp_path, tiny_archive, case):
    name, make, phrase = BAD_CONTENT[case]
    batches = _official_batches(tiny_archive)
    good = pickle.loads(batches[name]) if name != "batches.meta" else {}
    payload = make(good.get("data"), list(good.get("labels", [])))
    url, md5 = _archive(tmp_path / "mirror", [], {**batches, name: payload})
    with pytest.raises(DataError, match=phrase) as info:
        data.download(url, md5, tmp_path / "data" / "raw")
    assert name in str(info.value)
    assert_nothing_kept(tmp_path / "data")


def test_cli_bad_content_exits_2_with_the_message(tmp_path, tiny_archive):
    batches = _official_batches(tiny_archive)
    good = pickle.loads(batches["data_batch_2"])
    url, md5 = _archive(tmp_path / "mirror", [], {**batches, "data_batch_2": _batch(good["data"], [10] * 40)})
    write_params(tmp_path, tiny_params(url, md5))
    done = run_cli("download", cwd=tmp_path)
    assert done.returncode == 2
    assert "data_batch_2: label 10 is not a CIFAR-10 class" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data" / "raw").exists()


def test_a_staging_folder_left_by_a_killed_run_is_removed_by_the_next(tmp_path, tiny_archive):
    stale = tmp_path / "data" / ".raw-staging-killed"
    (stale / BATCH_DIR).mkdir(parents=True)
    (stale / BATCH_DIR / "data_batch_1").write_bytes(b"half")
    data.download(str(tiny_archive[0]), tiny_archive[1], tmp_path / "data" / "raw")
    assert leftovers(tmp_path / "data") == []
    assert (tmp_path / "data" / "raw" / BATCH_DIR / "data_batch_1").is_file()


# --- hostile input costs bounded memory, disk and time, and ends in a clear error ---------------

class _Hostile(http.server.BaseHTTPRequestHandler):
    """Misbehaving servers, one per path."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _head(self, length: int | None = None, chunked: bool = False) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        if length is not None:
            self.send_header("Content-Length", str(length))
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()

    def do_GET(self) -> None:
        try:
            self._serve()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    def _serve(self) -> None:
        path = self.path.split("?")[0]
        if path == "/forever":  # zeros at full speed, no length, never ends
            self._head()
            while True:
                self.wfile.write(bytes(1 << 16))
        elif path == "/declared-huge":  # says 10 GB, sends nothing
            self._head(10 * 2**30)
            self.wfile.flush()
            time.sleep(5)
        elif path == "/drip":  # one byte at a time, slowly, never ending
            self._head(2**20)
            while True:
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.2)
        elif path == "/steady":  # fast enough never to stall, never ending
            self._head()
            while True:
                self.wfile.write(bytes(1 << 14))
                self.wfile.flush()
                time.sleep(0.05)
        elif path == "/not-http":
            self.wfile.write(b"hello, this is not HTTP\r\n\r\n")
        elif path == "/broken-chunked":
            self._head(chunked=True)
            self.wfile.write(b"10\r\nonly five\r\n")  # 16 bytes announced, fewer sent, then the end
        elif path == "/short":  # fewer bytes than announced
            self._head(1000)
            self.wfile.write(bytes(10))
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path.startswith("/chain"):  # /chain/N redirects N times, then 404
            hops = int(path.rsplit("/", 1)[1])
            self.send_response(302 if hops else 404)
            self.send_header("Location", f"/chain/{hops - 1}")
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture(scope="module")
def hostile():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _download_refused(url: str, tmp_path: Path, phrase: str, max_bytes: int = 2**20, within_s: float = 30) -> str:
    started = time.monotonic()
    with pytest.raises(DataError, match=phrase) as info:
        data.download(url, OTHER_MD5, tmp_path / "data" / "raw", max_bytes)
    assert time.monotonic() - started < within_s
    assert_nothing_kept(tmp_path / "data")
    assert url in str(info.value) and "Nothing was kept" in str(info.value)
    return str(info.value)


def test_an_endless_download_is_refused_at_the_size_cap(tmp_path, hostile):
    message = _download_refused(f"{hostile}/forever", tmp_path, "larger than 1 MiB")
    assert "data.max_download_mb" in message


def test_a_declared_size_over_the_cap_is_refused_before_any_byte(tmp_path, hostile):
    _download_refused(f"{hostile}/declared-huge", tmp_path, "larger than 1 MiB", within_s=3)


def test_a_stalled_download_is_refused_by_the_stall_detector(tmp_path, hostile, monkeypatch):
    monkeypatch.setattr(data, "STALL_WINDOW_S", 1.0)
    _download_refused(f"{hostile}/drip", tmp_path, "stalled: .* bytes in the last", within_s=10)


def test_a_slow_but_steady_download_is_refused_at_the_deadline(tmp_path, hostile, monkeypatch):
    monkeypatch.setattr(data, "DOWNLOAD_DEADLINE_S", 2)
    monkeypatch.setattr(data, "STALL_WINDOW_S", 0.5)
    _download_refused(f"{hostile}/steady", tmp_path, "took more than", max_bytes=2**30, within_s=10)


@pytest.mark.parametrize("path, phrase", [
    ("/not-http", "broke off or is not valid HTTP"),
    ("/broken-chunked", "broke off or is not valid HTTP"),
    ("/short", "ended after 10 of 1,000 bytes|broke off or is not valid HTTP"),
    ("/loop", "redirect loop"),
    ("/chain/9", "more than 5 redirects"),
])
def test_a_broken_transfer_is_a_clear_error(tmp_path, hostile, path, phrase):
    _download_refused(f"{hostile}{path}", tmp_path, phrase)


def test_a_few_redirects_are_followed(tmp_path, hostile):
    _download_refused(f"{hostile}/chain/3", tmp_path, "HTTP 404")  # followed to the end of the chain


def test_cli_a_transport_failure_exits_2_without_a_traceback(tmp_path, hostile):
    write_params(tmp_path, tiny_params(f"{hostile}/not-http", OTHER_MD5))
    done = run_cli("download", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "broke off or is not valid HTTP" in done.stderr and "Traceback" not in done.stderr


def test_cli_the_size_cap_is_a_param(tmp_path, archive_url, tiny_archive):
    write_params(tmp_path, tiny_params(archive_url, tiny_archive[1], data={"max_download_mb": 1}))
    assert run_cli("download", cwd=tmp_path).returncode == 0  # the tiny archive is far under 1 MiB
    big = tmp_path / "big.tar.gz"
    big.write_bytes(os.urandom(2 * 2**20))
    write_params(tmp_path, tiny_params(str(big), OTHER_MD5, data={"max_download_mb": 1}))
    done = run_cli("download", cwd=tmp_path)
    assert done.returncode == 2 and "larger than 1 MiB (data.max_download_mb)" in done.stderr


def test_a_member_over_its_size_cap_is_refused_before_it_is_written(tmp_path, tiny_archive):
    batches = _official_batches(tiny_archive)
    url, md5 = _archive(tmp_path / "mirror", [(f"{BATCH_DIR}/readme.html", bytes(2 * 2**20))], batches)
    with pytest.raises(DataError, match="readme.html' is 2,097,152 bytes, more than the 1,048,576 allowed"):
        data.download(url, md5, tmp_path / "data" / "raw")
    assert_nothing_kept(tmp_path / "data")


def test_a_member_twice_is_refused(tmp_path, tiny_archive):
    batches = _official_batches(tiny_archive)
    url, md5 = _archive(tmp_path / "mirror", [(f"{BATCH_DIR}/data_batch_1", batches["data_batch_2"])], batches)
    with pytest.raises(DataError, match="holds 'cifar-10-batches-py/data_batch_1' twice"):
        data.download(url, md5, tmp_path / "data" / "raw")
    assert_nothing_kept(tmp_path / "data")


def test_an_archive_that_unpacks_past_the_total_cap_is_refused(tmp_path, tiny_archive, monkeypatch):
    """tarfile reads a long-name header whole: the reader under it refuses past the total."""
    monkeypatch.setattr(data, "_TOTAL_CAP_BYTES", 2**20)
    folder = tmp_path / "mirror"
    folder.mkdir()
    path = folder / ARCHIVE_NAME
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        _member(tar, f"{BATCH_DIR}/" + "x" * (2 * 2**20), b"long name")
    with pytest.raises(DataError, match="unpacks to more than 1,048,576 bytes"):
        data.download(path.as_uri(), md5_of(path), tmp_path / "data" / "raw")
    assert_nothing_kept(tmp_path / "data")


def _shared_lists(levels: int) -> list:
    """A list whose two items are the same list, `levels` deep: a few bytes pickled, 2**levels leaves."""
    value: list = [0]
    for _ in range(levels):
        value = [value, value]
    return value


def _shared_tuples(levels: int) -> tuple:
    """As _shared_lists, with tuples: hashable, and hashing one walks every leaf."""
    value: tuple = (0,)
    for _ in range(levels):
        value = (value, value)
    return value


def _dict_keyed_by(key: tuple) -> bytes:
    """The pickle of {key: 1}, written opcode by opcode: building that dict here would hash the key."""
    body = pickle.dumps(key, protocol=2)[2:-1]  # without PROTO and STOP
    return b"\x80\x02}" + body + b"K\x01s."  # EMPTY_DICT, the key, BININT1 1, SETITEM, STOP


BOMBS = {
    "labels": ("data_batch_1", lambda x, y: _batch(x, _shared_lists(40)), "a second reference"),
    "class_names": ("batches.meta", lambda x, y: pickle.dumps({"label_names": _shared_lists(40)}, protocol=2),
                    "a second reference"),
    "keys": ("data_batch_2", lambda x, y: _dict_keyed_by(_shared_tuples(40)), "a second reference"),
    "huge_array": ("data_batch_3", lambda x, y: _reduce_bytes("huge"), "refused: an array rebuilt otherwise"),
    "object_array": ("data_batch_4", lambda x, y: _reduce_bytes("object"), "refused: .*not a plain numeric type"),
}


def _reduce_bytes(kind: str) -> bytes:
    """A batch whose 'data' is rebuilt through numpy's own globals, as a hostile file could."""
    rebuild = np.ndarray.__reduce__(np.zeros(0))[0]

    class Huge:
        def __reduce__(self):
            return rebuild, (np.ndarray, (2**40,), b"b")

    array = np.empty(3, dtype=object) if kind == "object" else Huge()
    return pickle.dumps({"data": array, "labels": [0]}, protocol=2)


@pytest.mark.parametrize("case", list(BOMBS))
def test_a_small_hostile_pickle_costs_bounded_memory_and_is_refused(tmp_path, tiny_archive, case):
    """In a subprocess whose address space is capped at 2 GiB: an unbounded expansion would be killed."""
    name, make, phrase = BOMBS[case]
    batches = _official_batches(tiny_archive)
    good = pickle.loads(batches[name]) if name != "batches.meta" else {}
    payload = make(good.get("data"), list(good.get("labels", [])))
    assert len(pickle.dumps(_shared_lists(40), protocol=2)) < 1_000  # 2**40 leaves from a few hundred bytes
    url, md5 = _archive(tmp_path / "mirror", [], {**batches, name: payload})
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))\n"
            "from pipeline import data\n"
            "try:\n"
            f"    data.download({url!r}, {md5!r}, {str(tmp_path / 'data' / 'raw')!r})\n"
            "except data.DataError as exc:\n"
            "    print(exc); sys.exit(2)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert name in done.stdout and re.search(phrase, done.stdout), done.stdout
    assert len(done.stdout) < 2000, "the message must not print the value"
    assert_nothing_kept(tmp_path / "data")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_download_stopped_by_a_signal_removes_its_staging_folder(tmp_path, hostile, signum):
    write_params(tmp_path, tiny_params(f"{hostile}/drip", OTHER_MD5))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    download_cli = subprocess.Popen([sys.executable, "-m", "pipeline", "download"], cwd=tmp_path, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not leftovers(tmp_path / "data") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(tmp_path / "data"), "premise: the transfer is under way in its staging folder"
    time.sleep(0.5)
    download_cli.send_signal(signum)
    _, stderr = download_cli.communicate(timeout=30)
    assert download_cli.returncode != 0 and "Traceback" not in stderr
    assert_nothing_kept(tmp_path / "data")
