"""One rounding from float32 into a weight's dtype, on the weight's device.

fp16/bf16/fp32 round to nearest.  fp8 (e4m3fn, e5m2) has so few mantissa bits that
round-to-nearest erases small deltas, so it gets stochastic rounding with noise from
a generator on the tensor's own device, seeded from the weight's key: the same key
on the same device gives the same bits (CPU and CUDA generators differ, by design).
"""

from __future__ import annotations

import zlib

import torch

from ..errors import WeightRangeError
from .checks import RangeCheck, limit_of

# dtype -> (mantissa bits, smallest normal exponent, largest finite value)
FP8_FORMATS = {
    torch.float8_e4m3fn: (3, -6, 448.0),
    torch.float8_e5m2: (2, -14, 57344.0),
}


def seed_for(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


def _generator(device: torch.device, seed: int) -> torch.Generator | None:
    """A seeded generator on ``device``; None on ``meta``, where tensors hold no values to draw."""
    if device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(seed)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Round float32 ``x`` to an fp8 ``dtype``, up or down with probability by distance, on x's device."""
    mantissa, min_exp, max_val = FP8_FORMATS[dtype]
    x = x.to(torch.float32)
    mag = x.abs().clamp(max=max_val)
    exponent = torch.floor(torch.log2(mag.clamp(min=2.0 ** min_exp)))
    ulp = torch.exp2(exponent - mantissa)
    noise = torch.rand(x.shape, generator=_generator(x.device, seed), dtype=torch.float32, device=x.device)
    rounded = torch.floor(mag / ulp + noise) * ulp
    return (torch.sign(x) * rounded.clamp(max=max_val)).to(dtype)


def range_error(key: str | None, peak: float, dtype: torch.dtype) -> WeightRangeError:
    limit = limit_of(dtype)
    if peak != peak or peak == float("inf"):
        return WeightRangeError(f"{key or 'weight'}: patched values are not finite (inf or NaN); nothing was written")
    return WeightRangeError(
        f"{key or 'weight'}: patched values reach {peak:.4g}, beyond {dtype}'s ±{limit:g}; "
        "lower the strength or patch a wider dtype"
    )


def check_range(x: torch.Tensor, dtype: torch.dtype, key: str | None = None) -> None:
    """Refuse a float32 result that ``dtype`` cannot hold: inf/NaN, or beyond its finite range.

    One on-device reduction and one sync, for every dtype (a float32 sum that overflowed
    is refused too, never written as inf).
    """
    check = RangeCheck()
    check.add(x)
    verify(check, dtype, key)


def verify(check: RangeCheck, dtype: torch.dtype, key: str | None = None) -> None:
    """Raise ``WeightRangeError`` unless everything ``check`` saw fits ``dtype``."""
    if not check.within(limit_of(dtype)):
        raise range_error(key, check.peak(), dtype)


def to_dtype(x: torch.Tensor, dtype: torch.dtype, key: str | None = None) -> torch.Tensor:
    """float32 -> dtype; fp8 rounds stochastically when a key seeds it."""
    if dtype in FP8_FORMATS and key is not None:
        return stochastic_round(x, dtype, seed_for(key))
    return x.to(dtype)
