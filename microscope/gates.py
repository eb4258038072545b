"""Judging a finished audit against its rules and a baseline audit (`schemas.gates`): reads records and
the joined layer table through `microscope.results`, never recomputes a stage.

Metric paths (a `*` or any glob matches several elements; each element is judged, or aggregated):

    layers.<matrix glob>.<column>        a column of the joined layer table (`results.layer_table`), per
                                         weight matrix: layers.*.spectral_norm, layers.*attn*.alpha,
                                         layers.*.sae_fvu.resid, layers.*.quant_cosine[int8].resid
    metrics.<figure>                     the metrics stage's summary: metrics.alpha_mean, metrics.flagged
    quantize.<variant glob>.<figure>     a variant's fidelity: quantize.nf4.kl_mean, quantize.*.delta_ppl
    sae.<hook glob>.<figure>             an SAE's figures: sae.*.fvu, sae.*.dead_frac
    robustness.<variant glob>.<figure>   fp or a variant: robustness.fp.autoattack_Linf, robustness.*.pgd_min
    robustness.<variant>.<attack>@eps=x  an attack's accuracy at a swept ε (pgd | fgsm | noise;
                                         robust_accuracy = pgd): robustness.fp.robust_accuracy@eps=0.01
    reliability.<variant glob>.<figure>  fp or a variant: reliability.fp.ece, reliability.*.auroc_msp_uniform-noise,
                                         reliability.fp.mean_corruption_accuracy
    landscape.<variant glob>.<figure>    fp or a variant: landscape.fp.lambda_max, landscape.fp.rho_sharpness
    attribution.<variant glob>.<figure>  fp or a variant: attribution.fp.randomisation_spearman,
                                         attribution.fp.completeness_max_rel

A path whose namespace or figure does not exist is an error listing the valid ones; a path whose stage did
not run in this audit is `skipped` with the reason (so is a relative rule without a baseline). Which audit is
the baseline, and waiting for one still in progress, is `microscope.gate_baselines`.
"""

from __future__ import annotations

import fnmatch
import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

from schemas.config import canonical_hash
from schemas.gates import Check, GateRules, GateVerdict, Offender, Rule, RuleResult
from schemas.records import AuditRecord, StageRecord, StageStatus

from microscope import results
from microscope.errors import GateError
from microscope.gate_baselines import Baseline, resolve_baseline
from microscope.gate_rules import NAMESPACES, PER_BLOCK, column_glob, split_path
from microscope.gate_rules import check_path as check_path
from microscope.gate_rules import load_rules as load_rules
from microscope.store import ArtifactStore

if TYPE_CHECKING:
    import pandas as pd

EPS_FIGURES = {"pgd": "pgd", "fgsm": "fgsm", "noise": "noise", "robust_accuracy": "pgd"}
MAX_OFFENDERS = 20
IDENTITY = ("name", "layer", "role", "rows", "cols", "spectrum", "anomaly", "anomalies", "anomaly_reasons")


class Skip(Exception):  # a control-flow signal, not an error: the rule is skipped
    """The path is valid but this audit has nothing there (its stage did not run)."""


# ---- metric paths -----------------------------------------------------------------------------


class _Sources:
    """What paths read from one record, loaded once (the layer table is the expensive part)."""

    def __init__(self, store: ArtifactStore, record: AuditRecord):
        self.store, self.record = store, record
        self._table: pd.DataFrame | None = None

    @property
    def table(self) -> pd.DataFrame:
        if self._table is None:
            self._table = results.layer_table(self.store, self.record)
        return self._table

    def layer_columns(self) -> list[str]:
        return [c for c in self.table.columns if c not in IDENTITY]


def _finished(record: AuditRecord, stage: str) -> None:
    if (why := results.why_missing(record, stage)) is not None:
        raise Skip(why)


