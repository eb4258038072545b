"""Train the demo's language model with PyTorch Lightning and let Microscope audit every checkpoint.

A GPT-2-family model (2 blocks, width 64) learns Python's help text (the demo corpus) for about a minute
on a CPU. `ModelCheckpoint` saves every `--every` steps; `MicroscopeCallback(export="hf")` writes an HF
folder (weights and tokenizer) beside each `.ckpt` and POSTs "checkpoint ready", signed, to the webhook
receiver (`microscope up`), which starts one audit per checkpoint with run_id and step.

    python examples/train_demo_lm.py CORPUS OUT_DIR --run-id demo-lm [--steps 600 --every 200]

Needs MICROSCOPE_WEBHOOK_URL and MICROSCOPE_WEBHOOK_SECRET (what `microscope up` prints).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

VOCAB = 2048
SEQ = 64


def train_tokenizer(corpus: Path, out: Path) -> Any:
    """A byte-level BPE tokenizer (GPT-2's scheme) fitted to the corpus, saved as an HF tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    lines = corpus.read_text(encoding="utf-8").splitlines()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.save_pretrained(out)
    return tok


def windows(tok: Any, corpus: Path) -> torch.Tensor:
    """The corpus as one token stream (documents separated by EOS), cut into SEQ-token windows."""
    ids: list[int] = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        ids += tok(line)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // SEQ
    return torch.tensor(ids[: n * SEQ]).view(n, SEQ)  # [windows, SEQ]


class DemoLM(pl.LightningModule):
    """`self.model` and `self.tokenizer` are what MicroscopeCallback(export="hf") saves."""

    def __init__(self, tok: Any, lr: float = 3e-3) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=len(tok), n_positions=SEQ, n_embd=64, n_layer=2, n_head=4,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        self.model = GPT2LMHeadModel(cfg)
        self.tokenizer = tok
        self.lr = lr

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch  # [B, SEQ]
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        # warm-up, then flat: a real run's schedule, short
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--run-id", default="demo-lm")
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps")
    ap.add_argument("--every", type=int, default=200, help="a checkpoint (and an audit) every this many steps")
    ap.add_argument("--config", default="demo_lm", help="the audit config the checkpoints are audited with")
    ap.add_argument("--stages", default="ingest,quantize,trace,sae,metrics,landscape,reliability,attribution,report")
    args = ap.parse_args()

    import logging
    import warnings

    import transformers
    from lightning.pytorch.callbacks import ModelCheckpoint

    from microscope.integrations import MicroscopeCallback

    # the demo's log is Microscope's story: Lightning's banner and libraries' deprecation notes stay out
    warnings.simplefilter("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    args.out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)  # the audits run beside training on the same cores
    tok = train_tokenizer(args.corpus, args.out / "tokenizer")
    data = windows(tok, args.corpus)
    cb = MicroscopeCallback(
        run_id=args.run_id,
        export="hf",
        dataset=str(args.corpus.resolve()),
        config=args.config,
        stages=args.stages.split(","),
        tags={"source": "make demo"},
    )
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        callbacks=[ModelCheckpoint(dirpath=args.out / "ckpts", every_n_train_steps=args.every, save_top_k=-1), cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=args.out,
    )
    t0 = time.monotonic()
    loader = DataLoader(TensorDataset(data), batch_size=16, shuffle=True, drop_last=True)
    trainer.fit(DemoLM(tok), loader)
    cb.notifier.close(timeout_s=60)
    loss = float(trainer.callback_metrics.get("loss", float("nan")))
    print(
        f"demo LM: {args.steps} steps in {time.monotonic() - t0:.0f} s, final loss {loss:.2f} "
        f"({data.shape[0]} windows of {SEQ} tokens); checkpoints every {args.every} steps sent to Microscope"
    )


if __name__ == "__main__":
    main()
