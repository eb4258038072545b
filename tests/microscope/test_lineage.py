"""The lineage graph of hand-built audit records: every stage, variant record and SAE is a node exactly once,
each variant's records hang off its quantize record and each SAE off the trace, statuses are carried, the
DOT text is well-formed; steering patches under the store's `patches/` are found; the Lineage page runs."""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from microscope.results.lineage import COLOURS, find_patches, lineage, lineage_dot
from microscope.store import LocalStore
from schemas.records import AuditRecord, ModelRef, StageRecord, StageStatus

ok, cached, partial, failed, skipped = (
    StageStatus.completed,
    StageStatus.cached,
    StageStatus.partial,
    StageStatus.failed,
    StageStatus.skipped,
)
HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


def _r(stage: str, status: StageStatus = ok, **kw) -> StageRecord:
    return StageRecord(stage=stage, status=status, **kw)


def record(store_uri: str = "/tmp/store", **overrides) -> AuditRecord:
    """A full audit: every stage, two variants with their records, two SAEs (one failed), a gate, a report."""
    fields = dict(
        audit_id="a1",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        status=partial,
        model=ModelRef(source='ckpt "quoted" \\ path', source_fingerprint="f" * 64),
        model_digest="d" * 64,
        config={},
        store_uri=store_uri,
        report_uri="/tmp/store/audits/a1/report.html",
        stages={
            "ingest": _r("ingest", details={"prefix": "ingest/abc"}),
            "quantize": _r("quantize", partial),
            "trace": _r("trace", cached, details={"prefix": "trace/fp/abc"}),
            "sae": _r("sae", partial),
            "metrics": _r("metrics", skipped),
            "gate": _r("gate"),
            "report": _r("report"),
        },
        variants={
            "nf4": {
                "quantize": _r("quantize", details={"prefix": "quantize/nf4/x"}),
                "trace": _r("trace", variant="nf4"),
                "robustness": _r("robustness", failed, variant="nf4", error="boom"),
                "attribution": _r("attribution", variant="nf4"),
            },
            "int8": {"quantize": _r("quantize", failed, error="no kernel")},
        },
        saes={
            HOOKS[0]: _r("sae", details={"prefix": "sae/b0/x"}),
            HOOKS[1]: _r("sae", failed, error="diverged"),
        },
    )
    return AuditRecord(**(fields | overrides))


def _ids(lin: dict) -> list[str]:
    return [n["id"] for n in lin["nodes"]]


def _edges(lin: dict) -> set[tuple[str, str]]:
    return {(e["source"], e["target"]) for e in lin["edges"]}


def test_every_record_is_a_node_exactly_once_with_its_status() -> None:
    rec = record()
    lin = lineage(rec)
    ids = _ids(lin)
    assert len(ids) == len(set(ids)), Counter(ids).most_common(3)
    expected = {"checkpoint"}
    expected |= {f"stage:{s}" for s in rec.stages}
    expected |= {f"variant:{v}:{s}" for v, recs in rec.variants.items() for s in recs}
    expected |= {f"sae:{h}" for h in rec.saes} | {f"features:{h}" for h in rec.saes}
    assert set(ids) == expected
    by_id = {n["id"]: n for n in lin["nodes"]}
    for s, r in rec.stages.items():
        assert by_id[f"stage:{s}"]["status"] == r.status.value
    for v, recs in rec.variants.items():
        for s, r in recs.items():
            assert by_id[f"variant:{v}:{s}"]["status"] == r.status.value
    for h, r in rec.saes.items():
        assert by_id[f"sae:{h}"]["status"] == by_id[f"features:{h}"]["status"] == r.status.value
    kinds = {n["id"]: n["kind"] for n in lin["nodes"]}
    assert kinds["checkpoint"] == "checkpoint"
    assert kinds["stage:report"] == "report" and kinds["stage:gate"] == "gate"
    assert kinds["stage:trace"] == kinds["variant:nf4:trace"] == "trace"
    assert kinds["variant:nf4:quantize"] == kinds["variant:int8:quantize"] == "variant"
    assert kinds["stage:metrics"] == kinds["variant:nf4:robustness"] == "stage"
    assert kinds[f"sae:{HOOKS[0]}"] == "sae" and kinds[f"features:{HOOKS[0]}"] == "features"
    # where each lives: store prefixes, the features table, the report's URI, the checkpoint's source
    assert by_id["stage:ingest"]["href"] == "ingest/abc"
    assert by_id[f"features:{HOOKS[0]}"]["href"] == "sae/b0/x/features.parquet"
    assert by_id["stage:report"]["href"] == rec.report_uri
    assert by_id["checkpoint"]["href"] == rec.model.source


def test_edges_follow_what_was_made_from_what() -> None:
    rec = record()
    lin = lineage(rec)
    edges = _edges(lin)
    assert len(edges) == len(lin["edges"])  # no duplicate edge
    assert ("checkpoint", "stage:ingest") in edges
    for s in ("quantize", "trace", "sae", "metrics", "gate"):
        assert ("stage:ingest", f"stage:{s}") in edges
    for v, recs in rec.variants.items():
        assert ("checkpoint", f"variant:{v}:quantize") in edges
        for s in recs:
            if s != "quantize":
                assert (f"variant:{v}:quantize", f"variant:{v}:{s}") in edges
                assert {e for e in edges if e[1] == f"variant:{v}:{s}"} - {(f"variant:{v}:{s}", "stage:report")} == {
                    (f"variant:{v}:quantize", f"variant:{v}:{s}")
                }
    for h in rec.saes:
        assert ("stage:trace", f"sae:{h}") in edges
        assert (f"sae:{h}", f"features:{h}") in edges
    # everything feeds the report, the report feeds nothing
    assert {s for s, t in edges if t == "stage:report"} == set(_ids(lin)) - {"stage:report"}
    assert not [e for e in edges if e[0] == "stage:report"]
    # every edge joins two nodes
    assert {x for e in edges for x in e} <= set(_ids(lin))


