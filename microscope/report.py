"""The audit report: one self-contained HTML file joining every stage's results per layer.

This module turns stage records into table rows and chart inputs; the page itself is the Jinja template
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
from schemas.hooks import hook_parts, matrix_role
from schemas.records import Architecture, DatasetSummary, StageRecord, StageStatus

from microscope import charts
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
    env.globals.update(fmt=_fmt, mb=_mb, pct=_pct, figure=notes.figure, undefined=notes.undefined)
    return env


# ---- sections: records -> rows and chart inputs -----------------------------------------------


def _header(stages: dict[str, StageRecord], arch: Architecture | None, title: str | None) -> dict[str, Any]:
    ingest = stages.get("ingest")
    digests = ingest.details if ingest else {}
    return {
        "title": title or (f"Microscope audit: {arch.class_name}" if arch else "Microscope audit"),
        "model_digest": digests.get("model_digest", "")[:16],
        "dataset_digest": digests.get("dataset_digest", "")[:16],
        "rendered": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "stages": list(stages.values()),
        "nonfinite": describe_nonfinite(digests["nonfinite"]) if digests.get("nonfinite") else None,
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
    if trace is None or not trace.details.get("datasets"):
        return {"trace_rows": [], "trace_charts": [], "trace_prefix": ""}
    rows = sorted(trace.details["datasets"].values(), key=lambda r: (r["layer"], r["hook"]))
    chart_list = []
    for stat, label in TRACE_STATS:
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            series.setdefault(r["hook"], []).append((r["layer"], r["stats"][stat]))
        chart_list.append(_svg(charts.by_layer(series, f"{label} by layer", label)))
    return {"trace_rows": rows, "trace_charts": chart_list, "trace_prefix": trace.details.get("prefix", "")}


def _variant_view(variants: dict[str, dict[str, StageRecord]]) -> dict[str, Any]:
    """Rows of the variants table, drift charts by layer, the worst (variant, hook), eval tokens."""
    rows, cos, err = [], {}, {}
    worst, eval_tokens = None, 0
    for name, recs in variants.items():
        q = recs.get("quantize")
        if q is None:
            continue
        d = q.details
        rows.append(
            {
                "name": name,
                "status": q.status.value,
                "error": q.error,
                "produced": d.get("produced"),
                "fell_back": d.get("fell_back"),
                "m": q.metrics,
                "u": q.undefined,
            }
        )
        eval_tokens = max(eval_tokens, int(d.get("eval_tokens", 0)))
        for hook_name, drift in (d.get("drift") or {}).items():
            layer, hook = hook_parts(hook_name)
            cos.setdefault(hook, {}).setdefault(name, []).append((layer, drift["cosine"]))
            err.setdefault(hook, {}).setdefault(name, []).append((layer, drift["rel_error"]))
            if worst is None or drift["rel_error"] > worst["rel_error"]:
                worst = {"variant": name, "hook": hook_name, "rel_error": drift["rel_error"]}
    chart_list = []
    for hook in sorted(cos):
        chart_list.append(_svg(charts.by_layer(cos[hook], f"cosine to fp ({hook})", "cosine", from_zero=False)))
        chart_list.append(_svg(charts.by_layer(err[hook], f"relative error ({hook})", "‖q − fp‖ / ‖fp‖")))
    return {"variant_rows": rows, "variant_charts": chart_list, "worst": worst, "eval_tokens": eval_tokens}


def _sae_view(saes: dict[str, StageRecord]) -> dict[str, Any]:
    rows, hists = [], {}
    for hook, r in saes.items():
        if r.status.value == "failed":
            rows.append({"hook": hook, "arch": "failed", "d_sae": "", "m": {}, "u": {}, "variants": {}, "features": []})
            continue
        d = r.details
        rows.append(
            {
                "hook": hook,
                "arch": d.get("architecture"),
                "d_sae": d.get("d_sae"),
                "m": r.metrics,
                "u": r.undefined,
                "variants": d.get("variants") or {},
                "features": d.get("top_features") or [],
            }
        )
        h = d.get("density_hist") or {}
        if h.get("counts"):
            hists[hook] = (h["bins_log10"], h["counts"])
    return {"sae_rows": rows, "sae_charts": [_svg(charts.feature_density(hists))] if hists else []}


def _gate_view(rec: StageRecord | None) -> GateVerdict | None:
    """The gate stage's verdict (its details), shown first."""
    if rec is None or rec.status == StageStatus.skipped or not rec.details.get("results"):
        return None
    return GateVerdict.model_validate(rec.details)


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


