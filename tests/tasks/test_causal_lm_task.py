"""tasks/_causal_lm_task.py: a causal LM as a task (smollm2, causal-lm:<path>): its splits, metric and family."""

from __future__ import annotations

import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from slimsearch.exceptions import ConfigError  # noqa: E402
from slimsearch.metric_names import TaskFamily  # noqa: E402
from slimsearch.tasks import load_task  # noqa: E402
from slimsearch.tasks._registry import task_family, task_latency_batch, task_metrics  # noqa: E402
from tests import _tiny_llm  # noqa: E402


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-llm")
    return {"llama": _tiny_llm.folder(root / "llama"), "gpt2": _tiny_llm.folder(root / "gpt2", "gpt2"),
            "text": _tiny_llm.text(root / "notes.txt"), "root": root}


def test_a_user_causal_lm_is_a_task_of_its_family_with_windows_from_its_text(made):
    task = load_task(f"causal-lm:{made['llama']}", text=(str(made["text"]),))
    assert task.family is TaskFamily.CAUSAL_LM and task.metric_name == "ppl"
    assert task.layers == ("qkv", "o", "gate_up", "down") and task.latency_batch == 1
    assert set(task.extra_metrics) == {"kl", "top1"}
    # 128 positions: windows of 128 tokens; at most 4096 / 2048 / 2048 tokens per split
    for split, most in ((task.train, 32), (task.val, 16), (task.test, 16)):
        assert split.x.dtype == torch.long and split.x.shape[1] == 128 and 1 <= len(split) <= most
        assert bool((split.x < _tiny_llm.VOCAB).all())
    assert not set(map(tuple, task.val.x.tolist())) & set(map(tuple, task.test.x.tolist()))
    scores = task.scorer(task.teacher, task.val, True)
    assert scores["kl"] == 0.0 and scores["top1"] == 1.0 and math.isfinite(scores["ppl"]) and scores["ppl"] > 1
    assert task.metric(task.teacher(task.val.x).logits, task.val.x) == pytest.approx(scores["ppl"], rel=1e-5)
    assert len(task.teacher_sha256) == 64


def test_windows_are_taken_evenly_spread_over_a_split_not_from_its_start():
    from slimsearch.tasks._causal_lm_task import spread

    windows = torch.arange(10).unsqueeze(1).repeat(1, 4)
    assert spread(windows, 4)[:, 0].tolist() == [0, 3, 6, 9]
    assert torch.equal(spread(windows, 10), windows) and torch.equal(spread(windows, 20), windows)


def test_a_model_with_a_short_context_gets_windows_that_fit_it(made):
    task = load_task(f"causal-lm:{made['gpt2']}", text=str(made["text"]))
    assert task.val.x.shape[1] == 64 and task.layers == ("qkv", "o", "gate_up", "down")


def test_text_too_short_for_a_window_in_each_split_is_refused(made, tmp_path):
    short = _tiny_llm.text(tmp_path / "short.txt", paragraphs=6)
    with pytest.raises(ConfigError, match=r"text: the (test|validation) split of .* has \d+ tokens, fewer than one "
                                          r"window of 128"):
        load_task(f"causal-lm:{made['llama']}", text=(str(short),))
    few = _tiny_llm.text(tmp_path / "few.txt", paragraphs=3)
    with pytest.raises(ConfigError, match="3 paragraph"):
        load_task(f"causal-lm:{made['llama']}", text=str(few))


def test_only_a_causal_lm_task_reads_text():
    with pytest.raises(ConfigError, match="text: task 'digits' reads no text files"):
        load_task("digits", text="wikipedia")


def test_the_family_metrics_and_latency_batch_are_known_before_a_task_loads():
    assert task_family("smollm2") is task_family("causal-lm:/x") is TaskFamily.CAUSAL_LM
    assert task_family("digits") is TaskFamily.CLASSIFICATION and task_family("pkg.mod:make") is None
    assert task_metrics("smollm2") == task_metrics("causal-lm:/x") == ("ppl", "kl", "top1")
    assert task_latency_batch("smollm2") == task_latency_batch("causal-lm:/x") == 1
    assert task_latency_batch("digits") == 64


def test_the_family_names_and_measures_the_gap_to_the_teacher():
    lm, cls = TaskFamily.CAUSAL_LM, TaskFamily.CLASSIFICATION
    assert (lm.direction, lm.gap_name("ppl"), lm.gap(21.0, 20.0)) == ("min", "ppl_increase", pytest.approx(0.05))
    assert (cls.direction, cls.gap_name("accuracy"), cls.gap(0.97, 0.98)) == ("max", "accuracy_drop",
                                                                             pytest.approx(0.01))
    assert lm.better(20.0, 21.0) and cls.better(0.98, 0.97)


@pytest.mark.slow
def test_smollm2_is_a_causal_lm_task_on_wikipedia():
    task = load_task("smollm2")
    assert task.name == "smollm2" and task.family is TaskFamily.CAUSAL_LM
    assert tuple(task.train.x.shape) == (16, 256) and tuple(task.val.x.shape) == tuple(task.test.x.shape) == (8, 256)
    assert 5 < task.scorer(task.teacher, task.val, False)["ppl"] < 100
