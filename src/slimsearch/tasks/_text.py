"""Text for causal language models: two corpora shipped with gensim's tests, split by document.

``wikipedia`` is the 106 articles of a shortened English Wikipedia dump, with the wiki markup
stripped; ``lee`` is the 299 news articles of the Lee background corpus, one per line. Both
files come from the installed ``gensim`` package (found without importing it, which would
load scipy); nothing is downloaded.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import html
import importlib.util
import json
import random
import re
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol, Union

from slimsearch._io import atomic_path, atomic_write
from slimsearch.exceptions import ConfigError
from slimsearch.tasks._cache import cache_dir, file_sha256

if TYPE_CHECKING:
    import torch

# Bump when the documents' text, the split or the windowing changes (the corpus file's hash,
# the tokenizer's identity, the split, seq_len and seed are in the cache file's name already).
_RECIPE = "v1"
VALIDATION_FRACTION = 0.1
TEST_FRACTION = 0.1


class Corpus(str, Enum):
    """A built-in text corpus."""

    WIKIPEDIA = "wikipedia"
    LEE = "lee"


class TextSplit(str, Enum):
    """A split of a corpus, by document: calibration (training, ~80%), validation and test (~10% each)."""

    CALIBRATION = "calibration"
    VALIDATION = "validation"
    TEST = "test"


_FILES = {
    Corpus.WIKIPEDIA: "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    Corpus.LEE: "lee_background.cor",
}


class Tokenizer(Protocol):
    """What :func:`text_windows` needs of a tokenizer (a Hugging Face one has both)."""

    eos_token_id: Optional[int]

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]:
        """Token ids of ``text``."""


def _choice(enum: type[Enum], value: Union[str, Enum], what: str) -> Enum:
    try:
        return enum(value)
    except ValueError:
        raise ConfigError(f"{what} must be one of {[e.value for e in enum]}; got {value!r}") from None


def corpus_file(corpus: Union[str, Corpus]) -> Path:
    """The corpus's file in the installed gensim package's test data."""
    corpus = _choice(Corpus, corpus, "corpus")
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"corpus {corpus.value!r} needs the gensim package (its test data holds the text); "
                          "install it: pip install gensim")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / _FILES[corpus]
    if not path.is_file():
        raise ConfigError(f"corpus {corpus.value!r}: {path} is missing from the installed gensim package")
    return path


def documents(corpus: Union[str, Corpus], split: Union[str, TextSplit, None] = None, *,
              seed: int = 0) -> list[str]:
    """The documents of ``corpus`` (plain text), all of them or those of one ``split``.

    The split is by document, from a shuffle seeded by ``seed``: the first ~10% of the shuffled
    documents are the test split, the next ~10% validation, the rest calibration; each split keeps
    the corpus's order. The same seed always gives the same split.
    """
    corpus = _choice(Corpus, corpus, "corpus")
    path = corpus_file(corpus)
    docs = _cached_wikipedia(path) if corpus is Corpus.WIKIPEDIA else _lines(path)
    if split is None:
        return docs
    split = _choice(TextSplit, split, "split")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_test = round(len(docs) * TEST_FRACTION)
    n_val = round(len(docs) * VALIDATION_FRACTION)
    chosen = {TextSplit.TEST: order[:n_test], TextSplit.VALIDATION: order[n_test:n_test + n_val],
              TextSplit.CALIBRATION: order[n_test + n_val:]}[split]
    return [docs[i] for i in sorted(chosen)]


def text_windows(tokenizer: Tokenizer, corpus: Union[str, Corpus], split: Union[str, TextSplit], *,
                 seq_len: int = 512, max_tokens: Optional[int] = None, seed: int = 0) -> "torch.Tensor":
    """Non-overlapping windows of ``seq_len`` tokens of one split, ``LongTensor (n_windows, seq_len)``.

    Each document is tokenized without special tokens; the documents are joined with the
    tokenizer's EOS id between them and cut into windows, the incomplete tail dropped.
    ``max_tokens`` keeps only the first ``max_tokens // seq_len`` windows. The windows of a
    split are cached (keyed by the corpus file, the tokenizer's vocabulary and behaviour, the
    split, ``seq_len`` and ``seed``), so a second call only reads a file.
    """
    import torch

    corpus = _choice(Corpus, corpus, "corpus")
    split = _choice(TextSplit, split, "split")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len must be an int >= 2; got {seq_len!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < seq_len):
        raise ConfigError(f"max_tokens must be None or an int >= seq_len ({seq_len}); got {max_tokens!r}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(eos, int):
        raise ConfigError(f"the tokenizer {type(tokenizer).__name__} has no eos_token_id (got {eos!r}); "
                          "text_windows puts it between documents")
    path = cache_dir() / "text" / (f"{corpus.value}-{split.value}-len{seq_len}-seed{seed}-"
                                   f"{file_sha256(corpus_file(corpus))[:12]}-{_tokenizer_id(tokenizer)[:12]}-"
                                   f"{_RECIPE}.pt")
    windows = None
    if path.is_file():
        try:
            windows = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a foreign or truncated cache file: rebuild it
            windows = None
    if windows is None:
        ids: list[int] = []
        for i, doc in enumerate(documents(corpus, split, seed=seed)):
            if i:
                ids.append(eos)
            ids.extend(tokenizer.encode(doc, add_special_tokens=False))
        n = len(ids) // seq_len
        if n == 0:
            raise ConfigError(f"corpus {corpus.value!r} split {split.value!r} has {len(ids)} tokens, fewer than "
                              f"seq_len={seq_len}; allowed: seq_len <= {len(ids)}")
        windows = torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(windows, tmp)
    if max_tokens is not None:
        windows = windows[:max_tokens // seq_len]
    return windows


_PROBE = "Hello, world! Ünïcödé  spaces\n\ttabs 12345 ἀναρχία 東京 <|endoftext|> don't"


def _tokenizer_id(tokenizer: Tokenizer) -> str:
    """A hash of what makes a tokenizer's output: its class, its whole definition (a fast Hugging Face
    tokenizer's serialization: vocabulary, merges, normalizer; else the vocabulary when it tells it),
    EOS id and how it encodes a probe text of mixed scripts, spaces and a special-token look-alike."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if callable(getattr(backend, "to_str", None)):
        definition = hashlib.sha256(backend.to_str().encode()).hexdigest()  # 60 ms; sorting the vocab took 200
    elif callable(getattr(tokenizer, "get_vocab", None)):
        definition = sorted(tokenizer.get_vocab().items())
    else:
        definition = None
    parts = [type(tokenizer).__qualname__, tokenizer.eos_token_id, definition,
             list(tokenizer.encode(_PROBE, add_special_tokens=False))]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return [line.strip() for line in handle if line.strip()]


