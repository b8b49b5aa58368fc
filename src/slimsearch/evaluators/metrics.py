"""Metrics: what one evaluated candidate scored, each cost figure tagged measured or modelled."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping, Optional

from slimsearch.metric_names import PROFILE_METRICS


class Provenance(str, Enum):
    """Where a latency, energy or cost figure comes from (DESIGN.md, "Honesty rules")."""

    MEASURED = "measured"
    MODELLED = "modelled"


@dataclass(frozen=True)
class Metrics:
    """Metric values by name (``accuracy``, ``size_bytes``, ``latency_ms@raspberry-pi-4``, ...).

    ``provenance`` says, for every latency, energy and cost metric, whether it was
    timed on the device (measured) or predicted from its profile (modelled). It travels
    with the values (the driver stores it with the trial), because the name alone cannot
    say: ``latency_ms@raspberry-pi-4`` is measured when a Ray node carrying
    ``device:raspberry-pi-4`` timed it, modelled otherwise.
    A value of ``None`` means the metric does not exist for that device (no price).
    ``screened``, when set, says why the candidate was scored only cheaply and not promoted to
    the full evaluation (its ``values`` are the cheap ones): a multi-fidelity screen.
    """

    values: Mapping[str, Optional[float]]
    provenance: Mapping[str, Provenance] = field(default_factory=dict)
    screened: Optional[str] = None

    def __getitem__(self, name: str) -> Optional[float]:
        return self.values[name]

    def to_dict(self) -> dict:
        out = {"values": dict(self.values), "provenance": {k: v.value for k, v in self.provenance.items()}}
        if self.screened is not None:
            out["screened"] = self.screened
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping) -> "Metrics":
        return cls(
            values=dict(data["values"]),
            provenance={k: Provenance(v) for k, v in data.get("provenance", {}).items()},
            screened=data.get("screened"),
        )

    @classmethod
    def from_json(cls, text: str) -> "Metrics":
        return cls.from_dict(json.loads(text))


COST_METRICS = PROFILE_METRICS  # and latency_ms_b<N> (batch N), latency_ms_raw[_b<N>] (metric_names.paired_latency_extras)
_BATCH_LATENCY = re.compile(r"latency_ms(?:_raw)?(?:_b\d+)?")


def provenance_of(name: str, local_profile: str = "local") -> Optional[Provenance]:
    """Whether metric ``name`` is measured or modelled *when nothing recorded it*; ``None`` for
    non-cost metrics.

    The default for figures that carry no recorded provenance (trials of jobs from before
    provenance was stored, ``search()`` objectives): ``@local`` figures are timed here,
    every other device's come from its profile. A device node of a Ray cluster measures
    its own figures, and :class:`Metrics` then says so (see :func:`provenance_map`).
    """
    base, _, profile = name.partition("@")
    if not profile or (base not in COST_METRICS and not _BATCH_LATENCY.fullmatch(base)):
        return None
    return Provenance.MEASURED if profile == local_profile else Provenance.MODELLED


def provenance_map(names, recorded: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """``name -> "measured"|"modelled"`` for every cost metric among ``names``.

    ``recorded`` is the provenance that travelled with the values (:attr:`Metrics.provenance`,
    stored with the trial): it wins. A cost metric it does not cover falls back to
    :func:`provenance_of`; a recorded label that is neither value is refused, not guessed.
    """
    recorded = recorded or {}
    out = {}
    for name in names:
        if name in recorded:
            out[name] = Provenance(getattr(recorded[name], "value", recorded[name])).value
        elif (p := provenance_of(name)) is not None:
            out[name] = p.value
    return out


def absent_reasons(values: Mapping[str, Optional[float]]) -> dict[str, str]:
    """Why each cost metric whose value is ``None`` has none, by metric name.

    A missing figure is recorded as missing, with its reason, never as NaN or 0: MLflow
    gets a tag ``absent.<metric>`` in its place.
    """
    out = {}
    for name, value in values.items():
        base, _, profile = name.partition("@")
        if value is not None or provenance_of(name) is None:
            continue
        if values.get(f"latency_ms@{profile}") is None:
            out[name] = f"the model does not run on {profile} as it is (a layer is wider than every kernel)"
        elif base == "cost_usd_per_1m":
            out[name] = f"{profile} has no price per hour in its profile (not rented): no cost is modelled"
        else:
            out[name] = "no value"
    return out
