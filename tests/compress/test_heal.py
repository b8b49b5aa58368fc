"""Healing by distillation (compress/heal.py): the chunked KL loss and a short heal of a cut tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from slimsearch.compress.heal import chunked_kl, heal
from slimsearch.exceptions import ConfigError
from slimsearch.structures import llm
from slimsearch.structures.llm_cuts import cut, importance

VOCAB = 64
from tests._tiny_llm import one_thread  # noqa: F401 (a fixture)


pytestmark = pytest.mark.usefixtures("one_thread")


def _full_kl(student_hidden, teacher_hidden, student_head, teacher_head):
    teacher = F.log_softmax(teacher_head(teacher_hidden), dim=-1)
    student = F.log_softmax(student_head(student_hidden), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


@pytest.mark.parametrize("chunk", [1, 4, 5, 14, 100])
def test_chunked_kl_equals_the_unchunked_loss_and_gradients(chunk):
    torch.manual_seed(0)
    student_head = torch.nn.Linear(8, 50, bias=False)
    teacher_head = torch.nn.Linear(12, 50)  # a wider teacher, with a bias
    student_hidden = torch.randn(2, 7, 8, requires_grad=True)
    teacher_hidden = torch.randn(2, 7, 12)
    expected = _full_kl(student_hidden, teacher_hidden, student_head, teacher_head)
    grads = torch.autograd.grad(expected, [student_hidden, student_head.weight])

    loss = chunked_kl(student_hidden, teacher_hidden, student_head, teacher_head, chunk=chunk)
    assert torch.allclose(loss, expected, atol=1e-6)
    for got, want in zip(torch.autograd.grad(loss, [student_hidden, student_head.weight]), grads):
        assert torch.allclose(got, want, atol=1e-6)
    assert teacher_head.weight.grad is None


def test_no_logits_are_kept_for_backward():
    """Autograd saves only the chunks' hidden states: backward recomputes each chunk's logits."""
    vocab, hidden = 1000, 8
    head = torch.nn.Linear(hidden, vocab, bias=False)
    student_hidden = torch.randn(1, 64, hidden, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = chunked_kl(student_hidden, torch.randn(1, 64, hidden), head, head, chunk=16)
    assert max(saved) <= 16 * hidden < vocab
    loss.backward()
    assert student_hidden.grad is not None and head.weight.grad is not None


def test_bad_arguments_are_refused():
    head = torch.nn.Linear(4, 10)
    with pytest.raises(ConfigError, match="chunk must be a positive int"):
        chunked_kl(torch.randn(3, 4), torch.randn(3, 4), head, head, chunk=0)
    with pytest.raises(ConfigError, match="same positions"):
        chunked_kl(torch.randn(3, 4), torch.randn(2, 4), head, head)


def _kl(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(chunked_kl(llm.final_hidden(student, ids), llm.final_hidden(teacher, ids),
                                student.get_output_embeddings(), teacher.get_output_embeddings()))


def test_healing_lowers_the_kl_to_the_teacher():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=True, initializer_range=0.2)
    teacher = LlamaForCausalLM(config).eval()
    windows = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    student = cut(teacher, importance(teacher, windows), ffn_keep=0.5, drop_layers=1)
    teacher_state = copy.deepcopy(teacher.state_dict())
    before = _kl(student, teacher, windows)
    losses = []

    healed = heal(student, teacher, windows, steps=20, lr=3e-3, batch_size=2, seq_len=16, chunk=5,
                  progress=lambda step, loss: losses.append((step, loss)))
    assert healed is student and not student.training and not teacher.training
    assert [step for step, _ in losses] == list(range(1, 21))
    assert _kl(student, teacher, windows) < 0.7 * before
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())
    assert llm.tied(student)
    with pytest.raises(ConfigError, match="steps must be"):
        heal(student, teacher, windows, steps=-1)
