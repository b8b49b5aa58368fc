"""SearchSpace.build: the choices a job's space makes over a model's layers, and the plans they give."""

from __future__ import annotations

import pytest

from slimsearch.exceptions import ConfigError
from slimsearch.spaces.schema import SpaceSpec
from slimsearch.spaces import CompressionPlan, DistillPlan, LayerPlan, SearchSpace

LAYERS = ["conv1", "conv2", "fc"]
PRUNABLE = ["conv1", "conv2"]


def _spec(**kwargs) -> SpaceSpec:
    base = {"prune_ratio": [0.5, 0.0, 0.5], "weight_bits": [8, 4], "act_bits": [32, 8], "distill_steps": [100, 0]}
    base.update(kwargs)
    return SpaceSpec.model_validate(base)


def test_choices_are_per_layer_sorted_and_deduplicated():
    space = SearchSpace.build(_spec(), LAYERS, PRUNABLE, seed=5)
    assert space.choices == (
        ("weight_bits.conv1", (4, 8)), ("act_bits.conv1", (8, 32)),
        ("weight_bits.conv2", (4, 8)), ("act_bits.conv2", (8, 32)),
        ("weight_bits.fc", (4, 8)), ("act_bits.fc", (8, 32)),
        # the output layer is not prunable: no prune_ratio choice for it
        ("prune_ratio.conv1", (0.0, 0.5)), ("prune_ratio.conv2", (0.0, 0.5)),
        ("distill_steps", (0, 100)),
    )
    assert space.size == 2**9
    assert space.seed == 5


def test_layer_overrides_replace_the_defaults_for_that_layer_only():
    spec = _spec(layers={"conv2": {"weight_bits": [2], "prune_ratio": [0.25, 0.75]}, "fc": {"prune_ratio": [0.0]}})
    choices = dict(SearchSpace.build(spec, LAYERS, PRUNABLE).choices)
    assert choices["weight_bits.conv2"] == (2,)
    assert choices["prune_ratio.conv2"] == (0.25, 0.75)
    assert choices["act_bits.conv2"] == (8, 32)
    assert choices["weight_bits.conv1"] == (4, 8)
    assert "prune_ratio.fc" not in choices


def test_unknown_layer_lists_the_layers():
    spec = _spec(layers={"conv9": {"weight_bits": [4]}})
    with pytest.raises(ConfigError, match=r"space.layers: unknown layer 'conv9'; allowed: \['conv1', 'conv2', 'fc'\]"):
        SearchSpace.build(spec, LAYERS, PRUNABLE)


def test_pruning_an_unprunable_layer_names_the_prunable_ones():
    spec = _spec(layers={"fc": {"prune_ratio": [0.5]}})
    with pytest.raises(ConfigError, match=r"space.layers.fc.prune_ratio: .*prunable layers: \['conv1', 'conv2'\]"):
        SearchSpace.build(spec, LAYERS, PRUNABLE)


def test_plan_from_params_builds_the_plan_the_params_stand_for():
    space = SearchSpace.build(_spec(), LAYERS, PRUNABLE, seed=11)
    params = {"prune_ratio.conv1": 0.5, "weight_bits.conv1": 4, "act_bits.conv1": 8,
              "prune_ratio.conv2": 0.0, "weight_bits.conv2": 8, "act_bits.conv2": 32,
              "weight_bits.fc": 8, "act_bits.fc": 8, "distill_steps": 100}
    plan = space.plan_from_params(params)
    assert plan == CompressionPlan(
        layers={"conv1": LayerPlan(0.5, 4, 8), "conv2": LayerPlan(0.0, 8, 32), "fc": LayerPlan(0.0, 8, 8)},
        distill=DistillPlan(steps=100), seed=11,
    )
    assert CompressionPlan.from_json(plan.to_json()) == plan


