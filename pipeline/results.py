"""python -m pipeline.results: docs/results.md and its learning curves, written from committed files only.

Every figure in the document is read from what the pipeline wrote and git holds: metrics/*.json,
plots/<model>/history.csv, metrics/seeds.json and dvc.lock (the params and the data the committed run
used). Rerun it after `dvc repro` or `python -m pipeline seeds` and commit the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from pipeline import paths
from pipeline.compute import training_flops
from pipeline.config import OFFICIAL_MD5, Recipe

OFFLINE_COPY_MD5 = "abf7c8b279e0a5a16f5b5094ff35b970"  # ../shared/cifar10/make_archive.py, all 60,000 images
DOCS = Path("docs")
RESULTS = DOCS / "results.md"
CURVES = DOCS / "learning_curves.png"
TRIED = DOCS / "tried.csv"
TRIED_PLOT = DOCS / "tried.png"
TRIED_AT = "79cb33b"  # the last commit with configs/candidates/ and the options only they used
SCREENS = DOCS / "screens"  # scripts/screen.py's tables (<grid>.csv) and their epochs (<grid>_epochs.csv)
STAGE_MINUTES_GOAL = 15  # the time within which train_resnet is to meet the targets on a 2-core CPU with native bf16
PIPELINE_MINUTES_GOAL = 30  # the same for the whole `dvc repro`, download to report
REPRO_TIME = DOCS / "bench" / "repro_time.json"  # bench/repro_time.py --json
README = Path("README.md")
TRAIN_IMAGES = 50_000  # CIFAR-10's training images, of which data.val_size are held out
README_START, README_END = "<!-- results:start", "<!-- results:end -->"


def pct(value: float) -> str:
    return f"{value:.2%}"


def markdown(rows: list[dict]) -> list[str]:
    """Rows of already formatted cells as a markdown table, one line per row (pandas and tabulate)."""
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True).splitlines()


def data_source(md5: str) -> str:
    if md5 == OFFICIAL_MD5:
        return "the official CIFAR-10 archive"
    if md5 == OFFLINE_COPY_MD5:
        return ("the offline copy of CIFAR-10 (all 60,000 images re-encoded as JPEG at quality 75, so pixels "
                "differ slightly from the official release; labels and split are CIFAR-10's)")
    return "an archive that is neither the official one nor the project's offline copy"


def before_after(evaluated: dict, trained: dict[str, dict]) -> list[str]:
    rows = {
        "running training accuracy (train mode, kept epoch)": lambda m, t: pct(m["train_running_acc"]),
        "clean training accuracy (eval mode, all 45,000 images)": lambda m, t: pct(m["train_acc"]),
        "validation accuracy": lambda m, t: pct(m["val_acc"]),
        "test accuracy": lambda m, t: pct(m["test_acc"]),
        "gap, clean training - validation": lambda m, t: f"{m['gap'] * 100:.2f} points",
        "kept epoch / epochs": lambda m, t: f"{m['selected_epoch']} / {t['epochs']}",
        "parameters": lambda m, t: f"{m['parameters']:,}",
        "training time (with per-epoch evaluation)": lambda m, t: f"{m['train_time_s']:,.0f} s",
        "seconds per epoch": lambda m, t: f"{m['train_time_s'] / t['epochs']:.1f} s",
        "training images per second (median epoch)": lambda m, t: f"{t['images_per_s']:,.0f}",
    }
    return markdown([{"figure": label, "baseline CNN (before)": show(evaluated["baseline"], trained["baseline"]),
                      "ResNet (after)": show(evaluated["resnet"], trained["resnet"])} for label, show in rows.items()])


def targets(evaluated: dict) -> list[str]:
    names = {"val_acc": "validation accuracy > 85%",
             "train_running_acc": "running training accuracy < 92% at the kept epoch", "epochs": "at most 30 epochs",
             "no_augmentation": "no data augmentation", "cifar10_only": "CIFAR-10 only"}
    return [f"- {'holds' if held else '**missed**'}: {names.get(key, key)}"
            for key, held in evaluated["targets"].items()]


def epochs_table(history: pd.DataFrame, selected: int, subset_size: int) -> list[str]:
    subset = f"{subset_size:,}-image subset" if subset_size else "whole train split"
    return markdown([{"epoch": f"{row.epoch}{' (kept)' if row.epoch == selected else ''}",
                      "running train acc": pct(row.train_running_acc),
                      f"clean train acc ({subset})": pct(row.train_clean_subset_acc),
                      "val acc": pct(row.val_acc), "val loss": f"{row.val_loss:.3f}", "lr": f"{row.lr:.4f}",
                      "s": f"{row.epoch_time_s:.0f}"} for row in history.itertuples()])


def selection_note(history: pd.DataFrame, selected: int, rule: str, train_acc_max: float) -> str:
    """Whether the last epoch is kept, or which rule kept an earlier one and why."""
    last = history.iloc[-1]
    if int(last.epoch) == selected:
        return (f"The last epoch is kept (rule `{rule}`); its running training accuracy is "
                f"{pct(last.train_running_acc)}.")
    if rule == "best_val_under_target" and last.train_running_acc >= train_acc_max:
        return (f"The last epoch's running training accuracy, {pct(last.train_running_acc)}, is not under the "
                f"{train_acc_max:.0%} bound, so the rule keeps epoch {selected}: the best validation accuracy "
                f"among the epochs under it.")
    return f"The rule `{rule}` keeps epoch {selected}: the best validation accuracy it admits."


def pipeline_time_section(timed: dict) -> list[str]:
    """The whole `dvc repro --force` timed stage by stage by bench/repro_time.py (docs/bench/repro_time.json)."""
    total = timed["total_s"]
    lines = [
        f"`bench/repro_time.py`: one `dvc repro --force` from download to report at commit "
        f"`{(timed.get('commit') or '?')[:7]}`, {timed['date'][:10]}, on {timed['cpu']} ({timed['threads']} "
        f"threads{', native bf16' if timed.get('native_bf16') else ', no native bf16'}); DVC's own work between "
        f"stages counts with the stage before it. **{total / 60:.1f} min in all**, "
        f"{'within' if total <= PIPELINE_MINUTES_GOAL * 60 else '**over**'} the {PIPELINE_MINUTES_GOAL}-minute goal.",
        "",
    ]
    stages = {"DVC start-up" if stage == "dvc" else f"`{stage}`": seconds
              for stage, seconds in timed["stages_s"].items()}
    return lines + markdown([{"stage": name, "seconds": f"{seconds:,.0f}", "minutes": f"{seconds / 60:.1f}"}
                             for name, seconds in {**stages, "all": total}.items()])


def aggregated_seeds(seeds: dict) -> list[dict]:
    """The rows metrics/seeds.json's mean and std are over: those of its aggregated precision."""
    precision = seeds.get("aggregated_precision")
    return [row for row in seeds["seeds"] if precision is None or row.get("precision", "bf16") == precision]


