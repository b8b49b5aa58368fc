"""A compressed decoder LLM as the ONNX Runtime GenAI graph it deploys as, from what its methods did.

:func:`deployed_graph` reads the model's :class:`~slimsearch.compress.llm_methods.DecoderRecord`
and writes one GenAI folder: the onnxruntime-genai builder's float32 KV-cache graph of the model
(its cut shapes, its healed or smoothed float weights), then

- every weight-only quantized linear as MatMulNBits holding the model's own codes
  (:func:`~slimsearch.deploy.onnx_nbits.to_matmul_nbits`, int8 compute: ``accuracy_level`` 4);
- every SmoothQuant linear whose inputs are int8 per token (``act_paths``) with 8-bit
  per-channel weights as an integer MatMul (:func:`~slimsearch.deploy.onnx_w8a8.to_w8a8`).

What it does not carry, and so does not speed up: the KV-cache precision (onnxruntime's
GroupQueryAttention keeps a float cache on a CPU) and 2:4 sparsity (no sparse CPU kernel). The
output projection stays float, as the compressed model computes it.

The builder copies a tokenizer into the folder; the graph does not use it. The model's own
tokenizer is not at hand where a candidate is evaluated, so a one-token placeholder is written
instead: the folder is for timing and for running token ids, not for serving text.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from slimsearch.deploy.genai_folder import PathLike
from slimsearch.exceptions import ConfigError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["deployed_graph"]

W8A8_CODES = (8, 0, True)  # bits, group size (0: per channel), symmetric: what to_w8a8 runs


def placeholder_tokenizer():
    """A one-token tokenizer (``<unk>``) for the builder to copy; nothing reads it."""
    import transformers
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def deployed_graph(model: "nn.Module", out_dir: PathLike, *, threads: int = 1) -> Path:
    """``model`` (an LLM method's result, or any Hugging Face causal LM) as a GenAI folder in ``out_dir``.

    Raises:
        ConfigError: the builder does not support the model's architecture (GPT-2), ``out_dir``
            exists and is not empty, or a SmoothQuant linear's weights are not 8-bit per channel.
    """
    from slimsearch.compress.llm_methods import record_of
    from slimsearch.deploy.onnx_nbits import build_onnx, to_matmul_nbits
    from slimsearch.deploy.onnx_w8a8 import to_w8a8

    record = record_of(model)
    act = set(record.act_paths)
    w8a8 = {p: q for p, q in record.quantized.items() if p in act}
    for path, qw in w8a8.items():
        if (qw.bits, qw.group_size, qw.symmetric) != W8A8_CODES:
            raise ConfigError(f"{path}: int8 inputs with {qw.bits}-bit weights in groups of {qw.group_size} have no "
                              "integer kernel here; allowed: 8-bit per-channel symmetric weights (weight_bits 8, "
                              "group_size 0) where act_bits is 8")
    nbits = {p: q for p, q in record.quantized.items() if p not in act}
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} exists and is not empty; give a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        hf = Path(tmp) / "hf"
        with _no_progress_bars():  # transformers draws one per save; a job's log is no place for it
            model.save_pretrained(hf)
        placeholder_tokenizer().save_pretrained(hf)
        graph = build_onnx(hf, Path(tmp) / "float", threads=threads)
        shutil.rmtree(hf)
        if nbits:
            graph = to_matmul_nbits(graph, nbits, out_dir=Path(tmp) / "nbits", accuracy_level=4).path
        if w8a8:
            graph = to_w8a8(graph, Path(tmp) / "w8a8", weights=w8a8).path
        out_dir.mkdir(exist_ok=True)
        for item in graph.iterdir():
            shutil.move(str(item), out_dir / item.name)
    return out_dir
