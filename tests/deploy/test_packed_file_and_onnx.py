"""Deployable forms: the packed file reloads bit-exactly; W8A8 models become int8 ONNX graphs."""

from __future__ import annotations

import copy
import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

from slimsearch.structures.channels import fold_batchnorm, prune_channels
from slimsearch.deploy.onnx_int8 import deployable_onnx_bytes, onnx_qdq_bytes, qdq_blockers
from slimsearch.deploy.packed_file import MAGIC, load_packed, read_packed, save_packed
from slimsearch.deploy.onnx_graph import onnx_bytes, ort_optimized_ops, ort_predict, ort_session
from slimsearch.deploy.pack import packed_size
from slimsearch.compress.quant.layers import build_layer, calibrate_activations as calibrate, freeze, quant_layers
from slimsearch.compress.quantize import quantize_layers
from slimsearch.exceptions import ConfigError
from slimsearch.spaces import CompressionPlan, LayerPlan


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 20), nn.ReLU(),
                         nn.Linear(20, 5))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [0, 8], ids=["per-channel", "group8"])
def test_packed_file_reloads_the_frozen_model_bit_exactly(tmp_path, bits, symmetric, group_size):
    plan = CompressionPlan(layers={name: LayerPlan(weight_bits=bits, act_bits=8, group_size=group_size,
                                                   symmetric=symmetric) for name in ("0", "3", "5")})
    model = quantize_layers(_mlp(), plan)
    calibrate(model, [torch.randn(16, 3, 6, 6)])
    freeze(model)
    path = tmp_path / "model.slim"
    written = save_packed(model, path)
    assert written == path.stat().st_size
    loaded = load_packed(path, _mlp())
    _assert_same_state(model, loaded)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    x = torch.randn(7, 3, 6, 6)
    assert torch.equal(loaded(x), model(x))
    layer = loaded[3]
    assert (layer.weight_bits, layer.group_size, layer.symmetric, layer.frozen) == (bits, group_size, symmetric, True)


def test_file_is_a_json_header_and_the_packed_bytes_no_pickle(tmp_path):
    model = freeze(quantize_layers(_mlp(), CompressionPlan(layers={"3": LayerPlan(weight_bits=4)})))
    path = tmp_path / "model.slim"
    save_packed(model, path)
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<8sIQ", data)
    assert magic == MAGIC and version == 1
    header = json.loads(data[20 : 20 + length])  # plain JSON
    assert len(data) == 20 + length + packed_size(model)  # the payload is exactly what packed_size counts
    assert header["format"] == "slimsearch-packed"
    assert {r["name"]: r.get("quant", {}).get("weight_bits") for r in header["modules"]}["3"] == 4
    _, blobs = read_packed(path)
    assert sum(len(b) for b in blobs.values()) == packed_size(model)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """scikit-learn's 1,797 8x8 digits, standardised as the digits task feeds them."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    return (x - x.mean()) / x.std()


def _teacher() -> nn.Module:
    """The digits task's architecture (conv-BN-ReLU stages, two linear layers), untrained."""
    from slimsearch.tasks._image import small_cnn

    torch.manual_seed(0)
    model = small_cnn(1, (8, 16, 16), 32, 8)
    for bn in (model.bn1, model.bn2, model.bn3):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _compress(plan: CompressionPlan, x: torch.Tensor) -> nn.Module:
    """What ``apply_plan`` does, without distillation: prune, fold BN, quantize, calibrate, freeze."""
    ratios = {name: lp.prune_ratio for name, lp in plan.layers.items() if lp.prune_ratio > 0}
    model = _teacher()
    model = prune_channels(model, x[:1], ratios) if ratios else model
    model = quantize_layers(fold_batchnorm(model, x[:1]), plan)
    calibrate(model, [x[:256], x[256:512]], method=plan.act_calibration)
    return freeze(model)


def test_compressed_model_reloads_from_the_uncompressed_architecture(digits, tmp_path):
    plan = CompressionPlan(layers={
        "conv1": LayerPlan(weight_bits=8, act_bits=8),
        "conv2": LayerPlan(prune_ratio=0.5, weight_bits=4, act_bits=8, group_size=16, symmetric=False,
                           sparsity=0.5, sparsity_pattern="2:4"),
        "conv3": LayerPlan(weight_bits=3, sparsity=0.6),
        "fc1": LayerPlan(prune_ratio=0.25, act_bits=8, sparsity=0.7),  # float weights, sparse
        "fc2": LayerPlan(weight_bits=6, act_bits=8, group_size=8),
    }, act_calibration="percentile")
    model = _compress(plan, digits)
    path = tmp_path / "digits.slim"
    save_packed(model, path)
    _, blobs = read_packed(path)
    assert {"conv2.weight.index", "conv3.weight.mask", "fc1.weight.mask"} <= set(blobs)  # sparse formats in use
    # the architecture has the full widths and BatchNorms; the file says what changed
    teacher = _teacher()
    loaded = load_packed(path, teacher)
    _assert_same_state(model, loaded)
    assert loaded.conv2.out_channels == 8 and loaded.fc1.out_features == 24
    assert isinstance(loaded.bn1, nn.Identity)
    assert torch.equal(loaded(digits), model(digits))
    _assert_same_state(teacher, _teacher())  # the template is not changed


