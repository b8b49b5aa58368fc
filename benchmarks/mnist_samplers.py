"""The MNIST example's job under each sampler: which front 24 candidates find (issue 5).

    python benchmarks/mnist_samplers.py [--samplers nsga2,auto] [--seeds 3] [--job examples/mnist.yaml]
                                        [--json out.json]

For each sampler and seed, the job file (default: the MNIST example) runs as
``slimsearch run JOB --out <tmp> --no-progress`` with ``search.sampler`` and
``search.seed`` replaced, as it ships otherwise (its budget, workers, objectives and
constraints). The seed also draws the task's data split and so its teacher: the samplers
are compared seed by seed, and each seed's teacher is trained into the cache first (not
timed).

Score: the hypervolume of the job's feasible candidates (those meeting its constraints)
in the box between an ideal point and the teacher, as a share of the box: each
objective is scaled to [0, 1], 0 at the ideal and 1 at the teacher's value (a metric
to maximise at the teacher's value minus the constraint's slack, 0.01 for the MNIST
example's ``accuracy_drop <= 0.01``, and its ideal at the teacher's value; a cost at
the teacher's value, and its ideal at 0). Measured latencies are scaled by the same
run's measured teacher latency, so a busier machine moves both. 4 objectives:
moocore's exact hypervolume (the project's own module stops at 3). Also per run:
feasible candidates, the front's size (feasible, non-dominated), screened plans, wall
time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(job: dict, sampler: str, seed: int, tmp: Path, score=None) -> dict:
    """``job`` under ``sampler`` and ``seed`` in a subprocess; ``score(front.json) -> dict`` (default: the
    MNIST box below) and the run's wall time, screened plans and folder."""
    data = {**job, "search": {**job["search"], "sampler": sampler, "seed": seed}}
    path = tmp / f"{sampler}-{seed}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp / f"{sampler}-{seed}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "slimsearch.cli", "run", str(path), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{sampler} seed {seed} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    front = json.loads((out / "front.json").read_text())
    state = json.loads((out / "job.json").read_text())
    trials = optuna.load_study(study_name=state["study_name"], storage=state["storage"]).get_trials(deepcopy=False)
    screened = sum(1 for t in trials if t.state == optuna.trial.TrialState.PRUNED)  # the driver's screen
    scored = (score or mnist_score)(front)
    planned = sum(1 for t in trials if t.user_attrs.get("planner"))  # enqueued by a causal-LM job's planner
    return {"sampler": sampler, "seed": seed, "wall_s": wall, **scored, "screened": screened, "planned": planned,
            "out": str(out)}


def box_score(front: dict, coordinate) -> dict:
    """Hypervolume of the feasible candidates inside the unit box, each objective placed by
    ``coordinate(name, mode, value, teacher_value)`` (0 ideal, 1 at the box's edge); the counts beside it."""
    import moocore
    import numpy as np

    objectives, teacher = front["objectives"], front["teacher"]
    feasible = [c for c in front["candidates"] if c["feasible"]]
    points = [[coordinate(name, mode, c["metrics"][name], teacher[name]) for name, mode in objectives.items()]
              for c in feasible]
    inside = [p for p in points if all(v < 1.0 for v in p)]
    hv = float(moocore.hypervolume(np.array(inside), ref=np.ones(len(objectives)))) if inside else 0.0
    return {"hypervolume": hv, "feasible": len(feasible), "front": len(front["front"]),
            "candidates": len(front["candidates"])}


def mnist_score(front: dict, slack: float = 0.01) -> dict:
    def coordinate(name, mode, value, base):
        # a score: 0 at the teacher's value, 1 at the constraint's edge; a cost: value / teacher's
        return (base - value) / slack if mode == "max" else value / base

    return box_score(front, coordinate)


def summarise(rows: list[dict], samplers: list[str]) -> list[dict]:
    """Per sampler, the means over its seeds' runs (and the per-seed hypervolumes)."""
    summary = []
    for sampler in samplers:
        mine = [r for r in rows if r["sampler"] == sampler]
        summary.append({"sampler": sampler, "seeds": len(mine),
                        "hypervolume_mean": statistics.fmean(r["hypervolume"] for r in mine),
                        "hypervolume_per_seed": [r["hypervolume"] for r in mine],
                        "feasible_mean": statistics.fmean(r["feasible"] for r in mine),
                        "front_mean": statistics.fmean(r["front"] for r in mine),
                        "screened_mean": statistics.fmean(r["screened"] for r in mine),
                        "wall_s_mean": statistics.fmean(r["wall_s"] for r in mine)})
    return summary


def print_table(summary: list[dict], evaluated: int) -> None:
    print(f"| sampler | seeds | hypervolume (mean) | per seed | feasible of {evaluated} | front | screened | wall |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for s in summary:
        per = " ".join(f"{v:.4f}" for v in s["hypervolume_per_seed"])
        print(f"| {s['sampler']} | {s['seeds']} | {s['hypervolume_mean']:.4f} | {per} | {s['feasible_mean']:.1f} | "
              f"{s['front_mean']:.1f} | {s['screened_mean']:.1f} | {s['wall_s_mean']:.0f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", type=Path, default=ROOT / "examples" / "mnist.yaml")
    ap.add_argument("--samplers", default="nsga2,auto")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    job = yaml.safe_load(args.job.read_text())
    if job.get("constraints") != ["accuracy_drop <= 0.01"]:
        raise SystemExit("the score's box assumes the MNIST example's one constraint, accuracy_drop <= 0.01")

    from slimsearch.tasks import load_task

    for seed in range(args.seeds):  # the seed also draws the task's split and teacher: cached first, not timed
        load_task(job["task"], seed=seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="slimsearch-samplers-") as tmp:
        for seed in range(args.seeds):  # seeds outermost: a drift in the machine's load hits every sampler
            for sampler in args.samplers.split(","):
                rows.append(run(job, sampler, seed, Path(tmp)))
                r = rows[-1]
                print(f"  {sampler} seed {seed}: hypervolume {r['hypervolume']:.4f}, feasible {r['feasible']}, "
                      f"front {r['front']}, {r['wall_s']:.0f} s", file=sys.stderr)
    summary = summarise(rows, args.samplers.split(","))
    print_table(summary, rows[0]["candidates"])
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
