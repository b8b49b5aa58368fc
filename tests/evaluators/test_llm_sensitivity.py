"""evaluators/llm_sensitivity.py: the sensitivity table of a decoder, its cache, and the plans it gives."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("highspy")

from slimsearch.compress import apply_plan  # noqa: E402
from slimsearch.compress.llm_methods import record_of  # noqa: E402
from slimsearch.evaluators import llm_sensitivity as sens  # noqa: E402
from slimsearch.evaluators.llm_costs import head_kwargs, weight_bytes  # noqa: E402
from slimsearch.evaluators.llm_sensitivity import (  # noqa: E402
    FLOAT, KL, NLL, SIZE, Sensitivity, WeightChoice, llm_sensitivity, plan_from_choice)
from slimsearch.exceptions import ConfigError  # noqa: E402
from slimsearch.search.planner import Problem, solve, sweep  # noqa: E402
from slimsearch.tasks import load_task  # noqa: E402
from slimsearch.tasks.causal_lm import score_lm  # noqa: E402
from tests import _tiny_llm  # noqa: E402
from tests._tiny_llm import one_thread  # noqa: F401, E402 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

RTN = [WeightChoice("rtn", b, 32) for b in (2, 4, 8)]
PROFILE = "raspberry-pi-4"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-sensitivity")
    text = str(_tiny_llm.text(root / "notes.txt"))
    return {kind: load_task(f"causal-lm:{_tiny_llm.folder(root / kind, kind)}", text=text)
            for kind in ("llama", "gpt2")}


def _windows(task, n=3):
    return task.train.x[:n]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_every_block_group_and_option_is_scored_and_the_teacher_is_left_as_it_was(tasks):
    task = tasks["llama"]
    before = _state(task.teacher)
    table = llm_sensitivity(task.teacher, _windows(task), RTN + [WeightChoice("gptq", 4, 32)], kv_bits=(8,),
                            head_bits=(8, 4), calib=task.train.x, profiles=[PROFILE])
    assert all(torch.equal(v, before[k]) for k, v in task.teacher.state_dict().items())
    assert list(table.options) == [f"{i}.{g}" for i in range(2) for g in ("qkv", "o", "gate_up", "down")] + [
        "kv", "head"]
    head = table.options["head"]
    assert set(head) == {FLOAT, "head8", "head4"}
    assert head["head4"][KL] > head["head8"][KL] > 0 == head[FLOAT][KL]
    assert head["head4"][SIZE] < head["head8"][SIZE] < head[FLOAT][SIZE]
    assert set(table.options["1.down"]) == {FLOAT, "rtn-w2-g32", "rtn-w4-g32", "rtn-w8-g32", "gptq-w4-g32"}
    assert set(table.options["kv"]) == {FLOAT, "kv8"}
    down = table.options["0.down"]
    assert down["rtn-w2-g32"][KL] > down["rtn-w4-g32"][KL] > down["rtn-w8-g32"][KL] > 0 == down[FLOAT][KL]
    assert down["rtn-w4-g32"][SIZE] < down["rtn-w8-g32"][SIZE] < down[FLOAT][SIZE]
    assert down["rtn-w4-g32"][f"latency_ms@{PROFILE}"] < 0  # fewer bytes read per token
    # the partial forward from a block's kept inputs is the model's own: the base NLL is the teacher's
    assert table.base[NLL] == pytest.approx(score_lm(task.teacher, _windows(task)).nll, rel=1e-5)
    assert table.modes["gptq-w4-g32"] == "gptq-g32"
    assert Sensitivity.from_json(table.to_json()) == table


@pytest.mark.parametrize("group, option", [("1.gate_up", "rtn-w2-g32"), ("head", "head4")])
def test_one_group_s_loss_is_what_the_built_plan_scores(tasks, group, option):
    # the output projection is tied to the embedding: its loss must see the embedding rounded too
    task = tasks["llama"]
    windows = _windows(task)
    table = llm_sensitivity(task.teacher, windows, RTN, head_bits=(4,))
    plan = plan_from_choice({group: option})
    scores = score_lm(apply_plan(task, plan), windows, teacher=task.teacher)
    assert scores.kl == pytest.approx(table.options[group][option][KL], rel=1e-4)


def test_losses_are_cached_in_the_folder_and_read_back(tasks, tmp_path, monkeypatch):
    task = tasks["llama"]
    calls = []
    measure = sens._losses

    def counted(*args, **kwargs):
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(sens, "_losses", counted)
    first = llm_sensitivity(task.teacher, _windows(task), RTN, folder=tmp_path, profiles=[PROFILE])
    second = llm_sensitivity(task.teacher, _windows(task), RTN, folder=tmp_path, profiles=[PROFILE])
    assert len(calls) == 1 and second == first and second.cached and not first.cached
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 1
    llm_sensitivity(task.teacher, _windows(task, 2), RTN, folder=tmp_path)  # other windows: measured anew
    llm_sensitivity(task.teacher, _windows(task), RTN[:2], folder=tmp_path)  # other choices: likewise
    assert len(calls) == 3


def test_a_planned_plan_costs_what_was_predicted_and_rebuilds_bit_exactly(tasks):
    task = tasks["llama"]
    choices = [WeightChoice(m, b, 32) for m in ("rtn", "gptq") for b in (4, 8)]
    table = llm_sensitivity(task.teacher, _windows(task), choices, kv_bits=(8,), head_bits=(8,), calib=task.train.x)
    problem = Problem(table.options, table.base, table.modes)
    front = sweep(problem, SIZE, minimise=KL, points=6)
    selection = next(s for s in front if s.chosen["head"] == "head8"
                     and {"gptq-w4-g32", "rtn-w4-g32"} & set(s.chosen.values()))
    plan = plan_from_choice(selection.chosen)
    first, second = apply_plan(task, plan), apply_plan(task, plan)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    record = record_of(first)
    assert set(record.quantized) == set(record_of(second).quantized)
    assert all(torch.equal(q.codes, record_of(second).quantized[p].codes) for p, q in record.quantized.items())
    assert torch.equal(record.head.codes, record_of(second).head.codes)
    # sizes add up exactly
    assert weight_bytes(first, quantized=record.quantized, **head_kwargs(record.head)) == selection.totals[SIZE]
    assert record.kv_bits == (8 if selection.chosen["kv"] == "kv8" else 32)


def test_gpt2_groups_across_blocks(tasks):
    task = tasks["gpt2"]
    table = llm_sensitivity(task.teacher, _windows(task, 2), RTN[1:], per_block=False)
    assert list(table.options) == ["qkv", "o", "gate_up", "down"]
    selection = solve(Problem(table.options, table.base, table.modes),
                      {SIZE: table.base[SIZE] + sum(o["rtn-w8-g32"][SIZE] for o in table.options.values())},
                      minimise=KL)
    model = apply_plan(task, plan_from_choice(selection.chosen))
    assert weight_bytes(model, quantized=record_of(model).quantized) == selection.totals[SIZE]


def test_choices_and_plans_are_checked():
    assert WeightChoice.parse("awq-w3-g64-asym") == WeightChoice("awq", 3, 64, False)
    assert WeightChoice("gptq", 4, 128).name == "gptq-w4-g128"
    with pytest.raises(ConfigError, match="must read"):
        WeightChoice.parse("gptq-4-128")
    with pytest.raises(ConfigError, match="bits"):
        WeightChoice("rtn", 5, 32)
    with pytest.raises(ConfigError, match="share method"):
        plan_from_choice({"0.qkv": "rtn-w4-g32", "0.o": "gptq-w4-g32"})
    plan = plan_from_choice({"0.qkv": "gptq-w4-g32", "0.o": FLOAT, "kv": "kv4", "head": "head8"})
    assert (plan.weight_method, plan.kv_bits, plan.head_bits, set(plan.layers)) == ("gptq", 4, 8, {"0.qkv"})
    with pytest.raises(ConfigError, match="head option"):
        plan_from_choice({"head": "kv8"})
    with pytest.raises(ConfigError, match="head_bits"):
        llm_sensitivity(None, None, (), head_bits=(6,))
