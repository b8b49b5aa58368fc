"""Minitron-style cuts of decoder LLMs (structures/llm_cuts.py) on tiny random Llama, Qwen2 and GPT-2."""

from __future__ import annotations

import copy

import pytest
import torch

from slimsearch.exceptions import ConfigError
from slimsearch.structures import llm
from slimsearch.structures.llm_cuts import DecoderImportance, cut, importance, layers_to_drop

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV, HEAD_DIM = 64, 32, 48, 4, 4, 2, 8
from tests._tiny_llm import one_thread  # noqa: F401 (a fixture)


pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(tie: bool = True, kind: str = "llama", **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config_type, model_type = {"llama": (LlamaConfig, LlamaForCausalLM),
                               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    config = config_type(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM,
                         max_position_embeddings=64, tie_word_embeddings=tie, initializer_range=0.1, **extra)
    return model_type(config).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reloaded(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()


def _cache_agrees(model, ids) -> bool:
    """Logits of the last tokens fed after a prefix through the KV cache equal those of one full pass."""
    with torch.no_grad():
        first = model(input_ids=ids[:1, :8], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        rest = model(input_ids=ids[:1, 8:], cache=cache, use_cache=True).logits
        generated = model.generate(ids[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    return generated.shape == (1, ids.shape[1] + 5) and torch.allclose(rest, _logits(model, ids[:1])[:, 8:], atol=1e-5)


def test_grouped_query_groups_are_cut_whole(ids):
    model = _llama()
    with torch.no_grad():  # group 0's values near zero in every block: its output is tiny, group 1 stays
        for block in llm.blocks(model):
            block.self_attn.v_proj.weight[:HEAD_DIM] *= 1e-3
    scores = importance(model, ids)
    assert all(s.shape == (KV,) and s[1] > s[0] for s in scores.attention)
    small = cut(model, scores, kv_groups_keep=1)

    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (HEADS // KV, 1)
    assert small.config.head_dim == HEAD_DIM
    per_group = HEADS // KV * HEAD_DIM
    for old, new in zip(llm.blocks(model), llm.blocks(small)):
        q = slice(per_group, 2 * per_group)  # the query heads of kv head 1
        kv = slice(HEAD_DIM, 2 * HEAD_DIM)
        assert torch.equal(new.self_attn.q_proj.weight, old.self_attn.q_proj.weight[q])
        assert torch.equal(new.self_attn.k_proj.weight, old.self_attn.k_proj.weight[kv])
        assert torch.equal(new.self_attn.v_proj.weight, old.self_attn.v_proj.weight[kv])
        assert torch.equal(new.self_attn.o_proj.weight, old.self_attn.o_proj.weight[:, q])
    assert _cache_agrees(small, ids)


def test_keeping_everything_gives_the_same_logits(ids):
    for model in (_llama(), _gpt2()):
        same = cut(model, importance(model, ids))
        assert same is not model
        assert torch.allclose(_logits(same, ids), _logits(model, ids), atol=1e-6)


def test_ffn_channels_ranked_by_activation_times_column_norm(ids):
    model = _llama()
    with torch.no_grad():  # channel 5's output column is zero in every block: it contributes nothing
        for block in llm.blocks(model):
            block.mlp.down_proj.weight[:, 5] = 0
    scores = importance(model, ids)
    assert all(s[5] == 0 and (s[torch.arange(FFN) != 5] > 0).all() for s in scores.ffn)
    assert scores.tokens == ids.numel()
    small = cut(model, scores, ffn_keep=FFN - 1)
    old, new = llm.blocks(model)[0].mlp, llm.blocks(small)[0].mlp
    kept = torch.arange(FFN) != 5
    assert torch.equal(new.gate_proj.weight, old.gate_proj.weight[kept])
    assert torch.equal(new.up_proj.weight, old.up_proj.weight[kept])
    assert torch.equal(new.down_proj.weight, old.down_proj.weight[:, kept])
    assert torch.allclose(_logits(small, ids), _logits(model, ids), atol=1e-5)  # the channel was dead


def test_cut_leaves_the_input_untouched_and_updates_the_config(ids):
    model = _llama(kind="qwen2", use_sliding_window=True, sliding_window=4,
                   layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"])
    before = copy.deepcopy(model.state_dict())
    small = cut(model, importance(model, ids), ffn_keep=0.5, kv_groups_keep=1, drop_layers=[1], hidden_keep=24)

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.num_hidden_layers == LAYERS and len(llm.blocks(model)) == LAYERS
    config = small.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            config.hidden_size, config.num_hidden_layers) == (FFN // 2, HEADS // KV, 1, HEAD_DIM, 24, LAYERS - 1)
    assert config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    assert [block.self_attn.layer_idx for block in llm.blocks(small)] == [0, 1, 2]
    assert small.model.norm.weight.shape == (24,) and small.model.embed_tokens.weight.shape == (VOCAB, 24)
    assert _cache_agrees(small, ids)


@pytest.mark.parametrize("untie", [False, True])
def test_tied_embeddings_stay_tied_and_reload_gives_the_same_logits(ids, tmp_path, untie):
    model = _llama(tie=not untie)
    small = cut(model, importance(model, ids), ffn_keep=0.75, kv_groups_keep=1, drop_layers=1, hidden_keep=20)
    assert llm.tied(small) is not untie
    assert small.lm_head.weight.shape == (VOCAB, 20)
    reloaded = _reloaded(small, tmp_path)
    assert llm.tied(reloaded) is not untie
    assert torch.allclose(_logits(reloaded, ids), _logits(small, ids), atol=1e-5)
    assert _cache_agrees(reloaded, ids)


def test_gpt2_ffn_and_layer_cuts(ids, tmp_path):
    model = _gpt2()
    scores = importance(model, ids)
    assert [s.shape for s in scores.attention] == [(HEADS,)] * LAYERS  # per head: no shared kv heads
    small = cut(model, scores, ffn_keep=0.5, drop_layers=[0, 2])
    assert small.config.n_inner == 2 * HIDDEN and small.config.n_layer == LAYERS - 2
    block = llm.blocks(small)[0]
    assert llm.in_out(block.mlp.c_fc) == (HIDDEN, 2 * HIDDEN) and llm.in_out(block.mlp.c_proj) == (2 * HIDDEN, HIDDEN)
    assert [b.attn.layer_idx for b in llm.blocks(small)] == [0, 1]
    assert llm.tied(small)
    reloaded = _reloaded(small, tmp_path)
    assert torch.allclose(_logits(reloaded, ids), _logits(small, ids), atol=1e-5)
    assert _cache_agrees(reloaded, ids)
    with pytest.raises(ConfigError, match="gpt2: ffn_keep and drop_layers"):
        cut(model, scores, kv_groups_keep=2)


def test_the_last_block_is_dropped_only_when_named():
    scores = DecoderImportance(ffn=(), attention=(), layers=torch.tensor([0.5, 0.1, 0.3, 0.05]),
                               hidden=torch.ones(4), tokens=1)
    assert layers_to_drop(scores, 2) == [1, 2]
    assert layers_to_drop(scores, 2, keep_last=False) == [1, 3]
    with pytest.raises(ConfigError, match=r"drop_layers must be in \[0, 3\]"):
        layers_to_drop(scores, 4)


def test_bad_arguments_are_refused(ids):
    model = _llama()
    scores = importance(model, ids)
    for kwargs, message in (({"ffn_keep": 1.5}, "ffn_keep as a fraction"),
                            ({"ffn_keep": 0}, "ffn_keep as a count"),
                            ({"kv_groups_keep": 3}, "kv_groups_keep as a count"),
                            ({"drop_layers": [4]}, "drop_layers must name"),
                            ({"drop_layers": [0, 1, 2, 3]}, "keep at least one")):
        with pytest.raises(ConfigError, match=message):
            cut(model, scores, **kwargs)
    smaller = cut(model, scores, ffn_keep=0.5)
    with pytest.raises(ConfigError, match="score the model being cut"):
        cut(smaller, scores, ffn_keep=0.5)
    with pytest.raises(ConfigError, match="calibration must be"):
        importance(model, torch.rand(2, 3))
