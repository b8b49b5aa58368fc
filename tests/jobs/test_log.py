"""jobs/log.py: what a job records in MLflow as it runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from slimsearch.jobs.log import log_calibration
from slimsearch.search import OnlineCalibration


def test_a_refit_is_logged_as_series_on_the_job_run():
    logged = []
    tracker = SimpleNamespace(log_parent_series=lambda name, value, step: logged.append((name, value, step)))
    calibration = OnlineCalibration()
    for x in (1.0, 2.0, 3.0, 4.0, 5.0):
        calibration.add({"latency_ms@pi": x}, {"latency_ms@pi": 2.0 * x})
    log_calibration(tracker, calibration.fits[0], log=print)
    assert ("calibration.latency_ms@pi.factor", pytest.approx(2.0), 5) in logged
    assert ("calibration.latency_ms@pi.held_out_mdape", pytest.approx(0.5), 5) in logged
