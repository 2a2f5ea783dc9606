# make repro: install into .venv and run the whole pipeline (dvc repro).
# make test:  install into .venv (with test tools) and run the tests.
# make quick: every stage on the real data with one epoch per model, minutes on a CPU (ARGS: more -S).
# make plots: `dvc plots show` as a page that works offline.
# make ui:    mlflow ui on the project's store; prints the link to the training runs.
# make exps:  dvc exp show cut to the headline (under 200 columns): targets, ResNet figures, its main params.
VENV ?= .venv
PYTHON ?= $(shell command -v python3)  # resolved before the venv goes first on PATH
BIN := $(abspath $(VENV))/bin
# DVC runs each stage's `python -m pipeline ...` with the python first on PATH: the venv's, even from a
# shell where it is not activated.
export PATH := $(BIN):$(PATH)

.PHONY: repro quick test test-fast seeds results plots install bench clean ui exps

# CPU=1: PyTorch's CPU-only builds (a venv a few GB smaller), a matching pair from PyTorch's CPU index
# only, so that pip cannot mix in other builds; a clear error where that index is out of reach.
TORCH_CPU := torch==2.14.1 torchvision==0.29.1
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(CPU),$(BIN)/python -m pip install -q --retries 1 --timeout 20 --index-url $(TORCH_CPU_INDEX) $(TORCH_CPU) \
		|| { echo "error: could not install the CPU-only pair $(TORCH_CPU) from $(TORCH_CPU_INDEX) (offline, or the index lacks it for this Python). Run make install without CPU=1 to use your usual index." >&2; exit 2; })
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

repro: install
	$(BIN)/dvc repro

# In a temporary copy of the project (dvc exp run --temp): the workspace keeps the committed run, and
# `dvc exp show` lists the quick one beside it. Its MLflow runs go to the project's store as usual.
QUICK := -S train.baseline.epochs=1 -S train.resnet.epochs=1
quick: install
	$(BIN)/dvc exp run --temp $(QUICK) $(ARGS)

# One worker per core, each taking whole test modules (their tests share module fixtures and run in order).
test: install
	$(BIN)/python -m pytest -n auto --dist loadfile

# Everything but the end-to-end modules (DVC, MLflow server and projects, torchrun): the inner loop.
test-fast: install
	$(BIN)/python -m pytest -n auto --dist loadfile --ignore=tests/test_dvc_pipeline.py --ignore=tests/test_dvc_remote.py \
		--ignore=tests/test_tracking_server.py --ignore=tests/test_mlproject.py --ignore=tests/test_distributed.py

# Seeds 1 to 4 of the ResNet beside the pipeline's seed 0 -> metrics/seeds.json; then the results document.
seeds: install
	$(BIN)/python -m pipeline seeds --seeds 0 1 2 3 4

# The headline columns of `dvc exp show` only: its full table has about 185 columns.
EXPS_KEEP := Experiment|^metrics/headline\.json:(all_targets_hold|resnet\.(val|running))$$|^train\.resnet\.(epochs|model\.width)$$
exps: install
	$(BIN)/dvc exp show --md --drop '.*' --keep '$(EXPS_KEEP)'

# mlflow ui on the project's store, with the link to the training runs (MLflow's model-training view).
ui: install
	$(BIN)/python -m pipeline ui

results: install
	$(BIN)/python -m pipeline.results

bench: install
	$(BIN)/python bench/train_speed.py

# `dvc plots show` writes a page that loads Vega from a CDN, blank without internet. This one carries the
# libraries inline (installed once with npm, at the versions DVC's page names), so it opens anywhere.
VEGA := .cache/vega
VEGA_PACKAGES := vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2

plots: install $(VEGA)/template.html
	$(BIN)/dvc plots show --html-template $(abspath $(VEGA))/template.html

$(VEGA)/template.html:
	# --legacy-peer-deps: DVC's page uses these three together, although vega-lite 5.2.0 declares vega ^5.21.
	npm install --loglevel=error --no-audit --no-fund --legacy-peer-deps --prefix $(VEGA) $(VEGA_PACKAGES)
	$(BIN)/python scripts/offline_plots_template.py $(VEGA)/node_modules > $@.tmp
	mv $@.tmp $@
