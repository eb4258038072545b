"""The lineage graph of the session's real finished audit (tiny GPT-2, every stage but robustness): one node
per stage record, variant record, SAE and features table, plus the checkpoint; its DOT names each once."""

from __future__ import annotations

import re

from microscope.results import load_audit
from microscope.results.lineage import lineage, lineage_dot
from microscope.store import open_store


def test_the_finished_audits_lineage_has_a_node_per_record(finished_audits: dict[str, dict]) -> None:
    made = finished_audits["step1"]
    rec = load_audit(open_store(made["store_uri"]), made["audit_id"])
    assert rec.stages and rec.variants and rec.saes, "the fixture's audit should have stages, variants and SAEs"
    lin = lineage(rec)
    n_variant_records = sum(len(recs) for recs in rec.variants.values())
    assert len(lin["nodes"]) == len(rec.stages) + n_variant_records + 2 * len(rec.saes) + 1
    ids = [n["id"] for n in lin["nodes"]]
    assert len(set(ids)) == len(ids)
    by_id = {n["id"]: n for n in lin["nodes"]}
    for hook, r in rec.saes.items():
        assert by_id[f"sae:{hook}"]["status"] == r.status.value
        assert ("stage:trace", f"sae:{hook}") in {(e["source"], e["target"]) for e in lin["edges"]}
    dot = lineage_dot(lin)
    declared = re.findall(r'^  "((?:[^"\\]|\\.)*)" \[', dot, flags=re.M)
    assert sorted(declared) == sorted(ids)
