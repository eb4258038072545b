"""Gate rules judged on fixed, hand-written records against verdicts computed by hand: absolute and
relative checks, every aggregation, wildcards, a missing baseline, a baseline still being audited (waited
for), unknown paths, rule files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from microscope import audits, gates
from microscope.store import LocalStore
from schemas.gates import Check, GateRules
from schemas.records import AuditRecord, AuditStart, ModelRef, StageRecord, StageStatus

MATRICES = ("h.0.attn.weight", "h.0.mlp.weight", "h.1.attn.weight", "h.1.mlp.weight")


def record(
    store: LocalStore,
    audit_id: str,
    step: int | None,
    spectral: tuple[float, ...],
    alpha: tuple[float, ...] = (3.0, 3.5, 4.0, 7.5),
    kl: float = 0.01,
    fvu: float = 0.2,
    drift: tuple[float, float] = (0.02, 0.03),
    run_id: str | None = "run",
    tags: dict[str, str] | None = None,
    save: bool = True,
) -> AuditRecord:
    weights = [
        {"name": n, "layer": int(n.split(".")[1]), "shape": [8, 8], "spectral_norm": s, "alpha": a, "flags": []}
        for n, s, a in zip(MATRICES, spectral, alpha, strict=True)
    ]
    ok = StageStatus.completed
    rec = AuditRecord(
        audit_id=audit_id,
        run_id=run_id,
        step=step,
        tags=tags or {},
        created_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=step or 0),
        status=ok,
        model=ModelRef(source="m", source_fingerprint="f"),
        config={},
        store_uri=store.uri,
        stages={
            "ingest": StageRecord(stage="ingest", status=ok),
            "quantize": StageRecord(stage="quantize", status=ok),
            "sae": StageRecord(stage="sae", status=ok),
            "metrics": StageRecord(
                stage="metrics", status=ok, metrics={"alpha_mean": sum(alpha) / 4}, details={"weights": weights}
            ),
        },
        variants={
            "nf4": {
                "quantize": StageRecord(
                    stage="quantize",
                    status=ok,
                    metrics={"kl_mean": kl},
                    details={
                        "drift": {
                            f"blocks.{i}.hook_resid_post": {"cosine": 0.99, "rel_error": e} for i, e in enumerate(drift)
                        }
                    },
                )
            }
        },
        saes={"blocks.1.hook_resid_post": StageRecord(stage="sae", status=ok, metrics={"fvu": fvu, "l0": 8.0})},
    )
    if save:  # else the audit is still running: its record is saved when it ends
        store.put_bytes(f"audits/{audit_id}.json", rec.model_dump_json().encode())
    return rec


@pytest.fixture
def run(tmp_path: Path) -> tuple[LocalStore, dict[int, AuditRecord]]:
    store = LocalStore(tmp_path / "store")
    recs = {
        1: record(store, "a1", 1, (1.0, 2.0, 3.0, 4.0)),
        2: record(store, "a2", 2, (1.1, 2.0, 3.0, 4.0), kl=0.012, fvu=0.21),
        3: record(store, "a3", 3, (1.1, 2.0, 9.0, 4.0), kl=0.05, fvu=0.3, drift=(0.02, 0.2)),  # h.1.attn ×3
    }
    return store, recs


def rules(*items: dict, baseline: str = "previous") -> GateRules:
    return GateRules.model_validate({"baseline": baseline, "rules": list(items)})


def test_checks_parse_and_hold() -> None:
    c = Check.parse("in [2, 6]")
    assert (c.kind, c.op, c.bound) == ("value", "in", (2.0, 6.0))
    assert c.holds(2.0) and c.holds(6.0) and not c.holds(6.5) and c.excess(7.5) == 1.5
    assert Check.parse("ratio <= 1.5").kind == "ratio" and Check.parse("delta >= -0.05").bound == -0.05
    assert Check.parse("not in [0, 1]").holds(1.5) and not Check.parse("not in [0, 1]").holds(0.5)
    assert Check.parse("< 1e-3").holds(5e-4)
    for bad in ("about 3", "<= x", "in [6, 2]", "ratio ~ 2"):
        with pytest.raises(ValueError):
            Check.parse(bad)


def test_absolute_rules_and_aggregations(run) -> None:
    store, recs = run
    v = gates.judge(
        store,
        recs[1],
        rules(
            {"name": "alpha any", "metric": "layers.*.alpha", "check": "in [2, 6]", "severity": "warn"},
            {"name": "alpha mean", "metric": "layers.*.alpha", "check": "<= 4.5", "aggregate": "mean"},
            {"name": "sn max", "metric": "layers.*.spectral_norm", "check": "<= 3.5", "aggregate": "max"},
            {"name": "sn min", "metric": "layers.*.spectral_norm", "check": ">= 1", "aggregate": "min"},
            {"name": "sn all", "metric": "layers.*.spectral_norm", "check": "> 2.5", "aggregate": "all"},
            {"name": "attn only", "metric": "layers.*attn*.spectral_norm", "check": "<= 3", "aggregate": "max"},
            {"name": "kl", "metric": "quantize.nf4.kl_mean", "check": "<= 0.2"},
            {"name": "fvu", "metric": "sae.*.fvu", "check": "< 0.1", "severity": "warn"},
            {"name": "alpha_mean", "metric": "metrics.alpha_mean", "check": "in [2, 6]"},
        ),
    )
    by = {r.rule: r for r in v.results}
    # alpha: 7.5 on h.1.mlp is outside [2, 6] -> warn, naming it; by hand
    assert by["alpha any"].outcome == "warn" and [o.key for o in by["alpha any"].offenders] == ["h.1.mlp.weight"]
    assert by["alpha any"].value == 7.5 and by["alpha any"].elements == 4
    assert by["alpha mean"].outcome == "pass" and by["alpha mean"].compared == pytest.approx((3 + 3.5 + 4 + 7.5) / 4)
    assert by["sn max"].outcome == "fail" and by["sn max"].compared == 4.0
    assert [o.key for o in by["sn max"].offenders] == ["h.1.mlp.weight"]
    assert by["sn min"].outcome == "pass" and by["sn min"].compared == 1.0
    assert by["sn all"].outcome == "pass"  # 1 and 2 are not > 2.5, but not all break it
    assert by["attn only"].elements == 2 and by["attn only"].compared == 3.0 and by["attn only"].outcome == "pass"
    assert by["kl"].outcome == "pass" and by["kl"].value == 0.01
    assert by["fvu"].outcome == "warn" and by["fvu"].offenders[0].key == "blocks.1.hook_resid_post"
    assert by["alpha_mean"].outcome == "pass"
    assert v.verdict == "fail" and v.baseline_audit_id is None  # step 1: no previous
    assert "first audited checkpoint" in v.baseline_reason
    assert gates.EXIT[v.verdict] == 1


def test_relative_rules_against_the_previous_checkpoint(run) -> None:
    store, recs = run
    r = rules(
        {"name": "sn ratio", "metric": "layers.*.spectral_norm", "check": "ratio <= 1.5"},
        {"name": "kl delta", "metric": "quantize.*.kl_mean", "check": "delta <= 0.02"},
        {"name": "fvu ratio max", "metric": "sae.*.fvu", "check": "ratio <= 1.2", "aggregate": "max"},
    )
    at2 = gates.judge(store, recs[2], r)
    assert at2.baseline_audit_id == "a1" and at2.baseline_step == 1 and at2.verdict == "pass"
    sn = at2.results[0]
    assert sn.compared == pytest.approx(1.1) and sn.value == 1.1 and sn.baseline_value == 1.0  # worst: h.0.attn
    at3 = gates.judge(store, recs[3], r)
    assert at3.baseline_audit_id == "a2" and at3.verdict == "fail"
    sn, kl, fvu = at3.results
    assert sn.outcome == "fail" and [o.key for o in sn.offenders] == ["h.1.attn.weight"]
    assert sn.offenders[0].compared == pytest.approx(3.0) and sn.offenders[0].baseline_value == 3.0
    assert kl.outcome == "fail" and kl.compared == pytest.approx(0.05 - 0.012)
    assert fvu.outcome == "fail" and fvu.compared == pytest.approx(0.3 / 0.21)
    assert "h.1.attn.weight" in at3.summary() and "gate fail" in at3.summary()
    first = gates.judge(store, recs[3], r, baseline="first")
    assert first.baseline_audit_id == "a1" and first.results[0].offenders[0].compared == pytest.approx(3.0)
    named = gates.judge(store, recs[3], r, baseline="a3")  # against itself: nothing moved
    assert named.verdict == "pass" and named.results[0].compared == pytest.approx(1.0)


def test_warm_up_steps_warn_where_relative_rules_would_fail(run) -> None:
    """Below `warmup_steps`, a broken relative rule warns, saying it would fail; absolute rules and steps after
    the warm-up are judged as before."""
    store, recs = run
    items = (
        {"name": "sn ratio", "metric": "layers.*.spectral_norm", "check": "ratio <= 1.5"},
        {"name": "sn max", "metric": "layers.*.spectral_norm", "check": "<= 5", "aggregate": "max"},
    )
    warm = GateRules.model_validate({"rules": list(items), "warmup_steps": 10})
    v = gates.judge(store, recs[3], warm)  # step 3 < 10: h.1.attn ×3 against step 2
    sn, mx = v.results
    assert sn.outcome == "warn" and sn.reason.startswith("warm-up (step 3 < warmup_steps 10): would fail")
    assert [o.key for o in sn.offenders] == ["h.1.attn.weight"] and sn.offenders[0].compared == pytest.approx(3.0)
    assert mx.outcome == "fail" and mx.compared == 9.0  # absolute: no warm-up
    assert v.verdict == "fail"
    after = GateRules.model_validate({"rules": list(items), "warmup_steps": 3})  # step 3 is past the warm-up
    assert gates.judge(store, recs[3], after).results[0].outcome == "fail"


def test_column_globs_over_variants_and_hooks(run) -> None:
    store, recs = run
    r = rules(
        {"name": "drift", "metric": "layers.*.quant_rel_error[*].*", "check": "delta <= 0.05"},
        {
            "name": "drift abs",
            "metric": "layers.h.1.*.quant_rel_error[nf4].resid",
            "check": "<= 0.1",
            "severity": "warn",
        },
    )
    v = gates.judge(store, recs[3], r)
    drift, absolute = v.results
    # block 1's drift went 0.03 -> 0.2 (delta 0.17); both of its matrices carry the block's figure
    assert drift.outcome == "fail" and drift.elements == 4
    assert {o.key for o in drift.offenders} == {"h.1.attn.weight", "h.1.mlp.weight"}  # one column: matrix names
    assert drift.offenders[0].compared == pytest.approx(0.17)
    assert absolute.outcome == "warn" and absolute.elements == 2 and absolute.value == 0.2
    bare = record(store, "bare", 4, (1.0, 2.0, 3.0, 4.0))
    bare.variants.clear()
    v = gates.judge(store, bare, rules({"metric": "layers.*.quant_rel_error[*].*", "check": "<= 0.1"}))
    assert v.results[0].outcome == "skipped" and "quantize" in v.results[0].reason


def test_a_missing_baseline_skips_relative_rules_never_passes(run) -> None:
    store, recs = run
    r = rules(
        {"metric": "layers.*.spectral_norm", "check": "ratio <= 1.5"},
        {"metric": "layers.*.spectral_norm", "check": "<= 100"},
    )
    v = gates.judge(store, recs[1], r)
    assert [x.outcome for x in v.results] == ["skipped", "pass"]
    assert "without a baseline" in v.results[0].reason and "first audited checkpoint" in v.results[0].reason
    alone = record(store, "solo", None, (1.0, 1.0, 1.0, 1.0), run_id=None)
    v = gates.judge(store, alone, r)
    assert v.results[0].outcome == "skipped" and "no training run" in v.baseline_reason
    assert gates.judge(store, recs[2], r, baseline="none").results[0].outcome == "skipped"


@pytest.fixture
def side_by_side(tmp_path: Path) -> tuple[LocalStore, AuditRecord, AuditRecord]:
    """Checkpoints saved faster than audited: step 1 done, step 2's audit started (its marker, no record
    yet), step 3's audit at its gate. Returns the store, step 2's record-to-be and step 3's record."""
    store = LocalStore(tmp_path / "store")
    record(store, "s1", 1, (1.0, 2.0, 3.0, 4.0))
    running = record(store, "s2", 2, (1.0, 2.0, 3.0, 4.0), save=False)
    audits.mark_started(store, running)
    return store, running, record(store, "s3", 3, (1.0, 2.0, 9.0, 4.0))  # h.1.attn ×3 on step 2


