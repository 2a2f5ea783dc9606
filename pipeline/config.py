"""The one typed configuration of the pipeline, loaded from params.yaml.

Every stage, the MLflow records and the command line read their parameters from here. DVC's
`-S` and a hand-edited params.yaml accept any key, so the schema rejects unknown keys, wrong
types and out-of-range values itself, naming the key and what it allows.

params.yaml is the one place where the experiment's settings are set: the fields without a neutral
value (the data source and split, the models' sizes, epochs, batch sizes, optimizers, seeds, the
targets) have no default here and must be given. Options keep a default, one that leaves them off
(no dropout, no weight average, a constant rate), so that params.yaml may omit them.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import ConfigError

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
MAX_EPOCHS = 30  # the experiment's rule: at most 30 training epochs
CIFAR10_TRAIN_IMAGES = 50_000  # the official training batches; data.val_size of them are held out

Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
# Integers are strict: YAML's true/false must not pass as 1/0 (epochs=true would mean one epoch).

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_augmentation(cls, data: Any) -> Any:
        # The experiment's rule, stated where someone would try to break it.
        if isinstance(data, dict):
            for key in data:
                name = str(key).lower()
                if "augment" in name or name in {"transform", "transforms", "tta"}:
                    raise ValueError(
                        f"'{key}': the experiment allows no data augmentation of any kind "
                        "(no random transforms, no test-time augmentation); remove this key"
                    )
        return data


class DataConfig(Strict):
    url: str
    md5: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    max_download_mb: Annotated[int, Field(strict=True, ge=1)] = 512  # the official archive is 163 MiB
    val_size: Annotated[int, Field(strict=True, ge=10)]
    seed: Annotated[int, Field(strict=True)]


class BaselineModelConfig(Strict):
    arch: Literal["baseline"] = "baseline"
    widths: Annotated[list[Annotated[int, Field(strict=True, ge=1)]], Field(min_length=1, max_length=5)]
    hidden: Annotated[int, Field(strict=True, ge=1)]


class ResNetModelConfig(Strict):
    arch: Literal["resnet"] = "resnet"
    width: Annotated[int, Field(strict=True, ge=1)]
    # One entry per stage: how many residual blocks it holds. Stage i has width * 2**i channels
    # (downsample "stride") or width * 2**(i+1) (downsample "pool"); see models.ResNet.
    blocks: Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1, max_length=5)]
    downsample: Literal["stride", "pool"] = "stride"
    pooling: Literal["avg", "max"] = "avg"  # the global pooling before the classifier
    dropout: Probability = 0.0  # inside every residual block, between its two convolutions
    head_dropout: Probability = 0.0  # before the classifier
    # How convolutions start: "kaiming" (He et al., 2015), or "torch": PyTorch's own default (uniform, bound
    # 1/sqrt(fan_in)), weights about 2.4 times smaller than "kaiming"'s in a block. Batch norm follows every
    # conv, so the scale does not change the function, but a step of the same rate turns small weights
    # further: the net learns faster at the same rate.
    conv_init: Literal["kaiming", "torch"] = "kaiming"
    # The residual block: "basic", He et al.'s (the shortcut added before the last ReLU; the branch starts at
    # zero), or "resnet9", the DAWNBench ResNet-9's (x + ReLU(BN(conv(...))): the sum is not rectified).
    block: Literal["basic", "resnet9"] = "basic"

    @model_validator(mode="after")
    def _strided_stages_need_a_block(self) -> "ResNetModelConfig":
        if self.downsample == "stride" and 0 in self.blocks:
            raise ValueError(f"blocks {self.blocks}: with downsample 'stride' every stage needs at least one "
                             "block (its first block changes the resolution); use downsample 'pool' for empty stages")
        if sum(self.blocks) == 0:
            raise ValueError("blocks: the ResNet needs at least one residual block")
        return self


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam"]
    lr: Annotated[float, Field(gt=0.0, le=10.0)]
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    nesterov: bool = False
    # What weight decay applies to: "all" parameters, or only the conv and linear "weights" (not batch
    # norm's scales and shifts nor biases, whose decay only fights batch norm's own rescaling).
    weight_decay_scope: Literal["all", "weights"] = "all"


class Recipe(Strict):
    """How one model is trained: params' train.baseline or train.resnet."""

    def without_seed(self) -> dict:
        """What the seeds of one recipe share: the recipe without its seed (metrics/seeds.json records it).
        Options at their defaults are left out, as in `Config.fingerprint`: adding or removing an option
        that is off leaves the recipe, and the seeds trained with it, the same."""
        recipe = self.model_dump(mode="json", exclude={"seed"}, exclude_defaults=True)
        recipe["model"] = {"arch": self.model.arch, **recipe["model"]}  # the tag that tells the model configs apart
        return recipe

    model: Annotated[BaselineModelConfig | ResNetModelConfig, Field(discriminator="arch")]
    epochs: Annotated[int, Field(strict=True, ge=1, le=MAX_EPOCHS)]
    batch_size: Annotated[int, Field(strict=True, ge=1)]
    optimizer: OptimizerConfig
    schedule: Literal["constant", "onecycle"] = "constant"
    # The length the schedule is planned for, in epochs (null: `epochs`). Longer than `epochs`, training stops
    # part-way down the curve: the rate is still high at the end, so the raw weights stay noisy (low running
    # accuracy) while the weight average, which is what is scored, is already good.
    schedule_epochs: Annotated[int, Field(strict=True, ge=1, le=10 * MAX_EPOCHS)] | None = None
    warmup_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.3  # onecycle only
    # onecycle: the rate the schedule ends at, as a fraction of its peak. Above 0 the raw weights
    # stay noisy to the end, which keeps their running accuracy low, while the weight average smooths the noise.
    final_lr_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    label_smoothing: Probability = 0.0
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None  # None: the raw weights are scored
    seed: Annotated[int, Field(strict=True)]
    # Which epoch's weights become the stage's model: the "last", or "best_val_under_target": the best
    # validation accuracy among epochs whose training accuracy (running, training mode)
    # stays below select_train_acc_max; falls back to the last epoch if none does.
    select: Literal["last", "best_val_under_target"] = "last"
    select_train_acc_max: Annotated[float, Field(gt=0.0, le=1.0)] = 0.92

    @property
    def planned_epochs(self) -> int:
        return self.schedule_epochs or self.epochs

    @model_validator(mode="after")
    def _schedule_covers_the_epochs(self) -> "Recipe":
        if self.schedule_epochs is not None and self.schedule_epochs < self.epochs:
            raise ValueError(f"schedule_epochs {self.schedule_epochs} is shorter than epochs {self.epochs}: the "
                             "schedule would end before training does; set it to epochs or more, or to null")
        return self


