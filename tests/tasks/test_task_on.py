"""task_on(task, device): a task's teacher and data on a device, the task itself where they are already.

The meta device stands in for a GPU here: a real second device, without values."""

from __future__ import annotations

import dataclasses

import torch

from slimsearch.tasks import Split, task_on

META = torch.device("meta")


def test_on_its_own_device_the_task_is_itself(digits_task):
    assert task_on(digits_task, "cpu") is digits_task
    assert task_on(digits_task, None) is digits_task
    assert task_on(digits_task, torch.device("cpu")) is digits_task


def test_elsewhere_a_copy_with_teacher_data_and_example_there_made_once(digits_task):
    placed = task_on(digits_task, META)
    assert placed is not digits_task and task_on(digits_task, "meta") is placed  # made once per device
    assert next(placed.teacher.parameters()).device == META and not placed.teacher.training
    for split, home in ((placed.train, digits_task.train), (placed.val, digits_task.val), (placed.test, digits_task.test)):
        assert split.x.device == META and split.y.device == META and split.x.shape == home.x.shape
    assert placed.example_input.device == META
    # the task itself is untouched, and the copy knows its way back
    assert next(digits_task.teacher.parameters()).device.type == "cpu" and digits_task.val.x.device.type == "cpu"
    assert task_on(placed, "cpu") is digits_task
    assert (placed.name, placed.metric_name, placed.teacher_sha256) == (digits_task.name, "accuracy",
                                                                        digits_task.teacher_sha256)


class _Scorer:
    """A scorer that compares with the teacher, as the causal-LM task's does."""

    def __init__(self, teacher):
        self.teacher = teacher

    def __call__(self, model, split, extras=True):
        return {"accuracy": 1.0}

    def on_teacher(self, teacher):
        return _Scorer(teacher)


def test_a_scorer_and_extra_metrics_that_compare_with_the_teacher_follow_it(digits_task):
    scorer = _Scorer(digits_task.teacher)
    plain = lambda model, split: 0.0  # noqa: E731 - an extra metric without on_teacher stays as it is
    task = dataclasses.replace(digits_task, scorer=scorer, extra_metrics={"same": scorer, "plain": plain},
                               val=Split(digits_task.val.x, digits_task.val.y, extra={"ids": torch.arange(3), "n": 3}))
    placed = task_on(task, META)
    assert placed.scorer.teacher is placed.teacher and placed.extra_metrics["same"].teacher is placed.teacher
    assert placed.extra_metrics["plain"] is plain
    assert placed.val.extra["ids"].device == META and placed.val.extra["n"] == 3


def test_the_causal_lm_scorer_and_its_extras_follow_the_teacher():
    from slimsearch.tasks._causal_lm_task import LMScorer, _extra

    teacher, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    scorer = LMScorer(teacher)
    assert scorer.on_teacher(other).teacher is other and scorer.teacher is teacher
    extra = _extra(scorer, "kl").on_teacher(other)
    assert extra.scorer.teacher is other and extra.name == "kl"
