"""The SmolLM2 example job end to end, its front against the uniform recipes it evaluated beside it.

    python benchmarks/llm_search.py [--job examples/smollm2.yaml] [--budget N] [--cold] [--no-planner]
                                    [--samplers-json S.json] [--json out.json]
    python benchmarks/llm_search.py --job-dir DIR [--wall-s S] [--log FILE] [--json out.json]

Runs ``slimsearch run JOB --out <tmp>/job --no-progress`` in a subprocess (``--cold``: the converted
SmolLM2 folder and the task caches are moved aside first and put back after, so the run starts as a
fresh machine's would) and reads its ``front.json``: the front members and the baselines (the uniform
recipes the job evaluates after its search, ``search.baselines``). For each baseline it looks for a
front member that matches or beats it on all three of test perplexity (no more), packed weight bytes
(no more) and measured decode tokens per second (at least ``1 - NOISE`` of the baseline's: the
timing noise allowed), and says whether one beats it outright (better by more than the noise on at
least one: lower perplexity, fewer bytes, or faster by more than ``NOISE``). It splits the job's
wall time (candidates' evaluations, baselines, the planner's sensitivity pass, the rest), and then
runs the planner alone (``plan_job``: a choice per block and group, no search evaluation) at each
front member's bytes, building and scoring its plan on the validation text beside the member's.
Prints one table and writes ``--json``: ``{"baselines": [...], "front": [...], "job_wall_s",
"full_fidelity_share", "hv_ratio_vs_best_optuna", "time", "planner", ...}``: ``full_fidelity_share``
is the share of the job's evaluated candidates its multi-fidelity screen promoted to the full text;
``hv_ratio_vs_best_optuna`` is read from ``benchmarks/llm_samplers.py``'s JSON (``--samplers-json``),
null without it. ``--job-dir`` analyses an earlier run's folder instead of running the job.
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
    parser.add_argument("--no-planner", action="store_true", help="skip the planner-alone comparison")
    parser.add_argument("--samplers-json", help="benchmarks/llm_samplers.py's --json, whose hv_ratio_vs_best_optuna "
                        "this result carries")
    parser.add_argument("--job-dir", help="analyse this finished job folder (an earlier run's) instead of running "
                        "the job; --wall-s and --log give that run's wall time and output")
    parser.add_argument("--wall-s", type=float, help="with --job-dir: the run's wall time")
    parser.add_argument("--log", help="with --job-dir: the run's output (the planner's time is read from it)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    if args.job_dir:
        out = Path(args.job_dir)
        lines = Path(args.log).read_text().splitlines() if args.log else []
        report(args, out, args.wall_s or 0.0, lines)
        return

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
    lines: list[str] = []
    try:
        with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:
                print(line, end="", flush=True)
                lines.append(line)
        if proc.returncode:
            raise SystemExit(f"the job failed ({proc.returncode})")
    finally:
        wall = time.perf_counter() - started
        if args.cold and aside.exists():
            shutil.rmtree(cache, ignore_errors=True)
            shutil.move(str(aside), cache)
    report(args, out, wall, lines)


def report(args, out: Path, wall: float, lines: list[str]) -> None:
    """Read the job folder ``out``, compare, print the table and write ``--json``."""
    data = json.loads((out / "front.json").read_text())
    front = [row(f"trial {c['trial']}: {c['describe']}", c["metrics"]) for c in data["front"]]
    cheap = [s for s in data.get("screened", []) if s["metrics"].get("fidelity", 1.0) < 1.0]  # not promoted
    baselines = compare(front, [{**row(b["name"], b["metrics"]), "seconds": b.get("seconds")}
                                for b in data.get("baselines", [])])
    result = {"job": args.job, "job_wall_s": wall, "cold": args.cold, "teacher": row("teacher", data["teacher"]),
              "front": front, "baselines": baselines, "candidates": len(data["candidates"]),
              "full_fidelity_share": len(data["candidates"]) / max(1, len(data["candidates"]) + len(cheap)),
              "screened_cheaply": len(cheap), "hv_ratio_vs_best_optuna": hv_ratio(args.samplers_json),
              "job_dir": str(out), "noise": NOISE, "time": time_split(out, data, wall, lines)}
    if not args.no_planner:
        result["planner"] = planner_at_equal_bytes(Path(args.job), out / "per-block-planner", data["front"],
                                                   data["teacher"]["ppl"], job_dir=out,
                                                   job_sensitivity_s=result["time"]["planner_s"])

    def fmt(r: dict) -> str:
        tok = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        ppl = f"{r['ppl_test']:.3f}" if r["ppl_test"] else "-"
        size = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else "-"
        return f"{ppl:>9} {size:>9} {tok:>8}"

    print(f"\njob {args.job} ({out}): {wall:.0f} s, {len(data['candidates'])} candidates evaluated in full and "
          f"{len(cheap)} "
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
    t = result["time"]
    print(f"time: job {t['wall_s']:.0f} s = candidates evaluated {t['evaluate_s']:.0f} s (screen only: "
          f"{t['screen_s']:.0f} s) + baselines {t['baselines_s']:.0f} s + planner's sensitivity {t['planner_s']:.0f} s "
          f"+ the rest {t['other_s']:.0f} s (task and teacher loading, teacher timing, Ray, MLflow, report)")
    if "planner" in result:
        p = result["planner"]
        print(f"\nplanner alone (per block, {', '.join(p['choices'])}, KV {p['kv_bits']}, output projection "
              f"{p.get('head_bits', [])}): sensitivity "
              f"{p['sensitivity_s']:.0f} s, then per front member the plan of least predicted perplexity within "
              "its bytes, built and scored on the validation text:")
        for r in p["rows"]:
            print(f"  {r['member'][:50]:50} {r['member_bytes'] / 1e6:7.1f} MB ppl {r['member_ppl']:.3f}  planner "
                  f"{r['plan_bytes'] / 1e6:7.1f} MB ppl {r['plan_ppl']:.3f} (predicted {r['predicted_ppl']:.3f}) "
                  f"{r['plan_ppl'] / r['member_ppl'] - 1:+.2%} {'within 1%' if r['within_1pct'] else 'NOT within 1%'}"
                  f" ({r['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def hv_ratio(path) -> "float | None":
    """The sampler comparison's ratio (benchmarks/llm_samplers.py writes it), when given."""
    return json.loads(Path(path).read_text())["hv_ratio_vs_best_optuna"] if path else None


