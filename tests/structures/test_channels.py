"""prune_channels, prunable_layers and fold_batchnorm on the digits teacher and a hand-made CNN."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from slimsearch.structures.channels import fold_batchnorm, prunable_layers, prune_channels
from slimsearch.structures.channels import ChannelStructure
from slimsearch.exceptions import ConfigError, SlimSearchError

DENSE_TYPES = (nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear,
               nn.Dropout, nn.Identity)
NORM_BUFFERS = {"running_mean", "running_var", "num_batches_tracked"}


def _cnn(*, bn: bool = True) -> nn.Sequential:
    """Conv-BN-ReLU-pool, conv (no bias)-ReLU, flatten, two linear layers: input (N, 3, 8, 8)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),                 # 0
        nn.BatchNorm2d(8) if bn else nn.Identity(),    # 1
        nn.ReLU(),                                     # 2
        nn.MaxPool2d(2),                               # 3
        nn.Conv2d(8, 16, 3, padding=1, bias=False),    # 4
        nn.ReLU(),                                     # 5
        nn.Flatten(),                                  # 6
        nn.Linear(16 * 4 * 4, 12),                     # 7
        nn.ReLU(),                                     # 8
        nn.Dropout(0.2),                               # 9
        nn.Linear(12, 5),                              # 10
    )
    if bn:  # statistics far from the identity, so folding and pruning them matters
        with torch.no_grad():
            model[1].running_mean.uniform_(-1, 1)
            model[1].running_var.uniform_(0.5, 2)
            model[1].weight.uniform_(0.5, 1.5)
            model[1].bias.uniform_(-0.5, 0.5)
    return model.eval()


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _assert_plain_dense(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert isinstance(module, DENSE_TYPES) and type(module).__module__.startswith("torch.nn"), (name, module)
        assert not parametrize.is_parametrized(module), name
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        for buffer_name, _ in module.named_buffers(recurse=False):
            assert buffer_name in NORM_BUFFERS, (name, buffer_name)
    assert not [k for k in model.state_dict() if "mask" in k or "orig" in k]


def test_prunable_layers_of_the_hand_made_cnn():
    # the last Linear feeds the model's output, so it cannot lose outputs
    assert prunable_layers(_cnn(), _x()) == ["0", "4", "7"]


def test_pruning_the_hand_made_cnn_removes_channels_for_real():
    model = _cnn()
    before = copy.deepcopy(model.state_dict())
    pruned = prune_channels(model, _x(1), 0.5)
    # conv 8 -> 4 (and its BatchNorm), conv 16 -> 8, linear 12 -> 6; inputs follow
    assert (pruned[0].out_channels, pruned[1].num_features, pruned[1].running_mean.shape[0]) == (4, 4, 4)
    assert (pruned[4].in_channels, pruned[4].out_channels) == (4, 8)
    assert (pruned[7].in_features, pruned[7].out_features) == (8 * 4 * 4, 6)
    assert (pruned[10].in_features, pruned[10].out_features) == (6, 5)
    assert _n_params(pruned) < _n_params(model)
    assert _n_params(pruned) == (4 * 3 * 9 + 4) + 2 * 4 + 8 * 4 * 9 + (6 * 128 + 6) + (5 * 6 + 5)
    assert pruned(_x()).shape == model(_x()).shape == (4, 5)
    _assert_plain_dense(pruned)
    # the model given is not changed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pruning_only_the_named_layers():
    pruned = prune_channels(_cnn(), _x(1), {"4": 0.25})
    assert (pruned[0].out_channels, pruned[4].out_channels, pruned[7].in_features, pruned[7].out_features) == (
        8, 12, 12 * 16, 12)


def test_ratio_zero_leaves_outputs_identical():
    model = _cnn()
    x = _x()
    for pruned in (prune_channels(model, x[:1], 0.0), prune_channels(model, x[:1], {"0": 0.0, "7": 0.0})):
        assert _n_params(pruned) == _n_params(model)
        assert torch.equal(pruned(x), model(x))


def test_removing_dead_channels_keeps_outputs_and_drops_those_channels():
    """Channels whose weights are all zero are the least important: removing them changes nothing."""
    model = _cnn(bn=False)
    with torch.no_grad():
        model[0].weight[[1, 5]] = 0.0
        model[0].bias[[1, 5]] = 0.0
        model[4].weight[[0, 3, 9, 14]] = 0.0  # these feed 4 blocks of 16 Linear inputs (after Flatten)
    x = _x()
    pruned = prune_channels(model, x[:1], {"0": 0.25, "4": 0.25})
    assert (pruned[0].out_channels, pruned[4].in_channels, pruned[4].out_channels, pruned[7].in_features) == (
        6, 6, 12, 12 * 16)
    assert torch.allclose(pruned(x), model(x), atol=1e-6)
    # the l1 rule keeps the live channels, in their order
    keep = [c for c in range(16) if c not in (0, 3, 9, 14)]
    cols = torch.cat([torch.arange(c * 16, (c + 1) * 16) for c in keep])
    assert torch.equal(pruned[7].weight, model[7].weight[:, cols])


def test_pruning_the_digits_teacher(digits_task):
    teacher = digits_task.teacher
    names = prunable_layers(teacher, digits_task.example_input)
    assert names == ["conv1", "conv2", "conv3", "fc1"]
    before = _n_params(teacher)
    pruned = prune_channels(teacher, digits_task.example_input, 0.5)
    assert [pruned.get_submodule(n).weight.shape[0] for n in names] == [4, 8, 8, 16]
    assert pruned.fc2.out_features == teacher.fc2.out_features == 10
    assert _n_params(pruned) < before
    assert _n_params(teacher) == before
    x = digits_task.val.x[:32]
    assert pruned(x).shape == teacher(x).shape == (32, 10)
    _assert_plain_dense(pruned)
    assert torch.equal(prune_channels(teacher, digits_task.example_input, 0.0)(x), teacher(x))


def test_bad_ratios_and_layers_are_config_errors():
    model = _cnn()
    with pytest.raises(ConfigError, match=r"cannot prune layer '10'; prunable layers: \['0', '4', '7'\]"):
        prune_channels(model, _x(1), {"10": 0.5})
    with pytest.raises(ConfigError, match=r"prune ratio of layer '0' must be in \[0, 1\), got 1.0"):
        prune_channels(model, _x(1), {"0": 1.0})
    with pytest.raises(ConfigError, match="importance must be one of"):
        prune_channels(model, _x(1), 0.5, importance="random")


def test_fold_batchnorm_preserves_outputs_of_the_hand_made_cnn():
    model = _cnn()
    folded = fold_batchnorm(model, _x(1))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert isinstance(model[1], nn.BatchNorm2d)  # the model given is not changed
    assert folded[0].bias is not None
    x = _x(16)
    assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert not torch.allclose(folded[0].weight, model[0].weight)


def test_fold_batchnorm_preserves_outputs_of_the_digits_teacher(digits_task):
    teacher = digits_task.teacher
    folded = fold_batchnorm(teacher, digits_task.example_input)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert _n_params(folded) < _n_params(teacher)  # each BN's 2C parameters become a C-long conv bias
    x = digits_task.val.x
    with torch.no_grad():
        ref, out = teacher(x), folded(x)
    assert torch.allclose(out, ref, atol=1e-4)
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_fold_batchnorm_keeps_a_depthwise_conv_with_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 6, 6)
    folded = fold_batchnorm(model, x)
    assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert folded[0].groups == 4