def test_distillation_settings_are_searched_when_given_several_values():
    spec = _spec(distill_temperature=[2.0, 4.0], distill_alpha=[0.5], distill_lr=[1e-4, 1e-3],
                 distill_hidden_weight=[0.0])
    space = SearchSpace.build(spec, LAYERS, PRUNABLE)
    choices = dict(space.choices)
    assert choices["distill_temperature"] == (2.0, 4.0) and choices["distill_lr"] == (1e-4, 1e-3)
    assert "distill_alpha" not in choices and dict(space.fixed)["distill_alpha"] == 0.5
    params = {name: values[-1] for name, values in space.choices}
    plan = space.plan_from_params(params)
    assert plan.distill == DistillPlan(steps=100, temperature=4.0, alpha=0.5, lr=1e-3, hidden_weight=0.0)
    assert CompressionPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("key, value, allowed", [
    ("distill_temperature", 0, "numbers > 0"),
    ("distill_alpha", 1.5, "numbers with 0 <= alpha <= 1"),
    ("distill_lr", -1e-3, "numbers > 0"),
    ("distill_hidden_weight", -1, "numbers >= 0"),
])
def test_bad_distillation_settings_say_what_is_allowed(key, value, allowed):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=rf"{key} choice .* is not allowed; allowed: {allowed}"):
        _spec(**{key: [value]})


