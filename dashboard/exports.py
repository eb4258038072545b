"""A table's downloads: the exact bytes the Layers page offers (and the tests compare against)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

FORMATS = {  # name -> (file extension, MIME type)
    "CSV": ("csv", "text/csv"),
    "Parquet": ("parquet", "application/vnd.apache.parquet"),
    "JSON": ("json", "application/json"),
}


def table_bytes(df: pd.DataFrame, fmt: str) -> bytes:
    """`df` as CSV (`to_csv(index=False)`), Parquet (pyarrow, no index) or JSON (`orient="records"`)."""
    if fmt == "CSV":
        return df.to_csv(index=False).encode()
    if fmt == "Parquet":
        buf = io.BytesIO()
        df.to_parquet(buf, index=False, engine="pyarrow")
        return buf.getvalue()
    if fmt == "JSON":
        return df.to_json(orient="records", double_precision=15).encode()
    raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
