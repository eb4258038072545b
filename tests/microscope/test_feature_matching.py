"""Feature matching between audits: constructed decoders with known fates, a brute-force optimum, the store
round trip, the run's previous checkpoint (on real audits) and the CLI."""

from __future__ import annotations

import itertools
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from microscope import feature_matching as fm
from microscope.store import LocalStore, open_store
from schemas.records import AuditRecord, ModelRef, StageRecord, StageStatus

HOOK = "blocks.1.hook_resid_post"


# ---- a constructed case -----------------------------------------------------------------------------


def constructed(seed: int = 0) -> dict:
    """Decoders whose fates are known by construction, from an orthonormal basis q_0..q_31 of R^32:

    A: rows 0-5 = q_0..q_5 (survive), rows 6-7 = q_6, q_7 (drift), row 8 = (q_20 + q_21)/√2 (splits into
    q_20 and q_21), row 9 = q_25 (lost: orthogonal to every B row).
    B (rows shuffled by `perm`): q_i + 0.01·noise for i < 6, cos θ·q_i + sin θ·q_(16+i) for i = 6, 7 (θ with
    cos θ = 0.7), q_20, q_21, and q_26 (new: orthogonal to every A row).
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    q = q.T  # rows orthonormal
    cos_t = 0.7
    sin_t = math.sqrt(1 - cos_t**2)
    a = np.stack([*q[:8], (q[20] + q[21]) / math.sqrt(2), q[25]])
    b_ordered = np.stack(
        [
            *(q[i] + 0.01 * rng.standard_normal(32) for i in range(6)),
            *(cos_t * q[i] + sin_t * q[16 + i] for i in (6, 7)),
            q[20],
            q[21],
            q[26],
        ]
    )  # [11, 32]: ordered row k is B's counterpart of A row k for k < 8; 8, 9: the split; 10: new
    perm = rng.permutation(len(b_ordered))  # B row perm[k] holds ordered row k
    b = np.empty_like(b_ordered)
    b[perm] = b_ordered
    return {"a": a.astype(np.float32), "b": b.astype(np.float32), "perm": perm, "cos": cos_t}


def test_constructed_fates() -> None:
    c = constructed()
    m = fm.match_decoders(c["a"], c["b"])
    t = m.features.to_pydict()
    perm = c["perm"]
    assert t["label"] == ["survived"] * 6 + ["drifted"] * 2 + ["split", "lost"]
    assert t["feature_b"][:8] == perm[:8].tolist()  # the recovered permutation is the true one
    # drifted: cosine = cos θ (closed form; float32 arithmetic on unit vectors, so 1e-5)
    np.testing.assert_allclose(t["cosine"][6:8], [c["cos"]] * 2, atol=1e-5)
    # survived: q·(q + 0.01 n)/|q + 0.01 n| ≈ 1 - |0.01 n⊥|²/2 ≈ 0.998
    assert min(t["cosine"][:6]) > 0.99
    assert sorted(t["split_into"][8]) == sorted(perm[[8, 9]].tolist())
    np.testing.assert_allclose(t["best_cosine"][8], 1 / math.sqrt(2), atol=1e-5)
    assert t["feature_b"][8] in perm[[8, 9]].tolist()  # its partner is one of the two halves
    assert t["best_cosine"][9] < 0.05  # lost: nothing related
    assert all(s == [] for i, s in enumerate(t["split_into"]) if i != 8)
    assert m.new.column("feature_b").to_pylist() == [int(perm[10])]
    assert m.summary["counts"] == {"survived": 6, "drifted": 2, "split": 1, "lost": 1, "new": 1}
    assert (m.summary["d_a"], m.summary["d_b"]) == (10, 11)


def test_cosines_match_numpy_reference() -> None:
    """Every cosine in the table against float64 NumPy on the raw (unnormalised) rows, 1e-5."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((40, 16)) * 3, rng.standard_normal((50, 16)) * 0.2
    m = fm.match_decoders(a, b)
    ref = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    t = m.features.to_pydict()
    np.testing.assert_allclose(t["cosine"], ref[np.arange(40), t["feature_b"]], atol=1e-5)
    np.testing.assert_allclose(t["best_cosine"], ref.max(1), atol=1e-5)
    np.testing.assert_allclose(m.new.column("best_cosine").to_numpy(), ref.max(0)[m.new["feature_b"]], atol=1e-5)
    # the labels follow from the cosines and the thresholds
    for i, lab in enumerate(t["label"]):
        related = np.flatnonzero(ref[i] >= fm.RELATED)
        if t["cosine"][i] >= fm.SURVIVED:
            assert lab == "survived"
        elif len(related) >= 2:
            assert lab == "split" and sorted(t["split_into"][i]) == related.tolist()
        elif t["cosine"][i] >= fm.RELATED:
            assert lab == "drifted"
        else:
            assert lab == "lost"