def _figure_map(record: AuditRecord, ns: str) -> dict[str, dict[str, float]]:
    """Element -> its figures, for the record-level namespaces."""
    if ns == "metrics":
        _finished(record, "metrics")
        return {"metrics": dict(record.stages["metrics"].metrics)}
    if ns == "quantize":
        _finished(record, "quantize")
        return {v: dict(r["quantize"].metrics) for v, r in record.variants.items() if "quantize" in r}
    if ns == "sae":
        _finished(record, "sae")
        return {h: dict(r.metrics) for h, r in record.saes.items() if r.status != StageStatus.failed}
    _finished(record, ns)  # robustness, reliability, landscape, attribution: fp and each variant
    recs = {"fp": record.stages[ns]} | {v: r[ns] for v, r in record.variants.items() if ns in r}
    return {v: dict(r.metrics) for v, r in recs.items()}


def elements(src: _Sources, path: str) -> dict[str, float]:
    """Element key -> value (NaN where undefined) for a metric path; `Skip` when its stage did not run,
    `GateError` (listing the valid paths) when the path cannot exist."""
    ns, rest, eps = split_path(path)
    rec = src.record
    if ns not in NAMESPACES:
        raise GateError(f"unknown metric namespace {ns!r} in {path!r}; {valid_paths(src)}")
    if ns == "layers":
        return _layer_elements(src, rest, path)
    # metrics.<figure>; the others <element glob>.<figure> (an element, e.g. an SAE's hook, may hold dots)
    pattern, figure = ("metrics", rest) if ns == "metrics" else rest.rpartition(".")[::2]
    if ns == "robustness" and eps is not None:
        return _at_eps(src, pattern, figure, eps, path)
    figures = _figure_map(rec, ns)
    matched = {k: f for k, f in figures.items() if fnmatch.fnmatchcase(k, pattern)}
    if not matched:
        raise GateError(f"{pattern!r} matches no {ns} element of audit {rec.audit_id} ({', '.join(figures)}); "
                        f"{valid_paths(src)}")  # fmt: skip
    known = set().union(*(f.keys() for f in matched.values())) | _undefined_names(rec, ns)
    if figure not in known:
        raise GateError(f"{ns} has no figure {figure!r} ({', '.join(sorted(known))}); {valid_paths(src)}")
    return {k: _float(f.get(figure)) for k, f in matched.items()}


def _layer_elements(src: _Sources, rest: str, path: str) -> dict[str, float]:
    """`<matrix glob>.<column glob>`: a column name holds at most one dot (`sae_fvu.resid`), so the column
    part is the last two segments when they match a column, else the last one. With several matching
    columns each element is `matrix:column`."""
    parts = rest.split(".")
    # a per-block column is `<figure>.<hook>` (act_…, quant_…[v], sae_…, cka…, attack_…): two segments
    k = 2 if len(parts) > 2 and PER_BLOCK.search("." + ".".join(parts[-2:])) else 1
    rx = column_glob(".".join(parts[-k:]))
    matched = [c for c in src.layer_columns() if rx.match(c)] if len(parts) > k else []
    matrix_glob = ".".join(parts[:-k])
    if not matched:
        _absent_column(src, rest, path)
    t = src.table
    picked = t[[fnmatch.fnmatchcase(n, matrix_glob) for n in t["name"]]]
    if picked.empty:
        raise GateError(
            f"{matrix_glob!r} matches no weight matrix of audit {src.record.audit_id} (e.g. {t['name'].iloc[0]})"
        )
    if len(matched) == 1:
        return {str(n): _float(v) for n, v in zip(picked["name"], picked[matched[0]], strict=True)}
    return {f"{n}:{c}": _float(v) for c in matched for n, v in zip(picked["name"], picked[c], strict=True)}


_STAGE_OF = {"act_": "trace", "quant_": "quantize", "sae_": "sae", "cka": "metrics.cka", "attack_": "robustness"}