SN_RATIO = {"name": "sn ratio", "metric": "layers.*.spectral_norm", "check": "ratio <= 1.5"}


def test_the_gate_waits_for_the_previous_step_still_being_audited(side_by_side) -> None:
    store, running, rec = side_by_side
    assert [s.audit_id for s in audits.in_flight(store, "run")] == ["s2"]

    def finish() -> None:  # what the tracker does at the end of step 2's audit
        time.sleep(0.6)
        audits.save(store, running)
        audits.mark_finished(store, running.audit_id)

    t = threading.Thread(target=finish)
    t.start()
    v = gates.judge(store, rec, rules(SN_RATIO), wait_s=30)
    t.join()
    assert audits.in_flight(store, "run") == []
    assert v.baseline_audit_id == "s2" and v.baseline_step == 2 and v.baseline_reason is None
    assert v.baseline_waited_for == "s2" and 0.5 < v.baseline_waited_s < 30
    sn = v.results[0]  # judged against step 2 (9/3 on h.1.attn), not against step 1 nor without a baseline
    assert sn.outcome == "fail" and sn.compared == pytest.approx(3.0) and sn.offenders[0].key == "h.1.attn.weight"
    assert "waited" in v.summary() and "s2" in v.summary()
    assert "waited" in gates.markdown(v) and "audit s2 to finish" in gates.markdown(v)


