"""SAE features matched one to one between two audits (two checkpoints of a run, or any two models with the
same residual width): which features survived, drifted, split, were lost, and which are new.

## Algorithm

A feature is its decoder direction: row f of `W_dec` [d_sae, d_in] (`sae/sae_weights.safetensors`).

1. C[i, j] = cos(A_i, B_j): A's and B's decoder rows, unit-normalised, multiplied in row chunks into one
   float32 matrix C [d_a, d_b] (a zero row has cosine 0 with everything).
2. The one-to-one assignment maximising the total cosine, `scipy.optimize.linear_sum_assignment(C,
   maximize=True)`; rectangular when d_a != d_b (min(d_a, d_b) pairs; the rest of the larger side has no
   partner). Its cost is d_a·d_b·12 bytes (C, and SciPy's float64 copy) and about a second at 4096².
3. Each feature of A, in this order:
   - `survived`: its partner has cos >= SURVIVED (0.9);
   - `split`: otherwise, when at least two features of B have cos >= RELATED (0.5) with it; `split_into`
     lists them, closest first (its partner, if related, is one of them);
   - `drifted`: otherwise, when its partner has RELATED <= cos < SURVIVED;
   - `lost`: the rest: nothing in B continues it one to one. When its best B feature has cos >= RELATED
     but went to a closer A feature (two A features merged into one), `best_cosine` shows it.
4. Each feature of B whose partner has cos < RELATED, or that has none, and that is in no `split_into`,
   is `new`.

## Results

`Matches`: `features`, one row per A feature (`feature_a`, `feature_b` = its partner in the assignment or
-1, `cosine` with that partner (NaN without one), `best_cosine` = max over B, `label`, `split_into`
list<int32>), `new` (`feature_b`, `best_cosine` = max over A) and `summary` (label counts, the mean
cosine over the assigned pairs, widths, thresholds, both SAEs' config hashes).

Stored once per (A, B, hook) at `matches/<audit_a>/<audit_b>/<hook>.parquet` (the `features` table) and
`<hook>.json` beside it (summary and `new`), the JSON written last: its presence marks the pair complete.
`match_features` reuses the stored pair when both SAEs' config hashes and the thresholds are the ones it
was computed with; `load_matches` only reads (the viewer); `match_run_previous` matches an audit against
its training run's previous checkpoint (what the audit flow calls when an audit ends).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from schemas.records import AuditRecord, StageRecord, StageStatus

from microscope import audits
from microscope.errors import InputError
from microscope.store import ArtifactStore

if TYPE_CHECKING:
    import pyarrow as pa

# 0.9: the same direction up to noise (SAEs retrained on the same data reach ~0.9+ on shared features);
# 0.5: 60° apart, the usual "still related" cut in feature-universality work; below it a pairing is chance.
SURVIVED = 0.9
RELATED = 0.5
LABELS = ("survived", "drifted", "split", "lost")
VERSION = "1"  # of the stored layout and rules: a stored pair of another version is recomputed
PREFIX = "matches"
WEIGHTS = "sae/sae_weights.safetensors"
CHUNK_ROWS = 4096  # rows of A per matmul: bounds the float64-free temporary at CHUNK_ROWS × d_b
_USABLE = (StageStatus.completed, StageStatus.cached)


@dataclass(frozen=True)
class Matches:
    """One (A, B, hook) matching: see the module docstring for the columns."""

    features: pa.Table
    new: pa.Table
    summary: dict[str, Any]

    @property
    def audit_a(self) -> str | None:
        return self.summary.get("audit_a")

    @property
    def audit_b(self) -> str | None:
        return self.summary.get("audit_b")

    @property
    def hook(self) -> str | None:
        return self.summary.get("hook")


@dataclass(frozen=True)
class PairOutcome:
    """What `match_run_previous` did for one hook: the matches, or why there are none."""

    hook: str
    audit_a: str | None  # the previous audit (None when none qualified)
    audit_b: str
    matches: Matches | None = None
    reason: str | None = None


# ---- the mathematics ----------------------------------------------------------------------------


def _unit_rows(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    assert w.ndim == 2, f"decoder must be [d_sae, d_in], got shape {w.shape}"
    norms = np.linalg.norm(w, axis=1, keepdims=True)  # [d_sae, 1]
    return np.divide(w, norms, out=np.zeros_like(w), where=norms > 0)


def cosine_matrix(w_a: np.ndarray, w_b: np.ndarray, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """cos(A_i, B_j) as float32 [d_a, d_b], computed `chunk` rows of A at a time."""
    a, b = _unit_rows(w_a), _unit_rows(w_b)
    assert a.shape[1] == b.shape[1], f"decoders of different widths: d_in {a.shape[1]} vs {b.shape[1]}"
    c = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
    for s in range(0, a.shape[0], chunk):
        np.matmul(a[s : s + chunk], b.T, out=c[s : s + chunk])  # [chunk, d_in] @ [d_in, d_b]
    return np.clip(c, -1.0, 1.0, out=c)


def match_decoders(
    w_a: np.ndarray, w_b: np.ndarray, *, survived: float = SURVIVED, related: float = RELATED
) -> Matches:
    """Match the rows of two decoders [d_a, d_in] and [d_b, d_in] (the module docstring's algorithm)."""
    import pyarrow as pa
    from scipy.optimize import linear_sum_assignment

    if not related <= survived:
        raise ValueError(f"thresholds: related ({related}) must not exceed survived ({survived})")
    c = cosine_matrix(w_a, w_b)  # [d_a, d_b]
    d_a, d_b = c.shape
    rows, cols = linear_sum_assignment(c, maximize=True) if d_a and d_b else (np.zeros(0, int), np.zeros(0, int))
    partner = np.full(d_a, -1, dtype=np.int64)
    partner[rows] = cols
    cos = np.full(d_a, np.nan, dtype=np.float32)
    cos[rows] = c[rows, cols]
    best_a = c.max(axis=1) if d_b else np.full(d_a, np.nan, np.float32)
    best_b = c.max(axis=0) if d_a else np.full(d_b, np.nan, np.float32)

    rel = c >= related  # [d_a, d_b] bool
    has = partner >= 0
    is_surv = has & (cos >= survived)
    is_split = ~is_surv & (rel.sum(axis=1) >= 2)
    is_drift = ~is_surv & ~is_split & has & (cos >= related)
    labels = np.full(d_a, "lost", dtype=object)
    labels[is_drift], labels[is_split], labels[is_surv] = "drifted", "split", "survived"
    split_into: list[list[int]] = [[] for _ in range(d_a)]
    in_split = np.zeros(d_b, dtype=bool)
    for i in np.flatnonzero(is_split):
        js = np.flatnonzero(rel[i])
        js = js[np.argsort(-c[i, js], kind="stable")]  # closest first
        split_into[i] = js.tolist()
        in_split[js] = True

    b_cos = np.full(d_b, -np.inf, dtype=np.float32)  # the partner's cosine; -inf: no partner
    b_cos[cols] = c[rows, cols]
    new = np.flatnonzero((b_cos < related) & ~in_split)

    features = pa.table(
        {
            "feature_a": pa.array(np.arange(d_a), pa.int32()),
            "feature_b": pa.array(partner, pa.int32()),
            "cosine": pa.array(cos, pa.float32()),
            "best_cosine": pa.array(best_a, pa.float32()),
            "label": pa.array(labels.tolist(), pa.string()),
            "split_into": pa.array(split_into, pa.list_(pa.int32())),
        }
    )
    new_t = pa.table({"feature_b": pa.array(new, pa.int32()), "best_cosine": pa.array(best_b[new], pa.float32())})
    counts = {lab: int((labels == lab).sum()) for lab in LABELS} | {"new": len(new)}
    pairs = c[rows, cols]
    summary = {
        "counts": counts,
        "mean_matched_cosine": float(pairs.astype(np.float64).mean()) if len(pairs) else None,
        "d_a": d_a,
        "d_b": d_b,
        "thresholds": {"survived": survived, "related": related},
    }
    return Matches(features, new_t, summary)


# ---- reading SAEs from audits -------------------------------------------------------------------


def _sae(rec: AuditRecord, hook: str) -> StageRecord:
    """The audit's finished SAE on `hook`, or InputError saying why there is none."""
    r = rec.saes.get(hook)
    if r is None:
        trained = ", ".join(sorted(rec.saes)) or "none"
        raise InputError(f"audit {rec.audit_id} has no SAE on {hook} (SAEs: {trained}); add it to sae.hooks")
    if r.status not in _USABLE:
        raise InputError(
            f"the SAE on {hook} in audit {rec.audit_id} {r.status.value}: {r.error or 'no error recorded'}"
        )
    return r


def _weights_key(store: ArtifactStore, rec: AuditRecord, hook: str, r: StageRecord) -> str:
    if r.details.get("prefix"):
        key = f"{r.details['prefix']}/{WEIGHTS}"
    else:  # records hold URIs; the store reads keys
        uri, root = r.artifacts.get(WEIGHTS, ""), store.uri_for("x")[:-1]
        key = uri[len(root) :] if uri.startswith(root) else uri
    if not key or not store.exists(key):
        raise InputError(
            f"the weights of the SAE on {hook} in audit {rec.audit_id} are not in {store.uri}; "
            "run the audit's sae stage again"
        )
    return key


def load_decoder(store: ArtifactStore, rec: AuditRecord, hook: str) -> np.ndarray:
    """W_dec [d_sae, d_in] of the audit's SAE on `hook` (safetensors, only that tensor read)."""
    from safetensors import safe_open

    key = _weights_key(store, rec, hook, _sae(rec, hook))
    with safe_open(str(store.local_path(key)), framework="numpy") as f:
        w = f.get_tensor("W_dec")
    if w.ndim != 2:
        raise InputError(f"W_dec of the SAE on {hook} in audit {rec.audit_id} has shape {w.shape}, not [d_sae, d_in]")
    return w


def _d_in(r: StageRecord) -> int | None:
    v = r.details.get("d_in")
    return int(v) if v is not None else None


# ---- storage --------------------------------------------------------------------------------------


def hook_name(hook: str) -> str:
    """`hook` as one key segment: unchanged when it is already safe, else sanitised plus a short hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", hook)
    if safe == hook and safe not in (".", ".."):
        return safe
    import hashlib

    return f"{safe}-{hashlib.sha256(hook.encode()).hexdigest()[:8]}"


def matches_key(audit_a: str, audit_b: str, hook: str) -> str:
    """The store key of the pair's features table; its summary is the same key ending in `.json`."""
    return f"{PREFIX}/{audit_a}/{audit_b}/{hook_name(hook)}.parquet"


def _json_key(key: str) -> str:
    return key.removesuffix(".parquet") + ".json"


def load_matches(store: ArtifactStore, audit_a: str, audit_b: str, hook: str) -> Matches | None:
    """The stored matching of `audit_a` → `audit_b` on `hook`, or None when there is none. Never computes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = matches_key(audit_a, audit_b, hook)
    if not store.exists(_json_key(key)) or not store.exists(key):
        return None
    meta = store.get_json(_json_key(key))
    # get_bytes, not local_path: a recomputed pair reuses its key, and S3's local_path caches downloads by key
    features = pq.read_table(pa.BufferReader(store.get_bytes(key)))
    new = pa.table(
        {
            "feature_b": pa.array(meta["new"]["feature_b"], pa.int32()),
            "best_cosine": pa.array(meta["new"]["best_cosine"], pa.float32()),
        }
    )
    return Matches(features, new, meta["summary"])


def _save(store: ArtifactStore, key: str, m: Matches) -> None:
    import pyarrow.parquet as pq

    tmp = store.staging_path(key)
    pq.write_table(m.features, tmp)
    store.put_file(key, tmp, move=True)
    new = {
        "feature_b": m.new.column("feature_b").to_pylist(),
        "best_cosine": [_finite(x) for x in m.new.column("best_cosine").to_pylist()],
    }
    store.put_json(_json_key(key), {"version": VERSION, "summary": m.summary, "new": new})  # last: marks complete


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def match_features(
    store: ArtifactStore,
    rec_a: AuditRecord,
    rec_b: AuditRecord,
    hook: str,
    *,
    survived: float = SURVIVED,
    related: float = RELATED,
) -> Matches:
    """The matching of A's SAE features on `hook` to B's: the stored one when it was computed from these
    SAEs (config hashes) with these thresholds, else computed and stored. InputError (one line) when either
    audit has no finished SAE on `hook` or the two read different widths."""
    sae_a, sae_b = _sae(rec_a, hook), _sae(rec_b, hook)
    if _d_in(sae_a) is not None and _d_in(sae_b) is not None and _d_in(sae_a) != _d_in(sae_b):
        raise InputError(
            f"the SAEs on {hook} read different widths (d_in {_d_in(sae_a)} in {rec_a.audit_id}, "
            f"{_d_in(sae_b)} in {rec_b.audit_id}): their decoder directions are not comparable"
        )
    key = matches_key(rec_a.audit_id, rec_b.audit_id, hook)
    want = {
        "config_hash_a": sae_a.config_hash or "",
        "config_hash_b": sae_b.config_hash or "",
        "thresholds": {"survived": survived, "related": related},
    }
    if store.exists(_json_key(key)):
        meta = store.get_json(_json_key(key))
        if meta.get("version") == VERSION and all(meta["summary"].get(k) == v for k, v in want.items()):
            stored = load_matches(store, rec_a.audit_id, rec_b.audit_id, hook)
            if stored is not None:
                return stored
    w_a, w_b = load_decoder(store, rec_a, hook), load_decoder(store, rec_b, hook)
    if w_a.shape[1] != w_b.shape[1]:
        raise InputError(
            f"the SAEs on {hook} read different widths (d_in {w_a.shape[1]} in {rec_a.audit_id}, "
            f"{w_b.shape[1]} in {rec_b.audit_id}): their decoder directions are not comparable"
        )
    m = match_decoders(w_a, w_b, survived=survived, related=related)
    summary = {"audit_a": rec_a.audit_id, "audit_b": rec_b.audit_id, "hook": hook, **want, **m.summary, "key": key}
    m = Matches(m.features, m.new, summary)
    _save(store, key, m)
    return m


# ---- a training run -------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return msg if isinstance(exc, InputError) and msg else f"{type(exc).__name__}: {msg}".rstrip(": ")


def match_run_previous(
    store: ArtifactStore, rec: AuditRecord, *, survived: float = SURVIVED, related: float = RELATED
) -> list[PairOutcome]:
    """For each hook with an SAE in `rec`: match the features of the run's previous checkpoint (the audit
    at the highest step below `rec.step` with a finished SAE on that hook of the same d_in; the latest such
    audit when a step was audited twice) to `rec`'s, previous → this. Never raises for a hook: a missing,
    failed or incomparable SAE, or a failed computation, is the outcome's `reason`."""
    hooks = sorted(rec.saes)
    if rec.run_id is None or rec.step is None:
        why = f"audit {rec.audit_id} is not part of a training run (no run_id/step): nothing earlier to match"
        return [PairOutcome(h, None, rec.audit_id, reason=why) for h in hooks]
    earlier = [
        r
        for r in audits.list_audits(store, run_id=rec.run_id)
        if r.step is not None and r.step < rec.step and r.audit_id != rec.audit_id
    ]
    earlier.reverse()  # highest step first; within a step, the latest audit first
    loaded: dict[str, AuditRecord | None] = {}

    def record(audit_id: str) -> AuditRecord | None:
        if audit_id not in loaded:
            try:
                loaded[audit_id] = audits.load(store, audit_id)
            except Exception:  # noqa: BLE001 -- an unreadable record is skipped like one without the SAE
                loaded[audit_id] = None
        return loaded[audit_id]

    out = []
    for hook in hooks:
        try:
            mine = _sae(rec, hook)
        except InputError as exc:
            out.append(PairOutcome(hook, None, rec.audit_id, reason=str(exc)))
            continue
        prev = None
        for ref in earlier:
            other = record(ref.audit_id)
            r = other.saes.get(hook) if other is not None else None
            if r is not None and r.status in _USABLE and _d_in(r) == _d_in(mine):
                prev = other
                break
        if prev is None:
            why = (
                f"no audit of run {rec.run_id} below step {rec.step} has a finished SAE on {hook} "
                f"with d_in {_d_in(mine)}"
            )
            out.append(PairOutcome(hook, None, rec.audit_id, reason=why))
            continue
        try:
            m = match_features(store, prev, rec, hook, survived=survived, related=related)
        except Exception as exc:  # noqa: BLE001 -- the automatic path reports, it never raises
            out.append(PairOutcome(hook, prev.audit_id, rec.audit_id, reason=_one_line(exc)))
            continue
        out.append(PairOutcome(hook, prev.audit_id, rec.audit_id, matches=m))
    return out


def describe(m: Matches) -> str:
    """One line: `hook: 60 survived, 2 drifted, 1 split, 1 lost, 3 new; mean matched cosine 0.962`."""
    c = m.summary["counts"]
    mean = m.summary.get("mean_matched_cosine")
    tail = f"; mean matched cosine {mean:.3f}" if mean is not None else ""
    return f"{m.hook}: " + ", ".join(f"{c[k]} {k}" for k in (*LABELS, "new")) + tail
