"""The two models of the experiment: the overfitting baseline CNN and a ResNet written from scratch.

The ResNet follows He et al. (2016), "Deep Residual Learning for Image Recognition", in the
CIFAR form: a 3x3 stem, stages of BasicBlocks that double the width and halve the resolution,
global average pooling and one linear classifier; the DAWNBench ResNet-9 layout is an option of the
same class.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; the shortcut is added before the last ReLU (He et al.), or,
    with `relu_in_branch`, after it: the residual unit of the DAWNBench ResNet-9, x + ReLU(BN(conv(...))).

    The shortcut is the identity when the shape is unchanged, else `downsample`: a strided 1x1
    convolution with batch norm that matches the branch's channels and resolution. Dropout sits
    between the two convolutions, inside the residual branch (Zagoruyko & Komodakis, 2016, "Wide
    Residual Networks"): the shortcut carries the signal through undropped.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0,
                 relu_in_branch: bool = False) -> None:
        super().__init__()
        self.relu_in_branch = relu_in_branch
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(Projection(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.dropout(self.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        if self.relu_in_branch:
            return self.relu(out) + identity
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A stem (a 3x3 convolution to `width` channels, batch norm, ReLU), stages of BasicBlocks, global
    pooling, (dropout,) one linear classifier.

    `block` "resnet9" puts each block's last ReLU inside its branch (see BasicBlock); `conv_init` "torch"
    keeps PyTorch's own initialization of the convolutions instead of He et al.'s.
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
        downsample: str = "stride",
        pooling: str = "avg",
        head_dropout: float = 0.0,
        conv_init: str = "kaiming",
        block: str = "basic",
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv3x3(3, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        in_channels = width
        stages: list[nn.Module] = []
        for stage, count in enumerate(blocks):
            layers: list[nn.Module] = []
            if downsample == "pool":
                out_channels, stride = width * 2 ** (stage + 1), 1
                layers += [conv3x3(in_channels, out_channels), nn.BatchNorm2d(out_channels),
                           nn.ReLU(inplace=True), nn.MaxPool2d(2)]
                in_channels = out_channels
            else:
                out_channels, stride = width * 2 ** stage, 2 if stage > 0 else 1
            for i in range(count):
                layers.append(BasicBlock(in_channels, out_channels, stride if i == 0 else 1, dropout,
                                         relu_in_branch=block == "resnet9"))
                in_channels = out_channels
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveMaxPool2d(1) if pooling == "max" else nn.AdaptiveAvgPool2d(1)
        self.head_dropout = nn.Dropout(head_dropout) if head_dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)

        if conv_init == "kaiming":
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, Projection)):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Each residual branch starts as zero, so every block starts as the identity (Goyal et al., 2017).
        # Not with the ReLU in the branch: at zero scale and shift the ReLU passes no gradient, ever.
        for m in self.modules():
            if isinstance(m, BasicBlock) and not m.relu_in_branch:
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.pool(self.stages(self.stem(x))), 1)
        return self.fc(self.head_dropout(x))


def build_model(config: BaselineModelConfig | ResNetModelConfig) -> nn.Module:
    if isinstance(config, ResNetModelConfig):
        return ResNet(config.width, config.blocks, config.dropout, config.downsample, config.pooling,
                      config.head_dropout, config.conv_init, config.block)
    return BaselineCNN(config.widths, config.hidden)


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
