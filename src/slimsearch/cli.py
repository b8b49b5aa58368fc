"""The ``slimsearch`` command. Thin: parses arguments, calls the library, prints.

Every error that slimsearch raises on purpose ends the command with one line on
stderr and exit code 2. A job that ends without one completed candidate (every
candidate failed) says why on one line of stderr and exits 1: there is nothing to export.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from slimsearch._cli_hw import add_hw_parser, hw_main
from slimsearch.jobs.plan import DEFAULT_CHECKS, DEFAULT_CHOICES, DEFAULT_HEAD_BITS, DEFAULT_KV_BITS, DEFAULT_WINDOWS

EXIT_BAD_INPUT = 2
EXIT_NO_CANDIDATE = 1  # `run`: the job ended without one completed candidate
_sigterm_received = False  # set by entry()'s SIGTERM handler: exit 143, not Ctrl-C's 130
JOB_HELP = "job: registry id, job name (the latest of that name) or job folder"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (exit 2) like every other bad input."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}; `{self.prog} --help` lists what is allowed\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slimsearch", description="AutoML compression search for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a compression search job")
    run.add_argument("job", help="job file (YAML)")
    run.add_argument("--budget", type=int, help="number of candidates to train and measure")
    run.add_argument("--workers", type=int, help="parallel Ray workers (default: one per core, or one per GPU "
                                                 "share when candidates run on GPUs)")
    run.add_argument("--threads", type=int, help="torch threads per worker (default: the cores shared out among "
                                                 "the workers)")
    run.add_argument("--time-limit", dest="time_limit_s", type=float, help="wall-clock seconds one candidate may take; past them it "
                     "fails (default: no limit; may be set on --resume)")
    run.add_argument("--device", help="where candidates are fine-tuned and scored: auto (CUDA when present, the "
                                      "default), cpu, cuda or cuda:N; sizes and timings are the CPU's")
    run.add_argument("--gpus-per-worker", dest="gpus_per_worker", type=float,
                     help="GPUs one Ray trial asks for; a fraction shares one (default: 1 on a GPU, else 0)")
    run.add_argument("--out", help="job folder (default: runs/<job name>)")
    run.add_argument("--resume", action="store_true", help="continue the job in --out where it stopped")
    run.add_argument("--executor", choices=["ray", "local"], default="ray",
                     help="where candidates are evaluated (default: ray)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--ray-address", metavar="ADDR",
                     help="join this running Ray cluster (HOST:PORT of its head, or 'auto') instead of starting "
                          "Ray here; nodes carrying a device:<profile> resource measure that profile's latency")
    run.add_argument("--storage", help="Optuna study database URL, e.g. postgresql://user@host/db; drivers "
                                       "given the same URL and job name share the study and its budget "
                                       "(default: the job file's storage, else SQLite in the job folder)")
    run.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. http://mlflow-host:5000 (default: the "
                                            "job file's tracking_uri, else SQLite in the job folder)")

    submit = sub.add_parser("submit", help="submit a job to a Ray cluster through its Job Submission API")
    submit.add_argument("job", help="job file (YAML); its folder is uploaded as the job's working_dir")
    submit.add_argument("--address", required=True, help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265")
    submit.add_argument("--out", help="job folder on the head (default: the absolute path of runs/<job name>)")
    submit.add_argument("--budget", type=int, help="number of candidates to train and measure")
    submit.add_argument("--workers", type=int, help="parallel Ray workers")
    submit.add_argument("--executor", choices=["ray", "local"], default="ray",
                        help="where candidates are evaluated (default: ray)")
    submit.add_argument("--resume", action="store_true", help="continue the job in --out where it stopped")

    export = sub.add_parser("export", help="export a front member as ONNX + TorchScript + manifest")
    export.add_argument("job_dir", metavar="job", help=JOB_HELP)
    export.add_argument("--out", required=True, help="folder for model.onnx, model.pt and manifest.json")
    export.add_argument("--run", dest="run_id", help="MLflow child run id of the candidate to export")
    export.add_argument("--where", help='conditions every candidate considered meets, e.g. "accuracy>=0.97" '
                                        '(comma-separated; OP one of >=, <=, >, <, ==)')
    export.add_argument("--minimize", metavar="METRIC",
                        help="export the candidate with the lowest METRIC, e.g. latency_ms@raspberry-pi-4 "
                             "(default: the job's latency objective)")
    export.add_argument("--no-register", action="store_true",
                        help="do not register the ONNX model in the job's MLflow Model Registry")
    export.add_argument("--format", default=None,
                        help="comma-separated: onnx, torchscript, packed (default: onnx,torchscript); "
                             "for a causal-lm job: genai, hf (default: both)")

    jobs = sub.add_parser("jobs", help="the jobs in the job registry, as a table")
    jobs.add_argument("--json", action="store_true", help="JSON instead of a table")

    status = sub.add_parser("status", help="a job's progress, front size, hypervolume and time left")
    status.add_argument("job", help=JOB_HELP)
    status.add_argument("--json", action="store_true", help="JSON instead of text")

    front = sub.add_parser("front", help="a job's Pareto front")
    front.add_argument("job", help=JOB_HELP)
    front.add_argument("--json", action="store_true", help="the front members as JSON")

    report = sub.add_parser("report", help="(re)write a job's report.html")
    report.add_argument("job", help=JOB_HELP)
    report.add_argument("--baseline", help="a random-search job (same objectives) to draw against")
    report.add_argument("--out", help="where to write it (default: <job folder>/report.html)")
    report.add_argument("--screenshot", help="also save a PNG of its top, taken by headless Chromium")

    ui = sub.add_parser("ui", help="serve the MLflow UI of a job's tracking store on 127.0.0.1")
    ui.add_argument("job", help=JOB_HELP)
    ui.add_argument("--port", type=int, help="port (default: a free one)")

    add_hw_parser(sub)
    plan = sub.add_parser(
        "plan", help="a causal-LM job's fastest plan within a perplexity budget, without a search",
        description="Measure what each weight choice and KV precision costs each group of linears on a few "
                    "calibration windows (cached in the job folder), solve an integer program for the plan that "
                    "minimises the modelled latency (or energy, or bytes) within the perplexity budget, build "
                    "it and score it on the validation windows; where it measures over the budget, move the plan's "
                    "edge in by what the prediction missed and build the next (--checks). The planner's figures "
                    "are predictions (the groups' effects are assumed to add up); the validation figures are "
                    "measured.")
    plan.add_argument("job", help="job file (YAML) of a causal-lm task")
    plan.add_argument("--out", help="job folder the sensitivities are cached in and plan.json written to "
                                    "(default: runs/<job name>)")
    plan.add_argument("--max-ppl-increase", type=float,
                      help="perplexity budget relative to the teacher, e.g. 0.05 (default: the job's "
                           "'ppl_increase <= X' constraint)")
    plan.add_argument("--minimise", metavar="METRIC", help="latency_ms@P, energy_mj@P (P a profile of the job, "
                                                           "modelled) or size_bytes (default: the first profile's "
                                                           "latency)")
    plan.add_argument("--choices", default=",".join(DEFAULT_CHOICES),
                      help="weight options <method>-w<bits>-g<group>[-asym], comma-separated (default: %(default)s)")
    plan.add_argument("--kv-bits", default=",".join(map(str, DEFAULT_KV_BITS)),
                      help="KV-cache precisions to consider, comma-separated (default: %(default)s)")
    plan.add_argument("--head-bits", default=",".join(map(str, DEFAULT_HEAD_BITS)),
                      help="widths of the output projection (and a tied embedding) to consider, comma-separated; "
                           "'' keeps it float (default: %(default)s)")
    plan.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                      help="calibration windows the sensitivities are measured on (default: %(default)s)")
    plan.add_argument("--per-group", action="store_true",
                      help="one choice per group across all blocks (qkv, o, gate_up, down), not per block")
    plan.add_argument("--checks", type=int, default=DEFAULT_CHECKS,
                      help="plans built and scored at most: after one that measures over the budget, the next is "
                           "planned within a tighter predicted edge (default: %(default)s)")
    plan.add_argument("--no-verify", action="store_true", help="do not build and score the plan")
    plan.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: Optional[Sequence[str]] = None, *, one_job_per_process: bool = False) -> int:
    """The command line; ``one_job_per_process`` (the ``slimsearch`` command, :func:`entry`):
    the process ends after this call, so ``run`` may start Ray in a background thread
    (``run_job``'s ``ray_in_background``); not in a process that goes on (tests, notebooks)."""
    from slimsearch.exceptions import SlimSearchError

    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed as one line)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    try:
        if args.command == "run":
            return _run(args, ray_in_background=one_job_per_process)
        if args.command == "plan":
            return _plan(args)
        if args.command == "hw":
            return hw_main(args)
        if args.command in _JOB_COMMANDS:
            return _JOB_COMMANDS[args.command](args)
        return _export(args)
    except SlimSearchError as exc:
        print(f"slimsearch: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        how = "stopped by SIGTERM" if _sigterm_received else "interrupted"
        then = "; finished candidates are saved, --resume continues" if args.command == "run" else ""
        print(f"slimsearch: {how}{then}", file=sys.stderr)
        return 143 if _sigterm_received else 130


def _run(args, ray_in_background: bool = False) -> int:
    from slimsearch.launch import OVERRIDES, launch

    given = {key: getattr(args, key) for key in OVERRIDES if getattr(args, key) is not None}  # the flags given
    result = launch(args.job, overrides={OVERRIDES[k][0]: v for k, v in given.items()},
                    labels={**{OVERRIDES[k][0]: OVERRIDES[k][1] for k in given}, "out": "--out"},
                    out=args.out, resume=args.resume, executor=args.executor, progress=not args.no_progress,
                    ray_address=args.ray_address, ray_in_background=ray_in_background)
    print(format_front(result))
    from slimsearch.storage import redact

    tracking_uri = result.tracking_uri
    mlflow = (redact(tracking_uri) if tracking_uri
              else f"mlflow ui --backend-store-uri sqlite:///{result.out / 'mlflow.db'}")
    print(f"\nJob folder: {result.out}\n  front: {result.out / 'front.json'}, plot: {result.out / 'front.html'}"
          f"\n  MLflow: {mlflow}")
    if result.stopped and not result.candidates:  # every candidate failed: a pipeline must not go on to export
        sys.stdout.flush()
        print(f"slimsearch: {result.stopped}", file=sys.stderr)
        return EXIT_NO_CANDIDATE
    return 0


def format_front(result) -> str:
    """The front as a text table, teacher first; every cost column says measured or modelled."""
    metric_cols = list(result.objectives)
    for extra in ("size_bytes", "latency_ms@local"):
        if extra not in metric_cols:
            metric_cols.append(extra)
    # each labelled measured or modelled below, the teacher's too (with an empty front it is the only row)
    prov = {**result.teacher_provenance, **{k: v for c in result.front for k, v in c["provenance"].items()}}
    devices = sorted(k for k in prov if k.startswith("latency_ms@"))
    metric_cols += [m for m in devices if m not in metric_cols]
    headers = ["trial"] + [f"{m} [{prov[m]}]" if m in prov else m for m in metric_cols] + ["plan"]
    rows = [["teacher"] + [_fmt(result.teacher.get(m)) for m in metric_cols] + ["uncompressed"]]
    for c in sorted(result.front, key=lambda c: -c["metrics"].get(metric_cols[0], 0)):
        rows.append([str(c["trial"])] + [_fmt(c["metrics"].get(m)) for m in metric_cols] + [c["describe"]])
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers) - 1)]
    lines = [f"Pareto front: {len(result.front)} of {len(result.candidates)} candidates"]
    for r in [headers] + rows:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def _plan(args) -> int:
    from slimsearch._io import atomic_write
    from slimsearch.exceptions import ConfigError
    from slimsearch.jobs.load import load_job
    from slimsearch.jobs.plan import plan_job

    spec = load_job(args.job)
    folder = Path(args.out) if args.out else Path("runs") / spec.name

    def bits(flag: str, text: str) -> list[int]:
        try:
            return [int(b) for b in text.split(",") if b.strip()]
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: allowed: comma-separated integers, e.g. 8,4") from None

    choices = [c.strip() for c in args.choices.split(",") if c.strip()]
    result = plan_job(spec, folder=folder, max_ppl_increase=args.max_ppl_increase, minimise=args.minimise,
                      choices=choices, kv_bits=bits("--kv-bits", args.kv_bits),
                      head_bits=bits("--head-bits", args.head_bits), windows=args.windows, per_block=not args.per_group,
                      verify=not args.no_verify, checks=args.checks, progress=None if args.json else print)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "plan.json", result.to_json() + "\n")
    if args.json:
        print(result.to_json())
        return 0
    p, m = result.predicted, result.measured
    print(f"Plan within ppl_increase <= {result.max_ppl_increase:g}, minimising {result.minimised} "
          f"(wrote {folder / 'plan.json'}):")
    print(f"  {result.plan.describe()}")
    print(f"  predicted: ppl_increase {p['ppl_increase']:+.2%}, {result.minimised} {p[result.minimised]:.4g}, "
          f"size {p['size_bytes'] / 1e6:.1f} MB [modelled, from the per-group table]")
    if m:
        print(f"  measured on validation: ppl {m['ppl']:.3f}, ppl_increase {m['ppl_increase']:+.2%}, "
              f"size {m['size_bytes'] / 1e6:.1f} MB")
        print(f"  measured on test (held out): ppl {m['ppl_test']:.3f}, ppl_increase {m['ppl_increase_test']:+.2%}")
    if len(result.checks) > 1:
        print("  plans built: " + "; ".join(f"{c['size_bytes'] / 1e6:.1f} MB predicted {c['predicted']:+.2%}, "
                                            f"measured {c['measured']:+.2%} (test {c['measured_test']:+.2%})"
                                            for c in result.checks))
    if result.within_budget is False:
        print(f"  over the budget: no plan of the {len(result.checks)} built measured within "
              f"ppl_increase <= {result.max_ppl_increase:g}; this is the one of least measured increase "
              "(to go on: a larger --checks, more --windows, or a looser budget)")
    print("  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()))
    return 0


def _export(args) -> int:
    from slimsearch.export import export_job

    from slimsearch.jobs.query import resolve_job

    formats = None if args.format is None else tuple(f.strip() for f in args.format.split(",") if f.strip())
    manifest = export_job(resolve_job(args.job_dir).folder, Path(args.out), run_id=args.run_id, formats=formats,
                          where=args.where, minimize=args.minimize, register=not args.no_register)
    metric = manifest["metric"]
    recorded = manifest["metrics"].get(f"{metric}_test")
    print(f"Exported trial {manifest['trial']} (run {manifest['run_id']}) to {args.out}: {manifest['selection']}")
    for fmt, value in manifest[f"test_{metric}_by_format"].items():
        print(f"  test {metric} of the {fmt} file, loaded back: {value:.4f} "
              f"(recorded: {'-' if recorded is None else f'{recorded:.4f}'})")
    print(f"  files: {', '.join(sorted(manifest['files']))}")
    if manifest.get("registry"):
        reg = manifest["registry"]
        print(f"  MLflow Model Registry: {reg['uri']} (version {reg['version']})")
    return 0


def _when(ts) -> str:
    import time

    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [headers] + rows)


