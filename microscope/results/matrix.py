"""One weight matrix of a finished audit, as the Matrix explorer shows it: the weights pooled to a grid, their
histogram, the empirical spectral density with the recorded power-law fit and the Marchenko–Pastur bulk, the
Fisher diagonal pooled like the weights, the quantization error per variant and the matrix's history over a
training run; and the recorded CKA as tables.

Scales: the ESD, the MP bulk and the power-law line share one axis, λ = σ²/N (eigenvalues of WᵀW/N, N the
larger dimension, as WeightWatcher plots and `spectra.mp_spikes` counts). The recorded fit uses λ = σ²
(`spectra.power_law_fit`); α does not depend on the scale, xmin is divided by N.

Weights are read one tensor at a time from safetensors files (`safe_open`), never from pickles.
"""

from __future__ import annotations

import difflib
import io
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from schemas.records import AuditRecord, StageStatus

from microscope.errors import InputError
from microscope.results.missing import HOW, why_missing
from microscope.results.weights import cka_summary
from microscope.spectra import EVALS_THRESH
from microscope.store import ArtifactStore

if TYPE_CHECKING:
    import pandas as pd

GRID_MAX_CELLS = 128
POOLINGS = ("mean", "maxabs")  # mean keeps the sign; maxabs shows the largest magnitude in each block
MATRIX_HISTORY_COLUMNS = ("alpha", "alpha_weighted", "spectral_norm", "stable_rank", "effective_rank", "frobenius",
                   "condition_number", "mp_spikes")  # fmt: skip
_KIND_RULES = (  # first match wins; fused GPT-2 c_attn before the generic attention projections
    ("embedding", r"(^|\.)(wte|wpe|embed\w*|embeddings?\.\w+|tok_embeddings)(\.|$)"),
    ("head", r"(^|\.)(lm_head|classifier|head|score|output_projection)(\.|$)"),
    ("attention.qkv", r"(c_attn|qkv|query_key_value|Wqkv|in_proj)"),
    ("attention.q", r"(q_proj|\.query|\.q)(\.|$)"),
    ("attention.k", r"(k_proj|\.key|\.k)(\.|$)"),
    ("attention.v", r"(v_proj|\.value|\.v)(\.|$)"),
    ("attention.out", r"(o_proj|out_proj|attn\.c_proj|attention\.output\.dense|self_attn\.dense|\.wo)(\.|$)"),
    ("mlp", r"(mlp|c_fc|fc\d|up_proj|down_proj|gate_proj|intermediate|output\.dense|ffn|feed_forward|w[123])"),
)
CONV1D_MODULES = ("c_attn", "c_proj", "c_fc")  # GPT-2's Conv1D stores [in, out]


# ---- which matrices ----------------------------------------------------------------------------------


def matrix_kind(name: str) -> str:
    """The matrix's role family from its name: attention.q|k|v|qkv|out, mlp, embedding, head, else other."""
    for kind, rule in _KIND_RULES:
        if re.search(rule, name.removesuffix(".weight")):
            return kind
    return "other"


def weight_rows(record: AuditRecord) -> list[dict[str, Any]]:
    """The metrics stage's per-matrix rows (empty when metrics did not finish: see `why_no_matrices`)."""
    m = record.stages.get("metrics")
    if m is None or why_missing(record, "metrics") is not None:
        return []
    return list(m.details.get("weights") or [])


def why_no_matrices(record: AuditRecord) -> str:
    return why_missing(record, "metrics") or f"the metrics stage measured no matrix: {HOW['metrics']}"


def matrix_catalog(record: AuditRecord) -> pd.DataFrame:
    """One row per measured matrix: `name` (as in the layer table), `layer`, `kind`, `rows`, `cols`, `params`."""
    import pandas as pd

    cols = ["name", "layer", "kind", "rows", "cols", "params"]
    rows = [
        (r["name"], r["layer"], matrix_kind(r["name"]), *r["shape"], math.prod(r["shape"])) for r in weight_rows(record)
    ]
    return pd.DataFrame(rows, columns=cols)


