"""Fixtures shared by the whole suite: an isolated teacher cache and job registry, Ctrl-C that reaches
the processes tests start, and the digits task."""

from __future__ import annotations

import os
import signal

import pytest


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_reaches_children():
    """Start every process the tests spawn with SIGINT at its default, as a terminal's foreground job.

    The suite may itself run with SIGINT ignored: started in the background by a non-interactive
    shell (``pytest ... &`` in a script) or a runner that does the same. An ignored signal stays
    ignored across ``exec``, and Python then never turns Ctrl-C into KeyboardInterrupt, so a
    ``slimsearch`` that a test stops with SIGINT (as a user's Ctrl-C) ignored it: the driver went on
    waiting for its hung candidate, ``slimsearch ui`` went on serving. A handler set here, even one
    that does nothing, is reset to the default by ``exec``; this process still ignores SIGINT, as it
    was started to.
    """
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, _ignore)
    yield
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _ignore(signum, frame) -> None:
    """SIGINT in the test process: ignored (see ``ctrl_c_reaches_children``)."""


@pytest.fixture(scope="session", autouse=True)
def teacher_cache(tmp_path_factory):
    """Point SLIMSEARCH_CACHE at a fresh folder, so no test reads or writes the user's cache.

    Set before any task is loaded and before Ray starts, so Ray workers inherit it.
    The digits teacher is trained once into it (a few seconds) and reused.
    """
    path = tmp_path_factory.mktemp("slimsearch-cache")
    before = os.environ.get("SLIMSEARCH_CACHE")
    os.environ["SLIMSEARCH_CACHE"] = str(path)
    yield path
    if before is None:
        os.environ.pop("SLIMSEARCH_CACHE", None)
    else:
        os.environ["SLIMSEARCH_CACHE"] = before


@pytest.fixture(scope="session", autouse=True)
def slimsearch_home(tmp_path_factory):
    """Point SLIMSEARCH_HOME at a fresh folder, so jobs run by tests register in a throwaway job
    registry, never in the user's ~/.slimsearch/registry.db."""
    path = tmp_path_factory.mktemp("slimsearch-home")
    before = {k: os.environ.get(k) for k in ("SLIMSEARCH_HOME", "SLIMSEARCH_REGISTRY")}
    os.environ["SLIMSEARCH_HOME"] = str(path)
    os.environ.pop("SLIMSEARCH_REGISTRY", None)
    yield path
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def digits_task(teacher_cache):
    """The built-in digits task (tiny CNN teacher on scikit-learn's 8x8 digits)."""
    from slimsearch.tasks import load_task

    return load_task("digits")


@pytest.fixture
def write_job(tmp_path):
    """Write a job mapping as YAML and return the file's path."""
    import yaml

    def write(data: dict, name: str = "job.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write