def test_a_record_without_some_stages_has_fewer_nodes() -> None:
    rec = record(stages={"ingest": _r("ingest")}, variants={}, saes={}, report_uri=None)
    lin = lineage(rec)
    assert _ids(lin) == ["checkpoint", "stage:ingest"]
    assert _edges(lin) == {("checkpoint", "stage:ingest")}
    # no trace stage: the SAEs hang off ingest; a variant without its quantize record off the checkpoint
    rec = record(stages={"ingest": _r("ingest")}, variants={"nf4": {"trace": _r("trace")}}, saes={HOOKS[0]: _r("sae")})
    edges = _edges(lineage(rec))
    assert ("stage:ingest", f"sae:{HOOKS[0]}") in edges
    assert ("checkpoint", "variant:nf4:trace") in edges
    # a report URI without a report stage still gives a report node everything feeds
    ids = _ids(lineage(rec))
    assert "report" in ids and ("stage:ingest", "report") in edges


def test_dot_is_well_formed() -> None:
    lin = lineage(record())
    dot = lineage_dot(lin)
    assert dot.startswith("digraph lineage {") and dot.rstrip().endswith("}")
    # braces balance outside quoted strings (a label may hold any character)
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', dot)
    assert unquoted.count("{") == unquoted.count("}") == 1
    assert unquoted.count("[") == unquoted.count("]")
    statements = [line.strip() for line in dot.splitlines()[1:-1]]
    node_ids = [m.group(1) for s in statements if (m := re.match(r'^"((?:[^"\\]|\\.)*)" \[', s))]
    assert Counter(node_ids) == Counter(n["id"] for n in lin["nodes"])
    edge_stmts = [s for s in statements if re.match(r'^"(?:[^"\\]|\\.)*" -> "(?:[^"\\]|\\.)*";$', s)]
    assert len(edge_stmts) == len(lin["edges"])
    # the checkpoint's source holds a quote and a backslash: both escaped, no raw newline inside a label
    assert 'ckpt \\"quoted\\" \\\\ path' in dot
    for s in statements:
        assert s.endswith(";") or s.endswith("{"), s
    # nodes coloured by status
    line = {m.group(1): s for s in statements if (m := re.match(r'^"((?:[^"\\]|\\.)*)" \[', s))}
    assert COLOURS["failed"] in line["variant:int8:quantize"]
    assert COLOURS["partial"] in line["stage:quantize"]
    assert COLOURS["skipped"] in line["stage:metrics"]
    assert COLOURS["cached"] in line["stage:trace"] and COLOURS["completed"] in line["stage:ingest"]


def _patch(store: LocalStore, key: str, meta: dict) -> None:
    store.put_json(f"patches/{key}/microscope_patch.json", meta)
    store.put_bytes(f"patches/{key}/adapter_model.safetensors", b"")


def test_find_patches_lists_this_audits_and_these_weights(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    rec = record(store.uri)
    assert find_patches(store, rec) == []  # no patches/ prefix at all
    _patch(store, "mine", {"audit": "a1", "model_digest": "x", "hook": HOOKS[0], "features": [3, 1]})
    _patch(
        store, "same-weights", {"audit": "a0", "model_digest": "d" * 64, "hook": HOOKS[1], "edits": [{"feature": 7}]}
    )
    _patch(store, "other", {"audit": "zz", "model_digest": "e" * 64, "hook": HOOKS[0], "features": [2]})
    store.put_bytes("patches/broken/microscope_patch.json", b"{not json")
    found = {p["key"]: p for p in find_patches(store, rec)}
    assert set(found) == {"patches/mine", "patches/same-weights"}
    assert found["patches/mine"]["same_audit"] and found["patches/mine"]["features"] == [3, 1]
    assert not found["patches/same-weights"]["same_audit"] and found["patches/same-weights"]["features"] == [7]


def test_the_lineage_page_runs_on_a_hand_built_audit(tmp_path: Path) -> None:
    from streamlit.testing.v1 import AppTest

    store = LocalStore(tmp_path)
    rec = record(store.uri)
    store.put_bytes(f"audits/{rec.audit_id}.json", rec.model_dump_json().encode())
    page = Path(__file__).resolve().parents[2] / "dashboard" / "views" / "lineage.py"
    at = AppTest.from_file(str(page), default_timeout=30)
    at.query_params["store"] = store.uri
    at.run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert len(table) == len(lineage(rec)["nodes"])
    links = table["page"].dropna().tolist()
    assert len(links) == len(rec.saes) and all(f"audit={rec.audit_id}" in u and "hook=" in u for u in links)
    assert "No steering patch" in "\n".join(str(i.value) for i in at.info)


@pytest.mark.parametrize("status", list(StageStatus))
def test_every_status_has_a_colour(status: StageStatus) -> None:
    assert status.value in COLOURS
