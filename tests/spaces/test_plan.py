"""CompressionPlan, LayerPlan and DistillPlan: JSON round trip and validation."""

from __future__ import annotations

import json
import random

import pytest

from slimsearch.exceptions import ConfigError
from slimsearch.spaces import CompressionPlan, DistillPlan, LayerPlan


def _random_plan(seed: int) -> CompressionPlan:
    rng = random.Random(seed)
    layers = {
        name: LayerPlan(prune_ratio=rng.choice([0.0, 0.1, 0.25, 1 / 3, 0.75]),
                        weight_bits=rng.choice([2, 3, 4, 8, 16, 32]), act_bits=rng.choice([8, 32]))
        for name in rng.sample(["conv1", "conv2", "block.0.conv", "fc1", "fc2"], k=rng.randint(0, 5))
    }
    distill = DistillPlan(steps=rng.choice([0, 50, 300]), temperature=rng.choice([1.0, 4.0, 2.5]),
                          alpha=rng.random(), lr=rng.choice([1e-3, 3e-4]), batch_size=rng.choice([32, 64]))
    return CompressionPlan(layers=layers, distill=distill, seed=rng.randint(0, 2**31))


@pytest.mark.parametrize("seed", range(10))
def test_json_round_trip_gives_an_equal_plan(seed):
    plan = _random_plan(seed)
    text = plan.to_json()
    again = CompressionPlan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    assert CompressionPlan.from_dict(json.loads(text)) == plan


def test_json_is_plain_data_with_every_choice():
    plan = CompressionPlan(layers={"conv1": LayerPlan(0.5, 4, 8)}, distill=DistillPlan(steps=100), seed=7)
    data = json.loads(plan.to_json())
    assert data["layers"] == {"conv1": {"prune_ratio": 0.5, "weight_bits": 4, "act_bits": 8, "rank_ratio": 1.0,
                                        "group_size": 0, "symmetric": True, "sparsity": 0.0,
                                        "sparsity_pattern": "unstructured"}}
    assert data["distill"]["steps"] == 100
    assert data["seed"] == 7


def test_unnamed_layer_is_left_as_it_is():
    plan = CompressionPlan(layers={"conv1": LayerPlan(0.5, 4, 8)})
    assert plan.layer("fc1") == LayerPlan(0.0, 32, 32)
    assert plan.layer("conv1").weight_bits == 4


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_layer_plan_rejects_prune_ratio_outside_zero_to_one(ratio):
    with pytest.raises(ConfigError, match=r"prune_ratio: .* is not allowed; allowed: numbers with 0 <= ratio < 1") as info:
        LayerPlan(prune_ratio=ratio)
    assert str(ratio) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_from_json_validates_layers_and_keys():
    with pytest.raises(ConfigError, match="prune_ratio"):
        CompressionPlan.from_json('{"layers": {"conv1": {"prune_ratio": 1.0}}}')
    with pytest.raises(ConfigError, match="plan: .*width"):
        CompressionPlan.from_json('{"layers": {"conv1": {"width": 0.5}}}')


def test_flat_params_and_describe():
    plan = CompressionPlan(layers={"conv1": LayerPlan(0.25, 4, 8), "fc": LayerPlan()},
                           distill=DistillPlan(steps=50), seed=3)
    flat = plan.flat_params()
    assert flat["prune_ratio.conv1"] == "0.25"
    assert flat["weight_bits.conv1"] == "4"
    assert flat["act_bits.fc"] == "32"
    assert flat["distill.steps"] == "50"
    assert flat["seed"] == "3"
    assert plan.describe() == "conv1:w4a8 -25%, KD 50 steps"  # the float, unpruned fc is not listed


def test_a_plan_with_power_modes_round_trips_through_json_and_says_the_modes():
    plan = CompressionPlan(layers={"conv1": LayerPlan(0.25, 4, 8)}, distill=DistillPlan(steps=50), seed=3,
                           power_modes={"jetson-orin-nano": "7W", "jetson-tx2": "MAXQ"})
    text = plan.to_json()
    assert json.loads(text)["power_modes"] == {"jetson-orin-nano": "7W", "jetson-tx2": "MAXQ"}
    again = CompressionPlan.from_json(text)
    assert again == plan and again.to_json() == text
    flat = plan.flat_params()
    assert flat["power_mode.jetson-orin-nano"] == "7W" and flat["power_mode.jetson-tx2"] == "MAXQ"
    assert plan.describe() == "conv1:w4a8 -25%, KD 50 steps, jetson-orin-nano at 7W, jetson-tx2 at MAXQ"
    # a plan stored before power modes existed reads back with none (every profile at its default)
    old = {k: v for k, v in json.loads(text).items() if k != "power_modes"}
    assert CompressionPlan.from_dict(old).power_modes == {}


def test_power_modes_must_map_profile_names_to_mode_names():
    with pytest.raises(ConfigError, match="power_modes must map profile names to power mode names"):
        CompressionPlan.from_json('{"power_modes": {"jetson-orin-nano": 7}}')


def test_describe_lists_changed_layers_and_counts_them_in_big_plans():
    small = CompressionPlan(layers={"conv1": LayerPlan(0.5, 4, 8), "fc": LayerPlan()}, distill=DistillPlan(steps=10))
    assert small.describe() == "conv1:w4a8 -50%, KD 10 steps"  # the untouched fc is not listed
    layers = {f"encoder.layer.{i}.{part}": LayerPlan(weight_bits=8, act_bits=8 if i < 4 else 32)
              for i in range(6) for part in ("query", "key")}
    layers.update({f"encoder.layer.{i}.ffn": LayerPlan(prune_ratio=0.5) for i in range(3)})
    big = CompressionPlan(layers=layers, drop=("encoder.layer.5",))
    assert big.describe() == "4 layers w8a32, 8 layers w8a8, 3 groups -50%, drop encoder.layer.5, KD 0 steps"


def test_a_causal_lm_plans_model_wide_choices_round_trip_and_are_described():
    plan = CompressionPlan(layers={"down": LayerPlan(weight_bits=4)}, weight_method="gptq", kv_bits=8,
                           ffn_keep=0.75, drop_layers=2)
    again = CompressionPlan.from_json(plan.to_json())
    assert again == plan and again.kv_bits == 8 and again.weight_method == "gptq"
    assert plan.flat_params()["kv_bits"] == "8" and plan.flat_params()["ffn_keep"] == "0.75"
    assert plan.describe() == "down:w4a32, weight_method gptq, kv_bits 8, ffn_keep 0.75, drop_layers 2, KD 0 steps"
    old = {k: v for k, v in json.loads(CompressionPlan().to_json()).items()
           if k not in ("weight_method", "kv_bits", "ffn_keep", "kv_groups_keep", "hidden_keep", "drop_layers",
                        "smooth_alpha")}
    assert CompressionPlan.from_dict(old) == CompressionPlan()  # a plan stored before these choices
    with pytest.raises(ConfigError, match=r"kv_bits must be one of \[4, 8, 16, 32\], got 7"):
        CompressionPlan(kv_bits=7)
