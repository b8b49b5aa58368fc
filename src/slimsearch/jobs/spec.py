"""JobSpec: a validated job file (task, space, objectives, profiles, search, storage)."""

from __future__ import annotations

import os
import re
import threading
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slimsearch.exceptions import ConfigError
from slimsearch.search.samplers import Sampler
from slimsearch.spaces.schema import SpaceSpec  # noqa: F401 - LayerChoices: part of the schema
from slimsearch.metric_names import (BASE_METRICS, DECODER_METRICS, DECODER_PROFILE_METRICS, LOCAL_ENERGY_METRIC,
                                     LOCAL_PROFILE, PROFILE_METRICS, TaskFamily, local_latency_metrics)


class Direction(str, Enum):
    MAX = "max"
    MIN = "min"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_profile(name: str) -> str:
    from slimsearch.hardware_profiles import list_profiles

    known = list_profiles()
    if name not in known:
        raise ValueError(f"unknown profile {name!r}; allowed: {known} or a profile file (.yaml, .yml, .json)")
    return name


def looks_like_file(text: str) -> bool:
    return text.endswith((".yaml", ".yml", ".json")) or "/" in text or os.sep in text


def _profile_file(path: str) -> str:
    """The name of the profile in file ``path`` (written by ``slimsearch hw profile`` or ``hw calibrate``)."""
    from slimsearch.hardware_profiles import load_profile

    try:
        name = load_profile(path).name
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if name == LOCAL_PROFILE:
        raise ValueError(f"profile file {path!r} is named {LOCAL_PROFILE!r}, which is reserved for the figures "
                         "measured on this machine (latency_ms@local); rename the profile in the file")
    return name


class ProfileTarget(_Frozen):
    """A target device: a profile name and, optionally, the power modes to search on it.

    In a job file either a bare name (``raspberry-pi-4``, modelled at its default
    mode) or ``{name: jetson-orin-nano, power_modes: [7W, 15W]}``. A profile file (one
    that ``slimsearch hw profile`` or ``hw calibrate`` wrote) is named by its path,
    bare or as ``{file: ..., power_modes: [...]}``; its metrics carry the profile's own
    name (``latency_ms@<name>``). Relative paths are relative to the job file.
    """

    file: Optional[str] = None  # a profile file (absolute once read by load_job); validated before ``name``
    name: str
    power_modes: Optional[list[str]] = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        if isinstance(data, str):  # a bare name or file: its error's path is the list entry itself
            return {"name": _profile_file(data), "file": data} if looks_like_file(data) else {"name": _known_profile(data)}
        if not isinstance(data, (dict, ProfileTarget)):
            raise ValueError("a profile is a name, a profile file, or {name: ..., power_modes: [...]} "
                             "({file: ..., power_modes: [...]} for a file)")
        if isinstance(data, dict) and data.get("file") is not None:
            name = _profile_file(str(data["file"]))
            if data.get("name", name) != name:
                raise ValueError(f"profile file {data['file']!r} holds profile {name!r}, not {data['name']!r}")
            data = {**data, "name": name}
        return data

    @field_validator("name")
    @classmethod
    def _shipped_unless_file(cls, v: str, info) -> str:
        return v if info.data.get("file") is not None else _known_profile(v)

    @property
    def ref(self) -> str:
        """What :func:`~slimsearch.hardware_profiles.load_profile` loads it from: the file, else the name."""
        return self.file or self.name

    @field_validator("power_modes", mode="before")
    @classmethod
    def _power_modes(cls, v: Any, info) -> Optional[list[str]]:
        if v is None or "name" not in info.data:  # an unknown name has been reported already
            return v
        from slimsearch.hardware_profiles import load_profile

        name = info.data["name"]
        allowed = [mode.name for mode in load_profile(info.data.get("file") or name).power_modes]
        modes = _as_list(v)
        if not modes:
            raise ValueError(f"power_modes of {name!r} needs at least one mode; allowed: {allowed}")
        for mode in modes:
            if mode not in allowed:
                raise ValueError(f"{name!r} has no power mode {mode!r}; allowed: {allowed}")
        return list(dict.fromkeys(modes))


# Bounds of the search settings, set by what consumes them (the value beyond each fails only once the job runs).
MAX_INT32 = 2**31 - 1  # budget: an INTEGER column on PostgreSQL (the job registry's budget, Optuna's trial
# numbers); seed: numpy takes [0, 2**32 - 1], and a resumed or shared study's sampler is seeded with
# seed + the number of its first trial
MAX_THREADS = 8192  # torch threads: the most CPUs one Linux machine can have (NR_CPUS); far beyond a
# machine's cores, starting the threads fails or crashes the worker
MAX_RAY_CPUS = 10**14  # workers x threads_per_worker CPUs are asked of Ray, whose largest resource quantity is this
MAX_MEMORY_MB = 2**42  # RLIMIT_AS is set to the worker's size plus this, which must fit in a C long
MAX_TIME_LIMIT_S = threading.TIMEOUT_MAX  # the longest wait a timer thread takes
MAX_GPUS_PER_WORKER = 64  # Ray's GPU request of one trial; beyond one machine's GPUs no trial would ever start


