"""The teacher cache: a teacher is trained once, on all the machine's cores, then loaded."""

from __future__ import annotations

import os

import torch
from torch import nn

from slimsearch.tasks._cache import load_or_train


def test_a_teacher_trains_on_all_cores_whatever_the_callers_threads_and_is_then_loaded(tmp_path):
    seen = []

    def train(model):
        seen.append(torch.get_num_threads())
        with torch.no_grad():
            model.weight.fill_(0.5)

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as a job with one thread per worker sets it before loading its task
    try:
        sha = load_or_train(tmp_path / "t.pt", nn.Linear(3, 2), train)
        assert seen == [os.cpu_count()]
        assert torch.get_num_threads() == 1  # the caller's count is back
        again = nn.Linear(3, 2)
        assert load_or_train(tmp_path / "t.pt", again, train) == sha
        assert seen == [os.cpu_count()]  # loaded, not trained again
        assert torch.equal(again.weight, torch.full((2, 3), 0.5))
    finally:
        torch.set_num_threads(before)
