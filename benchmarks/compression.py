"""Compression figures for issue 3, each beside the same figure for the unmodified teacher.

Prints one table; ``--json PATH`` writes the same rows. Latencies are measured on
this machine's CPU, one thread, median of repeats (training uses every core). Every row is timed in 11 short alternating
rounds with its own teacher (teacher, model, model, teacher, ...; the library's
``measure_paired``, as a job times its candidates); its "x" is the median of the per-round
ratios (``latency_x_cv`` in the JSON: their coefficient of variation; rounds that disagree are
timed again), and the ms columns the medians of the rounds, so a change in machine load between
rounds does not bias the ratios; run it on an idle machine all the same.

    python benchmarks/compression.py [--steps 300] [--minilm-steps 300] [--skip-minilm] [--json out.json]

mnist-resnet (test accuracy, batch 64, onnxruntime unless noted):
  the generic 50% channel pruning + distillation; 4-bit per-group weights (packed
  bytes, bit-exact reload); torch.nn.utils.prune L1-unstructured 50%;
  torch.ao.quantization.quantize_dynamic int8 (torch eager, against the teacher in
  torch eager).
minilm (test fidelity = mean cosine with the teacher's embeddings; batch 8 x 128
tokens; the metric is computed on the outputs of the runtime that is timed):
  W8A8 (8-bit weights and activations, QDQ in onnxruntime); heads, FFN neurons and a
  layer removed + distillation with hidden-state matching; the same two torch baselines.
The "target" column checks each row against the issue's figure for it.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import warnings
from pathlib import Path

REPEATS = 7
ROUNDS = 11


def _onnx_runner(model, x):
    """A function running ``model``'s deployable ONNX graph on ``x`` in onnxruntime, one thread."""
    from slimsearch.deploy.onnx_int8 import deployable_onnx_bytes
    from slimsearch.deploy.onnx_graph import INPUT_NAME, ort_session

    session = ort_session(deployable_onnx_bytes(model, x[:1]), threads=1)
    xb = x.numpy()
    return lambda: session.run(None, {INPUT_NAME: xb})


def _eager_runner(model, x):
    import torch

    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the onnxruntime rows; training keeps every core
        try:
            with torch.inference_mode():
                model(x)
        finally:
            torch.set_num_threads(threads)
    return run


def _paired_ms(run, teacher_run) -> tuple[float, float, float, float]:
    """Median ms of ``run`` and of ``teacher_run``, the median of their per-round ratios, and the
    ratios' coefficient of variation: the library's paired timing (``measure_paired``, what a
    job's workers and ``export`` use), in ``ROUNDS`` alternating rounds of ``REPEATS`` calls."""
    from slimsearch.hardware_profiles import measure_paired

    paired = measure_paired(run, teacher_run, rounds=ROUNDS, repeats=REPEATS)
    return paired.candidate_ms, paired.reference_ms, paired.ratio, paired.cv


def _ort_metric(model, task, split) -> float:
    """The task metric of ``model``'s deployable ONNX graph, run by onnxruntime on ``split``."""
    from slimsearch.deploy.onnx_int8 import deployable_onnx_bytes
    from slimsearch.deploy.onnx_graph import ort_predict, ort_session

    session = ort_session(deployable_onnx_bytes(model, task.example_input))
    return task.metric(ort_predict(session, split.x, batch_size=64), split.y)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _state_bytes(model) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, task, name, model, *, x, runtime, metric, teacher_metric, size, teacher_size, eager=False,
            target="", passed=None, note=""):
        teacher = task.teacher
        make = _eager_runner if eager else _onnx_runner
        ms, teacher_ms, ratio, cv = _paired_ms(make(model, x), make(teacher, x))
        row = {
            "task": task.name, "model": name, "runtime": runtime,
            "params": _params(model), "params_x": _params(model) / _params(teacher),
            "bytes": size, "bytes_x": size / teacher_size,
            "metric": task.metric_name, "value": metric, "teacher_value": metric if model is teacher else teacher_metric,
            "latency_ms_measured": ms, "teacher_latency_ms_measured": teacher_ms, "latency_x": ratio,
            "latency_x_cv": cv,
            "batch": list(x.shape), "target": target, "passed": passed, "note": note,
        }
        if callable(passed):
            row["passed"] = passed(row)
        self.rows.append(row)
        print(_line(row), flush=True)


