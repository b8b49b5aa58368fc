"""The report opens in headless Chromium (Debian's `chromium`) without script errors and draws the front."""

from __future__ import annotations

import json

import pytest

from slimsearch.dashboards.browser import find_chromium, render
from slimsearch.dashboards.report import write_report
from tests._real import missing

pytestmark = pytest.mark.slow  # a real browser



@pytest.fixture(autouse=True)
def chromium():
    if find_chromium() is None:
        missing("no chromium binary on PATH (.ci/run installs Debian's chromium)")


def test_report_renders_every_figure_without_script_errors(job_data, tmp_path):
    (tmp_path / "front.json").write_text(json.dumps(job_data))
    page = write_report(tmp_path)
    shown = render(page)
    assert shown.errors == []
    assert shown.state == "rendered"
    assert "fig-0:Pareto front (all objectives)" in shown.traces
    assert "fig-0:2-D front (latency_ms@local, accuracy)" in shown.traces
    assert "fig-1:this job" in shown.traces  # hypervolume
    assert {t.split(":")[0] for t in shown.traces} == {f"fig-{i}" for i in range(8)}


def test_a_script_error_in_the_page_is_reported(job_data, tmp_path):
    (tmp_path / "front.json").write_text(json.dumps(job_data))
    page = write_report(tmp_path)
    text = page.read_text(encoding="utf-8")
    page.write_text(text.replace("<div id=\"report-status\"", "<script>undefinedFunction();</script>"
                                                              "<div id=\"report-status\"", 1), encoding="utf-8")
    shown = render(page)
    assert shown.state == "errors"
    assert any("undefinedFunction" in e for e in shown.errors)
