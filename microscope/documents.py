"""Read a text dataset as a stream of documents, never whole.

`pieces` yields a dataset's documents in bounded pieces (a .txt file in blocks, a .jsonl, .parquet or hub
dataset record by record); `scan` reads all of it once for the text digest (ingest's cache key) and the
strict checks (the file's encoding, records without text or with text that is not a string), naming the
line or record at fault. `microscope.dataset` tokenizes the stream and packs it into windows.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.config import DatasetConfig

from microscope.errors import InputError

BLOCK_BYTES = 1 << 20  # a .txt file is read in blocks of this size

# (text of a document or a part of it, whether it is the document's last piece); text None: a record without text
Piece = tuple[str | None, bool]


@dataclass
class Scan:
    digest: str  # sha256 of the documents' text, in order
    documents: int
    nulls: int  # records without text
    stamp: tuple[int, int] | None = field(default=None, compare=False)  # the file's (size, mtime_ns) when read


# ---- reading ------------------------------------------------------------------------------------------


def pieces(cfg: DatasetConfig) -> Iterator[Piece]:
    """The dataset's documents in order, in pieces: one per record of a .jsonl, .parquet or hub dataset (a record
    is parsed whole); a .txt file in blocks, split into documents by `txt_mode`, whitespace-only ones dropped."""
    p = _local_file(cfg)
    if p is None:
        yield from _hf_records(cfg)
    elif p.suffix == ".txt":
        yield from _txt_pieces(p, cfg)
    elif p.suffix == ".jsonl":
        yield from _jsonl_records(p, cfg)
    elif p.suffix == ".parquet":
        yield from _parquet_records(p, cfg)
    else:
        raise InputError(f"dataset {p} has suffix '{p.suffix}'; use .txt, .jsonl or .parquet")


def read_documents(cfg: DatasetConfig) -> list[str | None]:
    """Every document whole, in memory (None where a record has no text): for small datasets; ingest streams."""
    docs: list[str | None] = []
    parts: list[str] = []
    for text, last in pieces(cfg):
        if text is None:
            docs.append(None)
            continue
        parts.append(text)
        if last:
            docs.append("".join(parts))
            parts = []
    return docs


def scan(cfg: DatasetConfig) -> Scan:
    """Read the whole dataset once, piece by piece: every decoding or record error anywhere in it is raised here,
    before anything is tokenized, and its digest covers all of it: sha256 over each document's UTF-8 and 0x1e
    (0x00 for a record without text), the digest ingest had when it held the documents, so cache keys stay."""
    h = hashlib.sha256()
    documents = nulls = 0
    before = _stamp(cfg)
    for text, last in pieces(cfg):
        if text is None:
            h.update(b"\x00")
            nulls += 1
        else:
            h.update(_utf8(text, cfg, documents + 1))
            if last:
                h.update(b"\x1e")
        documents += int(last)
    return Scan(h.hexdigest(), documents, nulls, before)


def _stamp(cfg: DatasetConfig) -> tuple[int, int] | None:
    p = _local_file(cfg)
    if p is None:
        return None
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def check_unchanged(cfg: DatasetConfig, scanned: Scan) -> None:
    """The file is read twice (the digest, then the tokens): a file rewritten in between would give tokens that
    its cache key does not describe; refused instead."""
    if scanned.stamp is not None and _stamp(cfg) != scanned.stamp:
        raise InputError(f"dataset {cfg.path} changed while it was being read; run the audit again once it is written")


def _utf8(text: str, cfg: DatasetConfig, document: int) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, which JSON's \ud800 escapes can make
        raise InputError(
            f"{cfg.path}: document {document} holds {text[exc.start]!r}, a lone surrogate that is no character; "
            "fix that record"
        ) from None


def _local_file(cfg: DatasetConfig) -> Path | None:
    """The dataset file, or None for a hub dataset name."""
    if not cfg.path:
        raise InputError("no dataset given; pass --dataset PATH or set dataset.path in the config")
    p = Path(cfg.path).expanduser()
    if not p.exists():
        if p.suffix or cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") > 1:
            raise InputError(f"dataset file {cfg.path} does not exist; pass an existing .txt, .jsonl or .parquet file")
        return None
    if p.is_dir():
        raise InputError(f"dataset path {p} is a folder; pass a .txt, .jsonl or .parquet file")
    return p


def _txt_pieces(p: Path, cfg: DatasetConfig) -> Iterator[Piece]:
    blocks = _decoded_blocks(p, cfg.encoding)
    if cfg.txt_mode == "lines":
        return _documents(_lines(blocks), strip=True)
    blocks = _unix_newlines(blocks)  # as read_text: \r\n and \r are \n
    if cfg.txt_mode == "paragraphs":
        return _documents(_paragraphs(blocks), strip=True)
    return _documents(_whole(blocks), strip=False)  # txt_mode "file": one document, kept as written


def _decoded_blocks(path: Path, encoding: str) -> Iterator[str]:
    """The file's text in blocks, decoded strictly; the decoder holds back a character cut by a block's end."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    newlines = 0  # b"\n" in the blocks read before this one
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK_BYTES)
            held = decoder.getstate()[0]  # bytes of the previous block not decoded yet
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                data = held + block  # what exc.start counts in
                line = newlines - held.count(b"\n") + data[: exc.start].count(b"\n") + 1
                raise _not_decodable(path, encoding, line, data[exc.start]) from None
            except UnicodeError as exc:  # utf-16 read in blocks wants its byte-order mark
                raise InputError(
                    f"{path} is not valid {encoding} ({exc}); set dataset.encoding, e.g. utf-16-le"
                ) from None
            yield text
            if not block:
                return
            newlines += block.count(b"\n")


