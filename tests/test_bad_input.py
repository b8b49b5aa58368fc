"""The bad-input catalogue: one row per malformed job file or command line.

Every row runs the real ``slimsearch`` entry point (``slimsearch.cli.main``; a subprocess
where a fresh process matters: the per-process task cache, or a process without root's
right to write anywhere) and checks what a user sees:

- exit code 2 and exactly one line on stderr, naming the file (or flag), the field and
  what is allowed (the fragments of each row);
- nothing half-written: a new ``--out`` folder does not exist afterwards, the folder of an
  earlier finished job is byte-for-byte unchanged, and the job registry is unchanged.

docs/reliability.md lists the rows with the message each printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional, Union

import pytest
import yaml

from tests._cli import cli

SRC = Path(__file__).resolve().parents[1] / "src" / "slimsearch"
RUN = ("--executor", "local", "--no-progress")
BASE = {
    "name": "bad-input",
    "task": "digits",
    "space": {"prune_ratio": [0.0, 0.5], "weight_bits": [8, 32], "act_bits": [8, 32], "distill_steps": [0]},
    "profiles": ["raspberry-pi-4"],
    "search": {"budget": 2, "workers": 1},
}
DELETE = object()


def cli_process(*args: str, env: Optional[dict] = None, drop_root: bool = False) -> SimpleNamespace:
    """``python -m slimsearch.cli ...`` in a fresh process (inheriting SLIMSEARCH_HOME and _CACHE).

    With ``drop_root`` and when running as root, the process loses CAP_DAC_OVERRIDE (setpriv),
    so file permissions bind it as they bind any other user.
    """
    cmd = [sys.executable, "-m", "slimsearch.cli", *args]
    if drop_root and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a folder read-only to this process")
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    return SimpleNamespace(code=done.returncode, stdout=done.stdout, stderr=done.stderr)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def registry_rows() -> list[dict]:
    from slimsearch.storage.registry import Registry

    return [r.to_dict() for r in Registry().jobs()]


def patched(patch: dict) -> dict:
    """BASE with dotted keys set (``DELETE`` removes one)."""
    data = json.loads(json.dumps(BASE))
    for dotted, value in patch.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return data


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher_cache, slimsearch_home):
    """One finished tiny digits job (budget 2), shared by the rows that need an existing job."""
    folder = tmp_path_factory.mktemp("finished")
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(patched({"name": "bad-input-finished"}), sort_keys=False))
    out = folder / "out"
    result = cli("run", str(path), "--out", str(out), *RUN)
    assert result.code == 0, result.stderr
    return SimpleNamespace(job=path, out=out.resolve(), cache=Path(teacher_cache))


@dataclass
class Ctx:
    """What a row's builder may use: its own folder, the shared finished job, and helpers."""

    tmp: Path
    finished: SimpleNamespace
    job: Path = field(init=False)  # the row's job file (written by write())
    out: Path = field(init=False)  # a fresh --out that must not exist afterwards

    def __post_init__(self):
        self.job = self.tmp / "job.yaml"
        self.out = self.tmp / "out"

    def write(self, content: Union[dict, str, bytes], name: str = "job.yaml") -> Path:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(yaml.safe_dump(content, sort_keys=False))
        return path

    def run(self, *extra: str) -> list[str]:
        return ["run", str(self.job), "--out", str(self.out), *RUN, *extra]


@dataclass(frozen=True)
class Row:
    """argv (or a subprocess), the fragments the one stderr line must hold, and what it must not."""

    argv: list[str]
    must: list[str]
    forbid: tuple[str, ...] = ()
    env: Optional[dict] = None  # run in a subprocess with these extra variables
    drop_root: bool = False
    after: Optional[Callable[[], None]] = None  # further checks once it ran
    keeps_out: bool = False  # the row made the fresh --out itself (``after`` checks it is unchanged)


# ---------------------------------------------------------------------------------------------
# Table 1: a job file (BASE patched, or raw text) run with `slimsearch run JOB --out NEW`.
# Fragments: besides these, the line must name the job file. "{tmp}" is the row's folder.
# ---------------------------------------------------------------------------------------------
USER_MODULES = {
    "ssbi_broken_import.py": "import ssbi_dependency_that_is_not_installed\n\ndef make(seed):\n    return None\n",
    "ssbi_tasks.py": "def make(seed):\n    raise RuntimeError('teacher.pt\\nnot found')\n\n"
                     "def make_dict(seed):\n    return {'teacher': None}\n",
}

