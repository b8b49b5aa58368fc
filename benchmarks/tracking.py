"""Cost of logging one candidate to MLflow with slimsearch's Tracker (issue 6: median <= 100 ms).

Prints one table; ``--json PATH`` writes the same rows.

    python benchmarks/tracking.py [--candidates 50] [--json out.json]

What is timed: ``Tracker.log_candidate`` as ``run_job`` calls it for each finished
candidate (create the child run with its tags, one ``log_batch`` of params and
metrics, set it terminated), into a fresh SQLite store in a temporary folder, as
the default job set-up does. The candidate is shaped like a digits/MNIST one: the
plan flattened into ~20 params plus the plan JSON, ~16 metrics (task metric, bytes,
MACs, latency/energy/cost on two profiles), provenance and power-mode tags. The
first candidate (store creation, schema migration, experiment creation) is timed
apart, as "first".
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

TARGET_MS = 100.0


def _candidate(i: int) -> tuple[dict, dict, dict, str, dict]:
    layers = ["conv1", "conv2", "fc1", "fc2"]
    params = {}
    for name in layers:
        params.update({f"weight_bits.{name}": 8 if i % 2 else 4, f"act_bits.{name}": 8,
                       f"prune_ratio.{name}": 0.25 * (i % 3), f"sparsity.{name}": 0.0})
    params.update({"distill_steps": 50, "importance": "l1", "act_calibration": "minmax", "seed": 0})
    values = {"accuracy": 0.97 - i * 1e-4, "accuracy_drop": 0.01, "accuracy_test": 0.96, "size_bytes": 12000 + i,
              "macs": 1.2e6, "bitops": 4e7, "latency_ms@local": 0.21, "latency_ms_b64@local": 1.3}
    for p in ("raspberry-pi-4", "jetson-orin-nano"):
        values.update({f"latency_ms@{p}": 0.5, f"energy_mj@{p}": 0.9, f"cost_usd_per_1m@{p}": None})
    provenance = {k: ("measured" if k.endswith("@local") else "modelled") for k in values if "@" in k}
    plan = json.dumps({"layers": {n: {"weight_bits": 8, "act_bits": 8, "prune_ratio": 0.25} for n in layers},
                       "distill": {"steps": 50}, "seed": 0})
    tags = {"power_mode.raspberry-pi-4": "default", "power_mode.jetson-orin-nano": "15W",
            "absent.cost_usd_per_1m/raspberry-pi-4": "not rented by the hour"}
    return params, values, provenance, plan, tags


def measure(n: int) -> dict:
    from slimsearch.storage.tracking import Tracker

    with tempfile.TemporaryDirectory(prefix="slimsearch-tracking-") as tmp:
        tracker = Tracker(f"sqlite:///{Path(tmp) / 'mlflow.db'}", "bench", artifact_root=Path(tmp) / "mlartifacts")
        start = time.perf_counter()
        tracker.start_parent("bench", {"job": "{}", "budget": n})
        setup_ms = (time.perf_counter() - start) * 1000
        times = []
        for i in range(n + 1):
            args = _candidate(i)
            t0 = time.perf_counter()
            tracker.log_candidate(i, args[0], args[1], args[2], args[3], tags=args[4])
            times.append((time.perf_counter() - t0) * 1000)
        tracker.finish()
    first, rest = times[0], sorted(times[1:])
    return {"store": "sqlite (new file)", "candidates": n, "parent_setup_ms": round(setup_ms, 1),
            "first_ms": round(first, 1), "median_ms": round(statistics.median(rest), 1),
            "p90_ms": round(rest[int(0.9 * (len(rest) - 1))], 1), "max_ms": round(rest[-1], 1),
            "target_ms": TARGET_MS, "meets_target": statistics.median(rest) <= TARGET_MS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=50, help="candidates timed after the first (default 50)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    row = measure(args.candidates)
    cols = ["store", "candidates", "parent_setup_ms", "first_ms", "median_ms", "p90_ms", "max_ms", "target_ms",
            "meets_target"]
    widths = [max(len(c), len(str(row[c]))) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join(str(row[c]).ljust(w) for c, w in zip(cols, widths)))
    if args.json:
        Path(args.json).write_text(json.dumps([row], indent=2))


if __name__ == "__main__":
    main()
