"""A compressed decoder LLM as the ONNX Runtime GenAI graph it deploys as, from what its methods did.

:func:`deployed_graph` reads the model's :class:`~slimsearch.compress.llm_methods.DecoderRecord`
and writes one GenAI folder: the onnxruntime-genai builder's float32 KV-cache graph of the model
(its cut shapes, its healed or smoothed float weights), then

- every weight-only quantized linear as MatMulNBits holding the model's own codes
  (:func:`~slimsearch.deploy.onnx_nbits.to_matmul_nbits`, int8 compute: ``accuracy_level`` 4), and
  a rounded output projection too (a tied embedding reads its codes through GatherBlockQuantized);
- every SmoothQuant linear whose inputs are int8 per token (``act_paths``) with 8-bit
  per-channel weights as an integer MatMul (:func:`~slimsearch.deploy.onnx_w8a8.to_w8a8`).

What it does not carry, and so does not speed up: the KV-cache precision (onnxruntime's
GroupQueryAttention keeps a float cache on a CPU) and 2:4 sparsity (no sparse CPU kernel). The
output projection stays float unless the plan rounded it (``head_bits``).

The builder copies a tokenizer into the folder; the graph does not use it. The model's own
tokenizer is not at hand where a candidate is evaluated, so there a one-token placeholder is
written instead (a folder for timing and for running token ids); ``export`` passes the real one.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

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


VERIFY_TOKENS = 8
VERIFY_TOLERANCE = 1e-3  # of the largest logit: float32 graphs of one model differ by rounding only


def _check_float_graph(model: "nn.Module", graph: Path) -> None:
    """Refuse a float graph whose logits on a few tokens are not the model's (hooks off: the float model)."""
    import numpy as np
    import torch

    from slimsearch.deploy.llm_timing import onnx_logits
    from slimsearch.compress.llm_methods import hooks_off

    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (np.arange(VERIFY_TOKENS, dtype=np.int64) * 7919 % vocab)[None]
    with hooks_off(model), torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.float().cpu().numpy()
    gap = float(np.abs(onnx_logits(graph, ids) - want).max())
    if gap > VERIFY_TOLERANCE * max(1.0, float(np.abs(want).max())):
        raise ConfigError(f"the onnxruntime-genai builder's graph of this {type(model).__name__} gives other logits "
                          f"than the model (up to {gap:.3g} apart), so it is not exported; seen with test models of "
                          f"vocabularies under 128 tokens (this one: a vocabulary of {vocab})")


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


def deployed_graph(model: "nn.Module", out_dir: PathLike, *, threads: int = 1, tokenizer: Any = None,
                   verify: bool = False) -> Path:
    """``model`` (an LLM method's result, or any Hugging Face causal LM) as a GenAI folder in ``out_dir``,
    with ``tokenizer`` (a placeholder when None: a folder for timing, not for serving text).

    With ``verify``, the builder's float graph must give the model's logits on a few tokens before
    any linear is replaced (its graphs of tiny test models, vocabularies of 64 and 96 tokens,
    computed other logits; 128 and more were right); timing needs no such check, the graph's
    speed not depending on its values.

    Raises:
        ConfigError: the builder does not support the model's architecture (GPT-2), its graph
            fails ``verify``, ``out_dir`` exists and is not empty, or a SmoothQuant linear's
            weights are not 8-bit per channel.
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
        (tokenizer if tokenizer is not None else placeholder_tokenizer()).save_pretrained(hf)
        graph = build_onnx(hf, Path(tmp) / "float", threads=threads)
        shutil.rmtree(hf)
        if verify:
            _check_float_graph(model, graph)
        if nbits or record.head is not None:
            graph = to_matmul_nbits(graph, nbits, out_dir=Path(tmp) / "nbits", accuracy_level=4,
                                    lm_head=record.head).path
        if w8a8:
            graph = to_w8a8(graph, Path(tmp) / "w8a8", weights=w8a8).path
        out_dir.mkdir(exist_ok=True)
        for item in graph.iterdir():
            shutil.move(str(item), out_dir / item.name)
    return out_dir
