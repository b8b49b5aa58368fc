"""Costs of a decoder LLM per token: bytes and MACs from the model, modelled time per profile."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slimsearch.compress.quant.grid import quantize_weight
from slimsearch.evaluators.llm_costs import decoder_footprint, quantized_linear_bytes, weight_bytes
from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles import Bound, DecoderFootprint, load_profile, predict_decoder
from slimsearch.structures import llm


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True)).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


def test_float_weight_bytes_are_four_per_parameter_with_tied_embeddings_counted_once():
    model = _llama()
    assert llm.tied(model)
    assert weight_bytes(model) == 4 * sum(p.numel() for p in model.parameters())


def test_gpt2_conv1d_layers_are_costed_with_the_right_macs():
    model = _gpt2()
    d, layers, vocab = 64, 2, 128
    footprint = decoder_footprint(model)
    # per block: qkv 3d^2, attention output d^2, FFN 4d^2 + 4d^2; plus the output projection
    assert footprint.macs == layers * 12 * d * d + vocab * d
    quantized = {path: quantize_weight(llm.weight_of(m), 4, group_size=32, symmetric=True)
                 for path, m in llm.decoder_linears(model).items()}
    packed = decoder_footprint(model, quantized=quantized)
    assert packed.macs == footprint.macs
    saved = sum(a * b * 4 - quantized_linear_bytes(a, b, 4, 32, True)
                for a, b in (llm.in_out(m) for m in llm.decoder_linears(model).values()))
    assert footprint.weight_bytes - packed.weight_bytes == saved > 0


def test_kv_cache_bytes_follow_kv_heads_and_bits():
    model = _llama()  # 2 layers, 2 kv heads of 16
    assert decoder_footprint(model, kv_bits=16).kv_bytes_per_token == 2 * 2 * 2 * 16 * 2
    eight = decoder_footprint(model, kv_bits=8).kv_bytes_per_token
    assert eight == 2 * 2 * 2 * 16 + 2 * 2 * 2 * 2 * 2  # codes plus a float16 scale and zero point per head
    assert eight < decoder_footprint(model, kv_bits=16).kv_bytes_per_token  # (64 + 4) / 128 at head size 64


def test_decode_is_memory_bound_and_fewer_bytes_decode_faster():
    profile = load_profile("raspberry-pi-4")
    big = DecoderFootprint(weight_bytes=500_000_000, macs=125_000_000, kv_bytes_per_token=40_000,
                           attention_macs_per_token=30_000)
    small = dataclasses.replace(big, weight_bytes=big.weight_bytes // 4, weight_bits=4)
    a, b = predict_decoder(profile, big), predict_decoder(profile, small)
    assert a.decode_bound is Bound.MEMORY
    assert b.decode_tok_s == pytest.approx(a.decode_tok_s * 4, rel=0.05)
    assert a.prefill_ms > a.decode_ms_per_token  # 128 tokens of compute
    assert a.usd_per_1m_tokens is None  # no price for a device one owns
    priced = predict_decoder(load_profile("nvidia-t4"), big)
    assert priced.usd_per_1m_tokens == pytest.approx(
        load_profile("nvidia-t4").price_usd_per_hour / 3600 * priced.decode_ms_per_token / 1e3 * 1e6)
    assert priced.to_dict()["provenance"] == "modelled"


def test_energy_per_token_is_the_per_layer_models_with_static_power_and_the_power_mode():
    profile = load_profile("jetson-orin-nano")
    big = DecoderFootprint(weight_bytes=500_000_000, macs=125_000_000, kv_bytes_per_token=40_000,
                           attention_macs_per_token=30_000)
    full, low = predict_decoder(profile, big, power_mode="15W"), predict_decoder(profile, big, power_mode="7W")
    mode_15, mode_7 = profile.power_mode("15W"), profile.power_mode("7W")
    context = 128
    bytes_token = big.weight_bytes + big.kv_bytes_per_token * (context + 1)
    macs_token = big.macs + big.attention_macs_per_token * context
    decode_s = full.decode_ms_per_token / 1e3
    dynamic_mj = (macs_token * profile.energy_pj_per_mac["fp32"] + bytes_token * profile.energy_pj_per_byte) * 1e-9
    assert full.energy_mj_per_token == pytest.approx(dynamic_mj + profile.idle_power_w * decode_s * 1e3)
    # memory-bound: the 7W mode decodes as fast, with less energy per MAC (power over clock)
    assert low.decode_tok_s == pytest.approx(full.decode_tok_s)
    mac_scale = (mode_7.power_w / mode_15.power_w) / (mode_7.clock_mhz / mode_15.clock_mhz)
    saved = macs_token * profile.energy_pj_per_mac["fp32"] * (1 - mac_scale) * 1e-9
    assert full.energy_mj_per_token - low.energy_mj_per_token == pytest.approx(saved)
    assert saved > 0


def test_two_four_sparsity_lowers_cost_only_where_the_profile_accelerates_it():
    dense = DecoderFootprint(weight_bytes=500_000_000, macs=125_000_000, kv_bytes_per_token=40_000,
                             attention_macs_per_token=30_000, weight_bits=16, act_bits=16)
    sparse = dataclasses.replace(dense, sparsity="2:4")
    h100, pi = load_profile("nvidia-h100"), load_profile("raspberry-pi-4")
    assert "2:4" in h100.sparsity_patterns and "2:4" not in pi.sparsity_patterns
    assert predict_decoder(h100, sparse).decode_tok_s > 1.5 * predict_decoder(h100, dense).decode_tok_s
    assert predict_decoder(pi, sparse).decode_tok_s == predict_decoder(pi, dense).decode_tok_s


def test_bad_footprint_and_prompt_are_refused():
    with pytest.raises(ConfigError, match="weight_bytes"):
        DecoderFootprint(weight_bytes=-1, macs=1, kv_bytes_per_token=1, attention_macs_per_token=1)
    ok = DecoderFootprint(weight_bytes=1, macs=1, kv_bytes_per_token=1, attention_macs_per_token=1)
    with pytest.raises(ConfigError, match="prompt_tokens"):
        predict_decoder(load_profile("nvidia-t4"), ok, prompt_tokens=0)


def test_a_quantized_tied_output_projection_is_counted_once_for_both_ends():
    model = _llama()
    vocab, hidden = model.get_input_embeddings().weight.shape
    head8 = quantized_linear_bytes(hidden, vocab, 8, 32, symmetric=True)
    assert weight_bytes(model) - weight_bytes(model, lm_head_bits=8) == vocab * hidden * 4 - head8