def test_suggest_draws_every_choice_from_a_real_optuna_trial():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace.build(_spec(), LAYERS, PRUNABLE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    choices = dict(space.choices)
    for _ in range(5):
        trial = study.ask()
        plan = space.suggest(trial)
        assert set(trial.params) == set(choices)
        for name, value in trial.params.items():
            assert value in choices[name]
        assert plan == space.plan_from_params(trial.params)
        study.tell(trial, 0.0)


def test_depth_and_model_wide_choices_are_searched_only_when_they_have_two_values():
    spec = _spec(drop=[False, True], sparsity=[0.0, 0.5], importance=["l1"])
    space = SearchSpace.build(spec, LAYERS, PRUNABLE, droppable=["block1"])
    choices = dict(space.choices)
    assert choices["drop.block1"] == (False, True)
    assert choices["sparsity"] == (0.0, 0.5)
    assert "importance" not in choices and dict(space.fixed)["importance"] == "l1"
    params = {name: values[-1] for name, values in space.choices}
    plan = space.plan_from_params(params)
    assert plan.drop == ("block1",)
    assert plan.layer("conv1").sparsity == 0.5 and plan.importance == "l1"


def test_a_power_mode_is_searched_only_when_two_or_more_are_listed():
    modes = {"jetson-orin-nano": ["7W", "15W"], "jetson-tx2": ["MAXQ"]}
    space = SearchSpace.build(_spec(), LAYERS, PRUNABLE, power_modes=modes)
    choices = dict(space.choices)
    assert choices["power_mode.jetson-orin-nano"] == ("7W", "15W")
    assert "power_mode.jetson-tx2" not in choices and dict(space.fixed)["power_mode.jetson-tx2"] == "MAXQ"
    assert space.size == 2**10
    params = {name: values[0] for name, values in space.choices}
    plan = space.plan_from_params(params)
    assert plan.power_modes == {"jetson-orin-nano": "7W", "jetson-tx2": "MAXQ"}
    assert CompressionPlan.from_json(plan.to_json()) == plan
    assert space.plan_from_params({**params, "power_mode.jetson-orin-nano": "15W"}).power_modes["jetson-orin-nano"] == "15W"
    # no modes listed: nothing searched, nothing in the plan (the profile's default mode)
    plain = SearchSpace.build(_spec(), LAYERS, PRUNABLE)
    assert not any(name.startswith("power_mode.") for name, _ in plain.choices)
    assert plain.plan_from_params(params).power_modes == {}


def test_optuna_records_the_searched_power_mode():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace.build(_spec(), LAYERS, PRUNABLE, power_modes={"jetson-orin-nano": ["7W", "15W"]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(8):
        trial = study.ask()
        plan = space.suggest(trial)
        assert trial.params["power_mode.jetson-orin-nano"] == plan.power_modes["jetson-orin-nano"]
        seen.add(plan.power_modes["jetson-orin-nano"])
        study.tell(trial, 0.0)
    assert seen == {"7W", "15W"}


def test_a_causal_lm_space_takes_its_familys_defaults_and_refuses_what_it_does_not_use():
    from slimsearch.exceptions import ConfigError
    from slimsearch.metric_names import TaskFamily
    from slimsearch.spaces.schema import SpaceSpec
    from slimsearch.spaces.space import fit_space

    lm = fit_space(SpaceSpec(kv_bits=[8, 32]), TaskFamily.CAUSAL_LM)
    assert (lm.weight_bits, lm.act_bits, lm.group_size, lm.distill_steps, lm.distill_lr, lm.prune_ratio,
            lm.sparsity_pattern, lm.kv_bits) == ([4, 8, 32], [32], [128], [0], [3e-4], [0.0], ["2:4"], [8, 32])
    assert fit_space(SpaceSpec(), TaskFamily.CLASSIFICATION) == SpaceSpec()
    space = SearchSpace.build(lm, ["qkv", "o", "gate_up", "down"], [])
    assert dict(space.choices) == {**{f"weight_bits.{g}": (4, 8, 32) for g in ("qkv", "o", "gate_up", "down")},
                                   **{f"act_bits.{g}": (32,) for g in ("qkv", "o", "gate_up", "down")},
                                   "kv_bits": (8, 32), "distill_steps": (0,)}
    refused = [
        (SpaceSpec(prune_ratio=[0.0, 0.5]), TaskFamily.CAUSAL_LM,
         "space.prune_ratio: a causal-lm task does not use prune_ratio (a classification task does); allowed: [0.0]"),
        (SpaceSpec(layers={"down": {"rank_ratio": [0.5]}}), TaskFamily.CAUSAL_LM,
         "space.layers.down.rank_ratio: a causal-lm task does not use rank_ratio"),
        (SpaceSpec(weight_bits=[4, 6]), TaskFamily.CAUSAL_LM,
         "space.weight_bits: 6 is not allowed for a causal-lm task; allowed: [2, 3, 4, 8, 32]"),
        (SpaceSpec(sparsity_pattern=["unstructured"]), TaskFamily.CAUSAL_LM,
         "space.sparsity_pattern: 'unstructured' is not allowed for a causal-lm task; allowed: ['2:4']"),
        (SpaceSpec(ffn_keep=[0.5, 1.0]), TaskFamily.CLASSIFICATION,
         "space.ffn_keep: a classification task does not use ffn_keep (a causal-lm task does); allowed: [1.0]"),
        (SpaceSpec(per_block=True), TaskFamily.CLASSIFICATION,
         "space.per_block: a classification task has no blocks of linear groups; allowed: false"),
        (SpaceSpec(per_block=True, act_bits=[8, 32]), TaskFamily.CAUSAL_LM,
         "space.act_bits: per_block weight bits keep activations float; allowed: [32] with per_block: true"),
        (SpaceSpec(per_block=True, layers={"down": {"act_bits": [8]}}), TaskFamily.CAUSAL_LM,
         "space.layers.down.act_bits: per_block weight bits keep activations float"),
    ]
    for spec, family, message in refused:
        with pytest.raises(ConfigError) as exc:
            fit_space(spec, family)
        assert str(exc.value).startswith(message), str(exc.value)
    assert fit_space(SpaceSpec(prune_ratio=[0.0]), TaskFamily.CAUSAL_LM).prune_ratio == [0.0]  # the default: fine
    assert fit_space(SpaceSpec(per_block=True), TaskFamily.CAUSAL_LM).act_bits == [32]  # the family's default: fine
