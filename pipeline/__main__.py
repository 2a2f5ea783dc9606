"""Command line: python -m pipeline STAGE [-S key=value ...]

The same override syntax as `dvc exp run -S`. Overrides apply to this invocation only; params.yaml is
not changed. MLproject's entry points call it too: `repro` drives `dvc exp run`, for the whole pipeline
(the main entry point) or, given a model, for its training stage (the train entry point).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

from pipeline import config as config_module
from pipeline.errors import ConfigError, PipelineError
from pipeline.paths import CHECKPOINTS, METRICS, MODEL_NAMES

STAGES = {
    "check": "validate params.yaml and check that this machine can run it (DVC runs it before every stage)",
    "download": "fetch and verify the CIFAR-10 archive (data.url, data.md5) into data/raw/",
    "normalize": "split train/validation, standardize with train statistics, write data/normalized/",
    "train": "train one model (baseline or resnet) and record it in MLflow",
    "evaluate": "compare both models on train/validation/test, write the report, register the ResNet",
    "log-run": "record a finished training stage's outputs as a new MLflow run (after a lost tracking server)",
    "all": "run every stage in order, all in one MLflow parent run",
    "repro": "the DVC pipeline with these overrides (dvc exp run -S ...), or with a model its training stage "
             "and what it needs: what `mlflow run .` calls",
    "seeds": "train the ResNet of params.yaml with each of --seeds; write their mean and std to metrics/seeds.json",
    "ui": "start `mlflow ui` on the project's tracking store and print the link to the experiment's training runs",
}

MODEL_STAGES = ("train", "log-run")  # the stages that need a model name
OPTIONAL_MODEL_STAGES = ("repro",)  # and the one that may take one


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="CIFAR-10: a ResNet with skip connections against an overfitting CNN.",
        epilog="stages:\n" + "\n".join(f"  {name:<10} {text}" for name, text in STAGES.items())
        + "\n\nexample: python -m pipeline all -S train.resnet.epochs=5 -S train.baseline.epochs=5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=list(STAGES), help="the stage to run (see below)")
    parser.add_argument("model", nargs="?", choices=MODEL_NAMES,
                        help="for train and log-run: which model; for repro: only its training stage")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, as in `dvc exp run -S` (repeatable)")
    # MLproject's `set` parameter: several -S overrides in one shell-quoted string (hidden: people use -S).
    parser.add_argument("--set-list", default="", help=argparse.SUPPRESS)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    parser.add_argument("--overlay", action="append", default=[], metavar="FILE",
                        help="a named configuration merged over the params, e.g. configs/problem_recipe.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], metavar="N",
                        help="for seeds: the seeds to train (default: 0 1 2 3 4); the params' own seed comes from "
                        "the pipeline's run when its outputs match, the others from metrics/seeds.json when it "
                        "holds them for the same recipe")
    parser.add_argument("--retrain", action="store_true",
                        help="for seeds: train every seed but the pipeline's own, even those metrics/seeds.json holds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    parser.add_argument("--port", type=int, default=5000, help="for ui: the port on 127.0.0.1 (default: 5000)")
    parser.add_argument("--parent-run", default=None, help=argparse.SUPPRESS)  # set by `all` for torchrun children
    args = parser.parse_args(argv)
    if args.stage in MODEL_STAGES and args.model is None:
        parser.error(f"{args.stage} needs a model: python -m pipeline {args.stage} {{baseline,resnet}}")
    if args.stage not in MODEL_STAGES + OPTIONAL_MODEL_STAGES and args.model is not None:
        parser.error(f"'{args.model}' is only taken by train, log-run and repro")
    return args


@contextmanager
def training_lock(name: str) -> Iterator[int | None]:
    """One training of a model at a time in a project (as DVC locks its repository): a second refuses.

    The lock is the kernel's (flock), so a killed training leaves nothing to clean up. Yields the
    file descriptor that holds it, for a launcher to hand down (a lock lives while any holder does).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield None
        return
    path = CHECKPOINTS / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"another training of the {name} model is running in this project (it holds "
                                f"{path}): wait for it to end, or stop it; its checkpoint lets it resume") from None
        yield handle.fileno()


