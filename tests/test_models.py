"""pipeline/models.py: the baseline CNN, the from-scratch ResNet, its residual blocks, saving and loading."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline import models
from pipeline.config import BaselineModelConfig, ResNetModelConfig
from pipeline.models import BaselineCNN, BasicBlock, ModelFileError, ResNet


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def images(n: int = 4, channels: int = 3, side: int = 32) -> torch.Tensor:
    return torch.randn(n, channels, side, side)


def randomize_batch_norm(module: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics, so that eval-mode checks mean something."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)


# --- shapes and sizes -----------------------------------------------------------------------

@pytest.mark.parametrize("widths", [[4], [4, 8], [4, 8, 16]])
def test_baseline_outputs_one_logit_per_class(widths):
    model = BaselineCNN(widths, hidden=16).eval()
    assert model(images(5)).shape == (5, models.NUM_CLASSES)


@pytest.mark.parametrize("width", [2, 4, 8])
@pytest.mark.parametrize("blocks", [[1], [2, 2], [1, 1, 1]])
def test_resnet_outputs_one_logit_per_class(width, blocks):
    model = ResNet(width, blocks).eval()
    assert model(images(3)).shape == (3, models.NUM_CLASSES)


def test_resnet_stages_double_the_width_and_halve_the_resolution():
    model = ResNet(4, [1, 1, 1]).eval()
    x = model.stem(images(2))
    shapes = []
    for stage in model.stages:
        x = stage(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(4, 32, 32), (8, 16, 16), (16, 8, 8)]
    assert model.fc.in_features == 16


def test_pooled_resnet_stages_open_with_conv_and_max_pool_then_keep_identity_shortcuts():
    model = ResNet(4, [1, 0, 1], downsample="pool").eval()
    x = model.stem(images(2))
    shapes = []
    for stage in model.stages:
        x = stage(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(8, 16, 16), (16, 8, 8), (32, 4, 4)]  # every stage doubles the channels and pools
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 2 and all(b.downsample is None for b in blocks)  # the shortcuts are all identities
    assert [sum(isinstance(m, nn.MaxPool2d) for m in stage) for stage in model.stages] == [1, 1, 1]
    assert model(images(3)).shape == (3, models.NUM_CLASSES)


def test_global_pooling_and_head_dropout_follow_the_arguments():
    pooled = ResNet(4, [1], pooling="max", head_dropout=0.5)
    assert isinstance(pooled.pool, nn.AdaptiveMaxPool2d)
    assert isinstance(pooled.head_dropout, nn.Dropout) and pooled.head_dropout.p == 0.5
    plain = ResNet(4, [1])
    assert isinstance(plain.pool, nn.AdaptiveAvgPool2d) and isinstance(plain.head_dropout, nn.Identity)
    # Eval mode drops nothing before the classifier: two passes agree.
    pooled.eval()
    x = images(4)
    with torch.no_grad():
        assert torch.equal(pooled(x), pooled(x))


def test_build_model_passes_the_layout_through():
    model = models.build_model(ResNetModelConfig(width=4, blocks=[1, 0, 1], downsample="pool", pooling="max",
                                                 head_dropout=0.25))
    assert model.fc.in_features == 32 and isinstance(model.pool, nn.AdaptiveMaxPool2d)
    assert model.head_dropout.p == 0.25


def test_parameter_count_grows_with_width():
    resnet = [models.count_parameters(ResNet(w, [1, 1])) for w in (2, 4, 8, 16)]
    baseline = [models.count_parameters(BaselineCNN([w, 2 * w], hidden=16)) for w in (2, 4, 8, 16)]
    assert resnet == sorted(resnet) and len(set(resnet)) == 4
    assert baseline == sorted(baseline) and len(set(baseline)) == 4


def test_build_model_follows_the_config():
    baseline = models.build_model(BaselineModelConfig(widths=[4, 8], hidden=16))
    resnet = models.build_model(ResNetModelConfig(width=4, blocks=[1, 2], dropout=0.1))
    assert isinstance(baseline, BaselineCNN) and isinstance(resnet, ResNet)
    assert [len(stage) for stage in resnet.stages] == [1, 2]  # blocks per stage
    assert all(block.dropout.p == 0.1 for stage in resnet.stages for block in stage)
    styled = models.build_model(ResNetModelConfig(width=4, blocks=[1, 2], block="resnet9", conv_init="torch"))
    assert all(block.relu_in_branch for stage in styled.stages for block in stage)
    bound = 1 / math.sqrt(3 * 9)  # PyTorch's own init of the stem: uniform within 1/sqrt(fan_in)
    assert styled.stem[0].weight.abs().max() <= bound


# --- the residual block -----------------------------------------------------------------------

def test_block_uses_the_identity_shortcut_when_the_shape_is_unchanged():
    block = BasicBlock(8, 8, stride=1)
    assert block.downsample is None
    assert block(images(2, 8, 16)).shape == (2, 8, 16, 16)


@pytest.mark.parametrize("in_channels,out_channels,stride", [(8, 16, 1), (8, 8, 2), (8, 16, 2)])
def test_block_projects_the_shortcut_when_stride_or_channels_change(in_channels, out_channels, stride):
    block = BasicBlock(in_channels, out_channels, stride=stride)
    assert isinstance(block.downsample, nn.Sequential)
    projection, bn = list(block.downsample)
    assert isinstance(projection, models.Projection) and isinstance(bn, nn.BatchNorm2d)
    assert projection.stride == stride and projection.weight.shape == (out_channels, in_channels, 1, 1)
    assert bn.num_features == out_channels
    side = 16 // stride
    assert block(images(2, in_channels, 16)).shape == (2, out_channels, side, side)


def test_strided_block_halves_the_resolution():
    assert BasicBlock(4, 8, stride=2).eval()(images(3, 4, 32)).shape == (3, 8, 16, 16)


@pytest.mark.parametrize("in_channels,out_channels,stride", [(8, 8, 1), (8, 16, 2)], ids=["identity", "projection"])
def test_block_with_zeroed_branch_returns_relu_of_the_shortcut(in_channels, out_channels, stride):
    block = BasicBlock(in_channels, out_channels, stride=stride, dropout=0.5)
    randomize_batch_norm(block)
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
    block.eval()
    x = images(4, in_channels, 16)
    with torch.no_grad():
        shortcut = x if block.downsample is None else block.downsample(x)
        out = block(x)
    assert torch.equal(out, torch.relu(shortcut))
    assert (out >= 0).all()


def test_block_with_live_branch_differs_from_its_shortcut():
    """The control for the test above: the residual branch does contribute when not zeroed."""
    block = BasicBlock(8, 8).eval()
    randomize_batch_norm(block)
    x = images(2, 8, 16)
    with torch.no_grad():
        assert not torch.allclose(block(x), torch.relu(x))


def test_fresh_resnet_blocks_start_as_the_identity():
    """bn2 starts at zero (Goyal et al.), so each new block returns ReLU(shortcut(x))."""
    model = ResNet(4, [1, 1]).eval()
    for stage in model.stages:
        for block in stage:
            assert torch.count_nonzero(block.bn2.weight) == 0
            x = images(2, block.conv1.in_channels, 8)
            with torch.no_grad():
                shortcut = x if block.downsample is None else block.downsample(x)
                assert torch.equal(block(x), torch.relu(shortcut))


def test_a_resnet9_block_adds_the_rectified_branch_to_the_shortcut():
    block = BasicBlock(8, 8, relu_in_branch=True).eval()
    randomize_batch_norm(block)
    x = images(2, 8, 8)
    with torch.no_grad():
        branch = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        out = block(x)
    assert torch.allclose(out, x + torch.relu(branch), atol=1e-6)
    assert (out < 0).any(), "the sum is not rectified: negative inputs pass the shortcut"


def test_fresh_resnet9_blocks_start_live_and_train_their_branch():
    """Zero-initialized scales would leave ReLU(0) in the branch, which passes no gradient at all."""
    model = ResNet(4, [1, 0, 1], downsample="pool", block="resnet9").train()
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 2 and all(torch.equal(b.bn2.weight, torch.ones_like(b.bn2.weight)) for b in blocks)
    model(images(4)).sum().backward()
    assert all(b.conv1.weight.grad.abs().sum() > 0 and b.conv2.weight.grad.abs().sum() > 0 for b in blocks)


def test_kaiming_init_has_no_identity_filters():
    model = ResNet(4, [1, 0, 1], downsample="pool")
    stem = model.stem[0]
    x = images(2, 3, 8)
    with torch.no_grad():
        assert not torch.allclose(stem(x)[:, :3], x, atol=1e-2)


def test_torch_init_keeps_pytorch_s_smaller_conv_weights():
    torch.manual_seed(0)
    he = ResNet(16, [1, 0, 1], downsample="pool", block="resnet9")
    torch.manual_seed(0)
    default = ResNet(16, [1, 0, 1], downsample="pool", block="resnet9", conv_init="torch")
    conv = default.stages[0][4].conv1  # a 3x3 conv in a residual block: 32 -> 32 channels
    bound = 1 / math.sqrt(conv.in_channels * 9)
    assert conv.weight.abs().max() <= bound, "PyTorch's kaiming-uniform bound, 1/sqrt(fan_in)"
    he_std = he.stages[0][4].conv1.weight.std().item()
    assert he_std == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.1)
    assert conv.weight.std().item() < he_std / 2


# --- dropout -----------------------------------------------------------

def test_dropout_sits_in_every_residual_branch_only_when_dropout_is_positive():
    model = ResNet(4, [2, 1, 1], dropout=0.3)
    assert all(isinstance(m, BasicBlock) for stage in model.stages for m in stage)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 4 and all(m.p == 0.3 for m in dropouts)

    plain = ResNet(4, [2, 1, 1], dropout=0.0)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())


def test_dropout_spares_the_shortcut():
    # With the whole branch dropped, a block passes its input through the identity shortcut (then the
    # ReLU): dropout regularizes the branch, never the signal that the skip connection carries.
    block = BasicBlock(4, 4, dropout=1.0).train()
    x = torch.randn(8, 4, 6, 6)
    assert torch.equal(block(x), torch.relu(x))
    assert not torch.equal(block.eval()(x), torch.relu(x))  # eval mode: the branch is back


# --- saving and loading ---------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    ResNetModelConfig(width=4, blocks=[1, 1], dropout=0.2, head_dropout=0.1),
    BaselineModelConfig(widths=[4, 8], hidden=16),
], ids=["resnet", "baseline"])
def test_save_load_round_trip_gives_the_same_outputs(tmp_path, config):
    model = models.build_model(config)
    model.train()
    with torch.no_grad():
        model(images(16))  # moves the batch-norm running statistics off their initial values
    model.eval()
    x = images(6)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "model.pt"
    models.save(path, config, model.state_dict(), fingerprint="abc", selected_epoch=3)

    loaded, saved = models.load(path, config, "train_resnet")
    assert not loaded.training
    assert saved["fingerprint"] == "abc" and saved["selected_epoch"] == 3
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_load_with_another_config_raises_naming_the_file(tmp_path):
    config = ResNetModelConfig(width=4, blocks=[1, 1])
    path = tmp_path / "model.pt"
    models.save(path, config, models.build_model(config).state_dict())
    with pytest.raises(ModelFileError, match="retrain") as info:
        models.load(path, ResNetModelConfig(width=8, blocks=[1, 1]), "train_resnet")
    assert str(path) in str(info.value)
    assert "train_resnet" in str(info.value)


def test_a_model_saved_before_a_config_field_existed_loads_when_params_keep_its_default(tmp_path):
    config = ResNetModelConfig(width=4, blocks=[1, 0, 1], downsample="pool")
    model = models.build_model(config).eval()
    path = tmp_path / "model.pt"
    older = {k: v for k, v in config.model_dump(mode="json").items() if k != "block"}  # as saved before `block`
    torch.save({"config": older, "state_dict": model.state_dict()}, path)
    loaded, _ = models.load(path, config, "train_resnet")
    x = images(2)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(ModelFileError, match="retrain"):
        models.load(path, config.model_copy(update={"block": "resnet9"}), "train_resnet")


def test_load_of_a_missing_file_raises_naming_the_file(tmp_path):
    path = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(ModelFileError, match="not found") as info:
        models.load(path, BaselineModelConfig(widths=[4, 8], hidden=16), "train_baseline")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("stride", [1, 2])
def test_projection_equals_a_strided_1x1_convolution(stride):
    projection = models.Projection(4, 8, stride)
    nn.init.normal_(projection.weight)
    conv = nn.Conv2d(4, 8, 1, stride=stride, bias=False)
    conv.weight.data.copy_(projection.weight.data)
    x = images(13, 4, 9).contiguous(memory_format=torch.channels_last)  # 13 images: the batch oneDNN's kernel hung on
    torch.testing.assert_close(projection(x), conv(x))
    projection(x).sum().backward()
    assert projection.weight.grad.shape == (8, 4, 1, 1)

