"""Stage normalize: data/raw/ -> data/normalized/ (train/val/test .npy files and stats.json)."""

from pipeline import data, paths
from pipeline.config import Config


def run(config: Config) -> None:
    stats = data.normalize(paths.RAW, paths.NORMALIZED, config.data.val_size, config.data.seed, config.data.md5)
    mean = ", ".join(f"{m:.4f}" for m in stats["mean"])
    std = ", ".join(f"{s:.4f}" for s in stats["std"])
    print(f"wrote {paths.NORMALIZED}: {stats['counts']}; per-channel mean {mean}, std {std}")
