"""evaluators/decoder.py: a decoder LLM's costs per generated token, and one SmolLM2 candidate end to end."""

from __future__ import annotations

import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from slimsearch.compress.llm_methods import DecoderRecord  # noqa: E402
from slimsearch.evaluators.decoder import CONTEXT_TOKENS, decoder_costs  # noqa: E402
from slimsearch.evaluators.llm_costs import decoder_footprint, weight_bytes  # noqa: E402
from slimsearch.hardware_profiles import load_profile, predict_decoder  # noqa: E402
from tests import _tiny_llm  # noqa: E402


def test_costs_per_token_are_the_footprint_on_each_profile_all_modelled_but_the_timed_ones():
    model = _tiny_llm.llama()
    measured = {"latency_ms@local": 3.0}
    costs = decoder_costs(model, ["raspberry-pi-4", "nvidia-t4", "edge-tpu"], measured=measured)
    footprint = decoder_footprint(model)
    pred = predict_decoder(load_profile("nvidia-t4"), footprint, prompt_tokens=CONTEXT_TOKENS,
                           context_tokens=CONTEXT_TOKENS)
    v = costs.values
    assert v["size_bytes"] == weight_bytes(model) and v["macs"] == footprint.macs
    assert v["params"] == sum(p.numel() for p in model.parameters())
    assert (v["latency_ms@nvidia-t4"], v["energy_mj@nvidia-t4"], v["cost_usd_per_1m@nvidia-t4"]) == (
        pred.decode_ms_per_token, pred.energy_mj_per_token, pred.usd_per_1m_tokens)
    assert v["decode_tok_s@nvidia-t4"] == pytest.approx(1000 / pred.decode_ms_per_token)
    assert v["cost_usd_per_1m@raspberry-pi-4"] is None  # not rented
    assert v["latency_ms@edge-tpu"] is None and v["decode_tok_s@edge-tpu"] is None  # int8 only: a float LLM does not run there
    assert costs.provenance["latency_ms@local"].value == "measured"
    assert {costs.provenance[k].value for k in v if "@" in k and not k.endswith("@local")} == {"modelled"}


def test_a_smaller_kv_cache_and_2_4_sparsity_lower_the_modelled_decode_only_where_they_apply():
    model = _tiny_llm.llama()
    profiles = ["nvidia-a100", "raspberry-pi-4"]
    dense = decoder_costs(model, profiles).values
    sparse = decoder_costs(model, profiles, record=DecoderRecord(sparsity="2:4")).values
    assert sparse["latency_ms@nvidia-a100"] < dense["latency_ms@nvidia-a100"]  # Ampere runs 2:4
    assert sparse["latency_ms@raspberry-pi-4"] == dense["latency_ms@raspberry-pi-4"]  # a Pi does not
    assert sparse["size_bytes"] == dense["size_bytes"]  # zeros stored dense
    small_cache = decoder_costs(model, profiles, record=DecoderRecord(kv_bits=4)).values
    assert small_cache["latency_ms@raspberry-pi-4"] < dense["latency_ms@raspberry-pi-4"]


def test_memory_is_the_weights_and_a_kv_cache_of_2048_tokens_at_the_models_kv_precision():
    from slimsearch.compress.kv_cache import kv_cache_bytes

    model = _tiny_llm.llama()  # 2 blocks, 2 key/value heads of 16: a float32 cache is 2 x 2 x 2 x 16 x 4 bytes a token
    v = decoder_costs(model, []).values
    assert v["memory_bytes"] == v["size_bytes"] + 2048 * 2 * 2 * 2 * 16 * 4
    kv8 = decoder_costs(model, [], record=DecoderRecord(kv_bits=8)).values
    assert kv8["memory_bytes"] == kv8["size_bytes"] + kv_cache_bytes(model, 2048, 8)
    assert kv8["memory_bytes"] < v["memory_bytes"]


def test_a_paired_timing_is_the_median_per_round_ratio_times_the_teachers_quiet_figure():
    from slimsearch.evaluators.decoder import paired_decoder_figures

    # the machine slowed both graphs alike in round 2; the candidate ran twice as fast as the teacher throughout
    timing = {"decode_runs_ms_per_token": [5.0, 10.0, 5.5], "prefill_runs_ms": [20.0, 40.0, 21.0],
              "reference": {"decode_runs_ms_per_token": [10.0, 20.0, 11.0], "prefill_runs_ms": [40.0, 80.0, 42.0]}}
    tok_s, prefill = paired_decoder_figures(timing, {"decode_tok_s@local": 50.0, "prefill_ms@local": 60.0})
    assert tok_s == pytest.approx(100.0) and prefill == pytest.approx(30.0)


def test_a_decoder_reference_needs_the_teachers_quiet_figures():
    from slimsearch.evaluators.decoder import decoder_reference
    from slimsearch.exceptions import ConfigError

    with pytest.raises(ConfigError, match="quiet prefill_ms@local must be a number > 0"):
        decoder_reference(_tiny_llm.llama(), {"decode_tok_s@local": 50.0})


@pytest.mark.slow
def test_one_smollm2_candidate_end_to_end():
    """Round-to-nearest 4-bit weights (groups of 128) and an 8-bit KV cache on SmolLM2-135M: the candidate
    is scored on Wikipedia against its teacher and costed per token. (GPTQ on the real model takes a
    minute more here; benchmarks/llm.py measures it, tests/compress its steps on tiny models.)"""
    from slimsearch.evaluators import evaluate
    from slimsearch.spaces.plan import CompressionPlan, LayerPlan
    from slimsearch.tasks import load_task

    task = load_task("smollm2")
    teacher_ppl = task.scorer(task.teacher, task.val, False)["ppl"]
    plan = CompressionPlan(layers={g: LayerPlan(weight_bits=4, group_size=128) for g in task.layers},
                           weight_method="rtn", kv_bits=8)
    m = evaluate(task, plan, ["raspberry-pi-4"], teacher_score=teacher_ppl).values
    assert math.isfinite(m["ppl"]) and math.isfinite(m["ppl_test"])
    assert m["ppl_increase"] == pytest.approx(m["ppl"] / teacher_ppl - 1) and 0 < m["ppl_increase"] < 1
    assert m["kl"] > 0 and 0.3 < m["top1"] < 1
    assert m["size_bytes"] < 0.4 * 538_060_032 and m["latency_ms@local"] > 0
    assert m["latency_ms@raspberry-pi-4"] > 0
