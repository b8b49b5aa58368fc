"""A small recorded job (the shape of front.json) shared by the dashboard tests."""

from __future__ import annotations

import pytest


def _candidate(trial, acc, lat, size, bits, prune, on_front):
    layers = {"conv1": {"weight_bits": bits, "act_bits": 8, "prune_ratio": prune},
              "fc": {"weight_bits": 8, "act_bits": 32, "prune_ratio": 0.0}}
    return {"trial": trial, "run_id": f"r{trial}", "params": {"weight_bits": bits, "prune_ratio": prune,
                                                             "importance": "l1" if trial % 2 else "l2"},
            "plan": {"layers": layers}, "describe": f"conv1:w{bits}a8 -{prune:.0%}, KD 0 steps",
            "metrics": {"accuracy": acc, "latency_ms@local": lat, "size_bytes": size,
                        "latency_ms@raspberry-pi-4": lat * 3},
            "provenance": {"latency_ms@local": "measured", "latency_ms@raspberry-pi-4": "modelled",
                           "size_bytes": "measured"},
            "on_front": on_front}


@pytest.fixture
def job_data() -> dict:
    candidates = [
        _candidate(0, 0.90, 2.0, 4000, 4, 0.5, True),   # fastest, smallest
        _candidate(1, 0.97, 4.0, 9000, 8, 0.0, True),   # most accurate
        _candidate(2, 0.89, 4.5, 9500, 8, 0.25, False),  # dominated by 1
        _candidate(3, 0.95, 3.0, 6000, 8, 0.25, True),
    ]
    return {"job": "demo", "metric": "accuracy",
            "objectives": {"accuracy": "max", "latency_ms@local": "min", "size_bytes": "min"},
            "teacher": {"accuracy": 0.98, "latency_ms@local": 5.0, "size_bytes": 10000},
            "candidates": candidates, "front": [c for c in candidates if c["on_front"]], "failed": []}
