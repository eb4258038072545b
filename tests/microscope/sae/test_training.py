"""Lightning training: it recovers a known sparse dictionary, keeps decoder rows at unit norm, and a
fit killed mid-way resumes to exactly the weights of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from microscope.sae.architectures import build
from microscope.sae.data import ShuffledBatches, activation_scale, array_chunks, geometric_median
from microscope.sae.training import SAEModule, find_lr, fit


def sparse_dictionary_data(n: int = 40000, d: int = 32, n_feat: int = 128, k: int = 4, seed: int = 0):
    """x = Σ c_i f_i over k random unit features with positive coefficients: ground truth to recover."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n_feat, d))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    codes = np.zeros((n, n_feat))
    rows = np.repeat(np.arange(n), k)
    cols = np.concatenate([rng.choice(n_feat, k, replace=False) for _ in range(n)])
    codes[rows, cols] = rng.uniform(0.5, 2.0, n * k)
    return (codes @ feats).astype(np.float32), feats


def test_topk_recovers_a_known_dictionary() -> None:
    x, feats = sparse_dictionary_data()
    torch.manual_seed(0)
    sae = build("topk", 32, 256, k=4)
    data = ShuffledBatches(array_chunks(x), 512, 8192, epochs=4, seed=0)
    fit(SAEModule(sae, lr=3e-3, dead_window=20000), data, steps=data.count(), progress=False)
    w = sae.W_dec.detach().double().numpy()
    mean_max_cos = (feats @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T).max(1).mean()
    assert mean_max_cos >= 0.9, mean_max_cos
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-5, rtol=0)


class Kill(L.Callback):
    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("killed")


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_resume_reaches_the_same_weights(arch: str, tmp_path: Path) -> None:
    x, _ = sparse_dictionary_data(n=12000)

    def run(ckpt: Path, callbacks=None):
        torch.manual_seed(0)
        sae = build(arch, 32, 64, k=4) if arch == "topk" else build(arch, 32, 64, l0_coef=1e-3)
        module = SAEModule(sae, lr=2e-3, dead_window=2000)
        data = ShuffledBatches(array_chunks(x), 256, 4096, epochs=2, seed=3)
        return sae, fit(
            module, data, steps=80, checkpoint_dir=ckpt, checkpoint_every=20, progress=False, callbacks=callbacks
        )

    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "a", [Kill(50)])
    assert (tmp_path / "a" / "last.ckpt").exists()
    resumed_sae, resumed = run(tmp_path / "a")
    assert resumed.resumed_from_step == 40 and resumed.steps == 80
    whole_sae, _ = run(tmp_path / "b")
    for (name, a), b in zip(resumed_sae.state_dict().items(), whole_sae.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_lr_finder_suggests_a_rate() -> None:
    x, _ = sparse_dictionary_data(n=20000)
    torch.manual_seed(0)
    module = SAEModule(build("topk", 32, 64, k=4), lr=1e-3, dead_window=5000)
    lr = find_lr(module, ShuffledBatches(array_chunks(x), 256, 4096, epochs=2, seed=0), num_training=40)
    assert 1e-6 <= lr <= 1e-1


def test_normalisation_and_geometric_median() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 16)).astype(np.float32) * 7
    s = activation_scale(x)
    assert abs(np.mean(np.sum((x * s) ** 2, axis=1)) - 16) < 1e-3
    pts = np.vstack([rng.standard_normal((99, 3)), [[1e6, 1e6, 1e6]]])  # one wild outlier
    gm = geometric_median(pts)
    assert np.linalg.norm(gm) < 0.5 < np.linalg.norm(pts.mean(0))
    from scipy.optimize import minimize

    ref = minimize(
        lambda y: np.linalg.norm(pts - y, axis=1).sum(),
        pts.mean(0) * 0,
        method="Nelder-Mead",
        options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 20000},
    ).x
    np.testing.assert_allclose(gm, ref, atol=1e-3)


def test_relu_resampling_revives_dead_latents() -> None:
    x, _ = sparse_dictionary_data(n=8000)
    torch.manual_seed(0)
    sae = build("relu", 32, 64, l1_coef=0.5)
    with torch.no_grad():
        sae.b_enc[:16] = -1e3  # sixteen latents that can never fire
    module = SAEModule(sae, lr=1e-3, dead_window=1024, resample_every=10)
    fit(module, ShuffledBatches(array_chunks(x), 256, 4096, epochs=1, seed=0), steps=12, progress=False)
    assert module.resampled >= 16
    assert (sae.b_enc[:16] > -1).all()  # reset to zero bias, then trained
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5, rtol=0)
    with torch.no_grad():
        acts = sae.encode(torch.from_numpy(x[:2000]))
    assert (acts[:, :16] > 0).any(0).sum() >= 8  # most of them fire again


def test_two_saes_from_one_pass_equal_separate_training() -> None:
    """Two hook points of the same tokens, one pass: each SAE ends exactly where it would alone."""
    from microscope.sae.data import joint_chunks

    a, _ = sparse_dictionary_data(n=6000, seed=1)
    b, _ = sparse_dictionary_data(n=6000, d=32, seed=2)

    def make(arch: str):
        torch.manual_seed(0)
        return build(arch, 32, 64, k=4) if arch == "topk" else build(arch, 32, 64, l1_coef=0.5)

    joint = [make("topk"), make("relu")]
    data = ShuffledBatches(
        joint_chunks([array_chunks(a, 1000), array_chunks(b, 1000)]), 256, 2048, epochs=2, seed=5, scale=(1.0, 0.5)
    )
    module = SAEModule(joint, lr=2e-3, dead_window=1000, resample_every=7)
    fit(module, data, steps=30, progress=False)
    assert len(module.curves) == 2 and module.curves[1]

    for sae_joint, x, arch, scale in ((joint[0], a, "topk", 1.0), (joint[1], b, "relu", 0.5)):
        alone = make(arch)
        single = ShuffledBatches(array_chunks(x, 1000), 256, 2048, epochs=2, seed=5, scale=scale)
        fit(SAEModule(alone, lr=2e-3, dead_window=1000, resample_every=7), single, steps=30, progress=False)
        for (name, p), q in zip(sae_joint.state_dict().items(), alone.state_dict().values(), strict=True):
            torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)
