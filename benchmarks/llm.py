"""SmolLM2-135M-Instruct compressed after training: perplexity, bytes and measured generation speed.

One run, one table, every row beside the float32 teacher. The teacher is the
de-quantized SmolLM2-135M-Instruct: its shipped weights are GGUF Q4_1 (4-bit, blocks of
32, asymmetric with a minimum), so a 4-bit, block-32, asymmetric quantization would
recover that grid and look lossless; the quantization rows use settings where the loss is
real (symmetric, group 128, 3 bits, activations, structured cuts).

Text: the Wikipedia sample in gensim's wheel, split by document; perplexity on
``--test-tokens`` test tokens in windows of ``--seq-len``; calibration (GPTQ, AWQ,
SmoothQuant, importance of the cuts, healing) on the calibration split. KL divergence to
the teacher and top-1 agreement on the first ``--kl-windows`` test windows.

Measured on this CPU (batch 1, ``--threads`` threads, labelled measured): 128-token
prefill milliseconds, decode milliseconds per token and tokens per second with a KV cache,
peak resident memory, in onnxruntime (GenAI's generator) for the deployed graphs and in
PyTorch for ``torch-dynamic-int8``. Modelled (labelled modelled) on ``--profiles``: decode
tokens per second, energy per token, dollars per million tokens.

    python benchmarks/llm.py [--json llm.json] [--rows teacher,gptq-w4g128] [--heal-steps 200]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

ROWS = ("teacher", "rtn-w4g128", "gptq-w4g128", "awq-w4g128", "rtn-w3g128", "gptq-w3g128", "awq-w3g128",
        "int4-ort", "w8a8-smoothquant", "kv8", "wanda-2:4", "cut", "cut-healed", "torch-dynamic-int8",
        "ort-genai-int4")
MODELLED_PROFILES = ("raspberry-pi-5", "nvidia-t4", "nvidia-h100")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Bench:
    """The shared state of one run: teacher, text, where graphs are written, the rows so far."""

    def __init__(self, args) -> None:
        import torch

        from slimsearch.tasks.causal_lm import load_causal_lm, smollm2_folder, text_windows

        self.args = args
        torch.set_num_threads(args.eval_threads)
        self.folder = smollm2_folder()
        self.teacher, self.tokenizer = load_causal_lm(self.folder)
        self.test = text_windows(self.tokenizer, "wikipedia", "test", seq_len=args.seq_len,
                                 max_tokens=args.test_tokens)
        every = text_windows(self.tokenizer, "wikipedia", "calibration", seq_len=args.seq_len)
        # spread over the whole split: the first N consecutive windows (two or three articles)
        # over-fit GPTQ (measured on SmolLM2-135M)
        pick = torch.linspace(0, len(every) - 1, min(args.calib_windows, len(every))).round().long()
        self.calib = every[pick]
        # healing trains: by default on the calibration windows (cycled), else on its own share of the split
        heal = args.heal_windows or args.calib_windows
        self.heal = every[torch.linspace(0, len(every) - 1, min(heal, len(every))).round().long()]
        self.work = Path(tempfile.mkdtemp(prefix="slimsearch-llm-", dir=args.work))
        self.rows: list[dict] = []
        self.teacher_ppl = None
        self.teacher_decode = None
        self.models: dict[str, tuple] = {}  # name -> (model, quantized) kept for later rows

    # --- scoring -----------------------------------------------------------------------
    def score(self, model) -> dict:
        from slimsearch.tasks.causal_lm import score_lm

        full = score_lm(model, self.test)
        near = score_lm(model, self.test[: self.args.kl_windows], teacher=self.teacher)
        return {"ppl_test": full.perplexity, "kl": near.kl, "top1": near.top1, "test_tokens": full.tokens}

    def modelled(self, model, **footprint_args) -> dict:
        from slimsearch.evaluators.llm_costs import decoder_footprint
        from slimsearch.hardware_profiles import load_profile, predict_decoder

        footprint = decoder_footprint(model, **footprint_args)
        out = {}
        for name in self.args.profiles.split(","):
            p = predict_decoder(load_profile(name), footprint, prompt_tokens=128, context_tokens=128)
            out[name] = {"decode_tok_s": p.decode_tok_s, "energy_mj_per_token": p.energy_mj_per_token,
                         "usd_per_1m_tokens": p.usd_per_1m_tokens, "provenance": "modelled"}
        return out

    def measure_onnx(self, graph: Path) -> dict:
        """The graph's row is timed at the end of the run, all graphs one after the other on a
        machine doing nothing else (see :func:`time_all`); this notes which graph it is."""
        return {"graph": str(graph)}

    def graph(self, model, name: str, quantized=None, *, lm_head=None) -> Path:
        """The deployed ONNX graph (KV cache) of ``model``: float32 MatMuls, or MatMulNBits for
        the ``quantized`` linears (their codes and scales as they are) and ``lm_head``."""
        from slimsearch.deploy.onnx_nbits import build_onnx, to_matmul_nbits

        hf = self.work / f"{name}-hf"
        model.save_pretrained(hf)
        self.tokenizer.save_pretrained(hf)
        out = build_onnx(hf, self.work / f"{name}-onnx", threads=self.args.threads)
        shutil.rmtree(hf)
        if quantized:
            to_matmul_nbits(out, quantized, accuracy_level=4, lm_head=lm_head)
        return out

    def onnx_ppl(self, graph: Path) -> float:
        from slimsearch.deploy.llm_timing import onnx_perplexity

        return onnx_perplexity(graph, self.test.numpy(), threads=self.args.eval_threads)

    def add(self, name: str, model, *, quantized=None, note: str = "", measured=None, scores=None,
            footprint_args=None, bytes_=None) -> dict:
        from slimsearch.evaluators.llm_costs import weight_bytes
        from slimsearch.tasks.causal_lm import ppl_increase

        scores = scores or self.score(model)
        footprint_args = dict(footprint_args or {}, quantized=quantized)
        row = {"name": name, **scores,
               "ppl_increase": None if self.teacher_ppl is None else ppl_increase(scores["ppl_test"], self.teacher_ppl),
               "bytes": bytes_ if bytes_ is not None else weight_bytes(
                   model, quantized=quantized, lm_head_bits=footprint_args.get("lm_head_bits", 32)),
               "decode_tok_s": None, "decode_ms_per_token": None, "prefill_ms": None, "peak_rss_mb": None,
               "runtime": None, "provenance": "measured", "note": note,
               "modelled": self.modelled(model, **footprint_args)}
        if measured:
            row.update(measured)
        self.rows.append(row)
        _log(f"{name}: ppl {row['ppl_test']:.3f} ({_pct(row['ppl_increase'])}), {row['bytes'] / 1e6:.1f} MB")
        return row


def time_all(b: Bench) -> None:
    """Time every graph, one after the other, after all quality work is done: the teacher first
    and again last (its two timings are kept; speed-ups are against their mean)."""
    from slimsearch.deploy.llm_timing import time_generation

    timed: dict[str, dict] = {}

    def measure(graph: str) -> dict:
        t = time_generation(graph, prompt_tokens=128, new_tokens=b.args.new_tokens, threads=b.args.threads,
                            repeats=b.args.repeats)
        return {"decode_tok_s": t["decode_tok_s"], "decode_ms_per_token": t["decode_ms_per_token"],
                "prefill_ms": t["prefill_ms"], "peak_rss_mb": t["peak_rss_mb"], "runtime": "onnxruntime-genai"}

    teacher = next(r for r in b.rows if r["name"] == "teacher")
    first = measure(teacher["graph"])
    for row in b.rows:
        graph = row.get("graph")
        if graph and row is not teacher:
            if graph not in timed:
                _log(f"timing {row['name']}")
                timed[graph] = measure(graph)
            row.update(timed[graph])
    last = measure(teacher["graph"])
    teacher.update({k: (first[k] + last[k]) / 2 for k in ("decode_tok_s", "decode_ms_per_token", "prefill_ms",
                                                          "peak_rss_mb")}, runtime="onnxruntime-genai",
                   teacher_timings=[first, last])
    for row in b.rows:
        if row.get("runtime") == "onnxruntime-genai":
            row["decode_speedup"] = row["decode_tok_s"] / teacher["decode_tok_s"]
            row["prefill_speedup"] = teacher["prefill_ms"] / row["prefill_ms"]
    if b.args.paired_rounds:
        time_paired(b, teacher, measure)


def time_paired(b: Bench, teacher: dict, measure) -> None:
    """Each graph again, in ``--paired-rounds`` rounds that time the teacher and then it, back to back:
    the median of the per-round decode ratios does not drift with the machine's load, which the
    one-after-the-other timing above does (its teacher timings, first and last, show by how much)."""
    import statistics

    for row in b.rows:
        graph = row.get("graph")
        if not graph or row is teacher or row.get("runtime") != "onnxruntime-genai":
            continue
        _log(f"paired timing {row['name']}")
        rounds = []
        for _ in range(b.args.paired_rounds):
            ref, cand = measure(teacher["graph"]), measure(graph)
            rounds.append({"decode": cand["decode_tok_s"] / ref["decode_tok_s"],
                           "prefill": ref["prefill_ms"] / cand["prefill_ms"]})
        row["paired_rounds"] = rounds
        row["decode_speedup_paired"] = statistics.median(r["decode"] for r in rounds)
        row["prefill_speedup_paired"] = statistics.median(r["prefill"] for r in rounds)


def _pct(x) -> str:
    return "" if x is None else f"{x:+.1%}"


def run_teacher(b: Bench) -> None:
    graph = b.graph(b.teacher, "teacher")
    measured = b.measure_onnx(graph)
    row = b.add("teacher", b.teacher, measured=measured, note="float32, de-quantized from the shipped Q4_1 GGUF")
    b.teacher_ppl = row["ppl_test"]
    row["ppl_increase"] = 0.0


def run_weight_only(b: Bench, name: str) -> None:
    from slimsearch.compress.weight_only import WeightOnlyConfig, quantize_weights

    method, setting = name.split("-")
    bits, group = int(setting[1]), int(setting.split("g")[1])
    model = copy.deepcopy(b.teacher)
    start = time.perf_counter()
    quantized = quantize_weights(model, WeightOnlyConfig(method=method, bits=bits, group_size=group, symmetric=True),
                                 b.calib)
    took = time.perf_counter() - start
    graph = b.graph(model, name, quantized)
    measured = b.measure_onnx(graph)
    note = f"{method} {bits}-bit group {group} symmetric, {took:.0f} s to quantize"
    if bits == 3:
        note += "; 3-bit codes run in onnxruntime's 4-bit MatMulNBits kernel (bytes counted at 3 bits)"
    b.add(name, model, quantized=quantized, measured=measured, note=note)
    b.models[name] = (model, quantized)


def run_int4_ort(b: Bench) -> None:
    """The deployed 4-bit graph: ``--int4-method`` w4g128 linears as MatMulNBits (int8 compute), the
    output projection at ``--lm-head-bits`` in blocks of ``--lm-head-group`` (8 and 64 by default, read
    by the tied embedding too); its perplexity is the graph's own, in onnxruntime. The Hugging Face
    folder (compressed-tensors) is reloaded and re-measured against the gptq-w4g128 row."""
    from slimsearch.deploy.hf_folder import reload, save_hf_folder
    from slimsearch.compress.output_head import quantize_output_projection
    from slimsearch.tasks.causal_lm import score_lm

    base = f"{b.args.int4_method}-w4g128"
    if base not in b.models:
        run_weight_only(b, base)
    model, quantized = b.models[base]
    deployed = copy.deepcopy(model)  # the output projection (tied: the embedding too) is rounded in place
    head = quantize_output_projection(deployed, bits=b.args.lm_head_bits, group_size=b.args.lm_head_group)
    graph = b.graph(deployed, "int4-ort", quantized, lm_head=head)
    ppl = b.onnx_ppl(graph)
    measured = b.measure_onnx(graph)
    recorded = next(r for r in b.rows if r["name"] == base)["ppl_test"]
    folder = b.work / "int4-hf"
    save_hf_folder(model, b.tokenizer, folder, quantized=quantized)
    reloaded = score_lm(reload(folder), b.test).perplexity
    off = abs(reloaded / recorded - 1)
    hf_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")
    shutil.rmtree(folder)
    row = b.add("int4-ort", model, quantized=quantized, measured=measured,
                scores={"ppl_test": ppl, "kl": None, "top1": None, "test_tokens": int(b.test.numel())},
                footprint_args={"lm_head_bits": b.args.lm_head_bits, "lm_head_group": b.args.lm_head_group},
                note=f"{base} deployed: MatMulNBits accuracy_level 4 (int8 compute), output projection "
                     f"{b.args.lm_head_bits}-bit RTN in blocks of {b.args.lm_head_group}; perplexity measured in "
                     "onnxruntime")
    row["hf_folder_ppl"] = reloaded
    row["hf_folder_off"] = off
    row["hf_folder_bytes"] = hf_bytes
    if off > 0.01:
        raise SystemExit(f"int4-ort: the exported Hugging Face folder reloads at perplexity {reloaded:.3f}, "
                         f"{off:.2%} off the recorded {recorded:.3f} (more than 1%): refused")


def run_smoothquant(b: Bench) -> None:
    from slimsearch.compress.smoothquant import SmoothQuantConfig, smoothquant

    model = copy.deepcopy(b.teacher)
    w8a8 = smoothquant(model, SmoothQuantConfig(alpha=b.args.alpha), b.calib)
    scores = b.score(model)
    w8a8.hooks.remove()
    measured = None
    try:
        from slimsearch.deploy.onnx_w8a8 import to_w8a8

        graph = b.graph(model, "w8a8-float")  # the smoothed float graph, then integer kernels
        report = to_w8a8(graph, b.work / "w8a8", weights=w8a8.weights)  # per token, SmoothQuant's own codes
        shutil.rmtree(graph)
        measured = b.measure_onnx(report.path)
        measured["onnx_ppl"] = b.onnx_ppl(report.path)
    except Exception as exc:  # report the row without a measured speed, and say why
        _log(f"w8a8-smoothquant: no measured speed ({type(exc).__name__}: {exc})")
    b.add("w8a8-smoothquant", model, quantized=w8a8.weights, scores=scores, measured=measured,
          footprint_args={"act_bits": 8},
          note=f"SmoothQuant alpha {b.args.alpha}, int8 weights per channel, int8 activations per token (dynamic)")


def run_kv8(b: Bench) -> None:
    from slimsearch.compress.kv_cache import KVCacheConfig, kv_cache_bytes, quantize_kv_cache

    model = copy.deepcopy(b.teacher)
    handle = quantize_kv_cache(model, KVCacheConfig(bits=8))
    scores = b.score(model)
    handle.remove()
    row = b.add("kv8", model, scores=scores, footprint_args={"kv_bits": 8},
                note="keys and values stored at 8 bits (per token and head); speed not measured: onnxruntime's "
                     "GroupQueryAttention keeps a float cache on this CPU")
    row["kv_bytes_128"] = kv_cache_bytes(model, 128, 8)
    row["kv_bytes_128_fp16"] = kv_cache_bytes(model, 128, 16)


def run_wanda(b: Bench) -> None:
    from slimsearch.compress.wanda import WandaConfig, sparsify

    model = copy.deepcopy(b.teacher)
    sparsify(model, WandaConfig(), b.calib)
    b.add("wanda-2:4", model, footprint_args={"sparsity": "2:4"},
          note="Wanda 2:4, no update of the kept weights; faster only where 2:4 is accelerated (modelled)")


def run_cut(b: Bench, heal_steps: int) -> None:
    from slimsearch.compress.heal import heal
    from slimsearch.structures.llm_cuts import cut, importance, layers_to_drop

    if "cut" not in b.models:
        scores = importance(b.teacher, b.calib)
        dropped = layers_to_drop(scores, b.args.drop_layers)
        model = cut(b.teacher, scores, ffn_keep=1 - b.args.ffn_cut, drop_layers=dropped)
        graph = b.graph(model, "cut")
        measured = b.measure_onnx(graph)
        b.add("cut", model, measured=measured,
              note=f"{b.args.ffn_cut:.0%} of FFN channels and layers {dropped} cut, ranked on calibration activations")
        b.models["cut"] = (model, measured)
    if heal_steps:
        model, measured = b.models["cut"]
        model = copy.deepcopy(model)
        start = time.perf_counter()
        heal(model, b.teacher, b.heal, steps=heal_steps, lr=b.args.heal_lr, seq_len=b.args.heal_seq_len,
             progress=lambda step, loss: step % 20 == 0 and _log(f"heal step {step}: loss {loss:.4f}"))
        took = time.perf_counter() - start
        b.add("cut-healed", model, measured=measured,
              note=f"cut, then {heal_steps} healing steps (KL to the teacher, chunked; seq {b.args.heal_seq_len}, "
                   f"lr {b.args.heal_lr}, {len(b.heal)} calibration-split windows of {b.args.seq_len}) in "
                   f"{took:.0f} s; same shapes as cut, so its speed is cut's")


def run_torch_dynamic(b: Bench) -> None:
    import torch

    from slimsearch.compress.smoothquant import quantize_weights_int8

    model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(b.teacher), {torch.nn.Linear}, dtype=torch.qint8)
    scores = b.score(model)
    measured = _torch_generation(model, b.args)
    teacher_torch = _torch_generation(b.teacher, b.args)
    costed = copy.deepcopy(b.teacher)  # the same int8-per-channel linears, as plain modules for the costing
    row = b.add("torch-dynamic-int8", costed, quantized=quantize_weights_int8(costed), scores=scores,
                measured=measured, bytes_=_torch_state_bytes(model),
                footprint_args={"act_bits": 8, "lm_head_bits": 8},
                note="torch.ao.quantization.quantize_dynamic (int8 weights per channel, dynamic int8 activations, "
                     "every nn.Linear incl. the output projection); timed in PyTorch, not onnxruntime")
    row["teacher_torch_decode_tok_s"] = teacher_torch["decode_tok_s"]
    row["decode_speedup_vs_torch_teacher"] = measured["decode_tok_s"] / teacher_torch["decode_tok_s"]


def run_genai_int4(b: Bench) -> None:
    """onnxruntime-genai's own 4-bit path: its model builder's RTN int4 (MatMulNBits)."""
    graph = _builder_int4(b.folder, b.work / "genai-int4", b.args.threads)
    ppl = b.onnx_ppl(graph)
    measured = b.measure_onnx(graph)
    size = sum(f.stat().st_size for f in graph.iterdir() if f.name.startswith("model.onnx"))
    b.add("ort-genai-int4", b.teacher, measured=measured, bytes_=size,
          scores={"ppl_test": ppl, "kl": None, "top1": None, "test_tokens": int(b.test.numel())},
          footprint_args={"lm_head_bits": 4},
          note="onnxruntime_genai.models.builder -p int4 (its RTN, block 32, accuracy level 4); near-lossless here "
               "because the shipped weights are Q4_1 on the same 32-blocks; modelled figures are the teacher's")


def _builder_int4(hf_folder: Path, out: Path, threads: int) -> Path:
    """onnxruntime-genai's model builder run as its users run it: ``-p int4 -e cpu``, int8 compute."""
    import subprocess
    import sys

    from slimsearch.deploy.onnx_nbits import set_threads

    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
                    "-p", "int4", "-e", "cpu", "-c", str(out.parent / "builder-cache"),
                    "--extra_options", "int4_accuracy_level=4"], check=True, capture_output=True)
    set_threads(out, threads)
    return out


