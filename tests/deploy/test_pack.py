"""Packing codes, scales and sparse weights into real bytes, and the packed size of quantized models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from slimsearch.deploy.pack import decode_weight, encode_weight, pack_codes, packed_size, packed_state, unpack_codes
from slimsearch.compress.quant.grid import quantize_weight_int
from slimsearch.compress.quant.layers import calibrate_activations as calibrate, freeze
from slimsearch.compress.quantize import quantize_layers
from slimsearch.compress.quant.sparsity import nm_mask
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


# --------------------------------------------------------------------------- grids, groups and sparse formats


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 16])
def test_unsigned_codes_round_trip_over_the_full_range(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=333).astype(np.int32)
    codes[:2] = [0, 2**bits - 1]
    data = pack_codes(codes, bits, signed=False)
    assert len(data) == math.ceil(333 * bits / 8)
    assert np.array_equal(unpack_codes(data, bits, 333, signed=False), codes)


def _quantized_linear(bits: int, *, group_size: int = 0, symmetric: bool = True, sparsity: float = 0.0,
                      pattern: str = "unstructured", shape=(16, 64)) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(shape[1], shape[0]))
    plan = CompressionPlan(layers={"0": LayerPlan(weight_bits=bits, group_size=group_size, symmetric=symmetric,
                                                  sparsity=sparsity, sparsity_pattern=pattern)})
    return freeze(quantize_layers(model, plan))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [0, 16], ids=["per-channel", "group16"])
def test_packed_codes_scales_and_zero_points_give_back_the_frozen_weights(bits, symmetric, group_size):
    model = _quantized_linear(bits, group_size=group_size, symmetric=symmetric)
    layer, state = model[0], packed_state(model)
    groups = 64 // group_size if group_size else 1
    codes = unpack_codes(state["0.weight.codes"], bits, 16 * 64, signed=symmetric).reshape(16, 64)
    if group_size:
        scale_codes = np.frombuffer(state["0.weight.scale_codes"], dtype=np.uint8).reshape(16, groups)
        step = np.frombuffer(state["0.weight.scale"], dtype=np.float32)
        assert step.shape == (1,)
        scale = scale_codes.astype(np.float32) * step[0]
    else:
        assert "0.weight.scale_codes" not in state
        scale = np.frombuffer(state["0.weight.scale"], dtype=np.float32).reshape(16, 1)
    if symmetric:
        assert "0.weight.zero_point" not in state
        zero = np.zeros((16, groups), dtype=np.int32)
    else:
        zero = unpack_codes(state["0.weight.zero_point"], bits, 16 * groups, signed=False).reshape(16, groups)
    g = group_size or 64
    rebuilt = ((codes.reshape(16, groups, g) - zero[..., None]).astype(np.float32) * scale[..., None]).reshape(16, 64)
    assert np.array_equal(rebuilt, layer.weight.detach().numpy())  # bit for bit
    # and the size is exactly those pieces
    expected = (math.ceil(16 * 64 * bits / 8) + (16 * groups + 4 if group_size else 16 * 4)
                + (0 if symmetric else math.ceil(16 * groups * bits / 8)) + 16 * 4)
    assert packed_size(model) == expected


@pytest.mark.parametrize("group_size", [0, 32])
def test_four_bit_models_take_half_the_code_bytes_of_eight_bit(group_size):
    state4 = packed_state(_quantized_linear(4, group_size=group_size))
    state8 = packed_state(_quantized_linear(8, group_size=group_size))
    assert 2 * len(state4["0.weight.codes"]) == len(state8["0.weight.codes"]) == 16 * 64
    assert {k: len(v) for k, v in state4.items() if k != "0.weight.codes"} == \
           {k: len(v) for k, v in state8.items() if k != "0.weight.codes"}


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64 * 4 * 4, 10))


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_4_bit_per_group_model_takes_at_most_0_14_of_its_float32_weight_bytes(group_size, symmetric):
    plan = CompressionPlan(layers={name: LayerPlan(weight_bits=4, group_size=group_size, symmetric=symmetric)
                                   for name in ("0", "2", "5")})
    model = quantize_layers(_cnn(), plan)
    calibrate(model, [torch.randn(4, 16, 8, 8)])
    freeze(model)
    float_bytes = packed_size(_cnn())
    weights = sum(m.weight.numel() for m in model if hasattr(m, "weight"))
    assert float_bytes == 4 * sum(p.numel() for p in _cnn().parameters())
    state = packed_state(model)
    weight_bytes = sum(len(v) for k, v in state.items() if ".weight" in k)  # codes, scales, zero points
    assert weight_bytes <= 0.14 * 4 * weights
    assert packed_size(model) <= 0.14 * float_bytes  # biases included


def _sparse_codes(rng, shape, bits, density, *, signed=True):
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    zero = 0 if signed else rng.integers(lo, hi + 1, size=(shape[0],) + (1,) * (len(shape) - 1))
    codes = rng.integers(lo, hi + 1, size=shape)
    return np.where(rng.random(shape) < density, codes, zero).astype(np.int32), np.broadcast_to(zero, shape)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.95])
def test_encode_decode_round_trips_in_whatever_format_is_smallest(bits, signed, density):
    rng = np.random.default_rng(bits)
    codes, zero = _sparse_codes(rng, (12, 40), bits, density, signed=signed)
    parts = encode_weight(codes, zero, bits, signed=signed)
    nnz = int((codes != zero).sum())
    dense, bitmask = math.ceil(480 * bits / 8), 60 + math.ceil(nnz * bits / 8)
    assert sum(len(v) for v in parts.values()) == min(dense, bitmask)
    assert set(parts) == ({"mask", "values"} if bitmask < dense else {"codes"})
    back = decode_weight(parts, codes.shape, zero, bits, signed=signed)
    assert back.dtype == np.int32 and np.array_equal(back, codes)


@pytest.mark.parametrize("shape", [(8, 24), (6, 8, 3, 3), (4, 10, 1, 1)], ids=["linear", "conv", "conv-odd"])
@pytest.mark.parametrize("bits", [4, 8])
def test_2_4_format_stores_two_positions_and_two_codes_per_group_of_four(shape, bits):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    mask = nm_mask(weight)
    codes = torch.randint(1, 2 ** (bits - 1), shape, generator=torch.Generator().manual_seed(1)) * mask
    codes = codes.numpy().astype(np.int32)
    parts = encode_weight(codes, np.zeros((), np.int32), bits, nm=True)
    assert set(parts) == {"index", "values"}
    kept = shape[0] * math.ceil(math.prod(shape[1:]) / 4) * 2
    assert len(parts["index"]) == math.ceil(kept * 2 / 8) and len(parts["values"]) == math.ceil(kept * bits / 8)
    back = decode_weight(parts, shape, np.zeros((), np.int32), bits)
    assert np.array_equal(back, codes)


def test_a_weight_that_is_not_2_4_falls_back_to_the_bitmask():
    codes = np.zeros((4, 8), dtype=np.int32)
    codes[0, :3] = 5  # three nonzeros in one group of four
    parts = encode_weight(codes, np.zeros((), np.int32), 8, nm=True)
    assert set(parts) == {"mask", "values"}
    assert np.array_equal(decode_weight(parts, codes.shape, np.zeros((), np.int32), 8), codes)


def test_sparsity_shrinks_bytes_only_through_a_sparse_format():
    dense = packed_size(_quantized_linear(8))
    # 50% unstructured at 8 bits: a bitmask (1 bit each) plus the nonzero codes
    half = _quantized_linear(8, sparsity=0.5)
    nnz = int((half[0].weight != 0).sum())
    assert set(packed_state(half)) == {"0.weight.mask", "0.weight.values", "0.weight.scale", "0.bias"}
    assert packed_size(half) == dense - 1024 + 1024 // 8 + nnz
    # 10% at 4 bits: the bitmask would cost more than it saves, so the codes stay dense and the size with them
    assert "0.weight.codes" in packed_state(_quantized_linear(4, sparsity=0.1))
    assert packed_size(_quantized_linear(4, sparsity=0.1)) == packed_size(_quantized_linear(4))
    # 2:4 at 8 bits: per group of four, two 2-bit positions and two codes: 20 bits instead of 32
    nm = _quantized_linear(8, sparsity=0.5, pattern="2:4")
    state = packed_state(nm)
    assert {"0.weight.index", "0.weight.values"} <= set(state)
    assert packed_size(nm) == dense - 1024 + 1024 * 20 // 32
    # a float layer's sparse weight: bitmask + float32 values
    float_sparse = _quantized_linear(32, sparsity=0.75)
    nnz = int((float_sparse[0].weight != 0).sum())
    assert packed_size(float_sparse) == 1024 // 8 + 4 * nnz + 16 * 4


def test_non_quantized_modules_count_their_buffers_too():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    state = packed_state(model)
    assert set(state) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                          "1.num_batches_tracked"}
    assert packed_size(model) == (8 * 27 + 8 + 8 * 4) * 4 + 8
