"""pipeline/results.py: the results document shows only the seeds of the committed recipe."""

from __future__ import annotations

import pandas as pd
import yaml

from pipeline import config, results
from tests.conftest import ROOT


def cells(line: str) -> list[str]:
    """A markdown table row's cells, without the padding that aligns the columns."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_rows(lines: list[str]) -> dict[str, list[str]]:
    """A markdown table's rows by their first cell."""
    return {cells(line)[0]: cells(line) for line in lines if line.startswith("|")}


def committed_lock(resnet: dict) -> dict:
    """The part of dvc.lock that results.py reads for the recipe: train_resnet's params."""
    return {"stages": {"train_resnet": {"params": {"params.yaml": {"train.resnet": resnet}}}}}


def test_seeds_of_the_committed_recipe_are_shown_and_stale_ones_are_not():
    cfg = config.load(ROOT / "params.yaml")
    resnet = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["resnet"]  # as DVC records it
    recorded = {"recipe": cfg.train.resnet.without_seed(), "seeds": [], "mean": {}, "std": {}}
    assert results.seeds_of_committed_recipe(recorded, committed_lock(resnet)) is recorded
    assert results.seeds_of_committed_recipe(recorded, committed_lock({**resnet, "seed": 7})) is recorded, \
        "the seed is not part of the recipe"
    assert results.seeds_of_committed_recipe(recorded, committed_lock({**resnet, "epochs": 3})) is None
    assert results.seeds_of_committed_recipe({k: v for k, v in recorded.items() if k != "recipe"},
                                             committed_lock(resnet)) is None, "seeds of an unknown recipe"
    assert results.seeds_of_committed_recipe(None, committed_lock(resnet)) is None


def test_the_tried_table_shows_each_run_of_the_committed_csv_with_its_precision():
    tried = pd.read_csv(ROOT / "docs/tried.csv", dtype={"run": str})
    lines = results.tried_table(tried)
    assert len(lines) == 2 + len(tried), "a header, its rule and one line per run"
    first = tried.iloc[0]
    assert cells(lines[2])[:3] == [f"`{first['run']}`", first["model"], str(first["seed"])]
    assert results.precision_note("bf16") == ", bf16" and results.precision_note(float("nan")) == ""


def test_the_screen_table_ranks_recipes_by_their_mean_over_seeds():
    screen = pd.DataFrame([
        {"label": "a", "seed": 0, "changes": "{}", "val_acc": 0.80},
        {"label": "b", "seed": 0, "changes": '{"train.resnet.optimizer.lr": 0.2}', "val_acc": 0.82},
        {"label": "a", "seed": 1, "changes": "{}", "val_acc": 0.86},
    ]).assign(relative_compute=1.0, train_running_acc=0.9, train_clean_subset_acc=0.95, selected_epoch=3,
              epochs=3, seconds=10.0)
    lines = results.screen_table(screen)
    assert cells(lines[2])[:5] == ["a", "none", "1.00", "2", "83.00%"], "a's two seeds averaged, ranked first"
    assert cells(lines[3])[:5] == ["b", "`optimizer.lr=0.2`", "1.00", "1", "82.00%"]


def test_screens_are_listed_with_their_base_device_and_data_and_older_screens_still_render(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "SCREENS", tmp_path)
    figures = {"seed": 0, "changes": "{}", "relative_compute": 1.0, "val_acc": 0.8, "train_running_acc": 0.9,
               "train_clean_subset_acc": 0.95, "selected_epoch": 3, "epochs": 3, "seconds": 10.0}
    pd.DataFrame([{"label": "a", **figures, "base": '{"train.resnet.model.width": 24}', "device": "NVIDIA H200",
                   "precision": "fp32", "data_md5": results.OFFLINE_COPY_MD5}]).to_csv(tmp_path / "new.csv")
    pd.DataFrame([{"label": "b", **figures}]).to_csv(tmp_path / "old.csv")  # before base, device and data
    pd.DataFrame([{"epoch": 1}]).to_csv(tmp_path / "new_epochs.csv")
    text = "\n".join(results.screens_section())
    assert "### `new.csv` (1 runs on NVIDIA H200 (fp32)" in text and "`model.width=24` (the base)" in text
    assert "offline copy" in text
    assert "### `old.csv` (1 runs on an unrecorded device" in text and "Data: not recorded" in text
    assert "new_epochs.csv`)" in text and "### `new_epochs.csv`" not in text, "epoch files are not screens"


