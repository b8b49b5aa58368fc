"""The SmolLM2 example job end to end, its front against the uniform recipes it evaluated beside it.

    python benchmarks/llm_search.py [--job examples/smollm2.yaml] [--budget N] [--cold] [--json out.json]

Runs ``slimsearch run JOB --out <tmp>/job --no-progress`` in a subprocess (``--cold``: the converted
SmolLM2 folder and the task caches are moved aside first and put back after, so the run starts as a
fresh machine's would) and reads its ``front.json``: the front members and the baselines (the uniform
recipes the job evaluates after its search, ``search.baselines``). For each baseline it looks for a
front member that matches or beats it on all three of test perplexity (no more), packed weight bytes
(no more) and measured decode tokens per second (at least ``1 - NOISE`` of the baseline's: the
timing noise allowed), and says whether one beats it outright (better by more than the noise on at
least one: lower perplexity, fewer bytes, or faster by more than ``NOISE``). Prints one table and
writes ``--json``: ``{"baselines": [...], "front": [...], "job_wall_s", "full_fidelity_share",
"hv_ratio_vs_best_optuna", ...}``: ``full_fidelity_share`` is the share of the job's evaluated
candidates its multi-fidelity screen promoted to the full text; ``hv_ratio_vs_best_optuna`` is null
(the sampler comparison is not built yet).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOISE = 0.03  # share of decode speed within which two timings are not told apart


def row(name: str, metrics: dict) -> dict:
    return {"name": name, "ppl_test": metrics.get("ppl_test"), "ppl": metrics.get("ppl"),
            "decode_tok_s": metrics.get("decode_tok_s@local"), "bytes": metrics.get("size_bytes"),
            "memory_bytes": metrics.get("memory_bytes")}


def matches(member: dict, base: dict) -> bool:
    """``member`` is no worse than ``base`` on perplexity and bytes, and at least (1 - NOISE) as fast."""
    return (member["ppl_test"] <= base["ppl_test"] and member["bytes"] <= base["bytes"]
            and member["decode_tok_s"] >= (1 - NOISE) * base["decode_tok_s"])


def beats(member: dict, base: dict) -> bool:
    """``member`` matches ``base`` and is better by more than the noise on at least one of the three."""
    return matches(member, base) and (member["ppl_test"] < base["ppl_test"] or member["bytes"] < base["bytes"]
                                      or member["decode_tok_s"] > (1 + NOISE) * base["decode_tok_s"])


def compare(front: list[dict], baselines: list[dict]) -> list[dict]:
    """Per baseline: the front member that beats it (fewest bytes among those), else one that matches it."""
    out = []
    for base in baselines:
        complete = [m for m in front if None not in (m["ppl_test"], m["bytes"], m["decode_tok_s"])]
        beating = sorted((m for m in complete if beats(m, base)), key=lambda m: m["bytes"])
        matching = sorted((m for m in complete if matches(m, base)), key=lambda m: m["bytes"])
        best = (beating or matching or [None])[0]
        out.append({**base, "matched_by": best["name"] if best else None, "beaten": bool(beating)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=str(ROOT / "examples" / "smollm2.yaml"))
    parser.add_argument("--budget", type=int, help="the job's search.budget (default: the job file's)")
    parser.add_argument("--cold", action="store_true", help="start without the SmolLM2 and task caches")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="llm-search-"))
    out = tmp / "job"
    cmd = [sys.executable, "-m", "slimsearch.cli", "run", args.job, "--out", str(out), "--no-progress"]
    if args.budget:
        cmd += ["--budget", str(args.budget)]
    cache = Path(os.environ.get("SLIMSEARCH_CACHE", Path.home() / ".cache" / "slimsearch"))
    aside = tmp / "cache-aside"
    if args.cold and cache.exists():
        shutil.move(str(cache), aside)
    print("[bench] " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, cwd=ROOT)
    finally:
        wall = time.perf_counter() - started
        if args.cold and aside.exists():
            shutil.rmtree(cache, ignore_errors=True)
            shutil.move(str(aside), cache)
    data = json.loads((out / "front.json").read_text())
    front = [row(f"trial {c['trial']}: {c['describe']}", c["metrics"]) for c in data["front"]]
    cheap = [s for s in data.get("screened", []) if s["metrics"].get("fidelity", 1.0) < 1.0]  # not promoted
    baselines = compare(front, [{**row(b["name"], b["metrics"]), "seconds": b.get("seconds")}
                                for b in data.get("baselines", [])])
    result = {"job": args.job, "job_wall_s": wall, "cold": args.cold, "teacher": row("teacher", data["teacher"]),
              "front": front, "baselines": baselines, "candidates": len(data["candidates"]),
              "full_fidelity_share": len(data["candidates"]) / max(1, len(data["candidates"]) + len(cheap)),
              "screened_cheaply": len(cheap), "hv_ratio_vs_best_optuna": None, "job_dir": str(out),
              "noise": NOISE}

    def fmt(r: dict) -> str:
        tok = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        ppl = f"{r['ppl_test']:.3f}" if r["ppl_test"] else "-"
        size = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else "-"
        return f"{ppl:>9} {size:>9} {tok:>8}"

    print(f"\njob {args.job}: {wall:.0f} s, {len(data['candidates'])} candidates evaluated in full and {len(cheap)} "
          f"only on the screen's share of the text (full: {result['full_fidelity_share']:.0%}), "
          f"{len(front)} on the front")
    print(f"{'':60} {'test ppl':>9} {'MB':>9} {'tok/s':>8}  matched or beaten by")
    print(f"{'teacher':60} {fmt(result['teacher'])}")
    for b in baselines:
        verdict = "NOT MATCHED"
        if b["matched_by"]:
            verdict = ("beaten by " if b["beaten"] else "matched by ") + b["matched_by"]
        print(f"{'baseline ' + b['name']:60} {fmt(b)}  {verdict}")
    for m in front:
        print(f"{m['name'][:60]:60} {fmt(m)}")
    beaten = sum(b["beaten"] for b in baselines)
    matched = sum(b["matched_by"] is not None for b in baselines)
    print(f"\n{matched} of {len(baselines)} baselines matched or beaten by a front member, {beaten} beaten outright "
          f"(target: all, and at least 3); speed noise allowed {NOISE:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
