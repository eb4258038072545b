"""The production configuration, for real: a Prefect server on PostgreSQL with Redis messaging,
MLflow on PostgreSQL, artifacts on S3 (moto_server). Skipped, with the reason, where no PostgreSQL
or Redis answers on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import NEEDS_PG_REDIS, PG, REDIS_LOCKS, audit_json, cli_env, make_bucket

pytestmark = [NEEDS_PG_REDIS, pytest.mark.scenario]


def test_audit_on_postgres_redis_and_s3(
    databases, prefect_on_postgres: str, s3_endpoint: str, tiny_gpt2_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    import httpx
    import psycopg2
    from mlflow import MlflowClient

    make_bucket(s3_endpoint, "prod")
    mlflow_uri = f"postgresql+psycopg2://postgres@{PG}/{databases[1]}"
    config = "dataset:\n  seq_len: 32\n  max_tokens: 512\nquantize:\n  formats: [fp16]\ntrace:\n  layers: [0, -1]\n"
    env = cli_env(
        tmp_path,
        prefect_on_postgres,
        MICROSCOPE_STORE="s3://prod/audits",
        MICROSCOPE_S3_ENDPOINT_URL=s3_endpoint,
        AWS_ACCESS_KEY_ID="t",
        AWS_SECRET_ACCESS_KEY="t",
        AWS_DEFAULT_REGION="us-east-1",
        MLFLOW_TRACKING_URI=mlflow_uri,
        MICROSCOPE_REDIS_URL=REDIS_LOCKS,  # stage locks shared across pods
    )
    rec = audit_json(tiny_gpt2_dir, corpus_file, config, env, tmp_path)
    assert rec["status"] == "completed" and rec["store_uri"] == "s3://prod/audits"
    assert rec["mlflow_tracking_uri"] == mlflow_uri
    locks = tmp_path / "home" / "locks"  # Redis held the stage locks; files only for MLflow's local schema
    assert not [p.name for p in locks.glob("*") if "_trace_" in p.name or "_ingest_" in p.name]

    second = audit_json(tiny_gpt2_dir, corpus_file, config, env, tmp_path)
    ran = {s: r["status"] for s, r in second["stages"].items() if r["status"] != "skipped"}
    assert ran == {
        "ingest": "cached",
        "quantize": "cached",
        "trace": "cached",
        "metrics": "cached",
        "report": "cached",
    }
    variant_file = second["variants"]["fp16"]["quantize"]["artifacts"]["variant/model.safetensors"]
    assert variant_file.startswith("s3://prod/audits/")

    # The flow runs live in the Postgres-backed Prefect server...
    flow_run = httpx.get(f"{prefect_on_postgres}/flow_runs/{rec['prefect_flow_run_id']}").json()
    assert flow_run["name"] == rec["audit_id"] and flow_run["state"]["type"] == "COMPLETED"
    with (
        psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=databases[0]) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("SELECT count(*) FROM flow_run WHERE name IN (%s, %s)", (rec["audit_id"], second["audit_id"]))
        assert cur.fetchone()[0] == 2
    # ...and the MLflow runs in Postgres, parent and one child per stage.
    client = MlflowClient(tracking_uri=mlflow_uri)
    parent = client.get_run(rec["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == [
        "ingest",
        "metrics",
        "quantize[fp16]",
        "report",
        "trace",
        "trace[fp16]",
    ]