def test_a_previous_step_that_does_not_finish_in_time_skips_relative_rules(side_by_side) -> None:
    store, _, rec = side_by_side
    t0 = time.monotonic()
    v = gates.judge(store, rec, rules(SN_RATIO, {"metric": "layers.*.spectral_norm", "check": "<= 100"}), wait_s=0.5)
    assert 0.5 <= time.monotonic() - t0 < 10
    # neither step 1 (older than the pending step 2) nor "first": the gate says which audit it waited for
    assert v.baseline_audit_id is None and v.baseline_waited_for == "s2" and v.baseline_waited_s >= 0.5
    assert "gave up waiting for audit s2" in v.baseline_reason and "first" not in v.baseline_reason
    sn, absolute = v.results
    assert sn.outcome == "skipped" and "s2" in sn.reason and "still in progress" in sn.reason
    assert absolute.outcome == "pass" and v.verdict == "pass"
    # without a finished lower step either: still waiting for step 2, never "the first audited checkpoint"
    store.delete("audits/s1.json")
    v = gates.judge(store, rec, rules(SN_RATIO), wait_s=0)
    assert "gave up waiting for audit s2" in v.baseline_reason and "first" not in v.baseline_reason
    # a higher step in flight is no baseline: step 1's gate does not wait for it and is the first
    first = record(store, "s1", 1, (1.0, 2.0, 3.0, 4.0))
    v = gates.judge(store, first, rules(SN_RATIO), wait_s=30)
    assert v.baseline_waited_for is None and "first audited checkpoint" in v.baseline_reason