def _cached_wikipedia(path: Path) -> list[str]:
    """:func:`_wikipedia`, kept as JSON in the cache: parsing and cleaning takes ~1 s, reading 20 ms."""
    cached = cache_dir() / "text" / f"wikipedia-documents-{file_sha256(path)[:12]}-{_RECIPE}.json"
    with contextlib.suppress(OSError, ValueError):
        docs = json.loads(cached.read_text(encoding="utf-8"))
        if isinstance(docs, list) and all(isinstance(d, str) for d in docs):
            return docs
    docs = _wikipedia(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, json.dumps(docs, ensure_ascii=False))
    return docs


def _wikipedia(path: Path) -> list[str]:
    """The clean text of the dump's articles: namespace 0, not redirects, not empty once cleaned."""
    import xml.etree.ElementTree as ET

    docs = []
    with bz2.open(path) as handle:
        for _, element in ET.iterparse(handle):
            if not element.tag.endswith("}page"):
                continue
            text = element.findtext("{*}revision/{*}text") or ""
            if (element.findtext("{*}ns") == "0" and element.find("{*}redirect") is None
                    and not text.lstrip().upper().startswith("#REDIRECT")):
                clean = strip_wiki_markup(text)
                if clean:
                    docs.append(clean)
            element.clear()
    return docs


_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?(?:</ref\s*>|\Z)", re.S | re.I)
_NOT_TEXT = re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem|hiero)\b[^>]*>"
                       r".*?</\1\s*>", re.S | re.I)
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}")
_TABLE_TOKEN = re.compile(r"^\s*\{\||^\s*\|\}", re.M)
_LINK = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.S)  # a caption may hold [single] brackets
_DROPPED_NAMESPACES = {"file", "image", "category", "media"}
_INTERWIKI = re.compile(r"^[a-z][a-z-]*:")
_EXTERNAL_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]*\s*([^\]]*)\]")
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.M)
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def strip_wiki_markup(text: str) -> str:
    """Plain text of a page's wikitext: templates, tables, references, files, categories, tags,
    comments and formatting removed; links and external links replaced by their text; headings
    kept as their text on a line of their own; entities decoded."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _NOT_TEXT.sub("", text)
    text = _drop_nested(text, _TEMPLATE_TOKEN, "{{")
    text = _drop_nested(text, _TABLE_TOKEN, "{|")
    while True:  # innermost links first, so a file's caption links go with the file
        new = _LINK.sub(_link_text, text)
        if new == text:
            break
        text = new
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _TAG.sub("", html.unescape(text))  # tags written as entities (&lt;br&gt;)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = _MAGIC_WORD.sub("", text)
    text = _LIST_MARK.sub("", text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def _drop_nested(text: str, tokens: re.Pattern, opening: str) -> str:
    """``text`` without the spans between matched opening and closing tokens, nested or not.
    A closing token with nothing open is left; an opening one never closed runs to the end."""
    kept, depth, start = [], 0, 0
    for match in tokens.finditer(text):
        if match.group().strip() == opening:
            if depth == 0:
                kept.append(text[start:match.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                start = match.end()
    if depth == 0:
        kept.append(text[start:])
    return "".join(kept)


def _link_text(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    namespace = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if namespace in _DROPPED_NAMESPACES or (not label and _INTERWIKI.match(target)):
        return ""
    return label.rsplit("|", 1)[-1] if label else target.lstrip(":")
