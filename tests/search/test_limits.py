"""search/_limits.py's time limit: a candidate's evaluation stopped once its time is up, in any thread.

(The memory limit is tested through a real job in test_faults.py, as is the time limit on a
real Ray worker.)
"""

from __future__ import annotations

import threading
import time

import pytest

from slimsearch.search._limits import time_limit


def _spin(steps: list) -> None:
    """A training loop that swallows its own errors and would run for 20 s (so that a limit which
    does not work fails the test instead of hanging it)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            steps.append(sum(range(1000)))
            time.sleep(0.01)
        except Exception:  # noqa: BLE001 - as careless candidate code might
            pass


def test_a_loop_past_its_time_is_stopped_with_an_error_naming_the_setting():
    steps: list = []
    with pytest.raises(TimeoutError, match=r"exceeded search\.time_limit_s = 0\.2 s of wall-clock time"):
        with time_limit(0.2):
            _spin(steps)
    assert steps  # it ran, and was stopped from outside although it catches Exception


def test_code_done_in_time_returns_normally_and_nothing_fires_later():
    with time_limit(0.3):
        value = sum(range(10))
    time.sleep(0.6)  # past the limit: the cancelled timer must not raise into this thread now
    assert value == 45


def test_no_limit_lets_the_code_run():
    with time_limit(None):
        time.sleep(0.05)


def test_the_limit_stops_a_loop_in_a_worker_thread_and_leaves_the_thread_usable():
    # Ray Tune runs a trainable in a thread of its actor, not the main thread
    outcome = {}

    def worker():
        try:
            with time_limit(0.2):
                _spin([])
        except TimeoutError as exc:
            outcome["first"] = str(exc)
        with time_limit(5):
            outcome["second"] = sum(range(10))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert "search.time_limit_s = 0.2 s" in outcome["first"]
    assert outcome["second"] == 45
