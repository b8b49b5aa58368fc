"""Packing integer codes into real bytes and the packed size of quantized models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from slimsearch.evaluators.pack import pack_codes, packed_size, packed_state, unpack_codes
from slimsearch.evaluators.quantize import calibrate, freeze, quantize_layers, quantize_weight_int
from slimsearch.spaces import CompressionPlan, LayerPlan


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("count", [1, 7, 1001])
def test_pack_unpack_round_trips_bit_exactly(bits, count):
    qmax = 2 ** (bits - 1) - 1
    rng = np.random.default_rng(bits * 1000 + count)
    codes = rng.integers(-qmax, qmax + 1, size=count).astype(np.int32)
    codes[0] = -qmax
    codes[-1] = qmax if count > 1 else codes[-1]
    data = pack_codes(codes, bits)
    assert isinstance(data, bytes)
    assert len(data) == math.ceil(count * bits / 8)
    back = unpack_codes(data, bits, count)
    assert back.dtype == np.int32
    assert np.array_equal(back, codes)


def test_multidimensional_codes_come_back_flat_in_order():
    codes = np.arange(-7, 8, dtype=np.int32)[:12].reshape(3, 4)
    assert np.array_equal(unpack_codes(pack_codes(codes, 4), 4, 12), codes.ravel())


def test_four_bit_codes_take_half_the_bytes_of_eight_bit_codes():
    codes = np.random.default_rng(0).integers(-7, 8, size=1000)
    assert len(pack_codes(codes, 4)) == 500
    assert len(pack_codes(codes, 8)) == 1000
    assert len(pack_codes(np.clip(codes, -1, 1), 2)) == 250


def _linear(weight_bits: int, act_bits: int = 32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16))
    if weight_bits < 32 or act_bits < 32:
        model = quantize_layers(model, CompressionPlan(layers={"0": LayerPlan(weight_bits=weight_bits,
                                                                              act_bits=act_bits)}))
        calibrate(model, [torch.randn(8, 64)])
    return freeze(model)


def test_packed_size_counts_real_bytes():
    # float32: (64 * 16 weights + 16 biases) * 4 bytes
    assert packed_size(_linear(32)) == (64 * 16 + 16) * 4 == 4160
    # codes + one float32 scale per output channel + float32 biases
    assert packed_size(_linear(8)) == 64 * 16 + 16 * 4 + 16 * 4 == 1152
    assert packed_size(_linear(4)) == 64 * 16 // 2 + 16 * 4 + 16 * 4 == 640
    # 8-bit activations add their scale and zero point
    assert packed_size(_linear(4, act_bits=8)) == 640 + 8


def test_model_with_4_bit_layers_is_smaller_than_with_8_bit():
    def cnn(bits: int) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
        plan = CompressionPlan(layers={"0": LayerPlan(weight_bits=bits), "3": LayerPlan(weight_bits=bits)})
        model = quantize_layers(model, plan)
        calibrate(model, [torch.randn(4, 3, 8, 8)])
        return freeze(model)

    sizes = {bits: packed_size(cnn(bits)) for bits in (2, 4, 8)}
    assert sizes[2] < sizes[4] < sizes[8]
    weights = 16 * 3 * 9 + 10 * 16 * 36
    assert sizes[8] - sizes[4] == weights // 2  # only the codes shrink; scales and biases stay


def test_packed_state_holds_the_frozen_weights_exactly():
    model = _linear(3)
    state = packed_state(model)
    assert set(state) == {"0.weight.codes", "0.weight.scale", "0.bias"}
    codes = unpack_codes(state["0.weight.codes"], 3, 64 * 16).reshape(16, 64)
    scale = np.frombuffer(state["0.weight.scale"], dtype=np.float32)
    expected_codes, _ = quantize_weight_int(model[0].weight.detach(), 3)
    assert np.array_equal(codes, expected_codes.numpy())
    assert np.allclose(codes * scale[:, None], model[0].weight.detach().numpy(), atol=1e-7)
    assert np.array_equal(np.frombuffer(state["0.bias"], dtype=np.float32), model[0].bias.detach().numpy())
