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
    # other: one MAC per output element
    assert costs["1"].macs == costs["2"].macs == 2 * 8 * 16 * 16
    assert [costs[n].op for n in ("0", "1", "3", "6")] == [
        OpType.CONV, OpType.OTHER, OpType.CONV, OpType.LINEAR]


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
    (cost,) = layer_costs(Two(), (x, x))
    assert cost.op is OpType.CONV
    # transposed conv: input elements * out_channels/groups * kh * kw
    assert cost.macs == (4 * 5 * 5) * 2 * 2 * 2


def test_layer_cost_round_trips_and_validates():
    cost = layer_costs(_tiny(), torch.randn(1, 3, 16, 16))[0]
    assert LayerCost.from_dict(cost.to_dict()) == cost
    with pytest.raises(ConfigError, match=r"op must be one of \['conv', 'linear', 'other'\]"):
        LayerCost("x", "pool", 1, 1, 32, 32, 4, 4)
    with pytest.raises(ConfigError, match="sparsity must be a number in"):
        LayerCost("x", "conv", 1, 1, 32, 32, 4, 4, sparsity=1.5)