def _decode(data: bytes, path: Path, encoding: str, line: int) -> str:
    """Strictly: a byte that is not valid in `encoding` is an error naming its line, never a silent U+FFFD."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise _not_decodable(path, encoding, line, data[exc.start]) from None


def _not_decodable(path: Path, encoding: str, line: int, byte: int) -> InputError:
    return InputError(
        f"{path} line {line} is not valid {encoding} (byte 0x{byte:02x}); set dataset.encoding to "
        "the file's encoding (e.g. latin-1) or fix that line"
    )


def _lines(blocks: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """Text cut where str.splitlines cuts it: (part of a line, whether the line ends there). A \\r\\n split
    between two blocks ends a line at \\r and then an empty one, which is dropped like any empty document."""
    for block in blocks:
        for line in block.splitlines(keepends=True):
            body = line.splitlines()[0]
            yield body, len(body) < len(line)
    yield "", True


def _unix_newlines(blocks: Iterable[str]) -> Iterator[str]:
    held = ""  # a \r at a block's end: the next block may start with its \n
    for block in blocks:
        text = held + block
        held = "\r" if text.endswith("\r") else ""
        yield text[: len(text) - len(held)].replace("\r\n", "\n").replace("\r", "\n")
    yield "\n" if held else ""


def _paragraphs(blocks: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """Text cut where str.split("\\n\\n") cuts it: (part of a paragraph, whether the paragraph ends there)."""
    held = ""  # a \n at a block's end: with the next block's first \n it separates paragraphs
    for block in blocks:
        parts = (held + block).split("\n\n")
        for part in parts[:-1]:
            yield part, True
        held = "\n" if parts[-1].endswith("\n") else ""
        yield parts[-1][: len(parts[-1]) - len(held)], False
    yield held, True


def _whole(blocks: Iterable[str]) -> Iterator[tuple[str, bool]]:
    for block in blocks:
        yield block, False
    yield "", True


def _documents(parts: Iterable[tuple[str, bool]], strip: bool) -> Iterator[Piece]:
    """Documents with text, as pieces; whitespace-only ones dropped and, with `strip`, the whitespace around each.
    Whitespace is held back until text follows it, so a document's trailing whitespace is never yielded; what is
    held is one run of whitespace (bounded by the longest such run, not by the document)."""
    started = False  # text of this document was yielded
    held = ""
    for text, end in parts:
        trimmed = text.rstrip()
        if trimmed:
            yield (trimmed.lstrip() if strip and not started else held + trimmed), False
            started, held = True, text[len(trimmed) :]
        else:
            held += text
        if end:
            if started:
                yield ("" if strip else held), True
            started, held = False, ""


def _jsonl_records(p: Path, cfg: DatasetConfig) -> Iterator[Piece]:
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
            yield _text_value(rec[cfg.text_field], f"{p} line {i}", cfg.text_field), True


def _text_value(value: Any, where: str, field: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InputError(f"{where}: '{field}' is a {type(value).__name__}, not text; give every record a string there")
    return value


def _parquet_records(p: Path, cfg: DatasetConfig) -> Iterator[Piece]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
        kind = pf.schema_arrow.field(cfg.text_field).type
    except Exception as exc:  # noqa: BLE001 -- pyarrow raises several types for one meaning
        raise InputError(
            f"{p} has no readable '{cfg.text_field}' column ({type(exc).__name__}); set dataset.text_field"
        ) from None
    value_type = kind.value_type if pa.types.is_dictionary(kind) else kind
    text_types = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view, pa.types.is_null)
    if not any(is_type(value_type) for is_type in text_types):  # null: a column of records without text
        raise InputError(
            f"{p}: column '{cfg.text_field}' holds {kind} values, not text; store the text as strings "
            "or set dataset.text_field to the text's column"
        )
    for batch in pf.iter_batches(batch_size=1024, columns=[cfg.text_field]):
        for value in batch.column(0).to_pylist():
            yield value, True


def _hf_records(cfg: DatasetConfig) -> Iterator[Piece]:
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
    if cfg.text_field not in ds.column_names:
        raise InputError(f"dataset '{cfg.path}' has no '{cfg.text_field}' column; set dataset.text_field")
    for i, row in enumerate(ds.select_columns([cfg.text_field])):
        yield _text_value(row[cfg.text_field], f"dataset '{cfg.path}' row {i}", cfg.text_field), True
