"""compress/llm_methods.py: the decoder-LLM methods, registered and read off a plan, on tiny models."""

from __future__ import annotations

import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from slimsearch.compress import apply_plan, config_from_json, config_to_json, methods, plan_configs  # noqa: E402
from slimsearch.compress.llm_methods import LLMWeightsConfig, hooks_off, record_of  # noqa: E402
from slimsearch.evaluators.decoder import measure_decoder  # noqa: E402
from slimsearch.evaluators.estimate import estimate  # noqa: E402
from slimsearch.metric_names import TaskFamily  # noqa: E402
from slimsearch.spaces.plan import CompressionPlan, DistillPlan, LayerPlan  # noqa: E402
from slimsearch.structures import llm  # noqa: E402
from slimsearch.tasks import load_task  # noqa: E402
from tests import _tiny_llm  # noqa: E402

GROUPS = ("qkv", "o", "gate_up", "down")
PROFILES = ["raspberry-pi-4", "nvidia-a100"]
from tests._tiny_llm import one_thread  # noqa: F401, E402 (a fixture)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-methods")
    text = str(_tiny_llm.text(root / "notes.txt"))
    return {kind: load_task(f"causal-lm:{_tiny_llm.folder(root / kind, kind)}", text=text)
            for kind in ("llama", "gpt2")}


def _plan(bits=4, method="gptq", group_size=32, **model_wide) -> CompressionPlan:
    layers = {g: LayerPlan(weight_bits=bits, group_size=group_size, sparsity_pattern="2:4") for g in GROUPS}
    return CompressionPlan(layers=layers, weight_method=method, **model_wide)


def _ppl(task, model) -> float:
    return task.scorer(model, task.val, False)["ppl"]


def _reloaded(model, tmp_path):
    model.save_pretrained(tmp_path)
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()


def test_gptq_4_bit_kv_8_a_cut_and_healing_give_a_standard_model_with_a_finite_perplexity(tasks, tmp_path):
    task = tasks["llama"]
    teacher_state = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    plan = _plan(kv_bits=8, ffn_keep=0.5, kv_groups_keep=0.5, drop_layers=1)
    plan = CompressionPlan.from_dict({**plan.to_dict(), "distill": {"steps": 2, "lr": 1e-4}})
    model = apply_plan(task, plan)
    assert math.isfinite(_ppl(task, model))
    config = model.config
    assert (config.num_hidden_layers, config.intermediate_size, config.num_key_value_heads,
            config.num_attention_heads) == (1, 48, 1, 2)
    record = record_of(model)
    assert set(record.quantized) == set(llm.decoder_linears(model)) and record.kv_bits == 8
    assert {q.bits for q in record.quantized.values()} == {4}
    reloaded = _reloaded(model, tmp_path)  # a plain Hugging Face folder: the cut config is standard
    x = task.val.x[:1]
    with torch.no_grad(), hooks_off(model):
        assert torch.allclose(reloaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)
    assert all(torch.equal(v, teacher_state[k]) for k, v in task.teacher.state_dict().items())


def test_gpt2_with_awq_8_bit_a_cut_ffn_a_dropped_block_and_healing(tasks, tmp_path):
    task = tasks["gpt2"]
    plan = CompressionPlan.from_dict({**_plan(bits=8, method="awq", group_size=0, ffn_keep=0.75, drop_layers=1)
                                      .to_dict(), "distill": {"steps": 2, "lr": 1e-4}})
    model = apply_plan(task, plan)
    assert math.isfinite(_ppl(task, model))
    assert (model.config.n_layer, model.config.n_inner) == (1, 192)
    assert type(_reloaded(model, tmp_path)).__name__ == "GPT2LMHeadModel"


def test_a_plan_and_its_method_configs_round_trip_through_json_and_rebuild_the_same_model(tasks):
    task = tasks["llama"]
    plan = _plan(bits=4, method="rtn", kv_bits=4, hidden_keep=0.5, smooth_alpha=0.8)
    plan = CompressionPlan(layers={**plan.layers, "down": LayerPlan(weight_bits=8, act_bits=8, group_size=32,
                                                                      sparsity_pattern="2:4")},
                           distill=DistillPlan(steps=1, lr=1e-4), weight_method="rtn", kv_bits=4, hidden_keep=0.5,
                           smooth_alpha=0.8, seed=3)
    again = CompressionPlan.from_json(plan.to_json())
    assert again == plan
    configs = plan_configs(plan, TaskFamily.CAUSAL_LM)
    assert [type(c).__name__ for c in configs] == ["LLMCutConfig", "HealConfig", "SmoothQuantStep",
                                                   "LLMWeightsConfig", "KVCacheConfig"]
    assert [config_from_json(config_to_json(c)) for c in configs] == configs
    first, second = apply_plan(task, plan), apply_plan(task, again)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_per_group_bits_become_the_commonest_width_and_per_block_overrides():
    config = LLMWeightsConfig("gptq", {"qkv": 4, "o": 4, "gate_up": 4, "down": 8}, 64, False).weight_config(3)
    assert (config.method, config.bits, config.groups, config.group_size, config.symmetric) == (
        "gptq", 4, ("qkv", "o", "gate_up"), 64, False)
    assert config.overrides == {"0.down": 8, "1.down": 8, "2.down": 8}


