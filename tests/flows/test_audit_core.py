"""The audit core under real use, through the `microscope` command against a real local Prefect
server: concurrent audits compute each stage once, a kill -9 loses nothing finished and leaves no
half-written artifact, damaged artifacts are recomputed, training runs list in step order, and the
demo's own text configuration runs on a tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SMALL_AUDIT, VENV_BIN, build_model, cli_env, corpus_lines, run_cli

SMALL = SMALL_AUDIT  # a fast text audit: every stage but robustness in seconds
NO_ROBUSTNESS = "ingest,quantize,trace,sae,metrics,report"


def _statuses(rec: dict) -> dict[str, str]:
    """Every computation in an audit record: stages, per-variant stages, SAEs -> status."""
    out = {
        s: r["status"] for s, r in rec["stages"].items() if s not in ("quantize", "sae") and r["status"] != "skipped"
    }
    out |= {f"{s}[{v}]": r["status"] for v, recs in rec["variants"].items() for s, r in recs.items()}
    out |= {f"sae[{h}]": r["status"] for h, r in rec["saes"].items()}
    return out


def _start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A cold `microscope` (no warm process): the audit is this process group, for kill -9 to take down."""
    return subprocess.Popen(
        [str(VENV_BIN / "microscope"), *args],
        env={k: v for k, v in env.items() if k != "MICROSCOPE_WARM_SOCKET"},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: kill -9 takes the whole audit down
    )


def test_two_concurrent_audits_compute_each_stage_once(
    prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    (tmp_path / "audit.yaml").write_text(SMALL)
    env = cli_env(tmp_path, prefect_api)  # one fresh store, MLflow database and lock folder for both
    args = ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file), "--config", "audit.yaml"]
    args += ["--stages", NO_ROBUSTNESS, "--run-id", "run7", "--tag", "branch=main", "--json"]
    procs = [_start([*args, "--step", step], env, tmp_path) for step in ("200", "100")]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]  # neither trips over the other (MLflow's schema, the store)
    a, b = (_statuses(json.loads(out)) for out, _ in outs)
    assert a.keys() == b.keys() and {"ingest", "trace", "trace[int8]", "quantize[int8]", "metrics"} <= a.keys()
    for step in a:  # exactly one of the two computed it; the other waited on the lock and took the result
        assert sorted([a[step], b[step]]) == ["cached", "completed"], (step, a[step], b[step])

    # The two checkpoints of training run `run7`, in step order, with their tags.
    listed = json.loads(run_cli(["list", "--run", "run7", "--json"], env, tmp_path).stdout)
    assert [(r["run_id"], r["step"], r["tags"]) for r in listed] == [
        ("run7", 100, {"branch": "main"}),
        ("run7", 200, {"branch": "main"}),
    ]
    assert json.loads(run_cli(["list", "--run", "other", "--json"], env, tmp_path).stdout) == []
    bad = run_cli([*args, "--tag", "no-equals"], env, tmp_path)
    assert bad.returncode == 2 and "key=value" in bad.stderr


