"""Steering checked against independent references: the edited residual, KL and top-k are recomputed
here with the test's own hooks and scipy, never read back from the steerer."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as sp_log_softmax
from scipy.special import softmax as sp_softmax
from scipy.stats import entropy

from microscope.sae.io import LoadedSAE
from microscope.steering import Edit, Steerer, parse_edit

D, D_SAE, HOOK = 32, 64, "transformer.h.1"


def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=D, n_head=2, vocab_size=100, n_positions=64)).eval()


def sae(arch: str = "relu") -> LoadedSAE:
    """Tied weights with unit-norm decoder rows, so W_dec[i]·W_enc[:, i] = 1: adding feature i's direction
    raises its pre-activation, and removing f_i·W_dec[i] brings a ReLU feature to exactly 0."""
    g = torch.Generator().manual_seed(1)
    w_dec = torch.randn(D_SAE, D, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    weights = {"W_enc": w_dec.T.contiguous(), "W_dec": w_dec, "b_enc": torch.zeros(D_SAE), "b_dec": torch.zeros(D)}
    cfg = {"architecture": arch, "d_in": D, "d_sae": D_SAE, **({"k": 8} if arch == "topk" else {})}
    return LoadedSAE(cfg, weights)


def max_acts() -> np.ndarray:
    m = np.random.default_rng(2).uniform(0.5, 2.0, D_SAE)
    m[5] = np.nan  # a feature that never fired
    return m


def ids(t: int = 12, n: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 100, (n, t)))


@contextmanager
def capture(model: torch.nn.Module, path: str):
    """The module's output (hidden state first), as the next hook in line sees it."""
    got: list[torch.Tensor] = []

    def hook(_m, _i, out):
        got.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    handle = dict(model.named_modules())[path].register_forward_hook(hook)
    try:
        yield got
    finally:
        handle.remove()


@contextmanager
def manual_add(model: torch.nn.Module, path: str, delta: torch.Tensor):
    def hook(_m, _i, out):  # blocks return the hidden state alone or first in a tuple
        return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta

    handle = dict(model.named_modules())[path].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture
def steerer() -> Steerer:
    return Steerer(gpt2(), sae(), HOOK, max_acts(), causal=True)


def residuals(s: Steerer, x: torch.Tensor, edits, positions="all") -> tuple[torch.Tensor, torch.Tensor]:
    """Block 0's and block 1's outputs under the edits (the test's hooks run after the steerer's)."""
    with torch.no_grad(), s.edited(edits, positions, x.shape[1]):
        with capture(s.model, "transformer.h.0") as h0, capture(s.model, HOOK) as h1:
            s.model(input_ids=x)
    return h0[0], h1[0]


def test_no_edits_and_zero_adds_are_bit_identical(steerer: Steerer) -> None:
    x = ids()
    with torch.no_grad():
        plain = steerer.model(input_ids=x).logits
    for edits in ([], [Edit(3, "add", 0.0)], [Edit(3, "add", 0.0), Edit(9, "add", -0.0)]):
        assert torch.equal(steerer.forward(x, edits).logits, plain)
        r = steerer.compare(x, edits, top_k=5, continuation=3)
        assert r["kl"] == 0.0 and r["top_edited"] == r["top_clean"] and r["residual_shift"] == 0.0
        assert r["continuation_edited"] == r["continuation_clean"]


def test_add_moves_the_residual_by_the_decoder_direction_at_the_edited_positions(steerer: Steerer) -> None:
    x = ids()
    clean0, clean1 = residuals(steerer, x, [])
    got0, got1 = residuals(steerer, x, [Edit(3, "add", 2.0)], (2, 5))
    expected = clean1.clone()
    expected[:, 2:5] += 2.0 * float(max_acts()[3]) * steerer.sae.W_dec[3]
    torch.testing.assert_close(got1[:, 2:5], expected[:, 2:5], atol=1e-5, rtol=0)
    assert torch.equal(got1[:, :2], clean1[:, :2]) and torch.equal(got1[:, 5:], clean1[:, 5:])
    assert torch.equal(got0, clean0)  # the layer below is untouched