HEADER = (f"{'task':12} {'model':46} {'params':>10} {'x':>6} {'bytes':>10} {'x':>6} {'metric':>8} {'teacher':>8} "
          f"{'ms':>8} {'teacher':>8} {'x':>6}  {'target':34} result  note")


def _line(r: dict) -> str:
    result = {True: "PASS", False: "FAIL", None: ""}[r["passed"]]
    return (f"{r['task']:12} {r['model']:46} {r['params']:10d} {r['params_x']:6.3f} {r['bytes']:10d} "
            f"{r['bytes_x']:6.3f} {r['value']:8.4f} {r['teacher_value']:8.4f} {r['latency_ms_measured']:8.2f} "
            f"{r['teacher_latency_ms_measured']:8.2f} {r['latency_x']:6.3f}  {r['target']:34} {result:6}  {r['note']}")


def _torch_baselines(table: Table, task, x, *, metric_of, teacher_metric, teacher_size, linear_only: bool):
    """torch.nn.utils.prune L1-unstructured 50% (float, zeros stored densely) and quantize_dynamic int8."""
    import torch
    import torch.nn.utils.prune as tprune

    kinds = (torch.nn.Linear,) if linear_only else (torch.nn.Conv2d, torch.nn.Linear)
    masked = copy.deepcopy(task.teacher)
    for module in masked.modules():
        if isinstance(module, kinds):
            tprune.l1_unstructured(module, "weight", amount=0.5)
            tprune.remove(module, "weight")
    table.add(task, "torch prune L1-unstructured 50%, no fine-tune", masked, x=x, runtime="onnxruntime",
              metric=metric_of(masked), teacher_metric=teacher_metric, size=_state_bytes(masked),
              teacher_size=teacher_size, note="zeros stored densely: same bytes and kernels as the teacher")
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices, not results
        warnings.simplefilter("ignore")
        dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(task.teacher), {torch.nn.Linear},
                                                          dtype=torch.qint8)
    from slimsearch.evaluators import score

    table.add(task, "torch quantize_dynamic int8 (Linear)", dynamic, x=x, runtime="torch eager",
              metric=score(dynamic, task.test, task, batch_size=64), teacher_metric=teacher_metric,
              size=_state_bytes(dynamic), teacher_size=teacher_size, eager=True,
              note="does not export to ONNX: timed in torch eager against the teacher in torch eager")


def mnist_resnet(table: Table, steps: int) -> None:
    import torch

    from slimsearch.compress import apply_plan
    from slimsearch.deploy.packed_file import load_packed, save_packed
    from slimsearch.deploy.pack import packed_size
    from slimsearch.structures.channels import ChannelStructure
    from slimsearch.tasks import layer_names
    from slimsearch.spaces import CompressionPlan, DistillPlan, LayerPlan
    from slimsearch.tasks import load_task

    task = load_task("mnist-resnet")
    teacher = task.teacher
    x = task.test.x[:64]
    metric_of = lambda m: _ort_metric(m, task, task.test)  # noqa: E731
    teacher_metric = metric_of(teacher)
    teacher_size = packed_size(teacher)
    table.add(task, "teacher (float)", teacher, x=x, runtime="onnxruntime", metric=teacher_metric,
              teacher_metric=teacher_metric, size=teacher_size, teacher_size=teacher_size)

    groups = ChannelStructure().groups(teacher, task.example_input)
    plan = CompressionPlan(layers={g: LayerPlan(prune_ratio=0.5) for g in groups}, distill=DistillPlan(steps=steps))
    start = time.perf_counter()
    pruned = apply_plan(task, plan)
    built = time.perf_counter() - start
    table.add(task, f"generic 50% channels + KD {steps} steps", pruned, x=x, runtime="onnxruntime",
              metric=metric_of(pruned), teacher_metric=teacher_metric, size=packed_size(pruned),
              teacher_size=teacher_size, target="params<=0.3x, ms<=0.5x, acc>=t-0.01",
              passed=lambda r: r["params_x"] <= 0.3 and r["latency_x"] <= 0.5 and r["value"] >= r["teacher_value"] - 0.01,
              note=f"{len(groups)} channel groups, every one halved; built in {built:.0f} s")

    four_bit = CompressionPlan(layers={n: LayerPlan(weight_bits=4, group_size=32) for n in layer_names(teacher)},
                               distill=DistillPlan(steps=steps))
    model4 = apply_plan(task, four_bit)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.slim"
        save_packed(model4, path)
        reloaded = load_packed(path, teacher)
        exact = all(torch.equal(a, b) for a, b in zip(model4.state_dict().values(), reloaded.state_dict().values()))
    float_bytes = sum(p.numel() * 4 for p in teacher.parameters())
    share = packed_size(model4) / float_bytes
    table.add(task, f"4-bit per-group(32) weights + KD {steps} steps", model4, x=x, runtime="onnxruntime",
              metric=metric_of(model4), teacher_metric=teacher_metric, size=packed_size(model4),
              teacher_size=teacher_size, target="bytes<=0.14x float32, exact reload",
              passed=share <= 0.14 and exact,
              note=f"{share:.3f}x the float32 parameter bytes; reload bit-exact: {exact}; runs as float "
                   "(dequantized weights): a size gain, not a speed gain")
    _torch_baselines(table, task, x, metric_of=metric_of, teacher_metric=teacher_metric, teacher_size=teacher_size,
                     linear_only=False)


