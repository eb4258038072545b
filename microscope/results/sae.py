"""SAE features: a hook's features table, a feature's contexts, and its fate on the quantized variants
and across the checkpoints of its training run."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from schemas.records import AuditRecord, StageRecord, StageStatus

from microscope.audits import AuditRef, list_audits
from microscope.errors import InputError
from microscope.results.missing import why_missing
from microscope.store import ArtifactStore

if TYPE_CHECKING:
    import pandas as pd

FEATURE_COLUMNS = (
    "feature",
    "density",
    "mean_activation",
    "max_activation",
    "top_context",
    "top_logits",
    "bottom_logits",
)


def sae_summaries(saes: Mapping[str, StageRecord]) -> list[dict[str, Any]]:
    """What each SAE's record says, in the given order: `hook`, `failed`, `error`, `architecture`, `d_sae`,
    `metrics`, `undefined`, `variants` (per quantized variant: its figures on the variant's activations),
    `top_features` (the record's short list) and `density` ((log10 bin edges, counts) of the features'
    firing densities, None without one). Takes the per-hook records: the report reads them while the
    audit runs, before an audit record exists."""
    out = []
    for hook, r in saes.items():
        d = r.details if r.status != StageStatus.failed else {}
        h = d.get("density_hist") or {}
        out.append(
            {
                "hook": hook,
                "failed": r.status == StageStatus.failed,
                "error": r.error,
                "architecture": d.get("architecture"),
                "d_sae": d.get("d_sae"),
                "metrics": r.metrics,
                "undefined": r.undefined,
                "variants": d.get("variants") or {},
                "top_features": d.get("top_features") or [],
                "density": (h["bins_log10"], h["counts"]) if h.get("counts") else None,
            }
        )
    return out


def _key(store: ArtifactStore, uri: str) -> str:
    """The store key of an artifact URI (records hold URIs; the store reads keys)."""
    root = store.uri_for("x")[:-1]
    return uri[len(root) :] if uri.startswith(root) else uri


def _sae_features_key(store: ArtifactStore, record: AuditRecord, hook: str) -> tuple[str | None, str | None]:
    """(features.parquet key, None) or (None, why it is missing)."""
    r = record.saes.get(hook)
    if r is None:
        why = why_missing(record, "sae")
        if why is None:
            trained = ", ".join(sorted(record.saes)) or "none"
            why = f"no SAE on {hook} in audit {record.audit_id} (SAEs: {trained}); add it to sae.hooks"
        return None, why
    if r.status == StageStatus.failed:
        return None, f"the SAE on {hook} failed: {r.error or 'no error recorded'}; fix it and run the audit again"
    key = f"{r.details['prefix']}/features.parquet" if r.details.get("prefix") else None
    if key is None and "features" in r.artifacts:
        key = _key(store, r.artifacts["features"])
    if key is None or not store.exists(key):
        return None, f"the features table of the SAE on {hook} is not in {store.uri}: run the audit's sae stage again"
    return key, None


def features(store: ArtifactStore, record: AuditRecord, hook: str) -> pd.DataFrame:
    """The SAE's features table, one row per latent: `feature`, `density` (firing fraction over every
    traced token), `mean_activation` (mean when firing), `max_activation` and `top_context` (its best
    context as `left[token]right`), and where the model has an unembedding `top_logits`/`bottom_logits`
    (tokens its decoder direction raises/lowers); per quantized variant `v` the feature's firing density on
    the variant's activations `density[v]` and the correlation of its activations with full precision's on
    the same tokens `corr[v]` (audits made before these were recorded lack them). The contexts themselves:
    `feature_contexts`."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    key, why = _sae_features_key(store, record, hook)
    if key is None:
        df = pd.DataFrame(columns=list(FEATURE_COLUMNS))
        df.attrs["missing"] = {"sae": why}
        return df
    table = pq.read_table(store.local_path(key))
    out = {c: table.column(c).to_numpy() for c in ("feature", "density", "mean_activation")}
    ctx = table.column("top_contexts").combine_chunks()
    offsets = ctx.offsets.to_numpy()
    lengths, starts = np.diff(offsets), offsets[:-1] - offsets[0]
    flat = ctx.flatten()
    has = lengths > 0
    first = np.where(has, starts, 0)
    if len(flat):  # contexts are stored best first
        act = flat.field("activation").to_numpy(zero_copy_only=False).astype(np.float64)
        left, tok, right = (flat.field(f).to_numpy(zero_copy_only=False) for f in ("left", "token", "right"))
        out["max_activation"] = np.where(has, act[first], np.nan)
        # a context cut inside a word starts with its WordPiece continuation: shown as text, not `##al`
        out["top_context"] = [
            f"{left[i].removeprefix('##')}[{tok[i]}]{right[i]}" if h else None for i, h in zip(first, has, strict=True)
        ]
    else:
        out["max_activation"] = np.full(len(has), np.nan)
        out["top_context"] = [None] * len(has)
    for col in ("top_logits", "bottom_logits"):
        if col in table.column_names:
            out[col] = table.column(col).to_pylist()
    fate = [c for c in table.column_names if c.startswith(("density[", "corr["))]  # per quantized variant
    for col in fate:
        out[col] = table.column(col).to_numpy()
    df = pd.DataFrame(out, columns=[c for c in FEATURE_COLUMNS if c in out] + fate)
    df.attrs["missing"] = {} if "top_logits" in out else {"sae.top_logits": "the model has no unembedding"}
    df.attrs["hook"] = hook
    return df