def _jobs(args) -> int:
    import json

    from slimsearch.storage.registry import Registry

    from slimsearch.cluster import refresh_submitted

    registry = Registry()
    ray_status = refresh_submitted(registry.jobs(), registry)
    records = registry.jobs()
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return 0
    if not records:
        print("No jobs registered yet; `slimsearch run JOB.yaml` registers one.")
        return 0
    rows = [[str(r.id), r.name, r.status, str(r.budget or "-"), _when(r.started), _when(r.ended),
             str(len(r.exports)), r.out] for r in records]
    headers = ["id", "name", "status", "budget", "started", "ended", "exports", "folder"]
    if any(r.submission_id for r in records):  # jobs handed to a Ray cluster: its id and Ray's word
        for row, r in zip(rows, records):
            row.append(f"{r.submission_id} ({ray_status[r.id]})" if r.id in ray_status else r.submission_id or "-")
        headers.append("ray submission")
    print(_table(headers, rows))
    return 0


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def _status(args) -> int:
    import json

    from slimsearch.jobs.query import progress

    p = progress(args.job)
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
        return 0
    print(f"job {p.name}" + (f" (id {p.id})" if p.id is not None else "") + f": {p.status}, folder {p.folder}")
    if p.status == "lost":
        print("  its driver ended without saying so (killed, out of memory, or the machine restarted); "
              f"`slimsearch run JOB_FILE --out {p.folder} --resume` continues it")
    extra = ", ".join(x for x in (f"{p.running} running" if p.running else "",
                                  f"{p.failed} failed" if p.failed else "") if x)
    print(f"  progress: {p.done}/{p.budget} candidates" + (f" ({extra})" if extra else ""))
    print(f"  front: {p.front_size} candidates")
    if p.hypervolume is not None:
        print(f"  hypervolume: {p.hypervolume:.4f} (reference: {p.hypervolume_rule})")
    else:
        from slimsearch.search.pareto import MAX_SLICED_POINTS

        print("  hypervolume: - (computed once a candidate is done, for 2 or more objectives; with 4 or more, "
              f"for up to {MAX_SLICED_POINTS} candidates)")
    left = _duration(p.seconds_left) if p.status == "running" else "- (not running)"
    print(f"  time per candidate: {_duration(p.seconds_per_candidate)}; time left: {left}")
    return 0


