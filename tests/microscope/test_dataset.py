"""Reading, packing and validating text datasets."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from microscope import dataset as ds
from microscope.errors import InputError
from microscope.validation import raise_on_failure, validate_documents
from schemas.config import DatasetConfig
from tests.conftest import corpus_lines

DOCS = ["The quick brown fox.", "Jumps over the lazy dog, again and again.", "Python is a language."]


def test_formats_read_the_same_documents(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("\n".join(DOCS) + "\n\n")
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in DOCS:
            f.write(json.dumps({"body": d}) + "\n")
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "a.parquet")
    assert ds.read_documents(DatasetConfig(path=str(tmp_path / "a.txt"))) == DOCS
    assert ds.read_documents(DatasetConfig(path=str(tmp_path / "a.jsonl"), text_field="body")) == DOCS
    assert ds.read_documents(DatasetConfig(path=str(tmp_path / "a.parquet"), text_field="body")) == DOCS
    assert ds.read_documents(DatasetConfig(path=str(tmp_path / "a.txt"), txt_mode="file")) == ["\n".join(DOCS) + "\n\n"]


def test_read_errors_name_the_fix(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        ds.read_documents(DatasetConfig(path=str(tmp_path / "bad.jsonl")))
    (tmp_path / "k.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(InputError, match="set dataset.text_field"):
        ds.read_documents(DatasetConfig(path=str(tmp_path / "k.jsonl")))
    with pytest.raises(InputError, match="does not exist"):
        ds.read_documents(DatasetConfig(path=str(tmp_path / "none.txt")))
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(InputError, match="use .txt, .jsonl or .parquet"):
        ds.read_documents(DatasetConfig(path=str(tmp_path / "x.csv")))


def test_text_is_decoded_strictly_naming_the_line(tmp_path: Path) -> None:
    """Issue 21 #4: random bytes or latin-1 read as UTF-8 are an error naming the line, never U+FFFD text;
    dataset.encoding reads a latin-1 file as written; a record whose text is not a string names its line."""
    import os

    (tmp_path / "noise.txt").write_bytes(
        b"fine first line\nsecond\n\x80" + os.urandom(4096)
    )  # 0x80: never a first byte
    with pytest.raises(
        InputError, match=r"noise.txt line 3 is not valid utf-8 \(byte 0x[0-9a-f]{2}\); set dataset.encoding"
    ):
        ds.read_documents(DatasetConfig(path=str(tmp_path / "noise.txt")))
    latin = "Déjà vu à Zürich.\nUn été très chaud."
    (tmp_path / "latin.txt").write_bytes(latin.encode("latin-1"))
    with pytest.raises(InputError, match="latin.txt line 1 is not valid utf-8"):
        ds.read_documents(DatasetConfig(path=str(tmp_path / "latin.txt")))
    got = ds.read_documents(DatasetConfig(path=str(tmp_path / "latin.txt"), encoding="latin-1"))
    assert got == latin.splitlines()  # not mangled
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "ok too"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match="bad.jsonl line 3 is not valid utf-8"):
        ds.read_documents(DatasetConfig(path=str(tmp_path / "bad.jsonl")))
    (tmp_path / "num.jsonl").write_text('{"text": "ok"}\n{"text": 42}\n')
    with pytest.raises(InputError, match="num.jsonl line 2: 'text' is a int, not text"):
        ds.read_documents(DatasetConfig(path=str(tmp_path / "num.jsonl")))
    with pytest.raises(ValueError, match="not a text encoding Python knows"):
        DatasetConfig(path="x.txt", encoding="utf-9")


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_packing_frames_windows_with_the_models_special_tokens(kind: str, request: pytest.FixtureRequest) -> None:
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(f"{kind}_tokenizer_dir"))
    cfg = DatasetConfig(path="x", seq_len=16, max_tokens=10_000)
    lists, n = ds.token_lengths(DOCS * 5, tok)
    packed = ds.pack(lists, tok, cfg)
    prefix, suffix = ds.special_frame(tok)
    assert packed.input_ids.shape[1] == 16 and packed.input_ids.dtype == np.int32
    body = 16 - len(prefix) - len(suffix)
    if kind == "wordpiece":
        assert prefix == [tok.cls_token_id] and suffix == [tok.sep_token_id]
    else:
        assert prefix == [] and suffix == []
    # The body of the windows, read in order, is the documents joined by the separator.
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    flat = [t for lst in lists for t in [*lst, sep]]
    bodies = packed.input_ids[:, len(prefix) : len(prefix) + body].reshape(-1).tolist()
    assert bodies == flat[: len(bodies)]
    # Document ids: -1 on specials, else the index of the document each token came from.
    assert (packed.doc_ids[:, : len(prefix)] == -1).all()
    first_doc = len(lists[0])
    assert (packed.doc_ids.reshape(-1)[len(prefix) : len(prefix) + min(first_doc, body)] == 0).all()
    assert int(n.sum()) == sum(len(x) for x in lists)


def test_max_tokens_truncates(wordpiece_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    lists, _ = ds.token_lengths(DOCS * 50, tok)
    packed = ds.pack(lists, tok, DatasetConfig(path="x", seq_len=16, max_tokens=64))
    assert packed.input_ids.shape == (4, 16) and packed.truncated


def test_tokens_parquet_round_trip(tmp_path: Path, wordpiece_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    lists, _ = ds.token_lengths(DOCS * 10, tok)
    packed = ds.pack(lists, tok, DatasetConfig(path="x", seq_len=16))
    ds.write_tokens(packed, tmp_path / "t.parquet")
    ids, dids = ds.read_tokens(tmp_path / "t.parquet")
    np.testing.assert_array_equal(ids, packed.input_ids)
    np.testing.assert_array_equal(dids, packed.doc_ids)


def test_great_expectations_checks() -> None:
    cfg = DatasetConfig(path="d.jsonl", min_doc_tokens=2, max_doc_tokens=10)
    ok = validate_documents(["a b", "c d e"], np.array([2, 3]), cfg)
    assert [c.success for c in ok] == [True, True, True]
    raise_on_failure(ok, "d.jsonl", cfg)
    checks = validate_documents(["a b", None, "x"], np.array([2, 0, 1]), cfg)
    assert [c.success for c in checks] == [True, False, False]
    with pytest.raises(InputError, match="records without text"):
        raise_on_failure(checks, "d.jsonl", cfg)
    empty = validate_documents([], np.array([], dtype=np.int64), cfg)
    with pytest.raises(InputError, match="is empty"):
        raise_on_failure(empty, "d.jsonl", cfg)
    long = validate_documents(["a " * 20], np.array([20]), cfg)
    with pytest.raises(InputError, match=r"outside \[2, 10\] tokens"):
        raise_on_failure(long, "d.jsonl", cfg)


def test_unreachable_hub_dataset_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="is not a local file and the hub could not provide it"):
        ds.read_documents(DatasetConfig(path="someorg/somedata"))


# ---- streaming (issue 21 #5) -----------------------------------------------------------------------


def _whole_file_documents(raw: bytes, mode: str) -> list[str]:
    """The reference: the file read, decoded and split whole (what ingest did before it streamed)."""
    text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    if mode == "file":
        return [text] if text.strip() else []
    parts = text.split("\n\n") if mode == "paragraphs" else text.splitlines()
    return [d.strip() for d in parts if d.strip()]


def _whole_digest(docs: list[str | None]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(b"\x00" if d is None else d.encode("utf-8") + b"\x1e")
    return h.hexdigest()


@pytest.mark.parametrize("mode", ["lines", "paragraphs", "file"])
def test_streamed_reading_matches_reading_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Blocks of a few bytes cut characters, \\r\\n pairs, blank lines and whitespace runs apart: the documents and
    the digest (ingest's cache key) are still those of the file read whole."""
    rng = random.Random(0)
    alphabet = ["word", "é", "字", " ", "  ", "\n", "\n\n", "\r", "\r\n", "\t", "\x0b", "\u2028", "\x85"]
    path = tmp_path / "d.txt"
    for _ in range(60):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))).encode()
        path.write_bytes(raw)
        cfg = DatasetConfig(path=str(path), txt_mode=mode)
        want = _whole_file_documents(raw, mode)
        for block in (1, 2, 5, 1 << 20):
            monkeypatch.setattr(ds, "BLOCK_BYTES", block)
            assert ds.read_documents(cfg) == want, (raw, block)
            assert ds.scan(cfg) == ds.Scan(_whole_digest(want), len(want), 0)