def torchrun(nproc: int, argv: list[str], lock_fd: int | None = None) -> int:
    """Run `python -m pipeline ARGV` in nproc processes under torchrun (single machine) and wait for them.

    torchrun gets SIGTERM if this process dies, even by -9 (and its ranks die with it: see train_stage),
    and holds the training lock too, so that the lock lasts as long as any of them."""
    from pipeline.distributed import die_with_parent

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "pipeline", *argv]
    print(f"train.nproc={nproc}: {' '.join(command)}", flush=True)
    return run_child(command, pass_fds=() if lock_fd is None else (lock_fd,),
                     preexec_fn=lambda: die_with_parent(signal.SIGTERM))


def run_child(command: list[str], env: dict | None = None, **popen) -> int:
    """Run a command that our Ctrl-C or SIGTERM stops cleanly: it gets SIGINT, as from a terminal, in its own
    process group (DVC's stage, torchrun's ranks), and we wait for its own cleanup before unwinding."""
    try:
        child = subprocess.Popen(command, env=env, start_new_session=True, **popen)
    except FileNotFoundError:
        raise PipelineError(f"{command[0]} not found: install the project (make install) and run from its venv") \
            from None
    try:
        return child.wait()
    except KeyboardInterrupt:
        os.killpg(child.pid, signal.SIGINT)
        child.wait()
        raise


def dvc_experiment(overrides: list[str], model: str | None = None) -> int:
    """`dvc exp run -S ...`: DVC reruns the stages whose inputs changed and takes the rest from its cache,
    so `mlflow run .` and `dvc repro` share outputs instead of overwriting each other's. With a model, only
    its training stage and the stages before it. Under `mlflow run`, the stages' MLflow runs are nested
    under its run, which gets the headline figures when the whole pipeline ran."""
    from pipeline import tracking

    env = dict(os.environ)
    parent = env.pop("MLFLOW_RUN_ID", None)  # each stage opens its own run, under this one
    if parent:
        env[tracking.PARENT_RUN_ENV] = parent
    bin_dir = os.path.dirname(sys.executable)  # DVC runs each stage with the python first on PATH: this one
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    targets = [f"train_{model}"] if model else []
    command = ["dvc", "exp", "run", *targets, *[arg for override in overrides for arg in ("-S", override)]]
    print(" ".join(shlex.quote(part) for part in command), flush=True)
    returncode = run_child(command, env)
    if returncode == 0 and parent and not model:
        # The evaluate stage wrote the headline if DVC ran it; not if DVC took it from its cache.
        tracking.summarize_parent(parent, json.loads((METRICS / "evaluate.json").read_text()), if_missing=True)
    return returncode


def train_in_all(config, model: str, args: argparse.Namespace, overrides: list[str], parent: str,
                 progress: bool, lock_fd: int | None) -> bool:
    """One model's training inside `all`: in this process, or under torchrun with train.nproc > 1."""
    from pipeline.stages import train

    if config.train.nproc == 1:
        train.run(config, model, parent_run_id=parent, progress=progress)
        return True
    child = ["train", model, "--params", args.params, "--parent-run", parent, "--no-progress",
             *[f"--overlay={o}" for o in args.overlay], *[f"--set={o}" for o in overrides]]
    return torchrun(config.train.nproc, child, lock_fd) == 0


