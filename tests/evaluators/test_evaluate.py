"""evaluate() and apply_plan() on the digits task: metric values, sizes, provenance, determinism."""

from __future__ import annotations

import pytest
import torch

from slimsearch.evaluators import Metrics, Provenance, apply_plan, evaluate, model_metrics, score
from slimsearch.deploy.pack import packed_size
from slimsearch.spaces import CompressionPlan, DistillPlan, LayerPlan

PROFILE = "raspberry-pi-4"
PLAN = CompressionPlan(
    layers={"conv2": LayerPlan(prune_ratio=0.5, weight_bits=4, act_bits=8),
            "fc1": LayerPlan(prune_ratio=0.25, weight_bits=8),
            "fc2": LayerPlan(weight_bits=8, act_bits=8)},
    distill=DistillPlan(steps=10),
    seed=3,
)


@pytest.fixture(scope="module")
def teacher_metrics(digits_task) -> Metrics:
    return model_metrics(digits_task.teacher, digits_task, [PROFILE], repeats=3)


@pytest.fixture(scope="module")
def metrics(digits_task, teacher_metrics) -> Metrics:
    return evaluate(digits_task, PLAN, [PROFILE], teacher_score=teacher_metrics["accuracy"])


def test_accuracy_is_a_fraction_and_the_drop_is_against_the_teacher(metrics, teacher_metrics):
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert 0.9 <= teacher_metrics["accuracy"] <= 1.0  # the digits teacher is a working classifier
    assert metrics["accuracy_drop"] == pytest.approx(teacher_metrics["accuracy"] - metrics["accuracy"])


def test_compressed_model_is_smaller_than_the_teacher(digits_task, metrics, teacher_metrics):
    assert teacher_metrics["size_bytes"] == packed_size(digits_task.teacher)
    assert metrics["size_bytes"] < teacher_metrics["size_bytes"]
    assert metrics["params"] < teacher_metrics["params"]
    assert metrics["macs"] < teacher_metrics["macs"]
    assert metrics["bitops"] < teacher_metrics["bitops"]


def test_latency_provenance_local_measured_profile_modelled(metrics):
    for key in ("latency_ms@local", "latency_ms_b64@local"):
        assert isinstance(metrics[key], float)
        assert metrics.provenance[key] is Provenance.MEASURED
    for key in (f"latency_ms@{PROFILE}", f"energy_mj@{PROFILE}", f"cost_usd_per_1m@{PROFILE}"):
        assert key in metrics.values
        assert metrics.provenance[key] is Provenance.MODELLED
    assert metrics[f"latency_ms@{PROFILE}"] > 0 and metrics[f"energy_mj@{PROFILE}"] > 0
    # every cost figure says where it comes from, and nothing else claims to
    assert set(metrics.provenance) == {k for k in metrics.values if "@" in k}
    assert "accuracy" not in metrics.provenance and "size_bytes" not in metrics.provenance


def test_metrics_round_trip_through_json(metrics):
    again = Metrics.from_json(metrics.to_json())
    assert again == metrics
    assert again.provenance[f"latency_ms@{PROFILE}"] is Provenance.MODELLED


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_apply_plan_is_deterministic_for_a_seed(digits_task, metrics):
    teacher_before = _state(digits_task.teacher)
    first, second = _state(apply_plan(digits_task, PLAN)), _state(apply_plan(digits_task, PLAN))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # the rebuilt model is the one evaluate scored: export relies on this
    assert score(apply_plan(digits_task, PLAN), digits_task.val, digits_task) == metrics["accuracy"]
    # and the teacher is left untouched
    assert all(torch.equal(teacher_before[k], v) for k, v in digits_task.teacher.state_dict().items())


def test_a_worker_computes_the_teacher_logits_once_and_they_train_the_same_student(digits_task):
    """The teacher's logits on the training split are kept for the next candidate (they cost 2 s
    of a 10 s MNIST candidate): the second fine-tuning reuses them and trains the same student
    bit for bit; once the teacher's weights change in place, they are computed again."""
    from slimsearch.compress import distill as kd

    plan = CompressionPlan(layers=PLAN.layers, distill=DistillPlan(steps=20), seed=3)  # 20 x 64 >= 1,197
    kd._LOGITS.pop(digits_task.teacher, None)
    cold = _state(apply_plan(digits_task, plan))
    kept = kd._LOGITS[digits_task.teacher][2]
    warm = _state(apply_plan(digits_task, plan))
    assert kd._LOGITS[digits_task.teacher][2] is kept  # reused, not recomputed
    assert all(torch.equal(cold[k], warm[k]) for k in cold)
    with torch.no_grad():
        next(digits_task.teacher.parameters()).mul_(1.0)  # an in-place change (same values)
    apply_plan(digits_task, plan)
    assert kd._LOGITS[digits_task.teacher][2] is not kept
    assert torch.equal(kd._LOGITS[digits_task.teacher][2], kept)


