"""Read a text dataset, tokenize it and pack it into fixed-length windows.

Windows are what the model sees: `[special prefix] tokens… [special suffix]`, built with the
tokenizer's own special tokens, documents joined by its EOS/SEP token. Each token keeps its document
id (-1 for special tokens) so activations can be traced back to text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from schemas.config import DatasetConfig

from microscope.errors import InputError


@dataclass
class Packed:
    input_ids: np.ndarray  # [n_windows, seq_len] int32
    doc_ids: np.ndarray  # [n_windows, seq_len] int32, -1 for special tokens
    doc_token_counts: np.ndarray  # [n_docs] tokens per document (before truncation by max_tokens)
    truncated: bool


def read_documents(cfg: DatasetConfig) -> list[str | None]:
    """Documents as a list of strings (None where a record has no text; validation reports it)."""
    if not cfg.path:
        raise InputError("no dataset given; pass --dataset PATH or set dataset.path in the config")
    p = Path(cfg.path).expanduser()
    if not p.exists():
        if p.suffix or cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") > 1:
            raise InputError(f"dataset file {cfg.path} does not exist; pass an existing .txt, .jsonl or .parquet file")
        return _hf_dataset(cfg)
    if p.is_dir():
        raise InputError(f"dataset path {p} is a folder; pass a .txt, .jsonl or .parquet file")
    if p.suffix == ".txt":
        text = _decode(p.read_bytes(), p, cfg.encoding).replace("\r\n", "\n").replace("\r", "\n")  # as read_text
        if cfg.txt_mode == "file":
            return [text] if text.strip() else []
        parts = text.split("\n\n") if cfg.txt_mode == "paragraphs" else text.splitlines()
        return [d.strip() for d in parts if d.strip()]
    if p.suffix == ".jsonl":
        docs: list[str | None] = []
        with open(p, "rb") as f:
            for i, raw in enumerate(f, 1):
                line = _decode(raw, p, cfg.encoding, i)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise InputError(f"{p} line {i} is not valid JSON; fix or remove that line") from None
                if not isinstance(rec, dict) or cfg.text_field not in rec:
                    raise InputError(
                        f"{p} line {i} has no '{cfg.text_field}' field; set dataset.text_field to the text's key"
                    )
                value = rec[cfg.text_field]
                if value is not None and not isinstance(value, str):
                    raise InputError(
                        f"{p} line {i}: '{cfg.text_field}' is a {type(value).__name__}, not text; "
                        "give every record a string there"
                    )
                docs.append(value)
        return docs
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p, columns=[cfg.text_field])
        except Exception as exc:  # noqa: BLE001 -- pyarrow raises several types for one meaning
            raise InputError(
                f"{p} has no readable '{cfg.text_field}' column ({type(exc).__name__}); set dataset.text_field"
            ) from None
        return table.column(cfg.text_field).to_pylist()
    raise InputError(f"dataset {p} has suffix '{p.suffix}'; use .txt, .jsonl or .parquet")


def _decode(data: bytes, path: Path, encoding: str, line: int | None = None) -> str:
    """Strictly: a byte that is not valid in `encoding` is an error naming its line, never a silent U+FFFD."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        where = line if line is not None else data[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{path} line {where} is not valid {encoding} (byte 0x{data[exc.start]:02x}); set dataset.encoding to "
            "the file's encoding (e.g. latin-1) or fix that line"
        ) from None


def _hf_dataset(cfg: DatasetConfig) -> list[str | None]:
    try:
        import datasets  # optional: only for hub dataset names

        ds = datasets.load_dataset(cfg.path, split=cfg.split)
    except ImportError:
        raise InputError(
            f"dataset '{cfg.path}' is not a local file and the 'datasets' package is not installed; pass a file"
        ) from None
    except Exception as exc:  # noqa: BLE001 -- any hub failure means "not available here"
        raise InputError(
            f"dataset '{cfg.path}' is not a local file and the hub could not provide it ({type(exc).__name__}); "
            "pass a .txt, .jsonl or .parquet file"
        ) from None
    return list(ds[cfg.text_field])


def text_digest(docs: list[str | None]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(b"\x00" if d is None else d.encode("utf-8") + b"\x1e")
    return h.hexdigest()


def token_lengths(docs: list[str | None], tokenizer: Any) -> tuple[list[list[int]], np.ndarray]:
    texts = [d if isinstance(d, str) else "" for d in docs]
    # verbose=False: documents longer than the model's context are expected; packing cuts them.
    enc = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    return enc, np.array([len(e) for e in enc], dtype=np.int64)


def pack(token_lists: list[list[int]], tokenizer: Any, cfg: DatasetConfig) -> Packed:
    """Concatenate documents (joined by EOS/SEP) and cut windows of `seq_len` with the model's
    special tokens around each window; stop at `max_tokens`; drop a final partial window."""
    prefix, suffix = special_frame(tokenizer)
    body = cfg.seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise InputError(
            f"dataset.seq_len={cfg.seq_len} leaves no room beside {len(prefix) + len(suffix)} special tokens; raise it"
        )
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
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
    truncated = used < len(token_lists) or len(flat) - n_windows * body > 1
    ids = np.empty((n_windows, cfg.seq_len), dtype=np.int32)
    dids = np.empty((n_windows, cfg.seq_len), dtype=np.int32)
    for w in range(n_windows):
        # [n_windows, seq_len]: prefix specials, body tokens, suffix specials (doc id -1 for specials)
        ids[w] = prefix + flat[w * body : (w + 1) * body] + suffix
        dids[w] = [-1] * len(prefix) + docs[w * body : (w + 1) * body] + [-1] * len(suffix)
    return Packed(ids, dids, np.array([len(t) for t in token_lists], dtype=np.int64), truncated)


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
