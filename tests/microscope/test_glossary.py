"""The glossary (`microscope.glossary`): every column `results.layer_table` produces and every headline
figure of the shared finished audits (a tiny GPT-2 and the digits CNN) has an entry, so no column reaches
a reader unexplained; families of keys resolve through their patterns; the report's headers carry the
labels and the help as tooltips."""

from __future__ import annotations

import re

import pytest

from microscope import audits, glossary, results
from microscope.formatting import KINDS
from microscope.store import open_store


def _records(finished_audits: dict, finished_vision: dict) -> list:
    out = []
    for raw in [*finished_audits.values(), finished_vision]:
        store = open_store(raw["store_uri"])
        out.append((store, results.load_audit(store, raw["audit_id"])))
    return out


def test_every_column_and_headline_figure_has_an_entry(finished_audits: dict, finished_vision: dict) -> None:
    unknown, seen = set(), set()
    for store, rec in _records(finished_audits, finished_vision):
        keys = [str(c) for c in results.layer_table(store, rec).columns]
        keys += [f"{source}.{name}" for source, figures in audits.headline(rec).items() for name in figures]
        keys += [f"drift.{h}" for v in rec.variants.values() for h in (v["quantize"].details.get("drift") or {})]
        seen |= set(keys)
        unknown |= {k for k in keys if glossary.lookup(k) is None}
    assert not unknown, f"add these keys to microscope/glossary.py: {sorted(unknown)}"
    # the shared audits cover the families: per-hook, per-variant and per-SAE keys were among them
    assert any(re.fullmatch(r"sae_fvu\[int8\]\.\w+", k) for k in seen)
    assert any(k.startswith("quantize[int8].") for k in seen) and any(k.startswith("sae[") for k in seen)
    assert any(k.startswith("reliability.auroc_") for k in seen) and "robustness.clean_accuracy" in seen


def test_entries_are_complete() -> None:
    for key, t in glossary.TERMS.items():
        assert t.label and t.help.endswith("."), key
        assert t.kind in KINDS, (key, t.kind)
        assert t.better in glossary.BETTER or t.better.startswith("closer to "), (key, t.better)
        assert t.modalities and t.modalities <= glossary.ALL, key


@pytest.mark.parametrize(
    ("key", "label", "kind"),
    [
        ("alpha", "power-law α", "number"),
        ("sae_fvu[int8].mlp", "SAE FVU (int8, MLP output)", "number"),
        ("act_near_zero_frac.resid", "near-zero share (residual stream)", "percent"),
        ("cka_prev.attn", "CKA to previous (attention output)", "number"),
        ("quantize[nf4].kl_mean", "KL mean (nf4)", "number"),
        ("kl_mean", "KL mean", "number"),
        ("sae[blocks.1.hook_resid_post].fvu", "FVU", "number"),
        ("quantize[int8].sparsity", "pruned share (int8)", "percent"),
        ("metrics.alpha_mean", "mean α", "number"),
        ("reliability.auroc_energy_uniform-noise", "AUROC energy · uniform-noise", "number"),
        ("reliability.fpr95_msp_gaussian", "FPR95 msp · gaussian", "percent"),
        ("reliability.certified_sigma25_r50", "certified acc. σ=25% r=50%", "percent"),
        ("robustness.autoattack_Linf", "AutoAttack Linf", "percent"),
        ("report.bytes", "report size", "bytes"),
        ("drift.blocks.0.hook_mlp_out", "activation drift · blocks.0.hook_mlp_out", "number"),
        ("r=0.5", "certified acc. r ≥ 0.5", "percent"),
        ("fpr95_id_positive", "FPR95 (ID+)", "percent"),
        ("gate.rule", "rule", "text"),
    ],
)
def test_families_resolve(key: str, label: str, kind: str) -> None:
    t = glossary.lookup(key)
    assert t is not None and (t.label, t.kind) == (label, kind)


def test_long_labels_keep_the_sae_hook() -> None:
    assert glossary.long_label("sae[blocks.1.hook_resid_post].fvu") == "FVU (blocks.1.hook_resid_post)"
    assert glossary.long_label("quantize[int8].kl_mean") == "KL mean (int8)"
    assert glossary.long_label("metrics.alpha_mean") == "mean α" == glossary.label("metrics.alpha_mean")
    assert glossary.long_label("no_such_figure") == "no_such_figure"


def test_unknown_keys_are_none_and_modalities_apply() -> None:
    assert glossary.lookup("no_such_figure") is None and glossary.lookup("sae_fvu[int8].nowhere") is None
    assert glossary.label("no_such_figure") == "no_such_figure"
    ppl = glossary.lookup("quantize[int8].ppl_fp")
    assert ppl is not None and ppl.applies_to(glossary.CAUSAL_LM) and not ppl.applies_to(glossary.CLASSIFIER)
    assert glossary.modality(True, False, False) == glossary.CLASSIFIER
    assert glossary.modality(False, True, True) == glossary.CAUSAL_LM
    assert glossary.modality(False, False, False) == glossary.ENCODER


def test_report_headers_carry_labels_and_help() -> None:
    from microscope.report import _th

    t = glossary.lookup("spectral_norm")
    assert t is not None
    assert str(_th("spectral_norm")) == f'<th title="{t.help}">{t.label}</th>'
    assert str(_th("name", cls="l")).startswith('<th class="l" title="')
    assert str(_th("no_such_figure")) == '<th title="">no_such_figure</th>'


def test_a_finished_report_has_the_labelled_headers(finished_audits: dict) -> None:
    from pathlib import Path

    from microscope.report import _th

    html = Path(finished_audits["step1"]["report_uri"]).read_text()
    for key in ("spectral_norm", "alpha", "kl_mean", "fvu", "grad_norm"):
        assert str(_th(key)) in html, key


def _headers(html: str) -> list[tuple[str, str]]:
    """(title, label) of every table header of a report."""
    return re.findall(r'<th(?: class="l")?(?: title="([^"]*)")?>(.*?)</th>', html, flags=re.S)


def test_every_report_header_explains_itself(finished_audits: dict, finished_vision: dict) -> None:
    """Every column and row header of a finished report, a causal LM's and the digits CNN's (robustness,
    OOD, smoothing, corruptions, landscape, attributions), carries the glossary's help as its tooltip."""
    from pathlib import Path

    seen = set()
    for raw in (finished_audits["step1"], finished_vision):
        html = Path(raw["report_uri"]).read_text()
        headers = _headers(html)
        assert len(headers) == html.count("<th"), "a header the pattern did not read"
        untitled = sorted({label for title, label in headers if not title})
        assert not untitled, f"{raw['audit_id']}: headers without help: {untitled}"
        seen |= {label for _, label in headers}
    # the vision report reached the tables that had hand-written headers
    for label in ("AUROC", "FPR95 (ID+)", "abstained", "severity 5", "λmax", "IG completeness (max)", "Fisher %"):
        assert label in seen, label
    assert any(label.startswith("PGD ε=") for label in seen) and any(label.startswith("r = ") for label in seen)


def test_the_viewers_reliability_tables_are_in_the_glossary(finished_vision: dict) -> None:
    """The Reliability page shows these tables through `dashboard.columns.table`: each column has an entry."""
    store = open_store(finished_vision["store_uri"])
    rec = results.load_audit(store, finished_vision["audit_id"])
    tables = (results.ood_table(rec), results.smoothing_table(rec), results.corruption_table(rec))
    columns = {str(c) for t in tables for c in t.columns}
    assert {"auroc", "fpr95_ood_positive", "abstained", "severity"} <= columns
    assert not {c for c in columns if glossary.lookup(c) is None}