def test_fold_batchnorm_of_a_norm_without_affine_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    x = _x()
    folded = fold_batchnorm(model, x[:1])
    assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_fold_batchnorm_into_a_quantized_conv_before_freeze():
    """apply_plan distils with BN in place, then folds it into the quantized conv: exact for float
    weights with quantized inputs, and the folded conv then freezes onto its own grid."""
    from slimsearch.compress.quant.layers import QConv2d, freeze
    from slimsearch.compress.quant.layers import calibrate_activations as calibrate
    from slimsearch.compress.quantize import quantize_layers
    from slimsearch.spaces import CompressionPlan, LayerPlan

    model = _cnn()
    x = _x(16)
    plan = CompressionPlan(layers={"0": LayerPlan(act_bits=8)})
    quantized = quantize_layers(copy.deepcopy(model), plan)
    calibrate(quantized, [x])
    folded = fold_batchnorm(quantized, x[:1])
    assert isinstance(folded[0], QConv2d) and folded[0].act_bits == 8
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(folded(x), quantized(x), atol=1e-5)

    four_bit = quantize_layers(copy.deepcopy(model), CompressionPlan(layers={"0": LayerPlan(weight_bits=4)}))
    frozen = freeze(fold_batchnorm(four_bit, x[:1]))
    codes = frozen[0].quantized_weight()
    assert torch.equal(codes.dequantize(), frozen[0].weight)  # the folded weights are what is on the grid
    with pytest.raises(ValueError, match="fold before freeze"):
        fold_batchnorm(freeze(quantize_layers(copy.deepcopy(model), plan)), x[:1])


