"""evaluate(device=) and model_metrics(device=) on the CPU: the same figures as without a device (so
``device: auto`` without a GPU is today's path), and the device's task copy is what the plan is applied to."""

from __future__ import annotations

import pytest
import torch

from slimsearch.evaluators import apply_plan, evaluate, model_metrics
from slimsearch.spaces import CompressionPlan, DistillPlan, LayerPlan

PROFILE = "raspberry-pi-4"
PLAN = CompressionPlan(layers={"conv2": LayerPlan(prune_ratio=0.5, weight_bits=8, act_bits=8)},
                       distill=DistillPlan(steps=5), seed=2)
EXACT = ("accuracy", "accuracy_test", "accuracy_drop", "size_bytes", "params", "macs", "bitops",
         f"latency_ms@{PROFILE}", f"energy_mj@{PROFILE}")


@pytest.fixture(scope="module")
def plain(digits_task):
    return evaluate(digits_task, PLAN, [PROFILE], teacher_score=0.9)


@pytest.mark.parametrize("device", ["cpu", "auto"] if not torch.cuda.is_available() else ["cpu"])
def test_a_device_that_is_the_cpu_gives_the_same_figures(digits_task, plain, device, tmp_path):
    onnx = tmp_path / "model.onnx"
    placed = evaluate(digits_task, PLAN, [PROFILE], teacher_score=0.9, device=device, onnx_out=str(onnx))
    assert {k: placed[k] for k in EXACT} == {k: plain[k] for k in EXACT}
    assert set(placed.values) == set(plain.values) and placed.provenance == plain.provenance
    assert onnx.stat().st_size > 0  # the deployable graph, written from the candidate back on the CPU


def test_the_teachers_metrics_are_the_same_with_device_cpu(digits_task):
    a = model_metrics(digits_task.teacher, digits_task, [PROFILE], repeats=3)
    b = model_metrics(digits_task.teacher, digits_task, [PROFILE], repeats=3, device="cpu")
    assert (a["accuracy"], a["size_bytes"], a["macs"]) == (b["accuracy"], b["size_bytes"], b["macs"])


def test_evaluate_refuses_a_gpu_the_machine_lacks_in_one_line(digits_task):
    from slimsearch.exceptions import ConfigError

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=f"device 'cuda:{count}'"):
        evaluate(digits_task, PLAN, [PROFILE], device=f"cuda:{count}")


def test_apply_plan_leaves_the_model_on_the_tasks_device(digits_task):
    from slimsearch._device import device_of
    from slimsearch.tasks import task_on

    assert device_of(apply_plan(task_on(digits_task, "meta"), CompressionPlan(
        layers={"conv2": LayerPlan(prune_ratio=0.5, weight_bits=8)}, seed=2))).type == "meta"
