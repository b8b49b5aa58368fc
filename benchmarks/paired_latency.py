"""Paired local latency inside a job (issue 20, part 1): the same plans, measured again and again
while the other worker trains, and the exported member measured again by ``export``.

    python benchmarks/paired_latency.py [--job examples/mnist.yaml] [--workers 2] [--repeats 5]
                                        [--extra 9] [--json out.json]

The MNIST example job, as it ships, runs as ``slimsearch run JOB --workers 2 --budget B --storage
<study> --out <tmp>/job --no-progress`` in a subprocess (the teacher is trained into the cache
first, as a user's second job finds it). Before it starts, this script creates the job's Optuna
study and enqueues ``3 x repeats`` trials: 3 fixed architectures (prune ratio, weight bits and
activation bits of every layer), each ``repeats`` times. The repeats of an architecture differ only
in their distillation steps and the Jetson Orin Nano's power mode: neither changes the deployable
ONNX graph's shapes or operators (the trained weight values differ; the graph's speed does not
depend on them), and the search screens out a plan asked twice, so this is how one graph is
measured ``repeats`` times by the job itself. Optuna hands out enqueued trials first, so the
2 workers take them in turn; each is measured at the end of its evaluation, in its worker, while
the other worker runs its own trial (mostly fine-tuning). ``--extra`` trials of the sampler
follow (``B = 3 x repeats + extra``).

Per architecture and batch, from ``front.json``: the paired figure (``latency_ms[_b64]@local``:
median of per-round ratios to the reference, the teacher deployed as the plan's kind of graph, times
that reference's latency taken at the job's start)
of its trials, their median and their largest deviation from it; the raw figure
(``latency_ms_raw[_b64]@local``: the candidate's median in those rounds, as loaded as the machine
was) likewise; the median CV of the per-round ratios, the trials flagged noisy, and the trials
whose measurement (the end of the evaluation) overlapped another trial in the other worker
(from the study's start and end times). Then ``slimsearch export JOB --out <tmp>/export
--no-register`` rebuilds the default choice and measures it the same way (after the job: on a
quiet machine); its manifest's ``search_over_export`` compares the two.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (label, prune ratio, weight bits, activation bits) of every layer; the values must be in the job's space
ARCHITECTURES = (
    ("float, unpruned (the teacher's graph)", 0.0, 32, 32),
    ("50% channels, 8-bit weights", 0.5, 8, 32),
    ("75% channels, 4-bit weights, 8-bit acts", 0.75, 4, 8),
)
TARGET = 0.10  # the issue's bound on the paired figures' spread around their median, and on search vs export


def reference_kind(task, weight_bits: int, act_bits: int) -> str:
    """The graph kind (the reference it is paired with) of a plan with these bits on every layer."""
    from slimsearch.compress import apply_plan
    from slimsearch.evaluators.graph_kinds import graph_kind
    from slimsearch.spaces.plan import CompressionPlan, LayerPlan

    layer = LayerPlan(weight_bits=weight_bits, act_bits=act_bits)
    return graph_kind(apply_plan(task, CompressionPlan(layers={n: layer for n in task.plan_layers()})))


def fixed_params(space, architecture, variant: int) -> dict:
    """The params of ``architecture`` in ``space`` (its ``choices``), the ``variant``-th pair of
    distillation steps and power mode (neither changes the deployable graph); other choices at their first value."""
    _, prune, wbits, abits = architecture
    arch = {"prune_ratio": prune, "weight_bits": wbits, "act_bits": abits}
    free = [(name, values) for name, values in space.choices if name == "distill_steps" or name.startswith("power_mode")]
    combos = list(itertools.product(*[values for _, values in free]))
    if variant >= len(combos):
        raise SystemExit(f"the job's space has only {len(combos)} distillation-step x power-mode pairs; "
                         f"asked for repeat {variant + 1}")
    chosen = dict(zip([name for name, _ in free], combos[variant]))
    params = {}
    for name, values in space.choices:
        kind = name.split(".")[0]
        if name in chosen:
            params[name] = chosen[name]
        elif kind in arch:
            if arch[kind] not in values:
                raise SystemExit(f"{name}: {arch[kind]!r} is not in the job's space {list(values)}")
            params[name] = arch[kind]
        else:
            params[name] = values[0]
    return params


def spread(values: list[float]) -> tuple[float, float]:
    """The median of ``values`` and their largest deviation from it, as a share of it."""
    mid = statistics.median(values)
    return mid, max(abs(v / mid - 1) for v in values)


def overlaps(trials, number: int, window_s: float = 3.0) -> bool:
    """Whether another trial ran in the other worker during the last ``window_s`` seconds of trial
    ``number`` (where its local latency was timed)."""
    t = next(t for t in trials if t.number == number)
    end = t.datetime_complete.timestamp()
    return any(o.number != number and o.datetime_start is not None and o.datetime_complete is not None
               and o.datetime_start.timestamp() < end - window_s / 2 and o.datetime_complete.timestamp() > end
               for o in trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=str(ROOT / "examples" / "mnist.yaml"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="trials per fixed architecture")
    parser.add_argument("--extra", type=int, default=9, help="the sampler's own trials after the fixed ones")
    parser.add_argument("--json", help="also write the rows and the export comparison to this file")
    args = parser.parse_args()

    import optuna

    from slimsearch.evaluators.graph_kinds import kind_key
    from slimsearch.jobs.load import load_job
    from slimsearch.jobs.worker import build_space
    from slimsearch.tasks import load_task

    spec = load_job(args.job)
    started = time.perf_counter()
    task = load_task(spec.task, seed=spec.search.seed)  # trains the teacher into the cache if it is not there
    print(f"[bench] task {spec.task} loaded in {time.perf_counter() - started:.0f} s", flush=True)
    space = build_space(spec, task)
    budget = len(ARCHITECTURES) * args.repeats + args.extra

    tmp = tempfile.mkdtemp(prefix="paired-latency-")  # kept: the job folder and the export, to look into
    print(f"[bench] job and export under {tmp}", flush=True)
    out, export_dir = Path(tmp) / "job", Path(tmp) / "export"
    storage = f"sqlite:///{tmp}/study.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=spec.name, directions=[
        "maximize" if d.value == "max" else "minimize" for d in spec.objectives.values()])
    fixed: dict[int, int] = {}  # enqueue order -> architecture index
    for variant in range(args.repeats):  # interleaved: each worker meets every architecture
        for index, architecture in enumerate(ARCHITECTURES):
            study.enqueue_trial(fixed_params(space, architecture, variant), skip_if_exists=False)
            fixed[len(fixed)] = index
    cmd = [sys.executable, "-m", "slimsearch.cli", "run", args.job, "--out", str(out), "--workers",
           str(args.workers), "--budget", str(budget), "--storage", storage, "--no-progress"]
    print("[bench] " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    job_s = time.perf_counter() - started
    cmd = [sys.executable, "-m", "slimsearch.cli", "export", str(out), "--out", str(export_dir), "--no-register"]
    print("[bench] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    front = json.loads((out / "front.json").read_text())
    state = json.loads((out / "job.json").read_text())
    manifest = json.loads((export_dir / "manifest.json").read_text())
    trials = optuna.load_study(study_name=spec.name, storage=storage).get_trials(deepcopy=False)

    by_trial = {c["trial"]: c for c in front["candidates"]}
    batch = task.latency_batch
    rows = []
    for index, (label, _, wbits, abits) in enumerate(ARCHITECTURES):
        kind = reference_kind(task, wbits, abits)
        numbers = [n for n, a in fixed.items() if a == index]  # enqueued first: trial n is the n-th enqueued
        done = [by_trial[n] for n in numbers if n in by_trial]
        for suffix in ("", f"_b{batch}"):
            paired = [c["metrics"][f"latency_ms{suffix}@local"] for c in done]
            raw = [c["metrics"][f"latency_ms_raw{suffix}@local"] for c in done]
            cvs = [c["metrics"][f"latency_cv{suffix}@local"] for c in done]
            noisy = sum(c["metrics"][f"latency_noisy{suffix}@local"] > 0 for c in done)
            p_mid, p_dev = spread(paired)
            r_mid, r_dev = spread(raw)
            rows.append({"architecture": label, "batch": 1 if not suffix else batch, "trials": [c["trial"] for c in done],
                         "paired_ms": paired, "paired_median_ms": p_mid, "paired_max_dev": p_dev,
                         "raw_ms": raw, "raw_median_ms": r_mid, "raw_max_dev": r_dev,
                         "raw_max_over_min": max(raw) / min(raw), "median_cv": statistics.median(cvs),
                         "noisy": noisy, "overlapping": sum(overlaps(trials, c["trial"]) for c in done),
                         "teacher_ms": state["teacher"][f"latency_ms{suffix}@local"], "reference_kind": kind,
                         "reference_ms": {**state["teacher"], **state.get("reference_kinds", {})}[
                             kind_key(kind, f"latency_ms{suffix}@local")],
                         "passed": p_dev <= TARGET})

    latency = manifest["latency_at_export_measured_ms"]
    exported = {"trial": manifest["trial"], "selection": manifest["selection"],
                "search": {k: by_trial[manifest["trial"]]["metrics"][k] for k in latency["search_over_export"]},
                "export": {k: latency["model"][k] for k in latency["search_over_export"]},
                "search_over_export": latency["search_over_export"],
                "teacher_at_job_start": latency["teacher_at_job_start"], "teacher_at_export": latency["teacher"],
                "passed": all(abs(r - 1) <= TARGET for r in latency["search_over_export"].values())}

    print(f"\nMNIST example job at {args.workers} workers, budget {budget} ({len(fixed)} enqueued + {args.extra} "
          f"sampled), {job_s:.0f} s; teacher at the job's start: "
          + ", ".join(f"{k} {v:.3f} ms" for k, v in latency["teacher_at_job_start"].items()))
    print(f"{'architecture':42} {'reference':>9} {'batch':>5} {'n':>2} {'paired med':>10} {'max dev':>8} {'raw med':>8} "
          f"{'max dev':>8} {'raw max/min':>11} {'med CV':>7} {'noisy':>5} {'overlap':>7}  within 10%")
    for r in rows:
        print(f"{r['architecture']:42} {r['reference_kind']:>9} {r['batch']:5d} {len(r['trials']):2d} {r['paired_median_ms']:10.3f} "
              f"{r['paired_max_dev']:8.1%} {r['raw_median_ms']:8.3f} {r['raw_max_dev']:8.1%} "
              f"{r['raw_max_over_min']:11.2f} {r['median_cv']:7.3f} {r['noisy']:5d} {r['overlapping']:7d}  "
              f"{'PASS' if r['passed'] else 'FAIL'}")
    print(f"\nexported trial {exported['trial']} ({exported['selection']}):")
    for k in exported["search"]:
        print(f"  {k}: search {exported['search'][k]:.3f} ms, export {exported['export'][k]:.3f} ms, "
              f"search/export {exported['search_over_export'][k]:.3f}")
    print(f"  within 10%: {'PASS' if exported['passed'] else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"job_s": job_s, "budget": budget, "workers": args.workers,
                                               "rows": rows, "export": exported}, indent=2))


if __name__ == "__main__":
    main()
