"""One training loop for both models: in-memory tensors, per-epoch checkpoints, a declared selection rule.

Read it top to bottom: `fit` builds the model, optimizer and schedule from a TrainConfig, then
each epoch trains (recording the running, training-mode accuracy that the problem statement's
98%/92% refer to), scores a fixed train subset and the validation split in eval mode, applies
the selection rule, writes a checkpoint and reports the epoch to a callback (MLflow).
"""

from __future__ import annotations

import copy
import functools
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pipeline import distributed
from pipeline.config import TrainConfig, TrainingConfig
from pipeline.data import Split
from pipeline.errors import ConfigError
from pipeline.models import build_model, fit_to_data

CHECKPOINT_VERSION = 4  # 4: loaded with weights_only (plain data only)
WHITENING_IMAGES = 5000  # training images whose patches set a whitening stem


def select_device(name: str, index: int = 0) -> torch.device:
    """The device params ask for; under torchrun, GPU `index` is this process's (its LOCAL_RANK)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", index)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA GPU is visible: set train.device to auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device is 'mps' but Apple MPS is not available: set train.device to auto or cpu")
    return torch.device("cuda", index) if name == "cuda" else torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX); Linux only, else False."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether to compute under bf16 autocast: params' `train.precision`, resolved for this device.

    "auto" takes bf16 where it is fast: CUDA GPUs (tensor cores, and no loss scaling as fp16 would
    need) and CPUs with native bf16, where oneDNN's convolutions run about twice as fast as in fp32
    (measured on this project's 2-core AVX512-BF16 machine); elsewhere bf16 is emulated and slower.
    """
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def memory_format(device: torch.device) -> torch.memory_format:
    # NHWC is what cuDNN's tensor-core kernels and oneDNN's CPU kernels want (CPU fp32: 1.3x measured here).
    return torch.channels_last if device.type in ("cuda", "cpu") else torch.contiguous_format


