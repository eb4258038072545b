"""The architecture's module tree and the weight memory per block, in full precision and per variant."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from schemas.records import AuditRecord, StageRecord, StageStatus

from microscope.results.layers import layer_table
from microscope.results.missing import HOW, why_missing

if TYPE_CHECKING:
    import pandas as pd

BYTES = {"float32": 4.0, "float64": 8.0, "float16": 2.0, "bfloat16": 2.0}


def module_table(record: AuditRecord) -> pd.DataFrame:
    """The architecture's modules as a tree: `name`, `parent` (the enclosing listed module, "" at the
    top), `depth`, `type`, `params`, `share` (of the model's parameters). Empty, with `attrs["missing"]`,
    when ingest did not record an architecture."""
    import pandas as pd

    arch = record.architecture
    if arch is None:
        df = pd.DataFrame(columns=["name", "parent", "depth", "type", "params", "share"])
        df.attrs["missing"] = {"ingest": why_missing(record, "ingest") or "ingest recorded no architecture"}
        return df
    names = {m.name for m in arch.modules}
    rows = []
    for m in arch.modules:
        parts = m.name.split(".")
        parent = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in names), "")
        rows.append({"name": m.name, "parent": parent, "type": m.type, "params": m.params})
    depth: dict[str, int] = {}
    for r in rows:  # parents come before their children in the architecture's module list
        r["depth"] = depth[r["name"]] = depth.get(r["parent"], -1) + 1 if r["parent"] else 0
        r["share"] = r["params"] / arch.n_params if arch.n_params else math.nan
    df = pd.DataFrame(rows, columns=["name", "parent", "depth", "type", "params", "share"])
    df.attrs["missing"] = {}
    return df


_EMBEDDING_NAMES = ("emb", "wte", "wpe", "embed_tokens", "shared")


def _quantizable(record: AuditRecord, t: pd.DataFrame) -> dict[str, bool]:
    """Which matrices a quantized format stores quantized: the Linear (and GPT-2 Conv1D) weights except the
    output embedding, as `quantization.loading_skip` and transformers' quantizers decide. Inside the blocks
    every matrix is one; outside, the module's recorded type decides (a CNN's convolutions stay at the
    model's dtype, its Linear head does not), else its name (embeddings and the unembedding stay)."""
    types = {m.name: m.type for m in (record.architecture.modules if record.architecture else [])}
    unembedding = bool(record.architecture and record.architecture.has_unembedding)
    out: dict[str, bool] = {}
    for name, layer in zip(t["name"], t["layer"], strict=True):
        module = name.removesuffix(".weight")
        kind = types.get(module)
        if layer >= 0:
            out[name] = True
        elif kind is not None:
            out[name] = kind in ("Linear", "Conv1D") and not (unembedding and module.endswith("lm_head"))
        else:
            leaf = module.rsplit(".", 1)[-1]
            out[name] = not any(e in leaf for e in _EMBEDDING_NAMES) and not (unembedding and leaf == "lm_head")
    return out


def memory_table(record: AuditRecord, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Weight memory per block (`layer`, -1 for everything outside the blocks) in full precision and in each
    quantized variant the audit made, in bytes: `bytes[fp]`, `bytes[<v>]`. A matrix inside a block is stored
    in the variant's format (its bytes per weight from `microscope.quantization.FORMATS`, scales included);
    outside the blocks, Linear matrices are too, while embeddings, the unembedding and convolutions stay at
    the model's dtype, as our and transformers' quantizers leave them (`_quantizable`). Biases and norms are not in the table (`metrics` measures 2-D weights only), so the column
    sums are a lower bound of the quantize stage's `measured_bytes`, kept in `attrs["measured"]`."""
    import pandas as pd

    from microscope.quantization import FORMATS

    t = table if table is not None else layer_table(None, record)  # type: ignore[arg-type]
    if "rows" not in t.columns or t.empty or t["rows"].isna().all():
        df = pd.DataFrame(columns=["layer", "matrices", "params", "bytes[fp]"])
        df.attrs["missing"] = {"metrics": t.attrs.get("missing", {}).get("metrics", HOW["metrics"])}
        df.attrs["measured"] = {}
        return df
    fp_bytes = BYTES.get(record.architecture.dtype if record.architecture else "float32", 4.0)
    produced = {
        v: recs["quantize"].details.get("produced", v)
        for v, recs in sorted(record.variants.items())
        if "quantize" in recs and recs["quantize"].status != StageStatus.failed
    }
    quantized = _quantizable(record, t)
    rows = []
    for layer, g in t.groupby("layer", sort=True):
        n = (g["rows"] * g["cols"]).astype(float)
        row: dict[str, Any] = {"layer": int(layer), "matrices": len(g), "params": int(n.sum())}
        row["bytes[fp]"] = float(n.sum() * fp_bytes)
        for v, fmt in produced.items():
            f = FORMATS.get(fmt)
            kept = f.other_bytes if f and fp_bytes > f.other_bytes else fp_bytes  # what a format leaves as is
            row[f"bytes[{v}]"] = float(
                sum(
                    o * i * (f.quantized_bytes(int(i)) if f is not None and quantized[name] else kept)
                    for name, o, i in zip(g["name"], g["rows"], g["cols"], strict=True)
                )
            )
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["missing"] = {}
    df.attrs["measured"] = {
        v: recs["quantize"].metrics.get("measured_bytes")
        for v, recs in record.variants.items()
        if "quantize" in recs and "measured_bytes" in recs["quantize"].metrics
    }
    if record.variants:
        fp = next(iter(record.variants.values())).get("quantize")
        if fp is not None and "fp_bytes" in fp.metrics:
            df.attrs["measured"]["fp"] = fp.metrics["fp_bytes"]
    return df


def ingest_summary(ingest: StageRecord | None) -> dict[str, Any]:
    """What ingest recorded about the inputs: `model_digest` and `dataset_digest` ("" when not recorded) and
    `nonfinite` (the non-finite weights it found and allowed, None without any). Takes the stage record: the
    report reads it while the audit runs, before an audit record exists."""
    d = ingest.details if ingest else {}
    return {
        "model_digest": d.get("model_digest", ""),
        "dataset_digest": d.get("dataset_digest", ""),
        "nonfinite": d.get("nonfinite") or None,
    }
