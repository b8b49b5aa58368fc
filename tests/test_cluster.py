"""slimsearch on a real Ray cluster started with `ray start`: a head and a second node carrying
device resources, both on this machine, as they would run on two.

- `slimsearch run --ray-address` joins the cluster (and leaves it running); the node carrying
  `device:raspberry-pi-4` times every candidate's graph, so that latency is *measured*, in
  front.json, MLflow and the report; a GPU profile on a node stays modelled.
- `slimsearch submit` hands a job to the cluster through Ray's Job Submission API; the job
  registry shows it queued, then finished, with its submission id.

The cluster is stopped by killing exactly the processes it started (every one carries this
module's marker in its environment), not with `ray stop`, which would also stop the Ray
instances other test runs on this machine have started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests._real import missing



@pytest.fixture(autouse=True)
def ray_command():
    if shutil.which("ray") is None:
        missing("the `ray` command is not installed")

PI, T4 = "raspberry-pi-4", "nvidia-t4"
MARKER = "SLIMSEARCH_TEST_CLUSTER"
SPACE = {"prune_ratio": [0.0, 0.5], "weight_bits": [8, 32], "act_bits": [32], "distill_steps": [0]}
START_TIMEOUT_S = 240
JOB_TIMEOUT_S = 900


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _marked_pids(root: str) -> list[int]:
    """Processes whose environment carries this cluster's marker: the ones it started."""
    needle = f"{MARKER}={root}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _stop(root: str) -> None:
    """SIGTERM every process of this cluster, then SIGKILL what is left after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        pids = _marked_pids(root)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _ray_start(args: list[str], env: dict, log: Path) -> None:
    with open(log, "ab") as f:
        proc = subprocess.run(["ray", "start", *args], env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=START_TIMEOUT_S, start_new_session=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed; its output:\n{log.read_text()[-3000:]}")


def _python(code: str, env: dict) -> object:
    """Run ``code`` (which prints one JSON value last) in a fresh interpreter; keeps this process's Ray untouched."""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _slimsearch(args: list[str], env: dict, cwd: Path, timeout: float = JOB_TIMEOUT_S) -> SimpleNamespace:
    proc = subprocess.run([sys.executable, "-m", "slimsearch.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    return SimpleNamespace(code=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)


NODES = """
import json, ray
ray.init(address={address!r}, log_to_driver=False, logging_level="ERROR")
print(json.dumps([{{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]}} for n in ray.nodes()]))
"""

MEASURE_TASKS = """
import json
from ray.util.state import list_tasks
tasks = list_tasks(address={dashboard!r}, filters=[("name", "=", "slimsearch-measure:{profile}")], detail=True,
                   limit=1000)
print(json.dumps([{{"node": t.node_id, "state": str(t.state), "job": t.job_id}} for t in tasks]))
"""

RAY_STATUS = """
import json
from ray.job_submission import JobSubmissionClient
print(json.dumps(str(JobSubmissionClient({dashboard!r}).get_job_status({sid!r}).value)))
"""


@pytest.fixture(scope="module")
def cluster(teacher_cache, slimsearch_home):
    """A head (1 CPU, dashboard) and a second node (1 CPU, device:raspberry-pi-4 and device:nvidia-t4),
    started with `ray start`, with token authentication as Ray 2.5x sets it up; always stopped."""
    import secrets

    # Short: Ray's socket paths must fit in 107 bytes. The second node gets its own temp dir, as on
    # its own machine: sharing one, its runtime-env agent deletes the submitted job's working_dir
    # copy (the head driver's current folder) when it no longer needs its own.
    root = tempfile.mkdtemp(prefix="ssr-", dir="/tmp")
    token = Path(root) / "token"
    token.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    env = {**os.environ, MARKER: root, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0", "SLIMSEARCH_CACHE": str(teacher_cache),
           "SLIMSEARCH_HOME": str(slimsearch_home)}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, client, agent1, agent2 = _free_ports(5)
    log = Path(root) / "ray-start.log"
    try:
        _ray_start(["--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                    f"--dashboard-agent-listen-port={agent1}", f"--temp-dir={root}", "--disable-usage-stats"], env, log)
        _ray_start([f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                    f"--resources={json.dumps({f'device:{PI}': 1, f'device:{T4}': 1})}",
                    f"--dashboard-agent-listen-port={agent2}", f"--temp-dir={root}/n2", "--disable-usage-stats"], env, log)
        address = f"127.0.0.1:{gcs}"
        nodes = _python(NODES.format(address=address), env)
        device = [n["id"] for n in nodes if f"device:{PI}" in n["resources"]]
        head = [n["id"] for n in nodes if f"device:{PI}" not in n["resources"]]
        assert len(nodes) == 2 and len(device) == 1 and len(head) == 1, nodes
        yield SimpleNamespace(address=address, dashboard=f"http://127.0.0.1:{dashboard}", env=env,
                              device_node=device[0], head_node=head[0])
    finally:
        _stop(root)
        shutil.rmtree(root, ignore_errors=True)


def _job(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"name": name, "task": "digits", "space": SPACE, "profiles": [PI, T4],
                                    "search": {"budget": 2, "workers": 2}}, sort_keys=False))
    return path


def _measure_tasks(cluster) -> list[dict]:
    return _python(MEASURE_TASKS.format(dashboard=cluster.dashboard, profile=PI), cluster.env)


@pytest.mark.slow
def test_run_joins_the_cluster_and_the_device_node_measures_its_latency(cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    job, out = _job(tmp_path / "job", "digits-on-cluster"), tmp_path / "out"
    result = _slimsearch(["run", str(job), "--out", str(out), "--ray-address", cluster.address, "--no-progress"],
                         cluster.env, tmp_path)
    assert result.code == 0, result.stderr[-3000:]
    assert f"latency_ms@{PI} is measured on the cluster's node(s) carrying device:{PI}" in result.stdout
    assert "a gpu is not measured" in result.stdout  # the node says it is a T4; onnxruntime-CPU cannot time one

    front = json.loads((out / "front.json").read_text())
    assert len(front["candidates"]) == 2 and not front["failed"]
    for c in front["candidates"]:
        assert c["provenance"][f"latency_ms@{PI}"] == "measured"
        assert c["provenance"][f"energy_mj@{PI}"] == "modelled"  # energy is still the profile's
        assert c["provenance"][f"latency_ms@{T4}"] == "modelled"
        assert c["metrics"][f"latency_ms@{PI}"] > 0
    assert front["teacher_provenance"][f"latency_ms@{PI}"] == "measured"
    assert f"latency_ms@{PI} [measured]" in result.stdout  # the front table's column
    assert f"latency_ms@{PI} (measured)" in (out / "report.html").read_text()  # the report's axis title

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits-on-cluster").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    for r in children:
        assert r.data.tags[f"provenance.latency_ms/{PI}"] == "measured"
        assert r.data.tags[f"provenance.latency_ms/{T4}"] == "modelled"
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.params["measured_on_device_nodes"] == PI
    assert parent.data.tags[f"teacher.provenance.latency_ms/{PI}"] == "measured"

    # Every measurement ran on the node carrying the device resource (teacher + 2 candidates), never the head.
    tasks = _measure_tasks(cluster)
    assert len(tasks) >= 3, tasks
    assert {t["node"] for t in tasks} == {cluster.device_node}
    assert all(t["state"].endswith("FINISHED") for t in tasks), tasks

    # slimsearch left the cluster it joined running.
    nodes = _python(NODES.format(address=cluster.address), cluster.env)
    assert sorted(n["id"] for n in nodes if n["alive"]) == sorted([cluster.device_node, cluster.head_node])


def _jobs(env: dict, cwd: Path) -> list[dict]:
    result = _slimsearch(["jobs", "--json"], env, cwd, timeout=120)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_submit_goes_through_the_job_api_and_the_registry_follows_it(cluster, tmp_path):
    job, out = _job(tmp_path / "job", "digits-submitted"), tmp_path / "out"
    result = _slimsearch(["submit", str(job), "--address", cluster.dashboard, "--out", str(out),
                          "--executor", "ray"], cluster.env, tmp_path, timeout=120)
    assert result.code == 0, result.stderr
    sid = result.stdout.splitlines()[0].strip()
    assert sid.startswith("slimsearch-digits-submitted-")

    (row,) = [j for j in _jobs(cluster.env, tmp_path) if j["submission_id"] == sid]
    assert row["out"] == str(out.resolve()) and row["submission_address"] == cluster.dashboard
    seen = [row["status"]]
    assert seen[0] in ("queued", "running")  # queued at once; running once the head has started it
    deadline = time.time() + JOB_TIMEOUT_S
    while seen[-1] in ("queued", "running") and time.time() < deadline:
        time.sleep(5)
        (row,) = [j for j in _jobs(cluster.env, tmp_path) if j["submission_id"] == sid]
        if row["status"] != seen[-1]:
            seen.append(row["status"])
    assert seen[-1] == "finished", (seen, row["error"])
    # The run records itself finished just before its process exits; Ray then says so.
    deadline = time.time() + 120
    while (ray_status := _python(RAY_STATUS.format(dashboard=cluster.dashboard, sid=sid), cluster.env)) in (
            "PENDING", "RUNNING") and time.time() < deadline:
        time.sleep(2)
    assert ray_status == "SUCCEEDED"

    # The head ran it as `slimsearch run --ray-address auto`: on this cluster, its device node measuring.
    front = json.loads((out / "front.json").read_text())
    assert len(front["candidates"]) == 2
    assert {c["provenance"][f"latency_ms@{PI}"] for c in front["candidates"]} == {"measured"}
    table = _slimsearch(["jobs"], cluster.env, tmp_path, timeout=120).stdout
    assert sid in table and "ray submission" in table


@pytest.mark.slow
def test_a_submitted_job_that_fails_on_the_head_is_recorded_failed_with_rays_reason(cluster, tmp_path):
    job = _job(tmp_path / "job", "digits-fails")
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # --out is a file: `slimsearch run` on the head refuses it (exit 2)
    result = _slimsearch(["submit", str(job), "--address", cluster.dashboard, "--out", str(blocker)],
                         cluster.env, tmp_path, timeout=120)
    assert result.code == 0, result.stderr
    sid = result.stdout.splitlines()[0].strip()
    deadline = time.time() + 300
    row = None
    while time.time() < deadline:
        (row,) = [j for j in _jobs(cluster.env, tmp_path) if j["submission_id"] == sid]
        if row["status"] not in ("queued", "running"):
            break
        time.sleep(3)
    assert row["status"] == "failed", row
    assert row["error"].startswith("Ray job FAILED")


# ---------------------------------------------------------------- no cluster needed


def _main(*args: str) -> SimpleNamespace:
    """`slimsearch ...` in this process (no Ray is started by these): exit code, stdout, stderr."""
    from tests._cli import cli

    return cli(*args)


def test_an_address_nothing_listens_on_is_one_line_exit_2_and_writes_nothing(write_job, tmp_path):
    (port,) = _free_ports(1)
    job = write_job({"name": "x", "task": "digits", "space": SPACE, "search": {"budget": 2}})
    out = tmp_path / "out"
    run = _main("run", str(job), "--out", str(out), "--ray-address", f"127.0.0.1:{port}", "--no-progress")
    assert run.code == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert f"--ray-address '127.0.0.1:{port}': nothing answers" in run.stderr
    assert not out.exists()
    bad = _main("run", str(job), "--ray-address", "http://127.0.0.1:8265", "--no-progress")
    assert bad.code == 2 and "that is a dashboard URL" in bad.stderr
    sub = _main("submit", str(job), "--address", f"127.0.0.1:{port}")
    assert sub.code == 2 and "not a dashboard URL; allowed: the head's dashboard URL" in sub.stderr
    gone = _main("submit", str(job), "--address", f"http://127.0.0.1:{port}")
    assert gone.code == 2 and f"--address 'http://127.0.0.1:{port}': nothing answers" in gone.stderr
    assert not any(j["name"] == "x" for j in json.loads(_main("jobs", "--json").stdout))  # nothing registered


@pytest.mark.slow
def test_a_version_1_registry_gains_the_submission_columns(tmp_path):
    from sqlalchemy import create_engine, inspect, text

    from slimsearch.storage.registry import MIGRATIONS, Registry

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:  # a registry as slimsearch left it before submissions existed
        conn.execute(text("CREATE TABLE schema_version (version INTEGER NOT NULL)"))
        conn.execute(text("INSERT INTO schema_version (version) VALUES (1)"))
        conn.execute(text("CREATE TABLE jobs (id INTEGER PRIMARY KEY, name VARCHAR(255) NOT NULL, out TEXT NOT NULL "
                          "UNIQUE, config TEXT NOT NULL, config_hash VARCHAR(64) NOT NULL, status VARCHAR(16) NOT "
                          "NULL, created FLOAT NOT NULL, started FLOAT, ended FLOAT, study_name VARCHAR(255), "
                          "storage TEXT, tracking_uri TEXT, experiment_id VARCHAR(64), parent_run_id VARCHAR(64), "
                          "budget INTEGER, error TEXT)"))
        conn.execute(text("CREATE TABLE exports (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL, created FLOAT NOT "
                          "NULL, run_id VARCHAR(64), trial INTEGER, out TEXT NOT NULL, formats TEXT NOT NULL, "
                          "model_name VARCHAR(255), model_version VARCHAR(32), alias VARCHAR(255))"))
        conn.execute(text("INSERT INTO jobs (name, out, config, config_hash, status, created) "
                          "VALUES ('old', '/old', '{}', 'h', 'finished', 0)"))
    registry = Registry(url)
    (old,) = registry.jobs()
    assert old.name == "old" and old.submission_id is None
    assert {"submission_id", "submission_address"} <= {c["name"] for c in inspect(engine).get_columns("jobs")}
    assert Registry.schema_version(engine) == len(MIGRATIONS)
    registry.record_submission(old.id, submission_id="s-1", address="http://h:8265")
    assert registry.jobs()[0].submission_id == "s-1"
