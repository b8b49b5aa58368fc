"""The ``slimsearch`` command. Thin: parses arguments, calls the library, prints.

Every error that slimsearch raises on purpose ends the command with one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimsearch", description="AutoML compression search for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a compression search job")
    run.add_argument("job", help="job file (YAML)")
    run.add_argument("--budget", type=int, help="number of candidates to train and measure")
    run.add_argument("--workers", type=int, help="parallel Ray workers (default: one per core)")
    run.add_argument("--out", help="job folder (default: runs/<job name>)")
    run.add_argument("--resume", action="store_true", help="continue the job in --out where it stopped")
    run.add_argument("--executor", choices=["ray", "local"], default="ray",
                     help="where candidates are evaluated (default: ray)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    export = sub.add_parser("export", help="export a front member as ONNX + TorchScript + manifest")
    export.add_argument("job_dir", help="the job folder a run wrote")
    export.add_argument("--out", required=True, help="folder for model.onnx, model.pt and manifest.json")
    export.add_argument("--run", dest="run_id", help="MLflow child run id of the candidate to export")
    export.add_argument("--format", default="onnx,torchscript",
                        help="comma-separated: onnx, torchscript, packed (default: onnx,torchscript)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from slimsearch.exceptions import SlimSearchError

    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        return _export(args)
    except SlimSearchError as exc:
        print(f"slimsearch: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("slimsearch: interrupted; finished candidates are saved, --resume continues", file=sys.stderr)
        return 130


def _run(args) -> int:
    from slimsearch.job import load_job

    overrides = {}
    if args.budget is not None:
        overrides["search.budget"] = args.budget
    if args.workers is not None:
        overrides["search.workers"] = args.workers
    spec = load_job(args.job, overrides)
    out = Path(args.out) if args.out else Path("runs") / spec.name
    from slimsearch.search.job_runner import run_job

    result = run_job(spec, out, resume=args.resume, executor=args.executor, progress=not args.no_progress,
                     source=args.job)
    print(format_front(result))
    print(f"\nJob folder: {result.out}\n  front: {result.out / 'front.json'}, plot: {result.out / 'front.html'}"
          f"\n  MLflow: mlflow ui --backend-store-uri sqlite:///{result.out / 'mlflow.db'}")
    return 0


def format_front(result) -> str:
    """The front as a text table, teacher first; every cost column says measured or modelled."""
    metric_cols = list(result.objectives)
    for extra in ("size_bytes", "latency_ms@local"):
        if extra not in metric_cols:
            metric_cols.append(extra)
    modelled = sorted({k for c in result.front for k, v in c["provenance"].items()
                       if v == "modelled" and k.startswith("latency_ms@")})
    metric_cols += [m for m in modelled if m not in metric_cols]
    prov = {k: v for c in result.front for k, v in c["provenance"].items()}
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


def _export(args) -> int:
    from slimsearch.export import export_job

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    manifest = export_job(Path(args.job_dir), Path(args.out), run_id=args.run_id, formats=formats)
    metric = manifest["metric"]
    recorded = manifest["metrics"].get(f"{metric}_test")
    print(f"Exported trial {manifest['trial']} (run {manifest['run_id']}) to {args.out}: {manifest['selection']}")
    for fmt, value in manifest[f"test_{metric}_by_format"].items():
        print(f"  test {metric} of the {fmt} file, loaded back: {value:.4f} "
              f"(recorded: {'-' if recorded is None else f'{recorded:.4f}'})")
    print(f"  files: {', '.join(sorted(manifest['files']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
