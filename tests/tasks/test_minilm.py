"""The minilm task: teacher wrapper, data, metrics, cache, and pruning the real MiniLM.

The task is built once for the module with small splits (48 val, 16 test, 64 train
items) so the teacher embeds only a few hundred texts on a 2-core CPU.
"""

from __future__ import annotations

import pytest
import torch

from slimsearch.spaces.plan import DistillPlan
from slimsearch.tasks import BUILTIN_TASKS, Task
from slimsearch.tasks._registry import BUILTIN_METRICS
from slimsearch.tasks._minilm import (
    MAX_LENGTH,
    distill_loss,
    embed,
    fidelity,
    load_sentence_transformer,
    minilm,
    paragraphs,
    retrieval_at_1,
    sentences,
)

SIZES = {"n_val": 48, "n_test": 16, "n_train": 64}


@pytest.fixture(scope="module")
def task(teacher_cache) -> Task:
    return minilm(seed=0, **SIZES)


@pytest.fixture(scope="module")
def pruned(task):
    """Half the heads and half the FFN neurons of every layer gone, and layers 1 and 4 dropped."""
    structure = task.structure
    ratios = {name: 0.5 for name in structure.groups(task.teacher, task.example_input)}
    return structure.prune(task.teacher, task.example_input, ratios, drop=("encoder.layer.1", "encoder.layer.4"))


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_minilm_is_a_builtin_task(task):
    assert "minilm" in BUILTIN_TASKS
    assert BUILTIN_METRICS["minilm"] == (task.metric_name, *task.extra_metrics)
    # The registry states the latency batch too, so job files can be checked without loading the task.
    from slimsearch.tasks._registry import BUILTIN_LATENCY_BATCH

    assert BUILTIN_LATENCY_BATCH["minilm"] == task.latency_batch


def test_paragraphs_are_prose_with_a_first_sentence():
    paras = paragraphs()
    assert len(paras) > 500
    assert len(set(paras)) == len(paras)
    for para in paras:
        assert ">>>" not in para and "\n" not in para
        assert len(sentences(para)) >= 2 and para.startswith(sentences(para)[0])


def test_splits_hold_token_ids_and_teacher_embeddings(task):
    assert (len(task.val), len(task.test), len(task.train)) == (48, 16, 64)
    for split in (task.train, task.val, task.test):
        assert split.x.dtype == torch.int64 and split.x.shape[1] == MAX_LENGTH
        assert (split.x[:, 0] == 101).all()  # [CLS]
        assert split.y.shape == (len(split), 384)
        torch.testing.assert_close(split.y.norm(dim=1), torch.ones(len(split)))
    assert task.val.extra["sentences"].shape == task.val.x.shape
    assert task.val.extra["paragraphs"] is task.val.x
    assert task.example_input.shape == (1, MAX_LENGTH) and task.example_input.dtype == torch.int64
    assert task.preprocessing.input_name == "input" and task.preprocessing.input_dtype == "int64"
    assert len(task.teacher_sha256) == 64
    assert task.metric_name == "fidelity" and set(task.extra_metrics) == {"retrieval_at_1"}