@pytest.mark.parametrize("shape", [(5, 5), (5, 4), (4, 5)])
def test_assignment_is_the_brute_force_optimum(shape: tuple[int, int]) -> None:
    """The assignment's total cosine equals the maximum over every one-to-one pairing (1e-5)."""
    d_a, d_b = shape
    rng = np.random.default_rng(d_a * 10 + d_b)
    a, b = rng.standard_normal((d_a, 6)), rng.standard_normal((d_b, 6))
    c = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    n = min(d_a, d_b)
    best = max(
        sum(c[i, j] for i, j in zip(rows, cols, strict=True))
        for rows in itertools.combinations(range(d_a), n)
        for cols in itertools.permutations(range(d_b), n)
    )
    t = fm.match_decoders(a, b).features.to_pydict()
    got = sum(x for x in t["cosine"] if not math.isnan(x))
    assert sum(j >= 0 for j in t["feature_b"]) == n
    assert len({j for j in t["feature_b"] if j >= 0}) == n  # one to one
    assert got == pytest.approx(best, abs=1e-5)


# ---- audits in a store -----------------------------------------------------------------------------


class CountingStore(LocalStore):
    """A local store that counts its writes."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.writes: list[str] = []

    def put_bytes(self, key: str, data: bytes) -> str:
        self.writes.append(key)
        return super().put_bytes(key, data)

    def put_file(self, key: str, path: Path, move: bool = False) -> str:
        self.writes.append(key)
        return super().put_file(key, path, move)


def put_sae(store: LocalStore, prefix: str, w_dec: np.ndarray) -> None:
    from safetensors.numpy import save_file

    tmp = store.staging_path(f"{prefix}/{fm.WEIGHTS}")
    d_sae, d_in = w_dec.shape
    save_file({"W_dec": np.ascontiguousarray(w_dec, np.float32), "b_dec": np.zeros(d_in, np.float32)}, str(tmp))
    store.put_file(f"{prefix}/{fm.WEIGHTS}", tmp, move=True)


def make_record(
    store: LocalStore,
    audit_id: str,
    w_dec: np.ndarray | None,
    *,
    step: int | None = None,
    run_id: str | None = "run",
    chash: str | None = None,
    status: StageStatus = StageStatus.completed,
    save: bool = True,
) -> AuditRecord:
    """An audit record with one SAE on HOOK whose decoder is `w_dec` (stored under its own prefix)."""
    saes = {}
    if w_dec is not None:
        prefix = f"{audit_id}/sae/{chash or audit_id}"
        if status != StageStatus.failed:
            put_sae(store, prefix, w_dec)
        saes[HOOK] = StageRecord(
            stage="sae",
            status=status,
            config_hash=chash or audit_id,
            details={"prefix": prefix, "d_in": int(w_dec.shape[1]), "d_sae": int(w_dec.shape[0])},
            error="boom" if status == StageStatus.failed else None,
        )
    rec = AuditRecord(
        audit_id=audit_id,
        run_id=run_id,
        step=step,
        created_at=datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=step or 0),
        status=StageStatus.completed,
        model=ModelRef(source="m", source_fingerprint="f"),
        config={},
        store_uri=store.uri,
        saes=saes,
    )
    if save:
        store.put_bytes(f"audits/{audit_id}.json", rec.model_dump_json().encode())
    return rec


def test_store_round_trip_computes_once(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "store")
    c = constructed()
    rec_a, rec_b = make_record(store, "A", c["a"]), make_record(store, "B", c["b"])
    assert fm.load_matches(store, "A", "B", HOOK) is None  # read only: nothing computed
    store.writes.clear()
    first = fm.match_features(store, rec_a, rec_b, HOOK)
    key = fm.matches_key("A", "B", HOOK)
    assert key == f"matches/A/B/{HOOK}.parquet"
    assert store.writes == [key, key.removesuffix(".parquet") + ".json"]  # the summary last: it marks the pair done
    mtime = (tmp_path / "store" / key).stat().st_mtime_ns
    store.writes.clear()
    again = fm.match_features(store, rec_a, rec_b, HOOK)
    assert store.writes == [] and (tmp_path / "store" / key).stat().st_mtime_ns == mtime
    loaded = fm.load_matches(store, "A", "B", HOOK)
    for m in (again, loaded):
        assert m is not None
        assert m.features.equals(first.features) and m.new.equals(first.new)
        assert m.summary == first.summary
    assert first.summary["config_hash_a"] == "A" and first.summary["counts"]["split"] == 1
    # another SAE behind audit B (its config hash changed): recomputed
    rec_b2 = make_record(store, "B", c["b"][::-1].copy(), chash="B2")
    store.writes.clear()
    redone = fm.match_features(store, rec_a, rec_b2, HOOK)
    assert key in store.writes and redone.summary["config_hash_b"] == "B2"
    assert fm.load_matches(store, "A", "B", HOOK).summary["config_hash_b"] == "B2"


def test_input_errors_name_the_problem(tmp_path: Path) -> None:
    from microscope.errors import InputError

    store = LocalStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    a = make_record(store, "A", rng.standard_normal((8, 4)))
    wide = make_record(store, "W", rng.standard_normal((8, 6)))
    failed = make_record(store, "F", rng.standard_normal((8, 4)), status=StageStatus.failed)
    none = make_record(store, "N", None)
    with pytest.raises(InputError, match="different widths"):
        fm.match_features(store, a, wide, HOOK)
    with pytest.raises(InputError, match="failed: boom"):
        fm.match_features(store, a, failed, HOOK)
    with pytest.raises(InputError, match="has no SAE on"):
        fm.match_features(store, none, a, HOOK)


def test_run_previous_picks_the_highest_lower_step(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 4))
    make_record(store, "s1", w, step=1)
    make_record(store, "s2", w, step=2)
    make_record(store, "s3-wide", rng.standard_normal((8, 6)), step=3)  # another width: passed over
    make_record(store, "s4-failed", w, step=4, status=StageStatus.failed)  # no SAE: passed over
    make_record(store, "s9", w, step=9)  # later: not previous
    make_record(store, "other", w, step=4, run_id="another-run")
    this = make_record(store, "s5", w, step=5, save=False)
    (out,) = fm.match_run_previous(store, this)
    assert (out.hook, out.audit_a, out.audit_b, out.reason) == (HOOK, "s2", "s5", None)
    assert out.matches.summary["counts"]["survived"] == 8
    assert fm.load_matches(store, "s2", "s5", HOOK) is not None

    first = make_record(store, "s0", w, step=0, save=False)
    (none,) = fm.match_run_previous(store, first)
    assert none.matches is None and "below step 0" in none.reason
    loose = make_record(store, "x", w, run_id=None, save=False)
    assert "not part of a training run" in fm.match_run_previous(store, loose)[0].reason
    broken = make_record(store, "s6", w, step=6, save=False)
    store.delete(f"{broken.saes[HOOK].details['prefix']}/{fm.WEIGHTS}")  # a failure is a reason, not a raise
    (bad,) = fm.match_run_previous(store, broken)
    assert bad.matches is None and "not in" in bad.reason and "\n" not in bad.reason


# ---- real audits: steps 1 and 2 of a training run ---------------------------------------------------


def test_matches_of_the_finished_run(finished_audits: dict[str, dict]) -> None:
    """The audit flow matched step 2's SAE features to step 1's when step 2 finished. Both checkpoints are
    the same weights (step 2's SAE is step 1's, from the cache), so every feature survives as itself."""
    from safetensors.numpy import load_file

    s1, s2 = finished_audits["step1"], finished_audits["step2"]
    store = open_store(s1["store_uri"])
    m = fm.load_matches(store, s1["audit_id"], s2["audit_id"], HOOK)
    assert m is not None, "the audit of step 2 did not store its matches"
    assert m.summary["config_hash_a"] == s1["saes"][HOOK]["config_hash"]
    assert m.summary["config_hash_b"] == s2["saes"][HOOK]["config_hash"]
    # the cosines against NumPy on the stored decoders (float64 reference, 1e-5)
    w = {
        k: load_file(str(store.local_path(f"{r['saes'][HOOK]['details']['prefix']}/{fm.WEIGHTS}")))["W_dec"]
        for k, r in (("a", s1), ("b", s2))
    }
    unit = {k: v / np.linalg.norm(v.astype(np.float64), axis=1, keepdims=True) for k, v in w.items()}
    ref = unit["a"] @ unit["b"].T
    t = m.features.to_pydict()
    d_sae = s1["saes"][HOOK]["details"]["d_sae"]
    assert len(t["feature_a"]) == d_sae == m.summary["d_a"] == m.summary["d_b"]
    np.testing.assert_allclose(t["cosine"], ref[np.arange(d_sae), t["feature_b"]], atol=1e-5)
    np.testing.assert_allclose(t["best_cosine"], ref.max(1), atol=1e-5)
    for cos, lab in zip(t["cosine"], t["label"], strict=True):  # labels consistent with the cosines
        assert (lab == "survived") == (cos >= fm.SURVIVED)
    assert t["label"] == ["survived"] * d_sae and t["feature_b"] == t["feature_a"]
    assert m.summary["counts"] == {"survived": d_sae, "drifted": 0, "split": 0, "lost": 0, "new": 0}
    assert m.summary["mean_matched_cosine"] == pytest.approx(1.0, abs=1e-5)


def test_cli_match(finished_audits: dict[str, dict], capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    s1, s2 = finished_audits["step1"], finished_audits["step2"]
    uri = s1["store_uri"]
    assert main(["match", s1["audit_id"], s2["audit_id"], "--store", uri, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == [HOOK]
    assert out[HOOK]["audit_a"] == s1["audit_id"] and out[HOOK]["counts"]["survived"] == out[HOOK]["d_a"]

    assert main(["--store", uri, "match", "no-such-audit", s2["audit_id"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("microscope: error: no audit 'no-such-audit'") and "\n" not in err
    assert main(["--store", uri, "match", s1["audit_id"], s2["audit_id"], "--hook", "blocks.0.hook_mlp_out"]) == 2
    assert "has no SAE on blocks.0.hook_mlp_out" in capsys.readouterr().err
