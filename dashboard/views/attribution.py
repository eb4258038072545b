"""Attribution: which pixels or tokens drive the model's decisions (saliency, integrated gradients,
SmoothGrad), whether the maps pass their checks (completeness, model randomisation), and through which
blocks the decisions flow, beside the blocks' Fisher and Hutchinson traces."""

from __future__ import annotations

import html
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboard import columns, state
from microscope.results import attribution as ra

MAPS = ("input", "saliency", "integrated_gradients", "smoothgrad")
TITLES = {"input": "input", "saliency": "saliency", "integrated_gradients": "IG", "smoothgrad": "SmoothGrad"}


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (bytes_to_unicode) inverted: each printable stand-in -> the byte it is."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTES = _byte_alphabet()


def display_tokens(tokens: list[str]) -> list[str]:
    """Token strings as read in text: word pieces (`##x`) glued to the word before; byte-level BPE tokens
    (`Ġx`, `âĢĻ`) decoded to their UTF-8 text (a character split over tokens shows in the token completing
    it); SentencePiece's `▁` as a space; newlines and tabs as ↵ and ⇥. Each token keeps its own cell."""
    import codecs

    if any(t.startswith("Ġ") for t in tokens) and all(c in _BYTES for t in tokens for c in t):
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return [utf8.decode(bytes(_BYTES[c] for c in t)).replace("\n", "↵").replace("\t", "⇥") for t in tokens]
    out = []
    for i, t in enumerate(tokens):
        if t.startswith("▁"):
            out.append(" " + t[1:])
        elif t.startswith("##"):
            out.append(t[2:])
        else:
            out.append(t if i == 0 else " " + t)
    return out


