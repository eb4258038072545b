"""AutoAttack as the robustness stage runs it (our wrapper: log capture, state file, exact clean
accuracy) vs calling pyautoattack directly, on the same model, samples and seed, in one run.

    python benchmarks/robustness.py [--samples 200] [--reps 2]

The model is the demo's digits CNN (trained on the spot, deterministic); AutoAttack standard, Linf 8/255.
Prints both times (best of --reps, alternating order), the ratio and both robust accuracies.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--eps", type=float, default=8 / 255)
    args = ap.parse_args()
    from pyautoattack import AutoAttack

    from microscope.models.vision import digits_split, train_digits_cnn
    from microscope.robustness.reference import autoattack

    model, acc = train_digits_cnn()
    _, _, xte, yte = digits_split()
    idx = np.sort(np.random.default_rng(0).permutation(len(xte))[: args.samples])
    x, y = torch.from_numpy(xte[idx]), torch.from_numpy(yte[idx])
    times: dict[str, list[float]] = {"ours": [], "pyautoattack": []}
    robust: dict[str, float] = {}
    for rep in range(args.reps):
        for who in ("ours", "pyautoattack") if rep % 2 == 0 else ("pyautoattack", "ours"):
            t = time.perf_counter()
            if who == "ours":
                with tempfile.TemporaryDirectory() as tmp:
                    r = autoattack(model, x, y, "Linf", args.eps, "standard", None, 0, len(x), Path(tmp) / "s.json")
                robust[who] = r["robust"]
            else:
                aa = AutoAttack(model, norm="Linf", eps=args.eps, version="standard", seed=0)
                _, y_adv = aa.run_standard_evaluation(x, y, batch_size=len(x))
                robust[who] = (y_adv == y).sum().item() / len(y)
            times[who].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "model": f"digits CNN (held-out accuracy {acc:.4f})",
                "samples": len(x),
                "eps": args.eps,
                "ours_s": round(best["ours"], 2),
                "pyautoattack_s": round(best["pyautoattack"], 2),
                "ratio": round(best["ours"] / best["pyautoattack"], 3),
                "ratio_of_means": round(sum(times["ours"]) / sum(times["pyautoattack"]), 3),
                "robust_ours": robust["ours"],
                "robust_pyautoattack": robust["pyautoattack"],
                "all_times": {k: [round(t, 2) for t in v] for k, v in times.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
