"""Feature lab: steer the audited model through its SAE features. Per prompt token the SAE's most active
features; a few edits (add α × max activation along a feature's decoder direction, or clamp it to α × its
max activation); the clean and edited next token side by side with their KL, a short greedy continuation
(causal LMs) or the embedding cosine (encoders), the off-target cost on held-out windows, and the same edit
on every variant and checkpoint of the run (`microscope.steering_across`).

The lab (model + SAE) is an `st.cache_resource` keyed by (store URI, audit, hook, variant), three at most:
moving α reruns only the edited pass (the Steerer caches the clean one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import state
from microscope import results
from microscope.steering import Edit

MAX_EDITS = 4
ALPHA_RANGE = (-10.0, 10.0)
TOP_K = 10
NEUTRAL_WINDOWS = 4  # the audit's last token windows: the held-out slice the off-target cost is measured on
PATCH_WINDOWS = 32  # the audit's first windows: a patch is fitted on 3/4 of them, its fidelity held out on the rest
FALLBACK_PROMPT = "The quick brown fox jumps over the"
K = "_microscope_lab."  # session-state keys of this page
USABLE = ("completed", "cached")


@st.cache_resource(max_entries=3, show_spinner="Loading the model and its SAE…")
def _lab(uri: str, audit_id: str, hook: str, variant: str) -> Any:
    from microscope.steering_audit import open_lab

    return open_lab(state._open(uri), audit_id, hook, variant)


@st.cache_data(max_entries=8, show_spinner=False)
def _neutral(uri: str, audit_id: str, _rec: Any) -> np.ndarray:
    from microscope.modality import open_data

    return np.asarray(open_data(_rec.stages["ingest"], state._open(uri)).ids[-NEUTRAL_WINDOWS:])


@st.cache_data(max_entries=8, show_spinner=False)
def _calibration(uri: str, audit_id: str, _rec: Any) -> Any:
    """The windows a patch is fitted on (and its fidelity held out from): the audit's first 32."""
    import torch

    from microscope.modality import open_data

    ids = open_data(_rec.stages["ingest"], state._open(uri)).ids[:PATCH_WINDOWS]
    return torch.from_numpy(np.array(ids, dtype=np.int64))


def _adapter_zip(fitted: Any, model: Any, manifest: dict[str, Any]) -> bytes:
    """The patch as a PEFT LoRA adapter folder (+ manifest), zipped for the download button."""
    import io
    import tempfile
    import zipfile

    from microscope.patches import save_adapter

    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(buf, "w") as zf:
        for f in save_adapter(fitted, model, Path(tmp) / "patch", manifest):
            zf.write(f, f"patch/{f.name}")
    return buf.getvalue()


def _one_line(exc: BaseException) -> str:
    from microscope.steering_across import one_line

    return one_line(exc)


def _token(tok: Any, i: int) -> str:
    return tok.decode([int(i)]).replace("\n", "↵").replace("\t", "⇥")


def _default_prompt(sae: Any) -> str:
    """The start of the audit's best context (up to its top token), so the showcased feature fires at the
    prompt's last token."""
    for f in sae.details.get("top_features") or []:
        for c in f.get("top_contexts") or []:
            text = f"{c.get('left', '')}{c.get('token', '')}"
            for special in ("<|endoftext|>", "[CLS]", "[SEP]", "[PAD]", "<s>", "</s>"):  # the tokenizer adds its own
                text = text.replace(special, "")
            text = text.strip()
            if text:
                return text
    return FALLBACK_PROMPT


store, refs, rec = state.current_audit()
st.header(f"Feature lab · {rec.audit_id}")

hooks = sorted(h for h, r in rec.saes.items() if r.status.value in USABLE)
if not hooks:
    why = results.why_missing(rec, "sae") or f"its SAEs did not finish: {results.HOW['sae']}"
    st.info(f"No trained SAE to steer with, so nothing to do here: {why}.")
    st.stop()

c_hook, c_variant = st.columns(2)
with c_hook:
    hook = state.choose("SAE (hook)", hooks, "hook")
with c_variant:
    variant = st.selectbox("Model", ["fp", *rec.variants], key=K + "variant", help="full precision or a variant")

try:
    lab = _lab(store.uri, rec.audit_id, hook, variant)