def test_another_seed_gives_another_model(digits_task):
    first = _state(apply_plan(digits_task, PLAN))
    other = CompressionPlan(layers=PLAN.layers, distill=PLAN.distill, seed=PLAN.seed + 1)
    second = _state(apply_plan(digits_task, other))
    assert first.keys() == second.keys()
    assert not all(torch.equal(first[k], second[k]) for k in first)


def test_applied_plan_has_the_planned_shapes_and_bits(digits_task):
    model = apply_plan(digits_task, PLAN)
    assert model.conv2.out_channels == 8 and model.conv3.in_channels == 8
    assert model.fc1.out_features == 24 and model.fc2.in_features == 24
    assert (model.conv2.weight_bits, model.conv2.act_bits) == (4, 8)
    assert max(torch.unique(row).numel() for row in model.conv2.weight.detach().flatten(1)) <= 2**4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not model.training


def test_plans_refuse_bit_widths_the_deployable_graph_cannot_hold():
    from slimsearch.exceptions import ConfigError

    with pytest.raises(ConfigError, match=r"act_bits: 4 is not allowed; allowed: \[8, 16, 32\]"):
        LayerPlan(weight_bits=8, act_bits=4)
    with pytest.raises(ConfigError, match=r"weight_bits: 1 is not allowed; allowed: \[2, 3, 4, 5, 6, 7, 8, 16, 32\]"):
        LayerPlan(weight_bits=1)


def test_model_metrics_at_two_power_modes_give_different_modelled_energy(digits_task):
    from slimsearch.hardware_profiles import layer_costs, predict

    jetson = "jetson-orin-nano"
    figures = {mode: model_metrics(digits_task.teacher, digits_task, [PROFILE, jetson], repeats=1,
                                   power_modes={jetson: mode}, energy=None)
               for mode in ("7W", "15W")}
    low, high = figures["7W"], figures["15W"]
    assert low[f"energy_mj@{jetson}"] != high[f"energy_mj@{jetson}"]
    assert low[f"latency_ms@{jetson}"] > high[f"latency_ms@{jetson}"]  # 420 MHz against 625 MHz
    # the names do not carry the mode, and every figure is modelled at either mode
    for metrics in (low, high):
        for key in ("latency_ms", "energy_mj", "cost_usd_per_1m"):
            assert metrics.provenance[f"{key}@{jetson}"] is Provenance.MODELLED
        assert metrics[f"cost_usd_per_1m@{jetson}"] is None  # not rented: no price, no cost
    # the figures are predict()'s at that mode; a profile the map leaves out is at its default
    layers = layer_costs(digits_task.teacher, digits_task.example_input)
    assert low[f"energy_mj@{jetson}"] == pytest.approx(predict(layers, jetson, power_mode="7W").energy_mj)
    assert high[f"energy_mj@{PROFILE}"] == pytest.approx(predict(layers, PROFILE).energy_mj)
    default = model_metrics(digits_task.teacher, digits_task, [jetson], repeats=1, energy=None)
    assert default[f"energy_mj@{jetson}"] == pytest.approx(high[f"energy_mj@{jetson}"])  # 15W is the default


def test_evaluate_models_each_profile_at_the_plans_power_mode(digits_task):
    jetson = "jetson-orin-nano"
    plan = CompressionPlan(layers=PLAN.layers, distill=DistillPlan(steps=0), seed=PLAN.seed,
                           power_modes={jetson: "7W"})
    at_7w = evaluate(digits_task, plan, [jetson])
    at_15w = evaluate(digits_task, CompressionPlan(layers=PLAN.layers, distill=DistillPlan(steps=0), seed=PLAN.seed,
                                                   power_modes={jetson: "15W"}), [jetson])
    assert at_7w["accuracy"] == at_15w["accuracy"]  # the mode changes the device, not the model
    assert at_7w[f"energy_mj@{jetson}"] != at_15w[f"energy_mj@{jetson}"]


class _FakeMeter:
    """Stands in for a RAPL meter: this container exposes no energy counters to read."""

    source = "fake:package-0"

    def __init__(self):
        self.calls = 0

    def measure(self, fn, *, warmup, repeats, min_time_s):
        from slimsearch.hardware_profiles._energy import EnergyReading

        for _ in range(warmup + repeats):
            fn()
        self.calls += 1
        return EnergyReading(joules=repeats * 0.002, seconds=0.5, calls=repeats, source=self.source)


