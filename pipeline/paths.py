"""Where each stage reads and writes, relative to the project root (DVC runs stages there)."""

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

RAW = Path("data/raw")
NORMALIZED = Path("data/normalized")
MODELS = Path("models")
METRICS = Path("metrics")
PLOTS = Path("plots")
CHECKPOINTS = Path("checkpoints")
REPORTS = Path("reports")
PARAMS_CHECK = Path("data/params.ok")  # written by the check stage

MODEL_NAMES = ("baseline", "resnet")


def model_file(name: str) -> Path:
    return MODELS / name / "model.pt"


def model_tracking_file(name: str) -> Path:
    return MODELS / name / "mlflow.json"


def metrics_file(name: str) -> Path:
    return METRICS / f"{name}.json"


def history_file(name: str) -> Path:
    return PLOTS / name / "history.csv"


def checkpoint_file(name: str) -> Path:
    return CHECKPOINTS / f"{name}.pt"


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write; it replaces `path` only if the block succeeds, so a
    failed or killed stage leaves the previous file as it was (DVC keeps outputs declared persist)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