except Exception as exc:  # noqa: BLE001 -- a model or SAE that cannot load is a notice, never a traceback
    st.error(f"Cannot load the lab for `{hook}` on {variant}: {_one_line(exc)}")
    st.stop()
steerer, tok = lab.steerer, lab.tokenizer
table = state.features(store, rec, hook)
context = dict(zip(table["feature"], table["top_context"], strict=True)) if "top_context" in table else {}
d_sae = len(lab.max_acts)

# ---- the prompt and its features ---------------------------------------------------------------
if K + "prompt" not in st.session_state:
    st.session_state[K + "prompt"] = _default_prompt(rec.saes[hook])
prompt = st.text_area("Prompt", key=K + "prompt", height=68)
ids = tok(prompt, return_tensors="pt")["input_ids"]
if ids.shape[1] == 0:
    st.warning("The prompt has no tokens: write some text.")
    st.stop()
try:
    active = steerer.features_at(ids, top=3)
except Exception as exc:  # noqa: BLE001 -- e.g. a prompt longer than the model's positions
    st.error(f"Cannot run the prompt: {_one_line(exc)}")
    st.stop()
tokens = [_token(tok, i) for i in ids[0].tolist()]
with st.expander(f"Active features per token ({len(tokens)} tokens)", expanded=len(tokens) <= 16):
    per_token = pd.DataFrame(
        {
            "pos": range(len(tokens)),
            "token": tokens,
            "top features (activation)": [", ".join(f"{f} ({a:.2f})" for f, a in fs) for fs in active],
            "top feature's best context": [context.get(fs[0][0]) if fs else None for fs in active],
        }
    )
    st.dataframe(per_token, hide_index=True, width="stretch", height=min(400, 38 + 35 * len(tokens)))
top_last = active[-1][0][0] if active[-1] else 0

# ---- the edits -----------------------------------------------------------------------------------


def _reset() -> None:
    st.session_state[K + "n"] = 0
    for i in range(MAX_EDITS):
        for part in ("f", "m", "a"):
            st.session_state.pop(f"{K}{part}{i}", None)
    st.session_state.pop(K + "across", None)


st.subheader("Edits")
st.caption(
    "α is in units of the feature's max activation over the audit's tokens: add moves the residual stream "
    "α × max along the feature's decoder direction; clamp sets the feature to α × max (0 ablates it), keeping "
    "the SAE's reconstruction error."
)
c_n, c_reset = st.columns([3, 1])
with c_n:
    st.session_state.setdefault(K + "n", 1)
    n = int(st.number_input("Number of edits", 0, MAX_EDITS, step=1, key=K + "n"))
with c_reset:
    st.button("Reset", on_click=_reset, help="no edits: the edited model is the clean one")
edits: list[Edit] = []
for i in range(n):
    if st.session_state.get(f"{K}f{i}", 0) > d_sae - 1:  # a feature of a wider SAE (another hook)
        del st.session_state[f"{K}f{i}"]
    st.session_state.setdefault(f"{K}f{i}", top_last)
    st.session_state.setdefault(f"{K}a{i}", 2.0)
    c_f, c_m, c_a = st.columns([3, 2, 5])  # the feature box keeps its − / + at 1000 px
    f = int(c_f.number_input("feature", 0, d_sae - 1, step=1, key=f"{K}f{i}"))
    mode = c_m.selectbox("mode", ["add", "clamp"], key=f"{K}m{i}")
    alpha = c_a.slider("α (× max activation)", *ALPHA_RANGE, step=0.1, key=f"{K}a{i}")
    m = lab.max_acts[f]
    st.caption(f"feature {f} · max activation {m:.4g} · {context.get(f) or 'no context (never fired)'}")
    edits.append(Edit(f, mode, float(alpha)))

c_pos, c_range = st.columns([1, 2])
with c_pos:
    where = st.radio("Positions", ["all", "prompt", "range"], horizontal=True, key=K + "positions")
positions: Any = where
if st.session_state.get(K + "range", (0, 0))[1] > len(tokens):  # a range of a longer prompt
    del st.session_state[K + "range"]
if where == "range":
    with c_range:
        lo, hi = st.slider("Token range [start, end)", 0, len(tokens), (0, len(tokens)), key=K + "range")
    positions = (lo, max(hi, lo + 1))
