"""Where training runs and in what precision: the device params ask for, bf16 or fp32, memory layout."""

from __future__ import annotations

import functools
import platform
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.data import Split


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
    need) and CPUs with native bf16, where oneDNN's convolutions run faster than in fp32; elsewhere
    bf16 is emulated and slower.
    """
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def memory_format(device: torch.device) -> torch.memory_format:
    # NHWC is what cuDNN's tensor-core kernels and oneDNN's CPU kernels want.
    return torch.channels_last if device.type in ("cuda", "cpu") else torch.contiguous_format


def to_device_tensor(split: Split, device: torch.device) -> tuple[Tensor, Tensor]:
    images = torch.from_numpy(split.images).to(device=device, dtype=torch.float32)
    return images.contiguous(memory_format=memory_format(device)), torch.from_numpy(split.labels).to(device)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def cpu_model() -> str:
    """The processor's name as Linux reports it, else what Python's platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
