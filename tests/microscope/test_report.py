"""The report is one self-contained file, shows what the records hold, and says why where a figure is
undefined."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from typing import Any

import numpy as np
import pytest

from microscope.fidelity import LogitFidelity
from microscope.figures import split
from microscope.models.loading import describe
from microscope.report import TEMPLATE, render
from microscope.robustness import summary
from microscope.sae.evaluate import ce_recovered
from microscope.stages.metrics import flag, weight_table
from schemas.config import AuditConfig
from schemas.records import Architecture, DatasetSummary, StageRecord, StageStatus, ValidationCheck
from tests.conftest import REPO, build_model

SECTIONS = (
    "Stages",
    "Model",
    "Dataset",
    "Quantized variants",
    "Sparse autoencoders",
    "Weights, curvature and similarity",
    "Robustness",
    "Activations per layer",
    "Undefined figures",
)


def record(stage: str, figures: dict[str, Any] | None = None, **fields: Any) -> StageRecord:
    metrics, undefined = split(figures or {})
    return StageRecord(stage=stage, status=StageStatus.completed, metrics=metrics, undefined=undefined, **fields)


def trace_record() -> StageRecord:
    datasets = {
        f"blocks.{layer}.hook_{h}": {
            "layer": layer,
            "hook": hook,
            "module": f"transformer.h.{layer}",
            "d": 32,
            "rows": 1024,
            "stats": {
                "tokens": 1024.0,
                "mean_norm": 1.5 + layer,
                "std_norm": 0.1,
                "max_norm": 3.0 + layer,
                "near_zero_frac": 0.001,
            },
        }
        for layer in range(3)
        for hook, h in (("resid", "resid_post"), ("mlp", "mlp_out"))
    }
    return record("trace", {"tokens": 1024.0}, details={"datasets": datasets, "prefix": "ab/trace/x"})


def metrics_record(model: Any) -> StageRecord:
    """Weight rows from the real weight table: exact for most matrices, the randomized path (condition
    number and α undefined) for one."""
    cfg = AuditConfig()
    rows, _, _ = weight_table(model, "transformer.h", cfg)
    randomized = AuditConfig(metrics={"exact_max_dim": 16, "randomized_rank": 8})
    rows = [r for r in rows if r["name"] != "transformer.h.0.mlp.c_fc.weight"]
    rows += weight_table(model, "transformer.h", randomized, ["transformer.h.0.mlp.c_fc.weight"])[0]
    flag(rows, cfg)
    sens = [
        {
            "name": f"transformer.h.{b}.{t}.weight",
            "layer": b,
            "grad_norm": 0.5 + b,
            "fisher_trace": 10.0 ** (b - 2),
            "fisher_max": 1.0,
            "hessian_trace": 2.0 * b,
            "hessian_trace_se": 0.1,
        }
        for b in range(3)
        for t in ("attn.c_attn", "mlp.c_fc")
    ]
    grid = np.log10(np.random.default_rng(0).uniform(1e-6, 1e-3, (8, 8))).round(4).tolist()
    cka = {
        "layers": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"],
        "matrix": [[1.0, 0.8, 0.5], [0.8, 1.0, 0.7], [0.5, 0.7, 1.0]],
        "variants": {"torch-int8": {"blocks.1.hook_resid_post": 0.9991}},
        "audits": {},
        "skipped": {},
    }
    return record(
        "metrics",
        {"matrices": float(len(rows))},
        details={
            "weights": rows,
            "sensitivity": sens,
            "fisher_maps": [{"name": sens[-1]["name"], "shape": [32, 128], "log10_fisher": grid}],
            "fisher_key": "ab/metrics/x/fisher.safetensors",
            "cka": cka,
        },
    )


def variant_records() -> dict[str, dict[str, StageRecord]]:
    drift = {f"blocks.{i}.hook_resid_post": {"cosine": 1 - 0.01 * i, "rel_error": 0.02 * (i + 1)} for i in range(3)}
    int8 = {"measured_bytes": 1e6, "fp_bytes": 4e6, "kl_mean": 0.002, "kl_p99": 0.01, "top1_agreement": 0.98}
    no_logits = LogitFidelity().summary()  # a model without logits: every logit figure undefined
    curves = {"eps": [0.0, 0.1], "clean": [0.0], "pgd": [0.0, 0.0], "fgsm": [0.0, 0.0], "noise": [0.0, 0.0]}
    aa = [{"norm": "Linf", "eps": 0.1, "robust": 0.0, "version": "custom", "attacks": ["apgd-ce"], "flags": []}]
    broken = record(
        "robustness",
        summary.figures(curves, aa, 8),
        details={"curves": curves, "autoattack": aa, "surface": "pixels", "label": "dataset labels"},
    )
    return {
        "torch-int8": {
            "quantize": record(
                "quantize", int8, details={"produced": "torch-int8", "drift": drift, "eval_tokens": 128}
            ),
            "robustness": broken,
        },
        "nf4": {"quantize": record("quantize", {"measured_bytes": 6e5, **no_logits}, details={"produced": "nf4"})},
    }


def fp_robustness() -> StageRecord:
    curves = {"eps": [0.0, 0.1], "clean": [0.75], "pgd": [0.75, 0.25], "fgsm": [0.75, 0.5], "noise": [0.75, 0.75]}
    aa = [{"norm": "Linf", "eps": 0.1, "robust": 0.125, "version": "custom", "attacks": ["apgd-ce"], "flags": []}]
    return record(
        "robustness",
        summary.figures(curves, aa, 8),
        details={"curves": curves, "autoattack": aa, "surface": "pixels", "label": "dataset labels"},
    )


CE = {"ce_clean": 6.93, "ce_spliced": 6.95, "ce_zero_ablated": 6.91}


def sae_records() -> dict[str, StageRecord]:
    figures = {"l0": 4.0, "fvu": 0.3, "mse": 0.1, "dead_frac": 0.05, "dense_frac": 0.0, **CE}
    figures["ce_recovered"] = ce_recovered(CE["ce_clean"], CE["ce_spliced"], CE["ce_zero_ablated"])
    hist = {"bins_log10": [-4.0, -3.0, -2.0, -1.0], "counts": [5, 20, 3], "never_fired": 4}
    details = {"architecture": "topk", "d_sae": 128, "density_hist": hist, "variants": {}, "top_features": []}
    return {"blocks.1.hook_resid_post": record("sae", figures, details=details)}


def full_report(title: str = "Microscope audit") -> str:
    model = build_model("gpt2")
    arch = describe(model)
    data = DatasetSummary(
        source="c.txt",
        text_digest="0" * 64,
        n_documents=3,
        n_tokens=1024,
        n_windows=32,
        seq_len=32,
        tokens_per_doc_mean=10.0,
        tokens_per_doc_max=20,
        truncated=False,
        checks=[ValidationCheck(expectation="expect_table_row_count_to_be_between", success=True)],
    )
    stages = {
        "ingest": record("ingest", details={"model_digest": "ab" * 32, "dataset_digest": "cd" * 32}),
        "trace": trace_record(),
        "metrics": metrics_record(model),
        "robustness": fp_robustness(),
    }
    return render(stages, arch, data, title=title, variants=variant_records(), saes=sae_records())


@pytest.fixture(scope="module")
def html() -> str:
    return full_report(title="<script>alert(1)</script>")


def test_report_is_self_contained_and_has_every_section(html: str) -> None:
    assert "<script" not in html  # the title is escaped and nothing is loaded or run
    assert "&lt;script&gt;" in html
    assert not re.search(r'(src|href)\s*=\s*"(?!#|data:)', html)  # only in-page links and data URIs
    assert not re.search(r"url\((?!#)|@import", html)
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) <= {
        "http://www.w3.org/2000/svg",  # SVG namespace names, not resources
        "http://www.w3.org/1999/xlink",
    }
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in html or f'<h2 id="undefined">{section}</h2>' in html, section
    # trace 3, drift 2, SAE density 1, α by block 1, ESDs of the fitted matrices, CKA 1, Fisher 2, robustness 3
    n_esd = html.count("α fit")
    assert n_esd >= 1 and html.count('<svg class="chart"') == 3 + 2 + 1 + 1 + html.count("ESD</text>") + 1 + 2 + 3
    assert "svg.chart{" in html  # the stylesheet is inlined
    assert html.count('<td class="l">resid</td>') == 3 and html.count('<td class="l">mlp</td>') == 3
    assert "GPT2LMHeadModel" in html and "transformer.h.2.mlp" in html
    assert "expect_table_row_count_to_be_between" in html


def test_undefined_figures_show_their_reasons(html: str) -> None:
    notes = dict(re.findall(r'<li id="undef-(\d+)">([^<]+)', html))
    reasons = "\n".join(notes.values())
    # SAE: CE recovered of a layer the model does not use
    assert "clean CE 6.93 is not below zero-ablation CE 6.91" in reasons
    cell = re.search(r'<span class="undef" title="clean CE 6.93[^"]*">undefined<sup><a href="#undef-(\d+)">', html)
    assert cell and cell.group(1) in notes
    # robustness: a variant that gets no sample right
    assert "clean accuracy is 0 on 8 samples" in reasons and "torch-int8 · autoattack_Linf" in html
    # quantize: a model without logits; weights: the randomized spectrum path and a spectrum too short to fit
    assert "the model has no output logits" in reasons
    assert "σmin is unknown" in reasons and "power-law fit needs at least 20" in reasons
    assert "transformer.h.0.mlp.c_fc.weight" in html[html.index('<h2 id="undefined">') :]
    # one note per reason, however many cells share it
    assert len(notes) == len(set(notes.values()))
    assert "nan" not in re.sub(r"<svg.*?</svg>", "", html, flags=re.S).lower().split()


def test_report_renders_with_only_ingest() -> None:
    html = render({"ingest": record("ingest", details={"model_digest": "ab" * 32})}, None, None)
    assert "Activations per layer" not in html and "Undefined figures" not in html and "ingest" in html


def test_report_shows_a_partial_stage_as_a_warning() -> None:
    rec = StageRecord(stage="robustness", status=StageStatus.partial, error="int8: out of memory")
    html = render({"ingest": record("ingest"), "robustness": rec}, None, None)
    assert '<td class="l warn">partial</td>' in html and "int8: out of memory" in html


def test_template_ships_with_the_package() -> None:
    from jinja2 import Environment, PackageLoader

    env = Environment(loader=PackageLoader("microscope", "templates"), autoescape=True)
    assert env.get_template(TEMPLATE).filename.endswith("report.html.j2")
    assert env.get_template("report.css").render().startswith("body{")
    assert (resources.files("microscope") / "templates" / TEMPLATE).is_file()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "templates/*" in project["tool"]["setuptools"]["package-data"]["microscope"]


def test_architecture_without_hook_points_renders() -> None:
    arch = Architecture(family="generic", class_name="Tiny", n_layers=0, n_params=10, dtype="float32")
    assert "Tiny" in render({"ingest": record("ingest")}, arch, None)
