"""Post-training quantization of decoder LLMs (RTN, GPTQ, AWQ, SmoothQuant W8A8, KV cache)
on tiny random Llama (grouped-query attention) and GPT-2 models."""

from __future__ import annotations

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from slimsearch.compress.gptq import gptq_weight, hessian  # noqa: E402
from slimsearch.compress.kv_cache import KVCacheConfig, kv_cache_bytes, quantize_kv_cache  # noqa: E402
from slimsearch.compress.quant.grid import code_range, quantize_weight  # noqa: E402
from slimsearch.compress.smoothquant import (  # noqa: E402
    SmoothQuantConfig,
    add_activation_quant,
    quantize_weights_int8,
    smooth,
    smoothquant,
)
from slimsearch.compress.weight_only import WeightOnlyConfig, quantize_weights  # noqa: E402
from slimsearch.exceptions import ConfigError  # noqa: E402
from slimsearch.structures import llm  # noqa: E402

torch.set_num_threads(1)


def _llama(hidden: int = 64):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)).eval()


def _mha_llama():
    """No shared key/value heads: o_proj's scales fold into v_proj."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def _outliers(model):
    """Give the norms a few large channels, as trained LLMs have, so scales matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name:
                if name.endswith("weight"):
                    param.copy_(1.0 + 0.5 * torch.rand_like(param))
                    param[:3] *= 8.0
                else:
                    param.copy_(0.1 * torch.randn_like(param))
    return model


CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _check_stored(model, stored, bits, symmetric):
    linears = llm.decoder_linears(model)
    assert set(stored) == set(linears)
    lo, hi = code_range(bits, symmetric)
    for path, qw in stored.items():
        module = linears[path]
        assert type(module).__name__ in ("Linear", "Conv1D")
        assert torch.equal(llm.weight_of(module), qw.dequantize())
        assert int(qw.codes.min()) >= lo and int(qw.codes.max()) <= hi
        assert qw.scale_step is None and qw.scale.dtype == torch.float32


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_weights_become_their_dequantized_codes(method, family):
    model = _llama() if family == "llama" else _gpt2()
    config = WeightOnlyConfig(method=method, bits=3, group_size=32, symmetric=family == "llama")
    stored = quantize_weights(model, config, CALIB)
    _check_stored(model, stored, 3, config.symmetric)
    if family == "gpt2":  # Conv1D keeps (in, out): the returned codes are (out, in)
        conv = model.transformer.h[0].attn.c_attn
        assert torch.equal(stored["transformer.h.0.attn.c_attn"].dequantize().t(), conv.weight)
    assert llm.tied(model)
    assert torch.isfinite(_logits(model)).all()


def test_partial_last_group_and_overrides():
    model = _llama(hidden=80)  # 80 = 2 groups of 32 + one of 16
    config = WeightOnlyConfig(method="gptq", bits=4, group_size=32, groups=("qkv", "gate_up"),
                              overrides={"1.down": 8, "0.qkv": 16})
    stored = quantize_weights(model, config, CALIB)
    q = stored["model.layers.1.self_attn.q_proj"]
    assert q.scale.shape == (q.codes.shape[0], 3) and q.group_size == 32
    assert "model.layers.0.self_attn.q_proj" not in stored and "model.layers.0.mlp.down_proj" not in stored
    assert stored["model.layers.1.mlp.down_proj"].bits == 8
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, q.dequantize())


@pytest.mark.parametrize("build", [_llama, _mha_llama, _gpt2])
def test_smoothing_keeps_the_float_function(build):
    model = _outliers(build())
    before = _logits(model)
    scales = smooth(model, SmoothQuantConfig(alpha=0.5), CALIB)
    assert scales and all(not torch.allclose(s, torch.ones_like(s)) for s in scales.values())
    assert torch.allclose(_logits(model), before, atol=1e-4, rtol=1e-4)
    assert llm.tied(model)


