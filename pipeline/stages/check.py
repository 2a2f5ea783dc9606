"""Stage check: every param valid and the machine able to run them, before any other stage runs.

DVC deletes a stage's outputs before it runs the stage's command, so a stage that fails on a bad
param loses its previous outputs. Every stage depends on this one's output, so `dvc repro` runs it
first and stops here on a bad param or an unavailable device, with nothing deleted. The output has
the same bytes whenever the check passes: a change of params reruns only the stages that use them.
"""

import os

from pipeline import paths
from pipeline.config import Config
from pipeline.errors import ConfigError

PASSED = "params.yaml is valid and this machine can run it\n"


def preflight(config: Config) -> None:
    """What the params need of this machine, checked before any process starts or MLflow run opens.
    (The params themselves were validated when `config` was loaded.)"""
    from pipeline.device import select_device

    device = select_device(config.train.device)  # refuses cuda or mps where there is none
    _check_processes(config.train.nproc, device)
    for name in ("baseline", "resnet"):
        _check_model_fits(config, name, device)


def _check_processes(nproc: int, device) -> None:
    """One process per GPU (NCCL), or per CPU core (gloo): more only oversubscribe, or run out of memory."""
    import torch

    if device.type == "cuda":
        available, what = torch.cuda.device_count(), "CUDA GPUs"
    else:
        available, what = len(os.sched_getaffinity(0)), f"CPU cores for {device.type} training"
    if nproc > available:
        raise ConfigError(f"train.nproc={nproc}, but this machine has {available} {what}: one process per device "
                          f"at most. Set train.nproc to {available} or less (1 trains in this process).")


def _check_model_fits(config: Config, name: str, device) -> None:
    """The model's weights, gradients, optimizer state and average (about four copies, fp32) against the
    device's memory: the one size known without allocating it (a model built on the meta device)."""
    import torch

    from pipeline.models import build_model, count_parameters

    recipe = getattr(config.train, name)
    with torch.device("meta"):
        parameters = count_parameters(build_model(recipe.model))
    needed = parameters * 4 * 4
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory:
        raise ConfigError(f"train.{name}.model has {parameters:,} parameters: about {needed / 2**30:,.1f} GiB for "
                          f"weights, gradients and optimizer state, more than this {device.type} device's "
                          f"{memory / 2**30:,.1f} GiB. Choose a smaller width (or fewer blocks).")


def run(config: Config) -> None:
    preflight(config)
    paths.PARAMS_CHECK.parent.mkdir(parents=True, exist_ok=True)
    paths.PARAMS_CHECK.write_text(PASSED)
    print(f"params valid for {config.train.device} training")
