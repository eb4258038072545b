"""The audit configuration: one YAML file, one section per stage.

Every model forbids unknown keys, so a typo fails loudly with the key's name instead of being ignored.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

HookName = Literal["resid", "mlp", "attn"]
HOOK_NAMES: tuple[str, ...] = ("resid", "mlp", "attn")
STAGES: tuple[str, ...] = (
    "ingest", "quantize", "trace", "sae", "metrics", "landscape", "robustness", "reliability", "attribution", "report",
)  # fmt: skip
# What each stage needs to have run first; `--stages` pulls these in.
STAGE_DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "quantize": ("ingest",),
    "trace": ("ingest",),
    "sae": ("ingest", "trace"),
    "metrics": ("ingest",),
    "robustness": ("ingest",),
    "reliability": ("ingest",),
    "landscape": ("ingest",),
    "attribution": ("ingest",),
    "report": ("ingest",),
}
# Quantization formats a config may name; whether one runs on this machine is decided at run time.
QUANT_FORMATS: tuple[str, ...] = ("int8", "nf4", "fp4", "fp16", "bf16", "torch-int8", "int2")
# Pruning formats (microscope/pruning.py): method, optional per-layer scope, whole percent sparsity, optional
# quantization after pruning: magnitude-50, magnitude-layer-50, snip-30, wanda-50+nf4.
PRUNE_FORMAT = re.compile(r"(magnitude|snip|wanda)(-layer)?-([1-9][0-9]?)(?:\+(\S+))?")
PRUNE_FORMS = (
    "magnitude-<pct>, magnitude-layer-<pct>, snip-<pct> or wanda-<pct> with a whole percent 1-99, "
    "optionally +<quantization format> (e.g. magnitude-50, wanda-50+nf4)"
)


PATCH_FORMAT = re.compile(r"patch-([a-z0-9][a-z0-9_-]*)")  # a steering patch named in quantize.patches


def unknown_format(name: str) -> str | None:
    """Why `name` is not a format a config may name (None: it is one): a quantization format, a steering patch
    (`patch-<name>`, its folder in quantize.patches), or a pruning format whose method takes that scope and
    whose quantization suffix is itself a quantization format."""
    if name in QUANT_FORMATS or PATCH_FORMAT.fullmatch(name):
        return None
    m = PRUNE_FORMAT.fullmatch(name)
    if m is None:
        if re.match(r"(magnitude|snip|wanda)\b", name):
            return f"unknown pruning format {name!r}: use {PRUNE_FORMS}"
        return f"unknown format {name!r}; choose from {', '.join(QUANT_FORMATS)} or a pruning format ({PRUNE_FORMS})"
    if m.group(2) and m.group(1) != "magnitude":
        return f"{name!r}: only magnitude has a per-layer scope (snip ranks globally, wanda per output row)"
    if m.group(4) is not None and m.group(4) not in QUANT_FORMATS:
        return (
            f"{name!r}: {m.group(4)!r} after '+' is not a quantization format; choose from {', '.join(QUANT_FORMATS)}"
        )
    return None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    source: str | None = Field(
        None,
        description="HF folder, HF hub id, or a .safetensors/.pt/.bin state dict. `--model` overrides it.",
    )
    module: str | None = Field(
        None,
        description="For a bare state dict: import path of the nn.Module class, 'package.module:Class'.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for `module` (for an HF model class: the fields of its config).",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer folder or hub id, for a bare state dict or to override the model's own."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Dtype the model is loaded in for auditing."
    )
    allow_nonfinite: bool = Field(
        False,
        description="Audit a checkpoint holding NaN or Inf weights (counted per tensor in the ingest record, "
        "details.nonfinite). Off: such a checkpoint is refused, naming the tensors.",
    )
    allow_partial_weights: bool = Field(
        False,
        description="Audit a checkpoint whose weights do not cover its model (keys missing: left at random "
        "initialisation; keys unexpected: dropped). Off: such a checkpoint is refused, naming the keys.",
    )

    @field_validator("module")
    @classmethod
    def _module_path(cls, v: str | None) -> str | None:
        if v is not None and ":" not in v:
            raise ValueError(f"'{v}' is not an import path; write it as 'package.module:ClassName'")
        return v


class DatasetConfig(Section):
    path: str | None = Field(
        None,
        description=".txt, .jsonl or .parquet file, or an HF datasets name; for an image classifier an .npz "
        "with `x` (N×C×H×W floats in [0, 1]) and `y` (N integer labels). `--dataset` overrides it.",
    )
    text_field: str = Field("text", description="Field (.jsonl) or column (.parquet) holding the text.")
    split: str = Field("train", description="Split to read for an HF datasets name.")
    encoding: str = Field(
        "utf-8",
        description="Text encoding of a .txt or .jsonl file, decoded strictly: a byte that is not valid in it is "
        "an error naming the line (latin-1, cp1252, utf-16, ... for files that are not UTF-8).",
    )
    txt_mode: Literal["lines", "file", "paragraphs"] = Field(
        "lines",
        description="How a .txt file splits into documents: one per line, per blank-line paragraph, or whole file.",
    )
    seq_len: int = Field(128, ge=2, le=65536, description="Tokens per packed window.")
    max_tokens: int = Field(
        65536,
        ge=2,
        description="Stop packing after this many tokens. The whole file is still read (its digest, encoding and "
        "records are checked), but documents past the windows are not tokenized.",
    )
    min_doc_tokens: int = Field(
        1,
        ge=1,
        description="Tokenized documents shorter than this (in tokens) fail validation; a document cut at "
        "max_tokens is read on to this length first.",
    )
    max_doc_tokens: int = Field(
        1_000_000,
        ge=1,
        description="Tokenized documents longer than this (in tokens) fail validation; a document cut at "
        "max_tokens counts the tokens read of it.",
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"'{v}' is not a text encoding Python knows; use e.g. utf-8, latin-1, cp1252") from None
        return v

    @model_validator(mode="after")
    def _windows_fit(self) -> DatasetConfig:
        if self.max_tokens < self.seq_len:
            raise ValueError(
                f"max_tokens={self.max_tokens} is smaller than seq_len={self.seq_len}; "
                "raise max_tokens or lower seq_len"
            )
        if self.min_doc_tokens > self.max_doc_tokens:
            raise ValueError("min_doc_tokens is larger than max_doc_tokens; swap or widen them")
        return self


class TraceConfig(Section):
    layers: list[int] | Literal["all"] = Field(
        "all", description="Block indices to trace (negative counts from the end), or 'all'."
    )
    hooks: list[HookName] = Field(
        default_factory=lambda: ["resid"],
        description="Hook points per block: resid (block output), mlp (MLP output), attn (attention output).",
    )
    batch_size: int = Field(16, ge=1, description="Windows per forward pass; halves on out-of-memory.")
    part_tokens: int = Field(
        65536, ge=1, description="Tokens per Parquet part file; a killed trace resumes at the last whole part."
    )
    row_group_tokens: int = Field(8192, ge=1, description="Rows per Parquet row group (streaming unit).")
    compression: Literal["none", "zstd", "lz4", "snappy"] = Field(
        "none", description="Parquet compression; activations barely compress, so 'none' is fastest."
    )
    near_zero: float = Field(1e-6, gt=0, description="|x| below this counts as a near-zero entry.")

    @field_validator("hooks")
    @classmethod
    def _hooks_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"list at least one hook; allowed: {', '.join(HOOK_NAMES)}")
        if len(set(v)) != len(v):
            raise ValueError("hooks are listed twice; list each once")
        return sorted(v, key=HOOK_NAMES.index)

    @field_validator("layers")
    @classmethod
    def _layers_unique(cls, v: list[int] | str) -> list[int] | str:
        if isinstance(v, list):
            if not v:
                raise ValueError("list at least one layer, or write 'all'")
            if len(set(v)) != len(v):
                raise ValueError("layers are listed twice; list each once")
        return v


class QuantizeConfig(Section):
    formats: list[str] = Field(
        default_factory=list,
        description="Variants to make: int8 (bitsandbytes LLM.int8), nf4, fp4 (bitsandbytes 4-bit), fp16, bf16, "
        "torch-int8 (weight-only, where bitsandbytes cannot run), and pruned what-ifs: magnitude-50 (global), "
        "magnitude-layer-50, snip-30, wanda-50, each optionally quantized after (wanda-50+nf4); no fine-tuning "
        "after pruning. Empty: no quantize stage.",
    )
    compute_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Compute dtype of the 4-bit formats."
    )
    double_quant: bool = Field(True, description="4-bit formats: quantize the block scales too.")
    fallback: dict[str, list[str]] = Field(
        default_factory=lambda: {"int8": ["torch-int8"], "nf4": ["fp4"], "fp16": ["bf16"], "bf16": ["fp16"]},
        description="On out-of-memory, the formats to try instead, in order.",
    )
    memory_fraction: float = Field(
        0.9, gt=0, le=1, description="Refuse a variant whose estimated weights exceed this share of free memory."
    )
    eval_windows: int = Field(8, ge=1, description="Held-out windows (the dataset's last) for fidelity.")
    trace_variants: bool = Field(True, description="Also trace each variant into the activation cache.")
    patches: dict[str, str] = Field(
        default_factory=dict,
        description="Steering patches audited as variants: name -> the folder `microscope patch export` wrote; "
        "list it in formats as patch-<name>.",
    )

    @field_validator("formats")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for f in v:
            if why := unknown_format(f):
                raise ValueError(why)
        if len(set(v)) != len(v):
            raise ValueError("a format is listed twice; list each once")
        return v

    @model_validator(mode="after")
    def _patches_named(self) -> QuantizeConfig:
        for f in self.formats:
            m = PATCH_FORMAT.fullmatch(f)
            if m and m.group(1) not in self.patches:
                raise ValueError(
                    f"formats lists {f} but quantize.patches has no {m.group(1)!r}: add {m.group(1)}: <folder>"
                )
        return self

    @field_validator("fallback")
    @classmethod
    def _known_fallback(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        bad = sorted({f for k, chain in v.items() for f in [k, *chain] if f not in QUANT_FORMATS})
        if bad:
            raise ValueError(f"unknown format(s) {bad} in the fallback chain; choose from {', '.join(QUANT_FORMATS)}")
        return v


class SAEConfig(Section):
    hooks: list[str] = Field(
        default_factory=list,
        description="Traced datasets to train an SAE on, by hook name (e.g. blocks.3.hook_resid_post). "
        "Empty: no SAE stage.",
    )
    joint: bool = Field(
        False,
        description="Train all sae.hooks in one task from one pass over the cache (rows are aligned); "
        "false: one task per hook, which fans out across workers.",
    )
    architecture: Literal["topk", "batchtopk", "relu", "jumprelu"] = Field("topk", description="SAE architecture.")
    expansion: int = Field(8, ge=1, description="d_sae = expansion × d_in (unless d_sae is set).")
    d_sae: int | None = Field(None, ge=1, description="Number of latents; overrides expansion.")
    k: int = Field(32, ge=1, description="Active latents per token (topk) or on average (batchtopk).")
    lr: float | Literal["auto"] = Field(3e-4, description="Adam learning rate, or 'auto' for Lightning's lr finder.")
    lr_warmup_steps: int = Field(50, ge=0, description="Linear learning-rate warm-up.")
    batch_size: int = Field(4096, ge=1, description="Tokens per optimiser step.")
    epochs: int = Field(5, ge=1, description="Passes over the training tokens.")
    buffer_tokens: int = Field(262144, ge=1, description="Shuffle buffer (bounded memory).")
    dead_window: int = Field(1_000_000, ge=1, description="A latent silent for this many tokens is dead.")
    aux_k: int | None = Field(None, ge=1, description="Dead latents used by the aux-k loss (default d_in / 2).")
    aux_coef: float = Field(1 / 32, ge=0, description="Weight of the aux-k loss.")
    l1_coef: float = Field(5.0, ge=0, description="relu: L1 weight β.")
    l1_warmup_steps: int = Field(200, ge=0, description="relu: linear warm-up of β.")
    resample_every: int = Field(500, ge=0, description="relu: resample dead latents every this many steps (0: never).")
    l0_coef: float = Field(1e-3, ge=0, description="jumprelu: L0 weight.")
    jumprelu_bandwidth: float = Field(1e-3, gt=0, description="jumprelu: straight-through kernel width.")
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = Field(
        "geometric_median", description="Decoder-bias initialisation from the data."
    )
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of windows (the last) held out for evaluation.")
    checkpoint_every: int = Field(200, ge=1, description="Steps between checkpoints (a killed fit resumes).")
    top_contexts: int = Field(8, ge=1, description="Top-activating contexts kept per feature.")
    context_tokens: int = Field(6, ge=0, description="Tokens shown on each side of an activating token.")
    top_logits: int = Field(
        8, ge=1, description="Top positive/negative logits per feature (models with an unembedding)."
    )

    @field_validator("hooks")
    @classmethod
    def _hook_names(cls, v: list[str]) -> list[str]:
        from schemas.hooks import is_hook_name

        bad = [h for h in v if not is_hook_name(h)]
        if bad:
            raise ValueError(f"{bad} are not hook names; write them as blocks.<layer>.hook_resid_post|mlp_out|attn_out")
        return v


class MetricsConfig(Section):
    near_zero: float = Field(1e-6, gt=0, description="|w| below this counts toward sparsity.")
    cond_floor: float = Field(1e-12, gt=0, description="σmin is floored at this × σmax for the condition number.")
    alpha_range: tuple[float, float] = Field((2.0, 6.0), description="Power-law α outside this range is flagged.")
    erank_floor: float = Field(0.1, gt=0, lt=1, description="Effective rank below this share of min(shape) is flagged.")
    robust_z: float = Field(3.5, gt=0, description="Condition numbers with a robust z-score above this are flagged.")
    sensitivity: bool = Field(True, description="Compute gradient norms, Fisher diagonal and Hutchinson traces.")
    sensitivity_windows: int = Field(2, ge=1, description="Windows (from the dataset's end) for the sensitivity loss.")
    hutchinson_probes: int = Field(16, ge=2, description="Rademacher probes per Hutchinson estimate.")
    cka_tokens: int = Field(2048, ge=8, description="Tokens sampled for CKA between layers and variants.")
    exact_max_dim: int = Field(
        4096, ge=2, description="Matrices whose smaller side exceeds this take the randomized spectrum path."
    )
    randomized_rank: int = Field(512, ge=1, description="Singular values the randomized path computes (the top ones).")
    weight_shards: int = Field(
        4, ge=1, le=256, description="Tasks the weight statistics fan out to (each loads the model once)."
    )
    compare_audits: list[str] = Field(
        default_factory=list,
        description="Audit ids of other checkpoints of the same training run, traced on the same dataset: "
        "CKA of each traced layer against theirs.",
    )


AttackNorm = Literal["Linf", "L2", "L1"]
AA_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")


class RobustnessConfig(Section):
    samples: int = Field(
        64, ge=2, description="Inputs evaluated (the same ones, with the same seeds, for every variant)."
    )
    batch_size: int = Field(64, ge=1, description="Inputs per attack batch.")
    norms: list[AttackNorm] = Field(default_factory=lambda: ["Linf"], description="Threat models AutoAttack runs.")
    eps: dict[str, float] = Field(
        default_factory=dict,
        description="AutoAttack ε per norm in [0, 1]-box units; defaults per surface: pixels Linf 8/255, L2 0.5, "
        "L1 12; embeddings Linf 0.02, L2 0.5, L1 4.",
    )
    version: Literal["standard", "plus", "rand", "custom"] = Field("standard", description="AutoAttack version.")
    attacks: list[str] = Field(default_factory=list, description="AutoAttack's attack list when version is custom.")
    sweep: list[float] = Field(
        default_factory=lambda: [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255],
        description="ε values (Linf, box units) of the PGD and FGSM sweeps; Gaussian noise uses them as σ.",
    )
    pgd_steps: int = Field(20, ge=1, description="PGD iterations per restart.")
    pgd_restarts: int = Field(
        2, ge=1, description="PGD restarts (random starts); a sample counts as robust if it survives all."
    )
    label: Literal["clean", "dataset"] = Field(
        "clean", description="Causal LMs: the label is the clean prediction or the dataset's next token."
    )
    context_tokens: int = Field(32, ge=2, description="Text: tokens per attacked input (the end of each window).")
    variants: bool = Field(True, description="Evaluate every quantized variant too.")
    feature_shifts: int = Field(10, ge=0, description="SAE features listed per hook by activation shift under attack.")

    @model_validator(mode="after")
    def _attacks_known(self) -> RobustnessConfig:
        unknown = [a for a in self.attacks if a not in AA_ATTACKS]
        if unknown:
            raise ValueError(f"unknown AutoAttack attack {unknown[0]!r}; choose from {', '.join(AA_ATTACKS)}")
        if self.version == "custom" and not self.attacks:
            raise ValueError("version 'custom' needs an attacks list, e.g. [apgd-ce, apgd-t]")
        if self.version != "custom" and self.attacks:
            raise ValueError("attacks is only used with version 'custom'; set version: custom or drop attacks")
        bad = [k for k in self.eps if k not in ("Linf", "L2", "L1")]
        if bad:
            raise ValueError(f"eps key {bad[0]!r} is not a norm; use Linf, L2 or L1")
        if any(e < 0 for e in self.sweep) or sorted(self.sweep) != list(self.sweep):
            raise ValueError("sweep must be non-negative ε values in increasing order")
        return self


# microscope/reliability/corruptions.py's ALL (a test keeps the two equal): the 15 of Hendrycks & Dietterich
CORRUPTION_NAMES: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "occlusion",
)  # fmt: skip
OodScore = Literal["msp", "energy", "mahalanobis", "knn"]
OOD_SCORES: tuple[str, ...] = ("msp", "energy", "mahalanobis", "knn")


class SmoothingConfig(Section):
    """Randomized-smoothing certificates (Cohen et al. 2019, CERTIFY) of an image classifier; off by default."""

    sigmas: list[float] = Field(
        default_factory=list, description="Noise levels σ (pixel units in [0, 1]) to certify at; [] turns it off."
    )
    samples: int = Field(100, ge=1, description="Evaluation images certified (the first of the held-out split).")
    n0: int = Field(100, ge=1, description="Noisy copies that choose the top class.")
    n: int = Field(1000, ge=1, description="Fresh noisy copies that estimate its probability.")
    alpha: float = Field(0.001, gt=0, lt=0.5, description="A certificate is wrong with probability at most α.")

    @field_validator("sigmas")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("sigmas must be positive noise levels, e.g. [0.25, 0.5]")
        return v


class ReliabilityConfig(Section):
    """Calibration, out-of-distribution detection and common corruptions (the reliability stage)."""

    samples: int = Field(
        1000,
        ge=2,
        description="In-distribution samples (images, or next-token positions of a causal LM): at least 1,000 "
        "where the dataset has them, all of them below that; calibration from a few dozen samples is noise.",
    )
    n_bins: int = Field(15, ge=2, le=1000, description="Equal-width bins of ECE, MCE, RMS-CE and the diagram.")
    temperature_split: float = Field(
        0.5, gt=0, lt=1, description="Share of the samples the temperature is fitted on; the rest evaluates it."
    )
    scores: list[OodScore] = Field(
        default_factory=lambda: list(OOD_SCORES), description="OOD scores: msp, energy, mahalanobis, knn."
    )
    knn_k: int | None = Field(
        None,
        ge=1,
        description="k of the k-NN distance score (normalised penultimate features); None: 0.1% of the fit split, "
        "at least 1 (Sun et al. 2022 use k = 50 of CIFAR-10's 50,000). A k near a class's size compares an "
        "in-distribution input with other classes and inverts the score.",
    )
    ood_dataset: str | None = Field(
        None,
        description="An OOD dataset the ingest stage can read (same modality); None: shifted sets made from the "
        "audit's own data (images: rotated and inverted, uniform noise; text: shuffled tokens, Python source).",
    )
    corruptions: list[str] | None = Field(
        None, description="Image corruptions to run (None: the 15 of Hendrycks & Dietterich and occlusion)."
    )
    severities: list[int] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5], description="Corruption severities (1-5) to run."
    )
    corruption_samples: int = Field(
        500, ge=1, description="Images per corruption and severity (the same ones for every corruption)."
    )
    baseline_errors: dict[str, dict[int, float]] | None = Field(
        None,
        description="Published errors (0-1) of a reference model per corruption and severity, e.g. AlexNet's for "
        "ImageNet-C: corruption errors (CE, mCE) are then normalised by them as in Hendrycks & Dietterich.",
    )
    baseline_clean_error: float | None = Field(
        None, ge=0, le=1, description="That reference model's clean error, for the relative mCE."
    )
    smoothing: SmoothingConfig = Field(default_factory=SmoothingConfig)
    batch_size: int = Field(256, ge=1, description="Inputs per forward pass.")
    variants: bool = Field(True, description="Evaluate every quantized variant on the same samples too.")

    @field_validator("corruptions")
    @classmethod
    def _corruptions_known(cls, v: list[str] | None) -> list[str] | None:
        unknown = [c for c in v or [] if c not in CORRUPTION_NAMES]
        if unknown:
            raise ValueError(f"unknown corruption {unknown[0]!r}; choose from {', '.join(CORRUPTION_NAMES)}")
        if v is not None and not v:
            raise ValueError("corruptions is empty; list some, or drop the key for all 16")
        return v

    @field_validator("baseline_errors")
    @classmethod
    def _baseline_known(cls, v: dict[str, dict[int, float]] | None) -> dict[str, dict[int, float]] | None:
        unknown = [c for c in v or {} if c not in CORRUPTION_NAMES]
        if unknown:
            raise ValueError(
                f"baseline_errors: unknown corruption {unknown[0]!r}; choose from {', '.join(CORRUPTION_NAMES)}"
            )
        bad = [
            (c, s) for c, by in (v or {}).items() for s, e in by.items() if s not in (1, 2, 3, 4, 5) or not 0 <= e <= 1
        ]
        if bad:
            raise ValueError(
                f"baseline_errors[{bad[0][0]}][{bad[0][1]}]: severities are 1-5 and errors between 0 and 1"
            )
        return v

    @field_validator("severities")
    @classmethod
    def _severities_known(cls, v: list[int]) -> list[int]:
        if not v or any(s not in (1, 2, 3, 4, 5) for s in v):
            raise ValueError("severities must be a non-empty list of 1 to 5, e.g. [1, 3, 5]")
        return sorted(set(v))


class AttributionConfig(Section):
    """Which inputs drive the model's decisions and through which blocks (the attribution stage)."""

    samples: int = Field(
        8, ge=1, le=256, description="Images or texts attributed (the same seeded ones for every method)."
    )
    ig_steps: int = Field(
        64,
        ge=2,
        le=4096,
        description="Integrated Gradients: Gauss-Legendre points; the completeness delta says if enough.",
    )
    baseline: Literal["zeros", "mean"] = Field(
        "zeros",
        description="Integrated Gradients' baseline: zeros (black image, zero embeddings) or the dataset's mean input; "
        "recorded with the results.",
    )
    smoothgrad_samples: int = Field(
        16, ge=1, le=1024, description="SmoothGrad: noisy copies per input (Captum's default is 5)."
    )
    smoothgrad_sigma: float = Field(
        0.15,
        gt=0,
        le=1,
        description="SmoothGrad: noise σ as a share of the input's range (Captum's default is 1.0 absolute).",
    )
    layer_steps: int = Field(32, ge=2, le=1024, description="Layer Integrated Gradients' points, per traced block.")
    randomisation: bool = Field(
        True,
        description="The model-randomisation check (Adebayo et al. 2018): re-initialise the last layer, compare maps.",
    )
    max_tokens: int = Field(48, ge=2, le=1024, description="Text: tokens of each attributed text (its first ones).")
    variants: bool = Field(False, description="Attribute every quantized variant on the same samples too.")


