"""Tiny random decoder LLMs saved as Hugging Face folders, with a tiny tokenizer and text, for tests across
the suite (nothing downloaded; the real SmolLM2 only in slow tests)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

VOCAB = 64


def tokenizer():
    """A word-level tokenizer of the words ``w2`` .. ``w63`` (``<unk>`` 0, ``</s>`` 1), built in memory."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def llama(seed: int = 0, vocab: int = VOCAB):
    """Llama with grouped-query attention: 2 blocks, hidden 64, 4 heads sharing 2 key/value heads, FFN 96, tied.

    onnxruntime-genai's builder writes a graph that computes other logits for a vocabulary this
    small (64, and 96; 128 and more were right): a model whose ONNX graph must compute its logits
    takes a larger ``vocab`` (the tokenizer's 64 ids are still all it sees)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


def gpt2(seed: int = 0):
    """GPT-2 (Conv1D linears): 2 blocks, hidden 64, 4 heads, 64 positions."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config).eval()


def folder(path: Path, kind: str = "llama", **kwargs) -> Path:
    """A tiny ``kind`` (``llama`` or ``gpt2``) model (``kwargs`` to its function) and its tokenizer saved in ``path``."""
    model = {"llama": llama, "gpt2": gpt2}[kind](**kwargs)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def text(path: Path, paragraphs: int = 60, seed: int = 0) -> Path:
    """A text file of ``paragraphs`` paragraphs of 40-120 random words of the tiny vocabulary."""
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(f"w{rng.randint(2, VOCAB - 1)}" for _ in range(rng.randint(40, 120)))
                                for _ in range(paragraphs)))
    return path


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (these models are tiny; more threads only contend), restored after.

    A test module takes it with ``from tests._tiny_llm import one_thread`` and
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def patterned_text(path: Path, paragraphs: int = 60, seed: int = 0) -> Path:
    """A text file whose paragraphs walk the tiny vocabulary in steps of 1 to 3 words (a few words
    at random): a model can learn to predict it, so compressing one shows (random words cannot)."""
    rng = random.Random(seed)
    paras = []
    for _ in range(paragraphs):
        word, step, words = rng.randint(2, VOCAB - 1), rng.randint(1, 3), []
        for _ in range(rng.randint(40, 120)):
            words.append(f"w{rng.randint(2, VOCAB - 1) if rng.random() < 0.05 else word}")
            word = 2 + (word - 2 + step) % (VOCAB - 2)
        paras.append(" ".join(words))
    path.write_text("\n\n".join(paras))
    return path


def trained_folder(path: Path, text_path: Path, steps: int = 150, seed: int = 0) -> Path:
    """:func:`folder`'s tiny Llama, first trained ``steps`` steps on ``text_path`` (a few seconds)."""
    import torch

    model, tok = llama(seed), tokenizer()
    ids = torch.tensor(tok.encode(text_path.read_text().replace("\n\n", " "), add_special_tokens=False))
    windows = ids[: len(ids) // 32 * 32].view(-1, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path