class SearchSpec(_Frozen):
    budget: int = Field(24, ge=1, le=MAX_INT32, description="trained candidates")
    workers: Optional[int] = Field(None, ge=1, le=MAX_RAY_CPUS, description="concurrent candidates (default: one "
                                   "per core, or one per GPU share where candidates run on GPUs)")
    threads_per_worker: Optional[int] = Field(None, ge=1, le=MAX_THREADS, description="torch threads of each worker "
                                              "(default: the machine's cores shared out among the workers, at least 1)")
    sampler: Sampler = Sampler.NSGA2
    seed: int = Field(0, ge=0, le=MAX_INT32)
    max_retries: int = Field(1, ge=0, le=10, description="times a candidate whose Ray worker died is run "
                             "again before it is recorded as failed (a candidate that raises is not retried)")
    memory_limit_mb: Optional[int] = Field(None, ge=64, le=MAX_MEMORY_MB, description="address space one "
                                           "candidate's evaluation may add to its worker, in MiB; above it the "
                                           "candidate fails")
    time_limit_s: Optional[float] = Field(None, gt=0, le=MAX_TIME_LIMIT_S, allow_inf_nan=False,
                                          description="wall-clock seconds one candidate's evaluation may take; "
                                          "beyond it the candidate fails and its worker goes on")
    early_stopping: bool = Field(True, description="stop fine-tuning a candidate that cannot plausibly reach the "
                                 "front or meet the constraints (checked at 1/4, 1/2 and 3/4 of its steps)")
    multi_fidelity: bool = Field(True, description="causal-lm jobs with a ppl_increase <= bound: score each "
                                 "candidate first on a quarter of the validation text and evaluate in full only "
                                 "those within twice the bound whose cheap figures rank among the best 40% judged "
                                 "so far (evaluators/fidelity.py); the others are recorded as screened and take "
                                 "no place of the budget")
    planner: bool = Field(True, description="causal-lm jobs with the auto sampler: measure what each choice costs "
                          "each linear group on a few calibration windows (cached in the job folder), run first the "
                          "plans an integer program predicts on the front within the ppl_increase bound, and let "
                          "auto rank unseen plans by the perplexity it predicts (jobs/warm_start.py)")
    baselines: bool = Field(True, description="causal-lm jobs: evaluate the uniform recipes (RTN, GPTQ and AWQ "
                            "at 4 bits, 8-bit weights, W8A8 SmoothQuant) once after the search, as reference runs "
                            "tagged baseline; other tasks have none")
    # finite: the job reaches its workers as JSON, where inf and nan become null
    early_stopping_margin: float = Field(0.01, ge=0, allow_inf_nan=False, description="added to the best metric "
                                         "a candidate could plausibly still reach before it is judged hopeless "
                                         "(metric units)")

    device: str = Field("auto", description="where candidates are fine-tuned, calibrated and scored: 'auto' (CUDA "
                        "when present), 'cpu', 'cuda' or 'cuda:N'; sizes, costs and timings are taken on the CPU")
    gpus_per_worker: Optional[float] = Field(None, ge=0, le=MAX_GPUS_PER_WORKER, allow_inf_nan=False,
                                             description="GPUs one Ray trial asks for; a fraction lets several "
                                             "candidates share one (default: 1 where candidates run on a GPU, else 0)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        from slimsearch._device import parse_device

        try:
            parse_device(v)
        except ConfigError:
            from slimsearch._device import DEVICE_ALLOWED

            raise ValueError(f"not a device; allowed: {DEVICE_ALLOWED}") from None
        return v

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpu_share(cls, v: Optional[float], info) -> Optional[float]:
        if v is None:
            return v
        if v > 1 and v != int(v):  # Ray: a share of one GPU, or whole GPUs
            raise ValueError("a share above 1 GPU must be a whole number of GPUs; allowed: a fraction in (0, 1] "
                             "or a whole number")
        if v > 0 and info.data.get("device") == "cpu":
            raise ValueError("device 'cpu' uses no GPU; allowed: 0, or leave it out (or set search.device to "
                             "'auto' or 'cuda')")
        return v

    @field_validator("threads_per_worker")
    @classmethod
    def _ray_cpus(cls, v: Optional[int], info) -> Optional[int]:
        workers = info.data.get("workers")
        if v is not None and workers is not None and workers * v > MAX_RAY_CPUS:
            raise ValueError(f"workers x threads_per_worker = {workers} x {v} CPUs; allowed: at most 10**14 "
                             "CPUs in all (Ray's largest resource quantity)")
        return v


# The objectives of a job file that names none, by the family of its task.
DEFAULT_OBJECTIVES = {
    TaskFamily.CLASSIFICATION: {"accuracy": "max", "latency_ms_b64@local": "min", "size_bytes": "min"},
    TaskFamily.CAUSAL_LM: {"ppl": "min", "decode_tok_s@local": "max", "memory_bytes": "min"},
}
CORPORA = ("wikipedia", "lee")  # the built-in text of causal-lm tasks (slimsearch.tasks.causal_lm.Corpus)


class JobSpec(_Frozen):
    """A whole job file."""

    name: str
    task: str
    space: SpaceSpec = SpaceSpec()
    objectives: dict[str, Direction] = {name: Direction(d) for name, d in
                                        DEFAULT_OBJECTIVES[TaskFamily.CLASSIFICATION].items()}
    constraints: list[str] = Field([], description="e.g. 'accuracy_drop <= 0.01', 'ppl_increase <= 0.05' or "
                                   "'latency_ms@jetson-orin-nano <= 5'; "
                                   "a candidate that breaks one never enters the front")
    profiles: list[ProfileTarget] = [ProfileTarget(name="raspberry-pi-4")]
    search: SearchSpec = SearchSpec()
    task_path: Optional[str] = Field(None, description="folder a package.module:function task is imported from "
                                     "first; default: the job file's folder")
    text: Optional[Union[str, list[str]]] = Field(None, description="the text a causal-lm task is calibrated, "
                                                  "validated and tested on: 'wikipedia' (default), 'lee', or "
                                                  "text files (split by paragraph)")
    storage: Optional[str] = Field(None, description="Optuna storage URL; default sqlite in the job folder")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI; default sqlite in the job folder")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # It names the job folder (runs/<name>) and the study: no path separators, no '..'.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v):
            raise ValueError("allowed: 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        return v

    @model_validator(mode="before")
    @classmethod
    def _family_objectives(cls, data: Any) -> Any:
        """A job file without objectives gets its task family's defaults."""
        if isinstance(data, dict) and "objectives" not in data and isinstance(data.get("task"), str):
            from slimsearch.tasks._registry import task_family

            family = task_family(data["task"])
            if family is not None and family is not TaskFamily.CLASSIFICATION:
                data = {**data, "objectives": dict(DEFAULT_OBJECTIVES[family])}
        return data

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        from slimsearch.tasks._registry import BUILTIN_TASKS, CAUSAL_LM_PREFIX, is_causal_lm

        if is_causal_lm(v):
            if not v[len(CAUSAL_LM_PREFIX):].strip():
                raise ValueError(f"{v!r} names no model; allowed: '{CAUSAL_LM_PREFIX}<Hugging Face folder or "
                                 ".gguf file>'")
            return v
        if v not in BUILTIN_TASKS and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError(f"unknown task {v!r}; allowed: one of {list(BUILTIN_TASKS)}, "
                             f"'{CAUSAL_LM_PREFIX}<folder or .gguf file>' or 'package.module:function'")
        return v

    @field_validator("text")
    @classmethod
    def _text(cls, v: Optional[Union[str, list[str]]], info) -> Optional[Union[str, list[str]]]:
        from slimsearch.tasks._registry import task_family

        if v is None:
            return v
        task = info.data.get("task")
        if task is not None and task_family(task) is not TaskFamily.CAUSAL_LM:
            raise ValueError(f"task {task!r} reads no text; allowed: text only with a causal-lm task (smollm2 "
                             "or 'causal-lm:<path>'), or leave it out")
        files = [v] if isinstance(v, str) and v not in CORPORA else v if isinstance(v, list) else []
        if isinstance(v, list) and not v:
            raise ValueError(f"an empty list; allowed: {list(CORPORA)} or text files")
        for f in files:
            if not Path(f).is_file():
                raise ValueError(f"{f}: no such file; allowed: {list(CORPORA)} or text files (relative to the job file)")
        return v

    @property
    def task_text(self) -> Union[str, tuple[str, ...], None]:
        """``text`` as the task loader takes it (a list becomes a tuple, so that it can key a cache)."""
        return tuple(self.text) if isinstance(self.text, list) else self.text

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, v: list[ProfileTarget]) -> list[ProfileTarget]:
        names = [p.name for p in v]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"profile {name!r} is named twice; name each profile once "
                                 "(list its power modes in one entry)")
        return v

    @property
    def profile_names(self) -> list[str]:
        """The target profiles' names, in job-file order."""
        return [p.name for p in self.profiles]

    @property
    def profile_refs(self) -> list[str]:
        """What each target profile is loaded from (its file, else its name), in job-file order."""
        return [p.ref for p in self.profiles]

    def power_mode_choices(self) -> dict[str, tuple[str, ...]]:
        """``profile -> power modes`` for the profiles whose modes the job lists.

        Two or more modes are searched, one is fixed; a profile not in the result is
        modelled at its default mode.
        """
        return {p.name: tuple(p.power_modes) for p in self.profiles if p.power_modes is not None}

    def teacher_power_modes(self) -> dict[str, str]:
        """The mode each listed profile's teacher figures are modelled at: the profile's default
        when the job lists it, else the first mode listed."""
        from slimsearch.hardware_profiles import load_profile

        out = {}
        refs = dict(zip(self.profile_names, self.profile_refs))
        for name, modes in self.power_mode_choices().items():
            default = load_profile(refs[name]).default_power_mode.name
            out[name] = default if default in modes else modes[0]
        return out

    @model_validator(mode="after")
    def _objectives(self) -> "JobSpec":
        if not self.objectives:
            raise ValueError("objectives: at least one objective is needed")
        from slimsearch.tasks._registry import task_family, task_metrics

        allowed = self.metric_names()
        user_task = task_metrics(self.task) is None
        family, own = task_family(self.task), (task_metrics(self.task) or ("",))[0]
        for metric, direction in self.objectives.items():
            if metric not in allowed and not (user_task and "@" not in metric):
                raise ValueError(f"objectives: unknown metric {metric!r}; allowed: {allowed}")
            if family is not None and metric in (own, family.gap_name(own)):
                better = family.direction if metric == own else "min"
                if direction.value != better:
                    raise ValueError(f"objectives.{metric}: {metric} is better {'higher' if better == 'max' else 'lower'}"
                                     f" for task {self.task!r}; allowed: {better}")
        from slimsearch.search._types import Constraint

        parsed = []
        for i, text in enumerate(self.constraints):
            try:
                parsed.append(Constraint.parse(text))
            except ConfigError as exc:
                raise ValueError(f"constraints.{i}: {exc}") from None
            metric = parsed[-1].metric
            if metric not in allowed and not (user_task and "@" not in metric):
                raise ValueError(f"constraints.{i}: {text!r}: unknown metric {metric!r}; allowed: {allowed}")
        _check_satisfiable(parsed)
        return self

    def metric_names(self) -> list[str]:
        """Every metric a candidate of this job has: the task's own, then sizes and costs.

        A user task's metrics are known only once it is loaded; ``run_job`` checks them.
        """
        from slimsearch.tasks._registry import task_family, task_latency_batch, task_metrics

        own = task_metrics(self.task) or ("accuracy",)
        family = task_family(self.task) or TaskFamily.CLASSIFICATION
        batch = task_latency_batch(self.task)
        names = [*own, family.gap_name(own[0]), *BASE_METRICS, *local_latency_metrics(batch)[1:]]
        names.append(LOCAL_ENERGY_METRIC)
        names += [f"{m}@{p}" for p in self.profile_names for m in PROFILE_METRICS]
        if family is TaskFamily.CAUSAL_LM:
            names += [*DECODER_METRICS, *(f"{m}@{p}" for p in self.profile_names for m in DECODER_PROFILE_METRICS)]
        return names

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        return cls.model_validate_json(text)


def _check_satisfiable(constraints: list) -> None:
    """Refuse constraints that no value can meet together (``size_bytes <= 1000`` and
    ``size_bytes >= 2000``): such a job would train its whole budget for an empty front."""
    lower: dict[str, tuple[float, bool, int]] = {}  # metric -> (bound, strict, index)
    upper: dict[str, tuple[float, bool, int]] = {}
    for i, c in enumerate(constraints):
        bounds, tighter = (lower, max) if c.op in (">=", ">") else (upper, min)
        new = (c.limit, c.op in (">", "<"), i)
        old = bounds.get(c.metric)
        if old is None or tighter(new[0], old[0]) != old[0] or (new[0] == old[0] and new[1]):
            bounds[c.metric] = new
        lo, hi = lower.get(c.metric), upper.get(c.metric)
        if lo and hi and (lo[0] > hi[0] or (lo[0] == hi[0] and (lo[1] or hi[1]))):
            first, second = sorted((lo[2], hi[2]))
            raise ValueError(f"constraints.{second}: {str(constraints[second])!r} contradicts constraints.{first} "
                             f"{str(constraints[first])!r}: no value of {c.metric} meets both; allowed: "
                             "constraints that leave some value of each metric")


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]
