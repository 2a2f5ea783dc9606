"""Multi-process training under torchrun: which process this is, and the collectives the loop needs.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is the single process of an
ordinary run and every function here is a no-op. Rank 0 alone writes outputs and MLflow records.
"""

from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context() -> Context:
    return Context(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Ask Linux to send this process `signum` when its parent exits (prctl PR_SET_PDEATHSIG): a rank
    whose launcher is killed, even with -9, then ends too instead of training on unsupervised. Elsewhere
    a no-op. Cheap enough to run between fork and exec (a `preexec_fn`)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signum, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request: as if it had died after
        os.kill(os.getpid(), signum)


def init(device: torch.device, batch_size: int) -> Context:
    """Join the process group (NCCL on GPUs, gloo on CPUs) if this is one rank of several, whose equal
    shares make up each global batch of `batch_size`."""
    ctx = context()
    if batch_size % ctx.world_size:
        raise ConfigError(f"batch_size {batch_size} must divide evenly among the {ctx.world_size} processes "
                          "(train.nproc): the global batch stays what params say")
    if ctx.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ctx


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    if dist.is_initialized():
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
