"""`microscope steer` on the session's finished tiny-GPT-2 audit: the JSON's KL and edited top-k equal a forward
with the edit applied by hand (the SAE read with safetensors, its max activation from the features table), and
bad edits, hooks and variants are one-line refusals with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from microscope import results
from microscope.store import open_store
from tests.conftest import run_cli

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def audit(finished_audits: dict[str, dict]) -> dict:
    return finished_audits["step1"]


def env_for(audit: dict) -> dict[str, str]:
    import os

    return {**os.environ, "MICROSCOPE_STORE": audit["store_uri"]}


def test_steer_json_is_the_hand_edited_forward(audit: dict, tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GPT2LMHeadModel

    store = open_store(audit["store_uri"])
    rec = results.load_audit(store, audit["audit_id"])
    table = results.features(store, rec, HOOK)
    feature = int(table.loc[table["max_activation"].idxmax(), "feature"])
    max_act = float(table.loc[table["feature"] == feature, "max_activation"].iloc[0])
    prompt = "The class definition creates"
    args = ["steer", audit["audit_id"], "--hook", HOOK, "--feature", f"{feature}=+2", "--prompt", prompt, "--json"]
    p = run_cli(args, env_for(audit), tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)

    sae_prefix = rec.saes[HOOK].details["prefix"]
    w_dec = load_file(str(store.local_path(f"{sae_prefix}/sae/sae_weights.safetensors")))["W_dec"]
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    ids = AutoTokenizer.from_pretrained(tiny_gpt2_dir)(prompt, return_tensors="pt")["input_ids"]
    direction = 2.0 * max_act * w_dec[feature]

    def add(_m: torch.nn.Module, _i: object, o: object) -> object:
        return (o[0] + direction, *o[1:]) if isinstance(o, tuple) else o + direction

    with torch.no_grad():
        clean = model(input_ids=ids).logits[0, -1].double().softmax(-1).numpy()
        handle = model.transformer.h[1].register_forward_hook(add)
        try:
            edited = model(input_ids=ids).logits[0, -1].double().softmax(-1).numpy()
        finally:
            handle.remove()
    assert out["kl"] == pytest.approx(entropy(clean, edited), rel=1e-6, abs=1e-9)
    assert [t["token_id"] for t in out["top_edited"]] == list(np.argsort(-edited, kind="stable")[:10])
    assert out["edits"] == [{"feature": feature, "mode": "add", "alpha": 2.0}]
    assert out["features"][0]["after_mean"] > out["features"][0]["before_mean"]
    cost = out["off_target"]  # the edit's cost on the audit's last 4 windows (its mathematics: test_steering)
    assert (
        cost["windows"] == 4
        and cost["kl_mean"] > 0
        and cost["ppl_edited"] - cost["ppl_clean"] == pytest.approx(cost["delta_ppl"])
    )


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--feature", "3=+x"], "bad edit '3=+x'"),
        (["--feature", "3=+1", "--hook", "blocks.0.hook_resid_post"], "has no SAE on 'blocks.0.hook_resid_post'"),
        (["--feature", "3=+1", "--variant", "nf4"], "has no variant 'nf4'"),
        (["--feature", "3=+1", "--positions", "5:2"], "--positions '5:2'"),
    ],
)
def test_steer_refuses_in_one_line(audit: dict, tmp_path: Path, extra: list[str], says: str) -> None:
    args = ["steer", audit["audit_id"], "--hook", HOOK, "--prompt", "x", *extra]
    if "--hook" in extra[2:]:
        args = ["steer", audit["audit_id"], "--prompt", "x", *extra]
    p = run_cli(args, env_for(audit), tmp_path)
    assert p.returncode == 2 and says in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1


def test_patch_export_import_apply_on_the_audit(audit: dict, tmp_path: Path) -> None:
    """An add edit exported as a patch reproduces the SAE-steered model (a bias: exact up to float rounding),
    loads back against the same weights, and `apply` runs it through peft."""
    store = open_store(audit["store_uri"])
    rec = results.load_audit(store, audit["audit_id"])
    table = results.features(store, rec, HOOK)
    feature = int(table.loc[table["max_activation"].idxmax(), "feature"])
    out = tmp_path / "patch"
    args = ["patch", "export", audit["audit_id"], "--hook", HOOK, "--feature", f"{feature}=+2", "--out", str(out)]
    p = run_cli([*args, "--json"], env_for(audit), tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    exported = json.loads(p.stdout)
    fid = exported["fidelity"]
    assert exported["store_key"] == f"patches/{audit['audit_id']}/patch"  # a copy the Lineage page lists
    from microscope.results.lineage import find_patches

    assert [q["key"] for q in find_patches(store, rec)] == [exported["store_key"]]
    assert fid["kl_patched"] < 1e-9 < fid["kl_unpatched"] and fid["rel_residual"] < 1e-5  # a bias: exact
    assert {"adapter_config.json", "adapter_model.safetensors", "microscope_patch.json"} <= {
        f.name for f in out.iterdir()
    }
    p = run_cli(["patch", "import", str(out), "--audit", audit["audit_id"]], env_for(audit), tmp_path)
    assert p.returncode == 0 and "matches audit" in p.stdout, p.stderr[-2000:]
    p = run_cli(
        ["patch", "apply", str(out), "--audit", audit["audit_id"], "--prompt", "The class"], env_for(audit), tmp_path
    )
    assert p.returncode == 0 and "KL(steered ‖ patched)" in p.stdout, p.stderr[-2000:]
    assert not p.stderr.strip(), p.stderr  # no library chatter on a quiet console


def test_a_patched_model_is_audited_as_a_variant(
    audit: dict, tmp_path: Path, prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path
) -> None:
    """`patch-<name>` in quantize.formats audits the checkpoint with the exported patch in its weights: the
    variant's fidelity equals the fidelity of the model patched directly (load_adapter + apply_patch); a patch
    of other weights is refused in one line."""
    from microscope.fidelity import fidelity
    from microscope.modality import open_data
    from microscope.models import loading
    from microscope.patches import apply_patch, load_adapter
    from microscope.trace import resolve_points
    from schemas.config import ModelConfig
    from tests.conftest import SMALL_AUDIT, cli_env

    store = open_store(audit["store_uri"])
    rec = results.load_audit(store, audit["audit_id"])
    table = results.features(store, rec, HOOK)
    feature = int(table.loc[table["max_activation"].idxmax(), "feature"])
    out = tmp_path / "steer"
    args = ["patch", "export", audit["audit_id"], "--hook", HOOK, "--feature", f"{feature}=+2", "--out", str(out)]
    assert run_cli(args, env_for(audit), tmp_path).returncode == 0
    config = tmp_path / "audit.yaml"
    config.write_text(
        SMALL_AUDIT.replace(
            "formats: [int8, magnitude-30, magnitude-50]", f"formats: [patch-steer], patches: {{steer: {out}}}"
        )
    )
    run = ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file), "--config", str(config)]
    p = run_cli([*run, "--stages", "ingest,quantize", "--json"], cli_env(tmp_path, prefect_api), tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout)["variants"]["patch-steer"]["quantize"]

    ref = loading.resolve(ModelConfig(source=str(tiny_gpt2_dir)))
    fp, patched = loading.load_model(ref).eval(), loading.load_model(ref).eval()
    apply_patch(patched, load_adapter(out)[1])
    new = open_store(str(tmp_path / "home" / "artifacts"))
    ingest = results.load_audit(new, json.loads(p.stdout)["audit_id"]).stages["ingest"]
    held_out = open_data(ingest, new).ids[-8:]  # quantize.eval_windows' default
    arch = loading.describe(fp)
    points = resolve_points(arch.hook_points, list(range(arch.n_layers)), ["resid"], arch.family)
    stats, _ = fidelity(fp, patched, held_out, points, 8, True)
    assert got["metrics"]["kl_mean"] == pytest.approx(stats["kl_mean"], rel=1e-6) and stats["kl_mean"] > 0

    other = tmp_path / "other"  # the same patch claimed for other weights
    other.mkdir()
    for f in out.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    meta = json.loads((other / "microscope_patch.json").read_text())
    (other / "microscope_patch.json").write_text(json.dumps(meta | {"weights_digest": "0" * 64}))
    config.write_text(config.read_text().replace(str(out), str(other)))
    p = run_cli([*run, "--stages", "ingest,quantize"], cli_env(tmp_path, prefect_api), tmp_path)
    assert p.returncode in (1, 2) and "was made for weights 0000000000000000" in p.stderr, p.stderr[-2000:]