@pytest.mark.parametrize("build", [_llama, _mha_llama, _gpt2])
def test_awq_folding_keeps_the_float_function(build, monkeypatch):
    """With rounding switched off, AWQ's search and folding alone leave the logits as they were."""
    from slimsearch.compress import awq as awq_module

    model = _outliers(build())
    before = _logits(model)
    folded = []
    real_fold = awq_module.fold_scales
    monkeypatch.setattr(awq_module, "fold_scales", lambda *a: folded.append(a[1]) or real_fold(*a))
    monkeypatch.setattr(awq_module, "store", lambda model, path, qw, out: out.__setitem__(path, qw))
    awq_module.awq(model, WeightOnlyConfig(method="awq", bits=3, group_size=32, clip=False), CALIB)
    assert folded
    assert torch.allclose(_logits(model), before, atol=1e-4, rtol=1e-4)


def test_awq_folds_o_proj_only_without_shared_kv_heads():
    from slimsearch.compress._calibration import foldable

    o = next(g for g in llm.family_of(_llama()).groups if g.name == "o")
    assert not foldable(_llama(), o) and foldable(_mha_llama(), o)


@pytest.mark.parametrize("group_size,symmetric", [(32, True), (48, False), (0, True)])
def test_gptq_output_error_is_below_rtn(group_size, symmetric):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=generator) @ torch.randn(64, 64, generator=generator)
    weight = torch.randn(24, 64, generator=generator)
    exact = x @ weight.t()
    for bits in (3, 4):
        rtn = quantize_weight(weight, bits, group_size=group_size, symmetric=symmetric, two_level=False)
        gptq = gptq_weight(weight, hessian([x]), bits=bits, group_size=group_size, symmetric=symmetric)
        assert gptq.scale.shape == rtn.scale.shape
        rtn_error = float((exact - x @ rtn.dequantize().t()).norm())
        gptq_error = float((exact - x @ gptq.dequantize().t()).norm())
        assert gptq_error < 0.9 * rtn_error


def test_gptq_and_awq_beat_rtn_on_the_model():
    """Logit error against the float model, 3 bits: both calibrated methods improve on RTN."""
    reference = _logits(_outliers(_llama()), CALIB)
    errors = {}
    for method in ("rtn", "gptq", "awq"):
        model = _outliers(_llama())
        quantize_weights(model, WeightOnlyConfig(method=method, bits=3, group_size=32), CALIB)
        errors[method] = float((_logits(model, CALIB) - reference).norm())
    assert errors["gptq"] < errors["rtn"] and errors["awq"] < errors["rtn"], errors


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_smoothquant_w8a8(family):
    model = _outliers(_llama() if family == "llama" else _gpt2())
    before = _logits(model)
    result = smoothquant(model, SmoothQuantConfig(), CALIB)
    _check_stored(model, result.weights, 8, True)
    assert all(qw.group_size == 0 for qw in result.weights.values())
    quantized = _logits(model)
    assert 0 < float((quantized - before).abs().max()) < 0.1 * float(before.abs().max())
    result.hooks.remove()
    assert not torch.equal(_logits(model), quantized)  # activations back in float
    assert llm.tied(model)


