"""The report's data functions: values a user sees in each figure."""

from __future__ import annotations

import json

import pytest

from slimsearch.dashboards.report import (hypervolume_info, hypervolume_reference, hypervolume_series,
                                          layer_heatmap_info, pair_front_infos, parallel_info, report_html,
                                          write_report)


def test_one_front_per_pair_of_objectives_then_metric_against_each_profile_latency(job_data):
    infos = pair_front_infos(job_data)
    assert [(i.y_name, i.x_name) for i in infos] == [
        ("accuracy", "latency_ms@local"), ("accuracy", "size_bytes"), ("latency_ms@local", "size_bytes"),
        ("accuracy", "latency_ms@raspberry-pi-4")]
    first = infos[0]
    assert first.x_label == "latency_ms@local (measured)"
    assert infos[3].x_label == "latency_ms@raspberry-pi-4 (modelled)"
    # faded = dominated in all objectives; the step line is the 2-D front of the pair
    assert {p[2]: p[3] for p in first.points} == {0: True, 1: True, 2: False, 3: True}
    assert first.step == [(2.0, 0.90), (3.0, 0.95), (4.0, 0.97)]
    assert first.teacher == (5.0, 0.98)
    # hover shows the plan in words
    assert "conv1:w4a8 -50%, KD 0 steps" in next(p[4] for p in first.points if p[2] == 0)


def test_a_task_metric_that_is_better_lower_keeps_its_direction_against_each_profile_latency(job_data):
    """A causal LM's perplexity is minimised: its front against a profile's latency is the lowest ppl."""
    for c, ppl in zip(job_data["candidates"], (30.0, 21.0, 31.0, 25.0)):
        c["metrics"].pop("accuracy")
        c["metrics"]["ppl"] = ppl
    data = {**job_data, "metric": "ppl", "family": "causal-lm", "direction": "min",
            "objectives": {"ppl": "min", "size_bytes": "min"}}
    profile = [i for i in pair_front_infos(data) if i.x_name == "latency_ms@raspberry-pi-4"]
    assert [(i.y_name, i.step) for i in profile] == [("ppl", [(6.0, 30.0), (9.0, 25.0), (12.0, 21.0)])]


def test_reference_comes_from_the_teacher_so_the_teacher_alone_is_one(job_data):
    ref = hypervolume_reference(job_data["objectives"], job_data["teacher"])
    assert ref.point == (0.49, 20.0, 40000)
    teacher_as_candidate = [{"trial": 0, "metrics": job_data["teacher"]}]
    assert hypervolume_series(teacher_as_candidate, job_data["objectives"], ref) == pytest.approx([1.0])


def test_reference_without_teacher_values_is_the_worst_candidate_widened():
    objectives = {"accuracy": "max", "latency_ms": "min"}
    cands = [{"trial": 0, "metrics": {"accuracy": 0.8, "latency_ms": 1.0}},
             {"trial": 1, "metrics": {"accuracy": 0.9, "latency_ms": 3.0}}]
    ref = hypervolume_reference(objectives, {"accuracy": 0.9}, cands)
    assert ref.point == pytest.approx((0.79, 3.2))


def test_hypervolume_never_falls_and_grows_with_a_new_front_member(job_data):
    info = hypervolume_info(job_data)
    assert info.evaluations == [1, 2, 3, 4]
    v = info.values
    assert all(b >= a for a, b in zip(v, v[1:]))
    assert v[2] == pytest.approx(v[1])  # trial 2 is dominated: adds nothing
    assert v[3] > v[2]
    assert info.baseline is None and "no random-search baseline" in info.baseline_label


def test_a_candidate_that_breaks_a_constraint_adds_no_hypervolume(job_data):
    # trial 4 would dominate every other candidate, but it breaks a job constraint: it is off the
    # front, so the front's hypervolume must not grow with it
    best = {"accuracy": 0.98, "latency_ms@local": 1.0, "size_bytes": 1000}
    breaker = dict(job_data["candidates"][0], trial=4, metrics=best, on_front=False, feasible=False)
    before = hypervolume_info(job_data).values
    after = hypervolume_info(dict(job_data, candidates=[*job_data["candidates"], breaker])).values
    assert after == pytest.approx(before + before[-1:])
    feasible = dict(breaker, feasible=True)
    assert hypervolume_info(dict(job_data, candidates=[*job_data["candidates"], feasible])).values[-1] > before[-1]
    # the plots still show it, off the front, as they show every candidate
    from slimsearch.dashboards.report import front3d_info

    points = front3d_info(dict(job_data, candidates=[*job_data["candidates"], breaker])).points
    assert (0.98, 1.0, 1000, False) in [p[:4] for p in points]