def feature_contexts(store: ArtifactStore, record: AuditRecord, hook: str, feature: int) -> list[dict[str, Any]]:
    """The feature's top-activating contexts, best first: `left`, `token`, `right` (text), `activation` (at
    the token), `window` and `position` (where in the ingested token windows), and, from audits whose sae
    stage recorded them, `tokens` (each token of the context), `activations` (the feature's activation at
    each, NaN where a token was not traced) and `center` (the index of the top token). Empty when the audit
    has no such SAE."""
    import pyarrow.parquet as pq

    key, _ = _sae_features_key(store, record, hook)
    if key is None:
        return []
    d_sae = pq.ParquetFile(store.local_path(key)).metadata.num_rows
    if not 0 <= feature < d_sae:
        raise InputError(f"feature {feature} is outside the SAE on {hook} (features 0 to {d_sae - 1})")
    t = pq.read_table(store.local_path(key), columns=["feature", "top_contexts"], filters=[("feature", "==", feature)])
    rows = t.column("top_contexts").to_pylist()
    return [dict(c) for c in rows[0]] if rows else []


def feature_histogram(store: ArtifactStore, record: AuditRecord, hook: str, feature: int) -> dict[str, Any] | None:
    """The feature's activation histogram over every traced token where it fired: `edges` (log-spaced,
    HIST_EDGES of the SAE stage; the first bin also holds smaller activations, the last larger ones) and
    `counts`. None for audits whose SAE stage did not record it (before version 3) or without the SAE."""
    import pyarrow.parquet as pq

    from microscope.sae.features import HIST_EDGES

    key, _ = _sae_features_key(store, record, hook)
    if key is None:
        return None
    path = store.local_path(key)
    if "activation_hist" not in pq.ParquetFile(path).schema_arrow.names:
        return None
    t = pq.read_table(path, columns=["feature", "activation_hist"], filters=[("feature", "==", feature)])
    rows = t.column("activation_hist").to_pylist()
    if not rows:
        raise InputError(f"feature {feature} is not in the SAE on {hook}")
    return {"edges": HIST_EDGES.tolist(), "counts": list(rows[0])}


# Tokenizers whose pieces continue a word with "##" and start a word with nothing (WordPiece).
WORDPIECE_MODELS = frozenset({"bert", "distilbert", "electra", "mobilebert", "squeezebert", "convbert", "layoutlm"})
_NO_SPACE_BEFORE = frozenset(".,;:!?)]}'%")


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char → byte (the inverse of its `bytes_to_unicode`): printable bytes
    stand for themselves, the others are shifted to U+0100 and up (space is `Ġ`, newline `Ċ`)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    shifted = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return {c: b for b, c in chars.items()}


def _raw_byte_level(tokens: list[str], alphabet: dict[str, int]) -> bool:
    """Pieces still in the byte-level alphabet (`convert_ids_to_tokens`), not decoded text: some piece
    holds a shifted char and every char is in the alphabet."""
    return any(any(ord(ch) >= 256 for ch in t) for t in tokens) and all(ch in alphabet for t in tokens for ch in t)


def display_tokens(tokens: list[str], word_pieces: bool) -> list[str]:
    """Each token as it reads in running text: WordPiece continuations (`##x`) join their word and other
    pieces get the space WordPiece drops (`he`, `##x` → `hex`); pieces still in GPT-2's byte-level alphabet
    (`Ġthe`, `Ċ`) are decoded to their bytes' text, a character split over pieces shown on the piece that
    completes it; SentencePiece's `▁` is a space. Decoded text is left as it is."""
    import codecs

    if word_pieces:
        return [
            t[2:] if t.startswith("##") else t if i == 0 or t in _NO_SPACE_BEFORE else " " + t
            for i, t in enumerate(tokens)
        ]
    alphabet = _byte_alphabet()
    if _raw_byte_level(tokens, alphabet):
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return [utf8.decode(bytes(alphabet[ch] for ch in t)) for t in tokens]
    return [t.replace("▁", " ") for t in tokens]


