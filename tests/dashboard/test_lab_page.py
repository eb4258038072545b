"""The Feature lab page (`dashboard/views/lab.py`) through Streamlit's AppTest, and
`microscope.steering_across`, on the session's finished tiny-GPT-2 audits (steps 1 and 2 of FINISHED_RUN,
an SAE on blocks.1.hook_resid_post, variants int8, magnitude-30, magnitude-50): the page's KL is
`Steerer.compare`'s for the same edit, reset returns to the clean model, and the same edit runs on every
variant and on the run's other checkpoint through the stored feature matches."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from microscope import feature_matching as fm
from microscope import results
from microscope import steering_across as sa
from microscope.steering import Edit
from microscope.steering_audit import open_lab
from microscope.store import open_store

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
VIEW = APP.parent / "views" / "lab.py"
HOOK = "blocks.1.hook_resid_post"
K = "_microscope_lab."


@pytest.fixture(scope="module")
def lab_env(finished_audits: dict[str, dict]) -> dict:
    s1, s2 = finished_audits["step1"], finished_audits["step2"]
    store = open_store(s1["store_uri"])
    return {
        "uri": s1["store_uri"],
        "store": store,
        "rec1": results.load_audit(store, s1["audit_id"]),
        "rec2": results.load_audit(store, s2["audit_id"]),
        "partial": finished_audits["partial"]["audit_id"],
    }


def _page(uri: str, **params: str) -> AppTest:
    """The lab page: through app.py's navigation once the page is registered there, else on its own."""
    if "views/lab.py" in APP.read_text() or '"lab.py"' in APP.read_text():
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.query_params["store"] = uri
        at.query_params.update(params)
        at.run()
        return at.switch_page("views/lab.py").run()
    at = AppTest.from_file(str(VIEW), default_timeout=60)
    at.query_params["store"] = uri
    at.query_params.update(params)
    return at.run()


def _button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def _expected_partner(store, rec1, rec2, feature: int) -> str:
    """`feature` of step 1 in step 2, read straight from the stored pair (step 1 → step 2)."""
    t = fm.load_matches(store, rec1.audit_id, rec2.audit_id, HOOK).features.to_pandas().set_index("feature_a")
    r = t.loc[feature]
    return "lost" if r["label"] == "lost" or r["feature_b"] < 0 else str(int(r["feature_b"]))


def test_steer_across_maps_the_feature_to_the_other_checkpoint(lab_env: dict) -> None:
    store, rec1, rec2 = lab_env["store"], lab_env["rec1"], lab_env["rec2"]
    assert fm.load_matches(store, rec1.audit_id, rec2.audit_id, HOOK) is not None  # stored when step 2 ended
    forward, back = sa.feature_map(store, rec1, rec2, HOOK), sa.feature_map(store, rec2, rec1, HOOK)
    assert fm.load_matches(store, rec2.audit_id, rec1.audit_id, HOOK) is None  # read backwards, not recomputed
    for f, g in forward.items():  # one to one: reading the pair backwards undoes it
        assert _expected_partner(store, rec1, rec2, f) == ("lost" if g is None else str(g))
        if g is not None:
            assert back[g] == f

    lab = sa.cached_lab(store, rec1.audit_id, HOOK)
    ids = lab.tokenizer("the cat sat on the", return_tensors="pt")["input_ids"]
    feature = next(f for f, g in forward.items() if g is not None and lab.max_acts[f] > 0)
    edits = [Edit(feature, "add", 3.0)]
    table = sa.steer_across(store, rec1.audit_id, HOOK, edits, ids)
    assert list(table.columns) == sa.COLUMNS
    assert list(table["where"]) == ["fp", *rec1.variants, f"step 2 ({rec2.audit_id})"]
    assert table["error"].isna().all(), list(table["error"])
    assert list(table["feature"]) == [str(feature)] * (1 + len(rec1.variants)) + [str(forward[feature])]
    fp = lab.steerer.compare(ids, edits, top_k=1)
    assert table.iloc[0]["kl"] == pytest.approx(fp["kl"], abs=1e-9) and table.iloc[0]["kl"] > 0
    assert table.iloc[0]["top1_edited"] == fp["top_edited"][0][0]
    assert table.iloc[0]["activation_after"] == pytest.approx(fp["features"][0]["after_mean"])

    from_step2 = sa.steer_across(store, rec2.audit_id, HOOK, [Edit(forward[feature], "add", 3.0)], ids)
    assert from_step2.iloc[-1]["where"] == f"step 1 ({rec1.audit_id})" and from_step2.iloc[-1]["feature"] == str(
        feature
    )