def _absent_column(src: _Sources, rest: str, path: str) -> NoReturn:
    """A layer column this audit lacks: `Skip` when a stage that did not run would have made it (saying
    why), else `GateError` listing the columns there are."""
    missing = src.table.attrs.get("missing", {})
    # the weight columns, those the layer table derives from them, and the sensitivity ones: metrics makes them
    for c in (*results.WEIGHT_COLUMNS, "effective_rank_share", "condition_z", *results.SENSITIVITY_COLUMNS):
        if rest.endswith("." + c):
            raise Skip(missing.get("metrics") or missing.get("metrics.sensitivity") or f"no {c} in this audit")
    m = PER_BLOCK.search(rest)
    if m:
        stage = next(v for k, v in _STAGE_OF.items() if m[1].startswith(k))
        raise Skip(missing.get(stage) or f"audit {src.record.audit_id} has no {m[1]} at its {m[2]} hooks")
    raise GateError(f"no layer-table column ends {path!r}; {valid_paths(src)}")


def _undefined_names(rec: AuditRecord, ns: str) -> set[str]:
    """Figures a stage recorded as undefined (absent from its metrics, but valid names)."""
    if ns == "metrics":
        return set(rec.stages["metrics"].undefined) if "metrics" in rec.stages else set()
    if ns == "sae":
        return {k for r in rec.saes.values() for k in r.undefined}
    out = {k for r in rec.variants.values() if ns in r for k in r[ns].undefined}
    return out | (set(rec.stages[ns].undefined) if ns != "quantize" and ns in rec.stages else set())


def _at_eps(src: _Sources, pattern: str, figure: str, eps: float, path: str) -> dict[str, float]:
    if figure not in EPS_FIGURES:
        raise GateError(f"{path!r}: at an ε the figure is one of {', '.join(EPS_FIGURES)}")
    curves = results.robustness_curves(src.record)
    if curves.empty:
        raise Skip(next(iter(curves.attrs["missing"].values()), "robustness did not run"))
    out = {}
    for variant, g in curves[curves["attack"] == EPS_FIGURES[figure]].groupby("variant"):
        if not fnmatch.fnmatchcase(str(variant), pattern):
            continue
        hit = g[(g["eps"] - eps).abs() <= 1e-9 * max(1.0, abs(eps))]
        if hit.empty:
            swept = ", ".join(f"{e:g}" for e in g["eps"])
            raise GateError(f"{path!r}: ε={eps:g} was not swept (robustness.sweep: {swept})")
        out[str(variant)] = float(hit["accuracy"].iloc[0])
    if not out:
        raise GateError(f"{pattern!r} matches no robustness variant of audit {src.record.audit_id}")
    return out


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def valid_paths(src: _Sources) -> str:
    """The metric paths this audit offers, for an error message."""
    rec = src.record
    parts = []
    cols = src.layer_columns()
    if cols:
        parts.append(f"layers.*.{{{','.join(cols[:12])}{',...' if len(cols) > 12 else ''}}}")
    for ns in ("metrics", "quantize", "sae", "robustness", "reliability", "landscape", "attribution"):
        try:
            figs = _figure_map(rec, ns)
        except Skip:
            continue
        names = sorted(set().union(*(f.keys() for f in figs.values())) | _undefined_names(rec, ns)) if figs else []
        if not names:
            continue
        where = "" if ns == "metrics" else "{" + ",".join(figs) + "}."
        parts.append(f"{ns}.{where}{{{','.join(names)}}}")
    if "robustness" in rec.stages and rec.stages["robustness"].details.get("curves"):
        parts.append("robustness.fp.robust_accuracy@eps=<a swept ε>")
    return "valid paths here: " + ("; ".join(parts) if parts else "none (no stage produced figures)")


# ---- judging ----------------------------------------------------------------------------------


def _compare(check: Check, value: float, base: float | None) -> float | None:
    if check.kind == "value":
        return value
    if base is None or not math.isfinite(base):
        return None
    if check.kind == "delta":
        return value - base
    return value / base if base != 0 else None


