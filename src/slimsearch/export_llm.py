"""The files a causal-LM candidate is exported as, each loaded back and scored on the test text.

- ``genai``: an ONNX Runtime GenAI folder (:func:`~slimsearch.deploy.llm_graph.deployed_graph`
  with the model's own tokenizer): the KV-cache graph, quantized linears as MatMulNBits holding
  the candidate's codes, SmoothQuant's int8 inputs as integer MatMuls. Its test perplexity is
  computed by onnxruntime (:func:`~slimsearch.deploy.llm_timing.onnx_perplexity`); MatMulNBits
  computes in int8 (``accuracy_level`` 4) and the graph keeps a float KV cache, so it may differ
  from the recorded figure by a little (relative :data:`LM_TOLERANCE` at most).
- ``hf``: a Hugging Face folder, weight-only quantized linears packed as compressed-tensors
  (:func:`~slimsearch.deploy.hf_folder.save_hf_folder`); ``transformers`` loads it. It holds the
  weights, not the simulated activation or KV-cache rounding; a rounded output projection is
  stored de-quantized, in float (compressed-tensors packs linears, not the embedding it is tied to).

``codes_sha256`` fingerprints the rebuilt codes and scales (the output projection's among them):
the same plan rebuilds the same codes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimsearch.exceptions import JobStateError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LLM_FORMATS", "LM_TOLERANCE", "codes_sha256", "write_llm_format"]

LLM_FORMATS = ("genai", "hf")
LLM_FILE_NAMES = {"genai": "genai", "hf": "hf"}  # folders
LM_TOLERANCE = 0.02  # an exported folder's test perplexity may differ from the record by at most 2% of it


def codes_sha256(model: "nn.Module") -> str:
    """SHA-256 of the model's quantized codes, scales and zero points, in module-path order."""
    import numpy as np

    from slimsearch.compress.llm_methods import record_of

    record = record_of(model)
    digest = hashlib.sha256()
    head = [("lm_head", record.head)] if record.head is not None else []
    for path, qw in sorted(record.quantized.items()) + head:
        digest.update(path.encode())
        for tensor in (qw.codes, qw.scale, qw.zero_point):
            digest.update(np.ascontiguousarray(tensor.detach().cpu().numpy()).tobytes())
    return digest.hexdigest()


def write_llm_format(fmt: str, model: "nn.Module", task: Any, tokenizer: Any, out: Path) -> tuple[Path, float]:
    """Write ``model`` as format ``fmt`` under ``out`` and return the folder and its test perplexity,
    measured by loading what was written."""
    from slimsearch.compress.llm_methods import record_of

    path = out / LLM_FILE_NAMES[fmt]
    if fmt == "genai":
        from slimsearch.deploy.llm_graph import deployed_graph
        from slimsearch.deploy.llm_timing import onnx_perplexity

        deployed_graph(model, path, tokenizer=tokenizer, verify=True)
        return path, onnx_perplexity(path, task.test.x.numpy())
    from slimsearch.deploy.hf_folder import reload, save_hf_folder

    record = record_of(model)
    save_hf_folder(model, tokenizer, path, quantized=record.quantized)
    return path, task.scorer(reload(path), task.test, False)["ppl"]


def check_llm_score(fmt: str, trial: int, value: float, recorded: float | None) -> None:
    """Refuse an exported folder whose test perplexity strays from the record by more than :data:`LM_TOLERANCE`."""
    if recorded is not None and abs(value / recorded - 1) > LM_TOLERANCE:
        raise JobStateError(f"the exported {fmt} folder of trial {trial} has test perplexity {value:.4f}, the record "
                            f"says {recorded:.4f} (tolerance {LM_TOLERANCE:.0%} of it); nothing exported")
