"""The ``slimsearch hw`` commands (measure this machine, calibrate a profile): argparse and printing only."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_hw_parser(sub) -> None:
    """Add ``hw profile`` and ``hw calibrate`` to the command line's subparsers ``sub``."""
    hw = sub.add_parser("hw", help="hardware profiles: measure this machine, calibrate a profile")
    hw_sub = hw.add_subparsers(dest="hw_command", required=True)
    profile = hw_sub.add_parser(
        "profile", help="measure this machine and write its profile",
        description="Measure this CPU (fp32 and int8 matrix-multiply throughput in onnxruntime, memory "
                    "bandwidth, per-call and per-operator overhead) and write a profile file that jobs "
                    "and predict() can name by its path. Power and energy numbers are labelled estimates.")
    profile.add_argument("--out", required=True, help="profile file to write (.yaml, .yml or .json)")
    profile.add_argument("--name", help="profile name (default: local-<hostname>)")
    profile.add_argument("--threads", type=int, default=1,
                         help="onnxruntime threads, as the evaluator will use (default: 1)")
    profile.add_argument("--quick", action="store_true", help="small, fast measurements (rougher numbers)")
    calib = hw_sub.add_parser(
        "calibrate", help="fit a profile's efficiency factors to measured latencies",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fit PROFILE's efficiency factors, effective bandwidth and overheads to the measured "
                    "latencies in MEASUREMENTS.csv, then (from 30 fitted rows) a learned correction of what "
                    "that roofline still misses; write the result. The rows --holdout sets aside are not "
                    "fitted: Kendall tau and the shares within 10%% and 20%% on them are printed for the "
                    "profile as given, the refitted roofline, and roofline + correction.",
        epilog="MEASUREMENTS.csv: one row per measured model, with a header row. Columns:\n"
               "  latency_ms  measured latency in ms (required, > 0)\n"
               "  layers      JSON list of layer costs (LayerCost.to_dict), or else:\n"
               "  task        built-in task name or package.module:function, with\n"
               "  plan        CompressionPlan as JSON ({} = the uncompressed teacher), and\n"
               "  batch       batch size the latency was measured at (optional, default 1)\n"
               "Rows with task+plan are rebuilt with apply_plan and costed with layer_costs.")
    calib.add_argument("profile", help="shipped profile name or profile file path")
    calib.add_argument("measurements", help="CSV of measured latencies (format below)")
    calib.add_argument("--out", required=True, help="calibrated profile file to write (.yaml, .yml or .json)")
    calib.add_argument("--holdout", type=float, default=0.25,
                       help="share of rows held out to report the fit on, not fitted (default: 0.25)")
    calib.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default: 0)")
    calib.add_argument("--name", help="name of the calibrated profile (default: the old name)")


def hw_main(args) -> int:
    """Run the ``hw`` command ``args`` names."""
    return _hw_profile(args) if args.hw_command == "profile" else _hw_calibrate(args)


def _write_profile(profile, out: str) -> Path:
    from slimsearch.exceptions import ConfigError
    from slimsearch.hardware_profiles import load_profile

    path = Path(out)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"--out {out!r} must end with one of ['.yaml', '.yml', '.json']")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(profile.to_json() + "\n", encoding="utf-8")
    else:
        import yaml

        path.write_text(yaml.safe_dump(profile.to_dict(), sort_keys=False, width=100), encoding="utf-8")
    load_profile(path)  # what was written must read back
    return path


def _hw_profile(args) -> int:
    from slimsearch.exceptions import ConfigError
    from slimsearch.hardware_profiles import measure_host
    from slimsearch.jobs.spec import MAX_THREADS

    if not 1 <= args.threads <= MAX_THREADS:
        raise ConfigError(f"--threads: allowed: a whole number from 1 to {MAX_THREADS} (got {args.threads})")
    profile = measure_host(name=args.name, threads=args.threads, quick=args.quick)
    path = _write_profile(profile, args.out)
    print(f"Wrote profile {profile.name!r} to {path}")
    print(f"  fp32 {profile.peak_gops[_p('fp32')]:.1f} GOPS, int8 {profile.peak_gops[_p('int8')]:.1f} GOPS, "
          f"memory {profile.memory_bandwidth_gbps:.1f} GB/s, per call {profile.call_overhead_us:.1f} us, "
          f"per operator {profile.layer_overhead_us:.2f} us ({args.threads} thread(s))")
    print(f"  jobs name it by path: profiles: [{path}]")
    return 0


def _p(name: str):
    from slimsearch.hardware_profiles import Precision

    return Precision(name)


def _hw_calibrate(args) -> int:
    import dataclasses
    import random

    from slimsearch.evaluators.measurements import load_measurements
    from slimsearch.exceptions import ConfigError
    from slimsearch.hardware_profiles import calibrate, fit_report, load_profile

    if not 0.0 < args.holdout < 1.0:
        raise ConfigError(f"--holdout must be a number in (0, 1), got {args.holdout}")
    profile = load_profile(args.profile)
    samples = load_measurements(args.measurements)
    order = list(range(len(samples)))
    random.Random(args.seed).shuffle(order)
    n_test = max(2, round(args.holdout * len(samples)))
    if len(samples) - n_test < 2:
        raise ConfigError(f"{args.measurements}: {len(samples)} rows leave fewer than two to fit after "
                          f"holding out {n_test}; add rows or lower --holdout")
    test = [samples[i] for i in sorted(order[:n_test])]
    train = [samples[i] for i in sorted(order[n_test:])]
    fitted = calibrate(profile, train, name=args.name)
    path = _write_profile(fitted, args.out)
    roofline = dataclasses.replace(fitted, correction=None)
    reports = [("spec-only", fit_report(profile, test)), ("roofline", fit_report(roofline, test))]
    if fitted.correction is not None:
        reports.append(("+ correction", fit_report(fitted, test)))
    print(f"Calibrated {profile.name!r} on {len(train)} rows; wrote {path}")
    print(f"Fit on {len(test)} held-out rows (seed {args.seed}):")
    print(f"  {'':12} {'Kendall tau':>11} {'within 10%':>10} {'within 20%':>10} {'median |err|':>12}")
    for label, rep in reports:
        print(f"  {label:12} {rep.kendall_tau:11.3f} {rep.within_10:10.1%} {rep.within_20:10.1%} "
              f"{rep.median_abs_rel_error:12.1%}")
    if fitted.correction is None:
        print(f"  no correction learned: it needs at least 30 fitted rows, got {len(train)}")
    effs = ", ".join(f"{op.value} {v:.3g}" for op, v in fitted.efficiency.items())
    print(f"  efficiency: {effs}; bandwidth {fitted.memory_bandwidth_gbps:.3g} GB/s; "
          f"per layer {fitted.layer_overhead_us:.3g} us; per call {fitted.call_overhead_us or 0:.3g} us")
    return 0
