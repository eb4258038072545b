"""What was made from a checkpoint, as a graph: the audit record's stages, quantized variants, SAEs and their
features tables, the report and the gate, with their statuses and where each lives in the store.

    lineage(record) -> {"nodes": [{id, kind, label, status, href}], "edges": [{source, target}]}
    lineage_dot(lin) -> str             the same graph in Graphviz DOT (nodes coloured by status)
    find_patches(store, record) -> list  steering patches under the store's `patches/` prefix made from it

Edges: checkpoint → ingest → each other stage; checkpoint → each variant's quantize record → the variant's
other records (trace, robustness, ...); trace → each SAE (by hook) → its features table; every node →
report. A record without some stages simply has fewer nodes. Steering patches are not in the record (they
are exported to folders), so they are listed apart, best effort.
"""

from __future__ import annotations

from typing import Any

from schemas.records import AuditRecord, StageRecord

from microscope.store import ArtifactStore

KINDS = ("checkpoint", "stage", "variant", "trace", "sae", "features", "report", "gate")
COLOURS = {  # fill colour per status; anything else (e.g. unknown) is white
    "completed": "#c8e6c9",
    "cached": "#dcedc8",
    "partial": "#ffe0b2",
    "failed": "#ffcdd2",
    "skipped": "#e0e0e0",
}
PATCH_MANIFEST = "microscope_patch.json"  # microscope.patches.MANIFEST (not imported: it pulls in torch)


def _kind(stage: str, variant: bool) -> str:
    if stage in ("report", "gate"):
        return stage
    if stage == "trace":
        return "trace"
    return "variant" if variant and stage == "quantize" else "stage"


def _href(r: StageRecord) -> str | None:
    """Where the record's results are: its store prefix, else its manifest's (or first artifact's) URI."""
    if prefix := r.details.get("prefix"):
        return str(prefix)
    return r.artifacts.get("manifest") or next(iter(r.artifacts.values()), None)


def _label(title: str, r: StageRecord) -> str:
    secs = f" · {r.seconds:.1f}s" if r.seconds is not None else ""
    return f"{title}\n{r.status.value}{secs}"


def lineage(record: AuditRecord) -> dict[str, list[dict[str, Any]]]:
    """The audit's lineage graph: one node per stage record, variant record, SAE and SAE features table,
    plus the checkpoint (and the report where only its URI is recorded); edges as the module says."""
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, str]] = []

    def node(nid: str, kind: str, label: str, status: str, href: str | None) -> str:
        nodes.append({"id": nid, "kind": kind, "label": label, "status": status, "href": href})
        return nid

    def edge(source: str, target: str) -> None:
        edges.append({"source": source, "target": target})

    m = record.model
    ckpt = node(
        "checkpoint",
        "checkpoint",
        f"checkpoint\n{m.source}\nsha256 {m.source_fingerprint[:12]}",
        "completed",  # the input itself: it exists, whatever became of the stages
        m.resolved_path or m.source,
    )
    ids: dict[str, str] = {}
    for name, r in record.stages.items():
        href = (record.report_uri or _href(r)) if name == "report" else _href(r)
        ids[name] = node(f"stage:{name}", _kind(name, False), _label(name, r), r.status.value, href)
    upstream = ids.get("ingest", ckpt)  # what every other stage was made from
    if "ingest" in ids:
        edge(ckpt, ids["ingest"])
    for name, nid in ids.items():
        if name not in ("ingest", "report"):
            edge(upstream, nid)
    for fmt, recs in sorted(record.variants.items()):
        q = None  # the variant's quantize record: what its other records were made from
        for name, r in sorted(recs.items(), key=lambda kv: (kv[0] != "quantize", kv[0])):
            nid = node(
                f"variant:{fmt}:{name}", _kind(name, True), _label(f"{name} [{fmt}]", r), r.status.value, _href(r)
            )
            edge(q or ckpt, nid)
            q = q or (nid if name == "quantize" else None)
    trace = ids.get("trace", upstream)
    for hook, r in sorted(record.saes.items()):
        sae = node(f"sae:{hook}", "sae", _label(f"SAE {hook}", r), r.status.value, _href(r))
        prefix = r.details.get("prefix")
        table = f"{prefix}/features.parquet" if prefix else r.artifacts.get("features")
        feats = node(f"features:{hook}", "features", f"features\n{hook}", r.status.value, table)
        edge(trace, sae)
        edge(sae, feats)
    report = ids.get("report")
    if report is None and record.report_uri:
        status = record.status.value if record.status.value != "failed" else "partial"
        report = node("report", "report", f"report\n{status}", status, record.report_uri)
    if report is not None:
        for n in nodes:
            if n["id"] != report:
                edge(n["id"], report)
    return {"nodes": nodes, "edges": edges}


def _q(text: str) -> str:
    """A DOT double-quoted string: backslashes and quotes escaped, newlines as DOT's centred line breaks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n") + '"'


SHAPES = {"checkpoint": "cylinder", "features": "note", "report": "doubleoctagon", "gate": "diamond"}


def lineage_dot(lin: dict[str, list[dict[str, Any]]]) -> str:
    """The lineage graph in Graphviz DOT (left to right; one node statement per node, filled by status)."""
    lines = [
        "digraph lineage {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        '  edge [color="#777777"];',
    ]
    for n in lin["nodes"]:
        attrs = {
            "label": _q(n["label"]),
            "fillcolor": _q(COLOURS.get(n["status"], "#ffffff")),
            "shape": SHAPES.get(n["kind"], "box"),
            "tooltip": _q(n["href"] or n["label"]),
        }
        lines.append(f"  {_q(n['id'])} [{', '.join(f'{k}={v}' for k, v in attrs.items())}];")
    lines += [f"  {_q(e['source'])} -> {_q(e['target'])};" for e in lin["edges"]]
    lines.append("}")
    return "\n".join(lines) + "\n"


def find_patches(store: ArtifactStore, record: AuditRecord, prefix: str = "patches") -> list[dict[str, Any]]:
    """Steering patches (`microscope_patch.json` manifests) under `prefix` in the store made from this audit
    or for its model's weights: [{key, audit, hook, variant, features, model_digest, same_audit}]. Best
    effort: an unreadable manifest or store listing is skipped, not raised."""
    try:
        keys = [k for k in store.list(prefix) if k.rsplit("/", 1)[-1] == PATCH_MANIFEST]
    except Exception:  # noqa: BLE001 — best effort: a store that cannot list simply shows no patch
        return []
    out = []
    for key in keys:
        try:
            meta = store.get_json(key)
        except Exception:  # noqa: BLE001 — a half-written or foreign file is not a patch of ours
            continue
        if not isinstance(meta, dict):
            continue
        same_audit = meta.get("audit") == record.audit_id
        same_model = record.model_digest is not None and meta.get("model_digest") == record.model_digest
        if not (same_audit or same_model):
            continue
        features = meta.get("features") or sorted({e.get("feature") for e in meta.get("edits") or []} - {None})
        out.append(
            {
                "key": key.rsplit("/", 1)[0],
                "audit": meta.get("audit"),
                "hook": meta.get("hook"),
                "variant": meta.get("variant"),
                "features": list(features),
                "model_digest": meta.get("model_digest"),
                "same_audit": same_audit,
            }
        )
    return out
