"""The audit report: one self-contained HTML file joining every stage's results per layer.

It renders whatever stage records exist, so later stages only add a section.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

from schemas.records import Architecture, DatasetSummary, StageRecord

from microscope.plots import line_chart

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .55rem;text-align:right}
th{background:#f5f5f5}td.l,th.l{text-align:left}code{font-size:12px;background:#f5f5f5;padding:0 .2rem}
.ok{color:#2ca02c}.bad{color:#d62728;font-weight:600}.muted{color:#777}.charts{display:flex;flex-wrap:wrap;gap:1rem}
svg.chart{border:1px solid #eee;background:#fff}svg .t{font-weight:600;font-size:13px}svg .a{font-size:12px;fill:#444}
svg .k{font-size:11px;fill:#555}svg .g{stroke:#eee}
"""

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ css }}</style></head><body>
<h1>{{ title }}</h1>
<p class="muted">model digest <code>{{ model_digest }}</code> · dataset digest <code>{{ dataset_digest }}</code>
· rendered {{ rendered }}</p>

<h2>Stages</h2>
<table><tr><th class="l">stage</th><th class="l">status</th><th>seconds</th><th class="l">config hash</th>
<th class="l">summary</th></tr>
{% for r in stages %}<tr><td class="l">{{ r.stage }}</td>
<td class="l {{ 'bad' if r.status.value == 'failed' else 'ok' }}">{{ r.status.value }}</td>
<td>{{ '%.2f' % r.seconds if r.seconds is not none else '' }}</td><td class="l"><code>{{ r.config_hash or '' }}</code></td>
<td class="l">{% for k, v in r.metrics.items() %}{{ k }}={{ fmt(v) }} {% endfor %}{% if r.error %}<span class="bad">{{ r.error }}</span>{% endif %}</td></tr>
{% endfor %}</table>

{% if arch %}
<h2>Model</h2>
<table>
<tr><th class="l">class</th><td class="l">{{ arch.class_name }}</td></tr>
<tr><th class="l">family</th><td class="l">{{ arch.family }}{% if arch.model_type %} ({{ arch.model_type }}){% endif %}</td></tr>
<tr><th class="l">layers</th><td>{{ arch.n_layers }}</td></tr>
<tr><th class="l">hidden size</th><td>{{ arch.hidden_size or '–' }}</td></tr>
<tr><th class="l">attention heads</th><td>{{ arch.n_heads or '–' }}</td></tr>
<tr><th class="l">vocabulary</th><td>{{ arch.vocab_size or '–' }}</td></tr>
<tr><th class="l">parameters</th><td>{{ '{:,}'.format(arch.n_params) }}</td></tr>
<tr><th class="l">dtype</th><td class="l">{{ arch.dtype }}</td></tr>
<tr><th class="l">kind</th><td class="l">{{ 'causal LM' if arch.is_causal else 'encoder' }}{{ ', has unembedding' if arch.has_unembedding else '' }}</td></tr>
</table>
<h3>Parameters per module</h3>
{% macro module_rows(rows) %}<table><tr><th class="l">module</th><th class="l">type</th><th>parameters</th><th>share</th></tr>
{% for m in rows %}<tr><td class="l"><code>{{ m.name }}</code></td><td class="l">{{ m.type }}</td>
<td>{{ '{:,}'.format(m.params) }}</td><td>{{ '%.1f%%' % (100 * m.params / arch.n_params) }}</td></tr>{% endfor %}
</table>{% endmacro %}
{{ module_rows(top_modules) }}
<details><summary>Inside each block</summary>{{ module_rows(modules) }}
{% if more_modules %}<p class="muted">… and {{ more_modules }} more modules (report.max_modules).</p>{% endif %}</details>
<h3>Hook points</h3>
<table><tr><th>layer</th><th class="l">resid</th><th class="l">mlp</th><th class="l">attn</th></tr>
{% for p in arch.hook_points %}<tr><td>{{ p.layer }}</td><td class="l"><code>{{ p.resid }}</code></td>
<td class="l"><code>{{ p.mlp or '–' }}</code></td><td class="l"><code>{{ p.attn or '–' }}</code></td></tr>{% endfor %}
</table>
{% endif %}