def judge_rule(rule: Rule, src: _Sources, base: _Sources | None, base_reason: str | None) -> RuleResult:
    check = rule.parsed
    head = {
        "rule": rule.label,
        "metric": rule.metric,
        "check": rule.check,
        "aggregate": rule.aggregate,
        "severity": rule.severity,
    }
    try:
        now = elements(src, rule.metric)
    except Skip as s:
        return RuleResult(**head, outcome="skipped", reason=str(s))
    if check.relative and base is None:
        return RuleResult(
            **head, outcome="skipped", elements=len(now), reason=f"relative check without a baseline: {base_reason}"
        )
    then: dict[str, float] = {}
    if base is not None:
        try:
            then = elements(base, rule.metric)
        except Skip as s:
            if check.relative:
                return RuleResult(**head, outcome="skipped", elements=len(now), reason=f"the baseline lacks it: {s}")
        except GateError as e:
            if check.relative:
                return RuleResult(**head, outcome="skipped", elements=len(now), reason=f"the baseline lacks it: {e}")
    rows = []
    undefined = unmatched = 0
    for key, v in now.items():
        b = then.get(key)
        if not math.isfinite(v):
            undefined += 1
            continue
        c = _compare(check, v, b)
        if c is None:
            unmatched += 1
            continue
        rows.append(Offender(key=key, value=v, baseline_value=b, compared=c))
    notes = []
    if undefined:
        notes.append(f"{undefined} of {len(now)} value(s) undefined in this audit")
    if unmatched:
        notes.append(f"{unmatched} element(s) without a usable baseline value")
    if not rows:
        return RuleResult(**head, outcome="skipped", elements=len(now), reason="; ".join(notes) or "no value")
    worst_first = sorted(rows, key=lambda o: -check.excess(o.compared))
    bad = [o for o in worst_first if not check.holds(o.compared)]
    if rule.aggregate in ("any", "all"):
        breached = bool(bad) if rule.aggregate == "any" else len(bad) == len(rows)
        shown = worst_first[0]
        value, base_value, compared, offenders = shown.value, shown.baseline_value, shown.compared, bad
    else:
        import numpy as np

        cs = np.array([o.compared for o in rows])
        vs = np.array([o.value for o in rows])
        pick = {"max": int(cs.argmax()), "min": int(cs.argmin())}.get(rule.aggregate)
        compared = float({"max": cs.max(), "min": cs.min(), "mean": cs.mean()}[rule.aggregate])
        value = float(vs[pick]) if pick is not None else float(vs.mean())
        bvs = [o.baseline_value for o in rows if o.baseline_value is not None]
        base_value = rows[pick].baseline_value if pick is not None else (float(np.mean(bvs)) if bvs else None)
        breached = not check.holds(compared)
        offenders = [rows[pick]] if breached and pick is not None else []
    outcome = rule.severity if breached else "pass"
    return RuleResult(
        **head,
        outcome=outcome,
        value=value,
        baseline_value=base_value,
        compared=compared,
        elements=len(now),
        offenders=offenders[:MAX_OFFENDERS],
        reason="; ".join(notes) or None,
    )


def _warm_up(r: RuleResult, step: int, warmup: int) -> RuleResult:
    """A relative rule broken during warm-up warns (the step-to-step change there is the training itself)."""
    if r.outcome != "fail" or not Check.parse(r.check).relative:
        return r
    why = f"warm-up (step {step} < warmup_steps {warmup}): would fail"
    return r.model_copy(update={"outcome": "warn", "reason": f"{why}; {r.reason}" if r.reason else why})


def judge(
    store: ArtifactStore,
    record: AuditRecord,
    rules: GateRules,
    *,
    baseline: str | None = None,
    source: str = "",
    wait_s: float = 0.0,
) -> GateVerdict:
    """The verdict on `record`: every rule's outcome against the baseline (`baseline` overrides the rules'
    own; an audit of a lower step still in progress that would be it is waited for, up to `wait_s`).
    fail if any fail-severity rule broke, else warn if any warn-severity rule did, else pass."""
    spec = baseline or rules.baseline
    b: Baseline = resolve_baseline(store, record, spec, wait_s=wait_s)
    base_rec = b.record
    src = _Sources(store, record)
    base = _Sources(store, base_rec) if base_rec is not None else None
    outcomes = [judge_rule(r, src, base, b.reason) for r in rules.rules]
    if record.step is not None and record.step < rules.warmup_steps:
        outcomes = [_warm_up(r, record.step, rules.warmup_steps) for r in outcomes]
    names = [r.rule for r in outcomes]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise GateError(f"two rules are named {dup!r}; give each a distinct name:")
    verdict = (
        "fail"
        if any(r.outcome == "fail" for r in outcomes)
        else "warn"
        if any(r.outcome == "warn" for r in outcomes)
        else "pass"
    )
    return GateVerdict(
        audit_id=record.audit_id,
        run_id=record.run_id,
        step=record.step,
        verdict=verdict,
        baseline_spec=spec,
        baseline_audit_id=base_rec.audit_id if base_rec else None,
        baseline_step=base_rec.step if base_rec else None,
        baseline_reason=b.reason,
        baseline_waited_s=b.waited_s,
        baseline_waited_for=b.waited_for,
        rules_source=source,
        rules_digest=canonical_hash(rules.model_dump(mode="json")),
        results=outcomes,
        judged_at=datetime.now(UTC),
    )


