"""What an ONNX Runtime GenAI decoder folder computes, and how fast, measured.

:func:`time_generation` times prefill and decode with the KV cache, as a server would
run the model, in a fresh Python process so that its peak resident memory belongs to
that model alone. :func:`onnx_logits` and :func:`onnx_perplexity` run the graph once
without a past, to check an exported model against the PyTorch one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Union

from slimsearch.exceptions import ConfigError

if TYPE_CHECKING:
    import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

# Run by ``python -c`` with one JSON argument; prints one JSON line. Kept as plain code so
# the child imports nothing of slimsearch (its memory is the runtime's and the model's).
_TIMING_SCRIPT = r"""
import json, resource, statistics, sys, time
import numpy as np
args = json.loads(sys.argv[1])

def peak_mb():
    try:  # this process's own high-water mark; ru_maxrss also counts the parent's image before exec
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

import onnxruntime_genai as og
rss_import = peak_mb()

def load(folder):
    config = og.Config(folder)
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args["threads"], "inter_op_num_threads": 1}}}}))
    t0 = time.perf_counter()
    model = og.Model(config)
    vocab = json.load(open(folder + "/genai_config.json"))["model"]["vocab_size"]
    return model, time.perf_counter() - t0, vocab

def run(model, prompt, new):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=args["prompt"] + new, min_length=args["prompt"] + new, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    t1 = time.perf_counter()
    n = 0
    while n < new and not gen.is_done():
        gen.generate_next_token()
        n += 1
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / max(n, 1), n

# the model timed, then (optional) the reference it is paired with: rounds alternate between them,
# first one then the other, so that a slow moment of the machine falls on both
models = [load(folder) for folder in args["dirs"]]
prompt = np.random.default_rng(args["seed"]).integers(0, min(v for _, _, v in models), args["prompt"]).astype(np.int32)
for model, _, _ in models:
    run(model, prompt, min(4, args["new"]))  # warm-up: first-run allocations and kernel packing
runs = [[] for _ in models]
for r in range(args["repeats"]):
    order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
    for i in order:
        runs[i].append(run(models[i][0], prompt, args["new"]))
out = []
for (model, load_s, _), mine in zip(models, runs):
    decode = statistics.median(r[1] for r in mine)
    out.append({"prefill_ms": statistics.median(r[0] for r in mine), "decode_ms_per_token": decode,
                "decode_tok_s": 1e3 / decode, "load_s": load_s, "tokens_decoded": min(r[2] for r in mine),
                "prefill_runs_ms": [r[0] for r in mine], "decode_runs_ms_per_token": [r[1] for r in mine]})
print(json.dumps({**out[0], "peak_rss_mb": peak_mb(), "rss_after_import_mb": rss_import,
                  "reference": out[1] if len(out) > 1 else None}))
"""


def time_generation(onnx_dir: PathLike, *, prompt_tokens: int = 128, new_tokens: int = 64, threads: int = 1,
                    repeats: int = 3, seed: int = 0, timeout_s: float = 900.0,
                    reference: PathLike | None = None) -> dict:
    """Prefill and decode speed of a GenAI folder, measured at batch 1 in a fresh process.

    A fixed random prompt of ``prompt_tokens`` (seed ``seed``) is appended (prefill),
    then ``new_tokens`` are generated greedily one by one (decode, with the KV cache).
    After one warm-up run, the medians over ``repeats`` runs are returned:
    ``prefill_ms``, ``decode_ms_per_token``, ``decode_tok_s``, and each run's figures
    (``prefill_runs_ms``, ``decode_runs_ms_per_token``); ``peak_rss_mb`` is the child
    process's peak resident memory (``ru_maxrss``: runtime, model and cache).
    With ``reference`` (another GenAI folder), the child loads both and runs them in
    alternating rounds (one, then the other, the order swapped each round); the reference's
    figures are under ``"reference"`` (round ``i`` of each ran side by side), and
    ``peak_rss_mb`` then counts both models. Every figure is tagged ``"source": "measured"``.
    """
    for name, value, low in (("prompt_tokens", prompt_tokens, 1), ("new_tokens", new_tokens, 1),
                             ("threads", threads, 1), ("repeats", repeats, 1)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"time_generation: {name} must be an int >= {low}, got {value!r}")
    folder = Path(onnx_dir)
    folders = [folder] + ([Path(reference)] if reference is not None else [])
    for f in folders:
        if not (f / "genai_config.json").is_file():
            raise ConfigError(f"time_generation: {f} has no genai_config.json; build it with build_onnx")
    args = {"dirs": [str(f.resolve()) for f in folders], "prompt": prompt_tokens, "new": new_tokens,
            "threads": threads, "repeats": repeats, "seed": seed}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", _TIMING_SCRIPT, json.dumps(args)], capture_output=True, text=True,
                          timeout=timeout_s, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"timing {folder} failed (exit {done.returncode}): {tail[0]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(source="measured", threads=threads, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                  repeats=repeats, file_bytes=folder_bytes(folder))
    return result


def folder_bytes(onnx_dir: PathLike) -> int:
    """Bytes of the graph and its external weights (``*.onnx``, ``*.onnx.data``) in the folder."""
    return sum(p.stat().st_size for p in Path(onnx_dir).iterdir()
               if p.is_file() and (p.name.endswith(".onnx") or p.name.endswith(".onnx.data")))


def _session(onnx_dir: PathLike, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(Path(onnx_dir) / "model.onnx"), options, providers=["CPUExecutionProvider"])


def _feeds(onnx_dir: PathLike, session, input_ids: "np.ndarray") -> dict:
    """Inputs of one forward pass from scratch: the tokens, an all-ones mask and empty past tensors."""
    import numpy as np

    decoder = json.loads((Path(onnx_dir) / "genai_config.json").read_text())["model"]["decoder"]

    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for arg in session.get_inputs():
        if arg.name.startswith("past_key_values"):
            dtype = np.float16 if arg.type == "tensor(float16)" else np.float32
            feeds[arg.name] = np.zeros((ids.shape[0], decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype)
    return feeds


def onnx_logits(onnx_dir: PathLike, input_ids: "np.ndarray", *, threads: int = 1, session=None) -> "np.ndarray":
    """Logits ``(batch, tokens, vocab)`` of one forward pass over ``input_ids`` with an empty KV cache."""
    session = session or _session(onnx_dir, threads)
    return session.run(["logits"], _feeds(onnx_dir, session, input_ids))[0]


def onnx_perplexity(onnx_dir: PathLike, windows: Iterable["np.ndarray"], *, threads: int = 1) -> float:
    """Perplexity of the graph over token ``windows`` (each scored on its own, next-token loss)."""
    import numpy as np

    session = _session(onnx_dir, threads)
    nll, count = 0.0, 0
    for window in windows:
        ids = np.asarray(window, dtype=np.int64).reshape(1, -1)
        logits = onnx_logits(onnx_dir, ids, session=session)[0, :-1].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        nll += float((log_z - logits[np.arange(len(logits)), ids[0, 1:]]).sum())
        count += len(logits)
    if not count:
        raise ConfigError("onnx_perplexity: windows must hold at least one window of two or more tokens")
    return float(np.exp(nll / count))
