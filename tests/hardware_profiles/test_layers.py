"""layer_costs on small models with hand-computed MACs and bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles import LayerCost, OpType, layer_costs


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),                       # 0
        nn.BatchNorm2d(8),                                   # 1
        nn.ReLU(),                                           # 2
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),  # 3
        nn.Dropout(0.1),                                     # 4, free
        nn.Flatten(),                                        # 5, free
        nn.Linear(16 * 8 * 8, 10),                           # 6
    )


def test_macs_match_hand_computation_at_batch_two():
    costs = {c.name: c for c in layer_costs(_tiny(), torch.randn(2, 3, 16, 16))}
    assert list(costs) == ["0", "1", "2", "3", "6"]
    # conv: output elements * in_channels/groups * kh * kw
    assert costs["0"].macs == (2 * 8 * 16 * 16) * 3 * 3 * 3 == 110_592
    assert costs["3"].macs == (2 * 16 * 8 * 8) * (8 // 2) * 3 * 3 == 73_728
    # linear: output elements * in_features
    assert costs["6"].macs == (2 * 10) * 1024 == 20_480
    # normalisation and activation: no MACs, one operation per output element
    assert costs["1"].macs == costs["2"].macs == 0
    assert costs["1"].ops == costs["2"].ops == 2 * 8 * 16 * 16
    assert costs["0"].ops == costs["3"].ops == costs["6"].ops == 0
    assert [costs[n].op for n in ("0", "1", "2", "3", "6")] == [
        OpType.CONV, OpType.ELEMENTWISE, OpType.ELEMENTWISE, OpType.DWCONV, OpType.LINEAR]
    assert costs["0"].in_channels == 3 and costs["3"].in_channels == 8


def test_params_and_bytes_at_default_32_bits():
    costs = {c.name: c for c in layer_costs(_tiny(), torch.randn(1, 3, 16, 16))}
    conv = costs["0"]
    assert conv.params == 8 * 3 * 3 * 3 + 8 == 224
    assert (conv.weight_bits, conv.act_bits) == (32, 32)
    assert conv.weight_bytes == 224 * 4
    assert conv.act_bytes == (3 * 16 * 16 + 8 * 16 * 16) * 4
    assert costs["2"].params == 0 and costs["2"].weight_bytes == 0


def test_bit_width_attributes_pack_weights_and_activations():
    model = _tiny()
    model[0].weight_bits = 4
    model[0].act_bits = 8
    conv = layer_costs(model, torch.randn(1, 3, 16, 16))[0]
    assert (conv.weight_bits, conv.act_bits) == (4, 8)
    # 216 weights at 4 bits + 8 biases kept at 32 bits
    assert conv.weight_bytes == 216 * 4 // 8 + 8 * 4 == 140
    assert conv.act_bytes == 3 * 16 * 16 + 8 * 16 * 16


def test_bad_bit_width_names_the_layer():
    model = _tiny()
    model[3].weight_bits = 0
    with pytest.raises(ConfigError, match=r"layer '3': weight_bits must be an int in \[1, 32\]"):
        layer_costs(model, torch.randn(1, 3, 16, 16))


def test_sparsity_is_measured_and_pattern_read_from_the_module():
    model = _tiny()
    with torch.no_grad():
        model[6].weight.view(-1, 4)[:, :2] = 0.0
    model[6].sparsity_pattern = "2:4"
    linear = layer_costs(model, torch.randn(1, 3, 16, 16))[-1]
    assert linear.sparsity == pytest.approx(0.5)
    assert linear.sparsity_pattern == "2:4"
    model[6].sparsity_pattern = "2-4"
    with pytest.raises(ConfigError, match="layer '6'"):
        layer_costs(model, torch.randn(1, 3, 16, 16))


def test_forward_runs_in_eval_mode_and_restores_flags():
    model = _tiny().train()
    model[2].eval()
    before = model[1].running_mean.clone()
    layer_costs(model, torch.randn(4, 3, 16, 16))
    assert torch.equal(model[1].running_mean, before)
    assert model.training and model[1].training and not model[2].training


def test_shared_module_is_one_entry_with_summed_work():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return self.fc(self.fc(x))

    (cost,) = layer_costs(Twice(), torch.randn(3, 6))
    assert cost.name == "fc"
    assert cost.macs == 2 * (3 * 6) * 6
    assert cost.params == 42


def test_tuple_input_and_transposed_conv():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)

        def forward(self, a, b):
            return self.up(a + b)

    x = torch.randn(1, 4, 5, 5)
    add, cost = layer_costs(Two(), (x, x))
    assert (add.name, add.op, add.ops, add.macs) == ("add", OpType.ELEMENTWISE, 100, 0)
    assert cost.op is OpType.CONV
    # transposed conv: input elements * out_channels/groups * kh * kw
    assert cost.macs == (4 * 5 * 5) * 2 * 2 * 2


def test_layer_cost_round_trips_and_validates():
    cost = layer_costs(_tiny(), torch.randn(1, 3, 16, 16))[0]
    assert LayerCost.from_dict(cost.to_dict()) == cost
    with pytest.raises(ConfigError, match=r"op must be one of \['conv', 'conv1x1', 'dwconv', 'linear', "):
        LayerCost("x", "pooling", 1, 1, 32, 32, 4, 4)
    with pytest.raises(ConfigError, match="sparsity must be a number in"):
        LayerCost("x", "conv", 1, 1, 32, 32, 4, 4, sparsity=1.5)


def test_pooling_and_pointwise_convs_have_their_own_types():
    model = nn.Sequential(nn.Conv2d(4, 6, 1), nn.AvgPool2d(3, stride=1, padding=1), nn.MaxPool2d(2),
                          nn.AdaptiveAvgPool2d(1))
    pw, avg, pool, gap = layer_costs(model, torch.randn(1, 4, 8, 8))
    assert (pw.op, pw.macs) == (OpType.CONV1X1, 6 * 8 * 8 * 4)
    # pooling: one operation per window element per output, and the channels it spans
    assert (avg.op, avg.macs, avg.ops, avg.in_channels) == (OpType.POOL, 0, 6 * 8 * 8 * 9, 6)
    assert pool.ops == 6 * 4 * 4 * 4
    assert gap.ops == 6 * 16


def test_functions_outside_modules_are_costed_once_per_call_and_named_by_their_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            y = torch.relu(self.fc(x)) + x  # relu and add are graph nodes outside any module
            scores = (y @ y.transpose(-1, -2)).softmax(-1)
            return torch.cat([scores @ y, y.flatten(1).view_as(y)], -1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x) * 2

    costs = layer_costs(Net(), torch.randn(2, 5, 8))
    assert [c.name for c in costs] == ["block.fc", "block.relu", "block.add", "block.matmul", "block.softmax",
                                       "block.matmul_1", "block.cat", "mul"]
    by_name = {c.name: c for c in costs}
    assert by_name["block.matmul"].op is OpType.MATMUL
    assert by_name["block.matmul"].macs == 2 * 5 * 5 * 8  # (5 x 8) @ (8 x 5) per batch item
    assert by_name["block.matmul_1"].macs == 2 * 5 * 8 * 5
    assert by_name["block.add"].op is OpType.ELEMENTWISE and by_name["block.add"].ops == 2 * 5 * 8
    assert by_name["block.cat"].op is OpType.OTHER and by_name["block.cat"].ops == 0
    assert by_name["block.cat"].act_bytes == (2 * 5 * 8 * 2) * 2 * 4  # in and out, fp32
    # functions inside a costed module (Linear's own matmul) are that module's work
    assert by_name["block.fc"].macs == 2 * 5 * 8 * 8
    # the MAC total counts convolutions, linear layers and matrix products only
    assert sum(c.macs for c in costs) == 2 * 5 * 8 * 8 + 2 * 5 * 5 * 8 * 2


def test_functions_take_the_act_bits_of_their_module():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + x

    model = Res()
    model.act_bits = 8
    add = layer_costs(model, torch.randn(1, 2, 4, 4))[-1]
    assert add.act_bits == 8 and add.act_bytes == 3 * 32