def _front(args) -> int:
    import json
    from types import SimpleNamespace

    from slimsearch.jobs.query import read_front

    data = read_front(args.job)
    if args.json:
        keep = ("trial", "run_id", "metrics", "provenance", "describe", "plan")
        print(json.dumps({"job": data["job"], "objectives": data["objectives"], "teacher": data["teacher"],
                          "teacher_provenance": data.get("teacher_provenance", {}),
                          "front": [{k: c[k] for k in keep if k in c} for c in data["front"]]}, indent=2))
        return 0
    print(format_front(SimpleNamespace(front=data["front"], candidates=data["candidates"], teacher=data["teacher"],
                                       objectives=data["objectives"],
                                       teacher_provenance=data.get("teacher_provenance", {}))))
    return 0


def _report(args) -> int:
    from slimsearch.jobs.query import resolve_job, write_job_report

    job = resolve_job(args.job)
    baseline = resolve_job(args.baseline).folder if args.baseline else None
    path = write_job_report(job.folder, Path(args.out) if args.out else None, baseline=baseline)
    print(f"Wrote {path}")
    if args.screenshot:
        from slimsearch.dashboards.browser import screenshot

        print(f"Wrote {screenshot(path, Path(args.screenshot))}")
    return 0


def _ui(args) -> int:
    from slimsearch.jobs.query import read_state, resolve_job
    from slimsearch.storage.ui import start_ui

    job = resolve_job(args.job)
    state = read_state(job.folder)
    if state["tracking_uri"].startswith(("http://", "https://")):  # logged to an MLflow server: its UI is there
        from slimsearch.storage import redact

        print(f"MLflow UI of job {job.folder.name}: {redact(state['tracking_uri'])} (the job logs to that MLflow "
              f"server; experiment {state['study_name']!r}; nothing started here)")
        return 0
    server = start_ui(state["tracking_uri"], port=args.port, log_path=job.folder / "mlflow-ui.log")
    try:
        server.wait_ready()
        print(f"MLflow UI of job {job.folder.name} on {server.url} (Ctrl-C stops it; log: {server.log_path})",
              flush=True)
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _submit(args) -> int:
    from slimsearch.cluster import submit

    s = submit(args.job, args.address, out=args.out, executor=args.executor, budget=args.budget,
               workers=args.workers, resume=args.resume)
    print(s.submission_id)
    print(f"  submitted to {s.address} (registry job {s.job_id}, queued); the head runs: {s.entrypoint}")
    print(f"  follow it: slimsearch jobs; ray job logs --address {s.address} {s.submission_id}")
    return 0


