"""The audit report: one self-contained HTML file joining every stage's results per layer.

This module turns what `microscope.results` reads from the stage records into table rows and chart inputs
(it reads no record field itself); the page itself is the Jinja template
`templates/report.html.j2` (its stylesheet `report.css` is inlined) and the charts are `microscope.charts`
figures inlined as SVG, so the file opens offline. It renders whatever records exist: later stages only
add a section. A figure a stage could not define is shown as "undefined" with its reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from schemas.gates import GateVerdict
from schemas.hooks import matrix_role
from schemas.records import Architecture, DatasetSummary, StageRecord

from microscope import charts, glossary, results
from microscope.figures import is_number
from microscope.models.loading import describe_nonfinite

if TYPE_CHECKING:
    from jinja2 import Environment
    from markupsafe import Markup
    from matplotlib.figure import Figure

TEMPLATE = "report.html.j2"
ESD_CHARTS = 6  # spectral densities shown: the flagged matrices, else those with the largest α
ALPHA_ROLES = 6  # matrix roles (c_attn, mlp.c_fc, ...) drawn in the α-by-block chart
NOTE_PLACES = 8  # places listed under one undefined-figure note before "and N more"


# ---- formatting --------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return str(v)


def _mb(b: float | None) -> str:
    return "–" if not is_number(b) else f"{b / 2**20:,.2f} MiB"


def _th(key: str, cls: str = "", label: str | None = None) -> Markup:
    """A table header for the record key `key`: the glossary's label (or `label`, for a column of a family
    such as one ε of a sweep), its help text as the tooltip."""
    from markupsafe import Markup

    term = glossary.lookup(key)
    text, help_ = (term.label, term.help) if term else (key, "")
    return Markup('<th{} title="{}">{}</th>').format(
        Markup(' class="l"') if cls == "l" else "", help_, text if label is None else label
    )


def _pct(a: float | None, b: float | None = 1.0) -> str:
    return "–" if not is_number(a) or not is_number(b) or not b else f"{100 * a / b:.1f}%"


@dataclass
class Footnotes:
    """The reasons of undefined figures, numbered as the page first shows them. One note per reason: a
    reason shared by many cells (every matrix on the randomized spectrum path) lists where it applies."""

    notes: list[dict[str, Any]] = field(default_factory=list)

    def undefined(self, reason: str, where: str = "") -> Markup:
        from markupsafe import Markup

        n = self._note(reason, where)
        return Markup('<span class="undef" title="{}">undefined<sup><a href="#undef-{}">{}</a></sup></span>').format(
            reason, n, n
        )

    def figure(
        self,
        metrics: Mapping[str, Any] | None,
        undefined: Mapping[str, str] | None,
        key: str,
        where: str = "",
        kind: str = "num",
    ) -> Markup | str:
        """A table cell: the figure `key`, or "undefined" with a note when the record says why."""
        if undefined and key in undefined:
            return self.undefined(undefined[key], f"{where} · {key}" if where else key)
        v = (metrics or {}).get(key)
        return _pct(v) if kind == "pct" else _fmt(v)

    def _note(self, reason: str, where: str) -> int:
        for i, note in enumerate(self.notes, 1):
            if note["reason"] == reason:
                if where and where not in note["where"]:
                    note["where"].append(where)
                return i
        self.notes.append({"reason": reason, "where": [where] if where else []})
        return len(self.notes)

    def listed(self) -> list[dict[str, Any]]:
        """The notes for the page's footer, each with at most NOTE_PLACES places named."""
        out = []
        for n, note in enumerate(self.notes, 1):
            places = note["where"]
            more = len(places) - NOTE_PLACES
            out.append({"n": n, "reason": note["reason"], "where": places[:NOTE_PLACES], "more": max(more, 0)})
        return out


def _svg(fig: Figure) -> Markup:
    from markupsafe import Markup

    return Markup(charts.to_svg(fig))


def _environment(notes: Footnotes) -> Environment:
    from jinja2 import Environment, PackageLoader

    env = Environment(loader=PackageLoader("microscope", "templates"), autoescape=True)
    env.globals.update(fmt=_fmt, mb=_mb, pct=_pct, th=_th, figure=notes.figure, undefined=notes.undefined)
    return env


# ---- sections: records -> rows and chart inputs -----------------------------------------------


def _header(stages: dict[str, StageRecord], arch: Architecture | None, title: str | None) -> dict[str, Any]:
    ingested = results.ingest_summary(stages.get("ingest"))
    return {
        "title": title or (f"Microscope audit: {arch.class_name}" if arch else "Microscope audit"),
        "model_digest": ingested["model_digest"][:16],
        "dataset_digest": ingested["dataset_digest"][:16],
        "rendered": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "stages": list(stages.values()),
        "nonfinite": describe_nonfinite(ingested["nonfinite"]) if ingested["nonfinite"] else None,
    }