def test_local_energy_is_measured_only_where_a_meter_exists(digits_task):
    none = model_metrics(digits_task.teacher, digits_task, [PROFILE], repeats=2, energy=None)
    assert "energy_mj@local" not in none.values and "energy_mj@local" not in none.provenance
    meter = _FakeMeter()
    metered = model_metrics(digits_task.teacher, digits_task, [PROFILE], repeats=2, energy=meter)
    assert meter.calls == 1  # batch 1 only
    assert metered["energy_mj@local"] == pytest.approx(2.0)
    assert metered.provenance["energy_mj@local"] is Provenance.MEASURED


def test_this_machine_invents_no_local_energy(digits_task, metrics):
    from slimsearch.hardware_profiles._energy import energy_meter

    if energy_meter() is not None:
        pytest.skip("this machine exposes RAPL counters: energy_mj@local is measured here")
    assert "energy_mj@local" not in metrics.values


def test_model_metrics_finds_the_machines_cpu_meter_by_itself(digits_task, monkeypatch):
    from slimsearch.hardware_profiles import _energy

    class Ticking:  # a FAKE counter (no real RAPL here) that advances 1 mJ per read
        name, max_uj, now = "package-0", 10**12, 0

        def read_uj(self):
            Ticking.now += 1000
            return Ticking.now

    asked = []
    monkeypatch.setattr(_energy, "energy_meter", lambda domain: asked.append(domain) or
                        _energy.EnergyMeter([Ticking()], source="rapl:package-0"))
    metrics = model_metrics(digits_task.teacher, digits_task, [PROFILE], repeats=2)
    assert asked == [_energy.EnergyDomain.CPU]
    assert metrics["energy_mj@local"] > 0
    assert metrics.provenance["energy_mj@local"] is Provenance.MEASURED


# -- local latency paired with the teacher (a job's candidates, export) -------------------------

QUIET = {"latency_ms@local": 2.0, "latency_ms_b64@local": 8.0}


class CallList(list):
    """The reference functions measure_paired was called with; ``baselines``: the quiet reference
    latency each call was given."""


@pytest.fixture
def paired_calls(monkeypatch):
    """A FAKE measure_paired (no timing): ratio 0.5, raw 7 ms, CV 0.03 (0.3 and noisy for a reference
    function marked ``noisy``); records the reference function of each call."""
    from slimsearch.hardware_profiles import _measure

    calls, baselines = CallList(), []

    def fake(candidate, reference, **kwargs):
        calls.append(reference)
        baselines.append(kwargs.get("quiet_reference_ms"))
        noisy = getattr(reference, "noisy", False)
        return _measure.PairedTiming(ratio=0.5, ratios=(0.5,), cv=0.3 if noisy else 0.03, candidate_ms=7.0,
                                     reference_ms=14.0, attempts=3 if noisy else 1, noisy=noisy)

    monkeypatch.setattr(_measure, "measure_paired", fake)
    calls.baselines = baselines
    return calls


def test_paired_local_latency_is_the_ratio_times_the_teachers_quiet_figure_with_the_raw_one_beside(
        digits_task, paired_calls):
    from slimsearch.evaluators.candidate import local_reference

    reference = local_reference(digits_task, QUIET)
    reference.runs["latency_ms_b64@local"].noisy = True  # the fake says this one's rounds disagreed
    metrics = model_metrics(digits_task.teacher, digits_task, [PROFILE], reference=reference, energy=None)
    assert paired_calls == [reference.runs["latency_ms@local"], reference.runs["latency_ms_b64@local"]]
    assert metrics["latency_ms@local"] == pytest.approx(1.0) and metrics["latency_ms_b64@local"] == pytest.approx(4.0)
    assert metrics["latency_ms_raw@local"] == 7.0 and metrics["latency_ms_raw_b64@local"] == 7.0
    assert (metrics["latency_cv@local"], metrics["latency_noisy@local"]) == (0.03, 0.0)
    assert (metrics["latency_cv_b64@local"], metrics["latency_noisy_b64@local"]) == (0.3, 1.0)
    for raw in ("latency_ms_raw@local", "latency_ms_raw_b64@local"):  # a raw latency is labelled too
        assert metrics.provenance[raw] is Provenance.MEASURED