def seeds_table(seeds: dict) -> list[str]:
    accuracies = {"val acc": "val_acc", "test acc": "test_acc", "running train acc": "train_running_acc",
                  "clean train acc": "train_acc"}
    rows = [{"seed": row["seed"], "precision": row.get("precision", "bf16"),
             **{name: pct(row[key]) for name, key in accuracies.items()}, "kept epoch": row["selected_epoch"],
             "training time": f"{row['train_time_s']:,.0f} s", "machine": row.get("machine") or "?"}
            for row in seeds["seeds"]]
    mean, std = seeds["mean"], seeds["std"]
    rows.append({"seed": f"mean ± std ({len(aggregated_seeds(seeds))} seeds)",
                 "precision": seeds.get("aggregated_precision") or "all",
                 **{name: f"{pct(mean[key])} ± {std[key] * 100:.2f}" for name, key in accuracies.items()},
                 "kept epoch": f"{mean['selected_epoch']:.1f}", "training time": f"{mean['train_time_s']:,.0f} s",
                 "machine": ""})
    return markdown(rows)


def params_block(lock: dict) -> list[str]:
    resnet = lock["stages"]["train_resnet"]["params"]["params.yaml"]["train.resnet"]
    return ["```yaml", "train.resnet:", *["  " + line for line in yaml.safe_dump(resnet, sort_keys=False).splitlines()],
            "```"]


