"""Regression gates: the rules a checkpoint is judged by (`gates.yaml`) and the verdict a judgement makes.

A rule names a metric path (see `microscope.gates` for the paths), how to aggregate the values a wildcard
path yields, a check, and a severity:

    - metric: layers.*.spectral_norm     # every weight matrix's spectral norm
      aggregate: any                     # fail when any matrix breaks the check (naming it)
      check: ratio <= 1.5                # against the same matrix in the baseline audit
      severity: fail

Checks: `<= 0.2`, `< 0.2`, `>= 0.9`, `> 0`, `== 0`, `in [2, 6]`, `not in [0, 1]` compare the value itself;
`delta <op> x` compares value − baseline value, `ratio <op> x` value / baseline value (relative checks need
a baseline; without one the rule is `skipped` with the reason, never a pass).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Severity = Literal["fail", "warn"]
Aggregate = Literal["max", "min", "mean", "any", "all"]
Outcome = Literal["pass", "warn", "fail", "skipped"]
Verdict = Literal["pass", "warn", "fail"]
Op = Literal["<=", "<", ">=", ">", "==", "in", "not in"]
Kind = Literal["value", "delta", "ratio"]

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_CHECK = re.compile(
    rf"^\s*(?:(?P<kind>value|delta|ratio)\s*)?(?:(?P<op><=|>=|<|>|==)\s*(?P<x>{_NUMBER})"
    rf"|(?P<inop>not\s+in|in)\s*\[\s*(?P<lo>{_NUMBER})\s*,\s*(?P<hi>{_NUMBER})\s*\])\s*$"
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Check(_Model):
    """A parsed check: compare `kind` (the value, or its delta/ratio to the baseline) with `bound`."""

    kind: Kind
    op: Op
    bound: tuple[float, float] | float

    @classmethod
    def parse(cls, text: str) -> Check:
        m = _CHECK.match(text)
        if m is None:
            raise ValueError(
                f"check {text!r} is not understood; write e.g. '<= 0.2', 'in [2, 6]', 'delta >= -0.05' or "
                "'ratio <= 1.5'"
            )
        kind = m["kind"] or "value"
        if m["op"]:
            return cls(kind=kind, op=m["op"], bound=float(m["x"]))
        lo, hi = float(m["lo"]), float(m["hi"])
        if lo > hi:
            raise ValueError(f"check {text!r}: the interval's low end {lo:g} is above its high end {hi:g}")
        return cls(kind=kind, op="not in" if m["inop"].startswith("not") else "in", bound=(lo, hi))

    @property
    def relative(self) -> bool:
        return self.kind != "value"

    def holds(self, v: float) -> bool:
        if isinstance(self.bound, tuple):
            inside = self.bound[0] <= v <= self.bound[1]
            return inside if self.op == "in" else not inside
        b = self.bound
        return {"<=": v <= b, "<": v < b, ">=": v >= b, ">": v > b, "==": v == b}[self.op]

    def excess(self, v: float) -> float:
        """How far `v` is past the bound (≤ 0 when the check holds): orders offenders, worst first."""
        if isinstance(self.bound, tuple):
            lo, hi = self.bound
            outside = max(lo - v, v - hi)
            return outside if self.op == "in" else min(v - lo, hi - v)
        return {"<=": v - self.bound, "<": v - self.bound, ">=": self.bound - v, ">": self.bound - v}.get(
            self.op, abs(v - self.bound)
        )


class Rule(_Model):
    name: str | None = Field(None, description="A short name (default: metric and check); the MLflow metric key.")
    metric: str = Field(description="A metric path: layers.*.alpha, sae.*.fvu, quantize.nf4.kl_mean, ...")
    check: str = Field(description="'<= 0.2', 'in [2, 6]', 'delta >= -0.05', 'ratio <= 1.5', ...")
    aggregate: Aggregate = Field(
        "any",
        description="Over a wildcard's values: any (fails when any breaks the check, naming them), all, "
        "or the max/min/mean value checked once.",
    )
    severity: Severity = Field("fail", description="fail: the checkpoint fails; warn: it passes with a warning.")
    why: str | None = Field(None, description="What a breach means, for the alert's reader.")

    @field_validator("check")
    @classmethod
    def _parses(cls, v: str) -> str:
        Check.parse(v)
        return v

    @field_validator("metric")
    @classmethod
    def _path(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_]+(\.[^.\s]+)+(@eps=" + _NUMBER + ")?", v.strip()):
            raise ValueError(f"metric {v!r} is not a dotted path such as layers.*.alpha or sae.*.fvu")
        return v.strip()

    @property
    def parsed(self) -> Check:
        return Check.parse(self.check)

    @property
    def label(self) -> str:
        return self.name or f"{self.metric} {self.check}"


class GateRules(_Model):
    """A `gates.yaml`: the baseline to judge against and the rules."""

    baseline: str = Field(
        "previous",
        description="previous (the run's audit at the highest lower step), first, none, an audit id, or "
        "tag:KEY[=VALUE] (the latest audit of the run carrying that tag).",
    )
    warmup_steps: int = Field(
        0,
        ge=0,
        description="Checkpoints of a run below this step are warm-up: early training moves weights by large "
        "factors, so there a relative rule that breaks warns instead of failing (its reason says so).",
    )
    rules: list[Rule] = Field(min_length=1)


class Offender(_Model):
    key: str = Field(description="The element that broke the check: a matrix, a hook, a variant.")
    value: float | None
    baseline_value: float | None = None
    compared: float | None = Field(None, description="What the check compared: the value, delta or ratio.")


class RuleResult(_Model):
    rule: str
    metric: str
    check: str
    aggregate: Aggregate
    severity: Severity
    outcome: Outcome
    value: float | None = Field(None, description="The aggregated value (for any/all: the worst element's).")
    baseline_value: float | None = None
    compared: float | None = Field(None, description="What the check compared (value, delta or ratio).")
    elements: int = Field(0, description="How many values the path yielded.")
    offenders: list[Offender] = Field(default_factory=list, description="Worst first (at most 20).")
    reason: str | None = Field(None, description="Why the rule was skipped, or a note on its outcome.")


class GateVerdict(_Model):
    audit_id: str
    run_id: str | None = None
    step: int | None = None
    verdict: Verdict
    baseline_spec: str
    baseline_audit_id: str | None = None
    baseline_step: int | None = None
    baseline_reason: str | None = Field(None, description="Why there is no baseline (relative rules skipped).")
    baseline_waited_s: float | None = Field(
        None, description="How long the gate waited for an audit of a lower step still in progress (None: no wait)."
    )
    baseline_waited_for: str | None = Field(
        None, description="The audit in progress it waited for: the baseline if it ended in time, else in the reason."
    )
    rules_source: str
    rules_digest: str
    results: list[RuleResult]
    judged_at: datetime

    @property
    def failed(self) -> list[RuleResult]:
        return [r for r in self.results if r.outcome == "fail"]

    @property
    def warned(self) -> list[RuleResult]:
        return [r for r in self.results if r.outcome == "warn"]

    def waited(self) -> str:
        """`waited 12.3 s for audit X to finish`, or '' when the gate did not wait."""
        if self.baseline_waited_for is None:
            return ""
        return f"waited {self.baseline_waited_s or 0:.1f} s for audit {self.baseline_waited_for} to finish"

    def summary(self) -> str:
        """One line: the verdict and what broke."""
        broke = self.failed or self.warned
        what = "; ".join(
            f"{r.rule}" + (f" ({', '.join(o.key for o in r.offenders[:3])})" if r.offenders else "") for r in broke[:3]
        )
        if self.baseline_audit_id:
            base = f"vs {self.baseline_audit_id}" + (f" ({self.waited()})" if self.baseline_waited_for else "")
        else:  # a wait given up is in the reason
            base = f"no baseline ({self.baseline_reason})"
        return f"gate {self.verdict} for audit {self.audit_id} {base}" + (f": {what}" if what else "")
