"""One training loop for both models: in-memory tensors, per-epoch checkpoints, a declared selection rule.

Read `fit` top to bottom: it builds the model, optimizer, schedule and weight average from a
Recipe; then each epoch `train_epoch` trains (recording the running, training-mode accuracy
that the problem statement's 98%/92% refer to), `evaluate` scores a fixed train subset and the
validation split in eval mode, the `Selection` rule considers the epoch, the callback (MLflow)
hears of it and the `Checkpoint` is written. Device and precision live in pipeline/device.py.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from pipeline import distributed
from pipeline.config import Recipe, TrainSection
from pipeline.data import Split
from pipeline.device import autocast, memory_format, select_device, to_device_tensor, uses_bf16
from pipeline.models import build_model
from pipeline.scoring import predict, score

CHECKPOINT_VERSION = 7  # raised whenever what a checkpoint holds changes: an older one is not resumed
PROGRESS_LINE_EVERY_S = 30.0  # where no progress bar can be drawn (under DVC), a plain line this often


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def parameter_groups(model: nn.Module, cfg: Recipe) -> list[dict]:
    """One group, or two when weight decay applies to weights only: tensors of one dimension (biases,
    batch norm's scales and shifts) get none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer.weight_decay_scope == "all":
        return [{"params": params}]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def make_optimizer(cfg: Recipe, params) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)


def make_schedule(cfg: Recipe, optimizer: torch.optim.Optimizer, total_steps: int):
    """Stepped once per batch: a one-cycle from peak / 25 up to `lr` and down to `final_lr_fraction` of
    it, or a constant rate."""
    if cfg.schedule == "onecycle":
        start, floor = 25.0, cfg.final_lr_fraction  # OneCycleLR's div_factor: the first step's rate is peak / 25
        warmup = cfg.warmup_fraction
        if round(warmup * total_steps, 9) == 1:  # a one-step warm-up makes OneCycleLR divide by zero
            warmup = 0.5 / total_steps  # no warm-up: the first step is near the peak
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.optimizer.lr, total_steps=total_steps, pct_start=warmup, div_factor=start,
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


def exponential_average(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """AveragedModel's `multi_avg_fn` for an exponential moving average of weights and batch-norm statistics.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first n updates, as in TensorFlow's
    ExponentialMovingAverage: a fixed 0.999 would keep half of the first weights for 700 steps, which
    is four of this data set's epochs at batch 256.
    """

    def update(averaged: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> None:
        if not averaged[0].is_floating_point():  # batch norm's batch counts: copied, not averaged
            torch._foreach_copy_(averaged, current)
            return
        # AveragedModel keeps the count on the CPU and copies it to the device for every update (a host
        # sync on GPUs); reading it back costs no more, and a Python float works on every device.
        n = int(n_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1 + n) / (10 + n)))

    return update


