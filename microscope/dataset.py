"""Read a text dataset, tokenize it and pack it into fixed-length windows.

Windows are what the model sees: `[special prefix] tokens… [special suffix]`, built with the
tokenizer's own special tokens, documents joined by its EOS/SEP token. Each token keeps its document
id (-1 for special tokens) so activations can be traced back to text.

A dataset is streamed, never held whole: `pieces` (microscope.documents) yields its documents in bounded
pieces. `scan` reads all of it once, for the text digest (ingest's cache key) and the strict checks
(encoding, records), and `tokenize` reads it again only until the windows `pack` cuts are full
(`token_budget`), cutting a long document into chunks at a space between two words so its tokens are those of
the whole document.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from schemas.config import DatasetConfig

from microscope.documents import BLOCK_BYTES as BLOCK_BYTES
from microscope.documents import Piece as Piece
from microscope.documents import Scan as Scan
from microscope.documents import pieces as pieces
from microscope.documents import read_documents as read_documents
from microscope.documents import scan as scan
from microscope.errors import InputError

CHUNK_CHARS = 1 << 16  # the tokenizer is called on about this many characters at a time
HEAD_CHARS = 64  # what validation keeps of each tokenized document (it checks only that there is text)


@dataclass
class Packed:
    input_ids: np.ndarray  # [n_windows, seq_len] int32
    doc_ids: np.ndarray  # [n_windows, seq_len] int32, -1 for special tokens
    doc_token_counts: np.ndarray  # [n_docs] tokens per document given (one cut by the budget: those read)
    truncated: bool


@dataclass
class Tokenized:
    token_lists: list[list[int]]  # per document tokenized, in order
    heads: list[str | None]  # the start of each (None: a record without text)
    counts: np.ndarray  # [n_docs] tokens per document; of a cut one, those read (a lower bound)
    cut: bool  # the last document was cut at the budget: the rest of it was not tokenized
    exhausted: bool  # every document of the dataset was tokenized


# ---- tokenizing ------------------------------------------------------------------------------------


def token_budget(tokenizer: Any, cfg: DatasetConfig) -> int:
    """Tokens, separators included, that fill the windows `pack` cuts: max_tokens // seq_len windows of body."""
    *_, body = _frame(tokenizer, cfg)
    return cfg.max_tokens // cfg.seq_len * body