def test_steer_across_names_a_lost_feature_and_a_variant_that_cannot_load(
    lab_env: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, rec1 = lab_env["store"], lab_env["rec1"]
    monkeypatch.setattr(sa, "feature_map", lambda *a: {})  # nothing of step 1 continues into step 2

    def opener(s, audit_id: str, hook: str, variant: str):
        if variant == "int8":
            raise RuntimeError("no int8 kernels here\nsecond line")
        return sa.cached_lab(s, audit_id, hook, variant)

    lab = sa.cached_lab(store, rec1.audit_id, HOOK)
    ids = lab.tokenizer("the cat sat on the", return_tensors="pt")["input_ids"]
    table = sa.steer_across(store, rec1.audit_id, HOOK, [Edit(0, "clamp", 0.0)], ids, open_lab=opener).set_index(
        "where"
    )
    assert table.loc["int8", "error"] == "RuntimeError: no int8 kernels here" and pd.isna(table.loc["int8", "kl"])
    last = table.iloc[-1]
    assert last["feature"] == "lost" and "no match" in last["error"] and pd.isna(last["kl"])
    assert pd.isna(table.loc["fp", "error"])


def test_lab_page_steers_resets_and_compares_everywhere(lab_env: dict) -> None:
    store, rec1, rec2 = lab_env["store"], lab_env["rec1"], lab_env["rec2"]
    at = _page(lab_env["uri"], audit=rec1.audit_id, hook=HOOK)
    assert not at.exception, [e.value for e in at.exception]
    assert rec1.audit_id in at.header[0].value
    feature = int(at.number_input(key=K + "f0").value)  # the top active feature at the prompt's last token
    prompt = at.text_area(key=K + "prompt").value

    at.slider(key=K + "a0").set_value(3.5).run()
    assert not at.exception, [e.value for e in at.exception]
    lab = open_lab(store, rec1.audit_id, HOOK)
    ids = lab.tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert feature == lab.steerer.features_at(ids, top=1)[-1][0][0]
    want = lab.steerer.compare(ids, [Edit(feature, "add", 3.5)], "all", top_k=10)
    got = at.session_state[K + "result"]
    assert got["kl"] == pytest.approx(want["kl"], abs=1e-9) and want["kl"] > 0
    assert [i for i, _ in got["top_edited"]] == [i for i, _ in want["top_edited"]]
    assert any(m.value == f"{want['kl']:.4g}" for m in at.metric)
    assert any(m.label == "edited pass" for m in at.metric)  # the latency is shown
    assert any(m.label == "mean KL per token" for m in at.metric)  # the off-target cost

    # the add edit as a weight patch, swapped into the loaded model for one pass: a bias, so it reproduces the
    # SAE-steered next token (float rounding only), and the model is back to its own weights afterwards
    _button(at, "Fit a patch of these edits").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state[K + "patch_kl"] < 1e-9
    assert any(m.label == "KL(steered ‖ patched), held out" for m in at.metric)
    at.run()  # the next run's edited pass comes after the patch was swapped out: the same KL as before it
    assert at.session_state[K + "result"]["kl"] == pytest.approx(want["kl"], abs=1e-9)

    _button(at, "Reset").click().run()
    assert not at.exception and at.session_state[K + "n"] == 0
    assert at.session_state[K + "result"]["kl"] == 0.0 and at.session_state[K + "result"]["edits"] == []

    at.number_input(key=K + "n").set_value(1).run()
    _button(at, "Same edit on every variant and checkpoint").click().run()
    assert not at.exception, [e.value for e in at.exception]
    table = next(d.value for d in at.dataframe if "where" in d.value.columns)
    assert list(table["where"]) == ["fp", *rec1.variants, f"step 2 ({rec2.audit_id})"]
    assert table.iloc[-1]["feature"] == _expected_partner(store, rec1, rec2, feature)
    assert table["error"].isna().all(), list(table["error"])


def test_lab_page_without_an_sae_says_how_to_get_one(lab_env: dict) -> None:
    at = _page(lab_env["uri"], audit=lab_env["partial"])
    assert not at.exception, [e.value for e in at.exception]
    said = "\n".join(str(i.value) for i in at.info)
    assert "trace,sae" in said and "sae.hooks" in said
