"""Numbers for people: one `fmt(value, kind)` shared by the viewer and the report.

Kinds (the glossary's `Term.kind`): `count` (integers; SI prefixes from 10 000: 1.2 M), `bytes` (binary:
KiB/MiB/GiB), `percent` (a fraction shown ×100: 0.347 → 34.7%), `ratio` and `number` (4 significant
digits), `seconds` (a human duration), `log10` (an exponent, 2 decimals), `text`, `flag`. Missing values
(None, NaN) are "—". Scientific notation only where a plain form would hide the value: below 1e-4 or from
1e6 up (counts and bytes take prefixes instead).
"""

from __future__ import annotations

import math
from typing import Any

KINDS = ("count", "bytes", "percent", "ratio", "number", "seconds", "log10", "text", "flag")
MISSING = "—"
_SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
_BINARY = ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))


def _number(value: Any) -> float | None:
    """`value` as a finite float, else None (None, NaN, ±inf handled by the caller, text)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v


def significant(v: float, digits: int = 4) -> str:
    """`v` rounded to `digits` significant digits in positional notation, trailing zeros dropped; integers
    keep all their digits (12 346, not 12 350) with thousands separators."""
    if v == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
    text = f"{v:,.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _scientific(v: float, digits: int = 3) -> str:
    mantissa, exponent = f"{v:.{digits - 1}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _plain(v: float, digits: int = 4) -> str:
    a = abs(v)
    if v == 0:
        return "0"
    if a < 1e-4 or a >= 1e6:
        return _scientific(v, digits - 1)
    if v.is_integer():
        return f"{int(v):,}"
    return significant(v, digits)


def _prefixed(v: float, units: tuple[tuple[float, str], ...], small_unit: str, threshold: float) -> str:
    """`v` scaled to the largest unit it reaches (3 significant digits), from `threshold` up; `units` are
    largest first. A value that rounds up to 1000 of one unit is said in the next (999 960 → 1 M)."""
    a = abs(v)
    if a >= threshold:
        ascending = units[::-1]
        i = max(j for j, (size, _) in enumerate(ascending) if a >= size or j == 0)
        text = significant(v / ascending[i][0], 3)
        if abs(float(text.replace(",", ""))) >= 1000 and i + 1 < len(ascending):
            i += 1
            text = significant(v / ascending[i][0], 3)
        return f"{text} {ascending[i][1]}"
    body = f"{int(v):,}" if v.is_integer() else significant(v, 3)
    return f"{body} {small_unit}" if small_unit else body


def _duration(v: float) -> str:
    if v < 0:
        return f"-{_duration(-v)}"
    if v < 1:
        return f"{significant(v * 1000, 3)} ms" if v >= 1e-3 else f"{significant(v * 1e6, 3)} µs"
    if v < 60:
        return f"{significant(v, 3)} s"
    if v < 3600:
        m, s = divmod(round(v), 60)
        return f"{m} min {s} s" if s else f"{m} min"
    h, rest = divmod(round(v), 3600)
    m = rest // 60
    return f"{h} h {m} min" if m else f"{h} h"


def fmt(value: Any, kind: str = "number") -> str:
    """`value` as a person reads it (see the module docstring for the kinds)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if kind == "flag" or isinstance(value, bool):
        return "yes" if value else "no"
    v = _number(value)
    if v is None or kind == "text":
        return str(value) if not isinstance(value, list | tuple) else "; ".join(map(str, value))
    if math.isnan(v):
        return MISSING
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if kind == "count":
        return _prefixed(v, _SI, "", 1e4)
    if kind == "bytes":
        return _prefixed(v, _BINARY, "B", 1024)
    if kind == "percent":
        p = 100 * v
        return f"{_plain(p, 3) if abs(p) >= 1e-4 or p == 0 else _scientific(p, 2)}%"
    if kind == "seconds":
        return _duration(v)
    if kind == "log10":
        return f"{v:.2f}"
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    return _plain(v)


def share(part: float | None, whole: float | None) -> str:
    """`part` as a percentage of `whole` (both in the same unit), "—" when either is missing or whole is 0."""
    p, w = _number(part), _number(whole)
    if p is None or w is None or not w or math.isnan(p) or math.isnan(w):
        return MISSING
    return fmt(p / w, "percent")
