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
INPUT_NAME = "input"
OUTPUT_NAME = "output"


def onnx_bytes(model: nn.Module, example_input: torch.Tensor) -> bytes:
    """Export ``model`` to ONNX with a dynamic batch dimension.

    Uses the TorchScript-based exporter (``dynamo=False``): it exports fake-quantized
    activations as QDQ pairs and takes milliseconds, where the dynamo exporter takes
    seconds per candidate.
    """
    buf = io.BytesIO()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example_input,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )
    return buf.getvalue()


def ort_session(model_bytes: bytes | str, *, threads: int | None = None):
    """An onnxruntime CPU session using ``threads`` intra-op threads (default: torch's count)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def ort_predict(session, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Outputs of an onnxruntime session on ``x``, in batches, as a tensor."""
    outs = [session.run(None, {INPUT_NAME: x[i : i + batch_size].numpy()})[0] for i in range(0, len(x), batch_size)]
    return torch.cat([torch.from_numpy(o) for o in outs])
