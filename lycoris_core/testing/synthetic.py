"""Synthetic adapters with real module names and shapes, for the demo, benchmarks and tests.

Values are seeded random numbers scaled so deltas stay small; names follow what
kohya/LyCORIS write (diffusers names for SD1/SD2 UNets, SGM names for SDXL).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..io.stream import StreamWriter
from ..keymap import kohya_name, modules, state_shapes
from ..keymap.sd_layouts import ModuleSpec


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split dim = m*n with m <= n: a given factor, or the most balanced pair."""
    if factor > 0 and dim % factor == 0:
        return tuple(sorted((factor, dim // factor)))
    m = int(dim ** 0.5)
    while dim % m:
        m -= 1
    return m, dim // m


def _r(gen, *shape, scale=0.05):
    return torch.randn(*shape, generator=gen) * scale


def module_tensors(algo: str, shape: tuple[int, ...], gen: torch.Generator, rank: int = 8,
                   alpha: float | None = None, factor: int = -1, full_w2: bool = False) -> dict[str, torch.Tensor]:
    """One module's tensors (suffix -> tensor) for a weight of ``shape``."""
    out, inp, *kernel = shape if len(shape) > 1 else (shape[0], 1)
    k = 1
    for d in kernel:
        k *= d
    ones = [1] * len(kernel)
    alpha = float(rank if alpha is None else alpha)
    if algo in ("lora", "dora"):
        t = {"lora_down.weight": _r(gen, rank, inp, *kernel), "lora_up.weight": _r(gen, out, rank, *ones),
             "alpha": torch.tensor(alpha)}
        if algo == "dora":
            t["dora_scale"] = 1 + _r(gen, out, 1, *ones, scale=0.1)
        return t
    if algo == "locon_tucker":
        if k == 1:
            return module_tensors("lora", shape, gen, rank, alpha)
        return {"lora_down.weight": _r(gen, rank, inp, *ones), "lora_mid.weight": _r(gen, rank, rank, *kernel),
                "lora_up.weight": _r(gen, out, rank, *ones), "alpha": torch.tensor(alpha)}
    if algo in ("loha", "loha_tucker"):
        if algo == "loha_tucker" and k > 1:
            return {"hada_w1_a": _r(gen, rank, out, scale=0.2), "hada_w1_b": _r(gen, rank, inp, scale=0.2),
                    "hada_t1": _r(gen, rank, rank, *kernel, scale=0.2), "hada_w2_a": _r(gen, rank, out, scale=0.2),
                    "hada_w2_b": _r(gen, rank, inp, scale=0.2), "hada_t2": _r(gen, rank, rank, *kernel, scale=0.2),
                    "alpha": torch.tensor(alpha)}
        return {"hada_w1_a": _r(gen, out, rank, scale=0.2), "hada_w1_b": _r(gen, rank, inp * k, scale=0.2),
                "hada_w2_a": _r(gen, out, rank, scale=0.2), "hada_w2_b": _r(gen, rank, inp * k, scale=0.2),
                "alpha": torch.tensor(alpha)}
    if algo == "lokr":
        (a, b), (c, d) = factorization(out, factor), factorization(inp, factor)
        t = {"lokr_w1": _r(gen, a, c, scale=0.2), "alpha": torch.tensor(alpha)}
        if full_w2 or rank >= max(b, d) / 2:
            t["lokr_w2"] = _r(gen, b, d, *kernel, scale=0.05)
        else:
            t["lokr_w2_a"] = _r(gen, b, rank, scale=0.2)
            t["lokr_w2_b"] = _r(gen, rank, d * k, scale=0.2)
        return t
    if algo == "full":
        return {"diff": _r(gen, *shape, scale=0.01)}
    if algo == "ia3":
        return {"weight": _r(gen, out, scale=0.1), "on_input": torch.tensor(0)}
    if algo == "glora":
        return {"a1.weight": _r(gen, inp, rank, *ones), "a2.weight": _r(gen, rank, inp, *ones),
                "b1.weight": _r(gen, out, rank, *ones), "b2.weight": _r(gen, rank, inp, *kernel),
                "alpha": torch.tensor(alpha)}
    if algo == "diag-oft":
        block = factorization(out, rank)[0]
        return {"oft_blocks": _r(gen, out // block, block, block, scale=0.1), "alpha": torch.tensor(0.0)}
    if algo == "boft":
        block = 2
        while block * 2 <= rank and out % (block * 4) == 0:
            block *= 2
        n = out // block
        if n & (n - 1):
            return module_tensors("diag-oft", shape, gen, rank)
        stages = bin(n - 1).count("1") + 1
        return {"oft_blocks": _r(gen, stages, n, block, block, scale=0.1), "alpha": torch.tensor(0.0)}
    if algo == "norm":
        return {"w_norm": _r(gen, out, scale=0.1), "b_norm": _r(gen, out, scale=0.1)}
    raise ValueError(f"unknown synthetic algo {algo!r}")


def default_targets(spec: ModuleSpec) -> bool:
    """What LyCORIS's full preset adapts: UNet linears and convs, text-encoder attention and MLP."""
    if len(spec.weight) < 2 or "norm" in spec.name or "embeddings" in spec.name:
        return False
    if spec.part != "unet":
        return "self_attn" in spec.name or "mlp" in spec.name
    return "add_embedding" not in spec.name


def attention_only(spec: ModuleSpec) -> bool:
    return spec.part == "unet" and (".attn1." in spec.name or ".attn2." in spec.name)


def synthetic_adapter(arch: str, algo: str, *, select: Callable[[ModuleSpec], bool] = default_targets,
                      rank: int = 8, conv_rank: int | None = None, dtype=torch.float16, seed: int = 0,
                      **options) -> dict[str, torch.Tensor]:
    """A whole adapter state dict in kohya naming for ``arch`` ("sd1", "sd2", "sdxl")."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for spec in modules(arch):
        if algo == "norm":
            if not (len(spec.weight) == 1 and "norm" in spec.name and spec.part == "unet"):
                continue
        elif not select(spec):
            continue
        is_conv = len(spec.weight) == 4 and spec.weight[2] * spec.weight[3] > 1
        r = conv_rank if (is_conv and conv_rank) else rank
        name = kohya_name(arch, spec.part, spec.name)
        for suffix, value in module_tensors(algo, spec.weight, gen, r, **options).items():
            tensors[f"{name}.{suffix}"] = value if value.dtype == torch.int64 else value.to(dtype)
    return tensors


def write_checkpoint(path, arch: str = "sd1", parts=("unet", "te1"), seed: int = 0,
                     metadata: dict[str, str] | None = None) -> str:
    """A single-file checkpoint with the real keys and shapes of ``parts`` and seeded random fp16
    values, written tensor by tensor (a full SD1.5 never sits in memory)."""
    shapes = state_shapes(arch, "checkpoint", parts)
    writer = StreamWriter(path, [(k, "F16", s) for k, s in shapes.items()], metadata or {})
    gen = torch.Generator().manual_seed(seed)
    for key, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.float16)
        if t.numel():
            t.uniform_(-0.05, 0.05, generator=gen)
        writer.write(key, t)
    writer.close()
    return str(path)