class TrainSection(Strict):
    """Params' train section: the settings both trainings share, and each model's Recipe."""

    experiment: str
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    # bf16 autocast or plain fp32; "auto": bf16 on CUDA GPUs and on CPUs with native bf16, else fp32.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    deterministic: bool = False
    # Size of the fixed, seeded subset of the train split scored in eval mode every epoch (0: all).
    eval_train_size: Annotated[int, Field(strict=True, ge=0)]
    eval_batch_size: Annotated[int, Field(strict=True, ge=1)]
    log_model: bool = True
    # Processes for data-parallel training (torchrun + DistributedDataParallel; NCCL on GPUs, gloo on CPUs).
    # The global batch size and the learning rate stay what each model's params say.
    nproc: Annotated[int, Field(strict=True, ge=1, le=64)] = 1
    # torch.compile the training step: faster steps on GPUs after a compile of tens of seconds.
    compile: bool = False
    baseline: Recipe
    resnet: Recipe

    @model_validator(mode="after")
    def _batches_divide_among_processes(self) -> "TrainSection":
        # Checked here, before torchrun starts any process: each takes an equal share of every batch.
        for name in ("baseline", "resnet"):
            batch = getattr(self, name).batch_size
            if batch % self.nproc:
                raise ValueError(f"train.{name}.batch_size {batch} does not divide among train.nproc={self.nproc} "
                                 "processes: each process takes an equal share of every batch; choose a batch "
                                 "size that is a multiple of nproc")
        return self

    @model_validator(mode="before")
    @classmethod
    def _models_match_names(cls, data: Any) -> Any:
        # Checked first: a swapped arch would otherwise surface as a list of unknown keys.
        if isinstance(data, dict):
            for name in ("baseline", "resnet"):
                model = (data.get(name) or {}).get("model") if isinstance(data.get(name), dict) else None
                if isinstance(model, dict) and model.get("arch", name) != name:
                    raise ValueError(f"train.{name}.model.arch must be '{name}' (got {model.get('arch')!r}): "
                                     f"the {name} stage trains the {name} model")
        return data