def test_the_selection_note_says_why_an_earlier_epoch_is_kept():
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_running_acc": [0.80, 0.91, 0.93], "val_acc": [0.80, 0.86, 0.85]})
    note = results.selection_note(history, 2, "best_val_under_target", 0.92)
    assert "93.00%" in note and "not under the 92% bound" in note and "keeps epoch 2" in note
    assert "last epoch is kept" in results.selection_note(history, 3, "last", 0.92)
    # Kept for its validation accuracy alone: the bound is not the reason and is not named.
    under = history.assign(train_running_acc=[0.80, 0.85, 0.90])
    assert "bound" not in results.selection_note(under, 2, "best_val_under_target", 0.92)
    assert "bound" not in results.selection_note(history, 2, "best_val", 0.92)


def test_the_pipeline_time_is_shown_stage_by_stage_against_the_goal():
    timed = {"date": "2026-11-30T20:00:00+00:00", "commit": "a70f633" + "0" * 33, "cpu": "Some CPU", "threads": 2,
             "native_bf16": True, "stages_s": {"dvc": 2.0, "download": 10.0, "train_resnet": 1500.0},
             "total_s": 1512.0}
    lines = results.pipeline_time_section(timed)
    text = "\n".join(lines)
    assert "`a70f633`" in text and "Some CPU" in text and "25.2 min in all" in text and "within the 30" in text
    rows = table_rows(lines)
    assert rows["`train_resnet`"] == ["`train_resnet`", "1,500", "25.0"] and rows["all"] == ["all", "1,512", "25.2"]
    assert "**over** the 30" in "\n".join(results.pipeline_time_section({**timed, "total_s": 31 * 60.0}))


def test_the_epoch_table_names_the_clean_subset_that_was_scored():
    history = pd.DataFrame({"epoch": [1, 2], "train_running_acc": [0.8, 0.9], "train_clean_subset_acc": [0.85, 0.95],
                            "val_acc": [0.8, 0.86], "val_loss": [0.6, 0.5], "lr": [0.1, 0.05],
                            "epoch_time_s": [100.0, 101.0]})
    assert "clean train acc (5,000-image subset)" in results.epochs_table(history, 2, 5000)[0]
    assert "clean train acc (whole train split)" in results.epochs_table(history, 2, 0)[0]
    assert cells(results.epochs_table(history, 2, 5000)[-1])[:4] == ["2 (kept)", "90.00%", "95.00%", "86.00%"]


def seed_row(seed: int, precision: str, val: float, running: float, epoch: int = 10) -> dict:
    return {"seed": seed, "precision": precision, "machine": "a CPU", "val_acc": val, "test_acc": 0.85,
            "train_running_acc": running, "train_acc": 0.95, "selected_epoch": epoch, "train_time_s": 600.0}


def test_the_margin_names_the_weakest_seed_against_each_bound_over_the_aggregated_precision():
    seeds = {"aggregated_precision": "bf16", "seeds": [
        seed_row(0, "bf16", 0.8612, 0.9101), seed_row(1, "bf16", 0.8560, 0.9150),
        seed_row(0, "fp32", 0.8300, 0.9500)]}  # the fp32 row is not among the aggregated ones
    sentence = results.margin_sentence(seeds, {"val_acc_min": 0.85, "train_acc_max": 0.92}, 5000)
    assert "at epoch 10, the weakest of seeds 0, 1 (bf16) scores 85.60% validation accuracy" in sentence
    seeds["seeds"][1]["selected_epoch"] = 11
    assert "at the epochs they keep (10, 11), the weakest" in results.margin_sentence(
        seeds, {"val_acc_min": 0.85, "train_acc_max": 0.92}, 5000)
    assert "30 images of 5,000 above the 85% line" in sentence
    assert "91.50%, 0.50 points under 92%" in sentence


def test_the_seeds_table_shows_each_row_s_precision_and_machine_and_the_mean_of_the_aggregated_rows():
    seeds = {"aggregated_precision": "bf16",
             "seeds": [seed_row(0, "bf16", 0.86, 0.91), seed_row(1, "bf16", 0.87, 0.90), seed_row(0, "fp32", 0.5, 0.5)],
             "mean": {"val_acc": 0.865, "test_acc": 0.85, "train_running_acc": 0.905, "train_acc": 0.95,
                      "selected_epoch": 10, "train_time_s": 600.0},
             "std": {"val_acc": 0.007, "test_acc": 0.0, "train_running_acc": 0.007, "train_acc": 0.0,
                     "selected_epoch": 0.0, "train_time_s": 0.0}}
    lines = results.seeds_table(seeds)
    assert cells(lines[4])[:3] == ["0", "fp32", "50.00%"] and cells(lines[4])[-1] == "a CPU"
    assert cells(lines[-1])[:3] == ["mean ± std (2 seeds)", "bf16", "86.50% ± 0.70"]
    assert [row["seed"] for row in results.aggregated_seeds(seeds)] == [0, 1]
