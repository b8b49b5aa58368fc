"""slimsearch._device: the device text, what it stands for on a machine with N GPUs, the GPU
share and workers a job defaults to, the Ray trial's request, and models moved without mutation.

The machine's GPU count is a parameter of the pure functions, so every case runs here (no GPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimsearch._device import (DeviceKind, default_gpus_per_worker, default_workers, device_name, device_of,
                                moved, parse_device, resolve_device, trial_resources)
from slimsearch.exceptions import ConfigError


@pytest.mark.parametrize("text, parsed", [("auto", (DeviceKind.AUTO, None)), ("cpu", (DeviceKind.CPU, None)),
                                          ("cuda", (DeviceKind.CUDA, None)), ("cuda:0", (DeviceKind.CUDA, 0)),
                                          ("cuda:7", (DeviceKind.CUDA, 7))])
def test_parse_device_reads_the_four_forms(text, parsed):
    assert parse_device(text) == parsed


@pytest.mark.parametrize("text", ["gpu", "CUDA", "cuda:", "cuda:-1", "cuda:01", "cpu:0", "auto:1", "mps", "", 0, None])
def test_parse_device_refuses_anything_else_in_one_line_saying_what_is_allowed(text):
    with pytest.raises(ConfigError) as info:
        parse_device(text)
    message = str(info.value)
    assert "\n" not in message and "allowed: 'auto'" in message and "'cuda:N'" in message


@pytest.mark.parametrize("text, gpus, expected", [("auto", 0, "cpu"), ("auto", 2, "cuda"), ("cpu", 2, "cpu"),
                                                  ("cuda", 1, "cuda"), ("cuda:1", 2, "cuda:1")])
def test_device_name_on_a_machine_with_n_gpus(text, gpus, expected):
    assert device_name(text, gpus) == expected


@pytest.mark.parametrize("text, gpus, says", [("cuda", 0, "no CUDA GPU"), ("cuda:0", 0, "no CUDA GPU"),
                                              ("cuda:2", 2, "has 2 CUDA GPU(s)")])
def test_device_name_refuses_a_gpu_the_machine_lacks(text, gpus, says):
    with pytest.raises(ConfigError, match="allowed:") as info:
        device_name(text, gpus)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_resolve_device_auto_is_cuda_exactly_when_torch_sees_a_gpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None) == torch.device("cpu") == resolve_device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal of 'cuda' needs a machine without CUDA")
def test_resolve_device_refuses_cuda_without_a_gpu():
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_resolve_device_refuses_a_gpu_index_beyond_the_machines_count():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError):
        resolve_device(f"cuda:{count}")


@pytest.mark.parametrize("text, gpus, share", [("auto", 0, 0.0), ("cpu", 4, 0.0), ("auto", 1, 1.0), ("cuda", 2, 1.0)])
def test_default_gpu_share_is_a_whole_gpu_only_where_candidates_run_on_one(text, gpus, share):
    assert default_gpus_per_worker(text, gpus) == share


@pytest.mark.parametrize("text, gpus, share, cpus, workers", [
    ("auto", 0, 0.0, 16, 16),  # no GPU: one per core, as before
    ("cpu", 4, 0.0, 16, 16),  # told the CPU: GPUs do not count
    ("auto", 4, 1.0, 16, 4),  # one per GPU
    ("cuda", 1, 0.5, 16, 2),  # half a GPU each: two share it
    ("cuda", 2, 0.25, 2, 8),  # shares, not cores, bound GPU workers
    ("cuda", 1, 2.0, 16, 1),  # at least one
])
def test_default_workers(text, gpus, share, cpus, workers):
    assert default_workers(text, gpus, share, cpus) == workers


def test_a_trial_asks_for_its_threads_and_its_gpu_share_only_when_it_has_one():
    assert trial_resources(2, 0.0) == {"cpu": 2}
    assert trial_resources(4, 0.5) == {"cpu": 4, "gpu": 0.5}
    assert trial_resources(1, 1.0) == {"cpu": 1, "gpu": 1.0}


def test_moved_returns_the_model_itself_when_it_is_there_and_a_copy_otherwise():
    model = nn.Linear(3, 2)
    assert moved(model, "cpu") is model
    on_meta = moved(model, "meta")
    assert on_meta is not model and device_of(on_meta).type == "meta"
    assert device_of(model).type == "cpu"  # not moved in place
    assert device_of(nn.ReLU()) == torch.device("cpu")  # nothing to move: the CPU
