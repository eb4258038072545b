"""What an SAE fit will hold in memory, checked before anything is allocated: a typo such as
`expansion: 100000` is refused with the numbers instead of allocating gigabytes after ingest and trace."""

from __future__ import annotations

from schemas.config import SAEConfig

from microscope.errors import InputError

BYTES_PER_PARAM = 16  # fp32 weight, its gradient and Adam's two moments
GIB = float(1 << 30)


def d_sae(c: SAEConfig, d_in: int) -> int:
    return c.d_sae or c.expansion * d_in


def fit_bytes(c: SAEConfig, d_in: int, n_saes: int = 1) -> int:
    """Parameters (W_enc, W_dec, biases) with gradients and Adam state, plus one batch's activations
    (inputs, pre-activations, latents and their gradients), per SAE fitted side by side."""
    m = d_sae(c, d_in)
    params = 2 * d_in * m + m + d_in
    batch = c.batch_size * (2 * d_in + 3 * m) * 4
    return n_saes * (params * BYTES_PER_PARAM + batch)


def check_fit(c: SAEConfig, d_in: int, n_saes: int, free: int) -> None:
    """Refuse a fit that cannot work (k above the latents) or cannot fit in `free` bytes."""
    m = d_sae(c, d_in)
    shape = f"d_in {d_in} × d_sae {m}" + (f" (expansion {c.expansion})" if not c.d_sae else "")
    if c.k > m:
        raise InputError(
            f"sae.k={c.k} is more than the SAE's {m} latents ({shape}); lower sae.k or raise sae.expansion"
        )
    need = fit_bytes(c, d_in, n_saes)
    if need > free:
        raise InputError(
            f"the SAE fit needs about {need / GIB:.1f} GiB ({n_saes} SAE(s) of {shape}: weights, gradients, Adam, "
            f"a batch of {c.batch_size}) and {free / GIB:.1f} GiB is free; lower sae.expansion (or sae.d_sae) or "
            "sae.batch_size"
        )