{% if data %}
<h2>Dataset</h2>
<table>
<tr><th class="l">source</th><td class="l"><code>{{ data.source }}</code></td></tr>
<tr><th class="l">documents</th><td>{{ '{:,}'.format(data.n_documents) }}</td></tr>
<tr><th class="l">tokens in windows</th><td>{{ '{:,}'.format(data.n_tokens) }}{{ ' (cut at max_tokens)' if data.truncated else '' }}</td></tr>
<tr><th class="l">windows × seq_len</th><td>{{ data.n_windows }} × {{ data.seq_len }}</td></tr>
<tr><th class="l">tokens per document</th><td>mean {{ '%.1f' % data.tokens_per_doc_mean }}, max {{ data.tokens_per_doc_max }}</td></tr>
<tr><th class="l">text digest</th><td class="l"><code>{{ data.text_digest[:16] }}</code></td></tr>
</table>
<h3>Validation (great-expectations)</h3>
<table><tr><th class="l">expectation</th><th class="l">result</th><th class="l">detail</th></tr>
{% for c in data.checks %}<tr><td class="l">{{ c.expectation }}</td>
<td class="l {{ 'ok' if c.success else 'bad' }}">{{ 'passed' if c.success else 'FAILED' }}</td><td class="l">{{ c.detail }}</td></tr>{% endfor %}
</table>
{% endif %}

{% if variant_rows %}
<h2>Quantized variants</h2>
<p>Fidelity on {{ eval_tokens }} held-out tokens against the full-precision model{% if worst %}; the layer that
drifts most is <b>{{ worst.hook }}</b> in <b>{{ worst.variant }}</b> (relative error {{ fmt(worst.rel_error) }}){% endif %}.</p>
<table><tr><th class="l">variant</th><th class="l">made as</th><th>on disk</th><th>memory (est.)</th><th>memory</th>
<th>vs fp</th><th>KL mean</th><th>KL p99</th><th>top-1 agree</th><th>mean |Δp|</th><th>Δ ppl</th><th>min cosine</th></tr>
{% for v in variant_rows %}<tr><td class="l">{{ v.name }}</td>
<td class="l {{ 'bad' if v.status == 'failed' else '' }}">{{ v.produced or 'failed: ' ~ v.error }}{{ ' (fallback)' if v.fell_back else '' }}</td>
<td>{{ mb(v.m.get('on_disk_bytes')) }}</td><td>{{ mb(v.m.get('estimated_bytes')) }}</td><td>{{ mb(v.m.get('measured_bytes')) }}</td>
<td>{{ pct(v.m.get('measured_bytes'), v.m.get('fp_bytes')) }}</td><td>{{ fmt(v.m.get('kl_mean')) }}</td><td>{{ fmt(v.m.get('kl_p99')) }}</td>
<td>{{ pct(v.m.get('top1_agreement'), 1) }}</td><td>{{ fmt(v.m.get('ref_token_abs_dp_mean')) }}</td><td>{{ fmt(v.m.get('delta_ppl')) }}</td>
<td>{{ fmt(v.m.get('min_cosine')) }}</td></tr>{% endfor %}
</table>
<div class="charts">{% for c in variant_charts %}{{ c }}{% endfor %}</div>
{% endif %}

