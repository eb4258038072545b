"""The Overview and Layers pages (`dashboard/views/overview.py`, `layers.py`) through AppTest on the shared
finished audits: the tiny GPT-2 (a causal LM) and the digits CNN (a classifier). The Overview shows the
modality's key figures formatted for people (each shown string parsed back and compared with the record's
number), with the glossary's help, and nothing that does not apply (no perplexity for the CNN); the
memory tile compares measured bytes with measured bytes. The Layers table is labelled from the glossary,
shows a few columns by default and all on demand."""

from __future__ import annotations

import json
import re
from pathlib import Path

from streamlit.testing.v1 import AppTest

from microscope import glossary, results
from microscope.store import open_store

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _page(store: str, page: str, **params: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["store"] = store
    at.query_params.update(params)
    at.run()
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _parse(text: str) -> float:
    """A shown figure back to a number: '124.5 KiB' → 127488, '99.6%' → 0.996, '1,234' → 1234."""
    m = re.fullmatch(r"(-?[\d,]*\.?\d+(?:e-?\d+)?)\s*(%|[kMG]|B|KiB|MiB|GiB)?", text.strip())
    assert m, text
    number = float(m[1].replace(",", ""))
    return number / 100 if m[2] == "%" else number * UNITS[m[2] or ""]


def _tiles(at: AppTest) -> dict[str, object]:
    """The key-figure tiles: the metrics outside the folded 'all headline figures' expander."""
    folded = {id(m) for e in at.expander if e.label.startswith("All headline") for m in e.metric}
    return {m.label: m for m in at.metric if id(m) not in folded}


def _close(shown: str, expected: float, rel: float) -> bool:
    return abs(_parse(shown) - expected) <= rel * abs(expected)


def test_overview_of_a_causal_lm(finished_audits: dict) -> None:
    raw = finished_audits["step1"]
    at = _page(raw["store_uri"], "overview", audit=raw["audit_id"])
    tiles = _tiles(at)
    assert 6 <= len(tiles) <= 8, list(tiles)
    q = raw["variants"]["int8"]["quantize"]["metrics"]
    ppl = tiles["perplexity (fp)"]
    assert _close(ppl.value, q["ppl_fp"], 5e-4) and "exp of the mean" in ppl.help  # 4 significant digits
    kl = tiles["KL mean · int8"]
    assert _close(kl.value, q["kl_mean"], 5e-3) and "e" in kl.value  # < 1e-4: the one place for e-notation
    sae = raw["saes"]["blocks.1.hook_resid_post"]["metrics"]
    assert _close(tiles["SAE FVU · resid 1"].value, sae["fvu"], 5e-4)
    alpha = raw["stages"]["metrics"]["metrics"]["alpha_mean"]
    assert _close(tiles["mean α"].value, alpha, 5e-4)
    assert _close(tiles["parameters"].value, raw["stages"]["ingest"]["metrics"]["n_params"], 5e-3)
    # memory: the smallest variant, its measured bytes against full precision's, both as bytes
    sizes = {v: r["quantize"]["metrics"]["measured_bytes"] for v, r in raw["variants"].items()}
    v = min(sizes, key=sizes.get)
    mem = tiles[f"memory · {v}"]
    fp = raw["variants"][v]["quantize"]["metrics"]["fp_bytes"]
    assert _close(mem.value, sizes[v], 5e-3) and mem.value.endswith("KiB")
    pct, _, fp_text = mem.delta.partition(" of fp ")
    assert _close(pct, sizes[v] / fp, 5e-3) and _close(fp_text.strip("()"), fp, 5e-3)
    assert all(m.help for m in tiles.values())  # every tile explains itself
    assert not any(t.startswith(("accuracy", "ECE", "AutoAttack")) for t in tiles)  # classifier figures


def test_overview_of_a_classifier_shows_no_lm_figure(finished_vision: dict) -> None:
    raw = finished_vision
    at = _page(raw["store_uri"], "overview", audit=raw["audit_id"])
    tiles = _tiles(at)
    assert 6 <= len(tiles) <= 8, list(tiles)
    rel = raw["stages"]["reliability"]["metrics"]
    rob = raw["stages"]["robustness"]["metrics"]
    assert _close(tiles["accuracy"].value, rel["accuracy"], 5e-3) and tiles["accuracy"].value.endswith("%")
    assert _close(tiles["AutoAttack Linf"].value, rob["autoattack_Linf"], 5e-3)
    assert _close(tiles["ECE"].value, rel["ece"], 5e-4)
    assert _close(tiles["mean corruption accuracy"].value, rel["mean_corruption_accuracy"], 5e-3)
    assert _close(tiles["parameters"].value, raw["stages"]["ingest"]["metrics"]["n_params"], 5e-3)
    q = raw["variants"]["torch-int8"]["quantize"]["metrics"]
    mem = tiles["memory · torch-int8"]
    assert _close(mem.value, q["measured_bytes"], 5e-3)
    assert _close(mem.delta.partition(" of fp ")[0], q["measured_bytes"] / q["fp_bytes"], 5e-3)
    # the record has a "perplexity" over classes and n_layers = 0: neither is shown, folded or not
    assert "ppl_fp" in q and raw["stages"]["ingest"]["metrics"]["n_layers"] == 0
    shown = {m.label for m in at.metric}
    for lm in ("perplexity (fp)", "ppl_fp", "ppl_q", "delta_ppl", "blocks", "n_layers", "SAE FVU", "mean α"):
        assert lm not in shown, lm


def test_layers_table_is_labelled_with_a_column_picker(finished_audits: dict) -> None:
    raw = finished_audits["step2"]
    at = _page(raw["store_uri"], "layers", audit=raw["audit_id"])
    df = at.dataframe[0]
    store = open_store(raw["store_uri"])
    table = results.layer_table(store, results.load_audit(store, raw["audit_id"]))
    assert list(df.value.columns) == list(table.columns)  # the whole table: exports and sorting see it
    config = json.loads(df.proto.columns)
    for col in table.columns:
        term = glossary.lookup(col)
        assert term is not None and config[col]["label"] == term.label and term.help in config[col]["help"], col
    assert config["alpha"]["type_config"]["format"] == "%.4g"  # not six decimals
    order = list(df.proto.column_order)
    assert order[:2] == ["name", "role"] and "alpha" in order and len(order) < len(table.columns)
    at.toggle(key="_layers.all").set_value(True).run()
    assert list(at.dataframe[0].proto.column_order) == list(table.columns)
    assert at.multiselect(key="_layers.columns").format_func("spectral_norm") == "spectral norm"
    # into the matrix explorer: offered only where its page exists, and it carries the matrix's name
    boxes = [s for s in at.selectbox if s.label == "Open in the matrix explorer"]
    if '"matrix.py"' not in APP.read_text():  # the page is not in app.py's navigation (yet)
        assert not boxes
    else:
        name = str(table["name"].iloc[-1])
        boxes[0].select(name).run()
        assert not at.exception and at.query_params["layer"] == name