def closest_names(name: str, names: list[str], n: int = 5) -> list[str]:
    """The names nearest to `name` (difflib's ratio), best first."""
    return difflib.get_close_matches(name, names, n=n, cutoff=0.3)


def matrix_row(record: AuditRecord, name: str) -> dict[str, Any]:
    """The recorded row of matrix `name`; an unknown name is refused, naming the closest ones."""
    rows = {r["name"]: r for r in weight_rows(record)}
    if not rows:
        raise InputError(why_no_matrices(record))
    if name not in rows:
        near = closest_names(name, list(rows))
        hint = f"closest: {', '.join(near)}" if near else "pick one from the Layers page"
        raise InputError(f"no matrix {name!r} in audit {record.audit_id}; {hint}")
    return rows[name]


# ---- reading tensors ----------------------------------------------------------------------------------


def _safetensors_files(path: Path) -> list[Path]:
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    return [f for f in files if f.suffix == ".safetensors"]


def _read(files: list[Path], names: list[str]) -> tuple[str, Any] | None:
    """(key, tensor) of the first of `names` (in their order) stored in any of `files`, read alone."""
    from safetensors import safe_open

    keys = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            keys[f] = set(h.keys())
    for n in names:
        for f in files:
            if n in keys[f]:
                with safe_open(str(f), framework="pt") as h:
                    return n, h.get_tensor(n)
    return None