def test_save_and_load_refuse_what_they_cannot_do_faithfully(tmp_path):
    model = quantize_layers(_mlp(), CompressionPlan(layers={"3": LayerPlan(weight_bits=4)}))
    with pytest.raises(ConfigError, match=r"needs a frozen model; layers \['3'\] are not frozen"):
        save_packed(model, tmp_path / "x.slim")
    path = tmp_path / "m.slim"
    save_packed(freeze(model), path)
    with pytest.raises(ConfigError, match="module '1' is not in the template architecture"):
        load_packed(path, nn.Sequential(nn.Conv2d(3, 8, 3)))
    bogus = tmp_path / "bogus.slim"
    bogus.write_bytes(b"\x80\x04K\x01." + bytes(30))  # a pickle, not a packed file
    with pytest.raises(ConfigError, match="not a slimsearch packed file"):
        load_packed(bogus, _mlp())


def test_a_layer_replaced_by_new_modules_reloads_from_the_template(tmp_path):
    """A compressed model may put modules of its own in a layer's place (a low-rank layer's two
    factors): they are rebuilt from their records under the module that replaced the layer."""
    teacher = _mlp()
    model = copy.deepcopy(teacher)
    old = model[3]
    model[3] = nn.Sequential(nn.Linear(old.in_features, 4, bias=False), nn.Linear(4, old.out_features))
    model = freeze(quantize_layers(model, CompressionPlan(layers={"3.0": LayerPlan(weight_bits=4)})))
    save_packed(model, tmp_path / "m.slim")
    again = load_packed(tmp_path / "m.slim", teacher)
    x = torch.randn(5, 3, 6, 6)
    assert torch.equal(again(x), model(x)) and type(again[3][0]).__name__ == "QLinear"


# --------------------------------------------------------------------------- int8 ONNX


W8A8 = CompressionPlan(layers={name: LayerPlan(weight_bits=8, act_bits=8)
                               for name in ("conv1", "conv2", "conv3", "fc1", "fc2")})


@pytest.fixture(scope="module")
def w8a8_model(digits):
    return _compress(W8A8, digits)


def test_w8a8_graph_runs_integer_kernels_and_agrees_with_pytorch(digits, w8a8_model):
    graph = onnx_qdq_bytes(w8a8_model, digits[:1])
    ops = ort_optimized_ops(graph)
    assert ops.get("QLinearConv", 0) == 3 and ops.get("QGemm", 0) == 2  # every layer runs in integers
    assert not {"Conv", "FusedConv", "Gemm", "MatMul"} & set(ops)
    with torch.no_grad():
        expected = w8a8_model(digits)
    got = ort_predict(ort_session(graph, threads=1), digits)
    assert float((got.argmax(1) == expected.argmax(1)).float().mean()) >= 0.99
    assert float((got - expected).abs().max()) < 0.05 * float(expected.abs().max())


def test_int8_weights_are_the_frozen_codes(digits, w8a8_model):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(onnx_qdq_bytes(w8a8_model, digits[:1])).graph
    int8 = [numpy_helper.to_array(i) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    codes = [layer.quantized_weight().codes.numpy() for layer in quant_layers(w8a8_model)]
    weights = [a for a in int8 if a.ndim > 1 or a.any()]  # the zero points are int8 zeros
    assert len(weights) == 5
    assert all(any(w.shape == c.shape and np.array_equal(w, c) for c in codes) for w in weights)
    floats = [numpy_helper.to_array(i) for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert all(a.ndim <= 1 for a in floats)  # scales only: no float weight matrix is left


def test_int8_graph_needs_w8a8_everywhere(digits, w8a8_model):
    layers = dict(W8A8.layers, conv2=LayerPlan(weight_bits=4, act_bits=8), fc2=LayerPlan(weight_bits=8))
    mixed = _compress(CompressionPlan(layers=layers), digits)
    assert qdq_blockers(mixed) == ["conv2: weight_bits=4", "fc2: act_bits=32"]
    with pytest.raises(ConfigError, match=r"not so: conv2: weight_bits=4; fc2: act_bits=32"):
        onnx_qdq_bytes(mixed, digits[:1])
    assert qdq_blockers(_teacher()) == ["no layer is quantized"]
    # the graph to ship: int8 where possible, the float/QDQ graph otherwise
    example = digits[:1]
    assert deployable_onnx_bytes(w8a8_model, example) == onnx_qdq_bytes(w8a8_model, example)
    assert deployable_onnx_bytes(mixed, example) == onnx_bytes(mixed, example)


def test_16_bit_activations_export_as_opset_21_uint16_qdq():
    import onnx

    model = _mlp()
    for index in (0, 3):
        layer = build_layer(model[index])
        layer.load_state_dict(model[index].state_dict())
        layer._setup(8, 16)
        model[index] = layer
    x = torch.randn(64, 3, 6, 6)
    calibrate(model, [x])
    freeze(model)
    data = onnx_bytes(model, x[:1])
    graph = onnx.load_from_string(data)
    assert graph.opset_import[0].version == 21
    zero_points = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.UINT16]
    assert len(zero_points) >= 1
    assert [n.op_type for n in graph.graph.node].count("QuantizeLinear") == 2
    got = ort_predict(ort_session(data, threads=1), x)
    with torch.no_grad():
        assert torch.allclose(got, model(x), atol=1e-4)