def weight_average(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of `model`, starting from its weights now (the first update then
    has n = 1 and decay 2/11)."""
    averaged = AveragedModel(model, multi_avg_fn=exponential_average(decay), use_buffers=True)
    averaged.requires_grad_(False)
    averaged.update_parameters(model)  # AveragedModel's first update copies
    return averaged


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seeds the global RNG (dropout) per epoch and rank: a resumed run needs no saved RNG state."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def batches(n: int, batch_size: int, seed: int, epoch: int, processes: int = 1) -> list[Tensor]:
    """This epoch's shuffled index batches. Seeded by (seed, epoch) so a resumed run sees the same order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2 * processes:
        chunks.pop()  # batch norm cannot train on a single image per process
    return chunks


def process_batches(n: int, batch_size: int, seed: int, epoch: int, device: torch.device) -> list[Tensor]:
    """This process's share of each of the epoch's global batches, on the device. Indices go to the
    device once per epoch: a copy per step would stall a GPU's queue every step."""
    ctx = distributed.context()
    return [b[ctx.rank::ctx.world_size].to(device) for b in batches(n, batch_size, seed, epoch, ctx.world_size)]


@dataclass
class Selection:
    """The selection rule: which epoch's scored weights the stage keeps (`select` in params).

    "last" keeps the last epoch; "best_val_under_target" the best validation accuracy among epochs whose
    running training accuracy is under the bound.
    """

    rule: str
    train_acc_max: float
    epoch: int = 0
    val_acc: float = -1.0
    state: dict | None = None

    def admits(self, record: dict) -> bool:
        return self.rule != "best_val_under_target" or record["train_running_acc"] < self.train_acc_max

    def consider(self, record: dict, scored: nn.Module) -> None:
        if self.admits(record) and (self.rule == "last" or record["val_acc"] > self.val_acc):
            self.epoch, self.val_acc, self.state = record["epoch"], record["val_acc"], _cpu_state(scored)

    def fall_back_to_last(self, record: dict, scored: nn.Module) -> None:
        """When the rule admitted no epoch (training accuracy never under the bound)."""
        if self.state is None:
            print(f"no epoch had running training accuracy < {self.train_acc_max}: selecting the last epoch")
            self.epoch, self.val_acc, self.state = record["epoch"], record["val_acc"], _cpu_state(scored)

    def model(self, config, device: torch.device) -> nn.Module:
        """The selected weights in a fresh model on `device`, in eval mode."""
        selected = build_model(config).to(device, memory_format=memory_format(device))
        selected.load_state_dict(self.state)
        return selected.eval()

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "val_acc": self.val_acc, "state": self.state}

    def load_dict(self, saved: dict) -> None:
        self.epoch, self.val_acc, self.state = saved["epoch"], saved["val_acc"], saved["state"]


@dataclass
class Checkpoint:
    """The state of an unfinished run at `path`, written every epoch and tied to the params that made it.

    `fingerprint` names those params: a checkpoint of other params is not resumed. `run_id` is the
    MLflow run that a resumed training continues.
    """

    path: Path
    fingerprint: str
    run_id: str | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    def save(self, epoch: int, complete: bool, **state) -> None:
        """Written to a temporary file, then renamed: a kill mid-write leaves the previous checkpoint intact."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint, "run_id": self.run_id,
                    "epoch": epoch, "complete": complete, **state}, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict | None:
        """The checkpoint of an unfinished run of this exact configuration, or None (start afresh)."""
        path = self.path
        if not path.exists():
            return None
        try:
            # weights_only: a checkpoint holds tensors, numbers, strings, lists and dicts only, and loading
            # one must never run code from the file, whoever wrote it.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt, or holding more than plain data: not worth failing for, retrain
            self.set_aside(f"it does not load as plain tensors and values ({type(exc).__name__}); a file that "
                           "needs more could run code when loaded, so it is not")
            return None
        if not isinstance(state, dict):
            self.set_aside("it is not a checkpoint of this pipeline")
            return None
        if state.get("version") != CHECKPOINT_VERSION:
            print(f"checkpoint {path} is from another version of this code; training from scratch")
            return None
        if state.get("fingerprint") != self.fingerprint:
            print(f"checkpoint {path} is from other params; training from scratch")
            return None
        if state.get("complete"):
            return None
        return state

    def set_aside(self, reason: str) -> None:
        """Moves an unusable checkpoint out of the way (kept for a look, never loaded again)."""
        rejected = self.path.with_name(self.path.name + ".rejected")
        os.replace(self.path, rejected)
        print(f"checkpoint {self.path} set aside as {rejected.name}: {reason}. Training from scratch.")


@dataclass
class FitResult:
    model: nn.Module  # the selected weights, on the training device, eval mode
    history: list[dict]
    selected_epoch: int
    device: torch.device
    precision: str  # "bf16" or "fp32": what `train.precision` resolved to on this device
    state: dict = field(repr=False, default_factory=dict)


def train_epoch(net: nn.Module, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                schedule, average: AveragedModel | None, x: Tensor, y: Tensor, epoch_batches: list[Tensor],
                bf16: bool, desc: str, show_progress: bool) -> dict:
    """One pass over the batches in training mode, under a progress bar. Returns the running
    (training-mode) loss and accuracy and the images per second, over all processes, and the learning
    rate of the last step."""
    device = x.device
    started = time.perf_counter()
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, lr = 0, optimizer.param_groups[0]["lr"]
    # tqdm draws nothing when stderr is not a terminal (DVC runs stages that way): plain lines instead.
    plain_lines = show_progress and not sys.stderr.isatty()
    last_line = started
    with tqdm(total=len(epoch_batches), desc=desc, unit="batch", leave=False,
              disable=not show_progress or plain_lines) as bar:
        for step, index in enumerate(epoch_batches):
            images, labels = x[index], y[index]
            logits, loss = train_step(net, criterion, optimizer, images, labels, bf16)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            schedule.step()
            if average is not None:
                average.update_parameters(model)
            # Running figures stay on the device: no host sync per step.
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            bar.update()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
            if plain_lines and time.perf_counter() - last_line >= PROGRESS_LINE_EVERY_S:
                last_line = time.perf_counter()
                progress_line(desc, step + 1, len(epoch_batches), seen, last_line - started)
    seen = torch.tensor(seen, device=device)
    distributed.all_reduce_sum(loss_sum, correct, seen)
    seen = seen.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"train_running_loss": loss_sum.item() / seen, "train_running_acc": correct.item() / seen, "lr": lr,
            "images_per_s": seen / (time.perf_counter() - started)}


def progress_line(desc: str, done: int, total: int, images: int, seconds: float) -> None:
    print(f"  {desc}: batch {done}/{total}, {images / seconds:.0f} img/s, "
          f"about {(total - done) * seconds / done:.0f} s left in the epoch", file=sys.stderr, flush=True)


def evaluate(scored: nn.Module, x_eval: Tensor, y_eval: Tensor, x_val: Tensor, y_val: Tensor,
             batch_size: int, bf16: bool) -> dict:
    """The scored weights in eval mode: on the fixed train subset ("clean" accuracy) and on validation."""
    clean_loss, clean_acc = score(predict(scored, x_eval, batch_size, bf16), y_eval)
    val_loss, val_acc = score(predict(scored, x_val, batch_size, bf16), y_val)
    return {"train_clean_subset_loss": clean_loss, "train_clean_subset_acc": clean_acc,
            "val_loss": val_loss, "val_acc": val_acc}


def clean_subset(x: Tensor, y: Tensor, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed, seeded subset of the train split (size 0: all of it), scored in eval mode every epoch."""
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:size or len(y)].to(x.device)
    return x[pick], y[pick]


