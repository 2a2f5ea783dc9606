"""The two models of the experiment: the overfitting baseline CNN and a ResNet written from scratch.

The ResNet follows He et al. (2016), "Deep Residual Learning for Image Recognition", in the
CIFAR form: a 3x3 stem, stages of BasicBlocks that double the width and halve the resolution,
global average pooling and one linear classifier; the DAWNBench ResNet-9 layout and airbench's
patch-whitening stem are options of the same class.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import DropBlock2d, StochasticDepth

from pipeline import paths
from pipeline.config import BaselineModelConfig, Config, ResNetModelConfig
from pipeline.errors import ModelFileError

NUM_CLASSES = 10


class BaselineCNN(nn.Module):
    """The problem statement's simple CNN: conv-conv-pool groups and a dense head, no regularization."""

    def __init__(self, widths: list[int], hidden: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for width in widths:
            layers += [
                nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels = width
        self.features = nn.Sequential(*layers)
        side = 32 // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * side * side, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)  # BN follows: no bias


class Projection(nn.Module):
    """A strided 1x1 convolution without bias, computed as a matrix product: the projection shortcut.

    Written out because oneDNN's AVX2 kernel for the weight gradient of a strided 1x1 convolution on
    channels-last tensors hangs or crashes for some batch sizes; a matrix product goes through BLAS.
    The weight has nn.Conv2d's shape, so state dicts are those of the convolution it replaces.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")  # as ResNet does for convs

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return torch.einsum("nchw,oc->nohw", x, self.weight.flatten(1))


class PatchWhitening(nn.Module):
    """A 2x2 convolution whose filters whiten the 2x2 patches of the training images (the airbench stem).

    `fit_to(images)` sets the filters once, before training: the eigenvectors of the patch covariance,
    each divided by the square root of its eigenvalue, and their negatives, so that the ReLU after
    the stem passes every direction of the patch space. The filters then stay frozen; the bias trains.
    The network starts on decorrelated inputs, which is what makes the first epochs count.
    """

    def __init__(self, in_channels: int = 3, kernel_size: int = 2) -> None:
        super().__init__()
        self.out_channels = 2 * in_channels * kernel_size ** 2
        self.conv = nn.Conv2d(in_channels, self.out_channels, kernel_size, bias=True)
        self.conv.weight.requires_grad_(False)
        nn.init.zeros_(self.conv.bias)

    @torch.no_grad()
    def fit_to(self, images: Tensor, eps: float = 5e-4) -> None:
        channels, (kh, kw) = images.shape[1], self.conv.kernel_size
        patches = images.float().unfold(2, kh, 1).unfold(3, kw, 1)  # N, C, H', W', kh, kw
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * kh * kw).double()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]
        filters = filters.reshape(-1, channels, kh, kw)
        self.conv.weight.copy_(torch.cat([filters, -filters]).to(self.conv.weight))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Batch norm that, in training mode, splits the batch into near-equal groups of at most
    `ghost_batch_size` images and normalizes each by its own statistics (Hoffer et al., 2017, "Train
    longer, generalize better"). Smaller groups give noisier statistics: noise in training mode that eval
    mode, with the running statistics, does not have. Each group updates the running statistics, at the
    momentum that moves them as far per batch as BatchNorm2d's one update; the state dict is BatchNorm2d's.
    """

    def __init__(self, num_features: int, ghost_batch_size: int) -> None:
        super().__init__(num_features)
        self.ghost_batch_size = ghost_batch_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or len(x) <= self.ghost_batch_size:
            return super().forward(x)
        groups = x.tensor_split(-(-len(x) // self.ghost_batch_size))
        if self.momentum is None:  # a cumulative average (recompute_batch_norm's): over every group alike
            normalize = super().forward
            return torch.cat([normalize(group) for group in groups])
        momentum = 1 - (1 - self.momentum) ** (1 / len(groups))
        self.num_batches_tracked.add_(len(groups))
        return torch.cat([F.batch_norm(group, self.running_mean, self.running_var, self.weight, self.bias,
                                       training=True, momentum=momentum, eps=self.eps) for group in groups])


def batch_norm(ghost_batch_size: int = 0) -> Callable[[int], nn.Module]:
    """The ResNet's norm layer: BatchNorm2d, or GhostBatchNorm2d for a ghost batch size above 0."""
    return partial(GhostBatchNorm2d, ghost_batch_size=ghost_batch_size) if ghost_batch_size else nn.BatchNorm2d


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; the shortcut is added before the last ReLU (He et al.), or,
    with `relu_in_branch`, after it: the residual unit of the DAWNBench ResNet-9, x + ReLU(BN(conv(...))).

    The shortcut is the identity when the shape is unchanged, else `downsample`: a strided 1x1
    convolution with batch norm that matches the branch's channels and resolution. Dropout sits
    between the two convolutions, inside the residual branch (Zagoruyko & Komodakis, 2016, "Wide
    Residual Networks"): the shortcut carries the signal through undropped. With `drop_block_size`
    it drops squares of the feature maps instead of single units (DropBlock).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, drop_path: float = 0.0,
                 dropout: float = 0.0, drop_block_size: int = 0, relu_in_branch: bool = False,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.relu_in_branch = relu_in_branch
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.dropout: nn.Module = nn.Identity()
        if dropout > 0:
            self.dropout = DropBlock2d(dropout, drop_block_size) if drop_block_size else nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = norm_layer(out_channels)
        # Drops the whole residual branch of a sample (Huang et al., 2016), rescaled so eval mode needs nothing.
        self.drop_path = StochasticDepth(drop_path, mode="row")
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(Projection(in_channels, out_channels, stride), norm_layer(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.dropout(self.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        if self.relu_in_branch:
            return self.drop_path(self.relu(out)) + identity
        return self.relu(self.drop_path(out) + identity)


class ResNet(nn.Module):
    """A stem, stages of BasicBlocks, global pooling, (dropout,) one linear classifier.

    `logit_scale` multiplies the classifier's outputs; `drop_block_size` is BasicBlock's, made smaller
    (and odd) in stages whose feature maps are smaller than the block (CIFAR's 32x32 inputs).
    `stem` is "conv" (a 3x3 convolution to `width` channels with batch norm and ReLU) or "whiten"
    (PatchWhitening's 24 frozen 2x2 filters and ReLU, set from the data by `fit_to_data`).
    `block` "resnet9" puts each block's last ReLU inside its branch (see BasicBlock); `conv_init` "torch"
    keeps PyTorch's own initialization of the convolutions instead of He et al.'s; "dirac"
    starts each 3x3 convolution's first filters as the identity (airbench); `ghost_batch_size` above 0 makes
    every batch norm a GhostBatchNorm2d.
    `downsample` chooses how a stage changes the resolution:
    - "stride" (He et al., 2016, CIFAR form): stage i has width * 2**i channels; the first block of
      every stage but the first has stride 2 and a projection shortcut.
    - "pool" (the ResNet-9 of the DAWNBench CIFAR-10 entries): every stage opens with a 3x3 conv to
      width * 2**(i+1) channels, batch norm, ReLU and 2x2 max-pooling, then its blocks, all with
      identity shortcuts. Most of the compute then runs at low resolution, which makes it fast; a
      stage may hold no block at all.
    """

    def __init__(
        self,
        width: int,
        blocks: list[int],
        dropout: float = 0.0,
        stochastic_depth: float = 0.0,
        downsample: str = "stride",
        pooling: str = "avg",
        head_dropout: float = 0.0,
        stem: str = "conv",
        logit_scale: float = 1.0,
        drop_block_size: int = 0,
        conv_init: str = "kaiming",
        block: str = "basic",
        ghost_batch_size: int = 0,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        norm_layer = batch_norm(ghost_batch_size)
        if stem == "whiten":
            whitening = PatchWhitening(3)
            self.stem = nn.Sequential(whitening, nn.ReLU(inplace=True))
            in_channels = whitening.out_channels
        else:
            self.stem = nn.Sequential(conv3x3(3, width), norm_layer(width), nn.ReLU(inplace=True))
            in_channels = width
        total = sum(blocks)
        stages: list[nn.Module] = []
        index = 0
        for stage, count in enumerate(blocks):
            layers: list[nn.Module] = []
            if downsample == "pool":
                out_channels, stride = width * 2 ** (stage + 1), 1
                layers += [conv3x3(in_channels, out_channels), norm_layer(out_channels),
                           nn.ReLU(inplace=True), nn.MaxPool2d(2)]
                in_channels = out_channels
            else:
                out_channels, stride = width * 2 ** stage, 2 if stage > 0 else 1
            side = 32 // 2 ** (stage + 1 if downsample == "pool" else stage)  # the stage's feature maps
            block_size = min(drop_block_size, side - 1 + side % 2)  # a block is odd and fits in the map
            for i in range(count):
                # Deeper blocks are dropped more often: linear rule of the stochastic depth paper.
                drop_path = stochastic_depth * index / max(total - 1, 1)
                layers.append(BasicBlock(in_channels, out_channels, stride if i == 0 else 1, drop_path, dropout,
                                         block_size, relu_in_branch=block == "resnet9", norm_layer=norm_layer))
                in_channels, index = out_channels, index + 1
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveMaxPool2d(1) if pooling == "max" else nn.AdaptiveAvgPool2d(1)
        self.head_dropout = nn.Dropout(head_dropout) if head_dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)
        self.logit_scale = logit_scale

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, Projection)) and m.weight.requires_grad and conv_init != "torch":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if conv_init == "dirac" and isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                # The first in_channels filters copy their input channel: an identity inside the random init.
                nn.init.dirac_(m.weight.data[:min(m.in_channels, m.out_channels)])
        # Each residual branch starts as zero, so every block starts as the identity (Goyal et al., 2017).
        # Not with the ReLU in the branch: at zero scale and shift the ReLU passes no gradient, ever.
        for m in self.modules():
            if isinstance(m, BasicBlock) and not m.relu_in_branch:
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.pool(self.stages(self.stem(x))), 1)
        return self.fc(self.head_dropout(x)) * self.logit_scale


def build_model(config: BaselineModelConfig | ResNetModelConfig) -> nn.Module:
    if isinstance(config, ResNetModelConfig):
        return ResNet(config.width, config.blocks, config.dropout, config.stochastic_depth,
                      config.downsample, config.pooling, config.head_dropout, config.stem, config.logit_scale,
                      config.drop_block_size, config.conv_init, config.block, config.ghost_batch_size)
    return BaselineCNN(config.widths, config.hidden)


def fit_to_data(model: nn.Module, images: Tensor) -> None:
    """The data-dependent part of a new model's initialization (the whitening stem), from training images."""
    for module in model.modules():
        if isinstance(module, PatchWhitening):
            module.fit_to(images)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save(path, config: BaselineModelConfig | ResNetModelConfig, state_dict: dict, **info) -> None:
    """The state_dict with the model config that rebuilds it (no pickled classes)."""
    torch.save({"config": config.model_dump(mode="json"), "state_dict": state_dict, **info}, path)


def _with_defaults(saved: dict, expected: BaselineModelConfig | ResNetModelConfig) -> dict:
    """A saved model config with the defaults of fields added since it was saved: the same model."""
    try:
        return type(expected).model_validate(saved).model_dump(mode="json")
    except ValueError:
        return saved  # not a config this code can read: reported as a mismatch


def load_trained(config: Config, name: str) -> tuple[nn.Module, dict]:
    """The trained model of `name` (models/<name>/model.pt) and what was saved with it, refused unless it
    was trained with these params: its model config and the fingerprint of its data and recipe."""
    path, stage = paths.model_file(name), f"train_{name}"
    model, saved = load(path, getattr(config.train, name).model, stage)
    if saved.get("fingerprint") != config.model_fingerprint(name):
        raise ModelFileError(f"{path} was trained with other params (data or train.{name}) than the params given "
                             f"now: retrain it (dvc repro {stage}), or give the params it was trained with")
    return model, saved


def load(path, expected: BaselineModelConfig | ResNetModelConfig, stage: str) -> tuple[nn.Module, dict]:
    """Rebuild a saved model, refusing one trained with another model config than params say."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path} not found: train it first (dvc repro {stage})")
    unreadable = (f"{path} is not a model this pipeline saved ({{}}): it is corrupt or was replaced. Retrain it "
                  f"(dvc repro {stage}) or restore the committed one (dvc checkout {path.parent})")
    try:
        # weights_only: plain tensors and values only; loading never runs code from the file.
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(unreadable.format(f"it does not load as plain tensors and values: "
                                               f"{type(exc).__name__}")) from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict) \
            or not isinstance(saved.get("state_dict"), dict):
        raise ModelFileError(unreadable.format("no model config and weights in it"))
    wanted = expected.model_dump(mode="json")
    if _with_defaults(saved["config"], expected) != wanted:
        raise ModelFileError(
            f"{path} was trained with another model config than params.yaml now says ({wanted}): "
            f"retrain it (dvc repro {stage}) or restore the params it was trained with"
        )
    model = build_model(expected)
    try:
        model.load_state_dict(saved["state_dict"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(unreadable.format(f"its weights do not fit the model: {type(exc).__name__}")) from None
    return model.eval(), saved