def _candidates(name: str) -> list[str]:
    """`name`, then without its leading module prefixes (an HF checkpoint may omit `transformer.`)."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1)]


def read_matrix(record: AuditRecord, name: str) -> tuple[str, np.ndarray]:
    """Matrix `name` of the audited checkpoint as measured (float64, [rows, cols]; conv kernels flattened),
    read alone from its safetensors file(s), and the key it is stored under. A tied matrix (e.g. lm_head)
    stored under the name it is tied to is found by its shape and recorded Frobenius norm. Other checkpoint
    formats are refused (no pickle is opened)."""
    from microscope.models.checkpoint import local_path

    row = matrix_row(record, name)
    path = local_path(record.model.resolved_path, record.model.source)
    if not path.exists():
        raise InputError(f"the audited checkpoint {path} is not on this machine; copy it back to view the weights")
    files = _safetensors_files(path)
    if not files:
        raise InputError(
            f"{path.name} is not stored as safetensors: the viewer reads no pickled weights; re-save it as "
            "safetensors (model.save_pretrained(..., safe_serialization=True)) to view its matrices"
        )
    found = _read(files, _candidates(name)) or _tied(files, row)
    if found is None:
        raise InputError(f"{name} is not in {path.name}'s safetensors files (nor a tensor tied to it)")
    key, t = found
    return key, t.reshape(t.shape[0], -1).double().numpy()


def _tied(files: list[Path], row: dict[str, Any]) -> tuple[str, Any] | None:
    """The stored tensor of the recorded shape whose Frobenius norm is the recorded one (within 1e-6)."""
    from safetensors import safe_open

    want = tuple(row["shape"])
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                shape = tuple(sl.get_shape())
                if len(shape) >= 2 and (shape[0], math.prod(shape[1:])) == want:
                    t = h.get_tensor(k)
                    fro = float(t.double().norm())
                    if math.isclose(fro, float(row["frobenius"]), rel_tol=1e-6):
                        return k, t
    return None


# ---- the weights ----------------------------------------------------------------------------------------


def _starts(n: int, cells: int) -> np.ndarray:
    """Block starts of `np.array_split(range(n), min(cells, n))`: near-equal blocks, the larger first."""
    k = min(cells, n)
    sizes = np.full(k, n // k)
    sizes[: n % k] += 1
    return np.concatenate([[0], np.cumsum(sizes)[:-1]])


def pooled_grid(w: np.ndarray, cells: int = GRID_MAX_CELLS, how: str = "mean") -> np.ndarray:
    """`w` pooled over near-equal blocks to at most cells × cells: `mean` (signed) or `maxabs` (max |w|)."""
    if how not in POOLINGS:
        raise InputError(f"pooling {how!r} is not one of {', '.join(POOLINGS)}")
    r, c = _starts(w.shape[0], cells), _starts(w.shape[1], cells)
    if how == "maxabs":
        return np.maximum.reduceat(np.maximum.reduceat(np.abs(w), r, axis=0), c, axis=1)
    sums = np.add.reduceat(np.add.reduceat(w, r, axis=0), c, axis=1)
    counts = np.outer(np.diff(np.append(r, w.shape[0])), np.diff(np.append(c, w.shape[1])))
    return sums / counts


def grid_frame(grid: np.ndarray, value: str) -> pd.DataFrame:
    """A grid as long rows (`row`, `col`, `value`) for a heatmap."""
    import pandas as pd

    i, j = np.indices(grid.shape)
    return pd.DataFrame({"row": i.ravel(), "col": j.ravel(), value: grid.ravel()})


def weight_histogram(w: np.ndarray, bins: int = 80) -> pd.DataFrame:
    """Counts of the weight values on `bins` equal bins over [min, max]: `lo`, `hi`, `count`."""
    import pandas as pd

    counts, edges = np.histogram(w, bins=bins)
    return pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "count": counts})


# ---- the spectrum -------------------------------------------------------------------------------------


def saved_singular_values(store: ArtifactStore, record: AuditRecord, name: str) -> np.ndarray:
    """The singular values the metrics stage saved for `name` (its `spectra` artifact, descending)."""
    m = record.stages["metrics"]
    key = f"{m.details['prefix']}/spectra.npz"
    if not store.exists(key):
        raise InputError(f"the metrics stage's spectra ({key}) are not in the store; run the audit again")
    with np.load(io.BytesIO(store.get_bytes(key))) as z:
        k = name.replace("/", "_")
        if k not in z.files:
            raise InputError(f"{name} has no saved spectrum in {key}")
        return np.asarray(z[k], dtype=np.float64)


def mp_edges(var: float, rows: int, cols: int) -> tuple[float, float]:
    """The Marchenko–Pastur bulk [λ−, λ+] of WᵀW/N for an N × M matrix (N ≥ M) of i.i.d. entries of
    variance `var`: var·(1 ∓ √(M/N))²."""
    n, m = max(rows, cols), min(rows, cols)
    r = math.sqrt(m / n)
    return var * (1 - r) ** 2, var * (1 + r) ** 2


def mp_density(lam: np.ndarray, var: float, rows: int, cols: int) -> np.ndarray:
    """The MP density of the eigenvalues of WᵀW/N: Q/(2π·var·λ)·√((λ+ − λ)(λ − λ−)), Q = N/M ≥ 1; 0 outside
    the bulk. Integrates to 1 (the M eigenvalues)."""
    lo, hi = mp_edges(var, rows, cols)
    q = max(rows, cols) / min(rows, cols)
    lam = np.asarray(lam, dtype=np.float64)
    inside = (lam > lo) & (lam < hi)
    out = np.zeros_like(lam)
    out[inside] = q / (2 * np.pi * var * lam[inside]) * np.sqrt((hi - lam[inside]) * (lam[inside] - lo))
    return out


def matrix_spectrum(sv: np.ndarray, row: dict[str, Any], bins: int = 60) -> dict[str, Any]:
    """What the ESD plot shows, on λ = σ²/N: `esd` (log-spaced bins: `lambda` centre, `density` over the
    eigenvalues above EVALS_THRESH), `mp` (`lambda`, `density` of the MP bulk), `edges` (λ−, λ+), `var`,
    `spikes` (eigenvalues above λ+, largest first), `power_law` (`lambda`, `density` of the fitted tail, or
    empty), `xmin` (None without a fit), `alpha`, `n` and `N`. The MP variance is the mean squared entry
    (‖W‖²_F / (N·M), with the recorded Frobenius norm), as `spectra.mp_spikes` takes it."""
    import pandas as pd

    rows_, cols_ = int(row["shape"][0]), int(row["shape"][1])
    big = max(rows_, cols_)
    evals_all = np.sort(np.asarray(sv, dtype=np.float64) ** 2)[::-1]
    kept = evals_all[evals_all > EVALS_THRESH] / big  # the fit's eigenvalues, rescaled
    var = float(row["frobenius"]) ** 2 / (rows_ * cols_)
    lo, hi = mp_edges(var, rows_, cols_)
    esd = pd.DataFrame(columns=["lambda", "density"])
    if kept.size >= 2:
        edges = np.logspace(np.log10(kept.min()), np.log10(kept.max()), bins + 1)
        counts, _ = np.histogram(kept, bins=edges)
        dens = counts / (kept.size * np.diff(edges))
        keep = dens > 0
        esd = pd.DataFrame({"lambda": np.sqrt(edges[:-1] * edges[1:])[keep], "density": dens[keep]})
    grid = np.linspace(lo, hi, 202)[1:-1] if hi > lo else np.array([])
    mp = pd.DataFrame({"lambda": grid, "density": mp_density(grid, var, rows_, cols_)})
    alpha, xmin = row.get("alpha"), row.get("xmin")
    line = pd.DataFrame(columns=["lambda", "density"])
    xmin_n = None
    if isinstance(alpha, float | int) and isinstance(xmin, float | int) and kept.size:
        xmin_n = float(xmin) / big
        line = power_law_line(float(alpha), xmin_n, float(kept.max()), row.get("n_tail", 0) or 0, kept.size)
    spikes = evals_all / big
    return {
        "esd": esd,
        "mp": mp,
        "edges": (lo, hi),
        "var": var,
        "spikes": spikes[spikes > hi],
        "power_law": line,
        "xmin": xmin_n,
        "alpha": alpha,
        "n": int(kept.size),
        "N": big,
    }


def power_law_line(alpha: float, xmin: float, lam_max: float, n_tail: float, n: int, points: int = 50) -> pd.DataFrame:
    """The fitted tail as a density over all `n` eigenvalues: (n_tail/n)·(α−1)/xmin·(λ/xmin)^(−α) on
    [xmin, λmax] (the continuous power law the MLE fits, weighted by the tail's share)."""
    import pandas as pd

    lam = np.logspace(np.log10(xmin), np.log10(max(lam_max, xmin)), points)
    share = (n_tail / n) if n else 0.0
    return pd.DataFrame({"lambda": lam, "density": share * (alpha - 1) / xmin * (lam / xmin) ** (-alpha)})


# ---- Fisher ----------------------------------------------------------------------------------------------


def fisher_grid(
    store: ArtifactStore, record: AuditRecord, name: str, stored: str | None = None, cells: int = GRID_MAX_CELLS
) -> np.ndarray:
    """log10 of the Fisher diagonal of `name` (or of `stored`, the parameter a tied matrix is stored as)
    mean-pooled like the weights (blocks of zero Fisher: −30). Refused, saying how to produce it, when the
    audit stored no Fisher diagonal."""
    from safetensors import safe_open

    m = record.stages.get("metrics")
    key = (m.details.get("fisher_key") if m is not None else None) or ""
    if not key:
        raise InputError(
            "this audit stored no Fisher diagonal: run the metrics stage with metrics.sensitivity: true "
            "(the default) on a dataset, e.g. microscope run --stages ingest,metrics --dataset FILE"
        )
    if not store.exists(key):
        raise InputError(f"the Fisher diagonal ({key}) is not in the store; run the audit again")
    with safe_open(str(store.local_path(key)), framework="pt") as h:
        keys = set(h.keys())
        found = next((k for k in (name, stored) if k in keys), None)
        if found is None:
            raise InputError(
                f"no Fisher diagonal under {name}: the sensitivity stage names a tied matrix by the parameter "
                "it is tied to, which the checkpoint does not show"
            )
        f = h.get_tensor(found)
    grid = pooled_grid(f.reshape(f.shape[0], -1).double().numpy(), cells, "mean")
    return np.log10(np.maximum(grid, 1e-30))


# ---- quantization error ----------------------------------------------------------------------------------


def relative_error(w: np.ndarray, wq: np.ndarray) -> float:
    """‖W_q − W‖_F / ‖W‖_F in float64 (NaN for an all-zero W)."""
    w, wq = np.asarray(w, dtype=np.float64), np.asarray(wq, dtype=np.float64)
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(wq - w)) / norm if norm > 0 else math.nan


