"""The MNIST example as a job (issue 5): time outside evaluate, 1 vs 2 workers, early stopping.

    python benchmarks/mnist_job.py [--workers 1,2 | --workers 1x1,2x1] [--budget 24] [--job examples/mnist.yaml]
                                   [--max-drop D] [--ray-address auto] [--no-ceiling] [--no-floor]
                                   [--json out.json]

For each worker count N (``NxT``: with T torch threads each; default: the cores shared out),
``slimsearch run JOB --workers N [--threads T] --out <tmp>/<item> --no-progress`` runs as a
subprocess, timed from start to exit (wall). The MNIST teacher is trained into the cache
first (once, not timed), as a user's second job would find it. From the job's Optuna study:

* ``inside evaluate``: the seconds each worker spent inside ``evaluate`` (timed in the worker:
  build the plan's model, fine-tune, measure), summed over candidates;
* ``outside``: ``1 - inside / (wall x N)``: the share of the workers' time not spent evaluating a
  candidate (start-up: data, teacher measurement, Ray; scheduling; MLflow logging; the report);
* ``candidates/h``: completed candidates per hour of wall time; each row gives its
  ratio to the first row (with `--workers 1,2`, the target's measure);
* ``KD steps`` and ``steps/h``: the distillation steps of those candidates, and per hour of
  wall time. The sampler proposes other plans when results arrive in another order (2
  workers), so the two rows fine-tune different amounts; steps/h compares the work done;
* where the outside time goes, from the study's timestamps (a trial's ``evaluate`` is taken
  to end when the driver records it, a few ms later, and to start ``evaluate_s`` before):
  ``start`` from the command's start to the first ``evaluate``'s start (imports, data, the
  teacher's measurement, the study and the MLflow store, Ray, the first worker's start),
  ``end`` from the last ``evaluate``'s end to the exit, and ``between`` the rest of each
  worker's share (Ray Tune's call and report, Optuna, MLflow's child run, a worker idle
  while the other runs the last candidate).

Ceiling of the last-vs-first ratio, with no time outside ``evaluate`` at all: one candidate of
the first job (its first with 200 KD steps) is evaluated, outside any job, by N processes at
once with that row's T torch threads each (3 times; the first, which also computes the
teacher's logits, is not counted). N workers can complete at most
``N / (their seconds per candidate)`` candidates per second, whatever the driver does.

Floor of the time outside ``evaluate``, whatever the driver does with Ray Tune: a fresh Python
process that does nothing but start Ray (as a job does) and run N Ray Tune trials whose
trainable only imports torch (as a worker must before any evaluation) and says when it is
ready; timed from the process's launch, 3 times. No slimsearch import, job file, data,
teacher, study or MLflow store is in it, so a job's own start can only be longer. If each
worker's sole time outside ``evaluate`` were its wait for that first trial, the job's share
outside would be ``waits / (inside + waits)``, with the job's own inside time: the lowest
share any driver on Ray Tune can reach on this machine (end, between and the last
candidate's tail count nothing here).

Early stopping, on the first job of ``--workers``: each candidate stopped early
is evaluated again in this process to the end of its fine-tuning, with the job's torch thread
count. ``saved`` is its full evaluation time minus the stopped one's; ``would have joined the
front`` counts the fully fine-tuned ones that meet the job's constraints and that no front
member of the job dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE_TARGET = 0.05
SCALING_TARGET = 1.6


def run_job(job: Path, out: Path, workers: int, threads: int | None, budget: int | None,
            ray_address: str | None = None) -> dict:
    import optuna

    from slimsearch.search import EVALUATE_ATTR

    cmd = [sys.executable, "-m", "slimsearch.cli", "run", str(job), "--out", str(out), "--workers", str(workers),
           "--no-progress"]
    if budget is not None:
        cmd += ["--budget", str(budget)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if ray_address is not None:
        cmd += ["--ray-address", ray_address]
    began = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    state = json.loads((out / "job.json").read_text())
    study = optuna.load_study(study_name=state["study_name"], storage=state["storage"])
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    inside = sum(t.user_attrs.get(EVALUATE_ATTR, 0.0) for t in trials)
    timed = [t for t in trials if t.user_attrs.get(EVALUATE_ATTR) is not None and t.datetime_complete is not None]
    ends = [t.datetime_complete.timestamp() - began for t in timed]  # Optuna keeps local naive datetimes
    start = min(e - t.user_attrs[EVALUATE_ATTR] for e, t in zip(ends, timed))
    end = wall - max(ends)
    # the sampler picks other plans for another worker count: the fine-tuning steps they add up to
    steps = sum(c["plan"]["distill"]["steps"] for c in json.loads((out / "front.json").read_text())["candidates"])
    return {"workers": workers, "wall_s": wall, "candidates": len(complete), "inside_evaluate_s": inside,
            "distill_steps": steps, "distill_steps_per_hour": 3600.0 * steps / wall,
            "outside_share": 1.0 - inside / (wall * workers), "candidates_per_hour": 3600.0 * len(complete) / wall,
            "start_s": start, "end_s": end, "between_s": wall - start - end - inside / workers,
            "threads_per_worker": state["threads"][-1][1], "out": str(out), "log": proc.stdout}


def check_stops(out: Path) -> dict:
    """Fine-tune every stopped candidate to the end; the time that took and whether it would have joined the front."""
    import optuna
    import torch

    from slimsearch.jobs.spec import JobSpec
    from slimsearch.search import EVALUATE_ATTR, Constraint
    from slimsearch.jobs.early_stop import STEPS_METRIC, STOPPED_METRIC
    from slimsearch.jobs.worker import cached_task, build_space, evaluate_params
    from slimsearch.search.pareto import dominates

    state = json.loads((out / "job.json").read_text())
    spec = JobSpec.from_json(json.dumps(state["spec"]))
    front = json.loads((out / "front.json").read_text())
    torch.set_num_threads(state["threads"][-1][1])
    task = cached_task(spec.task, spec.search.seed, spec.task_path)
    space = build_space(spec, task)
    study = optuna.load_study(study_name=state["study_name"], storage=state["storage"])
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    objectives = front["objectives"]
    members = [[c["metrics"][m] for m in objectives] for c in front["front"]]
    constraints = [Constraint.parse(c) for c in spec.constraints]
    rows = []
    for c in front["candidates"]:
        if not c["metrics"].get(STOPPED_METRIC):
            continue
        t0 = time.perf_counter()
        full = evaluate_params(c["params"], job_json=json.dumps(state["spec"]), space=space,
                               teacher_score=front["teacher"][front["metric"]]).values
        seconds = time.perf_counter() - t0
        point = [full[m] for m in objectives]
        feasible = all(k.violation(full) == 0.0 for k in constraints)
        joins = feasible and not any(dominates(m, point, list(objectives.values())) for m in members)
        rows.append({"trial": c["trial"], "steps_done": c["metrics"][STEPS_METRIC],
                     "steps": c["plan"]["distill"]["steps"], "metric_at_stop": c["metrics"][front["metric"]],
                     "metric_full": full[front["metric"]], "stopped_s": by_number[c["trial"]].user_attrs[EVALUATE_ATTR],
                     "full_s": seconds, "would_join_front": joins})
    inside = sum(t.user_attrs.get(EVALUATE_ATTR, 0.0) for t in by_number.values())
    saved = sum(r["full_s"] - r["stopped_s"] for r in rows)
    return {"candidates": len(front["candidates"]), "stopped": len(rows), "saved_s": saved,
            "saved_share": saved / (inside + saved) if inside + saved else 0.0,
            "would_join_front": sum(r["would_join_front"] for r in rows), "rows": rows}


def time_candidate(job: Path, params_file: Path, threads: int, repeat: int) -> None:
    """(A subprocess of :func:`ceiling`.) Evaluate one candidate ``repeat`` times; print the seconds as JSON."""
    import torch

    from slimsearch.jobs.load import load_job
    from slimsearch.jobs.worker import cached_task, build_space, evaluate_params

    torch.set_num_threads(threads)
    spec = load_job(job)
    task = cached_task(spec.task, spec.search.seed, spec.task_path)
    space = build_space(spec, task)
    data = json.loads(params_file.read_text())
    seconds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        evaluate_params(data["params"], job_json=spec.to_json(), space=space, teacher_score=data["teacher_score"])
        seconds.append(time.perf_counter() - t0)
    print(json.dumps(seconds))


def probe_floor(workers: int, threads: int, launched: float) -> None:
    """(A subprocess of :func:`floor`.) Start Ray, run ``workers`` trials that import torch; print when each
    was ready."""
    from ray import tune

    from slimsearch.ray_runtime import start_ray

    start_ray(workers * threads)
    ray_up = time.time()

    def trainable(config):
        import torch

        torch.set_num_threads(threads)
        tune.report({"ready": time.time()})

    with tempfile.TemporaryDirectory() as tmp:
        tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": threads}),
                           tune_config=tune.TuneConfig(num_samples=workers, max_concurrent_trials=workers,
                                                       reuse_actors=True),
                           run_config=tune.RunConfig(storage_path=tmp, name="floor", verbose=0))
        ready = sorted(r.metrics["ready"] for r in tuner.fit())
    print(json.dumps({"ray_up_s": ray_up - launched, "trial_ready_s": [t - launched for t in ready]}))


def floor(configs: list[tuple[int, int]], repeat: int = 3) -> list[dict]:
    """For each (N, T): seconds from a process's launch until Ray is up and until each of N trials is ready."""
    rows = []
    for n, threads in configs:
        probes = []
        for _ in range(repeat):
            cmd = [sys.executable, __file__, "--probe-floor", str(n), "--threads", str(threads), "--launched"]
            launched = time.time()
            proc = subprocess.run([*cmd, repr(launched)], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"floor probe failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            probes.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        waits = [sum(p["trial_ready_s"]) for p in probes]  # summed over the N workers
        rows.append({"workers": n, "threads": threads, "ray_up_s": [p["ray_up_s"] for p in probes],
                     "trial_ready_s": [p["trial_ready_s"] for p in probes], "waits_s": waits,
                     "min_waits_s": min(waits)})
    return rows


def ceiling(job: Path, out: Path, configs: list[tuple[int, int]], tmp: Path) -> dict:
    """Seconds per candidate of N processes side by side (T threads each), for each (N, T) in ``configs``."""
    front = json.loads((out / "front.json").read_text())
    picked = next((c for c in front["candidates"] if c["plan"]["distill"]["steps"] == 200), front["candidates"][0])
    params_file = tmp / "ceiling_params.json"
    params_file.write_text(json.dumps({"params": picked["params"], "teacher_score": front["teacher"][front["metric"]]}))
    rows = []
    for n, threads in configs:
        cmd = [sys.executable, __file__, "--job", str(job), "--time-candidate", str(params_file),
               "--threads", str(threads)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
        runs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        per = sum(sum(r[1:]) / len(r[1:]) for r in runs) / n
        rows.append({"workers": n, "threads": threads, "seconds_per_candidate": per,
                     "candidates_per_hour": 3600 * n / per})
    return {"trial": picked["trial"], "steps": picked["plan"]["distill"]["steps"], "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", type=Path, default=ROOT / "examples" / "mnist.yaml")
    ap.add_argument("--workers", default="1,2", help="worker counts, N or NxT (T torch threads per worker); the "
                                                      "first is the baseline of the ratios")
    ap.add_argument("--budget", type=int, default=None, help="default: the job file's")
    ap.add_argument("--max-drop", type=float, default=None,
                    help="replace the job's constraints with accuracy_drop <= this (a job where early stopping has "
                         "candidates to stop)")
    ap.add_argument("--ray-address", help="join this running Ray (e.g. 'auto' after `ray start --head "
                                          "--num-cpus 2`) instead of starting Ray in each job")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the ceiling measurement (about a minute)")
    ap.add_argument("--no-floor", action="store_true", help="skip the floor measurement (about 30 s per row; "
                                                                  "skipped with --ray-address)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--time-candidate", type=Path, help=argparse.SUPPRESS)  # ceiling()'s subprocesses
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--probe-floor", type=int, help=argparse.SUPPRESS)  # floor()'s subprocesses
    ap.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_candidate is not None:
        time_candidate(args.job, args.time_candidate, args.threads, repeat=3)
        return
    if args.probe_floor is not None:
        probe_floor(args.probe_floor, args.threads, args.launched)
        return

    from slimsearch.jobs.load import load_job
    from slimsearch.tasks import load_task

    spec = load_job(args.job)
    t0 = time.perf_counter()
    load_task(spec.task, seed=spec.search.seed, path=spec.task_path)  # trains and caches the teacher if needed
    print(f"teacher of {spec.task} ready in {time.perf_counter() - t0:.0f} s (not timed below)", file=sys.stderr)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        job = args.job
        if args.max_drop is not None:
            import yaml

            data = yaml.safe_load(args.job.read_text())
            data["constraints"] = [f"accuracy_drop <= {args.max_drop:g}"]
            job = Path(tmp) / args.job.name
            job.write_text(yaml.safe_dump(data, sort_keys=False))
        for item in args.workers.split(","):
            n, _, t = item.partition("x")
            runs.append(run_job(job, Path(tmp) / item, int(n), int(t) if t else None, args.budget,
                                args.ray_address))
            r = runs[-1]
            print(f"  {n} worker(s): {r['candidates']} candidates in {r['wall_s']:.0f} s", file=sys.stderr)
        stops = check_stops(Path(runs[0]["out"]))
        bound = None
        if len(runs) > 1 and not args.no_ceiling:
            bound = ceiling(job, Path(runs[0]["out"]), [(r["workers"], r["threads_per_worker"]) for r in runs],
                            Path(tmp))
    floors = None
    if not args.no_floor and args.ray_address is None:
        floors = floor([(r["workers"], r["threads_per_worker"]) for r in runs])
        for r, f in zip(runs, floors):
            r["floor_outside_share"] = f["min_waits_s"] / (r["inside_evaluate_s"] + f["min_waits_s"])
    base = runs[0]["candidates_per_hour"]
    print(f"{'workers':>7} {'threads':>7} {'cands':>5} {'wall s':>7} {'in eval s':>9} {'outside':>8} "
          f"{'cand/h':>7} {'vs first':>8} {'KD steps':>8} {'steps/h':>7} {'vs first':>8} {'start s':>7} "
          f"{'between s':>9} {'end s':>5}")
    for r in runs:
        print(f"{r['workers']:>7} {r['threads_per_worker']:>7} {r['candidates']:>5} {r['wall_s']:>7.0f} "
              f"{r['inside_evaluate_s']:>9.0f} {r['outside_share']:>8.1%} {r['candidates_per_hour']:>7.0f} "
              f"{r['candidates_per_hour'] / base:>7.2f}x {r['distill_steps']:>8} {r['distill_steps_per_hour']:>7.0f} "
              f"{r['distill_steps_per_hour'] / runs[0]['distill_steps_per_hour']:>7.2f}x {r['start_s']:>7.1f} "
              f"{r['between_s']:>9.1f} {r['end_s']:>5.1f}")
    worst = max(r["outside_share"] for r in runs)
    print(f"time outside evaluate: at most {worst:.1%} (target <= {OUTSIDE_TARGET:.0%}: "
          f"{'PASS' if worst <= OUTSIDE_TARGET else 'FAIL'})")
    if len(runs) > 1:
        ratio = runs[-1]["candidates_per_hour"] / base
        print(f"{runs[-1]['workers']} x {runs[-1]['threads_per_worker']} vs {runs[0]['workers']} x "
              f"{runs[0]['threads_per_worker']} thread(s): {ratio:.2f}x the candidates per hour "
              f"(target >= {SCALING_TARGET}x: {'PASS' if ratio >= SCALING_TARGET else 'FAIL'})")
    if bound is not None:
        first, last = bound["rows"][0], bound["rows"][-1]
        print(f"ceiling with no time outside evaluate (trial {bound['trial']}, {bound['steps']} KD steps, outside any "
              f"job): {first['workers']} x {first['threads']} thread(s) {first['seconds_per_candidate']:.2f} s per "
              f"candidate, {last['workers']} x {last['threads']} side by side {last['seconds_per_candidate']:.2f} s "
              f"each: at most {last['candidates_per_hour'] / first['candidates_per_hour']:.2f}x")
    if floors is not None:
        print("floor, a process that only starts Ray and N Ray Tune trials that import torch (3 runs; seconds from "
              "its launch):")
        for r, f in zip(runs, floors):
            ready = ", ".join("/".join(f"{t:.1f}" for t in p) for p in f["trial_ready_s"])
            print(f"  {f['workers']} x {f['threads']}: Ray up at {', '.join(f'{t:.1f}' for t in f['ray_up_s'])}; "
                  f"trials ready at {ready}; with no other time outside evaluate this job would still spend "
                  f"{r['floor_outside_share']:.1%} outside (target <= {OUTSIDE_TARGET:.0%})")
    print(f"early stopping ({runs[0]['workers']} worker job): {stops['stopped']} of {stops['candidates']} candidates "
          f"stopped; fine-tuning them to the end took {stops['saved_s']:.0f} s more "
          f"({stops['saved_share']:.1%} of all time inside evaluate); {stops['would_join_front']} of them would have "
          "joined the front")
    for r in stops["rows"]:
        print(f"  trial {r['trial']}: stopped at step {r['steps_done']:g} of {r['steps']} ({r['metric_at_stop']:.4f}); "
              f"to the end {r['metric_full']:.4f}, {r['full_s'] - r['stopped_s']:.1f} s more; "
              f"{'would join the front' if r['would_join_front'] else 'dominated or infeasible'}")
    if args.json:
        for r in runs:
            r.pop("log")
        args.json.write_text(json.dumps({"runs": runs, "early_stopping": stops, "ceiling": bound, "floor": floors},
                                        indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
