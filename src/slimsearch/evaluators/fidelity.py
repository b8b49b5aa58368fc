"""Multi-fidelity: a causal-LM candidate is scored first on a share of the validation text and
promoted to the full evaluation only if it could still meet the job's perplexity bound.

The rule, as a job records it (:meth:`Screen.rule`): on the first ``share`` of the validation
windows, the candidate's perplexity over the teacher's on the same windows, less one, is its cheap
``ppl_increase``; a candidate whose cheap increase is above ``slack`` times the job's
``ppl_increase <= bound`` is not promoted. Its cheap figures (``ppl_screen``,
``ppl_increase_screen``, ``fidelity`` = ``share``) and its exact or modelled costs are recorded,
nothing is timed, and the search counts it as screened, not as one of its budget's evaluations.
A promoted candidate is evaluated in full (``fidelity`` 1.0), its cheap figures kept beside the
full ones.

Why a ratio on the same windows: perplexity varies from window to window far more than the
candidate's ratio to its teacher does, so a quarter of the text tells the ratio well enough to
reject what is far beyond the bound. Why a slack of 2: the bound is a hard constraint, and a
candidate rejected here is never seen again; only those far beyond it are left out.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from slimsearch.exceptions import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from slimsearch.tasks import Task

__all__ = ["FIDELITY", "Screen"]

FIDELITY = "fidelity"  # share of the validation text a candidate's recorded figures come from
SHARE = 0.25
SLACK = 2.0


@dataclass(frozen=True)
class Screen:
    """The promotion rule of one job: its ``ppl_increase <= max_increase`` and the screen's ``share`` and ``slack``."""

    max_increase: float
    share: float = SHARE
    slack: float = SLACK

    def __post_init__(self) -> None:
        for name, value, ok in (("max_increase", self.max_increase, self.max_increase >= 0),
                                ("share", self.share, 0 < self.share < 1), ("slack", self.slack, self.slack >= 1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
                raise ConfigError(f"screen {name}: {value!r} is not allowed; allowed: max_increase >= 0, "
                                  "0 < share < 1, slack >= 1")

    def rule(self) -> str:
        """The rule in words, as the job records it in MLflow."""
        return (f"scored first on {self.share:.0%} of the validation windows; promoted to the full text unless its "
                f"perplexity over the teacher's on those windows, less one, exceeds {self.slack:g} x "
                f"{self.max_increase:g} = {self.slack * self.max_increase:g}")

    def judge(self, model: "nn.Module", task: "Task") -> tuple[dict[str, float], Optional[str]]:
        """The cheap figures of ``model`` and why it is not promoted (None: promoted)."""
        from slimsearch.tasks import Split

        n = max(1, round(len(task.val.x) * self.share))
        part = Split(x=task.val.x[:n], y=task.val.y[:n])
        ppl = task.scorer(model, part, False)["ppl"]
        increase = ppl / _teacher_ppl(task, n) - 1
        figures = {"ppl_screen": ppl, "ppl_increase_screen": increase}
        bar = self.slack * self.max_increase
        if increase > bar:
            return ({**figures, FIDELITY: n / len(task.val.x)},
                    f"not promoted: ppl_increase {increase:.4f} on {n} of {len(task.val.x)} validation windows "
                    f"exceeds {self.slack:g} x {self.max_increase:g}")
        return figures, None


_TEACHER_PPL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # teacher -> {windows: perplexity}


def _teacher_ppl(task: "Task", n: int) -> float:
    """The teacher's perplexity on the first ``n`` validation windows (once per process and teacher)."""
    from slimsearch.tasks import Split

    known = _TEACHER_PPL.setdefault(task.teacher, {})
    if n not in known:
        known[n] = task.scorer(task.teacher, Split(x=task.val.x[:n], y=task.val.y[:n]), False)["ppl"]
    return known[n]