def test_feature_activation_is_monotone_in_alpha(steerer: Steerer) -> None:
    x = ids()
    acts = [steerer.sae.encode(residuals(steerer, x, [Edit(7, "add", a)])[1])[..., 7] for a in (0, 1, 2, 4)]
    for lo, hi in zip(acts, acts[1:], strict=False):
        assert bool((hi >= lo).all())
    assert bool((acts[-1] > acts[0]).any())


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_clamp_is_encode_edit_decode_plus_error(arch: str) -> None:
    s = Steerer(gpt2(), sae(arch), HOOK, max_acts(), causal=True)
    x = ids()
    _, h = residuals(s, x, [])
    for feature, alpha in ((7, 1.5), (12, 0.0)):
        f = s.sae.encode(h)
        f[..., feature] = alpha * float(max_acts()[feature])
        expected = s.sae.decode(f) + (h - s.sae.decode(s.sae.encode(h)))
        _, got = residuals(s, x, [Edit(feature, "clamp", alpha)])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if arch == "relu":  # ablation: re-encoding the edited residual finds the feature silent
        assert float(s.sae.encode(got)[..., 12].abs().max()) < 1e-5


def test_clamp_to_zero_of_a_dead_feature_is_allowed_and_adds_to_it_are_not(steerer: Steerer) -> None:
    steerer.compare(ids(), [Edit(5, "clamp", 0.0)])
    for bad in (Edit(5, "add", 1.0), Edit(5, "clamp", 2.0)):
        with pytest.raises(ValueError, match="feature 5 "):
            steerer.compare(ids(), [bad])
    with pytest.raises(ValueError, match="out of range"):
        steerer.compare(ids(), [Edit(D_SAE, "add", 1.0)])


def test_kl_and_top_k_match_a_manually_edited_forward(steerer: Steerer) -> None:
    x = ids()
    r = steerer.compare(x, [Edit(3, "add", 3.0)], positions="prompt", top_k=5)
    delta = 3.0 * float(max_acts()[3]) * steerer.sae.W_dec[3]
    with torch.no_grad():
        clean = steerer.model(input_ids=x).logits[0, -1].double()
        with manual_add(steerer.model, HOOK, delta):
            edited = steerer.model(input_ids=x).logits[0, -1].double()
    p, q = sp_softmax(clean.numpy()), sp_softmax(edited.numpy())
    assert r["kl"] > 1e-6
    assert abs(r["kl"] - entropy(p, q)) < 1e-9
    vals, idx = torch.topk(edited, 5)
    assert [i for i, _ in r["top_edited"]] == idx.tolist()
    np.testing.assert_allclose([v for _, v in r["top_edited"]], q[idx.numpy()], rtol=1e-9)
    assert [i for i, _ in r["top_clean"]] == torch.topk(clean, 5).indices.tolist()
    assert r["residual_shift"] == pytest.approx(float(delta.norm()), rel=1e-5)
    (feat,) = r["features"]
    assert feat["feature"] == 3 and feat["after_mean"] > feat["before_mean"]


def test_greedy_continuation_matches_a_loop_without_cache(steerer: Steerer) -> None:
    x = ids()
    r = steerer.compare(x, [Edit(3, "add", 3.0)], positions="all", continuation=4, seed=7)
    delta = 3.0 * float(max_acts()[3]) * steerer.sae.W_dec[3]
    for key, edit in (("continuation_clean", False), ("continuation_edited", True)):
        seq = x.clone()
        with torch.no_grad():
            for _ in range(4):
                if edit:
                    with manual_add(steerer.model, HOOK, delta):
                        nxt = steerer.model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
                else:
                    nxt = steerer.model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
        assert r[key] == seq[0, x.shape[1] :].tolist()
    assert r["seed"] == 7


def test_positions_prompt_range_and_all(steerer: Steerer) -> None:
    x, t = ids(), 12
    edits = [Edit(3, "add", 1.0)]
    assert steerer.compare(x, edits, "prompt", continuation=4)["edited_positions"] == list(range(t))
    # "all" also edits the generated tokens fed back (the last one is never fed: nothing reads it)
    assert steerer.compare(x, edits, "all", continuation=4)["edited_positions"] == list(range(t + 3))
    assert steerer.compare(x, edits, (1, 3), continuation=4)["edited_positions"] == [1, 2]
    clean = residuals(steerer, x, [])[1]
    moved = (residuals(steerer, x, edits, (4, 6))[1] != clean).any(-1)[0]
    assert moved.nonzero().squeeze(1).tolist() == [4, 5]
    with pytest.raises(ValueError, match="start < end"):
        steerer.compare(x, edits, (5, 5))


