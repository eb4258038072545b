"""Issue 21 #6: an SAE fit's memory is estimated before anything is allocated, and refused with the numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from microscope.errors import InputError
from microscope.sae.architectures import build
from microscope.sae.budget import BYTES_PER_PARAM, check_fit, fit_bytes
from schemas.config import SAEConfig


def test_the_estimate_counts_the_parameters_the_sae_really_has() -> None:
    """Closed form against the module: 2·d_in·d_sae + d_sae + d_in parameters, 16 bytes each with Adam."""
    c = SAEConfig(hooks=["blocks.0.hook_resid_post"], expansion=4, k=8, batch_size=256)
    sae = build(c.architecture, 32, 128, k=8)
    n = sum(p.numel() for p in sae.parameters())
    batch = 256 * (2 * 32 + 3 * 128) * 4
    assert fit_bytes(c, 32) == n * BYTES_PER_PARAM + batch
    assert fit_bytes(c, 32, n_saes=3) == 3 * fit_bytes(c, 32)


def test_a_fit_too_big_or_impossible_is_refused_with_the_numbers() -> None:
    huge = SAEConfig(hooks=["blocks.0.hook_resid_post"], expansion=100000, k=32)
    with pytest.raises(InputError) as err:
        check_fit(huge, 384, 1, free=8 << 30)
    need = fit_bytes(huge, 384) / (1 << 30)  # 2198 GiB: 38.4 M latents, a batch of 4096 dominates
    assert f"needs about {need:.1f} GiB (1 SAE(s) of d_in 384 × d_sae 38400000 (expansion 100000)" in str(err.value)
    assert "and 8.0 GiB is free; lower sae.expansion" in str(err.value)
    with pytest.raises(InputError, match=r"sae.k=64 is more than the SAE's 32 latents"):
        check_fit(SAEConfig(hooks=["blocks.0.hook_resid_post"], d_sae=32, k=64), 16, 1, free=8 << 30)
    check_fit(
        SAEConfig(hooks=["blocks.0.hook_resid_post"], expansion=8, k=32), 384, 1, free=8 << 30
    )  # the demo's MiniLM SAE fits


def test_the_stage_refuses_before_allocating(tmp_path: Path, tiny_gpt2_dir: Path, corpus_file: Path) -> None:
    from microscope.models import loading
    from microscope.stages import ingest, sae, trace
    from microscope.stages.inputs import StageInputs
    from microscope.store import open_store
    from schemas.config import AuditConfig
    from tests.microscope.sae.test_checkpoint_cleanup import HOOK

    cfg = AuditConfig.model_validate(
        {
            "model": {"source": str(tiny_gpt2_dir)},
            "dataset": {"path": str(corpus_file), "seq_len": 32, "max_tokens": 2048},
            "trace": {"layers": [1], "hooks": ["resid"], "batch_size": 16},
            "sae": {"hooks": [HOOK], "expansion": 10**9, "k": 4, "batch_size": 128},
        }
    )
    store = open_store(str(tmp_path / "store"))
    ref = loading.resolve(cfg.model)
    ing = ingest.run(ref, cfg, store)
    inp = StageInputs(ref, ing, loading.describe(loading.load_model(ref)), cfg, store)
    tr = trace.run(inp)
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    with pytest.raises(InputError, match=r"the SAE fit needs about .* GiB .* lower sae.expansion"):
        sae.run(inp, tr, HOOK, progress=False)
    assert (torch.cuda.memory_allocated() if torch.cuda.is_available() else 0) == before