JOB_FILE_ROWS: list[tuple[str, Any, list[str]]] = [
    ("unknown-task", {"task": "digitz"},
     ["task: unknown task 'digitz'", "allowed: one of ['mnist', 'mnist-resnet', 'digits', 'minilm', 'smollm2'], "
      "'causal-lm:<folder or .gguf file>' or 'package.module:function'"]),
    ("causal-lm-model-missing", {"task": "causal-lm:nowhere"},
     ["task: {tmp}/nowhere: no such file or folder", "allowed: a Hugging Face causal-LM folder"]),
    ("text-for-a-classification-task", {"text": "wikipedia"},
     ["text: task 'digits' reads no text", "allowed: text only with a causal-lm task"]),
    ("perplexity-maximised", {"task": "smollm2", "space": {}, "objectives": {"ppl": "max"}},
     ["objectives.ppl: ppl is better lower for task 'smollm2'", "allowed: min"]),
    ("unknown-profile", {"profiles": ["raspbery-pi-4"]},
     ["profiles.0: unknown profile 'raspbery-pi-4'", "allowed: [", "'raspberry-pi-4'"]),
    ("unknown-sampler", {"search.sampler": "cmaes"},
     ["search.sampler:", "'nsga2', 'tpe', 'random', 'gp' or 'auto'", "(got 'cmaes')"]),
    ("weight-bits-out-of-range", {"space.weight_bits": [8, 12]},
     ["space.weight_bits: weight_bits choice 12 is not allowed", "allowed: [2, 3, 4, 5, 6, 7, 8, 16, 32]"]),
    ("act-bits-out-of-range", {"space.act_bits": [3]},
     ["space.act_bits: act_bits choice 3 is not allowed", "allowed: ["]),
    ("prune-ratio-out-of-range", {"space.prune_ratio": [0.0, 1.5]},
     ["space.prune_ratio: prune_ratio choice 1.5 is not allowed", "allowed: numbers with 0 <= ratio < 1"]),
    ("layer-prune-ratio-negative", {"space.layers": {"conv1": {"prune_ratio": [-0.1]}}},
     ["space.layers.conv1.prune_ratio: prune_ratio choice -0.1 is not allowed", "0 <= ratio < 1"]),
    ("empty-space", {"space.weight_bits": []},
     ["space.weight_bits: weight_bits needs at least one choice", "allowed: [2, 3"]),
    ("sparsity-pattern-unquoted", "name: x\ntask: digits\nspace:\n  sparsity_pattern: [2:4]\n",
     ["space.sparsity_pattern: sparsity_pattern choice 124 is not allowed", "quote '2:4'"]),
    ("unknown-metric-in-objective", {"objectives": {"accuracy": "max", "latency": "min"}},
     ["objectives: unknown metric 'latency'", "allowed: [", "'latency_ms@local'"]),
    ("objective-direction", {"objectives": {"accuracy": "up"}},
     ["objectives.accuracy:", "'max' or 'min'", "(got 'up')"]),
    ("no-objectives", {"objectives": {}}, ["objectives: at least one objective is needed"]),
    ("unknown-metric-in-constraint", {"constraints": ["latncy_ms@local <= 5"]},
     ["constraints.0: 'latncy_ms@local <= 5': unknown metric 'latncy_ms@local'", "allowed: ["]),
    ("malformed-constraint", {"constraints": ["size_bytes =< 1000"]},
     ["constraints.0: constraint 'size_bytes =< 1000': not understood", "op one of <=, >=, ==, <, >"]),
    ("contradictory-constraints", {"constraints": ["size_bytes <= 1000", "accuracy >= 0.5", "size_bytes >= 2000"]},
     ["constraints.2: 'size_bytes >= 2000' contradicts constraints.0 'size_bytes <= 1000'",
      "no value of size_bytes meets both", "allowed:"]),
    ("contradictory-strict-bounds", {"constraints": ["accuracy > 0.9", "accuracy < 0.9"]},
     ["constraints.1: 'accuracy < 0.9' contradicts constraints.0 'accuracy > 0.9'"]),
    ("unknown-top-level-field", {"serach": {"budget": 2}},
     ["serach: unknown key", "allowed keys here: ['name', 'task', 'space'"]),
    ("unknown-nested-field", {"search.budgte": 2},
     ["search.budgte: unknown key", "allowed keys here: ['budget', 'workers', 'threads_per_worker', 'sampler', 'seed'"]),
    ("wrong-yaml-type", {"search.budget": "many"},
     ["search.budget: Input should be a valid integer", "(got 'many')"]),
    ("section-not-a-mapping", {"space": [8, 32]}, ["space: Input should be a valid dictionary"]),
    ("missing-task", {"task": DELETE}, ["task: required field is missing"]),
    ("bad-job-name", {"name": "../../etc/cron.d"},
     ["name: allowed: 1 to 64 letters, digits, '_', '.' or '-'", "(got '../../etc/cron.d')"]),
    ("yaml-syntax-error", "name: x\ntask: digits\nspace:\n  weight_bits: [8, 32\nsearch: {budget: 2}\n",
     ["not valid YAML at line 5:", "expected ',' or ']'"]),
    ("yaml-python-tag", "name: x\ntask: !!python/object/apply:os.system ['touch {tmp}/pwned']\n",
     ["tag 'tag:yaml.org,2002:python/object/apply:os.system' at line 2 is not allowed",
      "safe loading: allowed are plain mappings, lists, strings, numbers and booleans"]),
    ("yaml-duplicate-key", "name: x\ntask: digits\nsearch: {budget: 2}\nsearch: {budget: 9}\n",
     ["line 4: key 'search' appears twice in one mapping", "allowed: each key once"]),
    ("empty-job-file", "", ["a job file must be a mapping with keys ['name', 'task'", "got an empty file"]),
    ("job-file-not-text", b"PK\x03\x04\xff\xfe\x00binary", ["not a text file (not UTF-8)", "allowed: a YAML job file"]),
    ("budget-zero", {"search.budget": 0},
     ["search.budget: Input should be greater than or equal to 1", "(got 0)"]),
    ("budget-negative", {"search.budget": -3},
     ["search.budget: Input should be greater than or equal to 1", "(got -3)"]),
    ("workers-zero", {"search.workers": 0},
     ["search.workers: Input should be greater than or equal to 1", "(got 0)"]),
    ("unknown-power-mode", {"profiles": [{"name": "jetson-orin-nano", "power_modes": ["99W"]}]},
     ["profiles.0.power_modes: 'jetson-orin-nano' has no power mode '99W'", "allowed: ['15W', '7W']"]),
    ("profile-file-missing-source", {"profiles": ["mypi.yaml"]},
     ["profiles.0:", "mypi.yaml", "sources.peak_gops.int8: is missing; every number needs a source"]),
    ("profile-file-does-not-exist", {"profiles": ["nowhere/pi.yaml"]},
     ["profiles.0: hardware profile file '{tmp}/nowhere/pi.yaml' does not exist"]),
    ("profile-file-python-tag", {"profiles": ["evil.yaml"]},
     ["profiles.0: {tmp}/evil.yaml: tag 'tag:yaml.org,2002:python/object/apply:os.system' at line 1 is not allowed",
      "safe loading"]),
    ("unreachable-database", {"storage": "postgresql://u:secret@127.0.0.1:1/db"},
     ["storage:", "postgresql://u:***@127.0.0.1:1/db", "allowed: a reachable database URL"]),
    ("storage-not-a-url", {"storage": "my database"},
     ["storage: 'my database' is not a database URL", "allowed: a reachable database URL"]),
    ("sqlite-storage-folder-missing", {"storage": "sqlite:///{tmp}/no/such/folder/study.db"},
     ["storage: sqlite:///{tmp}/no/such/folder/study.db: folder {tmp}/no/such/folder does not exist"]),
    ("unreachable-tracking-server", {"tracking_uri": "http://127.0.0.1:1"},
     ["tracking_uri: cannot reach the tracking server http://127.0.0.1:1", "allowed: a running MLflow"]),
    ("user-task-import-fails", {"task": "ssbi_broken_import:make"},
     ["task: ssbi_broken_import:make: cannot import module 'ssbi_broken_import'",
      "No module named 'ssbi_dependency_that_is_not_installed'",
      "allowed: 'package.module:function' with the module importable from {tmp}"]),
    ("user-task-no-such-function", {"task": "ssbi_tasks:mkae"},
     ["task: ssbi_tasks:mkae: module 'ssbi_tasks' has no function 'mkae'",
      "allowed: one of its functions ['make', 'make_dict']"]),
    ("user-task-function-raises", {"task": "ssbi_tasks:make"},
     ["task: ssbi_tasks:make(seed=0) raised RuntimeError: teacher.pt not found",
      "it must return a slimsearch.tasks.Task"]),
    ("user-task-returns-wrong-type", {"task": "ssbi_tasks:make_dict"},
     ["task: ssbi_tasks:make_dict returned dict, expected slimsearch.tasks.Task"]),
    ("hidden-distillation-without-hidden-states", {"space.distill_hidden_weight": [1.0]},
     ["space.distill_hidden_weight: task 'digits' exposes no hidden states to match", "allowed: [0]"]),
    ("unknown-layer-override", {"space.layers": {"conv9": {"weight_bits": [4]}}},
     ["space.layers: unknown layer 'conv9'", "allowed: ["]),
    # Values a consumer refuses once the job runs (numpy, torch, Ray, SQLite, setrlimit, a timer, JSON).
    ("seed-negative", {"search.seed": -1},
     ["search.seed: Input should be greater than or equal to 0", "(got -1)"]),
    ("seed-too-large", {"search.seed": 2**32},
     ["search.seed: Input should be less than or equal to 2147483647", "(got 4294967296)"]),
    ("budget-too-large", {"search.budget": 2**63},
     ["search.budget: Input should be less than or equal to 2147483647", "(got 9223372036854775808)"]),
    ("workers-too-many", {"search.workers": 2**63},
     ["search.workers: Input should be less than or equal to 100000000000000", "(got 9223372036854775808)"]),
    ("threads-too-many", {"search.threads_per_worker": 100000},
     ["search.threads_per_worker: Input should be less than or equal to 8192", "(got 100000)"]),
    ("workers-times-threads-too-many", {"search.workers": 10**12, "search.threads_per_worker": 1000},
     ["search.threads_per_worker: workers x threads_per_worker = 1000000000000 x 1000 CPUs",
      "allowed: at most 10**14 CPUs in all"]),
    ("memory-limit-too-large", {"search.memory_limit_mb": 2**44},
     ["search.memory_limit_mb: Input should be less than or equal to 4398046511104", "(got 17592186044416)"]),
    ("time-limit-too-long", {"search.time_limit_s": 1e10},
     ["search.time_limit_s: Input should be less than or equal to 9223372036", "(got 10000000000.0)"]),
    ("early-stopping-margin-infinite", {"search.early_stopping_margin": float("inf")},
     ["search.early_stopping_margin: Input should be a finite number", "(got inf)"]),
    ("distill-lr-infinite", {"space.distill_lr": [float("inf")]},
     ["space.distill_lr: distill_lr choice inf is not allowed", "allowed: numbers > 0"]),
    ("distill-lr-beyond-a-float", {"space.distill_lr": [10**400]},
     ["space.distill_lr: distill_lr choice 1000", "is not allowed", "allowed: numbers > 0"]),
    ("distill-temperature-infinite", {"space.distill_temperature": [4.0, float("inf")]},
     ["space.distill_temperature: distill_temperature choice inf is not allowed", "allowed: numbers > 0"]),
    ("storage-not-an-sqlite-file", {"storage": "sqlite:///{tmp}/notes.txt"},
     ["storage: sqlite:///{tmp}/notes.txt: {tmp}/notes.txt is not an SQLite database",
      "allowed: a reachable database URL"]),
    ("storage-sqlite-path-is-a-folder", {"storage": "sqlite:///{tmp}"},
     ["storage: sqlite:///{tmp}: {tmp} is a folder, not a database file", "allowed: a reachable database URL"]),
    ("storage-in-memory", {"storage": "sqlite://"},
     ["storage: sqlite://: an in-memory database ends with this process", "allowed: a reachable database URL"]),
    ("tracking-not-an-sqlite-file", {"tracking_uri": "sqlite:///{tmp}/notes.txt"},
     ["tracking_uri: sqlite:///{tmp}/notes.txt: {tmp}/notes.txt is not an SQLite database"]),
    ("tracking-sqlite-path-is-a-folder", {"tracking_uri": "sqlite:///{tmp}"},
     ["tracking_uri: sqlite:///{tmp}: {tmp} is a folder, not a database file"]),
    ("tracking-file-store", {"tracking_uri": "{tmp}/mlruns"},
     ["tracking_uri: '{tmp}/mlruns' names an MLflow file store", "MLFLOW_ALLOW_FILE_STORE=true",
      "allowed: a running MLflow tracking server, a database URL"]),
    ("tracking-unknown-kind", {"tracking_uri": "postgres://u:secret@127.0.0.1:1/db"},
     ["tracking_uri: 'postgres://u:***@127.0.0.1:1/db': MLflow has no tracking store of kind 'postgres'",
      "allowed: a tracking URI of kind ['http', 'https', 'sqlite', 'postgresql'"]),
]