continuation = 0
if steerer.causal:
    st.session_state.setdefault(K + "continue", 8)
    continuation = int(st.number_input("Greedy continuation (tokens)", 0, 64, key=K + "continue"))

# ---- clean vs edited -----------------------------------------------------------------------------
try:
    res = steerer.compare(ids, edits, positions, top_k=TOP_K, continuation=continuation)
except ValueError as exc:  # an edit the SAE cannot do (a dead feature, a negative clamp): say which
    st.error(str(exc))
    st.stop()
st.session_state[K + "result"] = res  # the figures shown, full precision (tests and curious users)

st.subheader("Clean vs edited")
cols = st.columns(4)
if res["causal"]:
    cols[0].metric("KL(clean ‖ edited), next token", f"{res['kl']:.4g}", help=f"{res['kl']!r} nats")
else:
    cols[0].metric("embedding cosine clean vs edited", f"{res['embedding_cosine']:.6f}")
cols[1].metric("edited pass", f"{1000 * res['seconds']:.1f} ms", help="the clean pass is cached per prompt")
cols[2].metric("residual shift ‖Δh‖", f"{res['residual_shift']:.4g}", help="mean over the edited tokens")
cols[3].metric("edited tokens", len(res["edited_positions"]))
if res["features"]:
    st.caption(
        " · ".join(
            f"feature {r['feature']}: activation {r['before_mean']:.4g} → {r['after_mean']:.4g}"
            for r in res["features"]
        )
    )
if res["causal"]:
    left, right = st.columns(2)
    for col, key, title in ((left, "top_clean", "clean"), (right, "top_edited", "edited")):
        col.markdown(f"**{title}** next token")
        col.dataframe(
            pd.DataFrame([{"token": _token(tok, i), "id": i, "p": p} for i, p in res[key]]),
            hide_index=True,
            width="stretch",
            column_config={"p": st.column_config.ProgressColumn("p", format="%.4f", min_value=0.0, max_value=1.0)},
        )
        cont = res["continuation_clean" if title == "clean" else "continuation_edited"]
        if cont:
            col.code(prompt + tok.decode(cont), language=None, wrap_lines=True)
elif edits:  # an encoder: which of the audit's texts the prompt's embedding sits nearest, before and after
    from microscope.steering_audit import nearest_texts

    near = nearest_texts(lab, store, ids, edits, positions)
    left, right = st.columns(2)
    for col, key, title in ((left, "nearest_clean", "clean"), (right, "nearest_edited", "edited")):
        col.markdown(f"**{title}**: the audit's nearest texts")
        col.dataframe(pd.DataFrame(near[key]), hide_index=True, width="stretch")

# ---- off-target cost -----------------------------------------------------------------------------
st.subheader("Off-target cost")
try:
    windows = _neutral(store.uri, rec.audit_id, rec)
    off = steerer.off_target(np.array(windows), edits, positions)  # a writable copy for torch
except Exception as exc:  # noqa: BLE001 -- e.g. the ingest's tokens are gone from the store
    st.info(f"No off-target cost: {_one_line(exc)}")
else:
    c = st.columns(3)
    if "kl_mean" in off:
        c[0].metric("mean KL per token", f"{off['kl_mean']:.4g}")
        c[1].metric("perplexity clean", f"{off['ppl_clean']:.4g}")
        c[2].metric(
            "perplexity edited", f"{off['ppl_edited']:.4g}", delta=f"{off['delta_ppl']:+.4g}", delta_color="inverse"
        )
    else:
        c[0].metric("mean embedding cosine", f"{off['embedding_cosine']:.6f}")
    st.caption(f"The same edits on the audit's last {off['windows']} token windows (held out from the prompt).")

# ---- everywhere ------------------------------------------------------------------------------------
st.subheader("Every variant and checkpoint")
signature = (rec.audit_id, hook, tuple(ids[0].tolist()), tuple(edits), str(positions))
if st.button("Same edit on every variant and checkpoint", disabled=not edits):
    from microscope.steering_across import cached_lab, steer_across

    def _opener(s: Any, audit_id: str, h: str, v: str) -> Any:  # reuse the lab already open here
        return lab if (audit_id, h, v) == (rec.audit_id, hook, variant) else cached_lab(s, audit_id, h, v)

    with st.spinner("Steering every variant and checkpoint…"):
        st.session_state[K + "across"] = (
            signature,
            steer_across(store, rec.audit_id, hook, edits, ids, positions, open_lab=_opener),
        )