def test_a_marker_left_by_a_killed_audit_is_not_waited_for(side_by_side) -> None:
    """Step 2's audit was killed (its process is gone from this machine): step 3's gate does not wait the
    bound for it and judges against step 1; a marker from another host cannot be judged here and stays."""
    store, running, rec = side_by_side
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    key = f"{audits.IN_FLIGHT}/s2.json"
    marker = AuditStart.model_validate_json(store.get_bytes(key))
    assert marker.host == socket.gethostname() and marker.pid == os.getpid()  # what mark_started records
    store.put_bytes(key, marker.model_copy(update={"pid": int(gone.stdout)}).model_dump_json().encode())
    assert audits.in_flight(store, "run") == []
    v = gates.judge(store, rec, rules(SN_RATIO), wait_s=30)
    assert v.baseline_waited_for is None and v.baseline_audit_id == "s1"
    elsewhere = marker.model_copy(update={"pid": int(gone.stdout), "host": "another-pod"})
    store.put_bytes(key, elsewhere.model_dump_json().encode())
    assert [s.audit_id for s in audits.in_flight(store, "run")] == ["s2"]


def test_tags_pin_a_baseline(run) -> None:
    store, recs = run
    record(store, "golden", 0, (1.0, 2.0, 3.0, 4.0), tags={"baseline": "golden"})
    v = gates.judge(
        store, recs[3], rules({"metric": "metrics.alpha_mean", "check": "delta <= 0"}), baseline="tag:baseline=golden"
    )
    assert v.baseline_audit_id == "golden" and v.verdict == "pass"
    with pytest.raises(gates.GateError, match="carries the tag"):
        gates.judge(store, recs[3], rules({"metric": "metrics.alpha_mean", "check": "<= 9"}), baseline="tag:nope")
    with pytest.raises(gates.GateError, match="no audit"):
        gates.judge(store, recs[3], rules({"metric": "metrics.alpha_mean", "check": "<= 9"}), baseline="zzz")
    for empty in ("tag:", "tag:=golden"):  # issue 21 #11: refused, not looked up as an empty tag
        with pytest.raises(gates.GateError, match=r"names no tag; write tag:KEY or tag:KEY=VALUE"):
            gates.judge(store, recs[3], rules({"metric": "metrics.alpha_mean", "check": "<= 9"}), baseline=empty)