def minilm(table: Table, steps: int) -> None:
    from slimsearch.compress import apply_plan
    from slimsearch.deploy.pack import packed_size
    from slimsearch.tasks import layer_names
    from slimsearch.spaces import CompressionPlan, DistillPlan, LayerPlan
    from slimsearch.tasks import load_task

    task = load_task("minilm")
    teacher = task.teacher
    x = task.val.x[:8]  # 8 paragraphs, padded to 128 tokens
    metric_of = lambda m: _ort_metric(m, task, task.test)  # noqa: E731
    teacher_metric = metric_of(teacher)
    teacher_size = packed_size(teacher)
    table.add(task, "teacher (float)", teacher, x=x, runtime="onnxruntime", metric=teacher_metric,
              teacher_metric=teacher_metric, size=teacher_size, teacher_size=teacher_size)
    linears = layer_names(teacher)
    w8a8 = {n: LayerPlan(weight_bits=8, act_bits=8) for n in linears}
    two_x = "ms<=0.5x at fidelity>=0.95"
    fast_and_faithful = lambda r: r["latency_x"] <= 0.5 and r["value"] >= 0.95  # noqa: E731

    model = apply_plan(task, CompressionPlan(layers=w8a8))
    table.add(task, "W8A8 (all 36 Linear), no fine-tuning", model, x=x, runtime="onnxruntime", metric=metric_of(model),
              teacher_metric=teacher_metric, size=packed_size(model), teacher_size=teacher_size,
              target="fidelity>=0.99 (speed as it is); " + two_x,
              passed=lambda r: r["value"] >= 0.99 and fast_and_faithful(r),
              note="int8 QDQ graph: onnxruntime runs integer MatMuls; embeddings stay float")

    structured = {}
    for i in range(6):
        structured[f"encoder.layer.{i}.ffn"] = LayerPlan(prune_ratio=0.5)
        structured[f"encoder.layer.{i}.attention"] = LayerPlan(prune_ratio=0.25)
    distill = DistillPlan(steps=steps, lr=3e-4, batch_size=16, hidden_weight=1.0)
    start = time.perf_counter()
    model = apply_plan(task, CompressionPlan(layers=structured, drop=("encoder.layer.5",), distill=distill))
    built = time.perf_counter() - start
    table.add(task, f"50% FFN, 25% heads, last layer + KD {steps}", model, x=x, runtime="onnxruntime",
              metric=metric_of(model), teacher_metric=teacher_metric, size=packed_size(model),
              teacher_size=teacher_size, target=two_x, passed=fast_and_faithful,
              note=f"float; distilled with hidden-state matching, lr 3e-4, batch 16, in {built:.0f} s")

    _torch_baselines(table, task, x, metric_of=metric_of, teacher_metric=teacher_metric, teacher_size=teacher_size,
                     linear_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="mnist-resnet distillation steps")
    parser.add_argument("--minilm-steps", type=int, default=300, help="minilm distillation steps")
    parser.add_argument("--skip-minilm", action="store_true", help="only the mnist-resnet rows")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    table = Table()
    print(HEADER, flush=True)
    mnist_resnet(table, args.steps)
    if not args.skip_minilm:
        minilm(table, args.minilm_steps)
    print("\n" + HEADER)
    for row in table.rows:
        print(_line(row))
    if args.json:
        Path(args.json).write_text(json.dumps(table.rows, indent=2))


if __name__ == "__main__":
    main()
