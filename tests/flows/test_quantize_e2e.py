"""Quantized variants through the whole pipeline: one MLflow child run per variant, each traced, and a
later run that adds a format computes only that format."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import audit_json, cli_env

BASE = """
dataset:
  seq_len: 32
  max_tokens: 512
quantize:
  formats: {formats}
  eval_windows: 4
trace:
  layers: [0, -1]
  hooks: [resid, mlp]
  batch_size: 8
"""


def test_adding_a_format_quantizes_only_the_new_one(
    prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    env = cli_env(tmp_path, prefect_api)

    def audit(formats: str) -> dict:
        return audit_json(tiny_gpt2_dir, corpus_file, BASE.format(formats=formats), env, tmp_path)

    first = audit("[fp16]")
    assert first["stages"]["quantize"]["status"] == "completed"
    fp16 = first["variants"]["fp16"]
    assert fp16["quantize"]["details"]["produced"] == "fp16"
    assert fp16["quantize"]["metrics"]["min_cosine"] >= 0.9999
    assert fp16["trace"]["status"] == "completed" and fp16["trace"]["variant"] == "fp16"
    assert fp16["trace"]["details"]["prefix"] != first["stages"]["trace"]["details"]["prefix"]  # keyed by variant

    second = audit("[fp16, torch-int8]")
    status = {v: {s: r["status"] for s, r in recs.items()} for v, recs in second["variants"].items()}
    assert status == {
        "fp16": {"quantize": "cached", "trace": "cached"},
        "torch-int8": {"quantize": "completed", "trace": "completed"},
    }
    assert second["stages"]["ingest"]["status"] == "cached" and second["stages"]["trace"]["status"] == "cached"
    q8 = second["variants"]["torch-int8"]["quantize"]
    assert q8["metrics"]["measured_bytes"] < q8["metrics"]["fp_bytes"]
    assert "kl_mean" in q8["metrics"] and 0 <= q8["metrics"]["top1_agreement"] <= 1

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    parent = client.get_run(second["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    names = sorted(c.info.run_name for c in children)
    assert names == sorted(
        [
            "ingest",
            "trace",
            "metrics",
            "report",
            "quantize[fp16]",
            "quantize[torch-int8]",
            "trace[fp16]",
            "trace[torch-int8]",
        ]
    )
    q_child = next(c for c in children if c.info.run_name == "quantize[torch-int8]")
    assert q_child.data.tags["microscope.variant"] == "torch-int8"
    assert q_child.data.metrics["measured_bytes"] == q8["metrics"]["measured_bytes"]
    html = Path(second["report_uri"]).read_text()
    assert "Quantized variants" in html and "torch-int8" in html and "drifts most" in html
