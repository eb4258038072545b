"""The Matrix explorer and CKA pages (`dashboard/views/matrix.py`, `cka.py`) through Streamlit's AppTest on
the session's real finished audits of a tiny GPT-2: they run, show the chosen matrix (the URL's `layer`, as
the Layers table names it), refuse an unknown one by name with the closest names, and their figures equal
the records and a direct NumPy computation on the saved weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from microscope import results
from microscope.store import open_store

VIEWS = Path(__file__).resolve().parents[2] / "dashboard" / "views"
MATRIX = "transformer.h.1.attn.c_attn.weight"


@pytest.fixture(scope="module")
def audits(finished_audits: dict[str, dict]) -> dict:
    return {"uri": finished_audits["step2"]["store_uri"], **finished_audits}


def _page(uri: str, page: str, **params: str) -> AppTest:
    # The page alone (app.py's navigation is tested in test_app.py): the state it reads is the URL's.
    at = AppTest.from_file(str(VIEWS / f"{page}.py"), default_timeout=90)
    at.query_params["store"] = uri
    at.query_params.update(params)
    return at.run()


def _texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


@pytest.mark.parametrize("page", ["matrix", "cka"])
@pytest.mark.parametrize("which", ["step2", "partial"])
def test_pages_run_on_finished_audits(audits: dict, page: str, which: str) -> None:
    audit_id = audits[which]["audit_id"]
    at = _page(audits["uri"], page, audit=audit_id)
    assert not at.exception, [e.value for e in at.exception]
    assert audit_id in _texts(at.header)
    if which == "partial" and page == "cka":  # ingest and metrics only: nothing traced
        assert "add trace to --stages" in _texts(at.info)
    if which == "partial" and page == "matrix":
        assert "no quantized variant" in _texts(at.info) and "no tensor" not in _texts(at.info)


def test_the_layers_tables_names_open_here(audits: dict) -> None:
    store = open_store(audits["uri"])
    rec = results.load_audit(store, audits["step2"]["audit_id"])
    names = list(results.layer_table(store, rec)["name"])
    from microscope.results import matrix as mx

    assert sorted(names) == sorted(mx.matrix_catalog(rec)["name"])  # `layer` means the same on both pages
    at = _page(audits["uri"], "matrix", audit=rec.audit_id, layer=names[-1])
    assert not at.exception and at.query_params["layer"] == names[-1]
    assert f"`{names[-1]}`" in _texts(at.caption)


def test_the_chosen_matrix_and_its_quantization_error(audits: dict) -> None:
    """The page shows MATRIX; its relative error per variant equals NumPy on the checkpoint's and the saved
    variants' safetensors (pruned: the float copy; LLM.int8: int8 × SCB / 127, in Linear's [out, in])."""
    from safetensors.numpy import load_file

    rec = audits["step2"]
    at = _page(audits["uri"], "matrix", audit=rec["audit_id"], layer=MATRIX)
    assert not at.exception, [e.value for e in at.exception]
    assert at.query_params["layer"] == MATRIX and at.selectbox(key="_microscope_pick.layer").value == MATRIX
    assert f"`{MATRIX}`" in _texts(at.caption)
    shown = next(d.value for d in at.dataframe if "rel_error" in d.value.columns).set_index("variant")

    store = open_store(audits["uri"])
    full = load_file(str(Path(rec["model"]["resolved_path"] or rec["model"]["source"]) / "model.safetensors"))
    w = full[MATRIX].astype(np.float64)  # Conv1D: [in, out]
    for v in ("magnitude-30", "magnitude-50"):
        saved = load_file(
            str(store.local_path(f"{rec['variants'][v]['quantize']['details']['prefix']}/variant/model.safetensors"))
        )
        expected = np.linalg.norm(saved[MATRIX].astype(np.float64) - w) / np.linalg.norm(w)
        assert shown.loc[v, "rel_error"] == pytest.approx(expected, rel=1e-9)
        assert 0.01 < expected < 1  # a pruned matrix: some, not all, of its energy gone
    saved = load_file(
        str(store.local_path(f"{rec['variants']['int8']['quantize']['details']['prefix']}/variant/model.safetensors"))
    )
    module = MATRIX.removesuffix(".weight")
    if saved[MATRIX].dtype == np.int8:
        wq = saved[MATRIX].astype(np.float64) * saved[f"{module}.SCB"].astype(np.float64)[:, None] / 127
        expected = np.linalg.norm(wq - w.T) / np.linalg.norm(w)
        assert shown.loc["int8", "rel_error"] == pytest.approx(expected, rel=1e-9)
        assert expected < 0.02  # row-wise int8: about 1/(127·√3) of a row's range per weight


def test_an_unknown_layer_is_named_with_the_closest_names(audits: dict) -> None:
    bad = "transformer.h.1.attn.c_atn.weight"
    at = _page(audits["uri"], "matrix", audit=audits["step2"]["audit_id"], layer=bad)
    assert not at.exception
    said = _texts(at.error)
    assert bad in said and MATRIX in said.split("Closest:")[1].split(",")[0]
    assert at.query_params["layer"] == bad  # never silently another matrix
    assert not [s for s in at.subheader if s.value == "Weights"]
    at.button(key=f"near-{MATRIX}").click().run()
    assert not at.exception and at.query_params["layer"] == MATRIX
    assert f"`{MATRIX}`" in _texts(at.caption)


def test_history_over_the_run_equals_each_audits_record(audits: dict) -> None:
    at = _page(audits["uri"], "matrix", audit=audits["step2"]["audit_id"], layer=MATRIX)
    hist = next(d.value for d in at.dataframe if "step" in d.value.columns)
    assert list(hist["step"]) == [1, 2]
    for step in (1, 2):
        row = next(r for r in audits[f"step{step}"]["stages"]["metrics"]["details"]["weights"] if r["name"] == MATRIX)
        got = hist[hist["step"] == step].iloc[0]
        assert got["alpha"] == pytest.approx(row["alpha"], rel=1e-12)
        assert got["spectral_norm"] == pytest.approx(row["spectral_norm"], rel=1e-12)


def test_cka_page_shows_the_recorded_values(audits: dict) -> None:
    rec = audits["step2"]
    cka = rec["stages"]["metrics"]["details"]["cka"]
    at = _page(audits["uri"], "cka", audit=rec["audit_id"])
    assert not at.exception
    square = next(d.value for d in at.dataframe if d.value.shape == (len(cka["layers"]), len(cka["layers"])))
    np.testing.assert_allclose(square.loc[cka["layers"], cka["layers"]].to_numpy(), np.array(cka["matrix"]), rtol=1e-12)
    per_variant = next(d.value for d in at.dataframe if "variant" in d.value.columns)
    expected = {(v, h): c for v, per in cka["variants"].items() for h, c in per.items()}
    got = {(r.variant, r.hook): r.cka for r in per_variant.itertuples()}
    assert got == pytest.approx(expected)
    assert expected  # the audit traced its variants