def test_parse_edit() -> None:
    assert parse_edit("341=+4") == Edit(341, "add", 4.0)
    assert parse_edit("341=-2.5") == Edit(341, "add", -2.5)
    assert parse_edit("341=+0") == Edit(341, "add", 0.0)
    assert parse_edit("12=3") == Edit(12, "clamp", 3.0)
    assert parse_edit("12=0") == Edit(12, "clamp", 0.0)
    for bad in ("341", "x=1", "341=+", "341=", "=1", "1=nan", "1=+inf", "1=2=3", "-1=2"):
        with pytest.raises(ValueError) as err:
            parse_edit(bad)
        assert "\n" not in str(err.value) and "FEATURE=+ALPHA" in str(err.value)


def test_features_at_is_the_top_of_the_clean_encoding(steerer: Steerer) -> None:
    x = ids()
    _, h = residuals(steerer, x, [])
    acts = steerer.sae.encode(h[0])
    got = steerer.features_at(x, top=3)
    assert len(got) == x.shape[1]
    for row, a in zip(got, acts, strict=True):
        vals, idx = a.topk(3)
        assert row == [(int(i), float(v)) for v, i in zip(vals, idx, strict=True) if v > 0]


def test_off_target_against_scipy(steerer: Steerer) -> None:
    w = ids(t=10, n=5, seed=4)
    delta = 2.0 * float(max_acts()[3]) * steerer.sae.W_dec[3]
    r = steerer.off_target(w, [Edit(3, "add", 2.0)], batch=2)
    with torch.no_grad():
        lc = steerer.model(input_ids=w).logits.double().numpy()
        with manual_add(steerer.model, HOOK, delta):
            le = steerer.model(input_ids=w).logits.double().numpy()
    kl = entropy(sp_softmax(lc, -1), sp_softmax(le, -1), axis=-1).mean()
    assert abs(r["kl_mean"] - kl) < 1e-9

    def ppl(logits: np.ndarray) -> float:
        lp = sp_log_softmax(logits[:, :-1], -1)
        return float(np.exp(-np.take_along_axis(lp, w[:, 1:, None].numpy(), -1).mean()))

    assert r["delta_ppl"] == pytest.approx(ppl(le) - ppl(lc), rel=1e-9, abs=1e-9)
    none = steerer.off_target(w, [])
    assert none["kl_mean"] == 0.0 and none["delta_ppl"] == 0.0


def test_encoder_pooled_cosine() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    bert = BertModel(cfg).eval()
    s = Steerer(bert, sae(), "encoder.layer.0", max_acts(), causal=False)
    x = ids()
    assert abs(s.compare(x, [])["embedding_cosine"] - 1.0) < 1e-12
    delta = 4.0 * float(max_acts()[3]) * s.sae.W_dec[3]
    r = s.compare(x, [Edit(3, "add", 4.0)])
    with torch.no_grad():
        a = bert(input_ids=x).last_hidden_state.double().mean(1)[0]
        with manual_add(bert, "encoder.layer.0", delta):
            b = bert(input_ids=x).last_hidden_state.double().mean(1)[0]
    expected = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert expected < 1 - 1e-6 and abs(r["embedding_cosine"] - expected) < 1e-9
    assert abs(s.off_target(ids(n=3), [])["embedding_cosine"] - 1.0) < 1e-12


def test_the_model_is_left_as_it_was(steerer: Steerer) -> None:
    model = steerer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    x = ids()
    first = steerer.compare(x, [Edit(3, "add", 1.0)])
    second = steerer.compare(x, [Edit(3, "add", 2.0)])
    assert (
        not first["clean_cached"] and second["clean_cached"] and isinstance(second["seconds"], float)
    )  # a figure reported, not a speed test
    assert model.training  # the caller's mode is restored
    with pytest.raises(IndexError):  # a token id past the vocabulary fails inside the hooked forward
        steerer.compare(torch.tensor([[1, 2, 500]]), [Edit(3, "add", 1.0)])
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
