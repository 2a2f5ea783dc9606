"""Where each stage reads and writes, relative to the project root (DVC runs stages there)."""

from pathlib import Path

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
