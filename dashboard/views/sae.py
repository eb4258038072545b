"""SAE features: per SAE the features table; a feature's top-activating contexts with each token shaded
by the feature's activation, its nearest features across audits (Qdrant), its fate in each quantized
variant, and its fate across the run's checkpoints (one-to-one decoder matches, stored per pair of
audits by the audit that made the later one)."""

from __future__ import annotations

import html
import math

import pandas as pd
import streamlit as st

from dashboard import state
from microscope import results
from microscope.formatting import fmt

store, refs, rec = state.current_audit()

st.header(f"SAE features · {rec.audit_id}")
hooks = sorted(rec.saes)
if not hooks:
    state.notices({"sae": results.why_missing(rec, "sae") or f"no SAE was trained: {results.HOW['sae']}"})
    st.stop()
hook = state.choose("SAE (hook)", hooks, "hook")
sae = rec.saes[hook]
table = state.features(store, rec, hook)
state.notices({k: v for k, v in table.attrs.get("missing", {}).items() if k != "sae.top_logits"})
if table.empty:
    st.stop()
m = sae.metrics
st.caption(
    f"{sae.details.get('architecture', '?')} SAE · {len(table)} features on `{hook}` · "
    + " · ".join(f"{k} {m[k]:.4g}" for k in ("fvu", "l0", "dead_frac", "ce_recovered") if k in m)
)

# ---- the features table -----------------------------------------------------------------------
query = st.text_input("Filter by token or context text", key="_microscope_feature_filter")
alive = st.toggle("Hide dead features", value=True)
view = table
if alive:
    view = view[view["density"] > 0]
if query:
    text = view["top_context"].fillna("")
    if "top_logits" in view.columns:
        text = text + " " + view["top_logits"].map(lambda v: " ".join(v) if v is not None else "")
    view = view[text.str.contains(query, case=False, regex=False)]
shown_cols = [
    c
    for c in ("feature", "density", "mean_activation", "max_activation", "top_context", "top_logits")
    if c in view.columns
]
st.dataframe(
    view[shown_cols].head(5000),
    hide_index=True,
    width="stretch",
    height=300,
    column_config={"density": st.column_config.NumberColumn(format="%.2e")},
)
st.caption(f"{len(view)} of {len(table)} features shown" + (" (first 5,000)" if len(view) > 5000 else ""))

# ---- one feature ------------------------------------------------------------------------------
showcase = [f["feature"] for f in sae.details.get("top_features") or []]
default = showcase[0] if showcase else int(view["feature"].iloc[0]) if not view.empty else 0
feature = state.choose_int("Feature", "feature", max_value=len(table) - 1, default=default)
row = table.iloc[feature]
c = st.columns(4)
c[0].metric(
    "density", fmt(row["density"], "percent"), help="Share of traced tokens where the feature fires (held-out rows)."
)
c[1].metric("mean activation (firing)", fmt(row["mean_activation"]), help="Mean activation where it fires.")
c[2].metric("max activation", fmt(row["max_activation"]), help="Largest activation over the traced tokens.")
if "top_logits" in table.columns and row.get("top_logits") is not None:
    c[3].markdown("**raises** " + " ".join(f"`{t}`" for t in row["top_logits"][:6]))
    c[3].markdown("**lowers** " + " ".join(f"`{t}`" for t in row["bottom_logits"][:6]))

st.subheader(f"Top-activating contexts of feature {feature}")
contexts = state.feature_contexts(store.uri, rec.audit_id, state.digest(store, rec), hook, feature, rec)
if not contexts:
    st.info("This feature never fired on the audit's tokens (a dead feature): it has no context.")


arch = rec.architecture
word_pieces = (arch is not None and arch.model_type in results.WORDPIECE_MODELS) or any(
    t.startswith("##") for c in contexts for t in c.get("tokens") or []
)


def _shade(ctx: dict, top: float) -> str:
    """A context as HTML, every token's background by its activation relative to the feature's maximum
    (contexts recorded before per-token activations were stored shade only their top token); word pieces
    and byte-level markers rendered as the text they stand for."""
    tokens = ctx.get("tokens")
    acts = ctx.get("activations")
    if not tokens or acts is None:
        tokens, acts = [ctx["left"], ctx["token"], ctx["right"]], [0.0, ctx["activation"], 0.0]
    else:
        tokens = results.display_tokens(list(tokens), word_pieces)
    spans = []
    for tok, a in zip(tokens, acts, strict=False):
        a = 0.0 if a is None or not math.isfinite(a) else a
        alpha = max(0.0, min(1.0, a / top)) if top > 0 else 0.0
        spans.append(
            f'<span title="{a:.4g}" style="background: rgba(255,120,0,{alpha:.2f}); border-radius: 2px">'
            f"{html.escape(tok)}</span>"
        )
    return "".join(spans)