def dequantized_weight(tensors: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, str] | None:
    """The saved variant's weight of parameter `name`, dequantized, and how: a float tensor as is; torch-int8
    (`<module>.weight_int8` × `<module>.scale` per row); bitsandbytes LLM.int8 (int8 `weight` × `SCB`/127 per
    row); bitsandbytes 4-bit (packed `weight` and its `weight.*` quant state) through `quant4bit.dequantize`,
    the function the audit's 4-bit layers compute with. None when `tensors` holds none of these."""
    module = name.removesuffix(".weight")
    t = tensors.get(name)
    if t is not None and np.issubdtype(t.dtype, np.floating):
        return t.astype(np.float64), "saved variant"
    if f"{module}.weight_int8" in tensors and f"{module}.scale" in tensors:
        q, s = tensors[f"{module}.weight_int8"], tensors[f"{module}.scale"]
        return q.astype(np.float64) * s.astype(np.float64)[:, None], "saved variant (int8 × row scale)"
    if t is not None and t.dtype == np.int8 and f"{module}.SCB" in tensors:
        scb = tensors[f"{module}.SCB"].astype(np.float64)
        return t.astype(np.float64) * scb[:, None] / 127.0, "saved variant (LLM.int8 × SCB/127)"
    state = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
    if t is not None and t.dtype == np.uint8 and "absmax" in state:
        return _dequantize_4bit(t, state), "saved variant (4-bit: code × block absmax)"
    return None


