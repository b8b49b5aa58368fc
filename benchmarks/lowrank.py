"""Low-rank factorisation of the mnist teacher's fc1: parameters, accuracy, and the exported ONNX.

For each rank ratio of fc1 (others untouched): fc1's parameters against the teacher's,
test accuracy in torch after ``--steps`` distillation steps (and with none), and the
test accuracy of the deployable ONNX graph in onnxruntime, the file an export writes.
Prints one table; ``--json PATH`` writes ``{"rows": [...]}``.

    python benchmarks/lowrank.py [--ratios 0.25,0.5] [--steps 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.25,0.5", help="rank ratios of fc1, comma-separated")
    parser.add_argument("--steps", type=int, default=200, help="distillation steps after the cut")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    import torch

    from slimsearch.compress import apply_plan
    from slimsearch.deploy.onnx_graph import ort_predict, ort_session
    from slimsearch.deploy.onnx_int8 import deployable_onnx_bytes
    from slimsearch.evaluators import score
    from slimsearch.spaces import CompressionPlan
    from slimsearch.spaces.plan import DistillPlan, LayerPlan
    from slimsearch.tasks import load_task

    task = load_task("mnist")
    teacher_fc1 = _params(task.teacher.get_submodule("fc1"))
    rows = [{"name": "teacher", "rank_ratio": 1.0, "fc1_params": teacher_fc1, "fc1_params_cut": 0.0,
             "steps": 0, "test_torch": score(task.teacher, task.test, task), "test_onnx": None}]
    for ratio in (float(r) for r in args.ratios.split(",")):
        for steps in (0, args.steps):
            plan = CompressionPlan(layers={"fc1": LayerPlan(rank_ratio=ratio)}, distill=DistillPlan(steps=steps))
            model = apply_plan(task, plan)
            fc1 = _params(model.get_submodule("fc1"))
            session = ort_session(deployable_onnx_bytes(model, task.example_input))
            onnx_acc = task.metric(ort_predict(session, task.test.x), task.test.y)
            rows.append({"name": f"fc1 rank {ratio:g}", "rank_ratio": ratio, "fc1_params": fc1,
                         "fc1_params_cut": 1 - fc1 / teacher_fc1, "steps": steps,
                         "test_torch": score(model, task.test, task), "test_onnx": onnx_acc})
    print(f"{'row':<16} {'KD steps':>8} {'fc1 params':>10} {'cut':>6} {'test (torch)':>12} {'test (ONNX)':>11}")
    for r in rows:
        onnx = "" if r["test_onnx"] is None else f"{r['test_onnx']:.4f}"
        print(f"{r['name']:<16} {r['steps']:>8} {r['fc1_params']:>10,} {r['fc1_params_cut']:>6.1%} "
              f"{r['test_torch']:>12.4f} {onnx:>11}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "torch_threads": torch.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    main()