def _torch_state_bytes(model) -> int:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _torch_generation(model, args) -> dict:
    """Prefill of a 128-token prompt and greedy decode with the KV cache, in PyTorch (measured)."""
    import statistics

    import torch

    torch.set_num_threads(args.threads)
    prompt = torch.randint(100, 40000, (1, 128), generator=torch.Generator().manual_seed(0))
    prefills, decodes = [], []
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True)
            prefill = time.perf_counter() - start
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(args.new_tokens):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            decodes.append((time.perf_counter() - start) / args.new_tokens)
            prefills.append(prefill)
    torch.set_num_threads(args.eval_threads)
    decode = statistics.median(decodes[1:])
    return {"prefill_ms": statistics.median(prefills[1:]) * 1e3, "decode_ms_per_token": decode * 1e3,
            "decode_tok_s": 1 / decode, "peak_rss_mb": None, "runtime": "pytorch"}


def _table(rows: list[dict]) -> str:
    head = (f"{'row':<20} {'ppl test':>9} {'vs teacher':>10} {'KL':>7} {'top-1':>6} {'MB':>7} {'decode tok/s':>12} "
            f"{'speedup':>7} {'paired':>6} {'prefill ms':>10} {'peak MB':>8}  runtime")
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(key, fmt):
            return "" if r.get(key) is None else format(r[key], fmt)
        lines.append(f"{r['name']:<20} {f('ppl_test', '.3f'):>9} {_pct(r['ppl_increase']):>10} {f('kl', '.4f'):>7} "
                     f"{f('top1', '.3f'):>6} {r['bytes'] / 1e6:>7.1f} {f('decode_tok_s', '.1f'):>12} "
                     f"{f('decode_speedup', '.2f'):>7} {f('decode_speedup_paired', '.2f'):>6} {f('prefill_ms', '.0f'):>10} {f('peak_rss_mb', '.0f'):>8}  "
                     f"{r.get('runtime') or ''}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows to run, comma-separated, of {list(ROWS)}")
    parser.add_argument("--test-tokens", type=int, default=16384, help="test tokens for perplexity")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--kl-windows", type=int, default=8, help="test windows for KL and top-1 agreement")
    parser.add_argument("--calib-windows", type=int, default=32, help="calibration windows")
    parser.add_argument("--threads", type=int, default=1, help="threads for every speed measurement")
    parser.add_argument("--eval-threads", type=int, default=os.cpu_count() or 1, help="threads for the rest")
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per graph (median)")
    parser.add_argument("--paired-rounds", type=int, default=0,
                        help="also time each graph in this many rounds back to back with the teacher (median "
                             "of per-round ratios; 0: not)")
    parser.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant's alpha")
    parser.add_argument("--ffn-cut", type=float, default=0.25, help="share of FFN channels cut")
    parser.add_argument("--drop-layers", type=int, default=2, help="layers cut")
    parser.add_argument("--heal-steps", type=int, default=200, help="healing steps after the cut")
    parser.add_argument("--heal-lr", type=float, default=3e-4, help="healing learning rate")
    parser.add_argument("--heal-windows", type=int, default=0,
                        help="calibration-split windows healing trains on, spread evenly (default: the calibration "
                             "windows, cycled)")
    parser.add_argument("--heal-seq-len", type=int, default=256, help="tokens per healing step")
    parser.add_argument("--int4-method", default="gptq", choices=("rtn", "gptq", "awq"),
                        help="int4-ort: whose 4-bit group-128 codes the deployed graph holds")
    parser.add_argument("--lm-head-bits", type=int, default=8, help="int4-ort: the output projection's bits")
    parser.add_argument("--lm-head-group", type=int, default=64, help="int4-ort: the output projection's block")
    parser.add_argument("--profiles", default=",".join(MODELLED_PROFILES), help="profiles to model on")
    parser.add_argument("--work", default=None, help="folder for the temporary graphs (default: the system's)")
    parser.add_argument("--json", help="also write {'rows': [...]} to this file")
    args = parser.parse_args()
    wanted = args.rows.split(",")
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown row(s) {unknown}; allowed: {list(ROWS)}")

    started = time.perf_counter()
    b = Bench(args)
    _log(f"{len(b.test)} test windows, {len(b.calib)} calibration windows of {args.seq_len} tokens")

    def save() -> None:  # after every row, so that a run cut short keeps what it measured
        if args.json:
            import torch

            with open(args.json, "w") as f:
                json.dump({"rows": b.rows, "args": vars(args), "torch": torch.__version__,
                           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                           "seconds": time.perf_counter() - started}, f, indent=2, default=str)

    run_teacher(b)
    # healing last: its graph is the cut's, timed with the others before it starts
    for name in [n for n in wanted if n not in ("teacher", "cut-healed")]:
        if name.split("-")[0] in ("rtn", "gptq", "awq"):
            run_weight_only(b, name)
        elif name == "int4-ort":
            run_int4_ort(b)
        elif name == "w8a8-smoothquant":
            run_smoothquant(b)
        elif name == "kv8":
            run_kv8(b)
        elif name == "wanda-2:4":
            run_wanda(b)
        elif name == "cut":
            run_cut(b, 0)
        elif name == "torch-dynamic-int8":
            run_torch_dynamic(b)
        elif name == "ort-genai-int4":
            run_genai_int4(b)
        save()
    _log("timing every graph")
    time_all(b)
    save()
    shutil.rmtree(b.work, ignore_errors=True)
    if "cut-healed" in wanted:
        run_cut(b, args.heal_steps)
        cut_row = next(r for r in b.rows if r["name"] == "cut")
        b.rows[-1].update({k: cut_row.get(k) for k in ("decode_tok_s", "decode_ms_per_token", "prefill_ms",
                                                       "peak_rss_mb", "runtime", "decode_speedup",
                                                       "prefill_speedup", "decode_speedup_paired",
                                                       "prefill_speedup_paired", "paired_rounds")})
        save()
    print(_table(b.rows))
    print("decode, prefill and peak memory: measured on this CPU at batch 1 with "
          f"{args.threads} thread(s); 'modelled' in the JSON: predicted per profile")


if __name__ == "__main__":
    main()
