"""The int8 ONNX graph of a W8A8 model.

:func:`onnx_qdq_bytes` turns a model whose quantized layers are all W8A8 into a QDQ
graph with int8 weight initializers, which onnxruntime's QDQ transformer runs
with integer kernels (QLinearConv, QGemm, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slimsearch.exceptions import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
# Ops between a layer's output and the next layer's input quantization that a uint8
# grid passes through unchanged, so the QuantizeLinear can move up to the layer's output.
GRID_PRESERVING_OPS = ("Relu", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")


def qdq_blockers(model: nn.Module) -> list[str]:
    """Why ``model`` cannot become an int8 QDQ graph (empty when it can).

    Every quantized layer must be frozen with 8-bit symmetric per-channel weights and
    8-bit inputs, the grid onnxruntime's integer kernels take.
    """
    from slimsearch.compress.quant.layers import quant_layers

    layers = {id(m) for m in quant_layers(model)}
    if not layers:
        return ["no layer is quantized"]
    out = []
    for name, m in model.named_modules():
        if id(m) not in layers:
            continue
        why = []
        if m.weight_bits != 8:
            why.append(f"weight_bits={m.weight_bits}")
        if m.act_bits != 8:
            why.append(f"act_bits={m.act_bits}")
        if m.group_size:
            why.append(f"group_size={m.group_size}")
        if not m.symmetric:
            why.append("asymmetric weights")
        if not m.frozen:
            why.append("not frozen")
        if why:
            out.append(f"{name}: {', '.join(why)}")
    return out


class _Graph:
    """Lookups over an ONNX graph being rewritten."""

    def __init__(self, model) -> None:
        self.model = model
        self.graph = model.graph

    def initializers(self) -> dict:
        return {i.name: i for i in self.graph.initializer}

    def producers(self) -> dict:
        return {out: node for node in self.graph.node for out in node.output}

    def consumers(self) -> dict[str, list]:
        found: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                found.setdefault(name, []).append(node)
        return found

    def constant(self, name: str) -> "np.ndarray | None":
        """The value of an initializer, following Identity nodes; None for computed tensors."""
        from onnx import numpy_helper

        producers, inits = self.producers(), self.initializers()
        while name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        return numpy_helper.to_array(inits[name]) if name in inits else None


def _match_layer(weight: "np.ndarray", layers: list) -> tuple[Any, bool] | None:
    """The quantized layer whose frozen weight is ``weight`` (or its transpose)."""
    import numpy as np

    for layer in layers:
        w = layer.weight.detach().cpu().numpy()
        if w.shape == weight.shape and np.array_equal(w, weight):
            return layer, False
        if w.ndim == 2 and w.T.shape == weight.shape and np.array_equal(w.T, weight):
            return layer, True
    return None


def _quantize_weights(g: _Graph, layers: list) -> None:
    """Replace each quantized layer's float weight by int8 codes + DequantizeLinear (and its bias by int32)."""
    import numpy as np
    from onnx import helper, numpy_helper

    new_nodes, new_inits, matched = [], [], set()
    producers = g.producers()
    for index, node in enumerate(g.graph.node):
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        weight = g.constant(node.input[1])
        found = None if weight is None else _match_layer(weight, layers)
        if found is None:
            continue
        layer, transposed = found
        if node.op_type == "Gemm":
            # Gemm computes A @ B.T with transB=1: B must be the weight itself, else its transpose
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            if bool(trans_b) == transposed:
                continue
        elif transposed != (node.op_type == "MatMul"):
            continue
        matched.add(id(layer))
        qw = layer.quantized_weight()
        codes = qw.codes.detach().cpu().numpy()
        scale = qw.scale[:, 0].detach().cpu().numpy().astype(np.float32)
        # an all-zero channel may take any scale; 1 keeps its int32 bias representable
        scale = np.where(np.abs(codes.reshape(len(codes), -1)).max(1) == 0, np.float32(1.0), scale)
        axis = 1 if transposed else 0
        if transposed:
            codes = codes.T
        base = f"qdq{index}_{node.op_type}"
        new_inits += [numpy_helper.from_array(codes.astype(np.int8), f"{base}_w_q"),
                      numpy_helper.from_array(scale, f"{base}_w_scale"),
                      numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{base}_w_zero")]
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_w_q", f"{base}_w_scale", f"{base}_w_zero"],
                                          [f"{base}_w"], name=f"{base}_w_dq", axis=axis))
        node.input[1] = f"{base}_w"
        source = producers.get(node.input[0])
        bias = g.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        act_scale = g.constant(source.input[1]) if source is not None and source.op_type == "DequantizeLinear" else None
        if bias is None or act_scale is None or bias.ndim != 1:
            continue
        bias_scale = (np.float32(act_scale) * scale).astype(np.float32)
        bias_q = np.round(bias.astype(np.float64) / bias_scale)
        if np.abs(bias_q).max(initial=0) >= 2**31 - 1:
            continue  # the bias stays float: onnxruntime then runs this layer in float
        new_inits += [numpy_helper.from_array(bias_q.astype(np.int32), f"{base}_b_q"),
                      numpy_helper.from_array(bias_scale, f"{base}_b_scale"),
                      numpy_helper.from_array(np.zeros(len(bias_q), dtype=np.int32), f"{base}_b_zero")]
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_b_q", f"{base}_b_scale", f"{base}_b_zero"],
                                          [f"{base}_b"], name=f"{base}_b_dq", axis=0))
        node.input[2] = f"{base}_b"
    missing = [type(layer).__name__ for layer in layers if id(layer) not in matched]
    if missing:
        raise ConfigError(f"{len(missing)} quantized layer(s) have no float weight initializer in the exported "
                          "graph to replace; cannot build the int8 graph")
    g.graph.initializer.extend(new_inits)
    nodes = new_nodes + list(g.graph.node)
    del g.graph.node[:]
    g.graph.node.extend(nodes)


