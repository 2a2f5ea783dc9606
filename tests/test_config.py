"""pipeline/config.py: params.yaml is loaded into one typed config; bad params are refused with the key named.

Real params files and the real command line (a subprocess); nothing is mocked.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.config import MAX_EPOCHS, ConfigError
from tests.conftest import ROOT, tiny_params, write_params

PARAMS = ROOT / "params.yaml"
URL = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # never fetched by these tests
MD5 = "0" * 31 + "1"


def load_with(*overrides: str) -> config.Config:
    return config.load(PARAMS, list(overrides))


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_with(*overrides)
    return str(info.value)


# --- the repository's params.yaml ---------------------------------------------------------

def test_repo_params_load_with_sane_defaults():
    cfg = config.load(PARAMS)
    assert cfg.data.url == config.OFFICIAL_URL and cfg.data.md5 == config.OFFICIAL_MD5
    assert 10 <= cfg.data.val_size < 50_000
    assert cfg.train.baseline.model.arch == "baseline" and cfg.train.resnet.model.arch == "resnet"
    for model in (cfg.train.baseline, cfg.train.resnet):
        assert 1 <= model.epochs <= MAX_EPOCHS
        assert model.batch_size >= 1 and model.optimizer.lr > 0
        assert model.optimizer.name in {"sgd", "adam"}
    assert all(b >= 0 for b in cfg.train.resnet.model.blocks) and sum(cfg.train.resnet.model.blocks) >= 1
    assert 0 <= cfg.train.resnet.model.dropout < 1
    assert cfg.evaluate.targets.max_epochs <= MAX_EPOCHS
    # Config is frozen: a stage cannot change the params it was given.
    with pytest.raises(Exception):
        cfg.data.seed = 1


def test_loaded_params_match_the_yaml_file():
    raw = yaml.safe_load(PARAMS.read_text())
    flat = config.flatten(config.load(PARAMS).model_dump(mode="json"))
    for key, value in config.flatten(raw).items():
        assert flat[key] == value, key


# --- refused params: the message names the dotted key ---------------------------------------

@pytest.mark.parametrize("override, key", [
    ("train.resnet.optimiser=sgd", "train.resnet.optimiser"),  # unknown key
    ("data.sead=1", "data.sead"),  # unknown key
    ("train.resnet.batch_size=abc", "train.resnet.batch_size"),  # wrong type
    ("train.resnet.optimizer.nesterov=[1]", "train.resnet.optimizer.nesterov"),  # wrong type
    ("data.val_size=-1", "data.val_size"),  # out of range
    ("train.resnet.model.dropout=1.5", "train.resnet.model.dropout"),  # out of range
    ("train.resnet.model.blocks=[-1,2]", "train.resnet.model.blocks.0"),  # out of range, inside a list
    ("train.baseline.model.hidden=0", "train.baseline.model.hidden"),  # out of range
])
def test_bad_value_raises_config_error_naming_the_key(override, key):
    message = refused(override)
    assert f"{key}:" in message
    # The discriminator's tag is never shown as if it were a params key.
    assert ".model.resnet" not in message and ".model.baseline" not in message


@pytest.mark.parametrize("path", [("data", "val_size"), ("train", "resnet", "epochs"),
                                  ("train", "resnet", "model", "width"), ("evaluate", "targets", "val_acc_min")])
def test_a_setting_without_a_default_must_be_in_the_params(tmp_path, path):
    # params.yaml is the one place that sets these: the schema has no second value to fall back on.
    params = yaml.safe_load(PARAMS.read_text())
    node = params
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    with pytest.raises(ConfigError) as info:
        config.load(write_params(tmp_path, params))
    assert f"{'.'.join(path)}: missing" in str(info.value)


def test_unknown_key_message_says_it_is_unknown():
    assert "unknown key" in refused("train.resnet.optimiser=sgd")


def test_epochs_over_30_fails_naming_key_and_limit():
    message = refused("train.resnet.epochs=31")
    assert "train.resnet.epochs" in message and "30" in message
    assert load_with("train.resnet.epochs=30", "train.resnet.schedule_epochs=30").train.resnet.epochs == 30
    assert "evaluate.targets.max_epochs" in refused("evaluate.targets.max_epochs=31")


def test_a_schedule_planned_shorter_than_the_epochs_run_is_refused():
    message = refused("train.resnet.epochs=10", "train.resnet.schedule_epochs=9")
    assert "schedule_epochs 9" in message and "epochs 10" in message
    planned = load_with("train.resnet.epochs=10", "train.resnet.schedule_epochs=40").train.resnet
    assert planned.planned_epochs == 40, "a plan longer than MAX_EPOCHS is allowed: only the epochs run count"
    assert load_with("train.resnet.epochs=7", "train.resnet.schedule_epochs=null").train.resnet.planned_epochs == 7


@pytest.mark.parametrize("override, section, key", [
    ("train.resnet.augmentation=true", "train.resnet", "augmentation"),
    ("data.augment=true", "data", "augment"),
    ("train.resnet.model.augment=false", "train.resnet.model", "augment"),  # even switched off
    ("train.baseline.transforms=[flip]", "train.baseline", "transforms"),
])
def test_augmentation_key_fails_saying_no_augmentation(override, section, key):
    message = refused(override)
    assert "no data augmentation" in message
    assert f"{section}:" in message and f"'{key}'" in message


def test_a_boolean_is_not_taken_for_a_count():
    message = refused("train.resnet.epochs=true")
    assert "train.resnet.epochs: Input should be a valid integer (got True)" in message


def test_a_swapped_model_arch_is_named_as_such():
    message = refused("train.resnet.model.arch=baseline")
    assert "train.resnet.model.arch must be 'resnet'" in message
    assert "unknown key" not in message


def test_overlay_file_is_merged_over_the_params_and_under_the_overrides():
    recipe = ROOT / "configs/problem_recipe.yaml"
    cfg = config.load(PARAMS, ["train.resnet.epochs=7"], overlays=[recipe])
    assert cfg.train.resnet.model.blocks == [2, 2] and cfg.train.resnet.optimizer.name == "adam"
    assert cfg.train.resnet.epochs == 7
    assert cfg.train.baseline == config.load(PARAMS).train.baseline


SCREENS = ROOT / "configs" / "screens"  # grids of overrides for scripts/screen.py, not overlays


@pytest.mark.parametrize("overlay", sorted(p for p in (ROOT / "configs").rglob("*.yaml") if SCREENS not in p.parents),
                         ids=lambda path: path.name)
def test_every_named_configuration_loads_and_changes_only_the_resnet(overlay):
    # The device run trains each of these: a typo must fail here, not in a GPU call.
    default = config.load(PARAMS)
    cfg = config.load(PARAMS, overlays=[overlay])
    assert cfg.train.resnet != default.train.resnet
    assert cfg.model_copy(update={"train": cfg.train.model_copy(update={"resnet": default.train.resnet})}) == default


@pytest.mark.parametrize("grid", sorted(SCREENS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_screen_recipe_loads_over_its_base(grid):
    # As scripts/screen.py applies them: the base's overrides, then the recipe's, values as YAML flow.
    recipes = yaml.safe_load(grid.read_text())
    base = recipes.pop("base", None) or {}
    assert recipes, "a grid lists recipes"
    for label, changes in recipes.items():
        wanted = {**base, **(changes or {})}
        cfg = config.load(PARAMS, [f"{key}={json.dumps(value)}" for key, value in wanted.items()])
        for key, value in wanted.items():
            assert functools.reduce(getattr, key.split("."), cfg) == value, (label, key)


def test_unknown_optimizer_lists_allowed_values():
    message = refused("train.resnet.optimizer.name=rmsprop")
    assert "train.resnet.optimizer.name" in message and "rmsprop" in message
    for name in ("sgd", "adam"):
        assert f"'{name}'" in message


def test_every_error_is_reported_at_once():
    message = refused("train.resnet.epochs=31", "data.val_size=-1")
    assert "train.resnet.epochs" in message and "data.val_size" in message


# --- overrides: key=value with the value read as YAML, as `dvc exp run -S` does --------------

def test_overrides_parse_yaml_values():
    cfg = load_with("train.resnet.model.blocks=[1,2]", "train.resnet.optimizer.lr=0.05",
                    "train.resnet.optimizer.nesterov=false", "train.resnet.ema_decay=0.99",
                    "train.resnet.schedule=constant", "data.seed=7")
    assert cfg.train.resnet.model.blocks == [1, 2]
    assert cfg.train.resnet.optimizer.lr == 0.05 and cfg.train.resnet.optimizer.nesterov is False
    assert cfg.train.resnet.ema_decay == 0.99 and cfg.train.resnet.schedule == "constant"
    assert cfg.data.seed == 7
    # Untouched keys keep the file's values.
    file = load_with()
    assert cfg.train.resnet.optimizer.name == file.train.resnet.optimizer.name
    assert cfg.train.resnet.model.width == file.train.resnet.model.width


def test_parse_override_returns_key_path_and_typed_value():
    assert config.parse_override("train.resnet.model.blocks=[1,2]") == (["train", "resnet", "model", "blocks"], [1, 2])
    assert config.parse_override("train.resnet.epochs=5") == (["train", "resnet", "epochs"], 5)
    assert config.parse_override("train.resnet.ema_decay=null") == (["train", "resnet", "ema_decay"], None)
    assert config.parse_override("data.url=http://host/a=b") == (["data", "url"], "http://host/a=b")


def test_scientific_notation_learning_rate_is_accepted():
    # PyYAML reads 1e-3 as a string; the schema must still turn it into the number.
    assert load_with("train.resnet.optimizer.lr=1e-3").train.resnet.optimizer.lr == pytest.approx(1e-3)


def test_overrides_do_not_change_the_params_file():
    before = PARAMS.read_bytes()
    load_with("train.resnet.epochs=3")
    assert PARAMS.read_bytes() == before


@pytest.mark.parametrize("override", ["noequals", "=5", " =5"])
def test_malformed_override_fails_clearly(override):
    message = refused(override)
    assert "key=value" in message and f"'{override}'" in message


def test_override_with_invalid_yaml_value_fails_naming_the_key():
    message = refused("train.resnet.model.blocks=[1,2")
    assert "train.resnet.model.blocks" in message and "not valid YAML" in message


def test_override_below_a_value_fails_clearly():
    message = refused("train.resnet.epochs.max=3")
    assert "'epochs' is a value, not a section" in message


# --- the params file itself ------------------------------------------------------------------

def test_missing_params_file_fails_clearly(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "params.yaml")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml_fails_clearly(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config.load(path)


def test_invalid_yaml_file_fails_clearly(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(path)


def test_errors_in_the_file_name_the_file_and_key(tmp_path):
    params = tiny_params(URL, MD5)
    params["train"]["resnet"]["epochs"] = 99
    path = write_params(tmp_path, params)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(path) in str(info.value) and "train.resnet.epochs" in str(info.value)


def test_fingerprint_follows_only_the_named_sections():
    base = load_with()
    assert base.fingerprint("data") == load_with("train.resnet.epochs=3").fingerprint("data")
    assert base.fingerprint("data") != load_with("data.seed=1").fingerprint("data")


def test_fingerprint_ignores_options_left_at_their_defaults():
    # An option added to the schema later, at a default that keeps the computation, must not make
    # every trained model and checkpoint look stale.
    explicit = yaml.safe_load(PARAMS.read_text())
    explicit["train"]["resnet"]["select_train_acc_max"] = 0.92  # the schema's default
    absent = copy.deepcopy(explicit)
    del absent["train"]["resnet"]["select_train_acc_max"]
    sections = ("data", "train.resnet", "train.eval_train_size")
    key = config.from_dict(explicit).fingerprint(*sections)
    assert config.from_dict(absent).fingerprint(*sections) == key
    assert load_with("train.resnet.select_train_acc_max=0.9").fingerprint(*sections) != key


# --- the command line ------------------------------------------------------------------------

def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_bad_value_exits_2_naming_the_key_and_writes_nothing(tmp_path):
    write_params(tmp_path, tiny_params(URL, MD5))
    result = run_cli("all", "-S", "train.resnet.model.dropout=1.5", "-S", "train.resnet.epochs=31", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "train.resnet.model.dropout" in result.stderr and "train.resnet.epochs" in result.stderr
    assert "Traceback" not in result.stderr
    # Refused before any stage ran: no data/, no MLflow store, no outputs at all.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_cli_help_lists_the_stages(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for stage in ("download", "normalize", "train", "evaluate", "all"):
        assert f"  {stage} " in result.stdout, stage
    assert list(tmp_path.iterdir()) == []


def test_a_batch_that_does_not_divide_among_processes_is_refused_by_the_config():
    message = refused("train.nproc=2", "train.baseline.batch_size=31")
    assert "train.baseline.batch_size 31 does not divide among train.nproc=2 processes" in message
    assert load_with("train.nproc=2", "train.baseline.batch_size=32").train.nproc == 2


def test_the_error_names_the_overrides_it_came_from():
    assert "with -S train.resnet.epochs=31" in refused("train.resnet.epochs=31")


@pytest.mark.parametrize("content, phrase", [(b"data:\n  seed: \xff\xfe\n", "is not UTF-8 text"), (None, "is not a file")])
def test_unreadable_params_file_is_a_clear_error(tmp_path, content, phrase):
    path = tmp_path / "params.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=phrase):
        config.load(path)


def test_cli_torchrun_is_not_started_for_a_batch_that_does_not_divide(tmp_path):
    write_params(tmp_path, tiny_params(URL, MD5))
    result = run_cli("train", "baseline", "-S", "train.nproc=2", "-S", "train.baseline.batch_size=31", cwd=tmp_path)
    assert result.returncode == 2 and "does not divide among train.nproc=2" in result.stderr
    assert "torch.distributed.run" not in result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


