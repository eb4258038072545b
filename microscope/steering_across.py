"""The same steering edit everywhere an audit reaches: on full precision, on each of the audit's quantized or
pruned variants (same SAE, same features), and on the other checkpoints of its training run, where each
edited feature is first mapped to its one-to-one match in that checkpoint's SAE (`feature_matching`). One
row per place: does the edit still do what it did, or was the feature lost on the way?

Labs (model + SAE) are kept in a small module-level LRU (`LAB_CACHE` entries, keyed by store URI, audit,
hook and variant), so rerunning the table with another α reloads nothing. The viewer's interactive lab keeps
its own `st.cache_resource`; the two do not share models."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from microscope import audits
from microscope.errors import InputError
from microscope.steering import Edit, Positions
from microscope.store import ArtifactStore

if TYPE_CHECKING:
    import pandas as pd
    from schemas.records import AuditRecord

    from microscope.steering_audit import Lab

LAB_CACHE = 6  # fp + three variants + two checkpoints of a tiny run; each entry holds a model in memory
COLUMNS = ["where", "feature", "kl", "top1_clean", "top1_edited", "activation_before", "activation_after", "error"]
LOST = "lost"

_labs: OrderedDict[tuple[str, str, str, str], Lab] = OrderedDict()
_lock = threading.Lock()  # Streamlit runs sessions in threads: one load at a time keeps the LRU whole


def cached_lab(store: ArtifactStore, audit_id: str, hook: str, variant: str = "fp") -> Lab:
    """`open_lab` through the LRU of `LAB_CACHE` labs (the least recently used is dropped)."""
    from microscope.steering_audit import open_lab

    key = (store.uri, audit_id, hook, variant)
    with _lock:
        if key in _labs:
            _labs.move_to_end(key)
            return _labs[key]
        lab = open_lab(store, audit_id, hook, variant)
        _labs[key] = lab
        while len(_labs) > LAB_CACHE:
            _labs.popitem(last=False)
        return lab


def clear_labs() -> None:
    with _lock:
        _labs.clear()


def one_line(exc: BaseException) -> str:
    """An exception as one line: InputError's own message, else `Type: first line`."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return msg if isinstance(exc, InputError) and msg else f"{type(exc).__name__}: {msg}".rstrip(": ")


def feature_map(store: ArtifactStore, rec: AuditRecord, other: AuditRecord, hook: str) -> dict[int, int | None]:
    """Every feature of `rec`'s SAE on `hook` → its match in `other`'s (None: lost). The pair is matched
    earlier step → later step (the direction the audits store when they end, so the stored pair is reused,
    not recomputed); seen from the later audit the mapping is the assignment read backwards, and a feature
    whose earlier partner is labelled lost (or that has none) is new there: lost going back."""
    from microscope import feature_matching as fm

    forward = (rec.step if rec.step is not None else -1) <= (other.step if other.step is not None else -1)
    a, b = (rec, other) if forward else (other, rec)
    t = fm.match_features(store, a, b, hook).features.to_pandas()
    gone = (t["label"] == LOST) | (t["feature_b"] < 0)
    if forward:
        return {
            int(fa): (None if g else int(fb)) for fa, fb, g in zip(t["feature_a"], t["feature_b"], gone, strict=True)
        }
    back: dict[int, int | None] = {}
    for fa, fb, g in zip(t["feature_a"], t["feature_b"], gone, strict=True):
        if fb >= 0:
            back[int(fb)] = None if g else int(fa)
    return back  # a feature of rec absent here had no partner at all: .get() gives None, lost


def _row(where: str, feature: str, **kw: Any) -> dict[str, Any]:
    return {c: None for c in COLUMNS} | {"where": where, "feature": feature} | kw


def _steer(lab: Lab, where: str, edits: Sequence[Edit], ids: Any, positions: Positions) -> dict[str, Any]:
    """One place's row: the edit's KL, top-1 tokens and the edited features' activations (means over the
    edited tokens, and over the edited features when there are several)."""
    feature = ", ".join(str(e.feature) for e in dict.fromkeys(edits))
    try:
        res = lab.steerer.compare(ids, edits, positions, top_k=1)
    except Exception as exc:  # noqa: BLE001 -- a place that cannot run is a row saying why, not a crash
        return _row(where, feature, error=one_line(exc))
    feats = res.get("features") or []
    mean = (lambda k: sum(f[k] for f in feats) / len(feats)) if feats else (lambda k: None)
    return _row(
        where,
        ", ".join(str(f["feature"]) for f in feats) or feature,
        kl=res.get("kl"),
        top1_clean=res["top_clean"][0][0] if res.get("top_clean") else None,
        top1_edited=res["top_edited"][0][0] if res.get("top_edited") else None,
        activation_before=mean("before_mean"),
        activation_after=mean("after_mean"),
    )


def steer_across(
    store: ArtifactStore,
    audit_id: str,
    hook: str,
    edits: Sequence[Edit],
    prompt_ids: Any,
    positions: Positions = "all",
    *,
    open_lab: Callable[[ArtifactStore, str, str, str], Lab] | None = None,
) -> pd.DataFrame:
    """The edits on the prompt [1, T] (token ids of the audit's tokenizer) at every place: `fp`, each
    variant, then `step N (audit id)` for the run's other audits (step order). Columns: `COLUMNS`; `feature`
    is the feature(s) edited there as text (`lost` where a feature has no match in that checkpoint), `kl`
    KL(clean ‖ edited) of the next token (None for encoders), `top1_*` token ids, `error` why a place has
    no figures. Labs come from `open_lab` (default: this module's LRU, `cached_lab`)."""
    import pandas as pd

    opener = open_lab or cached_lab
    edits = list(edits)
    rec = audits.load(store, audit_id)
    rows = []
    for variant in ["fp", *rec.variants]:
        try:
            lab = opener(store, audit_id, hook, variant)
        except Exception as exc:  # noqa: BLE001 -- a variant that cannot load (a format this host lacks)
            rows.append(_row(variant, ", ".join(str(e.feature) for e in edits), error=one_line(exc)))
            continue
        rows.append(_steer(lab, variant, edits, prompt_ids, positions))
    others = [r for r in audits.list_audits(store, run_id=rec.run_id) if r.audit_id != audit_id] if rec.run_id else []
    for ref in others:
        where = f"step {ref.step if ref.step is not None else '?'} ({ref.audit_id})"
        try:
            other = audits.load(store, ref.audit_id)
            mapping = feature_map(store, rec, other, hook)
        except Exception as exc:  # noqa: BLE001 -- no SAE there, incomparable widths: the row says so
            rows.append(_row(where, "", error=one_line(exc)))
            continue
        mapped = [mapping.get(e.feature) for e in edits]
        if any(m is None for m in mapped):
            lost = [e.feature for e, m in zip(edits, mapped, strict=True) if m is None]
            shown = ", ".join(LOST if m is None else str(m) for m in mapped)
            why = f"feature(s) {', '.join(map(str, lost))} have no match in {ref.audit_id} on {hook}"
            rows.append(_row(where, shown, error=why))
            continue
        moved = [Edit(int(m), e.mode, e.alpha) for e, m in zip(edits, mapped, strict=True)]
        try:
            lab = opener(store, ref.audit_id, hook, "fp")
        except Exception as exc:  # noqa: BLE001
            rows.append(_row(where, ", ".join(str(m) for m in mapped), error=one_line(exc)))
            continue
        rows.append(_steer(lab, where, moved, prompt_ids, positions))
    return pd.DataFrame(rows, columns=COLUMNS)
