"""Low-rank factorisation, added through the method registry alone (compress/lowrank.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slimsearch.compress import apply_plan, config_from_json, config_to_json, plan_configs
from slimsearch.compress.lowrank import LowRankConfig, factorise, low_rank, rank_of
from slimsearch.compress.quant.layers import QLinear, quantized_twin
from slimsearch.exceptions import ConfigError
from slimsearch.spaces import CompressionPlan
from slimsearch.spaces.plan import DistillPlan, LayerPlan
from slimsearch.tasks import Preprocessing, Split, Task
from slimsearch.tasks._base import accuracy


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 1, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(24 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 5)).eval()


def _task() -> Task:
    gen = torch.Generator().manual_seed(1)
    split = Split(torch.randn(96, 3, 8, 8, generator=gen), torch.randint(0, 5, (96,), generator=gen))
    return Task(name="tiny", teacher=_net(), train=split, val=split, test=split, metric=accuracy,
                metric_name="accuracy", example_input=split.x[:1],
                preprocessing=Preprocessing("input", (1, 3, 8, 8), "float32", 1.0, 0.0, 1.0, "NCHW"))


def test_full_rank_factors_give_the_layer_back_and_a_lower_rank_its_best_approximation():
    linear = _net()[5]
    x = torch.randn(7, linear.in_features)
    whole = low_rank(linear, 1.0)
    assert torch.allclose(whole(x), linear(x), atol=1e-5)
    r = rank_of(linear, 0.25)
    assert r == 8  # a quarter of min(32, 384)
    cut = low_rank(linear, 0.25)
    u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
    best = ((u[:, :r] * s[:r]) @ vh[:r]).float()  # Eckart-Young: the best rank-r weight
    assert torch.allclose(cut(x), x @ best.T + linear.bias, atol=1e-5)
    assert sum(p.numel() for p in cut.parameters()) == r * (384 + 32) + 32


def test_a_1x1_conv_keeps_its_stride_and_a_3x3_conv_is_left_whole():
    model, x = _net(), torch.randn(2, 3, 8, 8)
    before = model(x)
    factorise(model, LowRankConfig({"2": 1.0 - 1e-9, "0": 0.5}))
    assert isinstance(model[2], nn.Sequential) and model[2][0].stride == (2, 2)
    assert type(model[0]) is nn.Conv2d  # k x k: not factorisable, its ratio has no effect
    assert torch.allclose(model(x), before, atol=1e-4)


def test_a_quantized_layer_becomes_quantized_factors_at_its_settings():
    layer = quantized_twin(_net()[5], 4, 8, group_size=16, symmetric=False)
    factors = low_rank(layer, 0.5)
    for part in factors:
        assert isinstance(part, QLinear)
        assert (part.weight_bits, part.act_bits, part.symmetric) == (4, 8, False)


def test_an_unknown_layer_and_a_bad_ratio_are_refused_with_one_line():
    with pytest.raises(ConfigError, match="lowrank: unknown layer 'fc9'"):
        factorise(_net(), LowRankConfig({"fc9": 0.5}))
    with pytest.raises(ConfigError, match=r"rank ratios .* must be in \(0, 1\)"):
        LowRankConfig({"5": 1.5})
    with pytest.raises(ConfigError, match="rank_ratio: 0.0 is not allowed"):
        LayerPlan(rank_ratio=0.0)


def test_the_plan_choice_reaches_the_model_through_the_registry_and_round_trips():
    task = _task()
    plan = CompressionPlan(layers={"5": LayerPlan(rank_ratio=0.25, weight_bits=8)})
    configs = plan_configs(plan)
    lowrank = [c for c in configs if isinstance(c, LowRankConfig)]
    assert lowrank == [LowRankConfig({"5": 0.25})]
    assert config_from_json(config_to_json(lowrank[0])) == lowrank[0]
    assert CompressionPlan.from_json(plan.to_json()) == plan
    model = apply_plan(task, plan)
    assert isinstance(model[5], nn.Sequential)
    assert all(part.weight_bits == 8 and part.frozen for part in model[5])  # quantized, then frozen


def test_params_macs_and_modelled_latency_count_the_two_factors():
    from slimsearch.evaluators.estimate import estimate

    task = _task()
    whole = estimate(task, CompressionPlan(), ["raspberry-pi-4"]).values
    cut = estimate(task, CompressionPlan(layers={"5": LayerPlan(rank_ratio=0.25)}), ["raspberry-pi-4"]).values
    assert whole["params"] - cut["params"] == 384 * 32 - 8 * (384 + 32)
    assert whole["macs"] - cut["macs"] == 384 * 32 - 8 * (384 + 32)
    assert cut["size_bytes"] < whole["size_bytes"]


def test_the_profile_costs_the_two_factors_as_two_layers():
    from slimsearch.hardware_profiles import layer_costs, predict

    big, x = nn.Linear(2048, 2048), torch.randn(1, 2048)
    whole, cut = layer_costs(big, x), layer_costs(low_rank(big, 0.25), x)
    assert [layer.macs for layer in whole] == [2048 * 2048]
    assert [layer.macs for layer in cut] == [2048 * 512, 512 * 2048]
    # a big layer is compute- or memory-bound: half the work, less modelled time; a tiny one pays
    # a second layer's overhead instead (the profile's per-layer cost), which the model keeps
    assert predict(cut, "raspberry-pi-4").latency_ms < predict(whole, "raspberry-pi-4").latency_ms


def test_the_factorised_model_exports_to_onnx_and_runs_there_as_in_torch():
    from slimsearch.deploy.onnx_graph import INPUT_NAME, ort_session
    from slimsearch.deploy.onnx_int8 import deployable_onnx_bytes

    task = _task()
    model = apply_plan(task, CompressionPlan(layers={"2": LayerPlan(rank_ratio=0.5), "5": LayerPlan(rank_ratio=0.25)}))
    session = ort_session(deployable_onnx_bytes(model, task.example_input))
    x = task.val.x[:8]
    out = session.run(None, {INPUT_NAME: x.numpy()})[0]
    np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-4)
    ops = [node.op_type for node in __import__("onnx").load_from_string(
        deployable_onnx_bytes(model, task.example_input)).graph.node]
    assert ops.count("Gemm") + ops.count("MatMul") >= 3 and ops.count("Conv") == 3


def test_a_job_space_searches_the_rank_ratio_of_a_named_layer():
    from slimsearch.spaces import SearchSpace
    from slimsearch.spaces.schema import SpaceSpec

    spec = SpaceSpec(layers={"fc1": {"rank_ratio": [0.25, 1.0]}})
    space = SearchSpace.build(spec, ["conv1", "fc1"], ["conv1"])
    assert dict(space.choices)["rank_ratio.fc1"] == (0.25, 1.0)
    assert "rank_ratio.conv1" not in dict(space.choices)  # one value (1.0, the default): not a parameter
    plan = space.plan_from_params({name: values[0] for name, values in space.choices})
    assert plan.layer("fc1").rank_ratio == 0.25 and plan.layer("conv1").rank_ratio == 1.0


def test_apply_plan_leaves_the_teacher_as_it_was():
    """The teacher is copied once, before the first method that would change it (pruning copies
    by itself); a pruned, quantized, factorised and distilled candidate leaves it untouched."""
    task = _task()
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    plan = CompressionPlan(layers={"0": LayerPlan(prune_ratio=0.5, weight_bits=4), "5": LayerPlan(rank_ratio=0.25)},
                           distill=DistillPlan(steps=3))
    model = apply_plan(task, plan)
    assert model is not task.teacher and model[0].out_channels == 8
    after = task.teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
