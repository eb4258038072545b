"""`st.dataframe` column configs from the glossary (`microscope.glossary`): each known column gets its
label, its help text on hover and a number format that fits its kind; columns the glossary does not know
keep their key and Streamlit's own formatting."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import streamlit as st

from microscope import glossary

if TYPE_CHECKING:
    import pandas as pd

# Streamlit's formats per glossary kind (sprintf-js or a preset); the page's numbers stay numbers, so
# sorting works, and `microscope.formatting.fmt` is for text (metrics, captions).
FORMATS = {
    "count": "compact",
    "bytes": "bytes",
    "percent": "percent",
    "seconds": "duration",
    "log10": "%.2f",
    "number": "%.4g",
    "ratio": "%.4g",
}


def help_text(term: glossary.Term) -> str:
    better = f" Better: {term.better}." if term.better != "neither" else ""
    return f"{term.help}{better} (`{term.key}`)"


def column_config(df: pd.DataFrame) -> dict[str, Any]:
    """{column: st.column_config.*Column} for the columns of `df` the glossary knows."""
    import pandas as pd

    out: dict[str, Any] = {}
    for col in df.columns:
        term = glossary.lookup(str(col))
        if term is None:
            continue
        kw = {"label": term.label, "help": help_text(term)}
        if pd.api.types.is_bool_dtype(df[col]):
            out[col] = st.column_config.CheckboxColumn(**kw)
        elif pd.api.types.is_numeric_dtype(df[col]) and term.kind in FORMATS:
            out[col] = st.column_config.NumberColumn(**kw, format=FORMATS[term.kind])
        else:
            out[col] = st.column_config.TextColumn(**kw)
    return out


def table(df: Any, **kwargs: Any) -> Any:
    """`st.dataframe` with the glossary's labels, help and formats on the columns it knows (a caller's own
    `column_config` entries win)."""
    import pandas as pd

    frame = df if isinstance(df, pd.DataFrame) else pd.DataFrame(df)
    own = kwargs.pop("column_config", None) or {}
    return st.dataframe(frame, column_config={**column_config(frame), **own}, **kwargs)
