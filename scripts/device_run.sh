#!/usr/bin/env bash
# The GPU acceptance run (one `device` call): build the full archive from the carried offline copy,
# run scripts/acceptance.py (pipeline, the problem's recipe, bench, candidates, three seeds of the
# best configuration), which puts the results table, metrics, report and MLflow database under $OUT.
#
# Before the call, here:  bash scripts/prepare_device_carry.sh   (fills .carry/ and .whl/)
# The call:  run(command="bash scripts/device_run.sh", carry=[".carry", ".whl"], timeout_s=540)
# BUDGET_S (default 500) bounds the whole script: acceptance.py starts no run that would end after it,
# and rewrites its results in $OUT after every run, so even a call cut short returns what it did.
# On the CPU, as a test:  OUT=/tmp/out bash scripts/device_run.sh --tiny   (writes the pipeline outputs
# and mlflow.db into this tree, as on the device: rehearse in a clone)
# Arguments after --tiny (or all of them) go to scripts/acceptance.py, e.g. `--seeds 0 --candidates` to
# run only the default, the recipe and no candidates, so that a long sweep can be split over two calls.
# `--screen` as the first argument (before --tiny) runs scripts/screen.py instead, which takes the rest
# (`--grid configs/screens/NAME.yaml --seeds 0 1`); under --tiny a grid's own widths and epochs still apply.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ -d .whl ] && ! python3 -c "import mlflow, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

script=scripts/acceptance.py
if [ "${1:-}" = "--screen" ]; then  # scripts/screen.py (recipes from configs/screens/) instead
  script=scripts/screen.py
  shift
fi
limit=() extra=()
if [ "${1:-}" = "--tiny" ]; then  # a CPU rehearsal: tiny archive, tiny models, one epoch
  shift
  limit=(--limit-per-class 20)
  extra=(-S data.val_size=50 -S train.eval_train_size=0 -S train.log_model=false
         -S train.baseline.epochs=1 -S train.resnet.epochs=1 -S "train.baseline.model.widths=[4,8]"
         -S train.resnet.model.width=4 -S "train.resnet.model.blocks=[1,1]" --seeds 0 1)
fi

mirror=$(mktemp -d)
md5=$(python3 .carry/make_archive.py "$mirror" "${limit[@]}" | awk '/^md5/ {print $2}')
export MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db
python3 $script --archive "$mirror/cifar-10-python.tar.gz" --md5 "$md5" --out "$OUT" \
  --budget-s $(( ${BUDGET_S:-500} - SECONDS )) "${extra[@]}" "$@"
ls -la "$OUT"