def time_split(out: Path, data: dict, wall: float, lines: list[str]) -> dict:
    """Where the job's wall time went: the candidates' evaluations (from the study), the baselines,
    the planner's sensitivity pass (its log line), the rest."""
    import re

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    state = json.loads((out / "job.json").read_text())
    trials = optuna.load_study(study_name=state["study_name"], storage=state["storage"]).get_trials(deepcopy=False)
    evaluate = sum(t.user_attrs.get("evaluate_s", 0.0) for t in trials)
    screen = sum(t.user_attrs.get("evaluate_s", 0.0) for t in trials if t.user_attrs.get("screened"))
    baselines = sum(b.get("seconds") or 0.0 for b in data.get("baselines", []))
    planner = sum(float(m.group(1)) for line in lines
                  for m in [re.search(r"planner: sensitivity (?:measured|read from the job folder) \((\d+) s\)", line)]
                  if m)
    return {"wall_s": wall, "evaluate_s": evaluate, "screen_s": screen, "baselines_s": baselines,
            "planner_s": planner, "other_s": wall - evaluate - baselines - planner, "trials": len(trials)}


def planner_at_equal_bytes(job: Path, folder: Path, members: list[dict], teacher_ppl: float, *,
                           job_dir: Path, job_sensitivity_s: float) -> dict:
    """``slimsearch plan`` alone (a choice per block and group among the job's weight bits, RTN, groups of
    128; the job's KV and output projection widths or float), for each front member the plan of least predicted perplexity within the
    member's packed bytes, built and scored on the validation windows as the member was.

    Where the job measured the same table (a job searching per block), it is copied into ``folder`` and
    read back, and the planner's sensitivity time is the job's measurement of it (``job_sensitivity_s``)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for path in job_dir.glob("sensitivity-*.json"):
        shutil.copy2(path, folder / path.name)
    copied = set(folder.glob("sensitivity-*.json"))
    from slimsearch.jobs.load import load_job
    from slimsearch.jobs.plan import plan_job
    from slimsearch.tasks import load_task

    spec = load_job(job)
    task = load_task(spec.task, seed=spec.search.seed, path=spec.task_path, text=spec.task_text)
    bits = sorted(b for b in spec.space.weight_bits if b < 32)
    choices = [f"rtn-w{b}-g128" for b in bits]
    kv_bits = [b for b in spec.space.kv_bits if b < 32]
    head_bits = [b for b in spec.space.head_bits if b < 32]
    rows, sensitivity = [], None
    for member in sorted(members, key=lambda c: c["metrics"]["size_bytes"]):
        started = time.perf_counter()
        plan = plan_job(spec, folder=folder, choices=choices, kv_bits=kv_bits, head_bits=head_bits, per_block=True,
                        task=task, max_bytes=member["metrics"]["size_bytes"])
        if sensitivity is None:
            read_back = bool(copied) and set(folder.glob("sensitivity-*.json")) == copied  # no new table written
            sensitivity = job_sensitivity_s if read_back else plan.seconds["sensitivity"]
        rows.append({"member": f"trial {member['trial']}: {member['describe']}",
                     "member_bytes": member["metrics"]["size_bytes"], "member_ppl": member["metrics"]["ppl"],
                     "plan_bytes": plan.measured["size_bytes"], "plan_ppl": plan.measured["ppl"],
                     "predicted_ppl": teacher_ppl * (1 + plan.predicted["ppl_increase"]),
                     "within_1pct": plan.measured["ppl"] <= 1.01 * member["metrics"]["ppl"],
                     "seconds": time.perf_counter() - started, "chosen": plan.chosen})
    return {"choices": choices, "kv_bits": kv_bits, "head_bits": head_bits, "sensitivity_s": sensitivity or 0.0,
            "rows": rows}


if __name__ == "__main__":
    main()