def _model_view(arch: Architecture | None, max_modules: int) -> dict[str, Any]:
    if arch is None:
        return {"arch": None, "modules": [], "top_modules": [], "more_modules": 0}
    blocks = {p.resid for p in arch.hook_points}
    return {
        "arch": arch,
        "modules": arch.modules[:max_modules],
        # Embeddings, blocks and heads; the blocks' own children go in a collapsed table.
        "top_modules": [m for m in arch.modules if not any(m.name.startswith(b + ".") for b in blocks)],
        "more_modules": max(len(arch.modules) - max_modules, 0),
    }


TRACE_STATS = (("mean_norm", "mean ‖x‖"), ("max_norm", "max ‖x‖"), ("near_zero_frac", "near-zero fraction"))


def _trace_view(trace: StageRecord | None) -> dict[str, Any]:
    rows, prefix = results.trace_points(trace)
    if not rows:
        return {"trace_rows": [], "trace_charts": [], "trace_prefix": ""}
    chart_list = []
    for stat, label in TRACE_STATS:
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            series.setdefault(r["hook"], []).append((r["layer"], r["stats"][stat]))
        chart_list.append(_svg(charts.by_layer(series, f"{label} by layer", label)))
    return {"trace_rows": rows, "trace_charts": chart_list, "trace_prefix": prefix}


def _variant_view(variants: dict[str, dict[str, StageRecord]]) -> dict[str, Any]:
    """Rows of the variants table, drift charts by layer, the worst (variant, hook), eval tokens."""
    summaries = results.variant_summaries(variants)
    rows = [
        {
            "name": q["variant"],
            "status": q["status"],
            "error": q["error"],
            "produced": q["produced"],
            "fell_back": q["fell_back"],
            "m": q["metrics"],
            "u": q["undefined"],
        }
        for q in summaries
    ]
    eval_tokens = max([0, *(int(q["eval_tokens"]) for q in summaries)])
    cos: dict[str, dict[str, list[tuple[float, float]]]] = {}
    err: dict[str, dict[str, list[tuple[float, float]]]] = {}
    worst = None
    for p in results.drift_points(variants):
        cos.setdefault(p["kind"], {}).setdefault(p["variant"], []).append((p["layer"], p["cosine"]))
        err.setdefault(p["kind"], {}).setdefault(p["variant"], []).append((p["layer"], p["rel_error"]))
        if worst is None or p["rel_error"] > worst["rel_error"]:
            worst = {"variant": p["variant"], "hook": p["hook"], "rel_error": p["rel_error"]}
    chart_list = []
    for hook in sorted(cos):
        chart_list.append(_svg(charts.by_layer(cos[hook], f"cosine to fp ({hook})", "cosine", from_zero=False)))
        chart_list.append(_svg(charts.by_layer(err[hook], f"relative error ({hook})", "‖q − fp‖ / ‖fp‖")))
    return {"variant_rows": rows, "variant_charts": chart_list, "worst": worst, "eval_tokens": eval_tokens}


def _sae_view(saes: dict[str, StageRecord]) -> dict[str, Any]:
    rows, hists = [], {}
    for r in results.sae_summaries(saes):
        if r["failed"]:
            rows.append(
                {"hook": r["hook"], "arch": "failed", "d_sae": "", "m": {}, "u": {}, "variants": {}, "features": []}
            )
            continue
        rows.append(
            {
                "hook": r["hook"],
                "arch": r["architecture"],
                "d_sae": r["d_sae"],
                "m": r["metrics"],
                "u": r["undefined"],
                "variants": r["variants"],
                "features": r["top_features"],
            }
        )
        if r["density"] is not None:
            hists[r["hook"]] = r["density"]
    return {"sae_rows": rows, "sae_charts": [_svg(charts.feature_density(hists))] if hists else []}


def _gate_view(rec: StageRecord | None) -> GateVerdict | None:
    """The gate stage's verdict, shown first."""
    return results.stage_verdict(rec)


def _alpha_chart(rows: list[dict[str, Any]]) -> list[Markup]:
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["layer"] >= 0 and is_number(r["alpha"]):
            series.setdefault(matrix_role(r["name"]), []).append((r["layer"], r["alpha"]))
    top = dict(sorted(series.items(), key=lambda kv: -len(kv[1]))[:ALPHA_ROLES])
    return [_svg(charts.by_layer(top, "power-law α by block", "α"))] if top else []


