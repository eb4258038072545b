"""One glossary of every column and headline figure the records produce: a short label, what it is and how it
is computed, which direction is good, its kind (how `microscope.formatting.fmt` shows it) and the
modalities it applies to. The viewer and the report both read it, so a figure has one name everywhere.

`lookup(key)` takes a layer-table column (`alpha`, `sae_fvu[int8].mlp`, `cka_prev.resid`), a headline
figure alone (`kl_mean`) or with its source (`quantize[int8].kl_mean`, `sae[blocks.1.hook_resid_post].fvu`,
as `microscope.audits.headline` keys them) or a detail such as `drift.<hook name>`; families of keys
(variants in brackets, hook kinds after a dot, OOD sets and scores, smoothing radii) resolve through the
patterns below. A key the glossary does not know gives None: tests check that none of the records' keys
does, so a new column cannot appear unexplained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

CAUSAL_LM, ENCODER, CLASSIFIER = "causal_lm", "encoder", "classifier"
ALL = frozenset({CAUSAL_LM, ENCODER, CLASSIFIER})
TEXT = frozenset({CAUSAL_LM, ENCODER})
LM = frozenset({CAUSAL_LM})
IMAGES = frozenset({CLASSIFIER})
PROBS = frozenset({CAUSAL_LM, CLASSIFIER})  # models with output probabilities
BETTER = ("higher", "lower", "neither")  # or "closer to <value>"
HOOKS = {"resid": "residual stream", "mlp": "MLP output", "attn": "attention output"}


@dataclass(frozen=True)
class Term:
    key: str
    label: str
    help: str
    better: str = "neither"
    kind: str = "number"
    modalities: frozenset[str] = ALL

    def applies_to(self, modality: str) -> bool:
        return modality in self.modalities


def _t(
    key: str, label: str, help: str, better: str = "neither", kind: str = "number", mods: frozenset[str] = ALL
) -> Term:
    return Term(key, label, help, better, kind, mods)


# A table, one term a line (long help texts stay on their line: ruff format would split each into six).
# fmt: off
_TERMS = [
    # ---- the layer table: identity ----
    _t("name", "matrix", "The weight's state-dict name (a block's module path when no weights were measured).", kind="text"),
    _t("layer", "block", "Index of the block the matrix belongs to; -1 outside the blocks (embeddings, heads).", kind="count"),
    _t("role", "role", "The matrix's name inside its block (e.g. mlp.c_fc), the same in every block.", kind="text"),
    _t("rows", "rows", "Output dimension of the matrix as measured.", kind="count"),
    _t("cols", "cols", "Input dimension of the matrix (a conv kernel's in·k·k).", kind="count"),
    # ---- weight statistics (metrics stage) ----
    _t("l1", "L1 norm", "Sum of the absolute values of the weights.", kind="number"),
    _t("frobenius", "Frobenius norm", "‖W‖_F: square root of the sum of squared weights."),
    _t("spectral_norm", "spectral norm", "σmax, the largest singular value: how much the matrix can stretch an input.", "lower"),
    _t("condition_number", "condition number", "σmax / σmin: large values mean a nearly singular, ill-conditioned matrix.", "lower"),
    _t("condition_z", "condition z-score", "Robust z-score 0.6745·(x − median)/MAD of log10 condition number across the model's matrices; flagged when large.", "lower"),
    _t("effective_rank", "effective rank", "exp of the entropy of the normalised singular values: how many directions the matrix really uses.", "higher"),
    _t("effective_rank_share", "effective rank share", "Effective rank / min(rows, cols); a collapse is flagged when small.", "higher", "percent"),
    _t("stable_rank", "stable rank", "‖W‖_F² / σmax²: a noise-robust count of the significant directions.", "higher"),
    _t("sparsity", "sparsity", "Fraction of the weights that are exactly zero.", kind="percent"),
    _t("alpha", "power-law α", "Exponent of the power-law fit to the tail of the eigenvalue density of WᵀW (WeightWatcher's α); 2–6 is the well-trained range.", "closer to 2–6"),
    _t("alpha_weighted", "weighted α", "α · log10(λmax): the power-law exponent weighted by the largest eigenvalue.", "lower"),
    _t("xmin", "fit xmin", "Smallest eigenvalue included in the power-law fit (chosen by minimising the KS distance)."),
    _t("ks_distance", "KS distance", "Kolmogorov–Smirnov distance between the eigenvalue tail and the fitted power law: the fit's quality.", "lower"),
    _t("mp_spikes", "MP spikes", "Singular values above the Marchenko–Pastur bulk edge of a random matrix of the same shape and scale: learned structure.", kind="count"),
    _t("n_singular_values", "singular values", "How many singular values were computed (all on the exact path, the top ones on the randomized path).", kind="count"),
    _t("spectrum", "spectrum path", "exact (full SVD) or randomized (top singular values only, for large matrices).", kind="text"),
    _t("anomaly", "anomaly", "Whether the metrics stage flagged the matrix (α out of range, effective-rank collapse, conditioning outlier).", "lower", "flag"),
    _t("anomalies", "flagged figures", "Which figures were flagged: alpha, effective_rank, condition_number.", kind="text"),
    _t("anomaly_reasons", "why flagged", "The metrics stage's flag texts, with the values that tripped them.", kind="text"),
    # ---- sensitivity ----
    _t("grad_norm", "gradient norm", "‖∇W loss‖ on the sensitivity batch: how strongly the loss pulls on this matrix."),
    _t("fisher_trace", "Fisher trace", "Sum of the empirical Fisher diagonal (mean squared per-sample gradient): the loss's sensitivity to the matrix."),
    _t("fisher_max", "Fisher max", "Largest entry of the empirical Fisher diagonal: the single most sensitive weight."),
    _t("hessian_trace", "Hessian trace", "Hutchinson estimate of the trace of the loss Hessian restricted to the matrix: curvature."),
    _t("hessian_trace_se", "Hessian trace SE", "Standard error of the Hutchinson estimate over its probes.", "lower"),
    # ---- per block, per hook (resolved with the hook kind and variant) ----
    _t("act_mean_norm", "mean activation norm", "Mean ‖h‖ of the traced activation vectors.", mods=TEXT),
    _t("act_max_norm", "max activation norm", "Largest ‖h‖ among the traced activation vectors: outlier activations.", "lower", mods=TEXT),
    _t("act_near_zero_frac", "near-zero share", "Fraction of activation entries near zero.", kind="percent", mods=TEXT),
    _t("quant_cosine", "activation cosine", "Mean cosine between the variant's and full precision's activations at this hook.", "higher", mods=TEXT),
    _t("quant_rel_error", "activation rel. error", "Mean ‖h_q − h‖ / ‖h‖ of the variant's activations against full precision.", "lower", mods=TEXT),
    _t("sae_fvu", "SAE FVU", "Fraction of variance unexplained by the SAE's reconstruction: Σ‖x − x̂‖² / Σ‖x − x̄‖² on held-out activations.", "lower", mods=TEXT),
    _t("sae_l0", "SAE L0", "Mean number of SAE latents active per token.", kind="number", mods=TEXT),
    _t("sae_mse", "SAE MSE", "Mean squared reconstruction error per token (summed over the model dimension).", "lower", mods=TEXT),
    _t("sae_dead_frac", "SAE dead latents", "Share of SAE latents that never fired on the held-out activations.", "lower", "percent", TEXT),
    _t("sae_dense_frac", "SAE dense latents", "Share of SAE latents firing on more than 10% of tokens.", "lower", "percent", TEXT),
    _t("sae_ce_recovered", "SAE CE recovered", "(CE zero-ablated − CE spliced) / (CE zero-ablated − CE clean): the share of the model's loss the SAE preserves when spliced in.", "higher", "percent", LM),
    _t("cka_prev", "CKA to previous", "Linear CKA between this block's activations and the previous traced block's at the same hook.", mods=TEXT),
    _t("cka_next", "CKA to next", "Linear CKA between this block's activations and the next traced block's at the same hook.", mods=TEXT),
    _t("cka", "CKA vs fp", "Linear CKA between full precision's and the variant's activations at this hook.", "higher", mods=TEXT),
    _t("attack_shift", "attack shift", "Mean ‖h_adv − h‖ / ‖h‖ under PGD at the largest ε.", "lower", mods=TEXT),
    _t("drift", "activation drift", "The variant's activation drift at this hook against full precision (cosine, relative error).", "lower", mods=TEXT),
    # ---- ingest ----
    _t("n_params", "parameters", "Parameters of the model (tied weights counted once).", kind="count"),
    _t("n_layers", "blocks", "Transformer blocks the architecture reports (none for a CNN).", kind="count", mods=TEXT),
    _t("n_documents", "documents", "Documents in the dataset.", kind="count", mods=TEXT),
    _t("n_tokens", "tokens", "Tokens packed into windows: what the model sees.", kind="count", mods=TEXT),
    _t("n_windows", "windows", "Token windows of seq_len the dataset was packed into.", kind="count", mods=TEXT),
    _t("n_images", "images", "Images in the dataset.", kind="count", mods=IMAGES),
    _t("n_classes", "classes", "Distinct labels in the dataset.", kind="count", mods=IMAGES),
    # ---- quantize ----
    _t("estimated_bytes", "memory (estimated)", "Weight memory the format should need: quantized weights × their bytes + everything else at its dtype.", "lower", "bytes"),
    _t("measured_bytes", "memory", "Bytes of every tensor the variant holds (quantized weights, scales, state).", "lower", "bytes"),
    _t("fp_bytes", "memory (fp)", "Bytes of every tensor of the full-precision model, measured the same way.", kind="bytes"),
    _t("on_disk_bytes", "on disk", "Size of the variant's saved files.", "lower", "bytes"),
    _t("memory_ratio", "memory vs fp", "measured_bytes / fp_bytes of the variant.", "lower", "percent"),
    _t("kl_mean", "KL mean", "Mean KL(p_fp ‖ p_q) between full precision's and the variant's next-token (or class) distributions.", "lower", mods=PROBS),
    _t("kl_p99", "KL p99", "99th percentile of the per-token KL(p_fp ‖ p_q).", "lower", mods=PROBS),
    _t("top1_agreement", "top-1 agreement", "Share of positions where the variant's top prediction equals full precision's.", "higher", "percent", PROBS),
    _t("ref_token_abs_dp_mean", "mean |Δp| of target", "Mean |p_q − p_fp| of the reference (next) token's probability.", "lower", mods=LM),
    _t("ppl_fp", "perplexity (fp)", "exp of the mean next-token cross-entropy of the full-precision model on the held-out windows.", "lower", mods=LM),
    _t("ppl_q", "perplexity (variant)", "exp of the variant's mean next-token cross-entropy on the same windows.", "lower", mods=LM),
    _t("delta_ppl", "Δ perplexity", "Perplexity of the variant minus full precision's.", "lower", mods=LM),
    _t("min_cosine", "min activation cosine", "Lowest mean activation cosine against full precision over the traced hooks.", "higher", mods=TEXT),
    _t("max_rel_error", "max activation rel. error", "Largest mean ‖h_q − h‖ / ‖h‖ over the traced hooks.", "lower", mods=TEXT),
    _t("quantize.sparsity", "pruned share", "Share of the pruned matrices' weights set to zero (a pruning variant).", kind="percent"),
    _t("accuracy_fp", "accuracy (fp)", "Top-1 accuracy of the full-precision classifier on the held-out images.", "higher", "percent", IMAGES),
    _t("accuracy_q", "accuracy (variant)", "Top-1 accuracy of the variant on the same images.", "higher", "percent", IMAGES),
    _t("delta_accuracy", "Δ accuracy", "Accuracy of the variant minus full precision's.", "higher", "percent", IMAGES),
    # ---- trace ----
    _t("trace.tokens", "tokens traced", "Tokens run through the model with hooks on.", kind="count", mods=TEXT),
    _t("datasets", "activation datasets", "(layer, hook) datasets written to the activation cache.", kind="count", mods=TEXT),
    _t("final_batch_size", "final batch size", "Batch size the trace ended with (halved on out-of-memory).", kind="count", mods=TEXT),
    _t("oom_halvings", "OOM halvings", "Times the batch size was halved after running out of memory.", "lower", "count", TEXT),
    _t("tokens_per_s", "tokens / s", "Trace throughput: tokens traced per second of wall time.", "higher", mods=TEXT),
    # ---- sae (headline per hook) ----
    _t("fvu", "FVU", "Fraction of variance unexplained by the SAE: Σ‖x − x̂‖² / Σ‖x − x̄‖² on held-out activations.", "lower", mods=TEXT),
    _t("l0", "L0", "Mean number of SAE latents active per token.", mods=TEXT),
    _t("mse", "MSE", "Mean squared reconstruction error per token (summed over the model dimension).", "lower", mods=TEXT),
    _t("dead_frac", "dead latents", "Share of SAE latents that never fired on the held-out activations.", "lower", "percent", TEXT),
    _t("dense_frac", "dense latents", "Share of SAE latents firing on more than 10% of tokens.", "lower", "percent", TEXT),
    _t("ce_recovered", "CE recovered", "(CE zero-ablated − CE spliced) / (CE zero-ablated − CE clean): the share of the loss the SAE preserves.", "higher", "percent", LM),
    _t("ce_clean", "CE clean", "Next-token cross-entropy of the model as it is, on the held-out windows.", "lower", mods=LM),
    _t("ce_spliced", "CE spliced", "Cross-entropy with the SAE's reconstruction spliced in at its hook.", "lower", mods=LM),
    _t("ce_zero_ablated", "CE zero-ablated", "Cross-entropy with the hook's activations set to zero.", mods=LM),
    _t("steps", "training steps", "Optimiser steps the SAE was trained for.", kind="count", mods=TEXT),
    _t("lr", "learning rate", "The SAE's learning rate.", mods=TEXT),
    _t("kl_clean_spliced", "KL(clean‖spliced)", "Mean KL between the model's next-token distributions without and with the SAE spliced in.", "lower", mods=LM),
    _t("embedding_cosine", "embedding cosine", "Mean cosine between the SAE's decoder directions and the nearest token embeddings.", mods=LM),
    _t("sae.tokens", "held-out tokens", "Activation rows the SAE was evaluated on.", kind="count", mods=TEXT),
    _t("d_sae", "latents", "Latents of the SAE (expansion × model width).", kind="count", mods=TEXT),
    _t("fvu_shift", "FVU shift", "FVU on the variant's activations minus FVU on full precision's.", "lower", mods=TEXT),
    _t("l0_shift", "L0 shift", "L0 on the variant's activations minus L0 on full precision's.", "closer to 0", mods=TEXT),
    # ---- metrics ----
    _t("matrices", "matrices", "2-D weights (conv kernels as out × in·k·k) the metrics stage measured.", kind="count"),
    _t("flagged", "flagged matrices", "Matrices the metrics stage flagged as anomalous.", "lower", "count"),
    _t("randomized", "randomized spectra", "Matrices measured on the randomized (top singular values only) path.", kind="count"),
    _t("alpha_mean", "mean α", "Mean power-law α over the matrices with a fit; 2–6 is the well-trained range.", "closer to 2–6"),
    _t("alpha_weighted_mean", "mean weighted α", "Mean of α · log10(λmax) over the matrices with a fit.", "lower"),
    _t("hessian_trace_total", "Hessian trace (total)", "Sum of the matrices' Hutchinson Hessian-trace estimates: the loss's total curvature.", "lower"),
    _t("fisher_trace_total", "Fisher trace (total)", "Sum of the matrices' empirical-Fisher traces.", "lower"),
    # ---- robustness ----
    _t("clean_accuracy", "clean accuracy", "Accuracy on the attacked samples before any attack.", "higher", "percent"),
    _t("robustness.samples", "attacked samples", "Samples the attacks ran on.", kind="count"),
    _t("pgd_min", "PGD accuracy", "Accuracy under PGD at the largest ε of the sweep.", "higher", "percent"),
    _t("fgsm_min", "FGSM accuracy", "Accuracy under FGSM at the largest ε of the sweep.", "higher", "percent"),
    _t("noise_min", "noise accuracy", "Lowest accuracy under random noise over the sweep's σ.", "higher", "percent"),
    # ---- reliability ----
    _t("reliability.samples", "evaluated samples", "Samples the calibration and OOD figures were measured on.", kind="count"),
    _t("accuracy", "accuracy", "Top-1 accuracy on the evaluated samples.", "higher", "percent", PROBS),
    _t("ece", "ECE", "Expected calibration error: confidence-weighted mean |accuracy − confidence| over 15 equal-width bins.", "lower", mods=PROBS),
    _t("ace", "ACE", "Adaptive calibration error: ECE over equal-mass bins.", "lower", mods=PROBS),
    _t("mce", "MCE", "Maximum calibration error: the largest |accuracy − confidence| of a bin.", "lower", mods=PROBS),
    _t("rms_ce", "RMS CE", "Root-mean-square calibration error over the bins.", "lower", mods=PROBS),
    _t("classwise_ece", "class-wise ECE", "ECE of each class's probability, averaged over the classes.", "lower", mods=PROBS),
    _t("nll", "NLL", "Mean negative log-likelihood of the true label.", "lower", mods=PROBS),
    _t("brier", "Brier score", "Mean squared error between the predicted probabilities and the one-hot label.", "lower", mods=PROBS),
    _t("temperature", "temperature", "Temperature T fitted on a held-out split to minimise NLL (T > 1: overconfident).", "closer to 1", mods=PROBS),
    _t("ece_before_ts", "ECE before T", "ECE on the held-out split before temperature scaling.", "lower", mods=PROBS),
    _t("ece_after_ts", "ECE after T", "ECE on the held-out split after temperature scaling.", "lower", mods=PROBS),
    _t("nll_before_ts", "NLL before T", "NLL on the held-out split before temperature scaling.", "lower", mods=PROBS),
    _t("nll_after_ts", "NLL after T", "NLL on the held-out split after temperature scaling.", "lower", mods=PROBS),
    _t("aurc", "AURC", "Area under the risk–coverage curve of selective prediction by confidence.", "lower", mods=PROBS),
    _t("mean_corruption_accuracy", "mean corruption accuracy", "Accuracy averaged over the common corruptions and severities.", "higher", "percent", IMAGES),
    _t("corruption_mce", "mCE", "Mean corruption error: 100 · the variant's errors over full precision's, averaged over the corruptions (100 = as robust).", "lower", mods=IMAGES),
    _t("corruption_relative_mce", "relative mCE", "Like mCE, on the growth of the error over the clean error (100 = degrades as full precision does).", "lower", mods=IMAGES),
    _t("corruption_mce_published", "mCE (baseline)", "Mean corruption error relative to the configured baseline's published errors.", "lower", mods=IMAGES),
    _t("corruption_relative_mce_published", "relative mCE (baseline)", "Relative mCE against the configured baseline's published errors.", "lower", mods=IMAGES),
    # ---- landscape ----
    _t("loss", "loss", "Mean loss over the landscape's fixed subset at the checkpoint's weights.", "lower"),
    _t("lambda_max", "λmax", "Largest eigenvalue of the loss Hessian (power iteration): the curvature of the sharpest direction; larger is sharper.", "lower"),
    _t("slice_1d_curvature", "1-D slice curvature", "Second derivative at 0 of the loss along a filter-normalised random direction (the 1-D slice).", "lower"),
    _t("rho_sharpness", "ρ-sharpness", "L(θ + ρ·g/‖g‖) − L(θ): the loss rise after one normalised gradient-ascent step of size ρ (SAM, Foret et al. 2021; ASAM's scale-invariant step when adaptive).", "lower"),
    _t("eps_sharpness", "ε-sharpness", "100·(max L − L)/(1 + L) over the box |δ| ≤ ε·(|θ| + 1), by projected ascent (Keskar et al. 2017): the largest relative loss rise (%) near the weights; larger is a sharper minimum.", "lower"),
    _t("lipschitz_upper", "Lipschitz bound", "Product of the Linear and conv weights' spectral norms: an upper bound on how much the output can move per unit of input, valid for a plain chain of layers only.", "lower", mods=IMAGES),
    _t("jacobian_norm", "input-Jacobian norm", "Mean Frobenius norm of the input-output Jacobian: the measured local input sensitivity.", "lower"),
    # ---- attribution ----
    _t("attribution.samples", "attributed samples", "Samples the attributions were computed on.", kind="count"),
    _t("completeness_max_rel", "IG completeness (max)", "Largest |Σ attributions − (f(x) − f(baseline))| / |f(x) − f(baseline)| of Integrated Gradients.", "lower"),
    _t("completeness_mean_rel", "IG completeness (mean)", "Mean relative completeness error of Integrated Gradients.", "lower"),
    _t("randomisation_spearman", "randomisation Spearman", "Rank correlation between attributions before and after randomising the weights (sanity check: low is good).", "lower"),
    _t("top_block_share", "top block share", "Largest share of the layer attribution held by one block.", kind="percent"),
    _t("block", "block", "A block of the model (a top-level module for a CNN) that the figures are summed over.", kind="text"),
    _t("attribution_pct", "attribution %", "Share of the layer attribution (Σ |LayerIG|) that flows through the block, in percent.", kind="number"),
    _t("fisher_pct", "Fisher %", "The block's share of the model's empirical-Fisher trace, in percent: where the loss is sensitive.", kind="number"),
    _t("hessian_pct", "Hutchinson %", "The block's share of the model's Hutchinson Hessian-trace estimate, in percent.", kind="number"),
    # ---- OOD detection (reliability) ----
    _t("ood_set", "OOD set", "The out-of-distribution inputs scored against the in-distribution ones.", kind="text", mods=PROBS),
    _t("score", "score", "The OOD score: msp (max softmax probability), energy (logsumexp of the logits), or the negated mahalanobis or k-NN distance in the embedding; higher looks in-distribution.", kind="text"),
    _t("auroc", "AUROC", "Area under the ROC curve separating in-distribution (positive) from OOD inputs by the score; 0.5 is chance.", "higher"),
    _t("aupr_in", "AUPR in", "Area under the precision–recall curve with in-distribution inputs as positives.", "higher"),
    _t("aupr_out", "AUPR out", "Area under the precision–recall curve with OOD inputs as positives (the score negated).", "higher"),
    _t("fpr95_id_positive", "FPR95 (ID+)", "Share of OOD inputs accepted when 95% of in-distribution inputs are kept (the energy paper's convention).", "lower", "percent"),
    _t("fpr95_ood_positive", "FPR95 (OOD+)", "Share of in-distribution inputs flagged when 95% of OOD inputs are caught (OpenOOD v1.5's convention).", "lower", "percent"),
    _t("n_in", "n in", "In-distribution inputs scored.", kind="count"),
    _t("n_out", "n out", "OOD inputs scored.", kind="count"),
    _t("n_in_out", "n in / out", "In-distribution and OOD inputs scored.", kind="text"),
    # ---- randomized smoothing and corruptions (reliability, image classifiers) ----
    _t("sigma", "σ", "Standard deviation of the smoothed classifier's Gaussian noise, in [0, 1] pixel units.", mods=IMAGES),
    _t("images", "images", "Images the figures were computed on.", kind="count", mods=IMAGES),
    _t("samples", "samples", "Samples the figures were computed on (the same for every variant).", kind="count"),
    _t("abstained", "abstained", "Images on which the smoothed classifier abstained (the top class's lower confidence bound ≤ ½).", "lower", "count", IMAGES),
    _t("n0_n", "n0 / n", "Noisy copies per image to pick the top class (n0), then to bound its probability (n).", kind="text", mods=IMAGES),
    _t("corruption", "corruption", "A common corruption of Hendrycks & Dietterich (2019), written from the published definitions.", kind="text", mods=IMAGES),
    _t("severity", "severity", "Accuracy under the corruption at this severity (1 mild … 5 strong).", "higher", "percent", IMAGES),
    # ---- adversarial robustness details ----
    _t("pgd", "PGD accuracy", "Accuracy under our PGD sweep (L∞) at the ε of the column; a sample broken at ε counts as broken at every larger ε.", "higher", "percent"),
    _t("fgsm", "FGSM accuracy", "Accuracy under FGSM (L∞) at the ε of the column.", "higher", "percent"),
    _t("noise", "noise accuracy", "Accuracy under Gaussian noise of the column's σ: the floor any attack must beat.", "higher", "percent"),
    _t("robustness.vs_fp", "vs fp", "The variant's AutoAttack accuracy minus full precision's, in percentage points: negative is more brittle.", "higher", "text"),
    _t("autoattack_flags", "AutoAttack flags", "AutoAttack's own warnings, such as signs of gradient masking (a weak attack doing better than a strong one).", "lower", "text"),
    _t("feature_shift_total", "Σ |Δ| of top SAE features", "Sum of the mean |activation shift| under attack of the hook's SAE features that move most.", "lower", mods=TEXT),
    _t("mean_abs_shift", "mean |Δ|", "Mean |attacked − clean| activation of the feature over the attacked tokens.", "lower", mods=TEXT),
    _t("clean_mean", "clean mean", "Mean activation of the feature on the clean inputs.", mods=TEXT),
    _t("attacked_mean", "attacked mean", "Mean activation of the feature on the attacked inputs.", mods=TEXT),
    # ---- SAE features and activations ----
    _t("feature", "feature", "Index of the SAE latent.", kind="count", mods=TEXT),
    _t("density", "density", "Share of tokens on which the feature fires.", mods=TEXT),
    _t("top_contexts", "top contexts", "The tokens on which the feature fires most, with their left context (the activating token highlighted).", kind="text", mods=TEXT),
    _t("promotes", "promotes", "The tokens whose logits the feature's decoder direction raises most (through the unembedding).", kind="text", mods=LM),
    _t("hook", "hook", "Where the activations are read: a block's residual stream, MLP output or attention output.", kind="text", mods=TEXT),
    _t("module", "module", "The module path the hook reads.", kind="text"),
    _t("resid", "residual stream", "The block's output: the residual stream after the block.", kind="text", mods=TEXT),
    _t("mlp", "MLP output", "The output of the block's MLP, before it is added to the residual stream.", kind="text", mods=TEXT),
    _t("attn", "attention output", "The output of the block's attention, before it is added to the residual stream.", kind="text", mods=TEXT),
    _t("d", "width", "Dimension of the activation vectors at the hook.", kind="count", mods=TEXT),
    _t("act_std_norm", "activation norm std", "Standard deviation of ‖h‖ over the traced activation vectors.", mods=TEXT),
    _t("sae_arch", "SAE", "The SAE's architecture (ReLU, TopK, JumpReLU, gated).", kind="text", mods=TEXT),
    _t("on_variants", "on variants (ΔFVU, ΔL0)", "The same SAE on each variant's activations: FVU and L0 minus full precision's.", "lower", "text", TEXT),
    # ---- the report's other tables: identity and provenance ----
    _t("variant", "variant", "The model measured: fp is the checkpoint as saved, the others its quantization and pruning formats.", kind="text"),
    _t("made_as", "made as", "How the variant was made (library and method).", kind="text"),
    _t("shape", "shape", "rows × cols of the matrix as measured.", kind="text"),
    _t("why", "why", "What the metrics stage flagged and the value that tripped it.", kind="text"),
    _t("audit", "audit", "The audit (a checkpoint under a config) the figures come from.", kind="text"),
    _t("stage", "stage", "A stage of the pipeline (ingest → … → report).", kind="text"),
    _t("status", "status", "How the stage ended: completed, cached (a stored result reused), partial, skipped or failed.", kind="text"),
    _t("config_hash", "config hash", "Hash of the stage's inputs and settings: the key its cached result is stored under.", kind="text"),
    _t("summary", "summary", "The stage's headline figures.", kind="text"),
    _t("gate.rule", "rule", "A gate rule: a figure compared with the run's earlier checkpoints or a fixed bound.", kind="text"),
    _t("gate.outcome", "outcome", "pass, warn or fail: what the rule decided.", kind="text"),
    _t("gate.value", "value", "The figure this checkpoint has.", kind="number"),
    _t("gate.baseline", "baseline", "The figure the rule compares with (the earlier checkpoints' reference or the bound).", kind="number"),
    _t("gate.compared", "compared with", "The checkpoints the baseline was taken from.", kind="text"),
    _t("gate.offenders", "offenders / note", "The matrices or hooks that tripped the rule, or why it could not be evaluated.", kind="text"),
    _t("class_name", "class", "The model's Python class.", kind="text"),
    _t("family", "family", "The architecture family the adapters recognised (and the config's model_type).", kind="text"),
    _t("hidden_size", "hidden size", "Width of the residual stream.", kind="count", mods=TEXT),
    _t("n_heads", "attention heads", "Attention heads per block.", kind="count", mods=TEXT),
    _t("vocab_size", "vocabulary", "Tokens in the vocabulary.", kind="count", mods=TEXT),
    _t("dtype", "dtype", "The dtype the checkpoint's weights were saved in.", kind="text"),
    _t("model_kind", "kind", "A causal LM, an encoder or an image classifier, and whether it has an unembedding.", kind="text"),
    _t("module_type", "type", "The module's class.", kind="text"),
    _t("param_share", "share", "The module's share of the model's parameters.", kind="percent"),
    _t("source", "source", "Where the dataset came from (a path, a packaged text, a hub id).", kind="text"),
    _t("tokens_per_doc", "tokens per document", "Mean and largest number of tokens per document.", kind="text", mods=TEXT),
    _t("text_digest", "text digest", "SHA-256 of the dataset's text: the same digest means the same data.", kind="text"),
    _t("windows_x_seq_len", "windows × seq_len", "Token windows and their length.", kind="text", mods=TEXT),
    _t("expectation", "expectation", "A data-quality expectation (great-expectations) the dataset was checked against.", kind="text"),
    _t("result", "result", "Whether the dataset met the expectation.", kind="text"),
    _t("detail", "detail", "What great-expectations observed.", kind="text"),
    # ---- fan-out stages: how many parts (variants, SAEs) finished ----
    _t("succeeded", "parts done", "Parts of the stage (one per variant or per SAE) that finished.", "higher", "count"),
    _t("failed", "parts failed", "Parts of the stage (one per variant or per SAE) that failed; each names its error.", "lower", "count"),
    _t("sae.succeeded", "SAEs trained", "SAEs (one per hook) that finished training.", "higher", "count", TEXT),
    _t("sae.failed", "SAEs failed", "SAEs (one per hook) whose training failed; each names its error.", "lower", "count", TEXT),
    _t("quantize.succeeded", "variants made", "Variants (quantization or pruning formats) that were made and measured.", "higher", "count"),
    _t("quantize.failed", "variants failed", "Variants that could not be made; each names its error.", "lower", "count"),
    # ---- report ----
    _t("bytes", "report size", "Size of the rendered HTML report.", kind="bytes"),
    _t("report.bytes", "report size", "Size of the rendered HTML report.", kind="bytes"),
    # ---- stage table ----
    _t("seconds", "time", "Wall time of the computation that produced the record.", kind="seconds"),
]
# fmt: on
TERMS: dict[str, Term] = {t.key: t for t in _TERMS}
if len(TERMS) != len(_TERMS):  # a key defined twice: the second would silently win
    raise ValueError("duplicate glossary key")

_NUM = r"(\d+(?:\.\d+)?)"
# (pattern, builder from the match): families of keys whose parts vary per audit.
# fmt: off
_PATTERNS: list[tuple[re.Pattern[str], str, str, str, str, frozenset[str]]] = [
    (re.compile(r"auroc_(?P<score>[a-z]+)_(?P<set>.+)"), "AUROC {score} · {set}",
     "OOD detection AUROC of the {score} score against the '{set}' set (in-distribution positive).", "higher", "number", PROBS),
    (re.compile(r"auroc_(?P<score>[a-z]+)"), "AUROC {score}",
     "OOD detection AUROC of the {score} score, averaged over the OOD sets.", "higher", "number", PROBS),
    (re.compile(r"fpr95_(?P<score>[a-z]+)_(?P<set>.+)"), "FPR95 {score} · {set}",
     "False-positive rate on the '{set}' set at 95% true-positive rate of in-distribution samples ({score} score).", "lower", "percent", PROBS),
    (re.compile(r"certified_sigma(?P<sigma>\d+)_r(?P<r>\d+)"), "certified acc. σ={sigma}% r={r}%",
     "Randomized-smoothing certified accuracy at noise σ and radius r (both in hundredths).", "higher", "percent", IMAGES),
    (re.compile(r"r=(?P<r>\d+(?:\.\d+)?)"), "certified acc. r ≥ {r}",
     "Share of all images classified correctly by the smoothed classifier with a certified L2 radius of at least {r}.", "higher", "percent", IMAGES),
    (re.compile(r"autoattack_(?P<norm>\w+)"), "AutoAttack {norm}",
     "Robust accuracy under the standard AutoAttack ensemble ({norm} norm at its ε).", "higher", "percent", ALL),
    (re.compile(r"lambda_(?P<i>\d+)"), "λ{i}",
     "Eigenvalue {i} of the loss Hessian, largest first (power iteration with deflation).", "lower", "number", ALL),
    (re.compile(r"share_(?P<block>.+)"), "attribution share {block}",
     "Share of the layer attribution held by {block}.", "neither", "percent", ALL),
]
# fmt: on
_SOURCE = re.compile(r"(?P<stage>[a-z_]+)(?:\[(?P<qual>[^\]]+)\])?\.(?P<rest>.+)")
_COLUMN = re.compile(r"(?P<base>[a-z_0-9]+)(?:\[(?P<variant>[^\]]+)\])?(?:\.(?P<hook>resid|mlp|attn))?")
STAGES = ("ingest", "quantize", "trace", "sae", "metrics", "landscape", "robustness", "reliability", "attribution",
          "report", "gate", "drift")  # fmt: skip


def _pattern(name: str) -> Term | None:
    for rx, label, help_, better, kind, mods in _PATTERNS:
        if m := rx.fullmatch(name):
            parts = m.groupdict()
            return Term(name, label.format(**parts), help_.format(**parts), better, kind, mods)
    return None


def _bare(name: str, stage: str | None = None) -> Term | None:
    if stage is not None and (t := TERMS.get(f"{stage}.{name}")):
        return replace(t, key=name)
    return TERMS.get(name) or _pattern(name)


def lookup(key: str) -> Term | None:
    """The glossary's entry for `key` (see the module docstring for the forms), None if it has none."""
    if (t := _bare(key)) is not None:
        return t
    if (m := _SOURCE.fullmatch(key)) and m["stage"] in STAGES:
        stage, qual, rest = m["stage"], m["qual"], m["rest"]
        if stage == "drift":  # drift.<hook name>: quantize details per hook
            return replace(TERMS["drift"], key=key, label=f"activation drift · {rest}")
        if (t := _bare(rest, stage)) is not None:
            return replace(t, key=key, label=f"{t.label} ({qual})" if qual and stage != "sae" else t.label)
    if (m := _COLUMN.fullmatch(key)) and (m["variant"] or m["hook"]) and (t := _bare(m["base"])) is not None:
        where = ", ".join(x for x in (m["variant"], HOOKS.get(m["hook"] or "")) if x)
        return replace(t, key=key, label=f"{t.label} ({where})")
    return None


def label(key: str) -> str:
    """The glossary's label for `key`, else the key itself."""
    t = lookup(key)
    return t.label if t else key


def long_label(key: str) -> str:
    """The label with the SAE's hook kept (`sae[blocks.1.hook_resid_post].fvu` → "FVU (blocks.1.hook_resid_post)"),
    for pickers and chart titles that put figures of several SAEs side by side; else `label`."""
    t = lookup(key)
    if t is None:
        return key
    m = _SOURCE.fullmatch(key)
    return f"{t.label} ({m['qual']})" if m and m["stage"] == "sae" and m["qual"] else t.label


def modality(is_images: bool, is_causal: bool, has_unembedding: bool) -> str:
    """The glossary's modality of an audited model: a classifier of images, a causal LM (with logits over
    the vocabulary), else a text encoder."""
    if is_images:
        return CLASSIFIER
    return CAUSAL_LM if is_causal and has_unembedding else ENCODER
