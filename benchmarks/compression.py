"""Compression figures for issue 3, each beside the same figure for the unmodified teacher.

Prints one table; ``--json PATH`` writes the same rows. Latencies are measured on
this machine's CPU with onnxruntime (batch 64, median of repeats), so they vary with
load; run it on an idle machine.

    python benchmarks/compression.py [--steps 300] [--json out.json]

Rows (mnist-resnet):
  teacher, the generic 50% channel pruning + distillation, 4-bit per-group weights
  (packed bytes, bit-exact reload), torch.nn.utils.prune L1-unstructured 50%, and
  torch.ao.quantization.quantize_dynamic int8.
The minilm rows of the issue are not measured by this script yet.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path


def _latency_ms(model, x, threads: int = 1) -> float:
    from slimsearch.evaluators.deploy import deployable_onnx_bytes
    from slimsearch.evaluators.onnx_graph import INPUT_NAME, ort_session
    from slimsearch.hardware_profiles import measure_latency

    session = ort_session(deployable_onnx_bytes(model, x[:1]), threads=threads)
    xb = x.numpy()
    return measure_latency(lambda: session.run(None, {INPUT_NAME: xb}), warmup=5, repeats=30).median_ms


def _torch_latency_ms(model, x) -> float:
    import torch

    from slimsearch.hardware_profiles import measure_latency

    with torch.inference_mode():
        return measure_latency(lambda: model(x), warmup=5, repeats=30).median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="distillation steps after pruning")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    import torch

    from slimsearch.evaluators import apply_plan, score
    from slimsearch.evaluators.deploy import load_packed, save_packed
    from slimsearch.evaluators.pack import packed_size
    from slimsearch.evaluators.prune import ChannelStructure
    from slimsearch.search.job_runner import layer_names
    from slimsearch.spaces import CompressionPlan, DistillPlan, LayerPlan
    from slimsearch.tasks import load_task

    torch.set_num_threads(1)
    task = load_task("mnist-resnet")
    teacher = task.teacher
    x64 = task.test.x[:64]
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    rows = []

    def row(name, model, *, size=None, latency=None, note=""):
        rows.append({
            "model": name,
            "params": params(model),
            "params_vs_teacher": params(model) / params(teacher),
            "bytes": size if size is not None else packed_size(model),
            "test_accuracy": score(model, task.test, task),
            "latency_b64_ms_measured": latency if latency is not None else _latency_ms(model, x64),
            "note": note,
        })

    row("teacher (float)", teacher, note="onnxruntime, 1 thread")
    groups = ChannelStructure().groups(teacher, task.example_input)
    pruned_plan = CompressionPlan(layers={g: LayerPlan(prune_ratio=0.5) for g in groups},
                                  distill=DistillPlan(steps=args.steps))
    row(f"generic 50% channels + KD {args.steps}", apply_plan(task, pruned_plan), note="onnxruntime, 1 thread")

    four_bit = CompressionPlan(layers={n: LayerPlan(weight_bits=4, group_size=32) for n in layer_names(teacher)},
                               distill=DistillPlan(steps=args.steps))
    model4 = apply_plan(task, four_bit)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.slim"
        save_packed(model4, path)
        reloaded = load_packed(path, teacher)
        exact = all(torch.equal(a, b) for a, b in zip(model4.state_dict().values(), reloaded.state_dict().values()))
    float_bytes = sum(p.numel() * 4 for p in teacher.parameters())
    row("4-bit per-group (32) weights + KD", model4,
        note=f"packed {packed_size(model4)} B = {packed_size(model4) / float_bytes:.3f}x float32 params; "
             f"reload bit-exact: {exact}")

    import torch.nn.utils.prune as tprune

    masked = copy.deepcopy(teacher)
    for module in masked.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            tprune.l1_unstructured(module, "weight", amount=0.5)
            tprune.remove(module, "weight")
    row("torch.nn.utils.prune L1-unstructured 50%", masked,
        note="zeros stored densely: same params and bytes as the teacher")

    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(teacher), {torch.nn.Linear}, dtype=torch.qint8)
    row("torch quantize_dynamic int8 (Linear only)", dynamic, size=sum(
        t.numel() * t.element_size() for t in dynamic.state_dict().values() if isinstance(t, torch.Tensor)),
        latency=_torch_latency_ms(dynamic, x64), note="torch eager (does not export to ONNX), 1 thread")

    teacher_row = rows[0]
    header = f"{'model':44} {'params':>9} {'x teacher':>9} {'bytes':>10} {'test acc':>8} {'b64 ms':>8} {'x teacher':>9}  note"
    print(header)
    for r in rows:
        print(f"{r['model']:44} {r['params']:9d} {r['params_vs_teacher']:9.3f} {r['bytes']:10d} "
              f"{r['test_accuracy']:8.4f} {r['latency_b64_ms_measured']:8.3f} "
              f"{r['latency_b64_ms_measured'] / teacher_row['latency_b64_ms_measured']:9.3f}  {r['note']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