def _image(a: Any) -> np.ndarray:
    """A map (or an input [C, h, w]) as an image in [0, 1], enlarged to about 128 px by pixel repetition."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 3:  # an input: grey, or channels last for RGB
        a = a[0] if a.shape[0] != 3 else np.moveaxis(a, 0, -1)
    lo, hi = np.nanmin(a), np.nanmax(a)
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    k = max(1, 128 // max(a.shape[:2]))
    return np.nan_to_num(a.repeat(k, 0).repeat(k, 1))


def _token_html(tokens: list[str], scores: list[float]) -> str:
    """Tokens coloured by attribution: red pushes the score up, blue down, opacity by |score| / max."""
    top = max((abs(s) for s in scores if s is not None), default=0.0) or 1.0
    spans = []
    for text, s in zip(display_tokens(tokens), scores, strict=True):
        s = s or 0.0
        rgb = "214,39,40" if s > 0 else "31,119,180"
        lead = "&nbsp;" if text.startswith(" ") else ""
        spans.append(
            f'<span title="{s:.4g}" style="background:rgba({rgb},{abs(s) / top:.2f});padding:1px 0">'
            f"{lead}{html.escape(text.lstrip(' '))}</span>"
        )
    return '<div style="line-height:1.9;font-family:monospace">' + "".join(spans) + "</div>"


def _token_bars(tokens: list[str], scores: list[float]) -> alt.Chart:
    data = pd.DataFrame({"position": range(len(tokens)), "token": display_tokens(tokens), "score": scores})
    return (
        alt.Chart(data)
        .mark_bar()
        .encode(
            x=alt.X("position:O"),
            y=alt.Y("score:Q", title="IG attribution"),
            color=alt.condition(alt.datum.score > 0, alt.value("#d62728"), alt.value("#1f77b4")),
            tooltip=["position", "token", alt.Tooltip("score:Q", format=".4g")],
        )
        .properties(height=180)
    )


store, refs, rec = state.current_audit()

st.header(f"Attribution · {rec.audit_id}")
state.notices(ra.attribution_missing(rec))
fp = rec.stages.get("attribution")
overview = ra.attribution_overview(fp, rec.variants)
if overview is None:
    st.stop()
methods, figs = overview["methods"], overview["figures"]
st.caption(
    f"{len(overview['samples'])} {'images' if overview['kind'] == 'images' else 'texts'} · target: "
    f"{methods.get('target', '?')} · IG: {methods.get('ig_steps')} Gauss-Legendre points from "
    f"{methods.get('baseline')} · layer IG: {methods.get('layer_steps')} points"
    + (
        f" · SmoothGrad: {methods['smoothgrad_samples']} copies, σ = {methods['smoothgrad_sigma']:.3g}"
        if "smoothgrad_samples" in methods
        else ""
    )
)
for fig, why in overview["undefined"].items():
    st.info(f"`{fig}` is undefined: {why}")

# ---- checks ------------------------------------------------------------------------------------
st.subheader("Checks")
c1, c2, c3 = st.columns(3)
c1.metric(
    "completeness, worst",
    f"{100 * figs.get('completeness_max_rel', float('nan')):.2f}%",
    help="|Σ attributions − (F(x) − F(baseline))| / |F(x) − F(baseline)|: integrated gradients' quadrature "
    "error. Above ~1%, raise attribution.ig_steps.",
)
c2.metric("completeness, mean", f"{100 * figs.get('completeness_mean_rel', float('nan')):.2f}%")
rnd = overview["randomisation"]
if rnd is not None:
    c3.metric(
        "randomisation Spearman",
        f"{rnd['spearman']:.2f}",
        delta="passes" if rnd["passed"] else "fails",
        delta_color="normal" if rnd["passed"] else "inverse",
    )
    st.caption(
        "Model randomisation (Adebayo et al. 2018): the output layer is re-initialised and the maps compared by "
        "rank correlation; a map that barely changes (Spearman ≥ 0.5) shows the input's edges, not what the "
        f"model learned. {rnd['meaning']}"
    )
if len(overview["variants"]) > 1:
    columns.table(pd.DataFrame(overview["variants"]), hide_index=True, width="stretch")

# ---- blocks --------------------------------------------------------------------------------------
st.subheader("Through which blocks")
metrics = rec.stages.get("metrics")
sens = (metrics.details.get("sensitivity") if metrics is not None else None) or []
shares = ra.layer_shares_table(fp, sens)
state.notices(shares.attrs.get("missing", {}))
if shares.empty:
    st.info("No block shares: the stage was given no blocks to attribute through (trace the layers first).")
else:
    st.caption(
        "Each column as a percentage of its total over these blocks: attribution = share of |layer integrated "
        "gradients|; Fisher and Hutchinson = the blocks' summed Fisher and Hessian traces (metrics stage). "
        "Sensitive blocks that carry little attribution (or the reverse) are worth a look."
    )
    columns.table(
        shares,
        hide_index=True,
        width="stretch",
        column_config={
            "attribution_pct": st.column_config.ProgressColumn(
                "attribution %", format="%.1f", min_value=0, max_value=100
            ),
            "fisher_pct": st.column_config.NumberColumn("Fisher %", format="%.1f"),
            "hessian_pct": st.column_config.NumberColumn("Hutchinson %", format="%.1f"),
            "fisher_trace": st.column_config.NumberColumn("Fisher trace", format="%.4g"),
            "hessian_trace": st.column_config.NumberColumn("Hessian trace", format="%.4g"),
        },
    )
    long = shares.melt(id_vars="block", value_vars=["attribution_pct", "fisher_pct", "hessian_pct"], var_name="figure")
    st.altair_chart(
        alt.Chart(long.dropna())
        .mark_bar()
        .encode(
            y=alt.Y("block:N", sort=None, title=None),
            x=alt.X("value:Q", title="% of the column's total"),
            color=alt.Color("figure:N"),
            yOffset="figure:N",
            tooltip=["block", "figure", alt.Tooltip("value:Q", format=".1f")],
        )
        .properties(height=max(160, 54 * len(shares))),
        width="stretch",
    )

# ---- samples -------------------------------------------------------------------------------------
st.subheader("Samples")
full = ra.attribution_results(store, fp)
if full is None:
    st.info("The stage's results.json is not listed in its record; the maps cannot be shown.")
    st.stop()
if full["kind"] == "images":
    for s in full["per_sample"]:
        st.markdown(
            f"**#{s['index']}** · label {s['label']} · predicted {s['predicted']} "
            f"({'right' if s['label'] == s['predicted'] else 'wrong'}) · completeness error "
            f"{100 * s['relative_delta']:.2f}%"
        )
        for col, name in zip(st.columns(len(MAPS)), MAPS, strict=True):
            if name in s["maps"]:
                col.image(_image(s["maps"][name]), caption=TITLES[name], clamp=True)
else:
    for s in full["per_sample"]:
        head = f"**#{s['index']}** · completeness error {100 * s['relative_delta']:.2f}%"
        if full["kind"] == "causal":
            head += f" · predicted next token `{s['predicted_token']}`"
            if "next_token" in s:
                head += f" (actual `{s['next_token']}`)"
        st.markdown(head)
        st.markdown(_token_html(s["tokens"], s["scores"]), unsafe_allow_html=True)
        with st.expander("per-token bars"):
            st.altair_chart(_token_bars(s["tokens"], s["scores"]), width="stretch")