def _dequantize_4bit(packed: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
    import torch
    from bitsandbytes.functional import QuantState

    from microscope.quant4bit import dequantize

    qs = QuantState.from_dict({k: torch.from_numpy(v) for k, v in state.items()}, device=torch.device("cpu"))
    return dequantize(torch.from_numpy(packed), qs).double().numpy()


def _variant_tensors(
    store: ArtifactStore, record: AuditRecord, variant: str, name: str, stored: str
) -> dict[str, np.ndarray]:
    """The saved variant's tensors of parameter `name`'s module (each read alone), under the audited
    parameter's module name (an HF save may drop the model prefix, e.g. `transformer.`; a tied matrix is
    saved under `stored`, the key the checkpoint holds it as)."""
    from safetensors import safe_open

    q = record.variants[variant]["quantize"]
    prefix, module = q.details["prefix"], name.removesuffix(".weight")
    wanted: dict[str, str] = {}  # key in the file -> key under the audited name
    for n in [*reversed(_candidates(stored)), *reversed(_candidates(name))]:  # the audited name last: it wins
        m = n.removesuffix(".weight")
        wanted |= {n: name} | {f"{m}.{s}": f"{module}.{s}" for s in ("weight_int8", "scale", "SCB")}
    weights = [n for n, to in wanted.items() if to == name]
    out: dict[str, np.ndarray] = {}
    for rel in sorted(q.artifacts):
        if not rel.endswith(".safetensors") or not store.exists(f"{prefix}/{rel}"):
            continue
        with safe_open(str(store.local_path(f"{prefix}/{rel}")), framework="pt") as h:
            keys = set(h.keys())
            for k in keys:  # a 4-bit weight's quant state: `<weight>.absmax`, `<weight>.quant_map`, ...
                if base := next((n for n in weights if k.startswith(f"{n}.")), None):
                    wanted.setdefault(k, name + k[len(base) :])
            for k in sorted(keys & set(wanted), key=len):  # longest (fullest) name last
                t = h.get_tensor(k)
                out[wanted[k]] = t.float().numpy() if t.is_floating_point() else t.numpy()
    return out


def _orient(w: np.ndarray, wq: np.ndarray, name: str, how: str) -> np.ndarray | None:
    """`w` in the saved variant's layout: int8 formats store Linear [out, in], GPT-2's Conv1D stores [in, out]."""
    conv1d = name.removesuffix(".weight").rsplit(".", 1)[-1] in CONV1D_MODULES
    if how != "saved variant" and conv1d and wq.shape == w.T.shape:
        return w.T
    if wq.shape == w.shape:
        return w
    return w.T if wq.shape == w.T.shape else None


def matrix_quant_errors(
    store: ArtifactStore, record: AuditRecord, name: str, w: np.ndarray, stored: str | None = None
) -> pd.DataFrame:
    """‖W_q − W‖_F / ‖W‖_F of matrix `name` (`w`, as `read_matrix` gives it; `stored`: the key it read) in
    every quantized variant of the audit: `variant`, `produced`, `rel_error` (NaN where it cannot be read),
    `how` (read from the saved variant, or why not)."""
    import pandas as pd

    rows = []
    for v, recs in sorted(record.variants.items()):
        q = recs.get("quantize")
        if q is None or q.status in (StageStatus.failed, StageStatus.skipped):
            continue
        produced = q.details.get("produced") or v
        why = "the saved variant holds no tensor of this matrix"
        try:
            tensors = _variant_tensors(store, record, v, name, stored or name)
            found = dequantized_weight(tensors, name) if tensors else None
            if tensors and found is None:
                why = f"stored as {sorted(tensors)[:3]}, a layout this reader does not dequantize"
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
            found, why = None, f"its saved weights cannot be read or dequantized ({exc})"
        ref = _orient(w, found[0], name, found[1]) if found is not None else None
        if found is None or ref is None:
            why = why if found is None else f"saved shape {found[0].shape} ≠ {w.shape}"
            rows.append((v, produced, math.nan, why))
            continue
        err = relative_error(ref, found[0])
        rows.append((v, produced, err, found[1] + (" · kept as is" if err == 0 else "")))
    return pd.DataFrame(rows, columns=["variant", "produced", "rel_error", "how"])


# ---- history and CKA ---------------------------------------------------------------------------------------


def matrix_history(run_layers: pd.DataFrame, name: str) -> pd.DataFrame:
    """Matrix `name`'s recorded figures per step of its training run (from `run_series(..., layers=True)`):
    `step`, `audit_id` and the MATRIX_HISTORY_COLUMNS the table has."""
    if run_layers.empty or "name" not in run_layers.columns:
        return run_layers.iloc[0:0]
    cols = ["step", "audit_id", *[c for c in MATRIX_HISTORY_COLUMNS if c in run_layers.columns]]
    return run_layers.loc[run_layers["name"] == name, cols].sort_values("step").reset_index(drop=True)


def cka_layers(record: AuditRecord) -> pd.DataFrame:
    """Linear CKA between the traced points as recorded: long rows `a`, `b`, `cka` (the full square)."""
    import pandas as pd

    s = _cka(record)
    names, matrix = s.get("layers") or [], s.get("matrix") or []
    rows = [(a, b, float(matrix[i][j])) for i, a in enumerate(names) for j, b in enumerate(names)]
    return pd.DataFrame(rows, columns=["a", "b", "cka"])


def cka_variants(record: AuditRecord) -> pd.DataFrame:
    """Linear CKA of full precision against each variant per traced point: `variant`, `hook`, `cka`."""
    import pandas as pd

    per_variant = sorted(_cka(record).get("variants", {}).items())
    rows = [(v, h, float(c)) for v, per in per_variant for h, c in per.items()]
    return pd.DataFrame(rows, columns=["variant", "hook", "cka"])


def why_no_cka(record: AuditRecord) -> str | None:
    """None when the audit recorded CKA between layers; else why not and how to produce it."""
    if (why := why_missing(record, "metrics")) is not None:
        return why
    if not _cka(record).get("layers"):
        return "CKA needs traced activations: add trace to --stages before metrics"
    return None


def _cka(record: AuditRecord) -> dict[str, Any]:
    m = record.stages.get("metrics")
    if m is None or why_missing(record, "metrics") is not None:
        return {}
    return cka_summary(m.details.get("cka") or {})