_JOB_COMMANDS = {"submit": _submit, "jobs": _jobs, "status": _status, "front": _front, "report": _report, "ui": _ui}


def entry() -> None:
    """The ``slimsearch`` command: :func:`main`, then exit without a last garbage collection.

    SIGTERM (``kill``, a scheduler's stop) raises KeyboardInterrupt: a job stops as it does
    on Ctrl-C (its trials in flight are left for ``--resume``, the registry says "stopped",
    the MLflow run "KILLED"), and the command exits with 143 (128 + SIGTERM). Output piped into a
    reader that stops early (``| head``) ends it quietly with 141.

    At exit Python collects every object of the libraries a job imports (torch, MLflow,
    Ray, plotly): over a second of a finished job's wall time for nothing, since the
    process ends. ``gc.freeze()`` moves them out of the collector's sight first; memory
    goes back to the system all the same.
    """
    import gc
    import os
    import signal

    def terminated(signum, frame):
        global _sigterm_received
        _sigterm_received = True
        raise KeyboardInterrupt  # its type does not survive every library (Ray's calls raise their own)

    signal.signal(signal.SIGTERM, terminated)  # ray_runtime.start_ray keeps this over the handler Ray sets
    try:
        code = main(one_job_per_process=True)
        sys.stdout.flush()
    except BrokenPipeError:  # `slimsearch front JOB | head`: the reader stopped reading; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit fails too
        code = 141  # 128 + SIGPIPE, as a command killed by the signal
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