def margin_sentence(seeds: dict, goals: dict, val_size: int) -> str:
    """The headline's margin in words: the worst seed against each bound, at the epoch each keeps."""
    rows = aggregated_seeds(seeds)
    worst_val = min(rows, key=lambda row: row["val_acc"])
    worst_train = max(rows, key=lambda row: row["train_running_acc"])
    val_min, train_max = goals["val_acc_min"], goals["train_acc_max"]
    above = round((worst_val["val_acc"] - val_min) * val_size)
    epochs = sorted({row["selected_epoch"] for row in rows})
    kept = f"epoch {epochs[0]}" if len(epochs) == 1 else f"the epochs they keep ({', '.join(map(str, epochs))})"
    return (f"**The margin:** at {kept}, the weakest of seeds {', '.join(str(r['seed']) for r in rows)} "
            f"({seeds.get('aggregated_precision') or 'all'}) scores {pct(worst_val['val_acc'])} validation accuracy, "
            f"{above} images of {val_size:,} {'above' if above > 0 else 'short of'} the {val_min:.0%} line; the "
            f"highest running training accuracy is {pct(worst_train['train_running_acc'])}, "
            f"{(train_max - worst_train['train_running_acc']) * 100:.2f} points under {train_max:.0%}.")


def readme_summary(evaluated: dict, trained: dict[str, dict], seeds: dict | None, data_md5: str,
                   timed: dict | None = None, goals: dict | None = None, val_size: int | None = None) -> list[str]:
    """The short table of the README: the committed run, the seeds when they are there, and the whole
    pipeline's time when bench/repro_time.py has measured it."""
    b, r = evaluated["baseline"], evaluated["resnet"]
    accuracies = {"running train acc": "train_running_acc", "clean train acc": "train_acc", "val acc": "val_acc",
                  "test acc": "test_acc"}
    rows = [{"seed 0, `dvc repro`": name, **{column: pct(m[key]) for column, key in accuracies.items()},
             "epochs": f"{m['selected_epoch']} of {trained[model]['epochs']}",
             "training time": f"{m['train_time_s'] / 60:.1f} min"}
            for name, model, m in (("baseline CNN (before)", "baseline", b), ("ResNet (after)", "resnet", r))]
    if seeds is not None:
        mean, std = seeds["mean"], seeds["std"]
        listed = ", ".join(str(row["seed"]) for row in aggregated_seeds(seeds))
        rows.append({"seed 0, `dvc repro`": f"ResNet, seeds {listed} (mean ± std)",
                     **{column: f"{pct(mean[key])} ± {std[key] * 100:.2f}" for column, key in accuracies.items()},
                     "epochs": f"{mean['selected_epoch']:.1f}",
                     "training time": f"{mean['train_time_s'] / 60:.1f} min"})
    lines = markdown(rows)
    machine = evaluated.get("machine", {})
    held = evaluated["all_targets_hold"]
    if seeds is not None and goals and val_size:
        lines += ["", margin_sentence(seeds, goals, val_size)]
    lines += [
        "",
        f"Targets of the ResNet (seed 0): {'**every one holds**' if held else '**not every one holds**'}. "
        f"Measured on {machine.get('cpu', 'an unrecorded machine')} (`{machine.get('device', '?')}`, "
        f"{machine.get('threads', '?')} threads{machine_precision(machine)}), "
        f"data: {data_source(data_md5).split(' (')[0]}"
        f"{' (a JPEG re-encoding of the images)' if data_md5 == OFFLINE_COPY_MD5 else ''}. "
        "Running training accuracy is the training-mode figure averaged over the kept epoch; clean is eval mode.",
    ]
    if timed:
        where = "there" if timed["cpu"] == machine.get("cpu") else f"on {timed['cpu']} ({timed['threads']} threads)"
        lines[-1] += (f" The whole `dvc repro`, download to report, took {timed['total_s'] / 60:.1f} min {where} "
                      f"on {timed['date'][:10]} (`bench/repro_time.py`; stage by stage in "
                      f"[docs/results.md](docs/results.md)); the two trainings of the run above took "
                      f"{(b['train_time_s'] + r['train_time_s']) / 60:.1f} min.")
    return lines


