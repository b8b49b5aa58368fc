"""The deployable graph of a compressed model: ONNX bytes and an onnxruntime session.

Local latency is measured on this graph, not on the PyTorch module, because it is
what `slimsearch export` ships: activation quantization appears in it as
QuantizeLinear/DequantizeLinear pairs that onnxruntime executes, rather than as
PyTorch's slower fake-quantization simulation.
"""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn

OPSET = 17
WIDE_QDQ_OPSET = 21  # the first opset whose QuantizeLinear/DequantizeLinear take uint16
INPUT_NAME = "input"
OUTPUT_NAME = "output"


def _has_16_bit_activations(model: nn.Module) -> bool:
    return any(getattr(m, "act_bits", 32) == 16 for m in model.modules())


def onnx_bytes(model: nn.Module, example_input: torch.Tensor) -> bytes:
    """Export ``model`` to ONNX with a dynamic batch dimension.

    Uses the TorchScript-based exporter (``dynamo=False``): it exports fake-quantized
    activations as QDQ pairs and takes milliseconds, where the dynamo exporter takes
    seconds per candidate. A model with 16-bit activations is exported at opset
    ``WIDE_QDQ_OPSET`` (uint16 QDQ); every other model at ``OPSET``.
    """
    from slimsearch.compress.quant.layers import EXPORT_DOMAIN

    wide = _has_16_bit_activations(model)
    buf = io.BytesIO()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example_input,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            # 20 is the exporter's newest opset; its ops are unchanged in 21 but for QDQ's wider types
            opset_version=20 if wide else OPSET, dynamo=False,
            custom_opsets={EXPORT_DOMAIN: 1} if wide else None,
        )
    return _lower_16_bit_qdq(buf.getvalue()) if wide else buf.getvalue()


def _lower_16_bit_qdq(model_bytes: bytes) -> bytes:
    """Rewrite the 16-bit fake-quantization placeholders into uint16 QuantizeLinear/DequantizeLinear."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from slimsearch.compress.quant.layers import EXPORT_DOMAIN, U16_EXPORT_OP

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    nodes, added = [], {}
    for node in graph.node:
        if node.domain != EXPORT_DOMAIN:
            nodes.append(node)
            continue
        if node.op_type != U16_EXPORT_OP:
            raise ValueError(f"unexpected {EXPORT_DOMAIN} node {node.op_type!r} in the exported graph")
        x, scale, zero = node.input
        source = zero
        while source in producers and producers[source].op_type == "Identity":
            source = producers[source].input[0]
        if source not in inits:
            raise ValueError(f"the zero point {zero!r} of a 16-bit activation is not a constant")
        zero16 = f"{source}_uint16"
        if zero16 not in added:
            value = numpy_helper.to_array(inits[source]).astype(np.uint16)
            added[zero16] = numpy_helper.from_array(value, zero16)
        quantized = f"{node.output[0]}_uint16"
        nodes.append(helper.make_node("QuantizeLinear", [x, scale, zero16], [quantized], name=f"{node.name}_q"))
        nodes.append(helper.make_node("DequantizeLinear", [quantized, scale, zero16], list(node.output),
                                      name=f"{node.name}_dq"))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added.values())
    kept = [o for o in model.opset_import if o.domain not in ("", EXPORT_DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", WIDE_QDQ_OPSET), *kept])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def ort_session(model_bytes: bytes | str, *, threads: int | None = None, spin: bool = True):
    """An onnxruntime CPU session using ``threads`` intra-op threads (default: torch's count).

    ``spin=False``: the intra-op pool's threads sleep between calls instead of spinning for work
    (onnxruntime's ``session.intra_op.allow_spinning``); nothing changes with one thread, which has
    no pool."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def ort_predict(session, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Outputs of an onnxruntime session on ``x``, in batches, as a tensor."""
    outs = [session.run(None, {INPUT_NAME: x[i : i + batch_size].detach().cpu().numpy()})[0]
            for i in range(0, len(x), batch_size)]
    return torch.cat([torch.from_numpy(o) for o in outs])


INTEGER_OPS = frozenset({"QLinearConv", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QGemm",
                         "QLinearMatMul", "DynamicQuantizeMatMul"})
"""onnxruntime kernels that compute in integers: what a QDQ graph should turn into."""


def ort_optimized_ops(model_bytes: bytes) -> dict[str, int]:
    """Op types (with counts) of the graph onnxruntime actually runs after its optimizations."""
    import collections
    import tempfile
    from pathlib import Path

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(path)
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(path)).graph
    return dict(collections.Counter(node.op_type for node in graph.node))
