"""Details of the metrics stage (microscope/stages/metrics.py) and of its weight shards."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.details._base import Details, StageDetails


class Esd(Details):
    """Histogram of the empirical spectral density (log-log)."""

    log10_lambda: list[float]
    log10_density: list[float]


class WeightRow(Details):
    """One 2-D weight's statistics (conv kernels reshaped). None figures are undefined, their reason in
    `undefined`."""

    omit_if_none = frozenset({"flags"})

    name: str
    layer: int = Field(description="Block index (-1 outside the blocks: embeddings, heads).")
    shape: list[int]
    l1: float
    frobenius: float
    spectral_norm: float
    condition_number: float | None = Field(description="None on the randomized path or for an all-zero matrix.")
    effective_rank: float
    stable_rank: float
    sparsity: float = Field(description="Fraction of entries below metrics.near_zero.")
    spectrum: Literal["exact", "randomized"]
    spectrum_error: float = Field(description="Error bound of the largest singular value (randomized path).")
    spectrum_error_max: float
    effective_rank_estimated: bool = Field(description="True when the effective rank is from the top values only.")
    n_singular_values: int
    alpha: float | None = Field(description="Power-law exponent of the ESD (None: no fit).")
    alpha_weighted: float | None = Field(description="α · log10 λmax.")
    xmin: float | None
    ks_distance: float | None
    sigma: float | None
    n_tail: float = Field(description="Eigenvalues in the fitted tail (0 without a fit).")
    mp_spikes: int = Field(description="Eigenvalues beyond the Marchenko–Pastur bulk edge.")
    esd: Esd
    undefined: dict[str, str] = Field(description="Figure -> why it is undefined (None above).")
    flags: list[str] | None = Field(
        None, description="Why the matrix is flagged ([]: it is not); set when the shards are joined."
    )


class MetricsShardDetails(StageDetails):
    """One weight shard: stage "metrics", variant "shard-N", under the "metrics-weights" prefix. Not in
    the audit record (the metrics details list their prefixes); read from the store's manifests."""

    weights: list[WeightRow]
    spectra_key: str = Field(description="Store key of the singular values (.npz, one array per matrix).")
    vectors_key: str = Field(description="Store key of the raw layer embeddings (.npz).")


class SensitivityRow(Details):
    """One parameter tensor's loss sensitivity on the audit's data."""

    name: str
    layer: int
    grad_norm: float
    fisher_trace: float = Field(description="Trace of the empirical Fisher diagonal.")
    fisher_max: float
    hessian_trace: float = Field(description="Hutchinson estimate of the Hessian trace.")
    hessian_trace_se: float = Field(description="Its standard error over the probes.")


class FisherMap(Details):
    """A weight's Fisher diagonal, mean-pooled onto at most 32 × 32 cells."""

    name: str
    shape: list[int] = Field(description="The matrix's shape (rows, columns flattened).")
    log10_fisher: list[list[float]]


class Cka(Details):
    """CKA of the traced layers; every key is absent when nothing was traced (then it dumps as {})."""

    omit_if_none = frozenset({"layers", "matrix", "variants", "audits", "tokens", "skipped"})

    layers: list[str] | None = Field(None, description="Hook names, the rows and columns of `matrix`.")
    matrix: list[list[float]] | None = None
    variants: dict[str, dict[str, float]] | None = Field(None, description="Variant -> hook -> CKA with fp.")
    audits: dict[str, dict[str, float]] | None = Field(None, description="Audit id -> hook -> CKA with it.")
    tokens: int | None = Field(None, description="Tokens (rows) compared per hook.")
    skipped: dict[str, str] | None = Field(None, description="Audit id -> why it was not compared.")


class MetricsDetails(StageDetails):
    """metrics: the joined weight table, sensitivity and CKA."""

    weights: list[WeightRow] = Field(description="Every matrix, by name, with its flags.")
    sensitivity: list[SensitivityRow] = Field(description="[] when metrics.sensitivity is off.")
    fisher_maps: list[FisherMap]
    fisher_key: str | None = Field(description="Store key of the full Fisher diagonal (None: no sensitivity).")
    cka: Cka
    vectors_key: str = Field(description="Store key of the standardised layer embeddings (.npz).")
    shards: list[str] = Field(description="Prefixes of the weight shards joined.")