def update_readme(summary: list[str]) -> None:
    text = README.read_text()
    start, end = text.index(README_START), text.index(README_END)
    head = text[:start] + text[start:].split("\n", 1)[0] + "\n"
    README.write_text(head + "\n".join(summary) + "\n" + text[end:])


def tried_table(tried: pd.DataFrame) -> list[str]:
    """docs/tried.csv's rows as a markdown table."""
    rows = []
    for row in tried.itertuples():
        finished = row.val_acc == row.val_acc  # NaN: no epoch under the bound
        rows.append({"run": f"`{row.run}`", "model": row.model, "seed": getattr(row, "seed", ""),
                     "dropout / head": f"{row.dropout} / {row.head_dropout}",
                     "batch, peak lr, final lr, weight decay": f"{row.batch_size}, {row.lr}, {row.final_lr_fraction} x "
                                                               f"peak, {getattr(row, 'weight_decay', '')}",
                     "average": row.average, "epochs run / planned": f"{row.epochs_run} / {row.epochs_planned}",
                     "best epoch with running < 92%": f"{row.best_epoch_under_92:.0f}" if finished else "none",
                     "val acc": pct(row.val_acc) if finished else "",
                     "running / clean (subset) train acc": f"{pct(row.train_running_acc)} / "
                                                           f"{pct(row.train_clean_subset_acc)}" if finished else "",
                     "seconds": f"{row.seconds:,}{precision_note(getattr(row, 'precision', None))}"})
    return markdown(rows)


def machine_precision(machine: dict) -> str:
    """`, bf16` or `, fp32` after a machine's threads, as evaluate.json recorded it; nothing where it did not."""
    return f", {machine['precision']}" if machine.get("precision") else ""


def precision_note(precision) -> str:
    """`, bf16` after a run's seconds where it trained in bf16; fp32, or not recorded: nothing."""
    return f", {precision}" if isinstance(precision, str) and precision != "fp32" else ""


def screen_table(screen: pd.DataFrame) -> list[str]:
    """A scripts/screen.py table as markdown, best mean validation accuracy first (several seeds: mean)."""
    grouped = screen.groupby("label", sort=False).agg(
        changes=("changes", "first"), relative_compute=("relative_compute", "first"), seeds=("seed", "count"),
        val_acc=("val_acc", "mean"), train_running_acc=("train_running_acc", "mean"),
        train_clean_subset_acc=("train_clean_subset_acc", "mean"), selected_epoch=("selected_epoch", "max"),
        epochs=("epochs", "first"), seconds=("seconds", "mean")).sort_values("val_acc", ascending=False)
    return markdown([{
        "recipe": label,
        "changes over the base": ", ".join(f"`{k.removeprefix('train.resnet.')}={v}`"
                                           for k, v in json.loads(row.changes).items()) or "none",
        "compute (base = 1)": f"{row.relative_compute:.2f}", "seeds": row.seeds, "val acc": pct(row.val_acc),
        "running / clean (subset) train acc": f"{pct(row.train_running_acc)} / {pct(row.train_clean_subset_acc)}",
        "kept / last epoch": f"{row.selected_epoch} / {row.epochs}", "seconds": f"{row.seconds:.0f}",
    } for label, row in grouped.iterrows()])


def screens_section() -> list[str]:
    """One table per screen in docs/screens/ (scripts/screen.py's output), with where it ran."""
    lines = []
    for path in sorted(SCREENS.glob("*.csv")):
        if path.stem.endswith("_epochs"):
            continue
        screen = pd.read_csv(path, dtype={"run": str})
        column = lambda name: screen.get(name, pd.Series(dtype=object)).dropna()  # noqa: E731  (older screens)
        where = ", ".join(sorted({f"{d} ({p})" for d, p in zip(column("device"), column("precision"))})) or \
            "an unrecorded device"
        data = ", ".join(sorted({data_source(md5) for md5 in column("data_md5")})) or "not recorded"
        base = json.loads(column("base").iloc[0]) if len(column("base")) else {}
        base_text = ", ".join(f"`{k.removeprefix('train.resnet.')}={v}`" for k, v in base.items())
        lines += [f"### `{path.name}` ({len(screen)} runs on {where}; every epoch in `{path.stem}_epochs.csv`)",
                  "", f"Data: {data}. Every recipe is params.yaml with {base_text or 'no changes'} (the base) and "
                  "its own changes.", "", *screen_table(screen), ""]
    return lines


