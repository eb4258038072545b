"""The landscape stage's computation against independent references: numpy eigvalsh of the closed-form
Hessian of least squares (H = 2[X 1]ᵀ[X 1]/n per output), direct full-batch losses (HF's own next-token loss,
torch's cross-entropy), and hand-built audit records for the run history."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest
import torch

from microscope.landscape import (
    DIAGNOSTICS_NOTE,
    ENCODER_UNDEFINED,
    block_of,
    evaluate,
    loss_subset_images,
    loss_subset_text,
    second_derivative,
    small,
)
from microscope.models.vision import DigitsCNN
from microscope.results.landscape import (
    eigen_table,
    landscape_history,
    landscape_overview,
    slice_1d_frame,
    slice_2d_frame,
)
from schemas.config import LandscapeConfig
from schemas.details.landscape import LandscapeDetails
from schemas.records import AuditRecord, ModelRef, StageRecord, StageStatus
from tests.conftest import build_model


def lc(**overrides: object) -> LandscapeConfig:
    base = dict(samples=64, eigenvalues=2, power_iters=30, power_tol=1e-6, grid=5, span=0.5, batch_size=16)
    return LandscapeConfig(**{**base, **overrides})


def images(n: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, n)


def cnn() -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN(channels=4)


def test_lambda_max_matches_eigvalsh_of_least_squares() -> None:
    """MSE of a linear layer: H = 2 AᵀA / n with A = [X 1], once per output (block diagonal)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 4)) * [1.0, 2.0, 0.5, 3.0], rng.normal(size=(50, 2))
    lin = torch.nn.Linear(4, 2).double()
    model = torch.nn.Sequential()
    model.add_module("head", lin)
    xt, yt = torch.tensor(x), torch.tensor(y)

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        return (m(xt) - yt).pow(2).sum(dim=1).mean()  # Σ over outputs of each output's MSE

    a = np.hstack([x, np.ones((50, 1))])
    ref = np.linalg.eigvalsh(2 * a.T @ a / 50)[::-1]  # each eigenvalue twice in H (two outputs)
    out = evaluate(model, loss_fn, lc(eigenvalues=3, power_iters=1000, power_tol=1e-12), seed=0)
    np.testing.assert_allclose(
        [out["figures"]["lambda_max"], out["figures"]["lambda_2"], out["figures"]["lambda_3"]],
        [ref[0], ref[0], ref[1]],
        rtol=1e-3,
    )
    assert out["eigen"][0]["composition"] == pytest.approx({"head": 1.0})
    assert out["figures"]["loss"] == pytest.approx(float(loss_fn(model).detach()), rel=1e-12)


def test_image_subset_loss_is_full_batch_ce_for_any_batch_size() -> None:
    x, y = images(100)
    model = cnn().eval()
    idx, _ = loss_subset_images(x, y, lc(samples=37), seed=3)
    assert len(idx) == 37 and idx == sorted(idx)
    with torch.no_grad():
        direct = float(torch.nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])))
    for bs in (1, 5, 37, 256):
        idx_b, loss_fn = loss_subset_images(x, y, lc(samples=37, batch_size=bs), seed=3)
        assert idx_b == idx
        with torch.no_grad():
            assert float(loss_fn(model)) == pytest.approx(direct, rel=1e-6)
    all_idx, loss_fn = loss_subset_images(x, y, lc(samples=1000), seed=3)
    assert all_idx == list(range(100)) and loss_fn.count == 100  # fewer images than asked: all


def test_text_subset_is_seeded_covers_the_samples_and_matches_hf_loss() -> None:
    model = build_model("gpt2")
    ids = np.random.default_rng(0).integers(0, 512, size=(40, 17))  # 16 predicted tokens per window
    idx, loss_fn = loss_subset_text(ids, lc(samples=100, batch_size=32), seed=1, causal=True)
    assert loss_fn.count >= 100 and len(idx) == 7 and loss_fn.count == 7 * 16  # ceil(100 / 16) windows
    assert loss_subset_text(ids, lc(samples=100), seed=1, causal=True)[0] == idx
    assert loss_subset_text(ids, lc(samples=100), seed=2, causal=True)[0] != idx
    x = torch.from_numpy(ids[idx].astype(np.int64))
    with torch.no_grad():
        direct = float(model(input_ids=x, labels=x).loss)  # HF: mean next-token CE over all windows at once
        for bs in (1, 16, 48, 10_000):
            _, f = loss_subset_text(ids, lc(samples=100, batch_size=bs), seed=1, causal=True)
            assert float(f(model)) == pytest.approx(direct, rel=1e-6)
    assert len(loss_subset_text(ids, lc(samples=10_000), seed=1, causal=True)[0]) == 40


def test_encoder_has_no_landscape() -> None:
    with pytest.raises(ValueError) as e:
        loss_subset_text(np.zeros((4, 8), dtype=np.int32), lc(), seed=0, causal=False)
    assert str(e.value) == ENCODER_UNDEFINED and "\n" not in str(e.value)