def test_one_unreadable_record_never_hides_the_others(run) -> None:
    """Issue 21 #11: a truncated record broke `microscope list` for every audit in the store."""
    from microscope import audits

    store, recs = run
    good = store.get_bytes("audits/a2.json")
    store.put_bytes("audits/a2.json", good[: len(good) // 2])
    skipped: list[str] = []
    listed = audits.list_all(store, unreadable=skipped)
    assert [r.audit_id for r in listed] == ["a1", "a3"]
    assert len(skipped) == 1 and skipped[0].startswith("audits/a2.json (")


def test_unknown_paths_list_the_valid_ones(run) -> None:
    store, recs = run
    for path, said in (
        ("weights.*.alpha", "unknown metric namespace 'weights'"),
        ("layers.*.alfa", "no layer-table column"),
        ("quantize.nf4.kl", "has no figure 'kl'"),
        ("quantize.int4.kl_mean", "matches no quantize element"),
        ("layers.nothing*.alpha", "matches no weight matrix"),
    ):
        with pytest.raises(gates.GateError, match=said) as e:
            gates.judge(store, recs[2], rules({"metric": path, "check": "<= 1"}))
        if "weight matrix" not in said:
            assert "valid paths here" in str(e.value) and "quantize.{nf4}.{kl_mean}" in str(e.value)


def test_a_stage_that_did_not_run_skips_its_rules(run) -> None:
    store, recs = run
    v = gates.judge(
        store,
        recs[2],
        rules(
            {"metric": "robustness.fp.autoattack_Linf", "check": ">= 0.5"},
            {"metric": "layers.*.act_mean_norm.resid", "check": "<= 0.5"},
            {"metric": "layers.*.fisher_trace", "check": "<= 0.5"},
        ),
    )
    assert [r.outcome for r in v.results] == ["skipped"] * 3 and v.verdict == "pass"
    assert "robustness to --stages" in v.results[0].reason and "trace to --stages" in v.results[1].reason


def test_an_audit_without_metrics_skips_the_weight_rules_the_table_derives(run) -> None:
    """An audit that ran quantize but not metrics has a layer table (its drift columns) without the weight
    columns; the shipped health rules on columns derived from them are skipped, saying why, not errors."""
    store, recs = run
    rec = recs[2].model_copy(update={"stages": {k: v for k, v in recs[2].stages.items() if k != "metrics"}})
    v = gates.judge(
        store,
        rec,
        rules(
            {"metric": "layers.*.effective_rank_share", "check": ">= 0.1"},
            {"metric": "layers.*.condition_z", "check": "<= 3.5"},
            {"metric": "layers.*.alpha", "check": "in [2, 6]"},
            baseline="none",
        ),
    )
    assert [r.outcome for r in v.results] == ["skipped"] * 3, [(r.outcome, r.reason) for r in v.results]
    assert all("metrics" in r.reason for r in v.results)


def test_rule_files(tmp_path: Path) -> None:
    shipped, where = gates.load_rules("gates")  # examples/gates.yaml
    assert where.endswith("examples/gates.yaml") and shipped.baseline == "previous" and len(shipped.rules) >= 6
    bad = tmp_path / "g.yaml"
    bad.write_text("rules:\n  - metric: layers.*.alpha\n    check: about 3\n")
    with pytest.raises(gates.GateError, match=r"rules\.0\.check: check 'about 3' is not understood"):
        gates.load_rules(bad)
    bad.write_text("rules:\n  - metric: layers.*.alpha\n    check: <= 3\n    severity: error\n")
    with pytest.raises(gates.GateError, match=r"rules\.0\.severity"):
        gates.load_rules(bad)
    bad.write_text("rules: [")
    with pytest.raises(gates.GateError, match="not valid YAML"):
        gates.load_rules(bad)
    with pytest.raises(gates.GateError, match="not found"):
        gates.load_rules(tmp_path / "missing.yaml")
    inline, _ = gates.load_rules([{"metric": "sae.*.fvu", "check": "<= 0.5"}])
    assert inline.rules[0].aggregate == "any" and inline.rules[0].severity == "fail"
