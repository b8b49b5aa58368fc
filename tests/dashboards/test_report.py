"""The report's data functions: values a user sees in each figure."""

from __future__ import annotations

import json

import pytest

from slimsearch.dashboards.report import (hypervolume_info, hypervolume_reference, hypervolume_series,
                                          layer_heatmap_info, llm_heatmap_info, pair_front_infos, parallel_info,
                                          report_html, report_sections, write_report)
from slimsearch.spaces.plan import CompressionPlan, LayerPlan


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


def _llm_job() -> dict:
    """A causal-LM front.json: two front members, one dominated candidate, two baselines."""
    def plan(**kw) -> dict:
        return CompressionPlan(**kw).to_dict()

    w4 = LayerPlan(weight_bits=4, group_size=64)
    trial0 = plan(layers={"qkv": w4, "o": LayerPlan(), "gate_up": w4, "down": LayerPlan(weight_bits=8, group_size=64),
                          "3.down": LayerPlan(weight_bits=32)}, weight_method="gptq", kv_bits=8, head_bits=8)
    trial2 = plan(layers={"qkv": LayerPlan(weight_bits=8, act_bits=8), "down": LayerPlan(act_bits=8)})
    members = [{"trial": t, "plan": p, "describe": "", "params": {}, "provenance": {"size_bytes": "measured"},
                "metrics": {"ppl": ppl, "size_bytes": size}, "on_front": t != 1}
               for t, p, ppl, size in ((0, trial0, 24.0, 300), (1, trial2, 30.0, 900), (2, trial2, 21.0, 800))]
    g128 = LayerPlan(weight_bits=4, group_size=128)
    w8a8 = LayerPlan(weight_bits=8, group_size=0, act_bits=8)
    baselines = [{"name": name, "plan": plan(layers={g: lp for g in ("qkv", "o", "gate_up", "down")},
                                             weight_method=method),
                  "metrics": {"ppl": 23.0, "size_bytes": 500}, "provenance": {}, "seconds": 1.0, "run_id": None}
                 for name, lp, method in (("awq-w4g128", g128, "awq"), ("w8a8-smoothquant", w8a8, "rtn"))]
    return {"job": "llm", "metric": "ppl", "family": "causal-lm", "direction": "min",
            "objectives": {"ppl": "min", "size_bytes": "min"}, "teacher": {"ppl": 20.0, "size_bytes": 1000},
            "candidates": members, "front": [c for c in members if c["on_front"]], "baselines": baselines,
            "failed": []}


def test_a_causal_lm_heatmap_shows_bits_group_size_and_method_of_front_members_then_baselines():
    info = llm_heatmap_info(_llm_job())
    assert info.members == ["trial 0", "trial 2", "baseline awq-w4g128", "baseline w8a8-smoothquant"]
    assert info.layers == ["qkv", "o", "gate_up", "down", "3.down"]  # a per-block key after the groups
    # a per-block key overrides its group's bits in that block; a plan without one falls back to the group
    assert info.weight_bits == [[4, 32, 4, 8, 32], [8, 32, 32, 32, 32], [4, 4, 4, 4, 4], [8, 8, 8, 8, 8]]
    assert info.kv_bits == [8, 32, 32, 32] and info.head_bits == [8, 32, 32, 32]
    # model-wide group size, shown where the weights are quantized; 0 is per channel
    assert info.group_size == [[64, None, 64, 64, None], [0, None, None, None, None],
                               [128] * 5, [0] * 5]
    assert info.method == [["gptq", "float", "gptq", "gptq", "float"],
                           ["rtn+smoothquant", "float", "float", "smoothquant", "smoothquant"],
                           ["awq"] * 5, ["rtn+smoothquant"] * 5]


def test_the_report_of_a_causal_lm_job_draws_its_heatmap_with_the_head_and_kv_cache_columns():
    (section,) = [s for s in report_sections(_llm_job()) if s.title == "Per-layer plans"]
    assert "baselines" in section.note
    bits, size, method = section.figure.data
    assert list(bits.x) == ["qkv", "o", "gate_up", "down", "3.down", "head", "kv"]
    assert list(bits.y) == ["trial 0", "trial 2", "baseline awq-w4g128", "baseline w8a8-smoothquant"]
    assert [list(r) for r in bits.text][0] == ["4", "32", "4", "8", "32", "8", "8"]
    assert [list(r) for r in size.text][3] == ["per channel"] * 5
    assert [list(r) for r in method.text][2] == ["awq"] * 5
    codes = [list(r) for r in method.z]  # one colour per method; the SmoothQuant cells share one
    assert codes[0] == [2, 0, 2, 2, 0] and codes[1] == [4, 0, 0, 4, 4]
    assert "group size" in section.figure.layout.title.text


def test_a_classification_job_keeps_the_bits_and_prune_ratio_heatmap(job_data):
    (section,) = [s for s in report_sections(job_data) if s.title == "Per-layer plans"]
    titles = [a.text for a in section.figure.layout.annotations]
    assert titles == ["weight bits", "activation bits", "prune ratio"]
    assert list(section.figure.data[0].x) == ["conv1", "fc"]
    assert [list(r) for r in section.figure.data[1].z] == [[8, 32], [8, 32], [8, 32]]


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
