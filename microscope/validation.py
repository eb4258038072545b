"""Dataset validation with great-expectations: non-empty, no null text, token lengths in bounds."""

from __future__ import annotations

import os

import numpy as np
from schemas.config import DatasetConfig
from schemas.records import ValidationCheck

from microscope.errors import InputError


def validate_documents(docs: list[str | None], n_tokens: np.ndarray, cfg: DatasetConfig) -> list[ValidationCheck]:
    """Run the expectation suite; return every check's result (the report shows them all)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = ctx.data_sources.add_pandas("microscope").add_dataframe_asset("documents")
    batch_def = batch_def.add_batch_definition_whole_dataframe("all")
    df = pd.DataFrame({"text": pd.Series(docs, dtype=object), "n_tokens": pd.Series(n_tokens, dtype="int64")})
    suite = ctx.suites.add(gx.ExpectationSuite(name="microscope-dataset"))
    suite.add_expectation(gx.expectations.ExpectTableRowCountToBeBetween(min_value=1))
    suite.add_expectation(gx.expectations.ExpectColumnValuesToNotBeNull(column="text"))
    suite.add_expectation(
        gx.expectations.ExpectColumnValuesToBeBetween(
            column="n_tokens", min_value=cfg.min_doc_tokens, max_value=cfg.max_doc_tokens
        )
    )
    result = batch_def.get_batch(batch_parameters={"dataframe": df}).validate(suite)
    checks = []
    for r in result.results:
        kind = r.expectation_config.type
        res = r.result or {}
        if kind == "expect_table_row_count_to_be_between":
            detail = f"{res.get('observed_value')} documents"
        else:
            bad = res.get("unexpected_count") or 0
            sample = [x for x in (res.get("partial_unexpected_list") or [])[:3]]
            detail = f"{bad} unexpected" + (f", e.g. {sample}" if bad else "")
        checks.append(ValidationCheck(expectation=kind, success=bool(r.success), detail=detail))
    return checks


def raise_on_failure(checks: list[ValidationCheck], source: str, cfg: DatasetConfig) -> None:
    for c in checks:
        if c.success:
            continue
        if c.expectation == "expect_table_row_count_to_be_between":
            raise InputError(f"dataset {source} is empty (no documents with text); give it at least one document")
        if c.expectation == "expect_column_values_to_not_be_null":
            raise InputError(
                f"dataset {source} has records without text ({c.detail}); drop them or fix dataset.text_field"
            )
        raise InputError(
            f"dataset {source} has documents outside [{cfg.min_doc_tokens}, {cfg.max_doc_tokens}] tokens "
            f"({c.detail}); clean them or widen dataset.min_doc_tokens/max_doc_tokens"
        )