def test_evaluate_images_slice_at_zero_json_and_details() -> None:
    x, y = images(60)
    model = cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, loss_fn = loss_subset_images(x, y, lc(), seed=0)
    out = evaluate(model, loss_fn, lc(), seed=0)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    f = out["figures"]
    assert out["slice_1d"]["alphas"][2] == 0.0
    assert out["slice_1d"]["loss"][2] == pytest.approx(f["loss"], abs=1e-6)
    assert out["slice_2d"]["loss"][2][2] == pytest.approx(f["loss"], abs=1e-6)
    assert len(out["slice_2d"]["loss"]) == 5 and all(len(r) == 5 for r in out["slice_2d"]["loss"])
    assert {"lambda_max", "lambda_2", "eps_sharpness", "rho_sharpness", "lipschitz_upper", "jacobian_norm",
            "slice_1d_curvature"} <= set(f)  # fmt: skip
    assert all("." not in k for k in f) and out["undefined"] == {}
    assert out["samples"] == 60 and out["kind"] == "images" and out["jacobian_samples"] == 60
    assert out["diagnostics_note"] == DIAGNOSTICS_NOTE and out["seeds"]["d1"] != out["seeds"]["d2"]
    assert set(out["seconds"]) >= {"loss", "hessian", "slice_1d", "slice_2d", "sharpness", "jacobian"}
    text = json.dumps(out, allow_nan=False)  # strict JSON
    details = LandscapeDetails(prefix="abc/landscape/h", variant="fp", **json.loads(text))
    assert details.model_dump(mode="json") == {"prefix": "abc/landscape/h", "variant": "fp", **out}
    again = evaluate(model, loss_fn, lc(), seed=0)
    assert again["figures"] == f  # deterministic per seed

    rec = StageRecord(stage="landscape", status=StageStatus.completed, metrics=f, details=details.model_dump())
    view = landscape_overview(rec, {})
    assert view is not None and view["figures"]["fp"] == f and view["note"] == DIAGNOSTICS_NOTE
    grid = slice_2d_frame(rec)
    assert len(grid) == 25 and list(grid.columns) == ["alpha", "beta", "loss"]
    assert grid.loc[(grid.alpha == 0) & (grid.beta == 0), "loss"].item() == pytest.approx(f["loss"], abs=1e-6)
    assert len(slice_1d_frame(view["records"])) == 5
    eig = eigen_table(rec)
    assert list(eig["eigenvalue"]) == [f["lambda_max"], f["lambda_2"]] and eig["top_blocks"][0]


def test_evaluate_causal_lm_marks_input_bounds_undefined() -> None:
    model = build_model("gpt2")
    before = model.config._attn_implementation
    ids = np.random.default_rng(0).integers(0, 512, size=(8, 9))
    _, loss_fn = loss_subset_text(ids, lc(samples=16), seed=0, causal=True)
    out = evaluate(model, loss_fn, lc(samples=16, eigenvalues=1, power_iters=3, grid=3, slice_2d=False), seed=0)
    assert set(out["undefined"]) == {"lipschitz_upper", "jacobian_norm"}
    assert out["slice_2d"] is None and out["slice_1d"]["loss"][1] == pytest.approx(out["figures"]["loss"], abs=1e-6)
    assert "transformer.h.0" in out["eigen"][0]["composition"]
    stage_results = out | {"variant": "int8", "subset": list(range(2))}  # what the stage adds
    LandscapeDetails(prefix="p", **small(stage_results))
    assert model.config._attn_implementation == before  # eager only for the Hessian


def test_encoder_details_say_why() -> None:
    d = LandscapeDetails.undefined_for(prefix="p", variant="fp", reason=ENCODER_UNDEFINED).model_dump(mode="json")
    assert d["reason"] == ENCODER_UNDEFINED and d["figures"] == {} and d["undefined"]["lambda_max"] == ENCODER_UNDEFINED
    assert "seed" not in d and "slice_1d" not in d
    rec = StageRecord(stage="landscape", status=StageStatus.completed, details=d)
    assert landscape_overview(rec, {})["reason"] == ENCODER_UNDEFINED


def test_blocks_and_finite_difference() -> None:
    assert block_of("transformer.h.3.attn.c_attn.weight") == "transformer.h.3"
    assert block_of("transformer.wte.weight") == "transformer.wte"
    assert block_of("conv1.bias") == "conv1" and block_of("theta") == "theta"
    a = [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert second_derivative(a, [3 * t * t + t + 2 for t in a]) == pytest.approx(6.0)
    b = [-1.0, -1 / 3, 1 / 3, 1.0]  # even grid: the parabola through the three points nearest 0
    assert second_derivative(b, [3 * t * t - t for t in b]) == pytest.approx(6.0)


def audit(step: int, figures: dict[str, float] | None) -> AuditRecord:
    stages = {}
    if figures is not None:
        stages["landscape"] = StageRecord(
            stage="landscape", status=StageStatus.completed, metrics=figures, details={"figures": figures}
        )
    return AuditRecord(
        audit_id=f"a{step}", run_id="run", step=step, created_at=datetime(2026, 1, 1, tzinfo=UTC),
        status=StageStatus.completed, model=ModelRef(source="m", source_fingerprint="f"), config={}, store_uri="/tmp/s", stages=stages,
    )  # fmt: skip


def test_history_puts_figures_against_step() -> None:
    later = audit(200, {"loss": 1.0, "lambda_max": 5.0, "eps_sharpness": 2.0, "rho_sharpness": 0.1})
    first = audit(100, {"loss": 2.0, "lambda_max": 9.0, "eps_sharpness": 4.0, "rho_sharpness": 0.3})
    df = landscape_history([later, first, audit(300, None)])
    assert list(df["step"]) == [100, 200] and list(df["audit_id"]) == ["a100", "a200"]
    assert list(df["lambda_max"]) == [9.0, 5.0] and list(df["rho_sharpness"]) == [0.3, 0.1]
    assert list(df["loss"]) == [2.0, 1.0] and df["slice_1d_curvature"].isna().all()
    assert "1 of 3 audits lack it" in df.attrs["missing"]["landscape"]
    assert "add landscape to --stages" in df.attrs["missing"]["landscape"]
