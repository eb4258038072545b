"""Gate rules before any audit: read from a file, a name under examples/ or inline, strictly, and their metric
paths checked as far as they can be without an audit (the namespace; for `layers.` that some layer-table
column could match), so a typo is refused before the audit runs, not after. `microscope.gates` judges them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from schemas.config import EXAMPLES, ConfigError, read_yaml
from schemas.gates import GateRules

from microscope import results
from microscope.errors import GateError

NAMESPACES = ("layers", "metrics", "quantize", "sae", "robustness", "reliability", "landscape", "attribution")


def load_rules(source: str | Path | dict[str, Any] | list[Any]) -> tuple[GateRules, str]:
    """Rules from a YAML file, a name under examples/ (`gates` → examples/gates.yaml), or an inline mapping
    ({baseline, rules}) or list of rules; and a label saying where they came from."""
    from pydantic import ValidationError

    if isinstance(source, dict | list):
        data, label = source, "the inline gate rules"
    else:
        path = Path(source)
        if not path.is_file() and "/" not in str(source) and (EXAMPLES / f"{source}.yaml").is_file():
            path = EXAMPLES / f"{source}.yaml"
        if not path.is_file():
            raise GateError(f"gate rules {source} not found; pass a YAML file or a name under examples/ (gates)")
        label = str(path)
        try:
            data = read_yaml(path)  # strictly: a key given twice, an alias or a huge file is refused
        except ConfigError as exc:
            raise GateError(str(exc)) from None
    if isinstance(data, list):
        data = {"rules": data}
    if not isinstance(data, dict):
        raise GateError(f"{label} must be a mapping with `rules:` (and optionally `baseline:`)")
    try:
        rules = GateRules.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise GateError(f"{label}: {where}: {msg}") from None
    for i, rule in enumerate(rules.rules):
        check_path(rule.metric, f"{label}: rules.{i}.metric")
    return rules, label


def check_path(path: str, where: str) -> None:
    """What can be known of a metric path before any audit: its namespace, and for `layers.` that some
    layer-table column could match (a typo is refused before the audit runs, not after)."""
    ns, rest, _ = split_path(path)
    if ns not in NAMESPACES:
        raise GateError(f"{where}: unknown namespace {ns!r} in {path!r}; use one of {', '.join(NAMESPACES)}")
    if ns != "layers":
        return  # their figure names depend on the stage's configuration: checked against the audit
    parts = rest.split(".")
    if len(parts) > 2 and PER_BLOCK.search("." + ".".join(parts[-2:])):
        return
    rx = column_glob(parts[-1])
    if len(parts) < 2 or not any(rx.match(c) for c in LAYER_COLUMNS):
        raise GateError(
            f"{where}: {path!r} names no layer-table column; write layers.<matrix glob>.<column> with a column "
            f"from {', '.join(LAYER_COLUMNS)}, or a per-block one such as act_norm.resid or quant_cosine[int8].mlp"
        )


def split_path(path: str) -> tuple[str, str, float | None]:
    base, _, eps = path.partition("@eps=")
    ns, _, rest = base.partition(".")
    return ns, rest, float(eps) if eps else None


def column_glob(pattern: str) -> re.Pattern[str]:
    """A column glob: only `*` is a wildcard (column names hold brackets: quant_cosine[int8].resid)."""
    return re.compile(".*".join(re.escape(p) for p in pattern.split("*")) + r"\Z")


PER_BLOCK = re.compile(
    r"\.(act_\w+|quant_\w+\[[^\]]+\]|sae_\w+(?:\[[^\]]+\])?|cka_(?:prev|next)|cka\[[^\]]+\]|attack_shift(?:\[[^\]]+\])?)"
    r"\.(resid|mlp|attn|\*)$"
)
# Every per-matrix column a layer table can hold (per-block columns follow PER_BLOCK); a test holds a real
# audit's table to it, so a new column cannot be missed here.
LAYER_COLUMNS = (*results.WEIGHT_COLUMNS, *results.SENSITIVITY_COLUMNS, "effective_rank_share", "condition_z")
