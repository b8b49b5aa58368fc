"""How far a paired measurement moves on this machine with nothing, or one training process, beside it.

    python benchmarks/paired_probe.py [--arch 2] [--n 40] [--neighbour none,train] [--reference float,kind]
                                      [--threads 1] [--spin] [--json out.json]

One of ``benchmarks/paired_latency.py``'s three fixed MNIST plans (``--arch``: 0 the teacher's graph,
1 50% channels 8-bit weights, 2 75% channels 4-bit weights 8-bit activations) is built once, and its
deployable ONNX graph is timed ``--n`` times against the teacher's with ``measure_paired`` (one
attempt each: no retries, so every excursion shows), at batch 1 and 64, ``--threads`` intra-op threads
(a job's worker has the machine's cores divided among its workers: one of two workers on 2 cores; the
pool threads do not spin between calls, as in a job, unless ``--spin``), while a
neighbour process does nothing (``none``) or trains a copy of the teacher (``train``). ``--reference``:
the graph it is paired with, the float teacher (``float``) and/or the teacher deployed as the plan's
own kind of graph (``kind``, as a job pairs it: :mod:`slimsearch.evaluators.graph_kinds`); with both,
each of the ``n`` measurements times both back to back, so they meet the same load. Printed per
neighbour, reference and batch: the median ratio, its range and largest deviation, and how many of the ``n``
measurements had the reference more than 10% slower than its fastest in the run, with the ratios of
those (a job's measurement retries when the teacher is over 20% slower than its fastest in the worker),
and how many had rounds disagreeing by more than the 10% a job tolerates (unsettled: retried after a
pause).
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _neighbour(task, mode: str, stop) -> None:
    import copy

    import torch

    torch.set_num_threads(1)
    if mode != "train":
        return
    model = copy.deepcopy(task.teacher)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = task.val.x[:64]
    while not stop.is_set():
        loss = model(x).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=2, choices=(0, 1, 2))
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--neighbour", default="none,train")
    parser.add_argument("--reference", default="float,kind")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of each graph's session")
    parser.add_argument("--spin", action="store_true", help="let the sessions' pool threads spin between calls "
                                                             "(onnxruntime's default; a job's timing sessions do not)")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    from paired_latency import ARCHITECTURES, fixed_params
    from slimsearch.compress import apply_plan
    from slimsearch.deploy.onnx_graph import INPUT_NAME, ort_session
    from slimsearch.deploy.onnx_int8 import deployable_onnx_bytes
    from slimsearch.hardware_profiles import measure_paired
    from slimsearch.jobs.load import load_job
    from slimsearch.jobs.worker import build_space
    from slimsearch.tasks import load_task

    tolerance = inspect.signature(measure_paired).parameters["tolerance"].default  # what a job's measurement allows

    torch.set_num_threads(args.threads)
    spec = load_job(str(Path(__file__).resolve().parents[1] / "examples" / "mnist.yaml"))
    task = load_task(spec.task, seed=spec.search.seed)
    space = build_space(spec, task)
    model = apply_plan(task, space.plan_from_params(fixed_params(space, ARCHITECTURES[args.arch], 0)))
    x = task.val.x[:1]
    inputs = {"latency_ms@local": x.numpy(), "latency_ms_b64@local": x.repeat(64, *[1] * (x.dim() - 1)).numpy()}

    def runs(m):  # the deployable graph on each timed input, as a job times it
        session = ort_session(deployable_onnx_bytes(m, task.example_input), threads=args.threads, spin=args.spin)
        return {name: (lambda feed=feed: session.run(None, {INPUT_NAME: feed})) for name, feed in inputs.items()}

    from slimsearch.evaluators.graph_kinds import graph_kind, kind_reference

    kind = graph_kind(model)
    graphs = {"float": task.teacher, "kind": kind_reference(task, kind)}
    references = {name: runs(graphs[name]) for name in args.reference.split(",")}
    candidate = runs(model)
    rows = []
    print(f"{ARCHITECTURES[args.arch][0]} ({kind} graph), {args.n} paired measurements each, one attempt, "
          f"{args.threads} thread(s){', spinning' if args.spin else ''}")
    print(f"{'neighbour':9} {'reference':9} {'metric':22} {'median':>7} {'min':>7} {'max':>7} {'max dev':>8} "
          f"{'unsettled':>9} {'slow ref':>8}  ratios then")
    for mode in args.neighbour.split(","):
        stop = mp.Event()
        proc = mp.get_context("fork").Process(target=_neighbour, args=(task, mode, stop))
        proc.start()
        time.sleep(1)
        for name in candidate:
            timings = {ref: [] for ref in references}
            for _ in range(args.n):  # the references back to back: the same moments' load
                for ref, reference in references.items():
                    timings[ref].append(measure_paired(candidate[name], reference[name], attempts=1))
            for ref, runs_ in timings.items():
                ratios = [t.ratio for t in runs_]
                mid = statistics.median(ratios)
                fastest = min(t.reference_ms for t in runs_)
                slow = [t.ratio for t in runs_ if t.reference_ms > 1.1 * fastest]
                unsettled = sum(t.cv > tolerance for t in runs_)
                row = {"neighbour": mode, "reference": ref if ref == "float" else kind, "metric": name,
                       "ratios": ratios, "reference_ms": [t.reference_ms for t in runs_], "median": mid,
                       "max_dev": max(abs(r / mid - 1) for r in ratios), "slow_reference": len(slow),
                       "unsettled": unsettled, "cv": [t.cv for t in runs_]}
                rows.append(row)
                print(f"{mode:9} {row['reference']:9} {name:22} {mid:7.4f} {min(ratios):7.4f} {max(ratios):7.4f} "
                      f"{row['max_dev']:8.1%} {unsettled:9d} {len(slow):8d}  {' '.join(f'{r:.3f}' for r in slow)}",
                      flush=True)
        stop.set()
        proc.join()
    if args.json:
        data = {"arch": ARCHITECTURES[args.arch][0], "kind": kind, "n": args.n, "threads": args.threads,
                "spin": args.spin, "rows": rows}
        Path(args.json).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
