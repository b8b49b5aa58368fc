"""A user task for fault injection: the digits task whose distillation misbehaves on cue.

A job names it as ``task: faulty_task:digits_with_faults`` with ``task_path`` this folder.
``SLIMSEARCH_TEST_FAULTS`` lists one action per candidate evaluation that reaches
distillation, in the order they start, across every process (the Ray workers included):

- ``kill``: the process SIGKILLs itself (a worker dying mid-candidate);
- ``raise``: the loss function raises;
- ``nan``: the loss becomes NaN at step 3;
- ``alloc``: the candidate asks for 4 GiB (untouched, so cheap when no limit forbids it);
- ``hang``: the candidate waits, after writing ``hanging`` (for killing the driver, or for a time
  limit to stop it), for 10 minutes, then goes on: a test whose stop fails fails, rather than hangs;
- ``ok``: nothing happens.

Evaluations past the end of the list run normally. Each evaluation claims the next
action by creating ``claim-<i>`` (exclusively) in the folder ``SLIMSEARCH_TEST_FAULT_DIR``,
and writes into it the action and its pid, so a test can read who did what.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

ACTIONS = ("kill", "raise", "nan", "alloc", "hang", "ok")
NAN_STEP = 3

_current: dict = {}  # the DistillPlan of the evaluation running in this process, its action and step


def claims(folder: Path) -> list[tuple[str, int]]:
    """(action, pid) of every evaluation that has claimed one, in order."""
    out = []
    for i in range(len(list(folder.glob("claim-*")))):
        action, pid = (folder / f"claim-{i}").read_text().split()
        out.append((action, int(pid)))
    return out


def _claim() -> str:
    actions = [a for a in os.environ.get("SLIMSEARCH_TEST_FAULTS", "").split(",") if a]
    folder = Path(os.environ["SLIMSEARCH_TEST_FAULT_DIR"])
    for i in range(len(actions) + 10_000):
        try:
            fd = os.open(folder / f"claim-{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        action = actions[i] if i < len(actions) else "ok"
        os.write(fd, f"{action} {os.getpid()}".encode())
        os.fsync(fd)
        os.close(fd)
        return action
    raise RuntimeError("no claim left")


def _faulty_loss(student_out, teacher_out, labels, plan, **kwargs):
    import torch

    from slimsearch.compress.distill import logit_distill_loss

    if _current.get("plan") is not plan:  # the first step of a new evaluation (plan: one object per candidate)
        _current.update(plan=plan, action=_claim(), step=0)
    _current["step"] += 1
    action = _current["action"]
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "raise":
        raise RuntimeError("injected fault: this candidate's loss function raised")
    if action == "alloc" and _current["step"] == 1:
        torch.empty(2**30, dtype=torch.float32)  # 4 GiB of address space
    if action == "hang":
        (Path(os.environ["SLIMSEARCH_TEST_FAULT_DIR"]) / "hanging").write_text(str(os.getpid()))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            time.sleep(1)
        _current["action"] = "ok"
    loss = logit_distill_loss(student_out, teacher_out, labels, plan)
    if action == "nan" and _current["step"] >= NAN_STEP:
        return loss * float("nan")
    return loss


def digits_with_faults(seed: int = 0):
    from slimsearch.tasks import load_task

    return dataclasses.replace(load_task("digits", seed=seed), distill_loss=_faulty_loss)
