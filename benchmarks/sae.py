"""SAE training throughput: our Lightning trainer vs SAELens' `SAETrainer.fit` (TopK, fed from memory)
vs the machine's matmul floor, on the same activations and shapes, in one run.

    python benchmarks/sae.py [--d-in 256 --d-sae 2048 --k 32 --batch 4096 --steps 40]

SAELens is installed only for this benchmark (`pip install sae-lens`). Prints tokens/s and ratios.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from floor import matmul_gflops  # benchmarks/ is on sys.path when run as a script


def ours(x: np.ndarray, args: argparse.Namespace) -> float:
    from microscope.sae.architectures import build
    from microscope.sae.data import ShuffledBatches, array_chunks
    from microscope.sae.training import SAEModule, fit

    torch.manual_seed(0)
    sae = build("topk", args.d_in, args.d_sae, k=args.k)
    data = ShuffledBatches(array_chunks(x), args.batch, 8 * args.batch, epochs=1, seed=0)
    module = SAEModule(sae, lr=3e-4, dead_window=10**9)
    t = time.perf_counter()
    fit(module, data, steps=args.steps, progress=False)
    return args.steps * args.batch / (time.perf_counter() - t)


def saelens(x: np.ndarray, args: argparse.Namespace) -> float | None:
    try:
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer
    except ImportError:
        return None
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k, device="cpu"))
    xt = torch.from_numpy(x)

    def batches():
        while True:
            for lo in range(0, len(xt) - args.batch + 1, args.batch):
                yield xt[lo : lo + args.batch]

    cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch,
        train_batch_size_samples=args.batch,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=1,
        lr=3e-4,
        lr_end=3e-4,
    )
    trainer = SAETrainer(cfg, sae, batches())
    t = time.perf_counter()
    trainer.fit()
    return args.steps * args.batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((args.steps * args.batch, args.d_in)).astype(np.float32)
    res: dict[str, float] = {"ours_tok_s": ours(x, args)}
    peer = saelens(x, args)
    if peer is not None:
        res["saelens_tok_s"] = peer
    gflops = matmul_gflops()
    # Per token: encoder and decoder matmuls (2·d_in·d_sae FLOPs each), backward twice the forward.
    floor = gflops * 1e9 / (3 * 2 * 2 * args.d_in * args.d_sae)
    res |= {"matmul_gflops": gflops, "floor_tok_s": floor, "ours_vs_floor": res["ours_tok_s"] / floor}
    if peer is not None:
        res["ours_vs_saelens"] = res["ours_tok_s"] / peer
    print(
        json.dumps(
            {**vars(args), "threads": torch.get_num_threads(), **{k: round(v, 3) for k, v in res.items()}}, indent=2
        )
    )


if __name__ == "__main__":
    main()