def test_activation_hooks_round_per_token():
    model = _llama()
    seen = []
    linear = model.model.layers[0].mlp.down_proj
    handle = add_activation_quant(model)
    linear.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    _logits(model)
    handle.remove()
    x = seen[0]
    scale = x.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(x / scale, (x / scale).round(), atol=1e-3)
    assert quantize_weights_int8(model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_cache_precision(family):
    model = _llama() if family == "llama" else _gpt2()
    before = _logits(model)
    changes = {}
    for bits in (16, 8, 4):
        handle = quantize_kv_cache(model, KVCacheConfig(bits=bits))
        changes[bits] = float((_logits(model) - before).abs().max())
        handle.remove()
    assert torch.equal(_logits(model), before)
    assert changes[16] < changes[8] < changes[4]
    assert 0 < changes[8] < 0.05 * float(before.abs().max())


def test_kv_cache_bytes():
    model = _llama()  # 2 layers, 2 kv heads of 16
    assert kv_cache_bytes(model, 100, 16) == 2 * 2 * 2 * 16 * 2 * 100
    assert kv_cache_bytes(model, 100, 8, batch=3) == 2 * 2 * 2 * (16 + 4) * 100 * 3
    assert kv_cache_bytes(model, 100, 4) == 2 * 2 * 2 * (8 + 4) * 100
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(  # head_dim 64, as SmolLM2's
        vocab_size=32, hidden_size=128, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    assert 0.5 < kv_cache_bytes(wide, 512, 8) / kv_cache_bytes(wide, 512, 16) < 0.55
    with pytest.raises(ConfigError, match=r"kv_cache_bytes bits must be one of \[16, 8, 4\], got 3"):
        kv_cache_bytes(model, 10, 3)


def test_configs_round_trip_through_json():
    configs = [WeightOnlyConfig(method="gptq", bits=3, group_size=64, symmetric=False, groups=("qkv", "down"),
                                overrides={"11.down": 8}),
               SmoothQuantConfig(alpha=0.75), KVCacheConfig(bits=4)]
    for config in configs:
        again = type(config)(**json.loads(json.dumps(dataclasses.asdict(config))))
        assert again == config


@pytest.mark.parametrize("build,message", [
    (lambda: WeightOnlyConfig(method="gptq", bits=5), "WeightOnlyConfig.bits must be one of [2, 3, 4, 8], got 5"),
    (lambda: WeightOnlyConfig(group_size=100), "WeightOnlyConfig.group_size must be one of [0, 32, 64, 128], got 100"),
    (lambda: WeightOnlyConfig(method="hqq"), "WeightOnlyConfig.method must be one of ['rtn', 'gptq', 'awq']"),
    (lambda: WeightOnlyConfig(groups=("qkv", "lm_head")), "WeightOnlyConfig.groups must be one of"),
    (lambda: WeightOnlyConfig(overrides={"down": 4}), "WeightOnlyConfig.overrides keys must be 'block.group'"),
    (lambda: WeightOnlyConfig(overrides={"3.down": 5}), "WeightOnlyConfig.overrides['3.down'] must be one of"),
    (lambda: WeightOnlyConfig(sink_weight=1.0), "WeightOnlyConfig.sink_weight must be in [0, 1), got 1.0"),
    (lambda: SmoothQuantConfig(alpha=1.5), "SmoothQuantConfig.alpha must be a number in [0, 1], got 1.5"),
    (lambda: KVCacheConfig(bits=2), "KVCacheConfig.bits must be one of [16, 8, 4], got 2"),
])
def test_bad_values_raise_one_line(build, message):
    with pytest.raises(ConfigError) as info:
        build()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_calibrated_methods_need_token_windows():
    with pytest.raises(ConfigError, match="needs calibration"):
        quantize_weights(_llama(), WeightOnlyConfig(method="gptq"))
    with pytest.raises(ConfigError, match="LongTensor of token windows"):
        quantize_weights(_llama(), WeightOnlyConfig(method="awq"), torch.rand(2, 8))
    with pytest.raises(ConfigError, match="blocks the model lacks"):
        quantize_weights(_llama(), WeightOnlyConfig(overrides={"7.down": 8}))


def test_hessian_gives_the_first_tokens_their_share():
    x = torch.zeros(3, 5, 2)
    x[:, 0, 0] = 1.0  # first tokens on feature 0
    x[:, 1:, 1] = 2.0  # the others on feature 1
    plain = hessian([x])
    assert torch.allclose(torch.diagonal(plain), torch.tensor([2 * 3 / 15, 2 * 4 * 12 / 15]))
    weighted = hessian([x], sink_weight=0.25)
    assert torch.allclose(torch.diagonal(weighted), torch.tensor([2 * 0.25, 2 * 0.75 * 4]))
    with pytest.raises(ValueError, match="windows, seq_len, in"):
        hessian([x[0]], sink_weight=0.25)