across = st.session_state.get(K + "across")
if across is not None and across[0] == signature:
    shown = across[1].copy()
    for col in ("top1_clean", "top1_edited"):
        shown[col] = [None if pd.isna(i) else _token(tok, int(i)) for i in shown[col]]
    st.dataframe(shown, hide_index=True, width="stretch")
    st.caption(
        "Other checkpoints edit the matched feature (one-to-one decoder matching, stored per pair of audits); "
        "`lost`: the feature has no match there. Top-1 tokens are decoded with this audit's tokenizer."
    )
elif not edits:
    st.caption("Add an edit to compare it across the variants and checkpoints.")

# ---- as a weight patch ------------------------------------------------------------------------------
if steerer.causal:
    st.subheader("As a weight patch")
    st.caption(
        "The edits as a change of the block's last projection, without the SAE in the loop: adds are an exact "
        "bias, clamps a least-squares rank-r update fitted on the audit's first windows. The patch is swapped "
        "into the loaded model's weights for one pass and out again (no reload), and exported as a PEFT LoRA "
        "adapter (`microscope patch apply` and `peft.PeftModel.from_pretrained` load it)."
    )
    patch_key = (signature, "patch")
    if st.button("Fit a patch of these edits", disabled=not edits, key=K + "fit"):
        from microscope.patches import make_patch

        try:
            with st.spinner("Fitting the patch…"):
                fitted = make_patch(steerer, edits, _calibration(store.uri, rec.audit_id, rec), positions)
        except (ValueError, results.InputError) as exc:
            st.info(f"No patch for these edits: {_one_line(exc)}")
        else:
            st.session_state[K + "patch"] = (patch_key, fitted)
    held = st.session_state.get(K + "patch")
    if held is not None and held[0] == patch_key:
        import torch

        from microscope.patches import apply_patch, remove_patch

        fitted = held[1]
        handle = apply_patch(steerer.model, fitted)  # hot-swapped in, for this one pass
        try:
            with torch.no_grad():
                patched = torch.log_softmax(steerer.model(input_ids=ids).logits[0, -1].double(), -1)
        finally:
            remove_patch(handle)
        with torch.no_grad():
            steered = torch.log_softmax(steerer.forward(ids, edits, positions).logits[0, -1].double(), -1)
        kl_here = float((steered.exp() * (steered - patched)).sum())
        st.session_state[K + "patch_kl"] = kl_here  # the figure shown (tests)
        c = st.columns(4)
        c[0].metric("patch", f"{fitted.kind}, rank {fitted.rank}", help=f"on `{fitted.module}`")
        c[1].metric("KL(steered ‖ patched), this prompt", f"{kl_here:.3g}")
        c[2].metric("KL(steered ‖ patched), held out", f"{fitted.fidelity['kl_patched']:.3g}")
        c[3].metric("KL(steered ‖ clean), held out", f"{fitted.fidelity['kl_unpatched']:.3g}")
        sp, si = steered.topk(TOP_K)
        pp, pi = patched.topk(TOP_K)
        st.dataframe(
            pd.DataFrame(
                {
                    "SAE-steered next token": [_token(tok, int(i)) for i in si],
                    "p (steered)": sp.exp().numpy(),
                    "patched next token": [_token(tok, int(i)) for i in pi],
                    "p (patched)": pp.exp().numpy(),
                }
            ),
            hide_index=True,
            width="stretch",
        )
        manifest = {
            "audit": rec.audit_id,
            "model_digest": rec.model_digest,
            "weights_digest": rec.stages["ingest"].details.get("weights_digest"),
            "model_source": rec.model.source,
            "variant": variant,
            "hook": hook,
            "hook_module": lab.module_path,
            "sae": rec.saes[hook].details.get("prefix"),
            "features": sorted({e.feature for e in edits}),
            "max_activation": {str(e.feature): float(lab.max_acts[e.feature]) for e in edits},
        }
        st.download_button(
            "Download the adapter (zip)",
            _adapter_zip(fitted, steerer.model, manifest),
            file_name=f"patch-{rec.audit_id}.zip",
            key=K + "download",
        )
