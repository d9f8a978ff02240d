"""Stand-in for comfy/float.py: rounding a float32 result back to the storage dtype.

fp32/fp16/bf16 are plain casts (round to nearest even).  fp8 is stochastic: the value is
first taken to fp16, split into sign / exponent field / scaled mantissa, uniform noise
from a generator seeded with ``seed`` is added to the mantissa before flooring, and the
result is clamped to the format's range.  Rows are processed in slices along dim 0, all
drawing from the one generator, as ComfyUI does.
"""

from __future__ import annotations

import torch

_FP8 = {torch.float8_e4m3fn: (4, 3, 7), torch.float8_e5m2: (5, 2, 15)}  # exponent bits, mantissa bits, bias


def _round_fp8(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    ebits, mbits, bias = _FP8[dtype]
    h = x.half()
    magnitude = h.abs()
    sign = torch.where(magnitude == 0, torch.zeros_like(h), torch.sign(h))
    field = torch.clamp(torch.floor(torch.log2(magnitude)) + bias, 0, 2 ** ebits - 1)
    normal = field != 0
    scaled = torch.where(
        normal,
        (magnitude / (2.0 ** (field - bias)) - 1.0) * (2 ** mbits),
        magnitude / (2.0 ** (1 - bias - mbits)),
    )
    scaled = scaled + torch.rand(scaled.size(), dtype=scaled.dtype, generator=generator)
    fraction = scaled.floor() / (2 ** mbits)
    value = sign * torch.where(normal, (2.0 ** (field - bias)) * (1.0 + fraction), (2.0 ** (1 - bias)) * fraction)
    info = torch.finfo(dtype)
    return value.clamp(min=info.min, max=info.max)


def stochastic_rounding(value: torch.Tensor, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return value.to(dtype=dtype)
    if dtype in _FP8:
        generator = torch.Generator(device=value.device)
        generator.manual_seed(seed)
        out = torch.empty_like(value, dtype=dtype)
        slices = max(1, value.numel() / (4096 * 4096))
        step = max(1, round(value.shape[0] / slices))
        for start in range(0, value.shape[0], step):
            out[start:start + step].copy_(_round_fp8(value[start:start + step], dtype, generator))
        return out
    return value.to(dtype=dtype)