def to_device_tensor(split: Split, device: torch.device) -> tuple[Tensor, Tensor]:
    images = torch.from_numpy(split.images).to(device=device, dtype=torch.float32)
    return images.contiguous(memory_format=memory_format(device)), torch.from_numpy(split.labels).to(device)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int, bf16: bool = False) -> Tensor:
    """Logits (float32) for images already on the model's device, in eval mode."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        with autocast(images.device, bf16):
            outputs.append(model(images[start:start + batch_size]).float())
    return torch.cat(outputs)


def score(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """(cross-entropy loss, accuracy) without label smoothing, so both models are comparable."""
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """One group, or two when weight decay applies to weights only: tensors of one dimension (biases,
    batch norm's scales and shifts) get none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer.weight_decay_scope == "all":
        return [{"params": params}]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def make_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Stepped once per batch."""
    peak, floor = cfg.optimizer.lr, cfg.final_lr_fraction
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=peak * floor)
    if cfg.schedule == "onecycle":
        start = 25.0  # OneCycleLR's div_factor: the first step's rate is peak / 25
        warmup = cfg.warmup_fraction
        if round(warmup * total_steps, 9) == 1:  # a one-step warm-up makes OneCycleLR divide by zero
            warmup = 0.5 / total_steps  # no warm-up: the first step is near the peak
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peak, total_steps=total_steps, pct_start=warmup, div_factor=start,
            final_div_factor=1 / (start * floor) if floor else 1e4,  # ends at peak / (start * final_div_factor)
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def train_step(net: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor,
               labels: Tensor, bf16: bool) -> tuple[Tensor, Tensor]:
    """One optimizer step on a batch: forward (under bf16 autocast if asked), backward, update. Returns (logits, loss)."""
    with autocast(images.device, bf16):
        logits = net(images)
        loss = criterion(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, loss


class EMA:
    """An exponential moving average of a model's weights and batch-norm statistics.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first n updates, as in TensorFlow's
    ExponentialMovingAverage: a fixed 0.999 would keep half of the random initial weights for 700
    steps, which is four of this data set's epochs at batch 256.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.decay, self.updates = decay, 0
        # state_dict() tensors share storage with the parameters and buffers: pair them once.
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._averaged = [a for a, _ in pairs if a.is_floating_point()]
        self._current = [c for a, c in pairs if a.is_floating_point()]
        self._counters = [(a, c) for a, c in pairs if not a.is_floating_point()]  # batch norm's batch counts

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._averaged, self._current, 1.0 - decay)
        for a, c in self._counters:
            a.copy_(c)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.module.load_state_dict(state["model"])


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seeds the global RNG (dropout, stochastic depth) per epoch and rank: a resumed run needs no saved RNG state."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def batches(n: int, batch_size: int, seed: int, epoch: int, processes: int = 1) -> list[Tensor]:
    """This epoch's shuffled index batches. Seeded by (seed, epoch) so a resumed run sees the same order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2 * processes:
        chunks.pop()  # batch norm cannot train on a single image per process
    return chunks


def is_selectable(cfg: TrainConfig, record: dict) -> bool:
    return cfg.select != "best_val_under_target" or record["train_acc"] < cfg.select_train_acc_max


@dataclass
class FitResult:
    model: nn.Module  # the selected weights, on the training device, eval mode
    history: list[dict]
    selected_epoch: int
    device: torch.device
    precision: str  # "bf16" or "fp32": what `train.precision` resolved to on this device
    state: dict = field(repr=False, default_factory=dict)


def fit(
    cfg: TrainConfig,
    settings: TrainingConfig,
    train: Split,
    val: Split,
    checkpoint_path: Path,
    fingerprint: str,
    on_epoch: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    run_id: str | None = None,
    progress: bool = True,
) -> FitResult:
    ctx = distributed.context()
    device = select_device(settings.device, ctx.local_rank)
    distributed.init(device)
    if cfg.batch_size % ctx.world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} must divide evenly among the {ctx.world_size} processes "
                          "(train.nproc): the global batch stays what params say")
    seed_everything(cfg.seed, settings.deterministic)
    bf16 = uses_bf16(settings.precision, device)
    precision = "bf16" if bf16 else "fp32"
    x_train, y_train = to_device_tensor(train, device)
    x_val, y_val = to_device_tensor(val, device)
    model = build_model(cfg.model).to(device, memory_format=memory_format(device))
    fit_to_data(model, x_train[:WHITENING_IMAGES])  # replaced by the checkpoint's weights on resume
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not settings.deterministic
    net = model  # what the training steps call
    if ctx.enabled:
        if device.type == "cuda":  # batch statistics over the global batch, as in one process
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if settings.compile:
        net = torch.compile(net)  # the training steps only: evaluation runs the plain module

    # A fixed, seeded subset of the train split, scored in eval mode: the "clean" training accuracy.
    subset = settings.eval_train_size or len(y_train)
    pick = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(cfg.seed))[:subset].to(device)
    x_eval, y_eval = x_train[pick], y_train[pick]

    steps_per_epoch = len(batches(len(y_train), cfg.batch_size, cfg.seed, 0, ctx.world_size))
    optimizer = make_optimizer(cfg, parameter_groups(model, cfg))
    schedule = make_schedule(cfg, optimizer, cfg.epochs * steps_per_epoch)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    history: list[dict] = []
    best = {"epoch": 0, "val_acc": -1.0, "state": None}
    start_epoch = 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        history, best = resume["history"], resume["best"]
        start_epoch = resume["epoch"] + 1
        print(f"resuming from {checkpoint_path} after epoch {resume['epoch']} of {cfg.epochs}")

    scored = ema.module if ema is not None else model  # the weights that are evaluated and selected
    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        torch.manual_seed(epoch_seed(cfg.seed, epoch, ctx.rank))
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        # Indices go to the device once per epoch: a copy per step would stall the GPU's queue every step.
        epoch_batches = [b[ctx.rank::ctx.world_size].to(device)  # this process's share of each global batch
                         for b in batches(len(y_train), cfg.batch_size, cfg.seed, epoch, ctx.world_size)]
        bar = tqdm(epoch_batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                   disable=not (progress and ctx.is_main))
        for step, index in enumerate(bar):
            images, labels = x_train[index], y_train[index]
            logits, loss = train_step(net, criterion, optimizer, images, labels, bf16)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            schedule.step()
            if ema is not None:
                ema.update(model)
            # Running figures stay on the device: no host sync per step.
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
        bar.close()
        seen = torch.tensor(seen, device=device)
        distributed.all_reduce_sum(loss_sum, correct, seen)
        seen = seen.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time = time.perf_counter() - started

        train_eval_loss, train_eval_acc = score(predict(scored, x_eval, settings.eval_batch_size, bf16), y_eval)
        val_loss, val_acc = score(predict(scored, x_val, settings.eval_batch_size, bf16), y_val)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum.item() / seen,
            "train_acc": correct.item() / seen,
            "train_eval_loss": train_eval_loss,
            "train_eval_acc": train_eval_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": lr,
            "epoch_time_s": time.perf_counter() - started,
            "images_per_s": seen / train_time,
        }
        history.append(record)
        if not ctx.is_main:
            continue  # rank 0 alone selects, reports and checkpoints
        if is_selectable(cfg, record) and (cfg.select == "last" or val_acc > best["val_acc"]):
            best = {"epoch": epoch, "val_acc": val_acc, "state": _cpu_state(scored)}
        print(
            f"epoch {epoch:2d}/{cfg.epochs}  loss {record['train_loss']:.4f}  train acc {record['train_acc']:.4f} "
            f"(eval {train_eval_acc:.4f})  val loss {val_loss:.4f}  val acc {val_acc:.4f}  "
            f"{record['epoch_time_s']:.1f}s  {record['images_per_s']:.0f} img/s",
            flush=True,
        )
        if on_epoch is not None:
            on_epoch(record)
        save_checkpoint(checkpoint_path, {
            "version": CHECKPOINT_VERSION,
            "fingerprint": fingerprint,
            "run_id": run_id,
            "epoch": epoch,
            "complete": epoch == cfg.epochs,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "history": history,
            "best": best,
        })
    distributed.shutdown()
    if not ctx.is_main:
        return FitResult(model, history, history[-1]["epoch"], device, precision)

    if best["state"] is None:
        # The rule admitted no epoch (training accuracy never under the bound): fall back to the last.
        print(f"no epoch had train_acc < {cfg.select_train_acc_max}: selecting the last epoch")
        best = {"epoch": cfg.epochs, "val_acc": history[-1]["val_acc"], "state": _cpu_state(scored)}
    selected = build_model(cfg.model).to(device, memory_format=memory_format(device))
    selected.load_state_dict(best["state"])
    selected.eval()
    return FitResult(selected, history, best["epoch"], device, precision, best["state"])


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_checkpoint(path: Path, state: dict) -> None:
    """Written to a temporary file, then renamed: a kill mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    """The checkpoint of an unfinished run of this exact configuration, or None (start afresh)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        # weights_only: a checkpoint holds tensors, numbers, strings, lists and dicts only, and loading
        # one must never run code from the file, whoever wrote it.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, or holding more than plain data: not worth failing for, retrain
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        print(f"ignoring checkpoint {path}: it does not load as plain tensors and values ({reason}); "
              "training from scratch")
        return None
    if not isinstance(state, dict):
        print(f"ignoring checkpoint {path}: not a checkpoint of this pipeline; training from scratch")
        return None
    if state.get("version") != CHECKPOINT_VERSION:
        print(f"checkpoint {path} is from another version of this code; training from scratch")
        return None
    if state.get("fingerprint") != fingerprint:
        print(f"checkpoint {path} is from other params; training from scratch")
        return None
    if state.get("complete"):
        return None
    return state