def test_evaluate_pairs_a_candidates_latency_when_given_the_teacher(digits_task, paired_calls):
    from slimsearch.evaluators.candidate import local_reference

    reference = local_reference(digits_task, QUIET)
    plan = CompressionPlan(layers={"fc1": LayerPlan(prune_ratio=0.5)})
    metrics = evaluate(digits_task, plan, [PROFILE], reference=reference)
    assert len(paired_calls) == 2 and metrics["latency_ms_b64@local"] == pytest.approx(4.0)
    unpaired = evaluate(digits_task, plan, [PROFILE])  # no teacher: a plain median, no pairing figures
    assert len(paired_calls) == 2 and "latency_ms_raw@local" not in unpaired.values


def test_a_loaded_moment_is_judged_against_the_fastest_the_teacher_ran_in_this_process(digits_task, paired_calls):
    # the first measurement in a process has nothing to judge the teacher's speed against (the job's
    # quiet figures come from another process); later ones, the fastest the teacher ran here (the fake: 14 ms)
    from slimsearch.evaluators.candidate import local_reference

    reference = local_reference(digits_task, QUIET)
    model_metrics(digits_task.teacher, digits_task, [PROFILE], reference=reference, energy=None)
    model_metrics(digits_task.teacher, digits_task, [PROFILE], reference=reference, energy=None)
    assert paired_calls.baselines == [None, None, 14.0, 14.0]
    reference.fastest_ms["latency_ms@local"] = 1.5
    model_metrics(digits_task.teacher, digits_task, [PROFILE], reference=reference, energy=None)
    assert paired_calls.baselines[-2:] == [1.5, 14.0]


def test_a_candidate_is_paired_with_the_teacher_deployed_as_its_own_kind_of_graph(digits_task, paired_calls):
    # an 8-bit-input candidate's rounds alternate with the teacher at 8-bit inputs, scaled to that one's figures
    from slimsearch.evaluators.candidate import local_reference

    kinds = {f"act-qdq:{name}": 2 * value for name, value in QUIET.items()}
    reference = local_reference(digits_task, {**QUIET, **kinds})
    qdq = reference.for_kind("act-qdq")
    assert qdq is not reference and qdq.kind == "act-qdq" and reference.for_kind("act-qdq") is qdq  # built once
    assert reference.for_kind("w8a8") is reference  # no figures of it: the teacher itself
    plan = CompressionPlan(layers={"fc1": LayerPlan(weight_bits=4, act_bits=8)})
    metrics = evaluate(digits_task, plan, [PROFILE], reference=reference)
    assert paired_calls == [qdq.runs["latency_ms@local"], qdq.runs["latency_ms_b64@local"]]
    assert metrics["latency_ms_b64@local"] == pytest.approx(0.5 * 16.0)  # the ratio times the kind's quiet figure
    assert set(qdq.fastest_ms) == set(QUIET) and reference.fastest_ms == {}
    model_metrics(digits_task.teacher, digits_task, [PROFILE], reference=reference, energy=None)
    assert paired_calls[-2:] == [reference.runs["latency_ms@local"], reference.runs["latency_ms_b64@local"]]


def test_a_reference_needs_every_quiet_figure_of_each_kind_it_names(digits_task):
    from slimsearch.evaluators.candidate import local_reference
    from slimsearch.exceptions import ConfigError

    with pytest.raises(ConfigError, match="w8a8 reference's quiet latency_ms_b64@local must be a number of ms > 0"):
        local_reference(digits_task, {**QUIET, "w8a8:latency_ms@local": 1.0})


def test_a_reference_needs_every_quiet_teacher_figure(digits_task):
    from slimsearch.evaluators.candidate import local_reference
    from slimsearch.exceptions import ConfigError

    with pytest.raises(ConfigError, match="latency_ms_b64@local must be a number of ms > 0, got None"):
        local_reference(digits_task, {"latency_ms@local": 2.0})


def test_the_sessions_that_time_local_latency_do_not_spin_between_calls(digits_task):
    """Paired rounds alternate two sessions in one process: an idle pool spinning for work took the
    running one's core (docs/benchmarks.md, "Paired local latency in a job"). Other sessions keep
    onnxruntime's default."""
    from slimsearch.deploy.onnx_graph import onnx_bytes, ort_session
    from slimsearch.evaluators.candidate import _onnx_runs

    spin = "session.intra_op.allow_spinning"
    runs = _onnx_runs(digits_task.teacher, digits_task)
    assert set(runs) == {"latency_ms@local", f"latency_ms_b{digits_task.latency_batch}@local"}
    for run in runs.values():
        assert run.func.__self__.get_session_options().get_session_config_entry(spin) == "0"
    default = ort_session(onnx_bytes(digits_task.teacher, digits_task.example_input), threads=2)
    with pytest.raises(RuntimeError, match="does not have configuration with key"):
        default.get_session_options().get_session_config_entry(spin)
