"""The report is one self-contained file and shows what the records hold."""

from __future__ import annotations

import re

from microscope.models.loading import describe
from microscope.plots import line_chart
from microscope.report import render
from schemas.records import DatasetSummary, StageRecord, StageStatus, ValidationCheck
from tests.conftest import build_model


def records() -> dict[str, StageRecord]:
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
    return {
        "ingest": StageRecord(
            stage="ingest",
            status=StageStatus.completed,
            details={"model_digest": "ab" * 32, "dataset_digest": "cd" * 32},
        ),
        "trace": StageRecord(
            stage="trace",
            status=StageStatus.cached,
            metrics={"tokens": 1024.0},
            details={"datasets": datasets, "prefix": "ab/trace/x"},
        ),
    }


def test_report_is_self_contained_and_complete() -> None:
    arch = describe(build_model("gpt2"))
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
    html = render(records(), arch, data, title="<script>alert(1)</script>")
    assert "<script" not in html  # the title is escaped and nothing is loaded or run
    assert not re.search(r'(src|href)="https?://', html)
    assert "&lt;script&gt;" in html
    assert html.count("<svg") == 3  # mean, max, near-zero charts
    assert html.count('<td class="l">resid</td>') == 3 and html.count('<td class="l">mlp</td>') == 3
    assert "GPT2LMHeadModel" in html and "transformer.h.2.mlp" in html
    assert "expect_table_row_count_to_be_between" in html


def test_report_renders_with_only_ingest() -> None:
    html = render({"ingest": records()["ingest"]}, None, None)
    assert "Activations per layer" not in html and "ingest" in html


def test_line_chart_scales_points_into_the_plot() -> None:
    svg = line_chart({"a": [(0, 0.0), (1, 10.0)]}, "t", "x", "y", width=200, height=100)
    cys = [float(v) for v in re.findall(r'cy="([0-9.]+)"', svg)]
    assert max(cys) <= 100 - 40 + 0.01 and min(cys) >= 40 - 0.01  # within top/bottom margins
    assert line_chart({}, "t", "x", "y") == ""
