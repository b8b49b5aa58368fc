"""What one candidate's evaluation may take: address space and wall-clock time.

Each limit wraps the evaluation in its worker (the memory limit in the job's evaluate, after
the task has loaded; the time limit in the driver's call of any evaluate, for both doors),
and turns its breach into an ordinary exception there, so the candidate is recorded as
failed with the reason and its worker goes on with the next one (neither is a Ray Tune
failure, so neither is retried).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Optional, TypeVar

from slimsearch.exceptions import ConfigError

T = TypeVar("T")

_OUT_OF_MEMORY = ("can't allocate memory", "cannot allocate memory", "bad_alloc", "can't start new thread",
                  "failed to allocate")


@contextlib.contextmanager
def memory_limit(mb: Optional[int]):
    """Let the code inside add at most ``mb`` MiB of address space to this process (None: no limit).

    Enforced with ``RLIMIT_AS`` set to the process's current size plus ``mb`` and put back
    afterwards, so an allocation beyond it fails at once inside the candidate (torch,
    numpy and Python all turn that into an error) instead of the kernel's OOM killer taking
    the worker. The limit counts address space, not resident memory: a generous figure
    (hundreds of MiB for a small model: thread stacks and allocator arenas count) is needed.
    Linux only (``/proc/self/statm``); the failure says which limit was exceeded.
    """
    if mb is None:
        yield
        return
    import resource

    try:
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        raise ConfigError("search.memory_limit_mb: enforced only on Linux (it reads /proc/self/statm); "
                          "allowed here: leave it out") from None
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = used + mb * 2**20
    for bound in (soft, hard):  # never loosen a limit already set
        if bound != resource.RLIM_INFINITY:
            limit = min(limit, bound)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    except Exception as exc:
        text = str(exc)
        if isinstance(exc, MemoryError) or any(s in text.lower() for s in _OUT_OF_MEMORY):
            brief = " ".join(text.split())[:200] or type(exc).__name__
            raise MemoryError(f"the candidate exceeded search.memory_limit_mb = {mb} MiB (address space beyond "
                              f"the {used // 2**20} MiB its worker held): {brief}") from exc
        raise
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class _TimeUp(BaseException):
    """Raised inside the evaluating thread when its time is up (a BaseException, so that a
    candidate's own ``except Exception`` cannot swallow it); :func:`within_time_limit` turns it
    into a TimeoutError."""


def within_time_limit(seconds: Optional[float], fn: Callable[[], T]) -> T:
    """``fn()``, stopped with a TimeoutError once it has run ``seconds`` of wall-clock time
    (None: no limit).

    Ray Tune has no hard limit per trial: its stoppers act only when a trial reports, and a
    candidate reports once, at its end (ray-project/ray#47475). A timer thread raises an
    exception in the evaluating thread instead (CPython's ``PyThreadState_SetAsyncExc``).
    Python delivers it at the next bytecode, so a candidate stuck inside one native call
    (a deadlocked C library) stops only when that call returns; a training loop stops
    within one step. As after Ctrl-C, code stopped midway may leave what it was writing
    half done; the candidate is recorded as failed, never on the front.

    A function, not a context manager: a context manager's exit runs Python code of its own
    (contextlib's) before the limit can be lifted, and an exception delivered there would
    escape the limit; here the call returns straight into the ``finally`` that lifts it.
    (``time_limit_s`` in the message: ``search.time_limit_s`` in a job, ``search(time_limit_s=)``.)
    """
    if seconds is None:
        return fn()
    import ctypes

    target = ctypes.c_ulong(threading.get_ident())
    lock = threading.Lock()
    state = {"inside": True, "fired": False}

    def fire() -> None:
        with lock:
            if state["inside"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(target, ctypes.py_object(_TimeUp))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    try:
        try:
            timer.start()
            return fn()
        finally:
            with lock:
                state["inside"] = False
            timer.cancel()
            if state["fired"]:  # raised but maybe not yet delivered: take it back
                ctypes.pythonapi.PyThreadState_SetAsyncExc(target, None)
    except _TimeUp as exc:  # with the stopped code's traceback: its last frame says where it hung
        raise TimeoutError(f"the candidate exceeded its time limit (time_limit_s = {seconds:g} s of wall-clock "
                           "time)").with_traceback(exc.__traceback__) from None
