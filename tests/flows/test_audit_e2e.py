"""End to end through the `microscope` command, against a real local Prefect server, MLflow on
SQLite and moto_server as S3: completed, then cached in a fresh process with nothing recomputed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_bucket, run_cli

CONFIG = """
dataset:
  seq_len: 32
  max_tokens: 1024
trace:
  layers: all
  hooks: [resid, mlp, attn]
  batch_size: 8
  part_tokens: 256
"""
STAGES = ("ingest", "trace", "metrics", "report")


@pytest.fixture(scope="module")
def audit_env(tmp_path_factory: pytest.TempPathFactory, prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path):
    root = tmp_path_factory.mktemp("e2e")
    (root / "audit.yaml").write_text(CONFIG)
    env = {
        **os.environ,
        "MICROSCOPE_HOME": str(root / "home"),
        "PREFECT_API_URL": prefect_api,
        "PREFECT_HOME": str(root / "prefect-client"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    for k in ("MICROSCOPE_STORE", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    args = ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file), "--config", str(root / "audit.yaml")]
    args += ["--stages", "ingest,quantize,trace,sae,metrics,report"]  # robustness: its own tests
    return root, env, args


def run_json(root: Path, env: dict, args: list[str]) -> dict:
    proc = run_cli([*args, "--json"], env, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # stdout is the record and nothing else


def artifact_files(home: Path) -> dict[str, float]:
    art = home / "artifacts"
    return {
        p.relative_to(art).as_posix(): p.stat().st_mtime_ns
        for p in art.rglob("*")
        if p.is_file() and not p.relative_to(art).as_posix().startswith("audits/")
    }


@pytest.fixture(scope="module")
def two_runs(audit_env):
    root, env, args = audit_env
    first = run_json(root, env, args)
    files_after_first = artifact_files(root / "home")
    second = run_json(root, env, args)
    return first, second, files_after_first


def test_first_run_completes_every_stage(two_runs) -> None:
    first, _, files = two_runs
    assert first["status"] == "completed"
    assert {s: first["stages"][s]["status"] for s in STAGES} == {s: "completed" for s in STAGES}
    assert first["architecture"]["family"] == "gpt2" and first["architecture"]["n_layers"] == 3
    assert first["dataset"]["n_tokens"] == 1024 and first["dataset"]["seq_len"] == 32
    assert len(first["stages"]["trace"]["details"]["datasets"]) == 9
    assert Path(first["report_uri"]).is_file()
    assert any(k.endswith("part-00000.parquet") for k in files)


def test_second_run_in_fresh_process_is_all_cached(two_runs, audit_env, prefect_api: str) -> None:
    first, second, files_before = two_runs
    root, _, _ = audit_env
    assert second["audit_id"] != first["audit_id"]
    assert {s: second["stages"][s]["status"] for s in STAGES} == {s: "cached" for s in STAGES}
    assert second["model_digest"] == first["model_digest"] and second["report_uri"] == first["report_uri"]
    # Nothing was rewritten...
    assert artifact_files(root / "home") == files_before
    # ...and Prefect confirms no stage function ran: every stage task run ended in state Cached.
    runs = httpx.post(
        f"{prefect_api}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [second["prefect_flow_run_id"]]}}},
    ).json()
    states = {r["name"].rsplit("-", 1)[0]: r["state"]["name"] for r in runs}
    assert {s: states.get(s) for s in STAGES} == {s: "Cached" for s in STAGES}, states


def test_mlflow_parent_with_child_per_stage_and_lineage(two_runs, audit_env) -> None:
    from mlflow import MlflowClient

    first, _, _ = two_runs
    root, _, _ = audit_env
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'home' / 'mlflow.db'}")
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.data.tags["microscope.model_digest"] == first["model_digest"]
    assert parent.data.tags["prefect.flow_run_id"] == first["prefect_flow_run_id"]
    assert parent.data.params["trace.hooks"] == "['resid', 'mlp', 'attn']"
    inputs = {d.dataset.digest: d for d in parent.inputs.dataset_inputs}
    assert first["dataset_digest"][:36] in inputs and first["model_digest"][:36] in inputs
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["microscope.stage"] for c in children) == sorted(STAGES)
    trace_child = next(c for c in children if c.data.tags["microscope.stage"] == "trace")
    assert trace_child.data.metrics["tokens"] == 1024
    assert trace_child.data.params["batch_size"] == "8"
    assert [a.path for a in client.list_artifacts(trace_child.info.run_id)] == ["manifest.json"]
    assert "audit_record.json" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert any(a.path.endswith(".html") for a in client.list_artifacts(parent.info.run_id))


def test_show_and_list(two_runs, audit_env) -> None:
    first, second, _ = two_runs
    root, env, _ = audit_env
    shown = run_cli(["show", first["audit_id"], "--json"], env, root)
    assert shown.returncode == 0 and json.loads(shown.stdout) == first
    listed = run_cli(["list", "--json"], env, root)
    ids = [r["audit_id"] for r in json.loads(listed.stdout)]
    assert first["audit_id"] in ids and second["audit_id"] in ids
    missing = run_cli(["show", "nope"], env, root)
    assert missing.returncode == 2 and "no audit 'nope'" in missing.stderr


def test_stages_subset_pulls_dependencies(audit_env, tmp_path: Path) -> None:
    root, env, args = audit_env
    env = {**env, "MICROSCOPE_HOME": str(tmp_path / "home")}
    rec = run_json(root, env, [*args, "--stages", "trace"])
    assert {s: rec["stages"][s]["status"] for s in STAGES} == {
        "ingest": "completed",
        "trace": "completed",
        "metrics": "skipped",
        "report": "skipped",
    }
    assert rec["report_uri"] is None


def test_s3_store_holds_the_same_artifacts(two_runs, audit_env, s3_endpoint: str) -> None:
    import boto3

    first, _, _ = two_runs
    root, env, args = audit_env
    make_bucket(s3_endpoint, "audits")
    s3env = {
        **env,
        "MICROSCOPE_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "t",
        "AWS_SECRET_ACCESS_KEY": "t",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MICROSCOPE_HOME": str(root / "home-s3"),
    }
    rec = run_json(root, s3env, ["--store", "s3://audits/team", *args])
    assert rec["status"] == "completed" and rec["store_uri"] == "s3://audits/team"
    assert rec["report_uri"].startswith("s3://audits/team/")
    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="t", aws_secret_access_key="t", region_name="us-east-1"
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="audits", Prefix="team/")
    s3_keys = {o["Key"].removeprefix("team/") for p in pages for o in p.get("Contents", [])}
    local = root / "home" / "artifacts"
    local_keys = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    strip = {k for k in local_keys | s3_keys if k.startswith("audits/")}
    assert s3_keys - strip == local_keys - strip
    for key in sorted(k for k in local_keys if k.endswith(".parquet")):  # the data itself, byte for byte
        assert s3.get_object(Bucket="audits", Key=f"team/{key}")["Body"].read() == (local / key).read_bytes(), key


def test_runs_without_a_prefect_server(tiny_gpt2_dir: Path, corpus_file: Path, tmp_path: Path) -> None:
    """No PREFECT_API_URL: Prefect starts its temporary local server, and the audit runs the same."""
    env = {**os.environ, "MICROSCOPE_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "ph")}
    env.pop("PREFECT_API_URL", None)
    proc = run_cli(
        ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file), "--stages", "ingest", "--json"],
        env,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(proc.stdout)
    assert rec["stages"]["ingest"]["status"] == "completed" and rec["stages"]["trace"]["status"] == "skipped"
    assert "temporary server" in proc.stderr