def test_teacher_equals_sentence_transformer_encode(task):
    model = load_sentence_transformer()
    model.max_seq_length = MAX_LENGTH
    texts = ["Hello world.", sentences(paragraphs()[3])[0], paragraphs()[0], " ".join(paragraphs()[:6])]
    expected = model.encode(texts, convert_to_tensor=True, batch_size=len(texts))
    ids = model.tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                          return_tensors="pt")["input_ids"]
    assert (ids[-1] != 0).all()  # the long text is truncated to the full length
    with torch.no_grad():
        got = task.teacher(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_teacher_fidelity_is_one_and_retrieval_well_above_chance(task):
    with torch.no_grad():
        outputs = task.teacher(task.val.x)  # full width, as the evaluator scores it
    assert fidelity(outputs, task.val.y) == pytest.approx(1.0, abs=1e-5)
    chance = 1 / len(task.val)
    assert retrieval_at_1(task.teacher, task.val) >= 0.8 > 10 * chance


def test_second_load_reads_the_cache(task, teacher_cache):
    before = set((teacher_cache / "tasks").glob("minilm-*.pt"))  # other tests may cache other sizes
    assert before
    again = minilm(seed=0, **SIZES)
    assert torch.equal(again.train.y, task.train.y) and torch.equal(again.val.x, task.val.x)
    assert set((teacher_cache / "tasks").glob("minilm-*.pt")) == before  # read, nothing new written


def test_pruned_minilm_is_smaller_and_keeps_its_interface(task, pruned):
    assert [isinstance(layer, torch.nn.Identity) for layer in pruned.encoder.layer] == [
        False, True, False, False, True, False]
    layers = [pruned.encoder.layer[i] for i in (0, 2, 3, 5)]
    assert [layer.attention.self.num_attention_heads for layer in layers] == [6] * 4
    assert [layer.intermediate.dense.out_features for layer in layers] == [768] * 4
    assert _params(pruned) < _params(task.teacher)
    with torch.no_grad():
        out = pruned(task.val.x[:3])
        assert out.shape == (3, 384)
        torch.testing.assert_close(pruned(task.val.x[:1]), out[:1], atol=1e-5, rtol=1e-4)
    assert 0.0 < fidelity(embed(pruned, task.val.x), task.val.y) < 1.0


def test_zero_ratio_prune_is_the_teacher(task):
    structure = task.structure
    same = structure.prune(task.teacher, task.example_input,
                           {name: 0.0 for name in structure.groups(task.teacher, task.example_input)})
    with torch.no_grad():
        assert torch.equal(same(task.val.x[:4]), task.teacher(task.val.x[:4]))
    assert _params(same) == _params(task.teacher)


def test_pruned_minilm_onnx_matches_torch(task, pruned):
    from slimsearch.deploy.onnx_graph import onnx_bytes, ort_predict, ort_session

    session = ort_session(onnx_bytes(pruned, task.example_input), threads=2)
    x = task.val.x[:4]
    with torch.no_grad():
        expected = pruned(x)
    torch.testing.assert_close(ort_predict(session, x), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ort_predict(session, x[:1]), expected[:1], atol=1e-5, rtol=1e-4)


def test_distill_loss_matches_embeddings_and_hidden_states(task, pruned):
    from slimsearch.structures.bert import capture_hidden

    y = task.train.y[:8]
    assert float(distill_loss(y, y, y, DistillPlan())) == pytest.approx(0.0, abs=1e-6)
    x = task.train.x[:8]
    with torch.no_grad(), capture_hidden(pruned) as student, capture_hidden(task.teacher) as teacher:
        out = pruned(x)
        task.teacher(x)
    plain = distill_loss(out, y, y, DistillPlan(hidden_weight=0.0), hidden=(student, teacher, x))
    mixed = distill_loss(out, y, y, DistillPlan(hidden_weight=0.5), hidden=(student, teacher, x))
    assert 0.0 < float(plain) < float(mixed)


def test_distill_with_hidden_states_pulls_the_student_states_towards_the_teacher(task, pruned):
    """plan.hidden_weight > 0: distill() runs both models inside task.hidden_states and adds the state loss."""
    import copy

    from slimsearch.compress.distill import distill
    from slimsearch.structures.bert import hidden_state_loss

    x = task.val.x[:8]
    mask = x != 0

    def state_gap(model) -> float:
        with torch.no_grad(), task.hidden_states(model) as student, task.hidden_states(task.teacher) as teacher:
            model.eval()(x)
            task.teacher(x)
        return float(hidden_state_loss(student, teacher, mask))

    plan = DistillPlan(steps=6, batch_size=8, lr=1e-3)
    embedding_only = distill(copy.deepcopy(pruned), task.teacher, task.train, plan, seed=0,
                             loss_fn=task.distill_loss, hidden_states=task.hidden_states)
    with_states = distill(copy.deepcopy(pruned), task.teacher, task.train,
                          DistillPlan(steps=6, batch_size=8, lr=1e-3, hidden_weight=1.0), seed=0,
                          loss_fn=task.distill_loss, hidden_states=task.hidden_states)
    assert state_gap(with_states) < state_gap(embedding_only) < state_gap(pruned) * 10


def test_hidden_state_matching_needs_a_task_with_hidden_states(task, pruned):
    from slimsearch.compress.distill import distill
    from slimsearch.exceptions import ConfigError

    with pytest.raises(ConfigError, match="exposes no hidden states"):
        distill(pruned, task.teacher, task.train, DistillPlan(steps=1, hidden_weight=1.0), seed=0,
                loss_fn=task.distill_loss)