EXIT = {"pass": 0, "warn": 0, "fail": 1}


def markdown(v: GateVerdict) -> str:
    """The verdict as Markdown: a Prefect artifact, the report's and the viewer's gate section."""
    icon = {"pass": "✅", "warn": "⚠️", "fail": "❌", "skipped": "➖"}
    base = (
        f"audit `{v.baseline_audit_id}` (step {v.baseline_step})"
        if v.baseline_audit_id
        else f"none: {v.baseline_reason}"
    )
    lines = [
        f"## Gate: {icon[v.verdict]} {v.verdict.upper()}",
        "",
        f"Audit `{v.audit_id}`"
        + (f", run `{v.run_id}` step {v.step}" if v.run_id else "")
        + f"; baseline ({v.baseline_spec}): {base}"
        + (f", {v.waited()}." if v.baseline_waited_for and v.baseline_audit_id else "."),
        "",
        "| rule | outcome | value | baseline | compared | offenders |",
        "|---|---|---|---|---|---|",
    ]
    for r in v.results:
        offenders = ", ".join(f"`{o.key}`" for o in r.offenders[:5]) + (" …" if len(r.offenders) > 5 else "")
        lines.append(
            f"| {r.rule} | {icon[r.outcome]} {r.outcome} | {_g(r.value)} | {_g(r.baseline_value)} | {_g(r.compared)} "
            f"| {offenders or (r.reason or '')} |"
        )
    return "\n".join(lines) + "\n"


def _g(v: float | None) -> str:
    return "–" if v is None else f"{v:.4g}"


def text(v: GateVerdict) -> str:
    """The verdict for a terminal: one line per rule, offenders named, then the summary line."""
    lines = []
    for r in v.results:
        where = ", ".join(f"{o.key} ({_g(o.compared)})" for o in r.offenders[:5])
        more = f" and {len(r.offenders) - 5} more" if len(r.offenders) > 5 else ""
        tail = f": {where}{more}" if where else (f" ({r.reason})" if r.reason else f" ({_g(r.compared)})")
        lines.append(f"{r.outcome.upper():8} {r.rule} [{r.metric} {r.check}, {r.aggregate}]{tail}")
    return "\n".join([*lines, v.summary()])


def stage_record(v: GateVerdict, started: datetime | None = None, seconds: float | None = None) -> StageRecord:
    """The verdict as the audit record's `gate` stage: details = the verdict, metrics = what each rule
    compared, config hash = a digest of the outcome (a re-judgement that changes it invalidates caches)."""
    from microscope.tracking import metric_key

    details = v.model_dump(mode="json")
    return StageRecord(
        stage="gate",
        status=StageStatus.completed,
        # the outcome, not its explanatory text (which names the audit judged): an identical re-run hashes the
        # same, so the report downstream of the gate is reused (it names the audit it was first rendered for)
        config_hash=canonical_hash(
            [
                [[r.rule, r.outcome, r.compared, [[o.key, o.compared] for o in r.offenders]] for r in v.results],
                details["baseline_audit_id"],
                details["rules_digest"],
            ]
        ),
        metrics={metric_key(x.rule): x.compared for x in v.results if x.compared is not None},
        details=details,
        started_at=started,
        finished_at=datetime.now(UTC),
        seconds=seconds,
    )
