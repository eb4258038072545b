"""Reading, packing and validating text datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from microscope import dataset as ds
from microscope.errors import InputError
from microscope.validation import raise_on_failure, validate_documents
from schemas.config import DatasetConfig

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
