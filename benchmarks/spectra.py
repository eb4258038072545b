"""Weight statistics: ours (every statistic + the power-law fit) vs `weightwatcher.analyze()` on the same
GPT-2-small-shaped stack of matrices (12 blocks: 768→2304, 768→768, 768→3072, 3072→768), in one run.

    python benchmarks/spectra.py [--blocks 12]

Prints both times, the speed ratio and the largest |α_ours − α_ww| over the layers.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def gpt2_small_like(blocks: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [
            torch.nn.Linear(768, 2304),
            torch.nn.Linear(768, 768),
            torch.nn.Linear(768, 3072),
            torch.nn.Linear(3072, 768),
        ]
    model = torch.nn.Sequential(*layers)
    rng = np.random.default_rng(0)
    with torch.no_grad():  # heavy-tailed entries, as trained weights have, so α is not pinned at the bulk
        for layer in model:
            layer.weight.copy_(torch.from_numpy(rng.standard_t(4, layer.weight.shape) * 0.02))
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=12)
    args = ap.parse_args()
    from microscope.spectra import matrix_stats, mp_spikes, power_law_fit

    model = gpt2_small_like(args.blocks)
    t = time.perf_counter()
    ours = []
    for layer in model:
        stats = matrix_stats(layer.weight.detach().numpy())
        fit = power_law_fit(stats["singular_values"])
        mp_spikes(stats["singular_values"], tuple(stats["shape"]))
        ours.append(fit["alpha"])
    t_ours = time.perf_counter() - t

    import weightwatcher as ww

    t = time.perf_counter()
    details = ww.WeightWatcher(model=model).analyze(plot=False)
    t_ww = time.perf_counter() - t
    theirs = details["alpha"].to_numpy()
    diff = np.abs(np.asarray(ours) - theirs)
    print(
        json.dumps(
            {
                "matrices": len(ours),
                "ours_s": round(t_ours, 2),
                "weightwatcher_s": round(t_ww, 2),
                "speedup": round(t_ww / t_ours, 2),
                "max_alpha_diff": float(diff.max()),
                "layers_within_0.05": int((diff <= 0.05).sum()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