def test_a_block_s_own_key_overrides_its_group_and_may_leave_it_in_float(tasks):
    config = LLMWeightsConfig("rtn", {"down": 4, "1.down": 32, "0.qkv": 8}, 32).weight_config(2)
    assert (config.bits, config.groups) == (4, ("down",))
    assert config.overrides == {"1.down": 16, "0.qkv": 8}  # 16: float, as WeightOnlyConfig writes it
    layers = {"down": LayerPlan(weight_bits=4, group_size=32), "1.down": LayerPlan(weight_bits=32, group_size=32),
              "0.qkv": LayerPlan(weight_bits=8, group_size=32)}
    plan = CompressionPlan(layers=layers)
    model = apply_plan(tasks["llama"], plan)
    bits = {path: q.bits for path, q in record_of(model).quantized.items()}
    assert bits == {"model.layers.0.mlp.down_proj": 4, "model.layers.0.self_attn.q_proj": 8,
                    "model.layers.0.self_attn.k_proj": 8, "model.layers.0.self_attn.v_proj": 8}
    from slimsearch.evaluators.costs import task_costs

    estimated = estimate(tasks["llama"], plan, PROFILES).values  # the shape-only estimate reads them alike
    built = task_costs(model, tasks["llama"], PROFILES).values
    assert estimated == {k: v for k, v in built.items() if k in estimated}


def test_each_family_runs_its_own_methods_and_the_cnn_quantizer_never_touches_an_llm(tasks):
    llm_methods = {m.name for m in methods(TaskFamily.CAUSAL_LM)}
    cnn_methods = {m.name for m in methods(TaskFamily.CLASSIFICATION)}
    assert llm_methods == {"llm_cut", "heal", "wanda", "smoothquant", "weight_only", "output_head", "kv_cache"}
    assert not llm_methods & cnn_methods and {"quantize", "prune", "distill"} <= cnn_methods
    plan = _plan(bits=4, method="rtn")
    assert [type(c).__name__ for c in plan_configs(plan, TaskFamily.CLASSIFICATION)][:1] == ["QuantizeConfig"]
    model = apply_plan(tasks["llama"], plan)
    assert {type(m).__name__ for m in llm.decoder_linears(model).values()} == {"Linear"}


def test_w8a8_smoothquant_and_wanda_2_4_on_every_group_are_recorded(tasks):
    task = tasks["llama"]
    layers = {g: LayerPlan(weight_bits=8, act_bits=8, group_size=0, sparsity=0.5, sparsity_pattern="2:4")
              for g in GROUPS}
    model = apply_plan(task, CompressionPlan(layers=layers, weight_method="rtn"))
    record = record_of(model)
    assert (record.act_bits, record.sparsity) == (8, "2:4") and len(record.act_paths) == 14
    weight = llm.weight_of(llm.get(model, "model.layers.0.mlp.down_proj"))
    assert bool(((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
    assert math.isfinite(_ppl(task, model))
    x = task.val.x[:1]
    with torch.no_grad():
        hooked = model(input_ids=x).logits
        with hooks_off(model):
            plain = model(input_ids=x).logits
        assert not torch.equal(hooked, plain) and torch.equal(model(input_ids=x).logits, hooked)


def test_the_estimate_before_building_is_the_built_candidates_cost(tasks):
    task = tasks["llama"]
    plan = CompressionPlan(layers={**_plan(bits=4).layers, "down": LayerPlan(weight_bits=8, act_bits=8, group_size=32,
                                                                             sparsity_pattern="2:4")},
                           weight_method="rtn", kv_bits=8, head_bits=8, ffn_keep=0.5, drop_layers=1)
    from slimsearch.evaluators.costs import task_costs

    built = task_costs(apply_plan(task, plan), task, PROFILES).values
    estimated = estimate(task, plan, PROFILES).values
    assert estimated == {k: v for k, v in built.items() if k in estimated}
    teacher = task_costs(task.teacher, task, PROFILES).values
    assert estimated["size_bytes"] < teacher["size_bytes"] / 2
    assert estimated["latency_ms@raspberry-pi-4"] < teacher["latency_ms@raspberry-pi-4"]


def test_decode_is_timed_on_the_deployed_graph_with_the_simulation_hooks_put_back(tasks):
    task = tasks["llama"]
    model = apply_plan(task, _plan(bits=8, method="rtn", kv_bits=4))
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 4  # k_proj and v_proj of each block round keys and values
    timed = measure_decoder(model, task)
    assert set(timed) == {"latency_ms@local", "decode_tok_s@local", "prefill_ms@local"}
    assert timed["decode_tok_s@local"] == pytest.approx(1000 / timed["latency_ms@local"], rel=0.05)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


def test_a_model_the_graph_builder_cannot_build_is_timed_in_pytorch(tasks):
    # onnxruntime-genai's builder has no GPT-2: its decode is timed in PyTorch (no prefill figure)
    task = tasks["gpt2"]
    timed = measure_decoder(apply_plan(task, _plan(bits=8, method="rtn")), task)
    assert set(timed) == {"latency_ms@local", "decode_tok_s@local"}
    assert timed["decode_tok_s@local"] == pytest.approx(1000 / timed["latency_ms@local"])
