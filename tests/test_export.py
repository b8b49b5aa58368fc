"""export.py's default choice: the fastest front member close to the teacher, as the task's family
measures closeness (1 point of accuracy; 5% of perplexity)."""

from __future__ import annotations

import pytest

from slimsearch.exceptions import ConfigError
from slimsearch.export import choose, export_job


def _member(trial: int, metric: str, value: float, latency: float) -> dict:
    return {"trial": trial, "run_id": f"r{trial}", "metrics": {metric: value, "latency_ms@local": latency}}


def _front(metric: str, teacher: float, members: list[dict], family=None) -> dict:
    front = {"metric": metric, "objectives": {metric: "max", "latency_ms@local": "min"},
             "teacher": {metric: teacher}, "front": members, "candidates": members}
    return front if family is None else {**front, "family": family, "direction": "min",
                                         "objectives": {metric: "min", "latency_ms@local": "min"}}


def test_a_classification_job_exports_the_fastest_member_within_a_point_of_the_teacher():
    members = [_member(0, "accuracy", 0.975, 3.0), _member(1, "accuracy", 0.95, 1.0), _member(2, "accuracy", 0.98, 5.0)]
    best, rule = choose(_front("accuracy", 0.98, members))  # front.json of a job from before families
    assert best["trial"] == 0 and rule == "fastest (latency_ms@local) front member with accuracy_drop <= 0.01"
    best, rule = choose(_front("accuracy", 0.99, members[:2]))
    assert best["trial"] == 0 and "the front member with the best accuracy" in rule


def test_a_causal_lm_job_exports_the_fastest_member_within_5_percent_of_the_teachers_perplexity():
    members = [_member(0, "ppl", 20.8, 3.0), _member(1, "ppl", 30.0, 1.0), _member(2, "ppl", 20.5, 5.0)]
    best, rule = choose(_front("ppl", 20.0, members, family="causal-lm"))
    assert best["trial"] == 0 and rule == "fastest (latency_ms@local) front member with ppl_increase <= 0.05"
    best, rule = choose(_front("ppl", 10.0, members, family="causal-lm"))
    assert best["trial"] == 2 and "no front member with ppl_increase <= 0.05" in rule  # the lowest perplexity


def test_a_causal_lm_job_takes_its_own_formats_and_names_them_when_refusing_another(tmp_path):
    import json

    members = [_member(0, "ppl", 21.5, 3.0)]
    (tmp_path / "job.json").write_text(json.dumps({"spec": {}}))
    (tmp_path / "front.json").write_text(json.dumps({**_front("ppl", 20.0, members, family="causal-lm"),
                                                     "job": "lm"}))
    with pytest.raises(ConfigError, match=r"--format: 'onnx' is not a causal-LM job's; allowed: \['genai', 'hf'\]"):
        export_job(tmp_path, tmp_path / "export", formats=("onnx",))
    assert not (tmp_path / "export").exists()


def test_export_times_the_chosen_model_as_the_search_did_paired_with_the_teacher(digits_task, monkeypatch):
    # export and a job's workers call the same paired timing, scaled to the teacher's figures of the job's start
    from slimsearch.export import export_latency
    from slimsearch.hardware_profiles import _measure

    calls = []

    def fake(candidate, reference, **kwargs):  # a FAKE measure_paired: no timing
        calls.append(reference)
        return _measure.PairedTiming(ratio=0.25, ratios=(0.25,), cv=0.01, candidate_ms=3.0, reference_ms=12.0,
                                     attempts=1, noisy=False)

    monkeypatch.setattr(_measure, "measure_paired", fake)
    teacher = {"latency_ms@local": 2.0, "latency_ms_b64@local": 8.0, "accuracy": 0.97}
    recorded = {"latency_ms@local": 0.5, "latency_ms_b64@local": 2.5}
    latency = export_latency(digits_task.teacher, digits_task, teacher, recorded, threads=1)
    assert len(calls) == 2
    assert latency["model"]["latency_ms_b64@local"] == 2.0 and latency["model"]["latency_ms_raw_b64@local"] == 3.0
    assert latency["teacher_at_job_start"] == {"latency_ms@local": 2.0, "latency_ms_b64@local": 8.0}
    assert latency["search_over_export"] == {"latency_ms@local": 1.0, "latency_ms_b64@local": 1.25}
    assert "latency_ms_b64@local" in latency["teacher"]  # the teacher now, unpaired, beside them


def test_export_builds_the_reference_of_the_models_kind_with_the_workers_thread_count(digits_task, monkeypatch):
    # onnxruntime sessions take torch's thread count when built: the reference's must be built as the model's
    # is (a teacher session built with 2 threads against a model timed with 1 read 0.48x at export)
    import torch

    from slimsearch.compress import apply_plan
    from slimsearch.evaluators import candidate
    from slimsearch.export import export_latency
    from slimsearch.hardware_profiles import _measure
    from slimsearch.spaces.plan import CompressionPlan, LayerPlan

    calls, threads_at_build = [], []
    real = candidate.local_reference

    def spy(task, quiet):
        threads_at_build.append(torch.get_num_threads())
        return real(task, quiet)

    def fake(candidate_run, reference, **kwargs):  # a FAKE measure_paired: no timing
        calls.append(reference)
        return _measure.PairedTiming(ratio=0.5, ratios=(0.5,), cv=0.01, candidate_ms=3.0, reference_ms=6.0,
                                     attempts=1, noisy=False)

    monkeypatch.setattr(candidate, "local_reference", spy)
    monkeypatch.setattr(_measure, "measure_paired", fake)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = apply_plan(digits_task, CompressionPlan(layers={"fc1": LayerPlan(weight_bits=4, act_bits=8)}))
        teacher = {"latency_ms@local": 2.0, "latency_ms_b64@local": 8.0}
        kinds = {"act-qdq:latency_ms@local": 1.0, "act-qdq:latency_ms_b64@local": 4.0}
        latency = export_latency(model, digits_task, teacher, {"latency_ms@local": 0.5}, threads=1, kinds=kinds)
    finally:
        torch.set_num_threads(before)
    assert threads_at_build == [1]
    assert latency["model"]["latency_ms_b64@local"] == 2.0  # 0.5 x the act-qdq reference's 4.0, not the teacher's
    assert "act-qdq" in latency["note"]
