"""Stage check: every param valid and the machine able to run them, before any other stage runs.

DVC deletes a stage's outputs before it runs the stage's command, so a stage that fails on a bad
param loses its previous outputs. Every stage depends on this one's output, so `dvc repro` runs it
first and stops here on a bad param or an unavailable device, with nothing deleted. The output has
the same bytes whenever the check passes: a change of params reruns only the stages that use them.
"""

from pipeline import paths
from pipeline.config import Config

PASSED = "params.yaml is valid and this machine can run it\n"


def preflight(config: Config) -> None:
    """What the params need of this machine, checked before any process starts or MLflow run opens.
    (The params themselves were validated when `config` was loaded.)"""
    from pipeline.device import select_device

    select_device(config.train.device)  # refuses cuda or mps where there is none


def run(config: Config) -> None:
    preflight(config)
    paths.PARAMS_CHECK.parent.mkdir(parents=True, exist_ok=True)
    paths.PARAMS_CHECK.write_text(PASSED)
    print(f"params valid for {config.train.device} training")