def _esd_charts(rows: list[dict[str, Any]]) -> list[Markup]:
    fitted = sorted((r for r in rows if is_number(r["alpha"])), key=lambda r: -r["alpha"])
    shown = [r for r in rows if r["flags"]] or fitted
    out = []
    for r in shown[:ESD_CHARTS]:
        esd = r.get("esd") or {}
        if len(esd.get("log10_lambda") or []) < 2:
            continue
        alpha = r["alpha"] if is_number(r["alpha"]) else None
        xmin = r.get("xmin") if is_number(r.get("xmin")) else None
        fig = charts.spectral_density(esd["log10_lambda"], esd["log10_density"], r["name"][-48:], alpha, xmin)
        out.append(_svg(fig))
    return out


def _fisher_charts(w: dict[str, Any]) -> list[Markup]:
    table = results.fisher_by_block(w["sensitivity"])
    out = []
    if table:
        roles, layers = sorted({k for row in table.values() for k in row}), sorted(table)
        grid = [[table[b].get(k, math.nan) for k in roles] for b in layers]
        fig = charts.value_grid(
            grid,
            "log10 Fisher trace, block × tensor",
            row_labels=[f"block {b}" for b in layers],
            col_labels=roles,
            colorbar_label="log10 trace",
        )
        out.append(_svg(fig))
    for m in w["fisher_maps"]:
        title = m["name"][-40:] + " " + "×".join(map(str, m["shape"]))
        out.append(_svg(charts.value_grid(m["log10_fisher"], title, colorbar_label="log10 F")))
    return out


def _cka_view(cka: dict[str, Any]) -> dict[str, Any]:
    return {
        "cka_svg": _svg(charts.cka_heatmap(cka["matrix"], cka["layers"])) if cka["matrix"] else "",
        "cka_variants": cka["variants"],
        "cka_audits": cka["audits"],
        "cka_hooks": cka["hooks"],
        "cka_skipped": cka["skipped"],
    }


def _metrics_view(rec: StageRecord | None, causal: bool) -> dict[str, Any]:
    w = results.weight_figures(rec)
    if w is None:
        return {"weights": []}
    rows = w["weights"]
    rand = results.randomized_spectra(rows)
    return {
        "weights": rows,
        "flagged": [r for r in rows if r["flags"]],
        "metric_charts": _alpha_chart(rows),
        "esd_charts": _esd_charts(rows),
        "sens": results.sensitivity_by_block(w["sensitivity"]),
        "sens_loss": "next-token cross-entropy" if causal else "proxy: mean squared final hidden state",
        **_cka_view(w["cka"]),
        "fisher_charts": _fisher_charts(w),
        "fisher_key": w["fisher_key"],
        "randomized": rand["count"],
        "randomized_rank": rand["rank"],
        "randomized_error": rand["error"],
    }


ATTACKS = (("pgd", "PGD (Linf)"), ("fgsm", "FGSM (Linf)"), ("noise", "Gaussian noise (σ)"))


def _aa_version(autoattack: list[dict[str, Any]]) -> str:
    a = (autoattack or [None])[0]
    return f"{a.get('library', 'pyautoattack')}, version {a['version']} ({', '.join(a['attacks'])})" if a else "–"


def _verdict(name: str, vs_fp: dict[str, Any] | None) -> dict[str, Any]:
    """A variant's AutoAttack accuracy against full precision's, in points (or why it has none)."""
    if vs_fp is None:
        return {"text": "–"}
    if "reason" in vs_fp:
        return {"reason": vs_fp["reason"], "where": f"{name} vs fp · {vs_fp['key']}"}
    d = vs_fp["points"]
    side = " (more brittle)" if d < 0 else " (not more brittle)"
    return {"text": f"AutoAttack {vs_fp['norm']} {d:+.1f} pts{side}"}


def _robustness_row(s: dict[str, Any]) -> dict[str, Any]:
    if "figures" not in s:
        return {"variant": s["variant"], "error": s["error"]}
    return {
        "variant": s["variant"],
        "m": s["figures"],
        "u": s["undefined"],
        "verdict": _verdict(s["variant"], s["vs_fp"]),
        "flags": s["flags"],
    }


def _robustness_view(fp: StageRecord | None, variants: dict[str, dict[str, StageRecord]]) -> dict[str, Any]:
    o = results.robustness_overview(fp, variants)
    if fp is None or o is None:
        return {"rob_rows": []}
    eps = o["eps"]
    return {
        "rob_rows": [_robustness_row(results.robustness_summary(n, r, fp)) for n, r in o["records"].items()],
        "rob_charts": [_svg(charts.eps_curves(o["sweeps"][a], f"{label}: accuracy vs ε")) for a, label in ATTACKS],
        "rob_aa_cols": [{"norm": a["norm"], "eps": a["eps"]} for a in o["autoattack"]],
        "rob_samples": o["samples"],
        "rob_surface": o["surface"],
        "rob_label": o["label"],
        "rob_eps_max": eps[-1] if eps else 0.0,
        "rob_aa_version": _aa_version(o["autoattack"]),
        "rob_layers": o["feature_shifts"],
        "rob_layer_shift": o["layer_shifts"],
        "rob_feature_total": {h["hook"]: h["total"] for h in o["feature_shifts"]},
    }


