"""One audit at a glance: anomalies first, then the headline figures, the stages (status, time) and where
to look further (the HTML report, the MLflow run, the Prefect flow run)."""

from __future__ import annotations

import math
import os

import pandas as pd
import streamlit as st

from dashboard import state
from microscope import audits, results

store, refs, rec = state.current_audit()

st.header(f"Audit {rec.audit_id}")
run = f"run `{rec.run_id}` step {rec.step} · " if rec.run_id else ""
st.caption(
    f"{run}status **{rec.status.value}** · model `{rec.model.source}` · digest `{(rec.model_digest or '—')[:16]}` · "
    f"created {rec.created_at:%Y-%m-%d %H:%M:%S}"
    + (f" · finished {rec.finished_at:%H:%M:%S}" if rec.finished_at else "")
)
if rec.status.value == "failed":
    st.error(
        f"This audit failed: {rec.error or 'no error recorded'}. Each failed stage below names its error; "
        f"fix it and run the audit again (stages that finished are cached and not recomputed)."
    )

# ---- the gate's verdict -----------------------------------------------------------------------
verdict = results.gate_verdict(rec)
if verdict is not None:
    say = {"fail": st.error, "warn": st.warning, "pass": st.success}[verdict.verdict]
    say(f"**Gate {verdict.verdict.upper()}** · {verdict.summary()}")
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "rule": r.rule,
                    "outcome": r.outcome,
                    "value": r.value,
                    "baseline": r.baseline_value,
                    "compared": r.compared,
                    "check": f"{r.metric} {r.check} ({r.aggregate})",
                    "offenders / note": ", ".join(o.key for o in r.offenders[:5]) or (r.reason or ""),
                }
                for r in verdict.results
            ]
        ),
        hide_index=True,
        width="stretch",
    )
elif (g := rec.stages.get("gate")) is not None and g.status.value == "failed":
    st.warning(f"**gate** failed: {g.error}")
else:
    st.caption(
        f"No gate verdict: judge this audit with `microscope gate {rec.audit_id} --rules gates` (add `--save` to "
        "keep it), or set `gate: {rules: gates}` in the audit config."
    )

# ---- anomalies first --------------------------------------------------------------------------
table = state.layer_table(store, rec)
st.subheader("Anomalies")
if "anomaly" in table.columns:
    flagged = table[table["anomaly"]]
    if flagged.empty:
        st.success(f"No anomaly flagged among {len(table)} weight matrices.")
    else:
        st.error(f"{len(flagged)} of {len(table)} weight matrices flagged (details on the Layers page).")
        st.dataframe(
            flagged[["name", "layer", "role", "anomaly_reasons"]].assign(
                anomaly_reasons=flagged["anomaly_reasons"].map("; ".join)
            ),
            hide_index=True,
            width="stretch",
        )
else:
    st.info(f"No anomaly flags: the metrics stage produced none. {results.HOW['metrics'].capitalize()}.")
state.notices(table.attrs.get("missing", {}))

# ---- headline figures -------------------------------------------------------------------------
st.subheader("Headline figures")
head = audits.headline(rec)
if not head:
    st.info("No stage recorded summary figures yet.")
for source, figures in head.items():
    st.markdown(f"**{source}**")
    cols = st.columns(6)
    for i, (name, value) in enumerate(figures.items()):
        text = f"{value:.6g}" if isinstance(value, int | float) and math.isfinite(value) else str(value)
        cols[i % 6].metric(name, text)

# ---- stages -----------------------------------------------------------------------------------
st.subheader("Stages")
rows = []
for name, r in (
    [*rec.stages.items()]
    + [(f"{s}[{v}]", r) for v, recs in sorted(rec.variants.items()) for s, r in sorted(recs.items())]
    + [(f"sae[{h}]", r) for h, r in sorted(rec.saes.items())]
):
    rows.append(
        {
            "stage": name,
            "status": r.status.value,
            "seconds": r.seconds,
            "started_at": r.started_at,
            "finished_at": r.finished_at,
            "error": r.error,
            "mlflow_run_id": r.mlflow_run_id,
        }
    )
stages = pd.DataFrame(rows)
if stages.empty:
    st.info("No stage has run in this audit.")
else:
    order = {"failed": 0, "partial": 1, "skipped": 2}
    stages = stages.sort_values("status", key=lambda s: s.map(lambda v: order.get(v, 3)), kind="stable")
    st.dataframe(stages, hide_index=True, width="stretch")

# ---- where to look further --------------------------------------------------------------------
st.subheader("Links")
c1, c2, c3 = st.columns(3)
with c1:
    st.markdown("**HTML report**")
    if rec.report_uri:
        st.code(rec.report_uri, language=None)
        if "://" not in rec.report_uri and os.path.isfile(rec.report_uri):
            with open(rec.report_uri, "rb") as f:
                st.download_button("Download the report", f.read(), file_name=f"{rec.audit_id}.html", mime="text/html")
    else:
        st.info(f"No report: {results.HOW['report']}.")
with c2:
    st.markdown("**MLflow run**")
    if rec.mlflow_run_id:
        st.code(rec.mlflow_run_id, language=None)
        uri = rec.mlflow_tracking_uri or ""
        if uri.startswith("http"):
            st.link_button("Open in MLflow", f"{uri.rstrip('/')}/#/runs/{rec.mlflow_run_id}")
        elif uri:
            st.caption(f"tracking URI `{uri}` (`mlflow ui --backend-store-uri {uri}` to browse it)")
    else:
        st.info("No MLflow run recorded for this audit.")
with c3:
    st.markdown("**Prefect flow run**")
    if rec.prefect_flow_run_id:
        st.code(rec.prefect_flow_run_id, language=None)
        ui = state.prefect_ui_url()
        if ui.startswith("http"):
            st.link_button("Open in Prefect", f"{ui.rstrip('/')}/runs/flow-run/{rec.prefect_flow_run_id}")
    else:
        st.info("No Prefect flow run recorded for this audit.")