def seeds_of_committed_recipe(seeds: dict | None, lock: dict) -> dict | None:
    """metrics/seeds.json if its seeds are of the ResNet recipe in dvc.lock, else None (stale: rerun seeds)."""
    if seeds is None:
        return None
    committed = Recipe.model_validate(lock["stages"]["train_resnet"]["params"]["params.yaml"]["train.resnet"])
    if seeds.get("recipe") != committed.without_seed():
        print("metrics/seeds.json holds seeds of another ResNet recipe than dvc.lock's: left out; rerun "
              "`python -m pipeline seeds` for this one")
        return None
    return seeds


def lock_val_size(lock: dict) -> int:
    """data.val_size as the committed normalize stage ran with it."""
    return int(lock["stages"]["normalize"]["params"]["params.yaml"]["data.val_size"])


def header(evaluated: dict, trained: dict[str, dict], lock: dict) -> list[str]:
    """The data, the machine, the before/after table, the targets and the curves."""
    md5 = lock["stages"]["download"]["params"]["params.yaml"]["data.md5"]
    machine = evaluated.get("machine", {})
    held = evaluated["all_targets_hold"]
    return [
        "# Results",
        "",
        "Generated by `python -m pipeline.results` from the committed `dvc.lock`, `metrics/` and `plots/`: "
        "`dvc metrics show` and `dvc plots show` show the same figures. Do not edit by hand.",
        "",
        f"- Data: {data_source(md5)}; archive md5 `{md5}`.",
        f"- Machine: {machine.get('cpu', 'not recorded')}, device `{machine.get('device', '?')}`, "
        f"{machine.get('threads', '?')} threads{machine_precision(machine)}.",
        "- One `dvc repro` with seed 0. Training accuracy is the running figure in training mode (dropout on, "
        "averaged over the epoch); clean accuracy is eval mode. Test accuracy chose nothing.",
        "",
        "## Before and after",
        "",
        *before_after(evaluated, trained),
        "",
        f"Targets of the ResNet: {'every one holds' if held else 'not every one holds'}.",
        "",
        *targets(evaluated),
        "",
        f"![learning curves of both models, seed 0, {machine.get('device', '')}; data: "
        f"{'offline JPEG copy' if md5 == OFFLINE_COPY_MD5 else 'see above'}]({CURVES.name})",
        "",
    ]


def resnet_epochs(trained: dict, history: pd.DataFrame, lock: dict, goals: dict) -> list[str]:
    """The ResNet's epochs, the one kept and why."""
    resnet_params = lock["stages"]["train_resnet"]["params"]["params.yaml"]
    recipe = resnet_params["train.resnet"]
    scored = f"EMA {recipe['ema_decay']}" if recipe.get("ema_decay") else "the raw weights"
    return [
        f"## The ResNet, epoch by epoch (scored: {scored}; rule `{trained['select']}`)",
        "",
        *epochs_table(history, trained["selected_epoch"], int(resnet_params["train.eval_train_size"])),
        "",
        selection_note(history, trained["selected_epoch"], trained["select"],
                       float(recipe.get("select_train_acc_max", goals["train_acc_max"]))),
        "",
    ]


