"""Curvature tools against independent references: numpy eigendecompositions and closed forms on
quadratics L = ½θᵀAθ (Hessian A), numpy spectral norms, and an exact rescaling symmetry of
conv → BatchNorm for filter normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from microscope.curvature import (
    SHARPNESS_LABEL,
    hessian_top_eigen,
    jacobian_norm,
    lipschitz_upper_bound,
    loss_slice_1d,
    loss_slice_2d,
    random_direction,
    sharpness,
)


class Quadratic(torch.nn.Module):
    """L = ½ Σ_b θ_bᵀ A_b θ_b over named blocks (block-diagonal Hessian)."""

    def __init__(self, **blocks: tuple[np.ndarray, np.ndarray]) -> None:
        super().__init__()
        self.mats = {}
        for name, (a, theta) in blocks.items():
            self.register_parameter(name, torch.nn.Parameter(torch.tensor(theta, dtype=torch.float64)))
            self.mats[name] = torch.tensor(a, dtype=torch.float64)

    def loss(self) -> torch.Tensor:
        return sum(0.5 * p @ self.mats[n] @ p for n, p in self.named_parameters())


def sym(eigs: list[float], seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigs), len(eigs))))
    return q @ np.diag(eigs) @ q.T


# An indefinite spectrum whose largest-magnitude eigenvalue is negative: the top-3 largest algebraic
# ones (5, 3, 1.5) must come out, not −8.
A = sym([5.0, 3.0, 1.5, 0.5, -8.0], seed=0)


def test_power_iteration_matches_eigvalsh() -> None:
    model = Quadratic(theta=(A, np.ones(5)))
    ref = np.linalg.eigvalsh(A)[::-1]
    out = hessian_top_eigen(model, Quadratic.loss, k=3, iters=1000, tol=1e-10, seed=0)
    assert all(out["converged"])
    np.testing.assert_allclose(out["eigenvalues"], ref[:3], rtol=1e-3)
    top1 = hessian_top_eigen(model, Quadratic.loss, k=1, iters=1000, tol=1e-10, seed=1)
    assert abs(top1["eigenvalues"][0] - ref[0]) <= 1e-3 * ref[0]
    again = hessian_top_eigen(model, Quadratic.loss, k=3, iters=1000, tol=1e-10, seed=0)
    assert again == out  # deterministic per seed
    assert out["composition"] == {"theta": 1.0}


def test_composition_finds_the_block_holding_the_top_eigenvalue() -> None:
    model = Quadratic(a=(sym([1.0, 2.0, 0.5], seed=1), np.ones(3)), b=(sym([10.0, 3.0], seed=2), np.ones(2)))
    out = hessian_top_eigen(model, Quadratic.loss, k=2, iters=500, tol=1e-10)
    assert abs(sum(out["composition"].values()) - 1.0) < 1e-12
    assert out["composition"]["b"] > 0.99
    np.testing.assert_allclose(out["eigenvalues"], [10.0, 3.0], rtol=1e-3)


def test_slice_along_an_eigenvector_is_the_parabola() -> None:
    """θ = 0, d a unit eigenvector with eigenvalue λ: L(αd) = λα²/2 exactly (tolerance 1e-6)."""
    lam, vecs = np.linalg.eigh(A)
    model = Quadratic(theta=(A, np.zeros(5)))
    alphas = [-1.0, -0.3, 0.0, 0.5, 2.0]
    for i in (0, 4):
        d = {"theta": torch.tensor(vecs[:, i])}
        got = loss_slice_1d(model, Quadratic.loss, d, alphas)
        np.testing.assert_allclose(got, [lam[i] * a * a / 2 for a in alphas], atol=1e-6)
    d1, d2 = ({"theta": torch.tensor(vecs[:, i])} for i in (0, 4))
    grid = loss_slice_2d(model, Quadratic.loss, d1, d2, [0.0, 1.0], [0.5, -1.0])
    ref = [[(lam[0] * a * a + lam[4] * b * b) / 2 for b in (0.5, -1.0)] for a in (0.0, 1.0)]
    np.testing.assert_allclose(grid, ref, atol=1e-6)


class ConvBN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.bn = torch.nn.BatchNorm2d(3, eps=0.0)  # eps would break the exact ×10 symmetry
        self.fc = torch.nn.Linear(3 * 4 * 4, 2)
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2.0)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_filter_normalised_slice_is_invariant_to_filter_rescaling() -> None:
    torch.manual_seed(1)
    x, y = torch.randn(8, 2, 6, 6, dtype=torch.float64), torch.randint(0, 2, (8,))

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(x), y)

    model, scaled = ConvBN().eval(), ConvBN().eval()
    with torch.no_grad():  # filter 1 ×10 (bias too); BN mean ×10, var ×100: same function
        scaled.conv.weight[1] *= 10
        scaled.conv.bias[1] *= 10
        scaled.bn.running_mean[1] *= 10
        scaled.bn.running_var[1] *= 100
    torch.testing.assert_close(scaled(x), model(x), atol=1e-12, rtol=1e-10)
    alphas = [-1.0, -0.5, 0.25, 1.0]
    d, ds = random_direction(model, seed=3), random_direction(scaled, seed=3)
    plain = loss_slice_1d(model, loss_fn, d, alphas)
    np.testing.assert_allclose(loss_slice_1d(scaled, loss_fn, ds, alphas), plain, atol=1e-5)
    for name in ("conv.bias", "bn.weight", "bn.bias", "fc.bias"):
        assert not d[name].any()
    for name in ("conv.weight", "fc.weight"):
        w = dict(model.named_parameters())[name]
        torch.testing.assert_close(d[name].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1))
    # Without filter normalisation the rescaled model's slice differs: the test has teeth.
    raw = {n: torch.randn(t.shape, generator=torch.Generator().manual_seed(3), dtype=t.dtype) for n, t in d.items()}
    gap = np.subtract(loss_slice_1d(scaled, loss_fn, raw, alphas), loss_slice_1d(model, loss_fn, raw, alphas))
    assert np.max(np.abs(gap)) > 1e-3


def test_parameters_and_modes_are_restored_exactly() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model.train()
    model[3].eval()
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        assert not m.training
        return torch.nn.functional.cross_entropy(m(x), y)

    def check() -> None:
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n
        assert [m.training for m in model.modules()] == [True, True, True, True, False]

    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    loss_slice_1d(model, loss_fn, d1, [0.3, -0.7])
    loss_slice_2d(model, loss_fn, d1, d2, [0.3, -0.7], [1.1])
    sharpness(model, loss_fn, eps=1e-2, steps=3)
    sharpness(model, loss_fn, adaptive=True, steps=2)
    hessian_top_eigen(model, loss_fn, k=1, iters=5)
    check()

    calls = []

    def failing(m: torch.nn.Module) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:  # after the parameters have been moved once
            raise RuntimeError("boom")
        return loss_fn(m)

    for run in (
        lambda: loss_slice_1d(model, failing, d1, [0.5, 1.0, 2.0]),
        lambda: loss_slice_2d(model, failing, d1, d2, [0.5, 1.0], [1.0]),
        lambda: sharpness(model, failing, steps=3),
    ):
        calls.clear()
        with pytest.raises(RuntimeError, match="boom"):
            run()
        check()


def test_sharpness_of_a_quadratic_matches_the_closed_form() -> None:
    """L = ½θᵀAθ, g = Aθ, step e: L(θ+e) − L(θ) = gᵀe + ½eᵀAe exactly. SAM e = ρg/‖g‖ gives
    ρ‖g‖ + ρ²·gᵀAg/(2‖g‖²); ASAM e = ρT²g/‖Tg‖ (T = diag|θ|) gives ρ‖Tg‖ + ρ²·(T²g)ᵀA(T²g)/(2‖Tg‖²).
    Checked to 1e-6 absolute."""
    theta = np.array([0.5, -1.0, 2.0, 0.1, -0.3])
    model = Quadratic(theta=(A, theta))
    g, rho = A @ theta, 0.05
    gn = np.linalg.norm(g)
    sam = rho * gn + rho**2 * (g @ A @ g) / (2 * gn**2)
    out = sharpness(model, Quadratic.loss, rho=rho)
    assert abs(out["rho_sharpness"] - sam) < 1e-6
    assert abs(out["loss"] - 0.5 * theta @ A @ theta) < 1e-12
    assert out["label"] == SHARPNESS_LABEL
    t2g, tgn = theta**2 * g, np.linalg.norm(np.abs(theta) * g)
    asam = rho * tgn + rho**2 * (t2g @ A @ t2g) / (2 * tgn**2)
    assert abs(sharpness(model, Quadratic.loss, rho=rho, adaptive=True)["rho_sharpness"] - asam) < 1e-6
    eps_values = [sharpness(model, Quadratic.loss, eps=e, seed=0)["eps_sharpness"] for e in (1e-4, 1e-3, 1e-2, 1e-1)]
    assert eps_values[0] >= 0 and all(b > a for a, b in zip(eps_values, eps_values[1:], strict=False))


def test_lipschitz_bound_and_jacobian_norm_of_linear_maps() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    w1, w2 = (m.weight.detach().double().numpy() for m in net)
    product = np.linalg.norm(w1, 2) * np.linalg.norm(w2, 2)
    bound = lipschitz_upper_bound(net)
    assert bound >= np.linalg.norm(w2 @ w1, 2)
    assert abs(bound - product) < 1e-6
    conv = torch.nn.Conv2d(2, 3, 3)
    ref = np.linalg.norm(conv.weight.detach().double().numpy().reshape(3, -1), 2)
    assert abs(lipschitz_upper_bound(conv) - ref) < 1e-6
    lin = torch.nn.Linear(4, 3)
    got = jacobian_norm(lin, torch.randn(5, 4))
    assert abs(got - np.linalg.norm(lin.weight.detach().double().numpy())) < 1e-6


def test_bad_arguments_raise_one_line_value_errors() -> None:
    model = Quadratic(theta=(A, np.ones(5)))
    cases = [
        lambda: hessian_top_eigen(model, Quadratic.loss, k=0),
        lambda: hessian_top_eigen(model, Quadratic.loss, k=6),
        lambda: hessian_top_eigen(model, Quadratic.loss, params=["nope"]),
        lambda: hessian_top_eigen(model, lambda m: m.theta * 2),
        lambda: loss_slice_1d(model, Quadratic.loss, {"theta": torch.zeros(4)}, [1.0]),
        lambda: loss_slice_1d(model, Quadratic.loss, {}, [1.0]),
        lambda: sharpness(model, Quadratic.loss, eps=0.0),
        lambda: sharpness(model, Quadratic.loss, steps=0),
        lambda: lipschitz_upper_bound(model),
        lambda: jacobian_norm(torch.nn.Linear(4, 3), torch.randn(4)),
    ]
    for case in cases:
        with pytest.raises(ValueError) as info:
            case()
        assert "\n" not in str(info.value)