top_act = max((c["activation"] for c in contexts), default=0.0)
if contexts:
    lines = [
        f'<div style="font-family: monospace; white-space: pre-wrap; margin: 2px 0">'
        f'<b style="color:#888">{c["activation"]:.3g}</b> {_shade(c, top_act)}</div>'
        for c in contexts
    ]
    st.html("".join(lines))
    if not contexts[0].get("tokens"):
        st.caption(
            "This audit's SAE stage stored the top token's activation only: run the audit again to shade every token."
        )

hist = results.feature_histogram(store, rec, hook, feature)
if hist is not None and sum(hist["counts"]):
    import pandas as pd

    edges, counts = hist["edges"], hist["counts"]
    bins = pd.DataFrame({"from": edges[:-1], "to": edges[1:], "tokens": counts})
    st.markdown(
        f"**Activation histogram** over the {sum(counts):,} traced tokens where feature {feature} fires "
        "(log-spaced bins; as on Neuronpedia, the shape tells a crisp feature from a diffuse one)"
    )
    st.vega_lite_chart(
        bins[bins["tokens"] > 0],
        {
            "mark": {"type": "bar", "tooltip": True},
            "encoding": {
                "x": {"field": "from", "type": "quantitative", "scale": {"type": "log"}, "title": "activation"},
                "x2": {"field": "to"},
                "y": {"field": "tokens", "type": "quantitative", "title": "tokens"},
            },
            "height": 160,
        },
        width="stretch",
    )
elif hist is None:
    st.caption("No activation histogram: this audit's SAE stage predates it (run the sae stage again).")

# ---- its fate in the quantized variants -------------------------------------------------------
fate_cols = [c for c in table.columns if c.startswith("corr[")]
st.subheader("In the quantized variants")
if not rec.variants:
    st.info(f"No quantized variant: {results.HOW['quantize']}.")
elif not fate_cols:
    variants = sae.details.get("variants") or {}
    st.info(
        "Per-feature fate on the variants' activations is not in this audit's features table (audits made "
        "before it was recorded); the SAE's overall figures on each variant: "
        + "; ".join(f"{v}: FVU {x['fvu']:.4g}, L0 {x['l0']:.4g}" for v, x in variants.items())
    )
else:
    import pandas as pd

    rows = []
    for col in fate_cols:
        v = col[len("corr[") : -1]
        corr, dens = row[col], row.get(f"density[{v}]", math.nan)
        rows.append(
            {
                "variant": v,
                "fate": results.variant_fate(row["density"], dens, corr),
                "correlation with fp": corr,
                "density on the variant": dens,
            }
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption(
        "The same SAE on each variant's activations at the same tokens (the held-out rows): the correlation "
        "of this feature's activations with full precision's, and how often it fires there."
    )

# ---- across the run's checkpoints -------------------------------------------------------------
st.subheader("Across the run's checkpoints")
if not rec.run_id:
    st.info("This audit belongs to no training run (`--run-id RUN --step N`): there is nothing to follow.")
else:
    fate = results.feature_fate(store, rec, hook, feature)
    state.notices(fate.attrs.get("missing", {}))
    if not fate.empty:
        st.dataframe(fate, hide_index=True, width="stretch")

# ---- nearest features (Qdrant) ----------------------------------------------------------------
st.subheader("Nearest features (decoder cosine, every audit)")
if state.vector_index() is None:
    st.info(state.NOT_INDEXED)
else:
    hits = state.nearest("features", (rec.audit_id, hook, feature), 11)
    hits = [h for h in hits if not (h["audit_id"] == rec.audit_id and h["hook"] == hook and h["feature"] == feature)]
    if not hits:
        st.info(f"Feature {feature} of `{hook}` is not in the index: the metrics stage indexes the SAEs of each audit.")
    else:
        import pandas as pd

        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "cosine": h["score"],
                        "audit": h["audit_id"],
                        "also in": ", ".join(a for a in h.get("audit_ids") or [] if a != h["audit_id"]),
                        "hook": h["hook"],
                        "feature": h["feature"],
                        "density": h.get("density"),
                        "top tokens": " ".join(h.get("top_tokens") or []),
                    }
                    for h in hits[:10]
                ]
            ),
            hide_index=True,
            width="stretch",
        )

# ---- provenance -------------------------------------------------------------------------------
st.subheader("Where it comes from")
st.caption(
    "The upstream SAE features (two layers back where the audit has an SAE there) that feed this feature most "
    "on its top contexts, by attribution: each upstream feature's activation × the gradient of this feature's "
    "activation with respect to it, through the model (microscope/provenance.py)."
)
if st.button("Trace its upstream features", key="provenance"):
    from microscope.errors import InputError
    from microscope.provenance import graph_dot, provenance

    try:
        with st.spinner("Loading the model and attributing…"):
            prov = provenance(store, rec.audit_id, hook, int(feature))
    except InputError as exc:
        st.info(str(exc))
    else:
        st.graphviz_chart(graph_dot(prov))
        st.dataframe(pd.DataFrame(prov["edges"]), hide_index=True, width="stretch")
        st.caption(
            f"On {prov['contexts_used']} of the feature's top contexts; upstream SAE: `{prov['upstream_hook']}`."
        )