def _bigger_gpt2(tmp_path: Path, tokenizer_dir: Path) -> Path:
    """Slow enough to trace (a few seconds) that a kill lands mid-trace."""
    from transformers import AutoTokenizer

    out = tmp_path / "gpt2-wide"
    build_model("gpt2", n_layer=4, n_embd=128, n_head=4).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def test_kill_9_during_trace_then_rerun_resumes(prefect_api: str, bpe_tokenizer_dir: Path, tmp_path: Path) -> None:
    from microscope.stages.runner import finished

    model = _bigger_gpt2(tmp_path, bpe_tokenizer_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines(400)) + "\n")
    (tmp_path / "audit.yaml").write_text(
        "dataset: {seq_len: 64, max_tokens: 12288}\n"
        "trace: {layers: all, hooks: [resid, mlp, attn], batch_size: 1, part_tokens: 256}\n"
    )
    env = cli_env(tmp_path, prefect_api)
    args = ["run", "--model", str(model), "--dataset", str(corpus), "--config", "audit.yaml", "--stages", "trace"]
    art = tmp_path / "home" / "artifacts"
    proc = _start([*args, "--json"], env, tmp_path)
    deadline = time.monotonic() + 300
    while not list(art.glob("*/trace/*/blocks.0.hook_resid_post/part-00001.parquet")):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the trace never wrote a part"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-trace: parts on disk, no manifest
    proc.wait()
    (prefix,) = {p.parent.parent.relative_to(art).as_posix() for p in art.glob("*/trace/*/*/part-*.parquet")}
    assert not (art / prefix / "manifest.json").exists(), "the trace finished before the kill; slow it down"

    again = run_cli([*args, "--json"], env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    rec = json.loads(again.stdout)
    assert rec["stages"]["ingest"]["status"] == "cached"
    assert rec["stages"]["trace"]["status"] == "completed"
    assert rec["stages"]["trace"]["details"]["resumed_from_window"] > 0  # finished parts were kept
    assert not [p for p in art.rglob("*") if ".tmp-" in p.name]  # no half-written file survives
    from microscope.store import LocalStore

    assert finished(LocalStore(art), prefix) is not None  # every artifact matches its manifest checksum


def test_damaged_artifacts_are_recomputed(
    prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    (tmp_path / "audit.yaml").write_text(SMALL)
    env = cli_env(tmp_path, prefect_api)
    args = ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file), "--config", "audit.yaml"]
    args += ["--stages", "trace", "--json"]
    first = json.loads(run_cli(args, env, tmp_path).stdout)
    art = tmp_path / "home" / "artifacts"
    part = sorted((art / first["stages"]["trace"]["details"]["prefix"]).rglob("part-*.parquet"))[0]
    tokens = art / first["stages"]["ingest"]["details"]["tokens_key"]
    good_part, good_tokens = part.read_bytes(), tokens.read_bytes()
    part.write_bytes(good_part[: len(good_part) // 2])  # truncated
    flipped = bytearray(good_tokens)
    flipped[len(flipped) // 2] ^= 0xFF  # same size, other content: only the sha256 can tell
    tokens.write_bytes(bytes(flipped))

    again = run_cli(args, env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    rec = json.loads(again.stdout)
    assert rec["stages"]["ingest"]["status"] == "completed" and rec["stages"]["trace"]["status"] == "completed"
    warnings = again.stderr
    assert part.name in warnings and "truncated" in warnings  # each warning names the file and what is wrong
    assert tokens.name in warnings and "corrupted" in warnings
    assert part.read_bytes() == good_part and tokens.read_bytes() == good_tokens  # recomputed, same bytes


def test_entry_flow_validates_plain_parameters() -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.audit import audit

    ok = audit.validate_parameters({"model": "m", "config": {"dataset": {"seq_len": 16}}, "step": 3})
    assert ok["step"] == 3 and ok["config"] == {"dataset": {"seq_len": 16}}
    with pytest.raises(ParameterTypeError):
        audit.validate_parameters({"model": "m", "step": "three"})
    json.dumps(audit.parameters.model_dump())  # a deployment can publish its schema


def _demo_config_for_tiny_model(out: Path) -> Path:
    """examples/demo.yaml as the demo runs it, scaled down (tokens, epochs, samples) and nothing dropped."""
    cfg = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())
    cfg["dataset"] |= {"seq_len": 32, "max_tokens": 2048}
    cfg["quantize"]["eval_windows"] = 4
    cfg["sae"] |= {"batch_size": 128, "epochs": 2, "buffer_tokens": 1024, "dead_window": 4096}
    cfg["robustness"] |= {"samples": 2, "batch_size": 2, "context_tokens": 16, "pgd_steps": 2}
    cfg["metrics"] = {"sensitivity_windows": 1, "hutchinson_probes": 2, "cka_tokens": 256}
    out.write_text(yaml.safe_dump(cfg))
    return out


def test_demo_text_configuration_on_a_tiny_model(
    prefect_api: str, wordpiece_tokenizer_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    model = tmp_path / "tiny-minilm"  # MiniLM's family (BERT encoder), six layers as the demo traces
    build_model("bert", num_hidden_layers=6).save_pretrained(model)
    AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir).save_pretrained(model)
    config = _demo_config_for_tiny_model(tmp_path / "demo.yaml")
    env = cli_env(tmp_path, prefect_api)
    p = run_cli(
        ["run", "--model", str(model), "--dataset", str(corpus_file), "--config", str(config), "--json"], env, tmp_path
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(p.stdout)
    assert {s: r["status"] for s, r in rec["stages"].items()} == dict.fromkeys(
        (
            "ingest",
            "quantize",
            "trace",
            "sae",
            "metrics",
            "landscape",
            "robustness",
            "reliability",
            "attribution",
            "report",
        ),
        "completed",
    )
    for fmt in ("int8", "nf4"):  # every variant quantized, traced, attacked and checked for reliability
        assert {s: r["status"] for s, r in rec["variants"][fmt].items()} == dict.fromkeys(
            ("quantize", "trace", "robustness", "reliability"), "completed"
        )
    rel = rec["stages"]["reliability"]  # an encoder: OOD on its embeddings, no class probabilities
    assert "calibration" not in rel["details"] and "ece" in rel["undefined"]
    assert set(rel["details"]["ood"]["shuffled-tokens"]) == {"mahalanobis", "knn"}
    assert rec["variants"]["nf4"]["quantize"]["details"]["paths"] == {
        "dequantize-matmul": 37
    }  # 6 layers × 6 + the pooler
    assert Path(rec["report_uri"]).is_file()


def test_a_failed_variant_leaves_the_others_and_the_stage_partial(
    prefect_api: str, digits_cnn: tuple[Path, Path], tmp_path: Path
) -> None:
    """bitsandbytes int8 needs an HF folder, so it fails on the digits CNN's bare state dict; fp16 does
    not care. The audit goes on with fp16 and says which variant failed and why."""
    (tmp_path / "audit.yaml").write_text(
        "model: {module: 'microscope.models.vision:DigitsCNN'}\nquantize: {formats: [int8, fp16]}\n"
    )
    env = cli_env(tmp_path, prefect_api)
    args = ["run", "--model", str(digits_cnn[0]), "--dataset", str(digits_cnn[1]), "--config", "audit.yaml"]
    p = run_cli([*args, "--stages", "ingest,quantize,report", "--json"], env, tmp_path)
    assert p.returncode == 1, p.stderr[-3000:]  # partial: not a clean success
    assert "quantize[int8]" in p.stderr.splitlines()[-1] and "HF checkpoint folder" in p.stderr.splitlines()[-1]
    rec = json.loads(p.stdout)
    q = rec["stages"]["quantize"]
    assert rec["status"] == "partial" and q["status"] == "partial"
    assert q["details"]["parts"] == {"int8": "failed", "fp16": "completed"}
    assert "HF checkpoint folder" in q["details"]["reasons"]["int8"]
    assert rec["variants"]["fp16"]["quantize"]["status"] == "completed"
    assert rec["stages"]["ingest"]["status"] == rec["stages"]["report"]["status"] == "completed"
    html = Path(rec["report_uri"]).read_text()
    assert "partial" in html and "HF checkpoint folder" in html
