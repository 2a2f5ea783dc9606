"""pipeline/models.py: the baseline CNN, the from-scratch ResNet, its residual blocks, saving and loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import DropBlock2d

from pipeline import models
from pipeline.config import BaselineModelConfig, ResNetModelConfig
from pipeline.models import BaselineCNN, BasicBlock, GhostBatchNorm2d, ModelFileError, ResNet


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
                                                 head_dropout=0.25, logit_scale=0.125))
    assert model.fc.in_features == 32 and isinstance(model.pool, nn.AdaptiveMaxPool2d)
    assert model.head_dropout.p == 0.25 and model.logit_scale == 0.125


def test_logit_scale_multiplies_the_classifier_outputs():
    torch.manual_seed(0)
    plain = ResNet(4, [1]).eval()
    scaled = ResNet(4, [1], logit_scale=0.125).eval()
    scaled.load_state_dict(plain.state_dict())  # a plain float, not a buffer: the weights are the same
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), plain(x) * 0.125)


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
    styled = models.build_model(ResNetModelConfig(width=4, blocks=[1, 2], block="resnet9", conv_init="dirac"))
    assert all(block.relu_in_branch for stage in styled.stages for block in stage)
    assert torch.equal(styled.stem[0].weight[:3, :, 1, 1], torch.eye(3))


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
    block = BasicBlock(in_channels, out_channels, stride=stride, drop_path=0.5)
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


def test_dirac_init_starts_every_3x3_conv_by_copying_its_input_channels():
    model = ResNet(4, [1, 0, 1], downsample="pool", conv_init="dirac")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8  # the stem, three stage openers, two convs in each of two blocks
    for conv in convs:
        x = images(2, conv.in_channels, 8)
        with torch.no_grad():
            y = conv(x)
        assert torch.allclose(y[:, :conv.in_channels], x, atol=1e-6), "the first in_channels filters pass x through"
        if conv.out_channels > conv.in_channels:
            assert not torch.allclose(y[:, conv.in_channels:], torch.zeros_like(y[:, conv.in_channels:])), \
                "the other filters keep their random init"


# --- ghost batch norm ------------------------------------------------------------------------

def test_ghost_batch_norm_normalizes_near_equal_groups_by_their_own_statistics_in_training_mode():
    ghost = GhostBatchNorm2d(3, ghost_batch_size=4).train()
    randomize_batch_norm(ghost)
    x = images(10, 3, 4) * torch.arange(1, 11.0).view(10, 1, 1, 1)  # groups with different statistics
    expected = torch.cat([F.batch_norm(group, None, None, ghost.weight, ghost.bias, training=True, eps=ghost.eps)
                          for group in (x[:4], x[4:7], x[7:])])  # 4, 3 and 3 images: no group of two
    with torch.no_grad():
        torch.testing.assert_close(ghost(x), expected)
        whole = F.batch_norm(x, None, None, ghost.weight, ghost.bias, training=True, eps=ghost.eps)
    assert not torch.allclose(expected, whole, atol=1e-3), "not the whole batch's statistics"


def test_ghost_batch_norm_moves_the_running_statistics_as_far_per_batch_as_batch_norm():
    group = images(4, 3, 4) * 3 + 1
    ghost, plain = GhostBatchNorm2d(3, ghost_batch_size=4).train(), nn.BatchNorm2d(3).train()
    ghost(torch.cat([group] * 4))  # four groups with the same statistics, one batch
    plain(group)
    torch.testing.assert_close(ghost.running_mean, plain.running_mean)
    torch.testing.assert_close(ghost.running_var, plain.running_var)
    assert int(ghost.num_batches_tracked) == 4


def test_ghost_batch_norm_in_eval_mode_is_batch_norm_with_the_same_state():
    ghost = GhostBatchNorm2d(3, ghost_batch_size=2)
    randomize_batch_norm(ghost)
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(ghost.state_dict())  # the same keys: checkpoints and saved models carry over
    x = images(6, 3, 4)
    torch.testing.assert_close(ghost.eval()(x), plain.eval()(x))


def test_a_ghost_batch_size_puts_ghost_batch_norm_everywhere_and_keeps_the_state_dict():
    ghosted = models.build_model(ResNetModelConfig(width=4, blocks=[1, 0, 1], downsample="pool", ghost_batch_size=2))
    plain = models.build_model(ResNetModelConfig(width=4, blocks=[1, 0, 1], downsample="pool"))
    norms = [m for m in ghosted.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 8 and all(isinstance(m, GhostBatchNorm2d) for m in norms)
    assert not any(isinstance(m, GhostBatchNorm2d) for m in plain.modules())
    plain.load_state_dict(ghosted.state_dict())
    ghosted.train()(images(5)).sum().backward()  # groups of 2, 2 and 1 image: still 16 values per channel


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


# --- stochastic depth and dropout -----------------------------------------------------------

@pytest.mark.parametrize("in_channels,out_channels,stride", [(4, 4, 1), (4, 8, 2)], ids=["identity", "projection"])
def test_block_in_train_mode_drops_the_branch_of_most_samples(in_channels, out_channels, stride):
    block = BasicBlock(in_channels, out_channels, stride=stride, drop_path=0.95).train()
    x = images(400, in_channels, 4)
    with torch.no_grad():
        out = block(x)
        shortcut = x if block.downsample is None else block.downsample(x)  # same batch: same batch-norm statistics
    # Close, not equal: the projection is a BLAS product, whose last bits may depend on memory alignment.
    only_shortcut = torch.isclose(out, torch.relu(shortcut), rtol=0, atol=1e-5).flatten(1).all(1)
    assert only_shortcut.float().mean().item() > 0.85
    assert not only_shortcut.all(), "some samples keep their branch"
    block.eval()
    with torch.no_grad():
        shortcut = x if block.downsample is None else block.downsample(x)
        same = torch.isclose(block(x), torch.relu(shortcut), rtol=0, atol=1e-5).flatten(1).all(1)
        assert not same.any(), "eval mode drops nothing"


def test_drop_path_grows_linearly_with_depth():
    model = ResNet(4, [2, 2], stochastic_depth=0.3)
    rates = [m.drop_path.p for m in model.modules() if isinstance(m, BasicBlock)]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert all(m.drop_path.mode == "row" for m in model.modules() if isinstance(m, BasicBlock)), "whole samples"


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
    ResNetModelConfig(width=4, blocks=[1, 1], dropout=0.2, stochastic_depth=0.1),
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
    older = {k: v for k, v in config.model_dump(mode="json").items() if k != "stem"}  # as saved before `stem`
    torch.save({"config": older, "state_dict": model.state_dict()}, path)
    loaded, _ = models.load(path, config, "train_resnet")
    x = images(2)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(ModelFileError, match="retrain"):
        models.load(path, config.model_copy(update={"stem": "whiten"}), "train_resnet")


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


# --- the patch-whitening stem ------------------------------------------------------------------

def correlated_images(n: int = 64) -> torch.Tensor:
    """Images whose channels and neighbouring pixels are strongly correlated, as natural images are."""
    base = torch.randn(n, 1, 33, 33)
    smooth = (base[..., 1:, 1:] + base[..., :-1, :-1]) / 2  # neighbouring pixels share a component
    return torch.cat([smooth, 0.8 * smooth + 0.3 * torch.randn_like(smooth), 0.3 * torch.randn_like(smooth) - smooth], 1)


def test_whitening_stem_decorrelates_the_patches_it_was_fitted_to():
    x = correlated_images()
    stem = models.PatchWhitening(3)
    stem.fit_to(x)
    half = stem.out_channels // 2
    with torch.no_grad():
        out = (stem(x) - stem.conv.bias.view(1, -1, 1, 1))[:, :half]  # one filter per eigenvector
    flat = out.permute(0, 2, 3, 1).reshape(-1, half).double()
    covariance = flat.T @ flat / len(flat)
    before = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    assert (before.T @ before / len(before) - torch.eye(12, dtype=torch.double)).abs().max() > 0.3
    # Unit variance and no correlation, up to the eps that guards the smallest directions.
    assert torch.allclose(covariance, torch.diag(torch.diagonal(covariance)), atol=1e-3)
    assert torch.diagonal(covariance).sub(1).abs().max() < 0.05
    assert torch.equal(stem.conv.weight[half:], -stem.conv.weight[:half]), "each filter with its negative"


def test_whitening_stem_is_frozen_and_feeds_the_stages_at_31_by_31():
    model = ResNet(4, [1, 0, 1], downsample="pool", stem="whiten").eval()
    whitening = model.stem[0]
    assert isinstance(whitening, models.PatchWhitening)
    assert not whitening.conv.weight.requires_grad and whitening.conv.bias.requires_grad
    assert all(p is not whitening.conv.weight for p in model.parameters() if p.requires_grad)
    assert tuple(model.stem(images(2)).shape[1:]) == (24, 31, 31)
    assert model(images(2)).shape == (2, models.NUM_CLASSES)


def test_fit_to_data_sets_the_whitening_stem_and_leaves_other_models_alone():
    whitened = models.build_model(ResNetModelConfig(width=4, blocks=[1], downsample="pool", stem="whiten"))
    plain = models.build_model(ResNetModelConfig(width=4, blocks=[1]))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    stem_before = whitened.stem[0].conv.weight.clone()
    x = correlated_images(16)
    models.fit_to_data(whitened, x)
    models.fit_to_data(plain, x)
    assert not torch.equal(whitened.stem[0].conv.weight, stem_before)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_drop_block_drops_squares_of_the_feature_maps_in_training_only():
    block = BasicBlock(8, 8, dropout=0.2, drop_block_size=3)
    assert isinstance(block.dropout, DropBlock2d)
    features = torch.ones(16, 8, 12, 12)
    torch.manual_seed(0)
    dropped = block.dropout.train()(features) == 0
    assert 0.05 < dropped.float().mean() < 0.3
    # Every dropped unit lies in a 3x3 square of dropped units.
    squares = F.max_pool2d((~dropped).float(), 3, stride=1) == 0  # 3x3 windows with nothing kept
    covered = F.max_pool2d(F.pad(squares.float(), [2] * 4), 3, stride=1) > 0  # units inside such a window
    assert covered[dropped].all()
    assert torch.equal(block.dropout.eval()(features), features)
    assert isinstance(BasicBlock(8, 8, dropout=0.2).dropout, nn.Dropout), "size 0: unit by unit"


def test_the_resnet_passes_drop_block_size_to_its_blocks():
    model = models.build_model(ResNetModelConfig(width=4, blocks=[1, 1], dropout=0.1, drop_block_size=3))
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert blocks and all(isinstance(b.dropout, DropBlock2d) and b.dropout.block_size == 3 for b in blocks)


def test_a_drop_block_larger_than_a_stage_s_feature_maps_shrinks_to_fit():
    model = models.build_model(ResNetModelConfig(width=4, blocks=[1, 0, 1], downsample="pool", dropout=0.1,
                                                 drop_block_size=7))
    sizes = [m.dropout.block_size for m in model.modules() if isinstance(m, BasicBlock)]
    assert sizes == [7, 3], "16x16 maps take 7x7 blocks, 4x4 maps 3x3"
    model.train()(torch.randn(4, 3, 32, 32)).sum().backward()  # odd sizes: DropBlock accepts them