def tokenize(stream: Iterable[Piece], tokenizer: Any, budget: int | None = None, min_doc_tokens: int = 1) -> Tokenized:
    """Token ids of the documents in order, until `budget` tokens (each non-empty document followed by one
    separator, as `pack` joins them) are read, or all of them. A document cut at the budget is read on to
    `min_doc_tokens` tokens, so that a cut is never taken for a short document."""
    sep = _separator(tokenizer) is not None
    chunks = _chunks(stream, _drops_space_at_cut(tokenizer))
    lists: list[list[int]] = []
    heads: list[str | None] = []
    open_doc: list[int] | None = None  # the tokens of the document being read
    used = 0  # tokens and separators read
    for batch in _batches(chunks):
        texts = [t for t, _ in batch if t]  # None (no text) and "" have no tokens
        encoded = iter(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
        for text, last in batch:
            if open_doc is None:
                open_doc = []
                lists.append(open_doc)
                heads.append(None if text is None else text[:HEAD_CHARS])
            if text:
                ids = next(encoded)
                open_doc.extend(ids)
                used += len(ids)
            if last:
                used += int(sep and bool(open_doc))
                open_doc = None
        if budget is not None and used >= budget and (open_doc is None or len(open_doc) >= min_doc_tokens):
            break
    cut = open_doc is not None
    exhausted = not cut and next(chunks, None) is None
    return Tokenized(lists, heads, np.array([len(t) for t in lists], dtype=np.int64), cut, exhausted)


def token_lengths(docs: list[str | None], tokenizer: Any) -> tuple[list[list[int]], np.ndarray]:
    """Every document's tokens (a record without text has none) and their counts: no budget."""
    out = tokenize(((d, True) for d in docs), tokenizer)
    return out.token_lists, out.counts


def _chunks(stream: Iterable[Piece], drop_space: bool) -> Iterator[Piece]:
    """Each document re-cut into chunks of at most CHUNK_CHARS characters, at a single space between two words
    (where every pre-tokenizer we know of splits: byte-level BPE, WordPiece, SentencePiece), so the chunks'
    tokens are the whole document's. Text without such a space in the window's second half (e.g. unspaced
    CJK, base64) is cut hard: only the few tokens at that cut may differ from whole-document tokenization."""
    size = CHUNK_CHARS
    buf = ""
    for text, last in stream:
        if text is None:
            yield None, True
            continue
        buf += text
        start = 0
        while len(buf) - start > size:
            gap = _word_gap(buf, start + size // 2, start + size)
            cut = start + size if gap is None else gap
            yield buf[start:cut], False
            start = cut + int(gap is not None and drop_space)
        buf = buf[start:]
        if last:
            yield buf, True
            buf = ""


def _word_gap(text: str, lo: int, hi: int) -> int | None:
    """The last single space in text[lo:hi] between two non-space characters (None: there is none)."""
    i = text.rfind(" ", lo, hi)
    while i > 0:
        if not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", lo, i)
    return None


def _drops_space_at_cut(tokenizer: Any) -> bool:
    """Whether the chunk after a cut must start after the space rather than at it: SentencePiece-style tokenizers
    (Llama 2, T5: a "▁" word marker put before every text) add that space back themselves; byte-level BPE
    (GPT-2, Llama 3) and WordPiece keep it as the next word's start. Decided on a probe, by which split
    reproduces the whole text's tokens."""

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    whole, head, tail = ids("the quick brown fox jumps"), ids("the quick"), "brown fox jumps"
    return head + ids(" " + tail) != whole and head + ids(tail) == whole


def _batches(chunks: Iterator[Piece]) -> Iterator[list[Piece]]:
    """Chunks gathered into one tokenizer call per CHUNK_CHARS characters (many short documents, one call)."""
    batch: list[Piece] = []
    chars = 0
    for chunk in chunks:
        batch.append(chunk)
        chars += len(chunk[0] or "")
        if chars >= CHUNK_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ---- packing ---------------------------------------------------------------------------------------


def pack(token_lists: list[list[int]], tokenizer: Any, cfg: DatasetConfig, more: bool = False) -> Packed:
    """Concatenate documents (joined by EOS/SEP) and cut windows of `seq_len` with the model's
    special tokens around each window; stop at `max_tokens`; drop a final partial window.
    `more`: the dataset goes on after `token_lists` (tokenizing stopped at the budget)."""
    prefix, suffix, body = _frame(tokenizer, cfg)
    sep = _separator(tokenizer)
    max_windows = cfg.max_tokens // cfg.seq_len
    flat: list[int] = []
    docs: list[int] = []
    used = 0
    for i, toks in enumerate(token_lists):
        used = i + 1
        flat += toks
        docs += [i] * len(toks)
        if sep is not None and toks:
            flat.append(sep)
            docs.append(-1)
        if len(flat) >= max_windows * body:
            break
    n_windows = min(len(flat) // body, max_windows)
    truncated = more or used < len(token_lists) or len(flat) - n_windows * body > 1
    ids = np.empty((n_windows, cfg.seq_len), dtype=np.int32)
    dids = np.empty((n_windows, cfg.seq_len), dtype=np.int32)
    for w in range(n_windows):
        # [n_windows, seq_len]: prefix specials, body tokens, suffix specials (doc id -1 for specials)
        ids[w] = prefix + flat[w * body : (w + 1) * body] + suffix
        dids[w] = [-1] * len(prefix) + docs[w * body : (w + 1) * body] + [-1] * len(suffix)
    return Packed(ids, dids, np.array([len(t) for t in token_lists], dtype=np.int64), truncated)


def _frame(tokenizer: Any, cfg: DatasetConfig) -> tuple[list[int], list[int], int]:
    """(special prefix, special suffix, body tokens per window)."""
    prefix, suffix = special_frame(tokenizer)
    body = cfg.seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise InputError(
            f"dataset.seq_len={cfg.seq_len} leaves no room beside {len(prefix) + len(suffix)} special tokens; raise it"
        )
    return prefix, suffix, body


def _separator(tokenizer: Any) -> int | None:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS]…[SEP], <s>…, or none)."""
    probe = "hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain) :])
    return [], []


def tokens_digest(packed: Packed, tokenizer_name: str) -> str:
    h = hashlib.sha256(tokenizer_name.encode())
    h.update(np.ascontiguousarray(packed.input_ids))
    h.update(np.ascontiguousarray(packed.doc_ids))
    return h.hexdigest()


def write_tokens(packed: Packed, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from schemas.activations import TOKENS_SCHEMA

    n, s = packed.input_ids.shape
    offsets = pa.array(np.arange(0, (n + 1) * s, s, dtype=np.int32))
    table = pa.table(
        {
            "window": pa.array(np.arange(n, dtype=np.int32)),
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(packed.input_ids.reshape(-1))),
            "doc_ids": pa.ListArray.from_arrays(offsets, pa.array(packed.doc_ids.reshape(-1))),
        },
        schema=TOKENS_SCHEMA,
    )
    pq.write_table(table, path)


def read_tokens(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    n = t.num_rows
    ids = np.asarray(t.column("input_ids").combine_chunks().flatten()).reshape(n, -1)
    dids = np.asarray(t.column("doc_ids").combine_chunks().flatten()).reshape(n, -1)
    return ids, dids