{% if sae_rows %}
<h2>Sparse autoencoders</h2>
<table><tr><th class="l">hook</th><th class="l">arch</th><th>d_sae</th><th>L0</th><th>FVU</th><th>MSE</th><th>dead</th>
<th>dense</th><th>CE recovered</th><th>KL(clean‖spliced)</th><th>embedding cos</th><th class="l">on variants (ΔFVU, ΔL0)</th></tr>
{% for r in sae_rows %}<tr><td class="l">{{ r.hook }}</td><td class="l">{{ r.arch }}</td><td>{{ r.d_sae }}</td>
<td>{{ fmt(r.m.get('l0')) }}</td><td>{{ fmt(r.m.get('fvu')) }}</td><td>{{ fmt(r.m.get('mse')) }}</td>
<td>{{ pct(r.m.get('dead_frac'), 1) }}</td><td>{{ pct(r.m.get('dense_frac'), 1) }}</td><td>{{ fmt(r.m.get('ce_recovered')) }}</td>
<td>{{ fmt(r.m.get('kl_clean_spliced')) }}</td><td>{{ fmt(r.m.get('embedding_cosine')) }}</td>
<td class="l">{% for v, vm in r.variants.items() %}{{ v }}: {{ '%+.3f' % vm.fvu_shift }}, {{ '%+.1f' % vm.l0_shift }}<br>{% endfor %}</td></tr>{% endfor %}
</table>
<div class="charts">{% for c in sae_charts %}{{ c }}{% endfor %}</div>
{% for r in sae_rows %}{% if r.features %}
<h3>Top features of {{ r.hook }}</h3>
<table><tr><th>feature</th><th>density</th><th class="l">top contexts (activating token in bold)</th><th class="l">promotes</th></tr>
{% for f in r.features %}<tr><td>{{ f.feature }}</td><td>{{ '%.2e' % f.density }}</td><td class="l">
{% for c in f.top_contexts[:3] %}<div>…{{ c.left }}<b style="background:#ffe08a">{{ c.token }}</b>{{ c.right }}… <span class="muted">({{ '%.2f' % c.activation }})</span></div>{% endfor %}
</td><td class="l">{{ (f.top_logits or [])[:5] | join(' ') }}</td></tr>{% endfor %}
</table>{% endif %}{% endfor %}
{% endif %}

{% if weights %}
<h2>Weights, curvature and similarity</h2>
{% if flagged %}<h3>Flagged matrices</h3>
<table><tr><th class="l">matrix</th><th>block</th><th class="l">why</th></tr>
{% for r in flagged %}<tr><td class="l"><code>{{ r.name }}</code></td><td>{{ r.layer }}</td><td class="l bad">{{ r.flags | join('; ') }}</td></tr>{% endfor %}
</table>{% else %}<p class="ok">No matrix flagged (α in range, no effective-rank collapse, no conditioning outlier).</p>{% endif %}
<div class="charts">{% for c in metric_charts %}{{ c }}{% endfor %}</div>
{% if esd_charts %}<h3>Spectral densities{{ ' of the flagged matrices' if flagged else '' }} (log-log, with the power-law fit)</h3>
<div class="charts">{% for c in esd_charts %}{{ c }}{% endfor %}</div>{% endif %}
<details><summary>All {{ weights | length }} matrices</summary>
<table><tr><th class="l">matrix</th><th>block</th><th class="l">shape</th><th>‖W‖_F</th><th>σmax</th><th>cond</th><th>eff. rank</th>
<th>stable rank</th><th>sparsity</th><th>α</th><th>α̂</th><th>MP spikes</th></tr>
{% for r in weights %}<tr><td class="l"><code>{{ r.name }}</code></td><td>{{ r.layer }}</td><td class="l">{{ r.shape | join('×') }}</td>
<td>{{ fmt(r.frobenius) }}</td><td>{{ fmt(r.spectral_norm) }}</td><td>{{ fmt(r.condition_number) }}</td><td>{{ fmt(r.effective_rank) }}</td>
<td>{{ fmt(r.stable_rank) }}</td><td>{{ '%.2f%%' % (100 * r.sparsity) }}</td><td>{{ fmt(r.alpha) }}</td><td>{{ fmt(r.alpha_weighted) }}</td>
<td>{{ r.mp_spikes }}</td></tr>{% endfor %}</table></details>
{% if sens %}<h3>Sensitivity per block (loss: {{ sens_loss }})</h3>
<table><tr><th>block</th><th>gradient norm</th><th>Fisher trace</th><th>Hessian trace (Hutchinson)</th></tr>
{% for b in sens %}<tr><td>{{ b.layer }}</td><td>{{ fmt(b.grad_norm) }}</td><td>{{ fmt(b.fisher_trace) }}</td>
<td>{{ fmt(b.hessian_trace) }} ± {{ fmt(b.hessian_trace_se) }}</td></tr>{% endfor %}</table>{% endif %}
{% if cka_svg %}<h3>Linear CKA between traced layers</h3>{{ cka_svg }}
{% for v, hooks in cka_variants.items() %}<p>{{ v }} vs full precision: {% for h, c in hooks.items() %}{{ h }} {{ '%.4f' % c }}{{ ', ' if not loop.last }}{% endfor %}</p>{% endfor %}
{% if cka_audits %}<h3>Linear CKA against other checkpoints (metrics.compare_audits, same tokens)</h3>
<table><tr><th class="l">audit</th>{% for h in cka_hooks %}<th>{{ h }}</th>{% endfor %}</tr>
{% for a, hooks in cka_audits.items() %}<tr><td class="l"><code>{{ a }}</code></td>{% for h in cka_hooks %}<td>{{ '%.4f' % hooks[h] if h in hooks else '–' }}</td>{% endfor %}</tr>{% endfor %}
</table>{% endif %}
{% for a, why in cka_skipped.items() %}<p class="muted">{{ a }}: not compared ({{ why }}).</p>{% endfor %}{% endif %}
{% if fisher_charts %}<h3>Fisher diagonal</h3>
<p class="muted">log10 of the Fisher trace per block and tensor, then the Fisher diagonal of the most sensitive matrices
mean-pooled to a grid (rows: output units, columns: inputs). Full diagonal: <code>{{ fisher_key }}</code>.</p>
<div class="charts">{% for c in fisher_charts %}{{ c }}{% endfor %}</div>{% endif %}
{% if randomized %}<p class="muted">{{ randomized }} matrices took the randomized spectrum path (top
{{ randomized_rank }} singular values, relative-error bound on σmax up to {{ "%.2e" % randomized_error }}); their condition
numbers are not computed and their effective ranks are estimates.</p>{% endif %}
{% endif %}