class Branchy(nn.Module):
    """A model whose forward branches on the data, which torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = x.relu()
        return self.head(x.flatten(1))


@pytest.mark.parametrize("call", [
    lambda m, x: prune_channels(m, x, 0.5),
    lambda m, x: prunable_layers(m, x),
    lambda m, x: fold_batchnorm(m, x),
], ids=["prune_channels", "prunable_layers", "fold_batchnorm"])
def test_untraceable_model_raises_naming_the_model_class(call):
    with pytest.raises(SlimSearchError, match=r"cannot trace Branchy with torch\.fx") as info:
        call(Branchy().eval(), _x(1))
    assert not isinstance(info.value, ConfigError)


class Conv2dSame(nn.Conv2d):
    """TensorFlow-style "same" padding done by a child ZeroPad2d, as in networks ported from TensorFlow."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, kernel_size, padding=0)
        total = kernel_size - 1
        self.pad = nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))

    def forward(self, x):
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameNet(nn.Module):
    """Stem, two 4x4 "same" convs (padded 1 before, 2 after), optionally with a residual around them."""

    def __init__(self, residual: bool):
        super().__init__()
        self.residual = residual
        self.stem = Conv2dSame(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.mid = Conv2dSame(8, 16, 4)
        self.out = Conv2dSame(16, 8, 4)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        y = self.out(torch.relu(self.mid(x)))
        if self.residual:
            y = x + y
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


DEAD_STEM, DEAD_MID, DEAD_OUT = [2, 5], [1, 3, 4, 7, 8, 10, 13, 15], [0, 6]


def _same_net(residual: bool) -> SameNet:
    """A SameNet whose channels DEAD_* carry nothing (zero rows and bias), so removing them changes nothing."""
    torch.manual_seed(0)
    model = SameNet(residual).eval()
    with torch.no_grad():
        for conv, dead in ((model.stem, DEAD_STEM), (model.mid, DEAD_MID),
                           (model.out, DEAD_STEM if residual else DEAD_OUT)):
            conv.weight[dead] = 0.0
            conv.bias[dead] = 0.0
    return model


def _kept(n: int, dead: list[int]) -> list[int]:
    return [c for c in range(n) if c not in dead]


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_a_conv_subclass_with_its_own_padding_is_pruned_in_place(residual):
    model = _same_net(residual)
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    # with the residual, stem and out are added together: one group
    assert prunable_layers(model, x[:1]) == (["stem", "mid"] if residual else ["stem", "mid", "out"])
    ratios = {"stem": 0.25, "mid": 0.5} if residual else {"stem": 0.25, "mid": 0.5, "out": 0.25}
    pruned = prune_channels(model, x[:1], ratios)

    for name in ("stem", "mid", "out"):
        layer, original = pruned.get_submodule(name), model.get_submodule(name)
        assert type(layer) is Conv2dSame, name
        assert type(layer.pad) is nn.ZeroPad2d and layer.pad.padding == original.pad.padding, name
    assert (pruned.stem.out_channels, pruned.bn.num_features, pruned.bn.running_var.shape[0]) == (6, 6, 6)
    assert (pruned.mid.in_channels, pruned.mid.out_channels) == (6, 8)
    assert (pruned.out.in_channels, pruned.out.out_channels, pruned.head.in_features) == (8, 6, 6)
    # the 4x4 convs still pad 1 before and 2 after: the spatial size stays 10x10
    assert pruned.mid(torch.zeros(1, 6, 10, 10)).shape == (1, 8, 10, 10)
    # the dead channels went, the others are the original weights
    stem_kept, mid_kept = _kept(8, DEAD_STEM), _kept(16, DEAD_MID)
    out_kept = stem_kept if residual else _kept(8, DEAD_OUT)
    assert torch.equal(pruned.mid.weight, model.mid.weight[mid_kept][:, stem_kept])
    assert torch.equal(pruned.out.weight, model.out.weight[out_kept][:, mid_kept])
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (2, 5)
        torch.testing.assert_close(pruned(x), model(x), atol=1e-6, rtol=1e-5)
    # the model given is not changed
    assert model.mid.weight.shape == (16, 8, 4, 4) and model.mid.out_channels == 16


def _drop_own_forward(real):
    """``slice_channels`` followed by what rebuilding a layer as a plain nn.Conv2d did: its forward is lost."""
    def slice_and_drop_forward(module, **kwargs) -> None:
        real(module, **kwargs)
        if isinstance(module, Conv2dSame):
            module.forward = types.MethodType(nn.Conv2d.forward, module)  # padding 0: 10x10 becomes 8x8
    return slice_and_drop_forward


@pytest.mark.parametrize("prune", [
    lambda m, x: prune_channels(m, x, 0.5),
    lambda m, x: ChannelStructure().prune(m, x, {"stem": 0.5}),
], ids=["prune_channels", "ChannelStructure"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_a_pruned_model_whose_layer_changed_its_spatial_size_is_refused(monkeypatch, residual, prune):
    from slimsearch.structures import _channel_graph

    monkeypatch.setattr(_channel_graph, "slice_channels", _drop_own_forward(_channel_graph.slice_channels))
    x = torch.randn(1, 3, 10, 10)
    with pytest.raises(SlimSearchError) as info:
        prune(_same_net(residual), x)
    message = str(info.value)
    assert not isinstance(info.value, ConfigError) and "\n" not in message
    change = "layer 'stem' (Conv2dSame) gives [1, 4, 8, 8] where it gave [1, 8, 10, 10] before pruning"
    if residual:  # the addition fails: 8x8 against 2x2
        assert message.startswith("pruning SameNet broke it: the forward of SameNet itself fails on the example "
                                  "input (RuntimeError: The size of tensor a (8) must match")
        assert message.endswith(f"; first change: {change}")
    else:  # the global pooling hides it from the output's shape: still refused
        assert message == f"pruning SameNet changed more than channel counts: {change}"


class FixedWidthConv(nn.Conv2d):
    """Reshapes its input to the channel count it was built for, as some ported layers do."""

    def forward(self, x):
        return super().forward(x.reshape(x.shape[0], 8, x.shape[2], x.shape[3]))


def test_a_pruned_model_that_fails_is_refused_naming_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), FixedWidthConv(8, 4, 3, padding=1),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    with pytest.raises(SlimSearchError, match=(
            r"^pruning Sequential broke it: layer '2' \(FixedWidthConv\) fails on the example input "
            r"\(RuntimeError: shape '\[1, 8, 8, 8\]' is invalid for input of size 256\)$")):
        prune_channels(model, _x(1), {"0": 0.5})


def test_the_check_leaves_training_flags_and_batchnorm_statistics_alone():
    model = _cnn().train()
    before = copy.deepcopy(model.state_dict())
    pruned = prune_channels(model, _x(1), 0.5)
    assert all(m.training for m in model.modules()) and all(m.training for m in pruned.modules())
    # run in train mode, the check's forward passes would have moved the running statistics
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
