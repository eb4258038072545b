"""The reliability stage's mathematics against the peer tools, on the same inputs, in one run.

    python benchmarks/reliability.py [--n 100000] [--reps 3]

- calibration: `calibration_figures` (ECE, ACE, MCE, RMS-CE, NLL, Brier, classwise ECE, the diagram, all in
  float64) vs torchmetrics' `multiclass_calibration_error` (one figure, L1, float32) on n × 10 logits;
- OOD figures: `detection_figures` (AUROC, AUPR in/out, FPR95 both ways, ROC) vs scikit-learn's
  `roc_auc_score` alone on n in- and n out-of-distribution scores;
- k-NN score: `ood.knn` vs scikit-learn's brute-force `NearestNeighbors` (10,000 × 10,000, d = 128, k = 50),
  and its distance GEMM as a fraction of this machine's fp32 matmul rate (benchmarks/floor.py);
- corruptions: images per second through all 16 corruptions × 5 severities (1,000 8×8 digits).
Prints best-of-reps times and the ratios (ours / peer) as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def best(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import torch
    from floor import matmul_gflops  # benchmarks/ is on sys.path when run as a script
    from sklearn.datasets import load_digits
    from sklearn.metrics import roc_auc_score
    from sklearn.neighbors import NearestNeighbors
    from torchmetrics.functional.classification import multiclass_calibration_error

    from microscope.reliability import calibration, corruptions, ood

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (args.n, 10))
    labels = rng.integers(0, 10, args.n)
    probs = torch.from_numpy(logits).softmax(-1).float()
    target = torch.from_numpy(labels)
    out: dict[str, Any] = {"n": args.n}

    ours = best(lambda: calibration.calibration_figures(logits, labels, 15), args.reps)
    peer = best(lambda: multiclass_calibration_error(probs, target, num_classes=10, n_bins=15), args.reps)
    out["calibration"] = {"ours_s": round(ours, 4), "torchmetrics_s": round(peer, 4), "ratio": round(ours / peer, 2)}

    s_in, s_out = rng.normal(1.5, 1, args.n), rng.normal(0, 1, args.n)
    y = np.r_[np.ones(args.n), np.zeros(args.n)]
    ours = best(lambda: ood.detection_figures(s_in, s_out), args.reps)
    peer = best(lambda: roc_auc_score(y, np.r_[s_in, s_out]), args.reps)
    out["ood_figures"] = {"ours_s": round(ours, 4), "sklearn_auroc_s": round(peer, 4), "ratio": round(ours / peer, 2)}

    train, query = rng.normal(size=(10_000, 128)), rng.normal(size=(10_000, 128))
    ours = best(lambda: ood.knn(train, query, 50), args.reps)

    def sklearn_knn() -> None:
        t = train / np.linalg.norm(train, axis=1, keepdims=True)
        q = query / np.linalg.norm(query, axis=1, keepdims=True)
        NearestNeighbors(n_neighbors=50, algorithm="brute").fit(t).kneighbors(q)

    peer = best(sklearn_knn, args.reps)
    gflops = matmul_gflops()
    gemm = 2 * 10_000 * 10_000 * 128 / 1e9  # the distance matrix's multiply-adds, in GFLOP
    out["knn"] = {"ours_s": round(ours, 3), "sklearn_s": round(peer, 3), "ratio": round(ours / peer, 2),
                  "fp32_matmul_gflops": round(gflops, 1), "gemm_share_of_time": round(gemm / gflops / ours, 3)}  # fmt: skip

    x = (load_digits().images[:1000, None] / 16.0).astype(np.float32)

    def all_corruptions() -> None:
        for name in corruptions.ALL:
            for sev in range(1, 6):
                corruptions.corrupt(x, name, sev, 0)

    t = best(all_corruptions, 1)
    out["corruptions"] = {"images": len(x), "passes": len(corruptions.ALL) * 5, "seconds": round(t, 2),
                          "images_per_s": round(len(x) * len(corruptions.ALL) * 5 / t)}  # fmt: skip
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
