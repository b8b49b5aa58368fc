"""deploy/onnx_w8a8.py: the deployed W8A8 graph computes what the PyTorch SmoothQuant model scored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime_genai")

from slimsearch.compress.quant.grid import quantize_weight  # noqa: E402
from slimsearch.compress.smoothquant import SmoothQuantConfig, smoothquant  # noqa: E402
from slimsearch.deploy import onnx_nbits, onnx_w8a8  # noqa: E402
from slimsearch.deploy.llm_timing import onnx_logits  # noqa: E402
from slimsearch.deploy.onnx_nbits import build_onnx  # noqa: E402
from slimsearch.deploy.onnx_w8a8 import to_w8a8  # noqa: E402
from slimsearch.exceptions import ConfigError  # noqa: E402
from tests._tiny_llm import one_thread, tokenizer  # noqa: E402, F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128  # not the hidden size: the builder wires a square tied lm_head to the wrong input
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 20))
LINEARS = 2 * 5  # qkv (fused), o, gate, up, down in each of 2 blocks
QUANTIZERS = 2 * 4  # one per distinct input: qkv, o, gate and up (shared), down


def _llama():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


def _logits(model):
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()


@pytest.fixture(scope="module")
def smoothed(tmp_path_factory):
    """A tiny Llama after SmoothQuant (hooks on), its W8A8 codes, and its builder float graph."""
    root = tmp_path_factory.mktemp("w8a8")
    model = _llama()
    calib = torch.from_numpy(np.random.default_rng(1).integers(0, VOCAB, (4, 32)))
    w8a8 = smoothquant(model, SmoothQuantConfig(alpha=0.5), calib)
    model.save_pretrained(root / "hf")
    tokenizer().save_pretrained(root / "hf")
    build_onnx(root / "hf", root / "float", threads=1)
    return model, w8a8.weights, root


def _gap(path, reference):
    return float(np.abs(onnx_logits(path, IDS) - reference).max())


def test_per_token_graph_computes_the_scored_model(smoothed, tmp_path):
    model, weights, root = smoothed
    reference = _logits(model)
    ours = to_w8a8(root / "float", tmp_path / "ours", weights=weights)
    fitted = to_w8a8(root / "float", tmp_path / "fitted")
    per_tensor = to_w8a8(root / "float", tmp_path / "per_tensor", per_token=False)
    scale = float(np.abs(reference).max())
    gap = _gap(ours.path, reference)
    assert gap < 1e-4 * scale
    # codes fitted from the de-quantized weights are smoothquant's own
    np.testing.assert_array_equal(onnx_logits(fitted.path, IDS), onnx_logits(ours.path, IDS))
    assert _gap(per_tensor.path, reference) > 100 * gap  # per tensor: 7e-3 here, per token 3e-7


def test_one_integer_matmul_per_linear_and_one_quantizer_per_input(smoothed, tmp_path):
    import onnx

    _, weights, root = smoothed
    report = to_w8a8(root / "float", tmp_path / "a", weights=weights)
    assert (report.integer_matmuls, report.dynamic_quantizers, report.per_token) == (LINEARS, QUANTIZERS, True)
    assert report.left_float == ("/lm_head/MatMul",)
    nodes = onnx.load(str(report.path / "model.onnx"), load_external_data=False).graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("MatMulIntegerToFloat") == LINEARS and ops.count("ReduceMax") == QUANTIZERS
    assert ops.count("MatMul") == 1 and "DynamicQuantizeLinear" not in ops
    head = to_w8a8(root / "float", tmp_path / "b", lm_head=True)
    assert (head.integer_matmuls, head.dynamic_quantizers, head.left_float) == (LINEARS + 1, QUANTIZERS + 1, ())
    old = to_w8a8(root / "float", tmp_path / "c", per_token=False)
    assert (old.integer_matmuls, old.per_token, old.left_float) == (LINEARS, False, ("/lm_head/MatMul",))


def test_linears_missing_from_weights_stay_float(smoothed, tmp_path):
    _, weights, root = smoothed
    some = {p: qw for p, qw in weights.items() if not p.endswith("down_proj")}
    report = to_w8a8(root / "float", tmp_path / "a", weights=some)
    assert report.integer_matmuls == LINEARS - 2
    assert sorted(report.left_float) == ["/lm_head/MatMul", "/model/layers.0/mlp/down_proj/MatMul",
                                         "/model/layers.1/mlp/down_proj/MatMul"]


def test_bad_input_is_one_line(smoothed, tmp_path):
    _, weights, root = smoothed
    path = "model.layers.0.mlp.down_proj"
    four_bit = dict(weights, **{path: quantize_weight(weights[path].dequantize(), 4)})
    other = dict(weights, **{path: quantize_weight(torch.randn_like(weights[path].dequantize()), 8)})
    cases = [
        (dict(weights=four_bit), "must be 8-bit, per channel"),
        (dict(weights=other), "differs from the de-quantized codes"),
        (dict(weights=dict(weights, **{"model.layers.7.mlp.up_proj": weights[path]})), "not found in"),
        (dict(weights=weights, per_token=False), "weights need per_token=True"),
        (dict(per_token="yes"), "per_token must be true or false"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            to_w8a8(root / "float", tmp_path / "x", **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="has no model.onnx"):
        to_w8a8(root / "hf", tmp_path / "y")
    with pytest.raises(ConfigError, match="not empty"):
        to_w8a8(root / "float", root / "float")
    assert not (tmp_path / "x").exists()


def test_the_old_path_forwards_with_a_warning():
    with pytest.warns(DeprecationWarning, match="moved to slimsearch.deploy.onnx_w8a8"):
        assert onnx_nbits.to_w8a8 is onnx_w8a8.to_w8a8