def test_random_search_baseline_is_measured_in_the_same_box(job_data):
    baseline = dict(job_data, job="random", candidates=job_data["candidates"][2:])
    info = hypervolume_info(job_data, baseline)
    assert len(info.baseline) == 2 and info.baseline[-1] < info.values[-1]
    with pytest.raises(ValueError, match="objectives"):
        hypervolume_info(job_data, dict(baseline, objectives={"accuracy": "max", "size_bytes": "min"}))


def test_parallel_coordinates_keep_choices_that_vary_then_objectives(job_data):
    info = parallel_info(job_data)
    labels = [d.label for d in info.dimensions]
    assert labels == ["weight_bits", "prune_ratio", "importance", "accuracy", "latency_ms@local", "size_bytes"]
    importance = info.dimensions[2]
    assert importance.ticktext == ["l1", "l2"] and importance.values == [1.0, 0.0, 1.0, 0.0]
    assert info.color == [0.90, 0.97, 0.89, 0.95]


def test_layer_heatmap_has_one_row_per_front_member(job_data):
    info = layer_heatmap_info(job_data)
    assert info.layers == ["conv1", "fc"]
    assert info.members == ["trial 0", "trial 1", "trial 3"]
    assert info.weight_bits == [[4, 8], [8, 8], [8, 8]]
    assert info.prune_ratio == [[0.5, 0.0], [0.0, 0.0], [0.25, 0.0]]


def test_report_is_one_offline_page(job_data, tmp_path):
    page = report_html(job_data)
    assert "<script src=" not in page and 'src="http' not in page  # plotly.js inline, nothing fetched
    assert page.count('class="fig"') == 8  # 4 fronts, 3-D, hypervolume, parallel coordinates, heatmap
    (tmp_path / "front.json").write_text(json.dumps(job_data))
    path = write_report(tmp_path)
    assert path == tmp_path / "report.html" and path.read_text(encoding="utf-8") == page


def test_hypervolume_past_three_objectives_is_exact_by_slicing():
    from slimsearch.search.pareto import _hv_sliced
    from slimsearch.search.pareto import hypervolume_2d

    # two boxes in 4-D: [0,2]x[0,1]x[0,1]x[0,1] and [0,1]x[0,2]x[0,1]x[0,1] overlap in a unit cube: 2 + 2 - 1
    pts = [(0.0, 1.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0)]
    assert _hv_sliced(pts, (2.0, 2.0, 1.0, 1.0), ["min"] * 4) == pytest.approx(3.0)
    pts2 = [(0.9, 1.0), (0.5, 0.2), (0.7, 0.5)]
    assert _hv_sliced(pts2, (0.0, 2.0), ["max", "min"]) == pytest.approx(hypervolume_2d(pts2, (0.0, 2.0), ["max", "min"]))


def test_four_objectives_get_a_hypervolume_too(job_data):
    objectives = dict(job_data["objectives"], **{"latency_ms@raspberry-pi-4": "min"})
    data = dict(job_data, objectives=objectives, teacher=dict(job_data["teacher"], **{"latency_ms@raspberry-pi-4": 15.0}))
    info = hypervolume_info(data)
    assert len(info.values) == 4 and info.values[-1] > 0
    assert all(b >= a for a, b in zip(info.values, info.values[1:]))


def test_predicted_against_measured_only_for_a_profile_of_this_machine(job_data):
    from slimsearch.dashboards.report import predicted_infos

    assert predicted_infos(job_data) == []  # raspberry-pi-4 is not this machine
    for c in job_data["candidates"]:
        c["metrics"]["latency_ms@local-box"] = c["metrics"]["latency_ms@local"] * 1.1
    (info,) = predicted_infos(job_data)
    assert info.profile == "local-box"
    assert info.measured == [2.0, 4.0, 4.5, 3.0] and info.predicted == pytest.approx([2.2, 4.4, 4.95, 3.3])
