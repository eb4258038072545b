"""`microscope.formatting.fmt` against hand-written strings: what a person should read for each value."""

from __future__ import annotations

import math

import numpy as np
import pytest

from microscope.formatting import KINDS, fmt, share, significant

CASES = [
    # counts: integers as integers, SI prefixes from 10 000
    (0, "count", "0"),
    (7, "count", "7"),
    (1234, "count", "1,234"),
    (9999, "count", "9,999"),
    (12345, "count", "12.3 k"),
    (124_439, "count", "124 k"),
    (1_200_000, "count", "1.2 M"),
    (999_960, "count", "1 M"),  # rounds up into the next prefix, never "1000 k"
    (7_000_000_000, "count", "7 G"),
    (-20_000, "count", "-20 k"),
    (7.53, "count", "7.53"),  # a mean count (L0) keeps its fraction
    (np.int64(52), "count", "52"),
    # bytes: binary units
    (512, "bytes", "512 B"),
    (1024, "bytes", "1 KiB"),
    (1536, "bytes", "1.5 KiB"),
    (36_400_000, "bytes", "34.7 MiB"),
    (1_048_575, "bytes", "1 MiB"),
    (3 * 2**30, "bytes", "3 GiB"),
    (5.5 * 2**40, "bytes", "5.5 TiB"),
    # percentages of a fraction
    (0.347, "percent", "34.7%"),
    (1.0, "percent", "100%"),
    (0.0, "percent", "0%"),
    (0.98765, "percent", "98.8%"),
    (0.001, "percent", "0.1%"),
    (0.0000012, "percent", "0.00012%"),
    # plain numbers: 4 significant digits, no scientific notation between 1e-4 and 1e6
    (0.123456, "number", "0.1235"),
    (0.00123456, "number", "0.001235"),
    (0.0001, "number", "0.0001"),
    (0.000012, "number", "1.2e-5"),
    (123.456, "number", "123.5"),
    (12345.6, "number", "12,346"),
    (2_271_320.5, "number", "2.27e6"),
    (52.0, "number", "52"),
    (-0.5, "number", "-0.5"),
    (np.float32(3.0), "ratio", "3"),
    (0, "number", "0"),
    # durations
    (0.0123, "seconds", "12.3 ms"),
    (4.56, "seconds", "4.56 s"),
    (75, "seconds", "1 min 15 s"),
    (120, "seconds", "2 min"),
    (3700, "seconds", "1 h 1 min"),
    # the rest
    (-3.14159, "log10", "-3.14"),
    (True, "flag", "yes"),
    ("mlp.c_fc", "text", "mlp.c_fc"),
    (["alpha", "effective_rank"], "text", "alpha; effective_rank"),
    (math.inf, "number", "∞"),
]


@pytest.mark.parametrize(("value", "kind", "expected"), CASES)
def test_fmt(value: object, kind: str, expected: str) -> None:
    assert fmt(value, kind) == expected


@pytest.mark.parametrize("kind", KINDS)
def test_missing_is_a_dash(kind: str) -> None:
    assert fmt(None, kind) == "—" and fmt(float("nan"), kind) == "—" and fmt(np.nan, kind) == "—"


def test_share_and_significant() -> None:
    assert share(36_400_000, 104_857_600) == "34.7%"  # 34.714…%
    assert share(1, 0) == "—" and share(None, 5) == "—"
    assert significant(0.000999949, 4) == "0.0009999" and significant(9.99996, 4) == "10"


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        fmt(1.0, "furlongs")
