"""Stage download: fetch and verify the CIFAR-10 archive -> data/raw/."""

from pipeline import data, paths
from pipeline.config import Config


def run(config: Config) -> None:
    data.download(config.data.url, config.data.md5, paths.RAW, config.data.max_download_mb * 2**20)