{% if rob_rows %}
<h2>Robustness</h2>
<p>{{ rob_samples }} samples, the same for every variant; surface: {{ rob_surface }}; label: {{ rob_label }}.
ε in [0, 1]-box units{% if rob_surface == 'embeddings' %} (in embedding units: × the median dimension's range){% endif %}.
AutoAttack: {{ rob_aa_version }}; PGD, FGSM and noise are our sweeps (a sample broken at ε counts as
broken at every larger ε).</p>
<table><tr><th class="l">variant</th><th>clean</th>{% for a in rob_aa_cols %}<th>AutoAttack {{ a.norm }} ε={{ '%.4g' % a.eps }}</th>{% endfor %}
<th>PGD ε={{ '%.4g' % rob_eps_max }}</th><th>FGSM ε={{ '%.4g' % rob_eps_max }}</th><th>noise σ={{ '%.4g' % rob_eps_max }}</th><th class="l">vs fp</th><th class="l">AutoAttack flags</th></tr>
{% for r in rob_rows %}<tr><td class="l">{{ r.variant }}</td>
{% if r.error %}<td class="l bad" colspan="{{ 6 + rob_aa_cols | length }}">{{ r.error }}</td>{% else %}
<td>{{ pct(r.clean, 1) }}</td>{% for a in rob_aa_cols %}<td>{{ pct(r.aa.get(a.norm), 1) }}</td>{% endfor %}
<td>{{ pct(r.pgd, 1) }}</td><td>{{ pct(r.fgsm, 1) }}</td><td>{{ pct(r.noise, 1) }}</td><td class="l">{{ r.verdict }}</td>
<td class="l">{{ r.flags | join('; ') or '–' }}</td>{% endif %}</tr>{% endfor %}
</table>
<div class="charts">{% for c in rob_charts %}{{ c }}{% endfor %}</div>
{% if rob_layer_shift %}<h3>Brittle layers (clean vs PGD at ε={{ '%.4g' % rob_eps_max }})</h3>
<table><tr><th class="l">hook</th><th>mean ‖Δh‖ / ‖h‖</th><th>Σ mean |Δ| of its top SAE features</th></tr>
{% for h, v in rob_layer_shift %}<tr><td class="l">{{ h }}</td><td>{{ fmt(v) }}</td><td>{{ fmt(rob_feature_total.get(h)) }}</td></tr>{% endfor %}</table>{% endif %}
{% if rob_layers %}
{% for h in rob_layers %}<h3>Features of {{ h.hook }} that move most under attack</h3>
<table><tr><th>feature</th><th>mean |Δ|</th><th>clean mean</th><th>attacked mean</th><th>density</th><th class="l">top contexts</th></tr>
{% for f in h.features %}<tr><td>{{ f.feature }}</td><td>{{ fmt(f.mean_abs_shift) }}</td><td>{{ fmt(f.clean_mean) }}</td>
<td>{{ fmt(f.attacked_mean) }}</td><td>{{ '%.2e' % f.density }}</td><td class="l">{% for c in f.top_contexts %}<div>{{ c }}</div>{% endfor %}</td></tr>{% endfor %}
</table>{% endfor %}{% endif %}
{% endif %}

{% if trace_rows %}
<h2>Activations per layer</h2>
<div class="charts">{% for c in trace_charts %}{{ c }}{% endfor %}</div>
<table><tr><th>layer</th><th class="l">hook</th><th class="l">module</th><th>d</th><th>tokens</th><th>mean ‖x‖</th>
<th>std ‖x‖</th><th>max ‖x‖</th><th>near-zero</th></tr>
{% for r in trace_rows %}<tr><td>{{ r.layer }}</td><td class="l">{{ r.hook }}</td><td class="l"><code>{{ r.module }}</code></td>
<td>{{ r.d }}</td><td>{{ '{:,}'.format(r.rows) }}</td><td>{{ fmt(r.stats.mean_norm) }}</td><td>{{ fmt(r.stats.std_norm) }}</td>
<td>{{ fmt(r.stats.max_norm) }}</td><td>{{ '%.2f%%' % (100 * r.stats.near_zero_frac) }}</td></tr>{% endfor %}
</table>
<p class="muted">Activation cache: <code>{{ trace_prefix }}</code> (one Parquet dataset per layer and hook).</p>
{% endif %}
</body></html>
"""


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return str(v)


def _variant_view(variants: dict[str, dict[str, StageRecord]]) -> tuple[list[dict[str, Any]], list[str], Any, int]:
    """Rows of the variants table, drift charts by layer, the worst (variant, hook), eval tokens."""
    rows, cos, err = [], {}, {}
    worst, eval_tokens = None, 0
    for name, recs in variants.items():
        q = recs.get("quantize")
        if q is None:
            continue
        rows.append(
            {
                "name": name,
                "status": q.status.value,
                "error": q.error,
                "produced": q.details.get("produced"),
                "fell_back": q.details.get("fell_back"),
                "m": q.metrics,
            }
        )
        eval_tokens = max(eval_tokens, int(q.details.get("eval_tokens", 0)))
        for hook_name, d in (q.details.get("drift") or {}).items():
            layer, hook = int(hook_name.split(".")[1]), hook_name.rsplit("_", 1)[0].split("hook_")[-1]
            cos.setdefault(hook, {}).setdefault(name, []).append((layer, d["cosine"]))
            err.setdefault(hook, {}).setdefault(name, []).append((layer, d["rel_error"]))
            if worst is None or d["rel_error"] > worst["rel_error"]:
                worst = {"variant": name, "hook": hook_name, "rel_error": d["rel_error"]}
    charts = []
    for hook in sorted(cos):
        charts.append(line_chart(cos[hook], f"cosine to fp ({hook})", "layer", "cosine", from_zero=False))
        charts.append(line_chart(err[hook], f"relative error ({hook})", "layer", "‖q − fp‖ / ‖fp‖"))
    return rows, charts, worst, eval_tokens


def _sae_view(saes: dict[str, StageRecord]) -> tuple[list[dict[str, Any]], list[str]]:
    rows, hist_series = [], {}
    for hook, r in saes.items():
        if r.status.value == "failed":
            rows.append({"hook": hook, "arch": "failed", "d_sae": "", "m": {}, "variants": {}, "features": []})
            continue
        d = r.details
        rows.append(
            {
                "hook": hook,
                "arch": d.get("architecture"),
                "d_sae": d.get("d_sae"),
                "m": r.metrics,
                "variants": d.get("variants") or {},
                "features": d.get("top_features") or [],
            }
        )
        h = d.get("density_hist") or {}
        bins, counts = h.get("bins_log10") or [], h.get("counts") or []
        if counts:
            centers = [(bins[i] + bins[i + 1]) / 2 for i in range(len(counts))]
            hist_series[hook] = list(zip(centers, [float(c) for c in counts], strict=True))
    charts = (
        [line_chart(hist_series, "feature density (held-out tokens)", "log10 firing frequency", "features", width=520)]
        if hist_series
        else []
    )
    return rows, charts


def _metrics_view(rec: StageRecord | None, causal: bool) -> dict[str, Any]:
    from microscope.plots import heatmap

    if rec is None or rec.status.value == "failed" or not rec.details.get("weights"):
        return {
            "weights": [],
            "flagged": [],
            "metric_charts": [],
            "sens": [],
            "cka_svg": "",
            "cka_variants": {},
            "sens_loss": "",
            "esd_charts": [],
            "fisher_charts": [],
            "cka_audits": {},
            "cka_hooks": [],
            "cka_skipped": {},
            "fisher_key": "",
            "randomized": 0,
            "randomized_rank": 0,
            "randomized_error": 0.0,
        }
    rows = rec.details["weights"]
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["layer"] >= 0 and r["alpha"] == r["alpha"]:  # not NaN
            kind = re.sub(r"^.*?\.\d+\.", "", r["name"]).removesuffix(".weight")  # name inside the block
            series.setdefault(kind, []).append((r["layer"], r["alpha"]))
    top = dict(sorted(series.items(), key=lambda kv: -len(kv[1]))[:6])
    blocks: dict[int, dict[str, float]] = {}
    for b in rec.details.get("sensitivity") or []:
        if b["layer"] < 0:
            continue
        agg = blocks.setdefault(
            b["layer"],
            {"layer": b["layer"], "grad_norm": 0.0, "fisher_trace": 0.0, "hessian_trace": 0.0, "hessian_trace_se": 0.0},
        )
        agg["grad_norm"] = (agg["grad_norm"] ** 2 + b["grad_norm"] ** 2) ** 0.5
        agg["fisher_trace"] += b["fisher_trace"]
        agg["hessian_trace"] += b["hessian_trace"]
        agg["hessian_trace_se"] = (agg["hessian_trace_se"] ** 2 + b["hessian_trace_se"] ** 2) ** 0.5
    cka = rec.details.get("cka") or {}
    finite = [r for r in rows if r["alpha"] == r["alpha"]]  # drop NaN fits
    shown = [r for r in rows if r["flags"]] or sorted(finite, key=lambda r: -r["alpha"])
    rand = [r for r in rows if r.get("spectrum") == "randomized"]
    esd_charts = []
    for r in shown[:6]:
        esd = r.get("esd") or {}
        xs, ys = esd.get("log10_lambda") or [], esd.get("log10_density") or []
        if len(xs) < 2:
            continue
        series = {"ESD": list(zip(xs, ys, strict=True))}
        if r["alpha"] == r["alpha"] and r.get("xmin", 0) > 0:
            # The fitted density p(λ) ∝ λ^−α from xmin, anchored at the ESD bin nearest xmin.
            x0 = math.log10(r["xmin"])
            y0 = ys[min(range(len(xs)), key=lambda i: abs(xs[i] - x0))]
            series["α fit"] = [(x, y0 - r["alpha"] * (x - x0)) for x in xs if x >= x0]
        esd_charts.append(line_chart(series, r["name"][-48:], "log10 λ", "log10 density", from_zero=False))
    return {
        "esd_charts": esd_charts,
        "weights": rows,
        "flagged": [r for r in rows if r["flags"]],
        "metric_charts": [line_chart(top, "power-law α by block", "block", "α", width=520)] if top else [],
        "sens": [blocks[k] for k in sorted(blocks)],
        "sens_loss": "next-token cross-entropy" if causal else "proxy: mean squared final hidden state",
        "cka_svg": heatmap(cka["matrix"], cka["layers"], "linear CKA") if cka.get("matrix") else "",
        "cka_variants": cka.get("variants", {}),
        "cka_audits": cka.get("audits", {}),
        "cka_hooks": sorted({h for v in cka.get("audits", {}).values() for h in v}),
        "cka_skipped": cka.get("skipped", {}),
        "fisher_charts": _fisher_charts(rec),
        "fisher_key": rec.details.get("fisher_key") or "",
        "randomized": len(rand),
        "randomized_rank": max((r["n_singular_values"] for r in rand), default=0),
        "randomized_error": max((r["spectrum_error"] for r in rand), default=0.0),
    }


def _fisher_charts(rec: StageRecord) -> list[str]:
    from microscope.plots import value_grid

    sens = rec.details.get("sensitivity") or []
    table: dict[int, dict[str, float]] = {}
    for r in sens:
        if r["layer"] >= 0 and r["fisher_trace"] > 0:
            kind = re.sub(r"^.*?\.\d+\.", "", r["name"])
            table.setdefault(r["layer"], {})[kind] = math.log10(r["fisher_trace"])
    charts = []
    if table:
        kinds = sorted({k for row in table.values() for k in row})
        layers = sorted(table)
        charts.append(
            value_grid(
                [[table[b].get(k, float("nan")) for k in kinds] for b in layers],
                "log10 Fisher trace, block × tensor",
                row_labels=[f"block {b}" for b in layers],
                col_labels=kinds,
                cell=18,
                legend="log10 trace:",
            )
        )
    for m in rec.details.get("fisher_maps") or []:
        charts.append(
            value_grid(
                m["log10_fisher"], m["name"][-40:] + " " + "×".join(map(str, m["shape"])), cell=7, legend="log10 F:"
            )
        )
    return charts


def _robustness_view(fp: StageRecord | None, variants: dict[str, dict[str, StageRecord]]) -> dict[str, Any]:
    view: dict[str, Any] = {
        "rob_rows": [],
        "rob_charts": [],
        "rob_layers": [],
        "rob_aa_cols": [],
        "rob_layer_shift": [],
        "rob_feature_total": {},
    }
    if fp is None or not fp.details.get("curves"):
        return view
    recs = {"fp": fp} | {v: r["robustness"] for v, r in sorted(variants.items()) if "robustness" in r}
    base = fp.details
    view["rob_aa_cols"] = [{"norm": a["norm"], "eps": a["eps"]} for a in base.get("autoattack", [])]
    eps = base["curves"]["eps"]
    view.update(
        rob_samples=int(fp.metrics.get("samples", 0)),
        rob_surface=base.get("surface", ""),
        rob_label=base.get("label", ""),
        rob_eps_max=eps[-1] if eps else 0.0,
        rob_aa_version=(
            f"{a.get('library', 'pyautoattack')}, version {a['version']} ({', '.join(a['attacks'])})"
            if (a := (base.get("autoattack") or [None])[0])
            else "–"
        ),
    )
    series: dict[str, dict[str, list[tuple[float, float]]]] = {"pgd": {}, "fgsm": {}, "noise": {}}
    fp_aa = {a["norm"]: a["robust"] for a in base.get("autoattack", [])}
    for name, r in recs.items():
        if r.status.value == "failed" and not r.details.get("curves"):
            view["rob_rows"].append({"variant": name, "error": r.error})
            continue
        c = r.details["curves"]
        aa = {a["norm"]: a["robust"] for a in r.details.get("autoattack", [])}
        verdict = "–"
        if name != "fp" and aa:
            norm = next(iter(aa))
            d = 100 * (aa[norm] - fp_aa.get(norm, aa[norm]))
            verdict = f"AutoAttack {norm} {d:+.1f} pts" + (" (more brittle)" if d < 0 else " (not more brittle)")
        view["rob_rows"].append(
            {
                "variant": name,
                "clean": c["clean"][0],
                "aa": aa,
                "pgd": c["pgd"][-1],
                "fgsm": c["fgsm"][-1],
                "noise": c["noise"][-1],
                "verdict": verdict,
                "flags": sorted({f for a in r.details.get("autoattack", []) for f in a.get("flags", [])}),
            }
        )
        for attack in series:
            series[attack][name] = list(zip(c["eps"], c[attack], strict=True))
    for attack, label in (("pgd", "PGD (Linf)"), ("fgsm", "FGSM (Linf)"), ("noise", "Gaussian noise (σ)")):
        view["rob_charts"].append(line_chart(series[attack], f"{label}: accuracy vs ε", "ε (box units)", "accuracy"))
    shifts = base.get("feature_shifts") or {}
    view["rob_layers"] = sorted(
        (
            {"hook": h, "total": sum(f["mean_abs_shift"] for f in feats), "features": feats}
            for h, feats in shifts.items()
        ),
        key=lambda h: -h["total"],
    )
    view["rob_layer_shift"] = sorted((base.get("layer_shifts") or {}).items(), key=lambda kv: -kv[1])
    view["rob_feature_total"] = {h["hook"]: h["total"] for h in view["rob_layers"]}
    return view


def render(
    stages: dict[str, StageRecord],
    arch: Architecture | None,
    data: DatasetSummary | None,
    title: str | None = None,
    max_modules: int = 60,
    variants: dict[str, dict[str, StageRecord]] | None = None,
    saes: dict[str, StageRecord] | None = None,
) -> str:
    from jinja2 import Environment
    from markupsafe import Markup

    ingest = stages.get("ingest")
    trace = stages.get("trace")
    trace_rows: list[dict[str, Any]] = []
    charts: list[str] = []
    if trace is not None and trace.details.get("datasets"):
        trace_rows = sorted(trace.details["datasets"].values(), key=lambda r: (r["layer"], r["hook"]))
        for metric, label in (
            ("mean_norm", "mean ‖x‖"),
            ("max_norm", "max ‖x‖"),
            ("near_zero_frac", "near-zero fraction"),
        ):
            series: dict[str, list[tuple[float, float]]] = {}
            for r in trace_rows:
                series.setdefault(r["hook"], []).append((r["layer"], r["stats"][metric]))
            charts.append(line_chart(series, f"{label} by layer", "layer", label))
    env = Environment(autoescape=True)
    env.globals["fmt"] = _fmt
    env.globals["mb"] = lambda b: "–" if b is None else f"{b / 2**20:,.2f} MiB"
    env.globals["pct"] = lambda a, b: "–" if a is None or not b else f"{100 * a / b:.1f}%"
    variant_rows, variant_charts, worst, eval_tokens = _variant_view(variants or {})
    sae_rows, sae_charts = _sae_view(saes or {})
    mview = _metrics_view(stages.get("metrics"), bool(arch and arch.is_causal and arch.has_unembedding))
    mview["metric_charts"] = [Markup(c) for c in mview["metric_charts"] if c]
    mview["cka_svg"] = Markup(mview["cka_svg"])
    mview["esd_charts"] = [Markup(c) for c in mview["esd_charts"] if c]
    mview["fisher_charts"] = [Markup(c) for c in mview["fisher_charts"] if c]
    rview = _robustness_view(stages.get("robustness"), variants or {})
    rview["rob_charts"] = [Markup(c) for c in rview["rob_charts"] if c]
    modules = arch.modules[:max_modules] if arch else []
    block_paths = {p.resid for p in arch.hook_points} if arch else set()
    # Embeddings, blocks and heads; the blocks' own children go in a collapsed table.
    top_modules = [
        m for m in (arch.modules if arch else []) if not any(m.name.startswith(b + ".") for b in block_paths)
    ]
    return env.from_string(TEMPLATE).render(
        title=title or (f"Microscope audit: {arch.class_name}" if arch else "Microscope audit"),
        css=Markup(CSS),
        model_digest=(ingest.details.get("model_digest", "") if ingest else "")[:16],
        dataset_digest=(ingest.details.get("dataset_digest", "") if ingest else "")[:16],
        rendered=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        stages=[s for s in stages.values()],
        arch=arch,
        modules=modules,
        top_modules=top_modules,
        more_modules=(len(arch.modules) - len(modules)) if arch else 0,
        data=data,
        trace_rows=trace_rows,
        trace_charts=[Markup(c) for c in charts],
        trace_prefix=trace.details.get("prefix", "") if trace else "",
        **mview,
        **rview,
        variant_rows=variant_rows,
        sae_rows=sae_rows,
        sae_charts=[Markup(c) for c in sae_charts if c],
        variant_charts=[Markup(c) for c in variant_charts if c],
        worst=worst,
        eval_tokens=eval_tokens,
    )