def stop_cleanly_on_signals() -> None:
    """SIGTERM (what `mlflow run` sends its command on Ctrl-C, as do schedulers) unwinds like Ctrl-C.

    The first SIGINT or SIGTERM raises KeyboardInterrupt; later ones are ignored, so that the unwinding
    (the MLflow run marked FAILED rather than left RUNNING, the message on how to resume) is not cut
    short by the second signal that `mlflow run` sends right after the first.
    """
    def interrupt(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def train_stage(config, args: argparse.Namespace, argv: list[str], progress: bool) -> int:
    """`train <model>`: in this process, or in train.nproc processes under torchrun, one training at a time."""
    from pipeline import distributed, tracking
    from pipeline.stages import check, train

    check.preflight(config)
    if distributed.under_launcher():  # a rank of torchrun: torchrun and the process that launched it hold the lock
        distributed.die_with_parent()  # gloo or NCCL may block a gentler signal: a rank ends with torchrun
        train.run(config, args.model, parent_run_id=args.parent_run, progress=progress)
        return 0
    with training_lock(args.model) as lock_fd:
        if config.train.nproc > 1:
            tracking.require_tracking(f"train_{args.model}")  # before any process starts training
            return torchrun(config.train.nproc, argv, lock_fd)
        train.run(config, args.model, parent_run_id=args.parent_run, progress=progress)
    return 0


def all_stages(config, args: argparse.Namespace, overrides: list[str], progress: bool) -> int:
    """`all`: every stage in this process, without DVC, the stage runs under one parent run."""
    from pipeline import tracking
    from pipeline.stages import check, download, evaluate, normalize

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
        with training_lock(model) as lock_fd:
            if not train_in_all(config, model, args, overrides, parent, progress, lock_fd):
                return 1
    evaluate.run(config, parent_run_id=parent)
    return 0


def ui_link(experiment: str, port: int) -> str:
    """The runs table of the experiment in MLflow's model-training view.

    MLflow 3's UI opens experiments in its GenAI view unless told otherwise (a switch kept in the browser);
    `workflowType=machine_learning` in the link asks for the model-training view whatever the switch says.
    """
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    tracking.use_project_store()
    found = MlflowClient().get_experiment_by_name(experiment)
    page = f"experiments/{found.experiment_id}/runs" if found is not None else "experiments"
    return f"http://127.0.0.1:{port}/#/{page}?workflowType=machine_learning"


def mlflow_ui(config, port: int) -> int:
    import mlflow

    link = ui_link(config.train.experiment, port)
    print(f"MLflow: {link}\n(elsewhere in the UI, pick 'Model training' rather than 'GenAI' at the top left; "
          "Ctrl-C stops it)", flush=True)
    return subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", mlflow.get_tracking_uri(),
                            "--host", "127.0.0.1", "--port", str(port)])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        overrides = shlex.split(args.set_list) + args.overrides
        config = config_module.load(args.params, overrides, args.overlay)
        progress = not args.no_progress
        if not progress:
            # Read by tqdm when it is imported (below): also silences torchvision's download bar.
            os.environ["TQDM_DISABLE"] = "1"
        # Imported here so that --help and config errors answer without loading torch and mlflow.
        from pipeline.stages import check, download, evaluate, log_run, normalize, seeds

        if args.stage == "check":
            check.run(config)
        elif args.stage == "download":
            download.run(config)
        elif args.stage == "normalize":
            normalize.run(config)
        elif args.stage == "train":
            return train_stage(config, args, argv, progress)
        elif args.stage == "evaluate":
            evaluate.run(config)
        elif args.stage == "log-run":
            print(log_run.run(config, args.model))
        elif args.stage == "seeds":
            check.preflight(config)
            seeds.run(config, args.seeds, progress=progress, retrain=args.retrain)
        elif args.stage == "ui":
            return mlflow_ui(config, args.port)
        elif args.stage == "repro":
            if args.overlay or args.params != "params.yaml":
                raise PipelineError("repro runs DVC, which reads params.yaml only: give changes as -S key=value")
            check.preflight(config)
            return dvc_experiment(overrides, args.model)
        else:
            return all_stages(config, args, overrides, progress)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, ConfigError) and os.environ.get("DVC_EXP_NAME") and "/.dvc/tmp/exps/" not in os.getcwd():
            print("note: `dvc exp run -S` wrote the refused value into params.yaml before this check ran; "
                  "`git checkout params.yaml` restores the committed params (the previous outputs are kept)",
                  file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is checkpointed; rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    stop_cleanly_on_signals()
    sys.exit(main())
