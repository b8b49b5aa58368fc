"""`slimsearch hw profile` and `slimsearch hw calibrate`: files written, one-line errors, exit 2."""

from __future__ import annotations

import json
import random

import pytest

from slimsearch.cli import main
from slimsearch.hardware_profiles import LayerCost, load_profile, measure_host, predict


def test_hw_profile_writes_a_loadable_profile_with_measured_sources(tmp_path, capsys):
    out = tmp_path / "local.yaml"
    assert main(["hw", "profile", "--out", str(out), "--quick", "--name", "this-box"]) == 0
    profile = load_profile(out)
    assert profile.name == "this-box"
    assert {p.value for p in profile.precisions} == {"fp32", "int8"}
    for path in ("peak_gops.fp32", "peak_gops.int8", "memory_bandwidth_gbps", "layer_overhead_us",
                 "call_overhead_us"):
        assert " by slimsearch hw profile" in profile.sources[path]
        assert profile.sources[path].startswith("measured on ")
    assert set(profile.sources) == set(profile.numeric_fields())
    assert str(out) in capsys.readouterr().out


def test_measured_profile_predicts_and_passes_the_catalogue_source_rules():
    profile = measure_host(quick=True)
    layer = LayerCost("c", "conv", 10**7, 100, 32, 32, 400, 10**5)
    assert predict([layer], profile).latency_ms > 0
    for path, citation in profile.sources.items():
        text = " ".join(citation.split())
        assert len(text) >= 30, path
        if text.lower().startswith("estimate"):
            assert text.startswith("estimate:") and len(text) >= 50, path


def _layers_csv(path, rows):
    lines = ["latency_ms,layers"]
    for layers, ms in rows:
        payload = json.dumps([l.to_dict() for l in layers]).replace('"', '""')
        lines.append(f'{ms},"{payload}"')
    path.write_text("\n".join(lines) + "\n")


def test_hw_calibrate_fits_and_reports_held_out_rows(tmp_path, capsys):
    rng = random.Random(0)
    rows = []
    for k in range(12):
        layers = [LayerCost(f"l{j}", rng.choice(["conv", "linear"]), rng.randint(10**5, 10**8), 10, 32, 32,
                            1000, rng.randint(10**3, 10**6)) for j in range(rng.randint(1, 6))]
        rows.append((layers, 3.0 * predict(layers, "raspberry-pi-4").latency_ms))
    csv_path, out = tmp_path / "m.csv", tmp_path / "cal.json"
    _layers_csv(csv_path, rows)
    assert main(["hw", "calibrate", "raspberry-pi-4", str(csv_path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out rows" in text and "Kendall tau" in text and "roofline" in text
    assert "no correction learned: it needs at least 30 fitted rows, got 9" in text
    fitted = load_profile(out)
    assert fitted.sources["efficiency.conv"].startswith("calibrated on 9 samples")
    assert fitted.correction is None


def test_hw_calibrate_reports_roofline_and_correction_on_held_out_rows(tmp_path, capsys):
    rng = random.Random(1)
    rows = []
    for k in range(80):
        layers = [LayerCost(f"l{j}", rng.choice(["conv", "linear"]), rng.randint(10**5, 10**8), 10, 32, 32,
                            1000, rng.randint(10**3, 10**6)) for j in range(rng.randint(1, 12))]
        # 40% slower beyond 6 layers: no per-op factor says that, the correction can
        rows.append((layers, predict(layers, "raspberry-pi-4").latency_ms * (1.4 if len(layers) > 6 else 1.0)))
    csv_path, out = tmp_path / "m.csv", tmp_path / "cal.yaml"
    _layers_csv(csv_path, rows)
    assert main(["hw", "calibrate", "raspberry-pi-4", str(csv_path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    table = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert {"spec-only", "roofline", "+"} <= set(table)
    within_10 = {label: float(line.split()[-3].rstrip("%")) for label, line in table.items()
                 if label in ("roofline", "+")}
    assert within_10["+"] > within_10["roofline"]
    fitted = load_profile(out)
    assert fitted.correction is not None and fitted.correction.samples == 60


@pytest.mark.parametrize("content, expected", [
    ("latency_ms,task\n1.0,mnist\n", "header: needs 'latency_ms' and either 'layers' or 'task' and 'plan'"),
    ("latency_ms,layers,colour\n1.0,[],red\n", "header: unknown column(s) ['colour']"),
    ('latency_ms,layers\nfast,"[]"\n2.0,"[]"\n', "row 2: latency_ms: must be a number > 0, got 'fast'"),
    ('latency_ms,layers\n1.0,"[{""name"": 1}]"\n2.0,"[]"\n', "row 2: layers: must be a JSON list of layer costs"),
    ('latency_ms,task,plan,batch\n1.0,mnist,{},two\n', "row 2: batch: must be an int >= 1, got 'two'"),
])
def test_hw_calibrate_bad_csv_exits_2_with_one_line(tmp_path, capsys, content, expected):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text(content)
    assert main(["hw", "calibrate", "raspberry-pi-4", str(csv_path), "--out", str(tmp_path / "o.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("slimsearch: error: ")
    assert str(csv_path) in err and expected in err


@pytest.mark.parametrize("args, expected", [
    (["no-such-device", "{csv}"], "unknown hardware profile 'no-such-device'; must be one of"),
    (["raspberry-pi-4", "{missing}"], "measurements file '{missing}' does not exist"),
    (["raspberry-pi-4", "{csv}", "--holdout", "1.5"], "--holdout must be a number in (0, 1)"),
])
def test_hw_calibrate_bad_arguments_exit_2(tmp_path, capsys, args, expected):
    csv_path, missing = tmp_path / "m.csv", tmp_path / "missing.csv"
    csv_path.write_text('latency_ms,layers\n1.0,"[]"\n2.0,"[]"\n')
    fill = {"csv": str(csv_path), "missing": str(missing)}
    argv = ["hw", "calibrate", *[a.format(**fill) for a in args], "--out", str(tmp_path / "o.yaml")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected.format(**fill) in err