def _reliability_view(fp: StageRecord | None, variants: dict[str, dict[str, StageRecord]]) -> dict[str, Any]:
    """Calibration per variant, OOD detection, certificates and corruption accuracy of full precision."""
    o = results.reliability_overview(fp, variants)
    if o is None:
        return {"rel_rows": []}
    return {
        "rel_rows": [{"variant": v, "m": r.metrics, "u": r.undefined} for v, r in o["records"].items()],
        "rel_samples": o["samples"],
        "rel_binning": o["binning"],
        "rel_ood": o["ood"],
        "rel_severities": o["severities"],
        "rel_corruptions": o["corruptions"],
        "rel_clean": o["clean_accuracy"],
        "rel_smoothing": o["smoothing"],
        "rel_corruption_n": o["corruption_samples"],
    }


def _landscape_view(fp: StageRecord | None, variants: dict[str, dict[str, StageRecord]]) -> dict[str, Any]:
    """Curvature and sharpness per variant, full precision's slices (1-D lines, the 2-D grid) and eigenvalues."""
    o = results.landscape_overview(fp, variants)
    if o is None:
        return {"land_rows": [], "land_reason": (fp.details.get("reason") if fp is not None else None)}
    d = o["records"]["fp"].details
    lines = {v: list(zip(r.details["slice_1d"]["alphas"], r.details["slice_1d"]["loss"], strict=True))
             for v, r in o["records"].items() if r.details.get("slice_1d")}  # fmt: skip
    charts_ = [_svg(charts.line_chart(lines, "loss along a filter-normalised direction", "α", "loss", markers=False))]
    grid = d.get("slice_2d")
    if grid:
        charts_.append(
            _svg(charts.value_grid(grid["loss"], "loss on the 2-D slice (rows α, columns β)", colorbar_label="loss"))
        )
    return {
        "land_rows": [{"variant": v, "m": r.metrics, "u": r.undefined} for v, r in o["records"].items()],
        "land_charts": charts_,
        "land_eigen": o["eigen"],
        "land_samples": o["samples"],
        "land_kind": o["kind"],
        "land_note": o["note"],
        "land_sharpness": o["sharpness"],
    }


def _attribution_view(
    fp: StageRecord | None, variants: dict[str, dict[str, StageRecord]], metrics: StageRecord | None
) -> dict[str, Any]:
    """Completeness and the randomisation check per variant; full precision's shares per block beside the
    block's Fisher and Hutchinson shares (are the sensitive blocks the ones decisions flow through?)."""
    o = results.attribution_overview(fp, variants)
    if o is None or fp is None:
        return {"attr_rows": []}
    sens = (metrics.details.get("sensitivity") or []) if metrics is not None else []
    shares = results.layer_shares_table(fp, sens)
    return {
        "attr_rows": [{"variant": v, "m": r.metrics, "u": r.undefined} for v, r in o["records"].items()],
        "attr_kind": o["kind"],
        "attr_methods": o["methods"],
        "attr_samples": len(o["samples"]),
        "attr_randomisation": o["randomisation"],
        "attr_shares": shares.to_dict("records"),
    }


# ---- the page ---------------------------------------------------------------------------------


def render(
    stages: dict[str, StageRecord],
    arch: Architecture | None,
    data: DatasetSummary | None,
    title: str | None = None,
    max_modules: int = 60,
    variants: dict[str, dict[str, StageRecord]] | None = None,
    saes: dict[str, StageRecord] | None = None,
) -> str:
    """The report as one HTML string (no external resources: it opens offline)."""
    notes = Footnotes()
    causal = bool(arch and arch.is_causal and arch.has_unembedding)
    context = {
        **_header(stages, arch, title),
        "gate": _gate_view(stages.get("gate")),
        **_model_view(arch, max_modules),
        "data": data,
        **_trace_view(stages.get("trace")),
        **_variant_view(variants or {}),
        **_sae_view(saes or {}),
        **_metrics_view(stages.get("metrics"), causal),
        **_robustness_view(stages.get("robustness"), variants or {}),
        **_reliability_view(stages.get("reliability"), variants or {}),
        **_landscape_view(stages.get("landscape"), variants or {}),
        **_attribution_view(stages.get("attribution"), variants or {}, stages.get("metrics")),
        "notes": notes,
    }
    return _environment(notes).get_template(TEMPLATE).render(**context)