def variant_fate(density_fp: float, density_v: float, corr: float) -> str:
    """A feature's fate on a quantized variant's activations (same SAE, same tokens): `survived` (its
    activations correlate ≥ 0.9 with full precision's), `drifted` (≥ 0.5), `lost` (it stops firing, or
    fires unrelated to where it fired); `dead` when it never fires in full precision either."""
    if not density_fp > 0:
        return "dead"
    if not density_v > 0 or not math.isfinite(corr):
        return "lost"
    from microscope.feature_matching import RELATED, SURVIVED  # the bounds of the matches across checkpoints

    return "survived" if corr >= SURVIVED else "drifted" if corr >= RELATED else "lost"


def feature_fate(store: ArtifactStore, record: AuditRecord, hook: str, feature: int) -> pd.DataFrame:
    """`feature` of the SAE on `hook` followed through its training run, by the one-to-one decoder matches
    stored between consecutive checkpoints (each audit matches itself against the run's previous one when
    it ends; `microscope match A B` makes any other pair). One row per step, in step order: `step`,
    `audit_id`, `feature` (its counterpart there), `cosine` (to the counterpart one step closer to this
    audit), `label` (survived | drifted | split | lost | new, seen from the earlier step; `this audit` on
    its own row). Following stops where the feature is lost (going forward) or new (going back), or where
    no match was stored (`attrs["missing"]` says which pair and how to make it)."""
    import pandas as pd

    from microscope import feature_matching as fm

    cols = ["step", "audit_id", "feature", "cosine", "label", "split_into"]
    missing: dict[str, str] = {}
    refs = [r for r in list_audits(store, run_id=record.run_id) if r.step is not None] if record.run_id else []
    by_step = {r.step: r for r in refs}  # the latest audit of a step stands for it
    if record.step is not None:
        by_step[record.step] = next(r for r in refs if r.audit_id == record.audit_id)
    chain = [by_step[s] for s in sorted(by_step)]
    here = next((i for i, r in enumerate(chain) if r.audit_id == record.audit_id), None)
    rows: list[dict[str, Any]] = []
    if here is None or len(chain) < 2:
        df = pd.DataFrame(rows, columns=cols)
        df.attrs["missing"] = {"run": f"audit {record.audit_id} has no other checkpoint of its run with a step"}
        return df
    rows.append(
        {
            "step": record.step,
            "audit_id": record.audit_id,
            "feature": feature,
            "cosine": 1.0,
            "label": "this audit",
            "split_into": [],
        }
    )

    def lacking(a: AuditRef, b: AuditRef) -> None:
        missing[f"matches {a.step}→{b.step}"] = (
            f"no stored feature matches between audits {a.audit_id} (step {a.step}) and {b.audit_id} (step "
            f"{b.step}) on {hook}: `microscope match {a.audit_id} {b.audit_id} --hook {hook}` makes them"
        )

    cur: int | None = feature
    for a, b in zip(chain[here:], chain[here + 1 :], strict=False):  # forward: what it became
        m = fm.load_matches(store, a.audit_id, b.audit_id, hook)
        if m is None:
            lacking(a, b)
            break
        t = m.features.to_pandas().set_index("feature_a")
        r = t.loc[cur]
        partner = int(r["feature_b"])
        split = [int(x) for x in (r["split_into"] if r["split_into"] is not None else [])]
        rows.append(
            {
                "step": b.step,
                "audit_id": b.audit_id,
                "feature": partner if partner >= 0 else None,
                "cosine": float(r["cosine"]),
                "label": str(r["label"]),
                "split_into": split,
            }
        )
        if r["label"] in ("lost", "split") or partner < 0:
            break
        cur = partner
    cur = feature
    for a, b in reversed(list(zip(chain[:here], chain[1 : here + 1], strict=False))):  # back: where it came from
        m = fm.load_matches(store, a.audit_id, b.audit_id, hook)
        if m is None:
            lacking(a, b)
            break
        t = m.features.to_pandas()
        hit = t[t["feature_b"] == cur]
        if hit.empty or hit.iloc[0]["label"] == "lost":
            rows.append(
                {
                    "step": a.step,
                    "audit_id": a.audit_id,
                    "feature": None,
                    "cosine": math.nan,
                    "label": f"new at step {b.step}",
                    "split_into": [],
                }
            )
            break
        r = hit.iloc[0]
        rows.append(
            {
                "step": a.step,
                "audit_id": a.audit_id,
                "feature": int(r["feature_a"]),
                "cosine": float(r["cosine"]),
                "label": str(r["label"]),
                "split_into": [],
            }
        )
        cur = int(r["feature_a"])
    df = pd.DataFrame(rows, columns=cols).sort_values("step", kind="stable").reset_index(drop=True)
    df.attrs["missing"] = missing
    return df
