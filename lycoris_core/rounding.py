"""One rounding from float32 into a weight's dtype.

fp16/bf16/fp32 round to nearest.  fp8 (e4m3fn, e5m2) has so few mantissa bits
that round-to-nearest erases small deltas, so it gets stochastic rounding with a
generator seeded from the weight's key: the same key gives the same bits.
"""

from __future__ import annotations

import zlib

import torch

from .errors import WeightRangeError

# dtype -> (mantissa bits, smallest normal exponent, largest finite value)
FP8_FORMATS = {
    torch.float8_e4m3fn: (3, -6, 448.0),
    torch.float8_e5m2: (2, -14, 57344.0),
}


def seed_for(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Round float32 ``x`` to an fp8 ``dtype``, up or down with probability by distance."""
    mantissa, min_exp, max_val = FP8_FORMATS[dtype]
    x = x.to(torch.float32)
    mag = x.abs().clamp(max=max_val)
    exponent = torch.floor(torch.log2(mag.clamp(min=2.0 ** min_exp)))
    ulp = torch.exp2(exponent - mantissa)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    rounded = torch.floor(mag / ulp + noise) * ulp
    return (torch.sign(x) * rounded.clamp(max=max_val)).to(dtype)


NARROW = (torch.float16, *FP8_FORMATS)  # dtypes whose range a float32 result can exceed


def check_range(x: torch.Tensor, dtype: torch.dtype, key: str | None = None) -> None:
    """Refuse a float32 result that ``dtype`` would turn into inf or NaN (one reduction, no copy)."""
    if dtype not in NARROW or not x.numel():
        return
    lo, hi = torch.aminmax(x)
    limit = torch.finfo(dtype).max
    if not (-limit <= float(lo) and float(hi) <= limit):
        raise WeightRangeError(
            f"{key or 'weight'}: patched values reach {max(abs(float(lo)), abs(float(hi))):.4g}, beyond {dtype}'s "
            f"±{limit:g}; lower the strength or patch a wider dtype"
        )


def to_dtype(x: torch.Tensor, dtype: torch.dtype, key: str | None = None) -> torch.Tensor:
    """float32 -> dtype; fp8 rounds stochastically when a key seeds it."""
    if dtype in FP8_FORMATS and key is not None:
        return stochastic_round(x, dtype, seed_for(key))
    return x.to(dtype)
