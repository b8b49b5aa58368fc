"""The checks a profile file's fields pass: numbers, enums, op@precision keys, key sets."""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Self

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles._enums import OpType, Precision

SCHEMA_VERSION = 1
"""Version of the profile file format this code reads and writes."""

MAX_EFFICIENCY = 8.0
"""Largest efficiency a profile may carry. Above 1 only from calibration: the device ran
that op type faster than ``peak_gops`` (see :class:`HardwareProfile`); 8 bounds what a
fit may claim."""

_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_PATTERN_RE = re.compile(r"^([1-9][0-9]*):([1-9][0-9]*)$")


class _FieldError(ConfigError):
    """A profile field is not allowed; carries the field path so loaders can name the file."""

    def __init__(self, path: str, message: str, where: str = "hardware profile") -> None:
        self.path = path
        self.message = message
        super().__init__(f"{where}: {path}: {message}")


def parse_sparsity_pattern(pattern: str) -> tuple[int, int]:
    """Split an ``"N:M"`` pattern (at most N nonzero weights in every M) into ``(N, M)``.

    Raises:
        ConfigError: ``pattern`` is not of the form ``"N:M"`` with ``0 < N < M``.
    """
    match = _PATTERN_RE.match(pattern) if isinstance(pattern, str) else None
    if match is None or int(match.group(1)) >= int(match.group(2)):
        raise ConfigError(
            f"sparsity pattern must be a string 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}"
        )
    return int(match.group(1)), int(match.group(2))


def _check_number(
    path: str, value: Any, *, low: float, low_inclusive: bool = True, high: float | None = None
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _FieldError(path, f"must be a finite number, got {value!r}")
    too_low = value < low if low_inclusive else value <= low
    if too_low or (high is not None and value > high):
        lower = f">= {low:g}" if low_inclusive else f"> {low:g}"
        allowed = f"a number {lower}" + (f" and <= {high:g}" if high is not None else "")
        raise _FieldError(path, f"must be {allowed}, got {value!r}")
    return float(value)


def _coerce_enum(path: str, value: Any, enum: type) -> Any:
    try:
        return enum(value)
    except ValueError:
        allowed = [member.value for member in enum]
        raise _FieldError(path, f"{value!r} is not allowed; must be one of {allowed}") from None


def _enum_mapping(path: str, value: Any, enum: type, *, low: float, low_inclusive: bool = True,
                  high: float | None = None) -> dict:
    if not isinstance(value, Mapping):
        raise _FieldError(path, f"must be a mapping, got {type(value).__name__}")
    out = {}
    for key, number in value.items():
        member = _coerce_enum(f"{path}.{key}", key, enum)
        out[member] = _check_number(
            f"{path}.{member.value}", number, low=low, low_inclusive=low_inclusive, high=high
        )
    order = list(enum)
    return dict(sorted(out.items(), key=lambda item: order.index(item[0])))


class OpAtPrecision(str):
    """An op type at one precision, written ``"conv@int8"``: a key of the per-op tables.

    A str (so it is a plain key in JSON, YAML and ``sources`` paths) that also carries
    :attr:`op` and :attr:`precision`; ``value`` is the text, as for the enums.
    """

    op: OpType
    precision: Precision

    def __new__(cls, op: OpType | str, precision: Precision | str) -> Self:
        op, precision = OpType(op), Precision(precision)
        obj = super().__new__(cls, f"{op.value}@{precision.value}")
        obj.op, obj.precision = op, precision
        return obj

    @property
    def value(self) -> str:
        """The key as text (``"conv@int8"``)."""
        return str(self)

    def __reduce__(self):
        return OpAtPrecision, (self.op, self.precision)


OpKey = OpType | OpAtPrecision
"""A key of a per-op table: an op type, or an op type at one precision."""


def _op_key(path: str, key: Any) -> OpKey:
    if isinstance(key, str) and "@" in key:
        op, _, precision = key.partition("@")
        op_allowed, precision_allowed = [o.value for o in OpType], [p.value for p in Precision]
        if op not in op_allowed or precision not in precision_allowed:
            raise _FieldError(path, f"{key!r} is not allowed; keys are an op type {op_allowed} or "
                              f"'<op type>@<precision>' with a precision in {precision_allowed}")
        return OpAtPrecision(op, precision)
    return _coerce_enum(path, key, OpType)


def _op_mapping(path: str, value: Any, *, low: float, low_inclusive: bool = True,
                high: float | None = None) -> dict:
    """A per-op table: keys are op types or ``op@precision``, ordered op first, then precision."""
    if not isinstance(value, Mapping):
        raise _FieldError(path, f"must be a mapping, got {type(value).__name__}")
    out = {}
    for key, number in value.items():
        member = _op_key(f"{path}.{key}", key)
        out[member] = _check_number(f"{path}.{member.value}", number, low=low, low_inclusive=low_inclusive,
                                    high=high)
    ops, precisions = list(OpType), list(Precision.ascending())

    def order(key: OpKey) -> tuple[int, int]:
        if isinstance(key, OpAtPrecision):
            return ops.index(key.op), 1 + precisions.index(key.precision)
        return ops.index(key), 0

    return dict(sorted(out.items(), key=lambda item: order(item[0])))


def _check_keys(path: str, data: Any, *, required: Sequence[str], optional: Sequence[str] = ()) -> None:
    if not isinstance(data, Mapping):
        raise _FieldError(path or "(top level)", f"must be a mapping, got {type(data).__name__}")
    allowed = [*required, *optional]
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"{path}.{key}" if path else str(key)
            raise _FieldError(where, f"unknown key{hint}; allowed keys are {allowed}")
    missing = [key for key in required if key not in data]
    if missing:
        raise _FieldError(path or "(top level)", f"missing required key(s) {missing}")


def _parse_text(text: str, *, origin: str, suffix: str) -> Any:
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{origin}: not valid JSON: {exc}") from None
    from slimsearch._io import safe_load

    return safe_load(text, origin)