def _profile_files(tmp: Path) -> None:
    """mypi.yaml: the shipped Raspberry Pi 4 profile, one source removed; evil.yaml: a Python tag."""
    from importlib.resources import files

    data = yaml.safe_load((files("slimsearch.hardware_profiles") / "profiles" / "raspberry-pi-4.yaml").read_text())
    data["name"] = "my-pi"
    data["sources"].pop("peak_gops.int8")
    (tmp / "mypi.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (tmp / "evil.yaml").write_text(f"name: !!python/object/apply:os.system ['touch {tmp}/pwned']\n")


def _job_file_row(content) -> Callable[[Ctx], Row]:
    def build(ctx: Ctx) -> Row:
        for name, text in USER_MODULES.items():
            ctx.write(text, name)
        ctx.write("not a database\n", "notes.txt")
        _profile_files(ctx.tmp)
        if isinstance(content, dict):
            text = json.loads(json.dumps({k: v for k, v in content.items() if v is not DELETE}).replace(
                "{tmp}", str(ctx.tmp)))
            data = patched({**text, **{k: v for k, v in content.items() if v is DELETE}})
        else:
            data = content.replace("{tmp}", str(ctx.tmp)) if isinstance(content, str) else content
        ctx.write(data)
        return Row(ctx.run(), [str(ctx.job)], forbid=("secret",),
                   after=lambda: _nothing_ran(ctx.tmp))
    return build


def _nothing_ran(tmp: Path) -> None:
    assert not (tmp / "pwned").exists(), "a YAML tag ran code"


# ---------------------------------------------------------------------------------------------
# Table 2: command lines (flags, folders, caches, resume, export).
# ---------------------------------------------------------------------------------------------
def _ok_job(ctx: Ctx) -> Path:
    return ctx.write(patched({}))


def _causal_lm_not_a_decoder(ctx: Ctx) -> Row:
    """``task: causal-lm:<folder>`` naming an encoder: refused from its config.json, before any weight."""
    (ctx.tmp / "encoder").mkdir()
    (ctx.tmp / "encoder" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    ctx.write(patched({"task": "causal-lm:encoder", "space": {}}))
    return Row(ctx.run(), [str(ctx.job), f"task: {ctx.tmp / 'encoder'}",
                           "is a 'bert' model, not a decoder-only causal LM slimsearch supports",
                           "allowed model_type: ['llama', 'mistral', 'qwen2', 'qwen3', 'phi3', 'gpt2']"])


def _missing_job_file(ctx):
    return Row(["run", str(ctx.tmp / "nope.yaml"), "--out", str(ctx.out), *RUN],
               [f"{ctx.tmp / 'nope.yaml'}: cannot read the job file (No such file or directory)",
                "allowed: a YAML job file"])


def _job_file_is_a_folder(ctx):
    (ctx.tmp / "jobs").mkdir()
    return Row(["run", str(ctx.tmp / "jobs"), "--out", str(ctx.out), *RUN],
               [f"{ctx.tmp / 'jobs'}: cannot read the job file (Is a directory)"])


def _budget_flag_zero(ctx):
    _ok_job(ctx)
    return Row(ctx.run("--budget", "0"), ["--budget: Input should be greater than or equal to 1 (got 0)"],
               forbid=("search.budget", str(ctx.job)))


def _workers_flag_negative(ctx):
    _ok_job(ctx)
    return Row(ctx.run("--workers", "-1"), ["--workers: Input should be greater than or equal to 1 (got -1)"],
               forbid=("search.workers",))


def _time_limit_flag_zero(ctx):
    _ok_job(ctx)
    return Row(ctx.run("--time-limit", "0"), ["--time-limit: Input should be greater than 0 (got 0.0)"],
               forbid=("search.time_limit_s",))


def _threads_flag_too_many(ctx):
    _ok_job(ctx)
    return Row(ctx.run("--threads", "100000"), ["--threads: Input should be less than or equal to 8192 (got 100000)"],
               forbid=("search.threads_per_worker", str(ctx.job)))


def _time_limit_flag_too_long(ctx):
    _ok_job(ctx)
    return Row(ctx.run("--time-limit", "1e10"),
               ["--time-limit: Input should be less than or equal to 9223372036 (got 10000000000.0)"],
               forbid=("search.time_limit_s",))


def _storage_flag_not_a_database(ctx):
    _ok_job(ctx)
    notes = ctx.write("not a database\n", "notes.txt")
    return Row(ctx.run("--storage", f"sqlite:///{notes}"),
               [f"--storage: sqlite:///{notes}: {notes} is not an SQLite database"], forbid=(str(ctx.job),))


def _tracking_uri_flag_file_store(ctx):
    _ok_job(ctx)
    return Row(ctx.run("--tracking-uri", str(ctx.tmp / "mlruns")),
               [f"--tracking-uri: '{ctx.tmp / 'mlruns'}' names an MLflow file store"],
               after=lambda: _assert_absent(ctx.tmp / "mlruns"))


def _read_only_sqlite(ctx, folder: bool) -> Row:
    """A valid SQLite file that this user may not write, or whose folder it may not write (subprocess)."""
    import sqlite3

    _ok_job(ctx)
    parent = ctx.tmp / "readonly"
    parent.mkdir()
    db = parent / "study.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    (parent if folder else db).chmod(0o555 if folder else 0o444)
    before = db.read_bytes()

    def after():
        parent.chmod(0o755)
        db.chmod(0o644)
        assert db.read_bytes() == before and sorted(p.name for p in parent.iterdir()) == ["study.db"]

    what = f"folder {parent} is read-only to this user" if folder else f"{db} is read-only to this user"
    return Row(ctx.run("--storage", f"sqlite:///{db}"), [f"--storage: sqlite:///{db}: {what}"], env={},
               drop_root=True, after=after)


def _hw_profile_threads_too_many(ctx):
    out = ctx.tmp / "profile.yaml"
    return Row(["hw", "profile", "--threads", "3000000000", "--quick", "--out", str(out)],
               ["--threads: allowed: a whole number from 1 to 8192 (got 3000000000)"],
               after=lambda: _assert_absent(out))


def _budget_flag_not_a_number(ctx):
    _ok_job(ctx)
    return Row(ctx.run("--budget", "ten"), ["argument --budget: invalid int value: 'ten'",
                                            "`slimsearch run --help` lists what is allowed"])


def _executor_flag_unknown(ctx):
    _ok_job(ctx)
    return Row(ctx.run("--executor", "gpu"), ["argument --executor: invalid choice: 'gpu'", "'ray', 'local'"])


def _budget_flag_over_wrong_section(ctx):
    ctx.write(patched({"search": 5}))
    return Row(ctx.run("--budget", "3"), [str(ctx.job), "search: Input should be a valid dictionary"])


def _out_is_a_file(ctx):
    _ok_job(ctx)
    ctx.out.write_text("not a folder")
    before = ctx.out.read_bytes()

    def after():
        assert ctx.out.read_bytes() == before

    return Row(ctx.run(), [f"--out '{ctx.out}': is a file", "allowed: a new folder"], after=after, keeps_out=True)


def _out_read_only(ctx):
    _ok_job(ctx)
    parent = ctx.tmp / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    return Row(["run", str(ctx.job), "--out", str(parent / "job"), *RUN],
               [f"--out {parent / 'job'}: cannot write there (Permission denied)"], env={}, drop_root=True,
               after=lambda: (parent.chmod(0o755), _assert_absent(parent / "job")))


def _assert_absent(path: Path) -> None:
    assert not path.exists(), f"{path} was created"


def _corrupted_teacher_cache(ctx):
    # Refused, not silently retrained: a new teacher would change the teacher hash, so every job
    # started on the old one could no longer resume or export; and a user's own teacher cannot be
    # retrained at all. The message names the file and the fix; the file is left as it is.
    _ok_job(ctx)
    cache = ctx.tmp / "cache"
    shutil.copytree(ctx.finished.cache, cache)
    (teacher,) = (cache / "teachers").glob("digits-*.pt")
    teacher.write_bytes(b"\x00garbage, not a torch file")

    def after():
        assert teacher.read_bytes() == b"\x00garbage, not a torch file"

    return Row(ctx.run(), [f"teacher cache {teacher} is unreadable", f"delete it (rm '{teacher}')",
                           "the next run retrains the teacher"], env={"SLIMSEARCH_CACHE": str(cache)}, after=after)


def _teacher_changed_since_start(ctx):
    import torch

    cache = ctx.tmp / "cache"
    shutil.copytree(ctx.finished.cache, cache)
    (teacher,) = (cache / "teachers").glob("digits-*.pt")
    state = torch.load(teacher, weights_only=True)
    state["fc2.bias"] = state["fc2.bias"] + 0.01  # a retrained (different) teacher
    torch.save(state, teacher)
    return Row(["run", str(ctx.finished.job), "--out", str(ctx.finished.out), "--resume", *RUN],
               [f"{ctx.finished.out}: the teacher of task 'digits' changed since the job started", "start a new job"],
               env={"SLIMSEARCH_CACHE": str(cache)})


def _resume_changed_job(ctx):
    data = yaml.safe_load(ctx.finished.job.read_text())
    data["space"]["weight_bits"] = [4, 8]
    ctx.write(data)
    return Row(["run", str(ctx.job), "--out", str(ctx.finished.out), "--resume", *RUN],
               [f"{ctx.finished.out}: the job file differs from the job being resumed in ['space']",
                "only search.budget, search.workers, search.threads_per_worker and search.time_limit_s may change "
                "on --resume"])


def _resume_without_job(ctx):
    _ok_job(ctx)
    ctx.out.mkdir()
    (ctx.out / "notes.txt").write_text("mine")
    return Row(ctx.run("--resume"), [f"{ctx.out}: no job to resume here (no job.json)",
                                     "run without --resume to start one"],
               after=lambda: _assert_same({"notes.txt": hashlib.sha256(b"mine").hexdigest()}, snapshot(ctx.out)),
               keeps_out=True)


def _out_holds_a_job(ctx):
    return Row(["run", str(ctx.finished.job), "--out", str(ctx.finished.out), *RUN],
               [f"{ctx.finished.out}: already holds a job", "pass --resume to continue it or choose another --out"])


def _export_unknown_format(ctx):
    return Row(["export", str(ctx.finished.out), "--out", str(ctx.out), "--format", "onnx,tflite"],
               ["--format: 'tflite' is not a format", "allowed: ['onnx', 'torchscript', 'packed']"])


def _export_not_a_job(ctx):
    (ctx.tmp / "folder").mkdir()
    return Row(["export", str(ctx.tmp / "folder"), "--out", str(ctx.out)],
               [f"JOB '{ctx.tmp / 'folder'}': no registered job has this id or name and it is not a job folder",
                "`slimsearch jobs` lists the registered ones"])


def _export_out_climbs(ctx):
    out = f"{ctx.tmp}/a/../../escaped"
    return Row(["export", str(ctx.finished.out), "--out", out],
               [f"--out {out!r}: '..' is not allowed in the export folder"],
               after=lambda: _assert_absent(ctx.tmp.parent / "escaped"))


def _export_unknown_run(ctx):
    return Row(["export", str(ctx.finished.out), "--out", str(ctx.out), "--run", "0123abcd"],
               ["--run: no candidate of this job has run id '0123abcd'", "front members: ["])


def _export_unknown_minimize(ctx):
    return Row(["export", str(ctx.finished.out), "--out", str(ctx.out), "--minimize", "latency"],
               ["--minimize: no metric 'latency'", "the candidates have ["])


CLI_ROWS: list[tuple[str, Callable[[Ctx], Row]]] = [
    ("job-file-missing", _missing_job_file),
    ("causal-lm-not-a-decoder", _causal_lm_not_a_decoder),
    ("job-file-is-a-folder", _job_file_is_a_folder),
    ("budget-flag-zero", _budget_flag_zero),
    ("workers-flag-negative", _workers_flag_negative),
    ("time-limit-flag-zero", _time_limit_flag_zero),
    ("threads-flag-too-many", _threads_flag_too_many),
    ("time-limit-flag-too-long", _time_limit_flag_too_long),
    ("storage-flag-not-a-database", _storage_flag_not_a_database),
    ("tracking-uri-flag-file-store", _tracking_uri_flag_file_store),
    ("storage-read-only", lambda ctx: _read_only_sqlite(ctx, folder=False)),
    ("storage-folder-read-only", lambda ctx: _read_only_sqlite(ctx, folder=True)),
    ("hw-profile-threads-flag-too-many", _hw_profile_threads_too_many),
    ("budget-flag-not-a-number", _budget_flag_not_a_number),
    ("executor-flag-unknown", _executor_flag_unknown),
    ("budget-flag-over-a-wrong-section", _budget_flag_over_wrong_section),
    ("out-is-a-file", _out_is_a_file),
    ("out-read-only", _out_read_only),
    ("corrupted-teacher-cache", _corrupted_teacher_cache),
    ("teacher-changed-since-start", _teacher_changed_since_start),
    ("resume-changed-job", _resume_changed_job),
    ("resume-without-job", _resume_without_job),
    ("out-already-holds-a-job", _out_holds_a_job),
    ("export-unknown-format", _export_unknown_format),
    ("export-not-a-job", _export_not_a_job),
    ("export-out-climbs", _export_out_climbs),
    ("export-unknown-run", _export_unknown_run),
    ("export-unknown-minimize", _export_unknown_minimize),
]

ROWS = [pytest.param(_job_file_row(content), must, id=row_id) for row_id, content, must in JOB_FILE_ROWS]
ROWS += [pytest.param(build, [], id=row_id) for row_id, build in CLI_ROWS]


def _assert_same(before: dict, after: dict) -> None:
    assert after == before, f"changed: {sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))}"


@pytest.mark.parametrize("build, must", ROWS)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(build, must, finished, tmp_path, capfd):
    ctx = Ctx(tmp_path, finished)
    row = build(ctx)
    job_before = snapshot(finished.out)
    registry_before = registry_rows()

    result = (cli_process(*row.argv, env=row.env, drop_root=row.drop_root) if row.env is not None
              else cli(*row.argv))

    fragments = [f.replace("{tmp}", str(tmp_path)) for f in [*must, *row.must]]
    assert result.code == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("slimsearch"), line
    assert "Traceback" not in line
    missing = [f for f in fragments if f not in line]
    assert not missing, f"{line!r} lacks {missing}"
    for word in row.forbid:
        assert word not in line, f"{word!r} in {line!r}"
    assert row.keeps_out or not ctx.out.exists(), f"{ctx.out} was written"
    _assert_same(job_before, snapshot(finished.out))
    assert registry_rows() == registry_before
    if row.after is not None:
        row.after()
    print(f"ROW\t{line}")  # docs/reliability.md's table is copied from these lines (pytest -s)


# ---------------------------------------------------------------------------------------------
# Security: how weights and YAML are loaded, anywhere in src/.
# ---------------------------------------------------------------------------------------------
def _calls(pattern: str) -> list[tuple[str, int, str]]:
    """(file, line, text) of every call matching ``pattern`` in src/slimsearch, a call's text taken up to its
    closing parenthesis (calls may span lines)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        for match in re.finditer(pattern, text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            found.append((str(path.relative_to(SRC)), text.count("\n", 0, match.start()) + 1,
                          text[match.start():end + 1]))
    return found


def test_every_torch_load_in_src_passes_weights_only_true():
    calls = _calls(r"\btorch\.load\(")
    assert calls, "no torch.load call found: the pattern is stale"
    unsafe = [(f, n) for f, n, call in calls if not re.search(r"weights_only\s*=\s*True", call)]
    assert unsafe == []
    pickles = _calls(r"\b(?:pickle|cloudpickle|dill|joblib)\.loads?\(")
    assert pickles == [], "weights load through torch.load(weights_only=True) or safetensors, never pickle"


def test_every_yaml_load_in_src_is_safe():
    """YAML is parsed by yaml.safe_load or by slimsearch/_io.py's SafeLoader subclass, nothing else."""
    from slimsearch._io import safe_load

    loads = _calls(r"(?<![\w.])yaml\.\w*load\w*\(")
    assert [(f, n, call) for f, n, call in loads if not call.startswith("yaml.safe_load(")] == []
    uses = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"unsafe_load|full_load|UnsafeLoader|FullLoader|yaml\.Loader\b|Loader\s*=", text), path
        bases = re.findall(r"class \w+\(yaml\.(\w+)\)", text)
        assert set(bases) <= {"SafeLoader"}, f"{path}: a YAML loader built on {bases}"
        if "from slimsearch._io import safe_load" in text:
            uses.append(path.relative_to(SRC).as_posix())
    assert {"jobs/load.py", "hardware_profiles/_schema.py"} <= set(uses)
    with pytest.raises(Exception, match="is not allowed; files are read with safe loading"):
        safe_load("x: !!python/object/apply:os.system ['true']", "t.yaml")


def test_user_code_runs_only_through_an_explicit_module_function(tmp_path, finished):
    """A task that is neither built in nor ``module:function`` is refused before anything is imported."""
    ctx = Ctx(tmp_path, finished)
    (tmp_path / "ssbi_sideeffect.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    for task in ("ssbi_sideeffect", "ssbi_sideeffect.make", "ssbi_sideeffect:make()", "../ssbi_sideeffect:make"):
        ctx.write(patched({"task": task}))
        result = cli(*ctx.run())
        assert result.code == 2 and "'package.module:function'" in result.stderr, result.stderr
    assert not (tmp_path / "imported").exists()
    assert "ssbi_sideeffect" not in sys.modules


def test_a_user_tasks_teacher_is_hashed_so_a_changed_weights_file_is_noticed(tmp_path, monkeypatch):
    """A user task that sets no ``teacher_sha256`` gets the hash of its teacher's weights, which a
    resumed job compares with the one it started with (as for the built-in tasks' cache files)."""
    import torch

    from slimsearch.tasks import load_task

    (tmp_path / "ssbi_weights_task.py").write_text(
        "from pathlib import Path\n"
        "import torch\n"
        "from slimsearch.tasks import load_task\n"
        "import dataclasses\n"
        "def make(seed):\n"
        "    base = load_task('digits', seed=seed)\n"
        "    base.teacher.load_state_dict(torch.load(Path(__file__).with_name('teacher.pt'), weights_only=True))\n"
        "    return dataclasses.replace(base, name='mine', teacher_sha256='')\n")
    digits = load_task("digits")
    torch.save(digits.teacher.state_dict(), tmp_path / "teacher.pt")
    first = load_task("ssbi_weights_task:make", path=str(tmp_path)).teacher_sha256
    assert first == load_task("ssbi_weights_task:make", path=str(tmp_path)).teacher_sha256
    state = digits.teacher.state_dict()
    state["fc2.bias"] = state["fc2.bias"] + 0.01
    torch.save(state, tmp_path / "teacher.pt")
    second = load_task("ssbi_weights_task:make", path=str(tmp_path)).teacher_sha256
    assert len(first) == len(second) == 64 and second != first
