"""A causal-lm task as a job: its job-file syntax, its metrics and their direction, a tiny search through
``slimsearch run``, and the one-line refusal of a folder that is not a causal LM."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from slimsearch.exceptions import ConfigError  # noqa: E402
from slimsearch.jobs.load import load_job  # noqa: E402
from slimsearch.jobs.spec import JobSpec  # noqa: E402
from tests import _tiny_llm  # noqa: E402
from tests._cli import cli, local_job, write_job  # noqa: E402


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-job")
    _tiny_llm.folder(root / "models" / "tiny")
    _tiny_llm.text(root / "notes.txt")
    return root


def test_a_causal_lm_job_names_its_model_and_text_relative_to_the_job_file(made):
    job = write_job(made, {"name": "lm", "task": "causal-lm:models/tiny", "text": ["notes.txt"],
                           "constraints": ["ppl_increase <= 0.05", "kl <= 0.5"]}, "paths.yaml")
    spec = load_job(job)
    assert spec.task == f"causal-lm:{made / 'models' / 'tiny'}" and spec.text == [str(made / "notes.txt")]
    assert {k: v.value for k, v in spec.objectives.items()} == {"ppl": "min", "decode_tok_s@local": "max",
                                                                "memory_bytes": "min"}
    names = spec.metric_names()
    assert {"ppl", "kl", "top1", "ppl_increase", "latency_ms@local"} <= set(names)
    assert not any(n.startswith("latency_ms_b") or n.endswith("_drop") for n in names)
    assert JobSpec(name="x", task="smollm2", text="lee").text == "lee"


@pytest.mark.parametrize("patch, fragment", [
    ({"objectives": {"ppl": "max"}}, "objectives.ppl: ppl is better lower for task"),
    ({"objectives": {"accuracy": "max"}}, "objectives: unknown metric 'accuracy'"),
    ({"constraints": ["accuracy_drop <= 0.01"]}, "unknown metric 'accuracy_drop'"),
    ({"text": ["missing.txt"]}, "missing.txt: no such file"),
    ({"task": "digits", "text": "wikipedia"}, "text: task 'digits' reads no text"),
    ({"task": "causal-lm:"}, "'causal-lm:' names no model"),
])
def test_a_causal_lm_job_file_is_checked_as_its_family_reads_it(made, patch, fragment):
    job = write_job(made, {"name": "lm", "task": "causal-lm:models/tiny", **patch}, "bad.yaml")
    with pytest.raises(ConfigError) as exc:
        load_job(job)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_a_tiny_search_on_a_users_causal_lm_records_perplexity_and_its_increase(made):
    (made / "run").mkdir()
    run = local_job(made / "run", {
        "name": "tiny-lm", "task": f"causal-lm:{made / 'models' / 'tiny'}", "text": [str(made / "notes.txt")],
        "space": {"weight_bits": [4, 32], "kv_bits": [8, 32], "ffn_keep": [0.5, 1.0]},
        "objectives": {"ppl": "min", "decode_tok_s@local": "max", "memory_bytes": "min"},
        "constraints": ["ppl_increase <= 0.5"],
        "profiles": ["raspberry-pi-4"],
        "search": {"budget": 2, "workers": 1, "sampler": "random"}})
    front = json.loads((run.out / "front.json").read_text())
    assert (front["metric"], front["family"], front["direction"]) == ("ppl", "causal-lm", "min")
    assert len(front["candidates"]) == 2 and front["front"]
    teacher = front["teacher"]
    assert teacher["kl"] == 0.0 and teacher["top1"] == 1.0
    for c in front["candidates"]:
        m = c["metrics"]
        assert m["ppl_increase"] == pytest.approx(m["ppl"] / teacher["ppl"] - 1)
        assert m["ppl"] > 1 and m["ppl_test"] > 1 and 0 <= m["top1"] <= 1 and m["kl"] >= 0
        assert c["provenance"]["latency_ms@local"] == "measured"
        assert c["provenance"]["decode_tok_s@local"] == "measured" and m["decode_tok_s@local"] > 0
        assert m["memory_bytes"] > m["size_bytes"]  # and the KV cache at 2,048 tokens
        assert c["provenance"]["latency_ms@raspberry-pi-4"] == "modelled"
        assert c["provenance"]["decode_tok_s@raspberry-pi-4"] == "modelled"
        assert not any(k.endswith("_drop") for k in m)
    assert (run.out / "front.html").is_file()
    # the uniform recipes, once each, beside the front: not trials, tagged baseline in MLflow
    names = ["rtn-w4g128", "gptq-w4g128", "awq-w4g128", "rtn-w8g128", "w8a8-smoothquant"]
    assert [b["name"] for b in front["baselines"]] == names
    for b in front["baselines"]:
        assert b["metrics"]["ppl"] > 1 and b["metrics"]["decode_tok_s@local"] > 0 and b["run_id"]
        assert b["provenance"]["decode_tok_s@local"] == "measured"
    from mlflow import MlflowClient

    state = json.loads((run.out / "job.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    # candidates and baselines timed alike: in rounds alternating with the teacher's deployed graph
    assert client.get_run(state["parent_run_id"]).data.params["local_latency"].startswith("paired: the deployed graph")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`slimsearch.role` = 'baseline'")
    assert sorted(r.data.tags["baseline"] for r in runs) == sorted(names)
    assert sorted(r.info.run_id for r in runs) == sorted(b["run_id"] for b in front["baselines"])


def test_a_folder_that_is_not_a_causal_lm_is_one_line_exit_2_and_nothing_written(tmp_path):
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    job = write_job(tmp_path, {"name": "not-lm", "task": "causal-lm:encoder"})
    result = cli("run", str(job), "--out", str(tmp_path / "out"), "--executor", "local", "--no-progress")
    assert result.code == 2
    (line,) = result.stderr.splitlines()
    assert str(job) in line and "is a 'bert' model, not a decoder-only causal LM" in line
    assert "allowed model_type: ['llama'" in line
    assert not (tmp_path / "out").exists()


def test_a_choice_a_causal_lm_does_not_use_is_refused_once_the_task_is_known(made, tmp_path):
    job = write_job(tmp_path, {"name": "lm-prune", "task": f"causal-lm:{made / 'models' / 'tiny'}",
                               "text": [str(made / "notes.txt")], "space": {"prune_ratio": [0.0, 0.5]}})
    result = cli("run", str(job), "--out", str(tmp_path / "out"), "--executor", "local", "--no-progress")
    assert result.code == 2, result.stderr
    *progress, line = result.stderr.splitlines()  # the error is the last line; before it, what the job was doing
    assert all(p.startswith("[slimsearch]") for p in progress) and line.startswith("slimsearch: error:")
    assert "space.prune_ratio: a causal-lm task does not use prune_ratio" in line and "allowed: [0.0]" in line
    assert not (tmp_path / "out").exists()


def test_a_front_member_exports_as_verified_genai_and_hugging_face_folders(tmp_path):
    """The chosen member is rebuilt from its plan (the same codes, the same validation perplexity),
    written as an ONNX Runtime GenAI folder and a compressed-tensors folder, each loaded back and
    scored on the test text. A vocabulary of 256: the builder's graph of the usual tiny model (64)
    computes other logits (see test_export_refuses_a_graph_that_does_not_compute_the_model)."""
    from slimsearch.compress import apply_plan
    from slimsearch.export_llm import codes_sha256
    from slimsearch.spaces import CompressionPlan
    from slimsearch.tasks import load_task

    model_dir = _tiny_llm.folder(tmp_path / "wide", vocab=256)
    notes = str(_tiny_llm.text(tmp_path / "notes.txt"))
    run = local_job(tmp_path, {
        "name": "lm-export", "task": f"causal-lm:{model_dir}", "text": [notes],
        "space": {"weight_bits": [4, 8], "kv_bits": [32]},
        "objectives": {"ppl": "min", "size_bytes": "min"}, "profiles": [],
        "search": {"budget": 2, "workers": 1, "sampler": "random", "baselines": False}})
    result = cli("export", str(run.out), "--out", str(tmp_path / "export"), "--no-register")
    assert result.code == 0, result.stderr
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    member = next(c for c in json.loads((run.out / "front.json").read_text())["candidates"]
                  if c["trial"] == manifest["trial"])
    assert manifest["formats"] == ["genai", "hf"]
    assert manifest["validation_ppl_rebuilt"] == member["metrics"]["ppl"]  # rebuilt exactly
    task = load_task(f"causal-lm:{model_dir}", text=[notes])
    assert manifest["codes_sha256"] == codes_sha256(apply_plan(task, CompressionPlan.from_dict(member["plan"])))
    recorded = member["metrics"]["ppl_test"]
    for fmt, ppl in manifest["test_ppl_by_format"].items():
        assert ppl == pytest.approx(recorded, rel=0.02), fmt
    assert "genai/genai_config.json" in manifest["files"] and "hf/config.json" in manifest["files"]
    assert json.loads((tmp_path / "export" / "genai" / "tokenizer_config.json").read_text())  # the model's own
    assert manifest["latency_at_export_measured_ms"]["model"]["decode_tok_s@local"] > 0


def test_export_refuses_a_graph_that_does_not_compute_the_model(tmp_path):
    from slimsearch.deploy.llm_graph import deployed_graph

    with pytest.raises(ConfigError, match="gives other logits than the model.*a vocabulary of 64"):
        deployed_graph(_tiny_llm.llama(), tmp_path / "graph", verify=True)
    assert not (tmp_path / "graph").exists()
