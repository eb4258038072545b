"""Weight statistics: ours (every statistic + the power-law fit) vs `weightwatcher.analyze()` on the same
GPT-2-small-shaped stack of matrices (12 blocks: 768→2304, 768→768, 768→3072, 3072→768), in one run.

    python benchmarks/spectra.py [--blocks 12]

Ours runs as the metrics stage does (shards side by side, each with its share of the BLAS threads).
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
    from concurrent.futures import ThreadPoolExecutor

    from microscope.stages.metrics import blas_threads, shard_plan, weight_table
    from schemas.config import AuditConfig

    cfg = AuditConfig()
    model = gpt2_small_like(args.blocks)
    # As the metrics stage runs: the matrices split into `weight_shards` shard tasks that the flow's task
    # runner executes side by side, each with its share of the BLAS threads.
    t = time.perf_counter()
    plan = shard_plan(model, cfg.metrics.weight_shards)
    with blas_threads(len(plan)), ThreadPoolExecutor(len(plan)) as pool:
        parts = list(pool.map(lambda names: weight_table(model, "", cfg, names)[0], plan))
    t_ours = time.perf_counter() - t
    by_name = {r["name"]: r["alpha"] for rows in parts for r in rows}
    ours = [by_name[f"{i}.weight"] for i in range(len(model))]

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
