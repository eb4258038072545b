"""Fisher and Hutchinson against direct computations on a tiny model: per-sample gradients by loop,
and the exact Hessian by autograd."""

from __future__ import annotations

import torch
from torch.func import functional_call

from microscope.sensitivity import fisher_diagonal, gradient_norms, hutchinson_trace


def tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(16, 5)
    y = torch.randint(0, 3, (16,))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p, batch):
        xb, yb = batch
        return torch.nn.functional.cross_entropy(functional_call(model, p, (xb,)), yb)

    return model, params, (x, y), loss_fn


def test_fisher_diagonal_equals_per_sample_gradients_squared() -> None:
    model, params, (x, y), loss_fn = tiny()
    got = fisher_diagonal(loss_fn, params, (x, y))
    ref = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(x)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            ref[k] += p.grad.pow(2) / len(x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-7, rtol=1e-5)
    norms = gradient_norms(loss_fn, params, (x, y))
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for k, p in model.named_parameters():
        assert abs(norms[k] - float(p.grad.norm())) < 1e-6


def test_hutchinson_within_three_standard_errors_of_the_exact_trace() -> None:
    _, params, batch, loss_fn = tiny()
    est = hutchinson_trace(loss_fn, params, batch, probes=400, seed=1)
    for name, p in params.items():

        def block_loss(flat, name=name, p=p):
            return loss_fn({**params, name: flat.reshape(p.shape)}, batch)

        exact = float(torch.autograd.functional.hessian(block_loss, p.reshape(-1)).diagonal().sum())
        mean, se = est[name]
        assert abs(mean - exact) <= 3 * se + 1e-9, (name, mean, exact, se)