class Targets(Strict):
    val_acc_min: Annotated[float, Field(ge=0.0, le=1.0)]
    train_acc_max: Annotated[float, Field(ge=0.0, le=1.0)]
    max_epochs: Annotated[int, Field(strict=True, ge=1, le=MAX_EPOCHS)]


class EvaluateConfig(Strict):
    registered_model: str
    targets: Targets


class Config(Strict):
    data: DataConfig
    train: TrainSection
    evaluate: EvaluateConfig

    @model_validator(mode="after")
    def _batches_fit_the_training_split(self) -> "Config":
        images = CIFAR10_TRAIN_IMAGES - self.data.val_size
        for name in ("baseline", "resnet"):
            batch = getattr(self.train, name).batch_size
            if batch > images:
                raise ValueError(f"train.{name}.batch_size {batch:,} is larger than the training split: CIFAR-10's "
                                 f"{CIFAR10_TRAIN_IMAGES:,} training images less data.val_size {self.data.val_size:,} "
                                 f"leave {images:,}. Choose a batch size of at most {images:,} (128 to 512 train well)")
        return self

    def model_fingerprint(self, name: str) -> str:
        """What a trained model of `name` depends on: the data and its own section of params, and the
        settings that change its training (saved with the model, checked wherever it is loaded)."""
        return self.fingerprint("data", f"train.{name}", "train.eval_train_size", "train.deterministic",
                                "train.nproc", "train.precision")

    def fingerprint(self, *sections: str) -> str:
        """A short hash of the named sections (dotted paths), to match outputs to the params that made them.

        Options at their defaults are left out: adding an option whose default keeps the old computation
        leaves every existing fingerprint, and so every trained model and checkpoint, valid. Required
        fields are always in.
        """
        dumped = self.model_dump(mode="json", exclude_defaults=True)
        picked = {s: _get(dumped, s.split(".")) for s in sections}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]


def _get(tree: dict, keys: list[str]) -> Any:
    """The value at a dotted path of a dump, or None where the dump left it out (a field at its default)."""
    for key in keys:
        if key not in tree:
            return None
        tree = tree[key]
    return tree


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.resnet.epochs=5' -> (['train', 'resnet', 'epochs'], 5); the value is read as YAML, as DVC does."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.resnet.epochs=5)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': the value of {key.strip()} is not valid YAML ({exc})") from None
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{key}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return raw


def _describe(error: dict) -> str:
    # Pydantic puts the discriminator's tag into the path; drop it so the path is the params key.
    # The tag follows "model" at any depth (e.g. train.resnet.model.resnet.blocks.0).
    parts = [str(p) for p in error["loc"]]
    for i in range(1, len(parts)):
        if parts[i - 1] == "model" and parts[i] in {"baseline", "resnet"}:
            del parts[i]
            break
    loc = ".".join(parts)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (check its spelling; see params.yaml for the allowed keys)"
    elif error["type"] == "missing":
        message = "missing: this setting has no default, params must give it (see the repository's params.yaml)"
    shown = error.get("input")
    got = "" if error["type"] in {"missing", "extra_forbidden"} or isinstance(shown, dict) else f" (got {shown!r})"
    return f"  {loc}: {message}{got}"


def from_dict(raw: dict, source: str = "params") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = "\n".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"invalid configuration in {source}:\n{lines}") from None


def merge(base: dict, overlay: dict) -> dict:
    """base with overlay's values laid over it, section by section."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: Path, what: str) -> dict:
    if not path.exists():
        raise ConfigError(f"{path} not found: {what}")
    if not path.is_file():
        raise ConfigError(f"{path} is not a file: {what}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (data, train, evaluate)")
    return raw


def load(path: str | Path = "params.yaml", overrides: list[str] | None = None,
         overlays: list[str | Path] | None = None) -> Config:
    """params.yaml, then each overlay file (a named configuration such as configs/problem_recipe.yaml)
    merged over it, then the key=value overrides."""
    path = Path(path)
    raw = _read_yaml(path, "run from the project root or pass --params PATH")
    source = str(path)
    for overlay in overlays or []:
        raw = merge(raw, _read_yaml(Path(overlay), "check the --overlay path"))
        source += f" + {overlay}"
    if overrides:
        source += " with -S " + " ".join(overrides)
    return from_dict(apply_overrides(raw, overrides or []), source=source)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested params as dotted keys, the way DVC and MLflow show them."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
