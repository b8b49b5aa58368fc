"""A (SmoothQuant-smoothed) decoder graph with W8A8 integer kernels that compute what PyTorch scored.

:func:`slimsearch.compress.smoothquant.smoothquant` scores int8 weights, symmetric per
output channel, times int8 activations, symmetric per token (scale ``max|x| / 127`` per
row). onnxruntime's ``quantize_dynamic`` deploys another model: it re-rounds the weights
itself and quantizes activations per *tensor* (DynamicQuantizeLinear), which on
SmolLM2-135M cost +19.5% test perplexity where the scored model lost +1.0%. So by default
:func:`to_w8a8` writes the per-token graph itself; ``per_token=False`` keeps the
``quantize_dynamic`` graph for comparison.

Each linear's MatMul becomes::

    s = max(ReduceMax(|x|, last axis), 1e-8) / 127       per row, as fake_quant_per_token
    q = QuantizeLinear(x / s, 1, zero point uint8 128)    round half to even, + 128
    y = MatMulIntegerToFloat(q, codes_int8 [K, N], 1, scale[N], a_zero_point=128) * s

MatMulIntegerToFloat (onnxruntime's contrib op) is MatMulInteger with the cast and the
per-column scale fused; its activation scale is per tensor or per column of A, never per
row, so the row scale is one Mul after it. MatMulInteger allows int8 and uint8 for both
inputs (ONNX spec) and onnxruntime 1.32 runs int8 x int8 on CPU, but through a slow path:
a 1 x 576 @ 576 x 1536 product took 1.23 ms as int8 x int8 and 34 us as uint8 x int8
(AVX512-VNNI, one thread). So the int8 activation codes ride as uint8 with the one zero
point 128, which is exact: a per-row scale needs no per-row zero point. On AVX2 CPUs
without VNNI, onnxruntime's uint8 x int8 kernel sums pairs of products in int16 and can
saturate (its docs suggest 7-bit weights, ``reduce_range``, there); the ``quantize_dynamic``
graph has the same kernel and the same caveat. On this VNNI CPU it does not saturate.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

from slimsearch.deploy.genai_folder import (
    LM_HEAD_WEIGHT,
    MODEL_FILE,
    MS_DOMAIN,
    WEIGHT_SUFFIX,
    PathLike,
    check_graph_weight,
    linear_codes,
    new_folder,
    save_folder,
)
from slimsearch.exceptions import ConfigError

if TYPE_CHECKING:
    from slimsearch.compress.quant.grid import QuantizedWeight

__all__ = ["W8A8Report", "to_w8a8"]

QMAX = 127  # symmetric int8, as compress.smoothquant's weights and activations
SHIFT = 128  # int8 code + 128 = the uint8 code the integer MatMul reads, with zero point 128
EPS = 1e-8  # the smallest row maximum, as fake_quant_per_token
MIN_OPSET = 18  # ReduceMax takes its axes as an input from opset 18


@dataclass(frozen=True)
class W8A8Report:
    """What :func:`to_w8a8` did.

    Attributes:
        path: the folder holding the rewritten graph.
        integer_matmuls: integer MatMuls (MatMulIntegerToFloat per token, MatMulInteger per tensor).
        dynamic_quantizers: activation quantizers (per token: one per distinct linear input,
            shared by the linears reading it; per tensor: DynamicQuantizeLinear nodes).
        left_float: MatMul nodes with a constant weight that stay float32.
        per_token: activations quantized per token (else per tensor).
    """

    path: Path
    integer_matmuls: int
    dynamic_quantizers: int
    left_float: tuple[str, ...]
    per_token: bool = True


def to_w8a8(onnx_dir: PathLike, out_dir: PathLike, *, weights: Optional[Mapping[str, "QuantizedWeight"]] = None,
            per_token: bool = True, lm_head: bool = False) -> W8A8Report:
    """Int8 weights and int8 activations for every MatMul of ``onnx_dir`` with a constant weight.

    ``onnx_dir`` is a :func:`slimsearch.deploy.onnx_nbits.build_onnx` folder of the smoothed
    model holding the de-quantized weights. ``weights`` (torch module path -> codes, as
    ``smoothquant(...).weights``: 8 bits, per channel, symmetric) are used as they are,
    each checked against the graph's float weight; linears it lacks stay float. Without
    it, every linear's codes are fitted from its float weight as ``smoothquant`` fits
    them (identical codes when the weight holds de-quantized ones). ``per_token=False``
    writes onnxruntime's ``quantize_dynamic`` graph instead (activations per tensor, its
    own weight rounding, so without ``weights``). The output projection stays float
    unless ``lm_head`` (``smoothquant`` leaves it float too). A bias stays the builder's Add
    after the MatMul; attention and the norms stay float.
    """
    src, dest = Path(onnx_dir), Path(out_dir)
    for name, value in (("per_token", per_token), ("lm_head", lm_head)):
        if not isinstance(value, bool):
            raise ConfigError(f"to_w8a8: {name} must be true or false, got {value!r}")
    if not (src / MODEL_FILE).is_file():
        raise ConfigError(f"to_w8a8: {src} has no {MODEL_FILE}; give a build_onnx folder")
    if not per_token:
        if weights is not None:
            raise ConfigError("to_w8a8: weights need per_token=True (quantize_dynamic re-rounds the weights itself)")
        return _per_tensor(src, dest, lm_head)
    for path, qw in (weights or {}).items():
        if (qw.bits, qw.group_size, qw.symmetric) != (8, 0, True):
            raise ConfigError(f"to_w8a8: weights[{path!r}] must be 8-bit, per channel (group_size 0), symmetric; "
                              f"got bits={qw.bits}, group_size={qw.group_size}, symmetric={qw.symmetric}")
    return _per_token(src, dest, weights, lm_head)


def _per_token(src: Path, dest: Path, weights: Optional[Mapping[str, "QuantizedWeight"]], lm_head: bool
               ) -> W8A8Report:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src / MODEL_FILE))
    opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ConfigError(f"to_w8a8: {src / MODEL_FILE} has opset {opset}; per-token W8A8 needs >= {MIN_OPSET}")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    graph.initializer.extend(_constants())
    unused = set(weights or {})
    quantizers: dict[str, tuple[str, str]] = {}  # linear input -> (uint8 codes, per-row scale)
    new_nodes, left_float, integer = [], [], 0
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        if weight not in inits or not weight.endswith(WEIGHT_SUFFIX):
            new_nodes.append(node)
            continue
        graph_weight = numpy_helper.to_array(inits[weight])
        qw = None
        if weight == LM_HEAD_WEIGHT:
            qw = _fit(graph_weight) if lm_head else None
        elif weights is None:
            qw = _fit(graph_weight)
        else:
            qw, paths = linear_codes(weight, weights)
            unused.difference_update(paths)
            if qw is not None:
                check_graph_weight(weight, graph_weight, qw)
        if qw is None:
            new_nodes.append(node)
            left_float.append(node.name)
            continue
        stem = node.name.rsplit("/", 1)[0] if "/" in node.name else node.name
        if node.input[0] not in quantizers:
            quantizers[node.input[0]] = _quantize_rows(node.input[0], stem, new_nodes)
        new_nodes.extend(_integer_matmul(graph, node, weight, qw, quantizers[node.input[0]], stem))
        integer += 1
    if unused:
        raise ConfigError(f"to_w8a8: weights for linears not found in {src / MODEL_FILE}: {sorted(unused)[:4]} "
                          f"({len(unused)} in all); the graph names linears as model.layers.N.attn.qkv_proj, ...")
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    still_read = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return W8A8Report(save_folder(model, src, dest), integer, len(quantizers),
                      tuple(left_float), per_token=True)


def _fit(graph_weight) -> "QuantizedWeight":
    """Int8 codes of a graph weight ``(in, out)``, per output channel, symmetric: as ``smoothquant``."""
    import torch

    from slimsearch.compress.quant.grid import quantize_weight

    return quantize_weight(torch.from_numpy(graph_weight.T.copy()), 8, group_size=0, symmetric=True)


def _constants() -> list:
    import numpy as np
    from onnx import numpy_helper

    values = {"w8a8.eps": np.array(EPS, np.float32), "w8a8.qmax": np.array(QMAX, np.float32),
              "w8a8.one": np.array(1.0, np.float32), "w8a8.zero_point": np.array(SHIFT, np.uint8),
              "w8a8.last_axis": np.array([-1], np.int64)}
    return [numpy_helper.from_array(v, k) for k, v in values.items()]


def _quantize_rows(x: str, stem: str, nodes: list) -> tuple[str, str]:
    """Nodes appended to ``nodes`` that quantize ``x`` per row (last axis); their (uint8 codes, scale)."""
    from onnx import helper

    p = f"{stem}/ActQuant"
    nodes.extend([
        helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/Abs"),
        helper.make_node("ReduceMax", [f"{p}/abs", "w8a8.last_axis"], [f"{p}/max"], name=f"{p}/ReduceMax",
                         keepdims=1),
        helper.make_node("Max", [f"{p}/max", "w8a8.eps"], [f"{p}/max_eps"], name=f"{p}/Max"),
        helper.make_node("Div", [f"{p}/max_eps", "w8a8.qmax"], [f"{p}/scale"], name=f"{p}/Scale"),
        helper.make_node("Div", [x, f"{p}/scale"], [f"{p}/scaled"], name=f"{p}/Div"),
        # round half to even (as torch.round), + 128, to uint8 in one op; |x / scale| <= 127 already
        helper.make_node("QuantizeLinear", [f"{p}/scaled", "w8a8.one", "w8a8.zero_point"], [f"{p}/codes"],
                         name=f"{p}/Round"),
    ])
    return f"{p}/codes", f"{p}/scale"


def _integer_matmul(graph, node, weight: str, qw: "QuantizedWeight", quantized: tuple[str, str], stem: str) -> list:
    """The integer product of the row codes and ``qw``'s codes, then both scales, writing ``node``'s output."""
    import numpy as np
    from onnx import helper, numpy_helper

    codes, row_scale = quantized
    base = weight[: -len(".weight")]
    b, scale = f"{base}.weight_int8", f"{base}.weight_scale"
    graph.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(qw.codes.detach().cpu().numpy().T.astype(np.int8)), b),
        numpy_helper.from_array(qw.scale[:, 0].detach().cpu().numpy().astype(np.float32), scale)])
    p = f"{stem}/MatMulIntegerToFloat"
    return [  # the product times the channel scales, in one onnxruntime kernel; then the row scales
        helper.make_node("MatMulIntegerToFloat", [codes, b, "w8a8.one", scale, "w8a8.zero_point"], [f"{p}/out"],
                         name=p, domain=MS_DOMAIN),
        helper.make_node("Mul", [f"{p}/out", row_scale], list(node.output), name=f"{p}/RowScale"),
    ]


def _per_tensor(src: Path, dest: Path, lm_head: bool) -> W8A8Report:
    """onnxruntime's ``quantize_dynamic``: weights int8 per output channel, activations uint8 per tensor
    with their range taken at run time (DynamicQuantizeLinear), run as MatMulInteger."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src / MODEL_FILE), load_external_data=False).graph
    exclude = [] if lm_head else [n.name for n in graph.node if n.op_type == "MatMul" and n.output[0] == "logits"]
    with new_folder(src, dest, replace=False) as tmp, _quiet_logging():
        quantize_dynamic(src / MODEL_FILE, tmp / MODEL_FILE, op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=exclude, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
        nodes = onnx.load(str(tmp / MODEL_FILE), load_external_data=False).graph.node
    return W8A8Report(dest, sum(n.op_type == "MatMulInteger" for n in nodes),
                      sum(n.op_type == "DynamicQuantizeLinear" for n in nodes),
                      tuple(n.name for n in nodes if n.op_type == "MatMul"), per_token=False)


@contextlib.contextmanager
def _quiet_logging():
    """onnxruntime's quantizer logs a line per tensor (and a pre-processing hint) at INFO/WARNING."""
    import logging

    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)