def test_a_bad_byte_far_into_a_streamed_file_names_its_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [f"line {i} déjà vu" for i in range(1, 5001)]
    raw = "\n".join(lines).encode()
    at = raw.index(b"line 4321 ") + 5
    (tmp_path / "far.txt").write_bytes(raw[:at] + b"\xff" + raw[at:])
    monkeypatch.setattr(ds, "BLOCK_BYTES", 64)
    with pytest.raises(InputError, match=r"far.txt line 4321 is not valid utf-8 \(byte 0xff\)"):
        ds.scan(DatasetConfig(path=str(tmp_path / "far.txt")))


class _Recording:
    """The real tokenizer, recording the texts of every batch call (what `tokenize` passes)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.batches: list[list[str]] = []

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        if isinstance(text, list):
            self.batches.append(list(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def _word_marker_tokenizer() -> Any:
    """A Llama-2-style tokenizer: a "▁" put before every text, so a chunk must start after the space at its cut."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
    tok.train_from_iterator(corpus_lines(400), trainers.BpeTrainer(vocab_size=512))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "word-marker"])
def test_a_long_document_is_tokenized_in_chunks_as_a_whole(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut at a space between two words, a 78,000-character document's chunks give exactly the whole document's
    token ids, for byte-level BPE, WordPiece and a tokenizer that marks every text's start; no chunk is longer
    than CHUNK_CHARS nor (but the last) shorter than half of it."""
    if kind == "word-marker":
        tok = _word_marker_tokenizer()
    else:
        tok = AutoTokenizer.from_pretrained(request.getfixturevalue(f"{kind}_tokenizer_dir"))
    doc = " ".join(corpus_lines(400))
    whole = tok(doc, add_special_tokens=False)["input_ids"]
    for size in (64, 300, 4096):
        monkeypatch.setattr(ds, "CHUNK_CHARS", size)
        rec = _Recording(tok)
        out = ds.tokenize([(doc, True)], rec)
        assert out.token_lists == [whole] and out.counts.tolist() == [len(whole)] and out.exhausted
        chunks = [t for batch in rec.batches for t in batch]
        assert max(map(len, chunks)) <= size and min(map(len, chunks[:-1])) >= size // 2
        assert len("".join(chunks)) >= len(doc) - len(chunks)  # at most the one space per cut left out


def test_tokenizing_stops_when_the_windows_are_full(
    tmp_path: Path, bpe_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the documents that fill max_tokens // seq_len windows (plus at most one tokenizer call) are tokenized,
    and the windows are those of tokenizing everything."""
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    lines = corpus_lines(200)
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    cfg = DatasetConfig(path=str(tmp_path / "c.txt"), seq_len=32, max_tokens=640)
    monkeypatch.setattr(ds, "CHUNK_CHARS", 256)
    rec = _Recording(tok)
    read = ds.tokenize(ds.pieces(cfg), rec, ds.token_budget(tok, cfg))
    every = [tok(d, add_special_tokens=False)["input_ids"] for d in lines]  # one call per document
    reference = ds.pack(every, tok, cfg)
    streamed = ds.pack(read.token_lists, tok, cfg, more=not read.exhausted)
    np.testing.assert_array_equal(streamed.input_ids, reference.input_ids)
    np.testing.assert_array_equal(streamed.doc_ids, reference.doc_ids)
    assert streamed.truncated and reference.truncated and not read.exhausted and not read.cut
    assert read.token_lists == every[: len(read.token_lists)] and read.heads[0] == lines[0][: ds.HEAD_CHARS]
    # the document that fills the budget (20 windows × 32 tokens, one separator per document)
    filled = int(np.searchsorted(np.cumsum([len(t) + 1 for t in every]), 20 * 32))
    tokenized = sum(len(t) for batch in rec.batches for t in batch)
    assert tokenized <= sum(map(len, lines[: filled + 1])) + 2 * 256 < sum(map(len, lines)) / 4


def test_a_document_cut_at_the_budget_is_read_to_min_doc_tokens(
    bpe_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget cuts one long document: it is read on to min_doc_tokens (its length check is then exact) and
    the windows are marked truncated."""
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    doc = " ".join(corpus_lines(400))
    monkeypatch.setattr(ds, "CHUNK_CHARS", 256)
    cfg = DatasetConfig(path="x", seq_len=16, max_tokens=64)
    short = ds.tokenize([(doc, True)], tok, ds.token_budget(tok, cfg))
    assert short.cut and not short.exhausted and 64 <= short.counts[0] < 64 + 256
    assert ds.pack(short.token_lists, tok, cfg, more=True).truncated
    long = ds.tokenize([(doc, True)], tok, ds.token_budget(tok, cfg), min_doc_tokens=2000)
    assert long.cut and 2000 <= long.counts[0] < 2000 + 256
    whole = tok(doc, add_special_tokens=False)["input_ids"]
    assert long.token_lists[0] == whole[: len(long.token_lists[0])]


def test_records_without_text_past_the_budget_are_still_refused(
    tmp_path: Path, tiny_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokenizing stops at the budget, but the whole file is read: a null record at its end is refused as
    before; the record says how many documents were read and tokenized."""
    from microscope.models import loading
    from microscope.stages import ingest
    from microscope.store import open_store
    from schemas.config import AuditConfig

    lines = corpus_lines(200)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    cfg = AuditConfig.model_validate(
        {"model": {"source": str(tiny_gpt2_dir)}, "dataset": {"path": str(path), "seq_len": 32, "max_tokens": 256}}
    )
    store = open_store(str(tmp_path / "store"))
    monkeypatch.setattr(ds, "CHUNK_CHARS", 256)  # a tokenizer call of 64k characters would take the whole file
    rec = ingest.run(loading.resolve(cfg.model), cfg, store)
    assert rec.details["documents_read"] == 200 and rec.metrics["n_documents"] == 200
    assert 0 < rec.details["documents_tokenized"] < 50 and rec.metrics["n_windows"] == 8
    path.write_text(path.read_text() + json.dumps({"text": None}) + "\n")
    with pytest.raises(InputError, match=r"has records without text \(1 unexpected"):
        ingest.run(loading.resolve(cfg.model), cfg, store)


def test_hub_rows_and_json_surrogates_are_read_or_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub dataset is read row by row with the same checks as a .jsonl; a lone surrogate (JSON's "\\ud800")
    that no tokenizer or digest can encode is refused naming the document, not a UnicodeEncodeError."""
    datasets = pytest.importorskip("datasets")
    table = {"text": ["a b", None, "c"], "n": [1, 2, 3]}
    monkeypatch.setattr(datasets, "load_dataset", lambda path, split: datasets.Dataset.from_dict(table))
    assert ds.read_documents(DatasetConfig(path="org/name")) == ["a b", None, "c"]
    assert ds.scan(DatasetConfig(path="org/name")) == ds.Scan(_whole_digest(["a b", None, "c"]), 3, 1)
    with pytest.raises(InputError, match=r"dataset 'org/name' row 0: 'n' is a int, not text"):
        ds.scan(DatasetConfig(path="org/name", text_field="n"))
    with pytest.raises(InputError, match=r"dataset 'org/name' has no 'body' column; set dataset.text_field"):
        ds.scan(DatasetConfig(path="org/name", text_field="body"))
    (tmp_path / "s.jsonl").write_text('{"text": "ok"}\n{"text": "bad \\ud800 here"}\n')
    with pytest.raises(InputError, match=r"s.jsonl: document 2 holds '\\ud800', a lone surrogate"):
        ds.scan(DatasetConfig(path=str(tmp_path / "s.jsonl")))


def test_a_file_rewritten_between_its_two_reads_is_refused(tmp_path: Path) -> None:
    """The digest and the tokens come from two reads: a file changed in between is refused, not mis-keyed."""
    from microscope.documents import check_unchanged

    p = tmp_path / "d.txt"
    p.write_text("one line\nanother line\n")
    cfg = DatasetConfig(path=str(p))
    scanned = ds.scan(cfg)
    check_unchanged(cfg, scanned)  # untouched: fine
    p.write_text("one line\nanother line\nand a third\n")
    with pytest.raises(InputError, match=r"changed while it was being read; run the audit again"):
        check_unchanged(cfg, scanned)
