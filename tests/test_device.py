"""pipeline.device: which device and precision params resolve to on this machine."""

import pytest
import torch

from pipeline.device import cpu_has_native_bf16, memory_format, select_device, uses_bf16
from pipeline.errors import ConfigError


def test_precision_auto_takes_bf16_on_cuda_and_on_cpus_with_native_bf16():
    assert uses_bf16("auto", torch.device("cuda", 0))
    assert uses_bf16("auto", torch.device("cpu")) == cpu_has_native_bf16()
    assert not uses_bf16("auto", torch.device("mps"))
    assert uses_bf16("bf16", torch.device("cpu")) and not uses_bf16("fp32", torch.device("cuda", 0))


def test_auto_falls_back_to_the_cpu_without_an_accelerator():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has an accelerator")
    assert select_device("auto") == torch.device("cpu")


def test_asking_for_a_missing_gpu_names_the_param_and_the_fix():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ConfigError, match="train.device is 'cuda' but no CUDA GPU is visible: set train.device"):
        select_device("cuda")


def test_cpu_and_cuda_tensors_are_channels_last():
    assert memory_format(torch.device("cpu")) == torch.channels_last
    assert memory_format(torch.device("mps")) == torch.contiguous_format