class LandscapeConfig(Section):
    """Curvature of the loss and loss-landscape slices (the landscape stage); diagnostics to compare checkpoints
    of one run or a model with its variants, not across models."""

    samples: int = Field(
        1000,
        ge=1,
        description="Fixed, recorded loss subset: images, or predicted tokens of a causal LM; at least 1,000 where the "
        "dataset has them (Hessian estimates from 128 samples vary tenfold).",
    )
    eigenvalues: int = Field(3, ge=0, le=20, description="Top Hessian eigenvalues by power iteration (0: none).")
    power_iters: int = Field(50, ge=1, le=1000, description="Power-iteration steps per eigenvalue at most.")
    power_tol: float = Field(1e-3, gt=0, description="Relative change of the eigenvalue that stops the iteration.")
    grid: int = Field(21, ge=3, le=101, description="Points per axis of the 1-D and 2-D slices (odd: includes 0).")
    span: float = Field(
        1.0, gt=0, le=10, description="Slices run over α, β in [-span, span] (filter-normalised units)."
    )
    slice_2d: bool = Field(True, description="Also the grid × grid 2-D slice (grid² loss evaluations).")
    sharpness_eps: float = Field(1e-3, gt=0, le=1, description="ε of Keskar's ε-sharpness (box relative to |θ|).")
    sharpness_rho: float = Field(0.05, gt=0, le=10, description="ρ of SAM's ρ-sharpness.")
    adaptive: bool = Field(False, description="Adaptive (ASAM, Kwon et al. 2021) ρ-sharpness instead of SAM's.")
    batch_size: int = Field(256, ge=1, description="Samples per forward pass of the loss.")
    variants: bool = Field(False, description="Also every variant (pruned ones keep gradients; quantized may not).")