def _hoist_activation_qdq(g: _Graph) -> None:
    """Quantize each layer's output on the next layer's input grid, right where it is produced.

    ``Conv -> Relu -> Flatten -> Q -> DQ -> Gemm`` becomes ``Conv -> Q -> DQ -> Relu ->
    Flatten -> Q -> DQ -> Gemm``: the same numbers (the ops between keep values on
    the grid, so the second Q changes nothing), but now the Conv has an output Q and
    onnxruntime fuses it into QLinearConv.
    """
    from onnx import helper

    producers, consumers = g.producers(), g.consumers()
    position = {out: i for i, node in enumerate(g.graph.node) for out in node.output}
    hoisted: dict[str, list[str]] = {}  # layer output -> the Q's scale and zero point
    for q in g.graph.node:
        if q.op_type != "QuantizeLinear":
            continue
        name, chain = q.input[0], 0
        node = producers.get(name)
        while node is not None and node.op_type in GRID_PRESERVING_OPS and len(consumers.get(name, [])) == 1:
            name, chain = node.input[0], chain + 1
            node = producers.get(name)
        if node is None or node.op_type not in WEIGHT_OPS or chain == 0 or len(consumers.get(name, [])) != 1:
            continue
        hoisted[name] = list(q.input[1:])
    if not hoisted:
        return
    # protobuf copies nodes on extend: rewire in place first, then rebuild the list once
    for node in g.graph.node:
        for i, value in enumerate(node.input):
            if value in hoisted:
                node.input[i] = f"{value}_hoisted_dq"
    after: dict[int, list] = {}
    for name, qparams in hoisted.items():
        q_out, dq_out = f"{name}_hoisted_q", f"{name}_hoisted_dq"
        after[position[name]] = [
            helper.make_node("QuantizeLinear", [name, *qparams], [q_out], name=f"{q_out}_node"),
            helper.make_node("DequantizeLinear", [q_out, *qparams], [dq_out], name=f"{dq_out}_node"),
        ]
    nodes = []
    for i, node in enumerate(g.graph.node):
        nodes.append(node)
        nodes.extend(after.get(i, []))
    del g.graph.node[:]
    g.graph.node.extend(nodes)


def _drop_unused(g: _Graph) -> None:
    """Remove Identity nodes and initializers nothing reads any more."""
    outputs = {o.name for o in g.graph.output}
    while True:
        used = {name for node in g.graph.node for name in node.input} | outputs
        dead = [n for n in g.graph.node if n.op_type == "Identity" and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            g.graph.node.remove(node)
    used = {name for node in g.graph.node for name in node.input} | outputs
    keep = [i for i in g.graph.initializer if i.name in used]
    del g.graph.initializer[:]
    g.graph.initializer.extend(keep)


def onnx_qdq_bytes(model: nn.Module, example_input: torch.Tensor) -> bytes:
    """An ONNX QDQ graph of a W8A8 model: int8 weights and quantized activations.

    Each quantized layer's float weight becomes int8 codes with per-channel scales
    (``DequantizeLinear``, axis 0) and its bias int32 codes on the input scale times
    the weight scale; activations keep the calibrated uint8 QuantizeLinear /
    DequantizeLinear pairs. onnxruntime's QDQ transformer fuses these into integer
    kernels. Outputs agree with the PyTorch model up to the rounding of the bias.

    Raises:
        ConfigError: some quantized layer is not W8A8 symmetric per-channel (see :func:`qdq_blockers`).
    """
    import onnx

    from slimsearch.deploy.onnx_graph import onnx_bytes
    from slimsearch.compress.quant.layers import quant_layers

    blockers = qdq_blockers(model)
    if blockers:
        raise ConfigError("an int8 ONNX graph needs every quantized layer frozen at 8-bit symmetric per-channel "
                          f"weights and 8-bit inputs; not so: {'; '.join(blockers)}")
    g = _Graph(onnx.load_from_string(onnx_bytes(model, example_input)))
    _quantize_weights(g, quant_layers(model))
    _hoist_activation_qdq(g)
    _drop_unused(g)
    onnx.checker.check_model(g.model)
    return g.model.SerializeToString()


def deployable_onnx_bytes(model: nn.Module, example_input: torch.Tensor) -> bytes:
    """The graph to ship and time: :func:`onnx_qdq_bytes` when the model is W8A8, else the float/QDQ graph."""
    from slimsearch.deploy.onnx_graph import onnx_bytes

    if qdq_blockers(model):
        return onnx_bytes(model, example_input)
    return onnx_qdq_bytes(model, example_input)
