"""Command line: python -m pipeline STAGE [-S key=value ...]

The same override syntax as `dvc exp run -S`, for people who use neither DVC nor MLflow.
Overrides apply to this invocation only; params.yaml is not changed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

from pipeline import config as config_module
from pipeline.errors import PipelineError
from pipeline.paths import CHECKPOINTS, MODEL_NAMES

STAGES = {
    "check": "validate params.yaml and check that this machine can run it (DVC runs it before every stage)",
    "download": "fetch and verify the CIFAR-10 archive (data.url, data.md5) into data/raw/",
    "normalize": "split train/validation, standardize with train statistics, write data/normalized/",
    "train": "train one model (baseline or resnet) and record it in MLflow",
    "evaluate": "compare both models on train/validation/test, write the report, register the ResNet",
    "log-run": "record a finished training stage's outputs as a new MLflow run (after a lost tracking server)",
    "all": "run every stage in order, all in one MLflow parent run",
    "seeds": "train the ResNet of params.yaml with each of --seeds; write their mean and std to metrics/seeds.json",
}

MODEL_STAGES = ("train", "log-run")  # the stages that take a model name

# Shortcuts for the most-changed training params, shared with the MLproject entry points.
# Each maps to train.<model>.<key>; an empty value means "as params.yaml says".
SHORTCUTS = {
    "epochs": "epochs",
    "lr": "optimizer.lr",
    "batch_size": "batch_size",
    "weight_decay": "optimizer.weight_decay",
    "label_smoothing": "label_smoothing",
    "dropout": "model.dropout",
    "seed": "seed",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="CIFAR-10: a ResNet with skip connections against an overfitting CNN.",
        epilog="stages:\n" + "\n".join(f"  {name:<10} {text}" for name, text in STAGES.items())
        + "\n\nexample: python -m pipeline all -S train.resnet.epochs=5 -S train.baseline.epochs=5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=list(STAGES), help="the stage to run (see below)")
    parser.add_argument("model", nargs="?", choices=MODEL_NAMES, help="for train and log-run: which model")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, as in `dvc exp run -S` (repeatable)")
    parser.add_argument("--set-list", default="", metavar="'K=V K=V'",
                        help="several overrides in one space-separated string (for MLproject)")
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    parser.add_argument("--overlay", action="append", default=[], metavar="FILE",
                        help="a named configuration merged over the params, e.g. configs/problem_recipe.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="N",
                        help="for seeds: the seeds to train (default: 0 1 2); the params' own seed comes from "
                        "the pipeline's run when its outputs match")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    parser.add_argument("--parent-run", default=None, help=argparse.SUPPRESS)  # set by `all` for torchrun children
    for name in SHORTCUTS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default="", metavar="VALUE",
                            help=f"train.<model>.{SHORTCUTS[name]} (for train: the chosen model; for all: "
                            + ("the resnet" if name == "dropout" else "both models") + ")")
    args = parser.parse_args(argv)
    if args.stage in MODEL_STAGES and args.model is None:
        parser.error(f"{args.stage} needs a model: python -m pipeline {args.stage} {{baseline,resnet}}")
    if args.stage not in MODEL_STAGES and args.model is not None:
        parser.error(f"'{args.model}' is only taken by train and log-run")
    return args


def shortcut_overrides(args: argparse.Namespace) -> list[str]:
    targets = [args.model] if args.model else list(MODEL_NAMES)
    overrides = []
    for name, key in SHORTCUTS.items():
        value = str(getattr(args, name)).strip()
        if not value:
            continue
        for model in targets:
            if name == "dropout" and model == "baseline":
                if args.model == "baseline":
                    raise config_module.ConfigError("--dropout: the baseline CNN has no dropout (it is the 'before')")
                continue
            overrides.append(f"train.{model}.{key}={value}")
    return overrides


@contextmanager
def training_lock(name: str) -> Iterator[None]:
    """One training of a model at a time in a project (as DVC locks its repository): a second refuses.

    The lock is the kernel's (flock), so a killed training leaves nothing to clean up.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = CHECKPOINTS / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"another training of the {name} model is running in this project (it holds "
                                f"{path}): wait for it to end, or stop it; its checkpoint lets it resume") from None
        yield


def torchrun(nproc: int, argv: list[str]) -> int:
    """Run `python -m pipeline ARGV` in nproc processes under torchrun (single machine) and wait for them."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "pipeline", *argv]
    print(f"train.nproc={nproc}: {' '.join(command)}", flush=True)
    return subprocess.run(command).returncode


def train_in_all(config, model: str, args: argparse.Namespace, overrides: list[str], parent: str,
                 progress: bool) -> bool:
    """One model's training inside `all`: in this process, or under torchrun with train.nproc > 1."""
    from pipeline.stages import train

    if config.train.nproc == 1:
        train.run(config, model, parent_run_id=parent, progress=progress)
        return True
    child = ["train", model, "--params", args.params, "--parent-run", parent, "--no-progress",
             *[f"--overlay={o}" for o in args.overlay], *[f"--set={o}" for o in overrides]]
    return torchrun(config.train.nproc, child) == 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        overrides = shortcut_overrides(args) + args.set_list.split() + args.overrides
        config = config_module.load(args.params, overrides, args.overlay)
        progress = not args.no_progress
        if not progress:
            # Read by tqdm when it is imported (below): also silences torchvision's download bar.
            os.environ["TQDM_DISABLE"] = "1"
        # Imported here so that --help and config errors answer without loading torch and mlflow.
        from pipeline import distributed, tracking
        from pipeline.stages import check, download, evaluate, log_run, normalize, seeds, train

        if args.stage == "check":
            check.run(config)
        elif args.stage == "download":
            download.run(config)
        elif args.stage == "normalize":
            normalize.run(config)
        elif args.stage == "train":
            check.preflight(config)
            if distributed.under_launcher():  # a rank of torchrun: the process that launched it holds the lock
                train.run(config, args.model, parent_run_id=args.parent_run, progress=progress)
                return 0
            with training_lock(args.model):
                if config.train.nproc > 1:
                    tracking.require_tracking(f"train_{args.model}")  # before any process starts training
                    return torchrun(config.train.nproc, argv)
                train.run(config, args.model, parent_run_id=args.parent_run, progress=progress)
        elif args.stage == "evaluate":
            evaluate.run(config)
        elif args.stage == "log-run":
            print(log_run.run(config, args.model))
        elif args.stage == "seeds":
            check.preflight(config)
            seeds.run(config, args.seeds, progress=progress)
        else:
            check.preflight(config)
            tracking.require_tracking("all")  # before the data stages
            download.run(config)
            normalize.run(config)
            # The parent run opens once the data is in place: bad data leaves no empty run behind.
            # Under `mlflow run`, its run is the parent of the stage runs.
            parent = os.environ.pop("MLFLOW_RUN_ID", None)
            if parent is None:
                parent = tracking.parent_run(config)
            for model in MODEL_NAMES:
                with training_lock(model):
                    if not train_in_all(config, model, args, overrides, parent, progress):
                        return 1
            evaluate.run(config, parent_run_id=parent)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is checkpointed; rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