def build_networks(cfg: Recipe, settings: TrainSection, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(model, net): the model whose weights are averaged, scored and saved, and what the training
    steps call: the model itself, or its DistributedDataParallel and compiled wrappers."""
    model = build_model(cfg.model).to(device, memory_format=memory_format(device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not settings.deterministic
    net = model
    if distributed.context().enabled:
        # Batch statistics over the global batch, as in one process.
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if settings.compile:
        net = torch.compile(net)  # the training steps only: evaluation runs the plain module
    return model, net


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, schedule, average: AveragedModel | None,
                   selection: Selection, history: list[dict]) -> dict:
    """What a checkpoint holds besides its header; `restore` puts it back."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "average": average.state_dict() if average is not None else None, "history": history,
            "best": selection.to_dict()}


def restore(saved: dict, model: nn.Module, optimizer: torch.optim.Optimizer, schedule, average: AveragedModel | None,
            selection: Selection, checkpoint: Checkpoint) -> list[dict] | None:
    """Puts a checkpoint's state back into the training objects; returns the history so far, or None
    (the checkpoint set aside) when its tensors do not fit."""
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        if average is not None:
            average.load_state_dict(saved["average"])
        selection.load_dict(saved["best"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
        # Plain data with the right fingerprint whose tensors do not fit: the objects are half restored.
        checkpoint.set_aside(f"its state does not fit this model ({type(exc).__name__})")
        return None
    return saved["history"]


def training_objects(cfg: Recipe, model: nn.Module, steps_per_epoch: int):
    """The optimizer, its schedule over the planned epochs, and the weight average (None without one)."""
    optimizer = make_optimizer(cfg, parameter_groups(model, cfg))
    schedule = make_schedule(cfg, optimizer, cfg.planned_epochs * steps_per_epoch)
    average = weight_average(model, cfg.ema_decay) if cfg.ema_decay else None
    return optimizer, schedule, average


def fit(cfg: Recipe, settings: TrainSection, train: Split, val: Split, checkpoint: Checkpoint,
        on_epoch: Callable[[dict], None] | None = None, resume: dict | None = None, progress: bool = True) -> FitResult:
    ctx = distributed.context()
    device = select_device(settings.device, ctx.local_rank)
    distributed.init(device, cfg.batch_size)
    seed_everything(cfg.seed, settings.deterministic)
    bf16 = uses_bf16(settings.precision, device)
    x_train, y_train = to_device_tensor(train, device)
    x_val, y_val = to_device_tensor(val, device)
    x_eval, y_eval = clean_subset(x_train, y_train, settings.eval_train_size, cfg.seed)
    model, net = build_networks(cfg, settings, device)
    steps_per_epoch = len(batches(len(y_train), cfg.batch_size, cfg.seed, 0, ctx.world_size))
    optimizer, schedule, average = training_objects(cfg, model, steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    selection = Selection(cfg.select, cfg.select_train_acc_max)
    history = []
    if resume is not None:
        history = restore(resume, model, optimizer, schedule, average, selection, checkpoint)
        if history is None:  # every object is built afresh
            return fit(cfg, settings, train, val, checkpoint, on_epoch, resume=None, progress=progress)
        print(f"resuming from {checkpoint.path} after epoch {resume['epoch']} of {cfg.epochs}")
    scored = average.module if average is not None else model  # the weights evaluated and selected

    for epoch in range(resume["epoch"] + 1 if resume else 1, cfg.epochs + 1):
        torch.manual_seed(epoch_seed(cfg.seed, epoch, ctx.rank))
        started = time.perf_counter()
        epoch_batches = process_batches(len(y_train), cfg.batch_size, cfg.seed, epoch, device)
        running = train_epoch(net, model, criterion, optimizer, schedule, average, x_train, y_train, epoch_batches,
                              bf16, f"epoch {epoch}/{cfg.epochs}", progress and ctx.is_main)
        scores = evaluate(scored, x_eval, y_eval, x_val, y_val, settings.eval_batch_size, bf16)
        history.append(epoch_record(epoch, running, scores, time.perf_counter() - started))
        if not ctx.is_main:
            continue  # rank 0 alone selects, reports and checkpoints
        selection.consider(history[-1], scored)
        report(history[-1], cfg.epochs)
        if on_epoch is not None:
            on_epoch(history[-1])
        checkpoint.save(epoch, epoch == cfg.epochs, **training_state(model, optimizer, schedule, average, selection,
                                                                     history))
    distributed.shutdown()
    precision = "bf16" if bf16 else "fp32"
    if not ctx.is_main:
        return FitResult(model, history, history[-1]["epoch"], device, precision)
    selection.fall_back_to_last(history[-1], scored)
    return FitResult(selection.model(cfg.model, device), history, selection.epoch, device, precision, selection.state)


def epoch_record(epoch: int, running: dict, scores: dict, seconds: float) -> dict:
    """A row of history.csv: the running figures, then the scored weights' figures, then the rate and speed."""
    return {"epoch": epoch, "train_running_loss": running["train_running_loss"],
            "train_running_acc": running["train_running_acc"], **scores, "lr": running["lr"],
            "epoch_time_s": seconds, "images_per_s": running["images_per_s"]}


def report(record: dict, epochs: int) -> None:
    print(
        f"epoch {record['epoch']:2d}/{epochs}  loss {record['train_running_loss']:.4f}  "
        f"train acc {record['train_running_acc']:.4f} (clean {record['train_clean_subset_acc']:.4f})  "
        f"val loss {record['val_loss']:.4f}  val acc {record['val_acc']:.4f}  "
        f"{record['epoch_time_s']:.1f}s  {record['images_per_s']:.0f} img/s",
        flush=True,
    )


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