class ReportConfig(Section):
    title: str | None = Field(None, description="Report title; defaults to the model's name.")
    max_modules: int = Field(60, ge=1, description="Rows of the parameters-per-module table.")


class GateConfig(Section):
    rules: str | list[dict[str, Any]] | None = Field(
        None,
        description="Gate rules judged at the end of the audit: a gates.yaml path, a name under examples/ "
        "(gates: the shipped defaults) or a list of rules; None: no gate.",
    )
    baseline: str | None = Field(
        None,
        description="Overrides the rules' baseline: previous, first, none, an audit id or tag:KEY[=VALUE].",
    )
    wait_previous_s: float = Field(
        300.0,
        ge=0,
        description="With baseline previous (or first): how long the gate waits, polling the store, for an audit "
        "of a lower step of the same run that is still in progress and would be the baseline (checkpoints saved "
        "faster than they are audited are audited side by side). When it does not end in time, relative rules "
        "are skipped, naming that audit; 0: never wait.",
    )


class AuditConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    trace: TraceConfig = Field(default_factory=TraceConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    reliability: ReliabilityConfig = Field(default_factory=ReliabilityConfig)
    landscape: LandscapeConfig = Field(default_factory=LandscapeConfig)
    attribution: AttributionConfig = Field(default_factory=AttributionConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    seed: int = Field(0, description="Seed for anything random in the audit.")


def canonical_hash(obj: Any, length: int = 16) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace), truncated to `length` hex digits."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


class ConfigError(ValueError):
    """A config file that does not validate; the message names the key and what is allowed."""


def describe_validation_error(err: ValidationError, origin: str) -> str:
    """One line per problem: `dataset.seq_len: Input should be ... (got 'x')`."""
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            section = _section_for(e["loc"][:-1])
            allowed = ", ".join(sorted(section.model_fields)) if section else "?"
            parts.append(f"unknown key '{key}' in {origin}; allowed here: {allowed}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            parts.append(f"{key}: {e['msg']}{got_s}")
    return "; ".join(parts)


def _section_for(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = AuditConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def resolve_config(config: str | Path | dict[str, Any] | None, overrides: dict[str, Any] | None = None) -> AuditConfig:
    """A config given as a YAML path, a name under `examples/` (`demo` → examples/demo.yaml) or an
    inline mapping (a deployment's or a webhook's parameters)."""
    if isinstance(config, dict):
        return _validate(_apply(copy.deepcopy(config), overrides), "the inline config")
    if config is not None and not Path(config).is_file():
        named = EXAMPLES / f"{config}.yaml"
        if named.is_file() and "/" not in str(config):
            return load_config(named, overrides)
        known = ", ".join(sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
        raise ConfigError(f"config {config!r} is neither a YAML file nor a name under examples/ ({known})")
    return load_config(config, overrides)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> AuditConfig:
    """Read a YAML config (or defaults when `path` is None) and apply dotted-key overrides."""

    data: dict[str, Any] = {}
    origin = "the defaults"
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass an existing YAML file to --config")
        loaded = read_yaml(p)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping of sections (model, dataset, trace, ...)")
        data = loaded
    return _validate(_apply(data, overrides), origin)


MAX_CONFIG_BYTES = 1 << 20


def read_yaml(p: Path) -> Any:
    """A config-sized YAML file (configs, gate rules), parsed strictly: at most 1 MiB, no key given twice,
    no aliases; every refusal one line naming the file and line."""
    import yaml

    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p} is {p.stat().st_size} bytes; a config is a few KB (at most {MAX_CONFIG_BYTES})")
    try:
        with open(p, encoding="utf-8") as f:  # a file: errors name it
            return yaml.load(f, Loader=_strict_loader())  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p} is not valid YAML{where}; fix the syntax") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def _strict_loader() -> type:
    """yaml's SafeLoader, refusing what it accepts silently: a key given twice (the last one won) and
    anchors/aliases (a few lines of them expand to gigabytes: the "billion laughs")."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ConfigError(
                    f"{self.name} line {mark.line + 1}: YAML aliases (*name) are not accepted in a config "
                    "(they can expand without bound); write the values out"
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise ConfigError(
                        f"{self.name} line {key_node.start_mark.line + 1}: key {key!r} is given twice; keep one"
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def _apply(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *heads, last = dotted.split(".")
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = value
    return data


def _validate(data: dict[str, Any], origin: str) -> AuditConfig:
    try:
        return AuditConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, origin)) from None