def seeds_section(seeds: dict | None, seeds_file: Path, lock: dict) -> list[str]:
    """The seeds of the committed recipe with their training FLOPs, or why they are not shown."""
    if seeds is None:
        return ["## Seeds", "", "`metrics/seeds.json` holds the seeds of another ResNet recipe than this run's; "
                "the seeds of this one are not measured yet (`make seeds`).", ""] if seeds_file.exists() else []
    recipe_of_seeds = Recipe.model_validate({**seeds["recipe"], "seed": 0})
    flops = training_flops(recipe_of_seeds, TRAIN_IMAGES - lock_val_size(lock))
    mantissa, exponent = f"{flops:.2e}".split("e")
    return ["## Seeds", "", f"`python -m pipeline seeds` (`metrics/seeds.json`): every row is the recipe "
            f"below, {mantissa}e{int(exponent)} training FLOPs (`bench/train_speed.py`'s count per image x "
            "training images x epochs run), scored at the epoch it keeps. The mean and the sample standard "
            f"deviation are over the {seeds.get('aggregated_precision') or 'listed'} rows.", "",
            *seeds_table(seeds), ""]


def tried_section(goals: dict, offline: bool) -> list[str]:
    """docs/tried.csv as a table and a plot (docs/tried.png)."""
    from pipeline import plots  # matplotlib only here

    if not TRIED.exists():
        return []
    tried = pd.read_csv(TRIED, dtype={"run": str})  # ids such as 0e123456 stay text
    plots.tried_runs(tried, goals["val_acc_min"], goals["train_acc_max"],
                     STAGE_MINUTES_GOAL).savefig(TRIED_PLOT, dpi=100)
    return ["## What was tried", "", "The `train_resnet` runs of the full data on the project's 2-core CPU "
            "machines (fp32 unless the seconds say bf16) that chose the recipes before the margin round "
            "(`docs/tried.csv`); a run stopped early shows the epochs it ran. Their configurations, and the "
            f"options they tried that the pipeline has since dropped, last lived at commit {TRIED_AT} "
            f"(`git show {TRIED_AT}:configs/candidates/`).", "", *tried_table(tried), "",
            f"![validation accuracy against minutes of training, the finished runs above that had an epoch "
            f"under the training bound, on the machines of the table above; "
            f"data: {'offline JPEG copy' if offline else 'see above'}]({TRIED_PLOT.name})", ""]


def write() -> Path:
    from pipeline import plots  # matplotlib only here

    evaluated = json.loads((paths.METRICS / "evaluate.json").read_text())
    trained = {name: json.loads(paths.metrics_file(name).read_text()) for name in paths.MODEL_NAMES}
    histories = {name: pd.read_csv(paths.history_file(name)) for name in paths.MODEL_NAMES}
    lock = yaml.safe_load(Path("dvc.lock").read_text())
    md5 = lock["stages"]["download"]["params"]["params.yaml"]["data.md5"]
    seeds_file = paths.METRICS / "seeds.json"
    seeds = seeds_of_committed_recipe(json.loads(seeds_file.read_text()) if seeds_file.exists() else None, lock)
    goals = lock["stages"]["evaluate"]["params"]["params.yaml"]["evaluate"]["targets"]
    timed = json.loads(REPRO_TIME.read_text()) if REPRO_TIME.exists() else None

    DOCS.mkdir(exist_ok=True)
    plots.learning_curves(histories, goals["val_acc_min"], goals["train_acc_max"]).savefig(CURVES, dpi=100)
    lines = [*header(evaluated, trained, lock),
             *resnet_epochs(trained["resnet"], histories["resnet"], lock, goals)]
    if timed:
        lines += ["## The whole pipeline's time", "", *pipeline_time_section(timed), ""]
    lines += [*seeds_section(seeds, seeds_file, lock), *tried_section(goals, md5 == OFFLINE_COPY_MD5)]
    if screen_lines := screens_section():
        lines += ["## Screens", "", "Short runs of many recipes by `scripts/screen.py` (each an MLflow run under "
                  "`cifar10-screening`), their seeds averaged. Compute is the recipe's training FLOPs over the "
                  "base's.", "", *screen_lines]
    lines += ["## The ResNet recipe of this run (from dvc.lock)", "", *params_block(lock), ""]
    RESULTS.write_text("\n".join(lines))
    if README.exists() and README_START in README.read_text():
        update_readme(readme_summary(evaluated, trained, seeds, md5, timed, goals, lock_val_size(lock)))
    return RESULTS


if __name__ == "__main__":
    print(f"wrote {write()}")
