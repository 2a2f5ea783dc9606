"""pipeline/results.py: the results document shows only the seeds of the committed recipe."""

from __future__ import annotations

import yaml

from pipeline import config, results
from tests.conftest import ROOT


def committed_lock(resnet: dict) -> dict:
    """The part of dvc.lock that results.py reads for the recipe: train_resnet's params."""
    return {"stages": {"train_resnet": {"params": {"params.yaml": {"train.resnet": resnet}}}}}


def test_seeds_of_the_committed_recipe_are_shown_and_stale_ones_are_not():
    cfg = config.load(ROOT / "params.yaml")
    resnet = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["resnet"]  # as DVC records it
    recorded = {"recipe": results.recipe_without_seed(cfg.train.resnet), "seeds": [], "mean": {}, "std": {}}
    assert results.seeds_of_committed_recipe(recorded, committed_lock(resnet)) is recorded
    assert results.seeds_of_committed_recipe(recorded, committed_lock({**resnet, "seed": 7})) is recorded, \
        "the seed is not part of the recipe"
    assert results.seeds_of_committed_recipe(recorded, committed_lock({**resnet, "epochs": 3})) is None
    assert results.seeds_of_committed_recipe({k: v for k, v in recorded.items() if k != "recipe"},
                                             committed_lock(resnet)) is None, "seeds of an unknown recipe"
    assert results.seeds_of_committed_recipe(None, committed_lock(resnet)) is None
