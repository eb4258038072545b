"""Reading finished audits: the one API the HTML report, the Streamlit viewer and CI gates read through.

Prefect-free and read-only: everything comes from the artifact store (`audits/<id>.json` records and the
artifacts their stages list). Nothing here computes a stage. A partial or failed audit never raises: a
table lacks the columns a stage did not produce (none is fabricated) and `df.attrs["missing"]` maps the
stage (or `stage[variant]`, `metrics.sensitivity`, `metrics.cka`) to one line saying why and how to
produce it. Only a request for something that cannot exist raises `InputError` (an unknown audit id, a
feature index past the SAE's width).

    list_audits(store, run_id=None, model=None, status=None) -> list[AuditRef]   (record JSON only)
    load_audit(store, audit_id) -> AuditRecord                                   (= audits.load)
    manifest_digest(store, record) -> str     the cache key beside the audit id (st.cache_data)
    layer_table(store, record) -> DataFrame   one row per weight matrix, per-layer figures joined
    features(store, record, hook) -> DataFrame                  the SAE's features table
    feature_contexts(store, record, hook, feature) -> list[dict] a feature's top-activating contexts
    run_series(store, run_id, layers=False) -> DataFrame        a training run's audits by step

The HTML report renders while the audit runs, before its audit record exists, so a few readers take the
stage records themselves (plain rows, values as recorded): `trace_points`, `variant_summaries`,
`drift_points`, `sae_summaries`, `ingest_summary`, `weight_figures`, `robustness_overview`, `robustness_summary`,
`stage_verdict`. `quantization_table`, `drift_table`, `gate_verdict` and the robustness tables are built on
the same readers.

One module per subject: `index` (the audit index, the cache key), `missing` (why a figure is absent and how
to produce it), `layers` (the joined per-layer table: its grain and columns are described there), `sae`
(SAE features, their contexts and fate), `variants` (the quantized variants), `architecture` (module tree,
memory), `robustness`, `run` (a training run's series and projection), `verdicts` (the gate), `trace` (the
traced points) and `weights` (the metrics stage's rows, curvature per block, CKA). Read them
through this package: `from microscope import results; results.layer_table(...)`.
"""

from microscope.errors import InputError
from microscope.results.architecture import BYTES, ingest_summary, memory_table, module_table
from microscope.results.attribution import attribution_overview, attribution_results, layer_shares_table
from microscope.results.index import AuditRef, list_audits, load_audit, manifest_digest, running
from microscope.results.landscape import landscape_history, landscape_overview
from microscope.results.layers import (
    FLAGGED_COLUMNS,
    SAE_FIGURES,
    SAE_VARIANT_FIGURES,
    SENSITIVITY_COLUMNS,
    TIED,
    TRACE_FIGURES,
    WEIGHT_COLUMNS,
    layer_table,
)
from microscope.results.missing import HOW, number, variant_why_missing, why_missing
from microscope.results.pruning import CURVE_FIGURES, mask_grid, pruned_matrices, pruning_table
from microscope.results.reliability import (
    corruption_table,
    ood_table,
    reliability_by_variant,
    reliability_diagram,
    reliability_overview,
    reliability_table,
    roc_points,
    smoothing_table,
)
from microscope.results.robustness import (
    SWEEP_ATTACKS,
    autoattack_table,
    autoattack_vs_fp,
    brittle_features,
    robustness_by_variant,
    robustness_curves,
    robustness_overview,
    robustness_summary,
)
from microscope.results.run import PROJECTION_FEATURES, headline_compare, layer_features, run_projection, run_series
from microscope.results.sae import (
    FEATURE_COLUMNS,
    WORDPIECE_MODELS,
    display_tokens,
    feature_contexts,
    feature_fate,
    feature_histogram,
    features,
    sae_summaries,
    variant_fate,
)
from microscope.results.trace import trace_points
from microscope.results.variants import (
    QUANT_FIGURES,
    drift_points,
    drift_table,
    quantization_table,
    variant_summaries,
)
from microscope.results.verdicts import gate_history, gate_verdict, stage_verdict
from microscope.results.weights import (
    cka_summary,
    fisher_by_block,
    randomized_spectra,
    sensitivity_by_block,
    weight_figures,
)

__all__ = [
    "running",
    "WORDPIECE_MODELS",
    "display_tokens",
    "feature_histogram",
    "BYTES",
    "CURVE_FIGURES",
    "InputError",
    "mask_grid",
    "attribution_overview",
    "attribution_results",
    "layer_shares_table",
    "landscape_history",
    "landscape_overview",
    "pruned_matrices",
    "pruning_table",
    "FEATURE_COLUMNS",
    "FLAGGED_COLUMNS",
    "HOW",
    "PROJECTION_FEATURES",
    "QUANT_FIGURES",
    "SAE_FIGURES",
    "SAE_VARIANT_FIGURES",
    "SENSITIVITY_COLUMNS",
    "SWEEP_ATTACKS",
    "TIED",
    "TRACE_FIGURES",
    "WEIGHT_COLUMNS",
    "AuditRef",
    "autoattack_table",
    "autoattack_vs_fp",
    "brittle_features",
    "cka_summary",
    "corruption_table",
    "drift_points",
    "drift_table",
    "feature_contexts",
    "feature_fate",
    "features",
    "fisher_by_block",
    "gate_history",
    "gate_verdict",
    "headline_compare",
    "ingest_summary",
    "layer_features",
    "layer_table",
    "list_audits",
    "load_audit",
    "manifest_digest",
    "memory_table",
    "module_table",
    "number",
    "ood_table",
    "quantization_table",
    "randomized_spectra",
    "reliability_by_variant",
    "reliability_diagram",
    "reliability_overview",
    "reliability_table",
    "robustness_by_variant",
    "robustness_curves",
    "robustness_overview",
    "robustness_summary",
    "roc_points",
    "run_projection",
    "run_series",
    "sae_summaries",
    "sensitivity_by_block",
    "smoothing_table",
    "stage_verdict",
    "trace_points",
    "variant_fate",
    "variant_summaries",
    "variant_why_missing",
    "weight_figures",
    "why_missing",
]