def _sensitivity_blocks(sens: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per-tensor sensitivity summed per block (norms and standard errors in quadrature)."""
    blocks: dict[int, dict[str, float]] = {}
    for b in sens:
        if b["layer"] < 0:
            continue
        agg = blocks.setdefault(
            b["layer"],
            {"layer": b["layer"], "grad_norm": 0.0, "fisher_trace": 0.0, "hessian_trace": 0.0, "hessian_trace_se": 0.0},
        )
        agg["grad_norm"] = math.hypot(agg["grad_norm"], b["grad_norm"])
        agg["fisher_trace"] += b["fisher_trace"]
        agg["hessian_trace"] += b["hessian_trace"]
        agg["hessian_trace_se"] = math.hypot(agg["hessian_trace_se"], b["hessian_trace_se"])
    return [blocks[k] for k in sorted(blocks)]


def _fisher_charts(rec: StageRecord) -> list[Markup]:
    table: dict[int, dict[str, float]] = {}
    for r in rec.details.get("sensitivity") or []:
        if r["layer"] >= 0 and r["fisher_trace"] > 0:
            table.setdefault(r["layer"], {})[matrix_role(r["name"])] = math.log10(r["fisher_trace"])
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
    for m in rec.details.get("fisher_maps") or []:
        title = m["name"][-40:] + " " + "×".join(map(str, m["shape"]))
        out.append(_svg(charts.value_grid(m["log10_fisher"], title, colorbar_label="log10 F")))
    return out


def _cka_view(cka: dict[str, Any]) -> dict[str, Any]:
    audits = cka.get("audits", {})
    return {
        "cka_svg": _svg(charts.cka_heatmap(cka["matrix"], cka["layers"])) if cka.get("matrix") else "",
        "cka_variants": cka.get("variants", {}),
        "cka_audits": audits,
        "cka_hooks": sorted({h for v in audits.values() for h in v}),
        "cka_skipped": cka.get("skipped", {}),
    }


def _metrics_view(rec: StageRecord | None, causal: bool) -> dict[str, Any]:
    if rec is None or rec.status.value == "failed" or not rec.details.get("weights"):
        return {"weights": []}
    rows = rec.details["weights"]
    rand = [r for r in rows if r.get("spectrum") == "randomized"]
    return {
        "weights": rows,
        "flagged": [r for r in rows if r["flags"]],
        "metric_charts": _alpha_chart(rows),
        "esd_charts": _esd_charts(rows),
        "sens": _sensitivity_blocks(rec.details.get("sensitivity") or []),
        "sens_loss": "next-token cross-entropy" if causal else "proxy: mean squared final hidden state",
        **_cka_view(rec.details.get("cka") or {}),
        "fisher_charts": _fisher_charts(rec),
        "fisher_key": rec.details.get("fisher_key") or "",
        "randomized": len(rand),
        "randomized_rank": max((r["n_singular_values"] for r in rand), default=0),
        "randomized_error": max((r["spectrum_error"] for r in rand), default=0.0),
    }


ATTACKS = (("pgd", "PGD (Linf)"), ("fgsm", "FGSM (Linf)"), ("noise", "Gaussian noise (σ)"))


def _aa_version(base: dict[str, Any]) -> str:
    a = (base.get("autoattack") or [None])[0]
    return f"{a.get('library', 'pyautoattack')}, version {a['version']} ({', '.join(a['attacks'])})" if a else "–"


def _verdict(name: str, r: StageRecord, fp: StageRecord) -> dict[str, Any]:
    """A variant's AutoAttack accuracy against full precision's, in points (or why it has none)."""
    aa = {a["norm"]: a["robust"] for a in r.details.get("autoattack", [])}
    if name == "fp" or not aa:
        return {"text": "–"}
    norm = next(iter(aa))
    key = f"autoattack_{norm}"
    why = r.undefined.get(key) or fp.undefined.get(key)
    if why:
        return {"reason": why, "where": f"{name} vs fp · {key}"}
    fp_aa = {a["norm"]: a["robust"] for a in fp.details.get("autoattack", [])}
    d = 100 * (aa[norm] - fp_aa.get(norm, aa[norm]))
    return {"text": f"AutoAttack {norm} {d:+.1f} pts" + (" (more brittle)" if d < 0 else " (not more brittle)")}


def _robustness_row(name: str, r: StageRecord, fp: StageRecord) -> dict[str, Any]:
    if r.status.value == "failed" and not r.details.get("curves"):
        return {"variant": name, "error": r.error}
    c = r.details["curves"]
    return {
        "variant": name,
        "m": {
            "clean_accuracy": c["clean"][0],
            **{f"autoattack_{a['norm']}": a["robust"] for a in r.details.get("autoattack", [])},
            **{attack: c[attack][-1] for attack, _ in ATTACKS},  # accuracy at the largest ε
        },
        # an attack's curve is undefined for the reason its summary figure <attack>_min is
        "u": r.undefined | {a: r.undefined[f"{a}_min"] for a, _ in ATTACKS if f"{a}_min" in r.undefined},
        "verdict": _verdict(name, r, fp),
        "flags": sorted({f for a in r.details.get("autoattack", []) for f in a.get("flags", [])}),
    }


def _robustness_view(fp: StageRecord | None, variants: dict[str, dict[str, StageRecord]]) -> dict[str, Any]:
    if fp is None or not fp.details.get("curves"):
        return {"rob_rows": []}
    recs = {"fp": fp} | {v: r["robustness"] for v, r in sorted(variants.items()) if "robustness" in r}
    base = fp.details
    eps = base["curves"]["eps"]
    rows = [_robustness_row(name, r, fp) for name, r in recs.items()]
    series: dict[str, dict[str, list[tuple[float, float]]]] = {a: {} for a, _ in ATTACKS}
    for name, r in recs.items():
        c = r.details.get("curves")
        if not c:  # failed before its sweep
            continue
        for attack in series:
            series[attack][name] = list(zip(c["eps"], c[attack], strict=True))
    layers = sorted(
        (
            {"hook": h, "total": sum(f["mean_abs_shift"] for f in feats), "features": feats}
            for h, feats in (base.get("feature_shifts") or {}).items()
        ),
        key=lambda h: -h["total"],
    )
    return {
        "rob_rows": rows,
        "rob_charts": [_svg(charts.eps_curves(series[a], f"{label}: accuracy vs ε")) for a, label in ATTACKS],
        "rob_aa_cols": [{"norm": a["norm"], "eps": a["eps"]} for a in base.get("autoattack", [])],
        "rob_samples": int(fp.metrics.get("samples", 0)),
        "rob_surface": base.get("surface", ""),
        "rob_label": base.get("label", ""),
        "rob_eps_max": eps[-1] if eps else 0.0,
        "rob_aa_version": _aa_version(base),
        "rob_layers": layers,
        "rob_layer_shift": sorted((base.get("layer_shifts") or {}).items(), key=lambda kv: -kv[1]),
        "rob_feature_total": {h["hook"]: h["total"] for h in layers},
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
        "notes": notes,
    }
    return _environment(notes).get_template(TEMPLATE).render(**context)
