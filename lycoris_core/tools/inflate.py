"""2-D → 3-D adapters by the centre-slice embedding (seed 002, "Final words").

A k×k kernel K becomes a D×k×k kernel that is K at the centre depth slice and zero
elsewhere.  With padding D//2 and stride 1 along the new axis, the 3-D conv on a volume
computes the 2-D conv of each depth slice on its own, so an inflated network starts out
*exactly* as the 2-D one and fine-tuning can then learn the depth mixing.

For an adapter the embedding is applied to the factor that carries the kernel, which
makes the 3-D delta the centre embedding of the 2-D delta:

- LoRA/LoCon: ``lora_down`` (r, in, k, k); Tucker: ``lora_mid`` (r, r, k, k).
- LoHa: both ``hada_w*_b`` (r, in·k·k, viewed (r, in, k, k)); Tucker: ``hada_t1``, ``hada_t2``.
  Both halves vanish off the centre slice, so their Hadamard product does.
- LoKr: ``lokr_w2`` (b, d, k, k), or ``lokr_w2_b`` (r, d·k·k), or ``lokr_t2`` (r, r, k, k);
  kron(w1, ·) only mixes channels, so the embedding passes through it.
- full: ``diff``.
- every other conv-shaped tensor (1×1 factors, ``dora_scale``, (IA)³ vectors, 1×1 convs)
  gains a trailing size-1 axis; linear modules and 1-D tensors are copied as they are.

DoRA stays exact: the norm of a centre-embedded weight equals the 2-D norm, provided the
base model is inflated the same way (``embed_kernel`` on each conv weight).

LoHa and (low-rank) LoKr store conv factors flattened to (r, in·k·k): the file alone cannot
tell such a conv from a linear layer.  Their layer shapes come from ``shapes`` (module name →
weight shape), a ``base`` checkpoint, or, for SD1.x/SD2.x/SDXL names, the architecture
tables; a module none of these places is refused by name, never guessed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter import load_adapter
from ..errors import LycorisError
from ..io.reader import read_safetensors_header
from ..io.writer import save_tensors
from ..keymap import detect_adapter, map_adapter, state_shapes
from .common import check_write

SUPPORTED = ("lora", "locon", "loha", "lokr", "full", "ia3")


class InflateError(LycorisError, ValueError):
    """The adapter has a conv module this inflation does not cover, or nothing to inflate."""


def embed_kernel(kernel: torch.Tensor, depth: int) -> torch.Tensor:
    """(…, kh, kw) → (…, depth, kh, kw): the kernel at the centre depth slice, zeros elsewhere."""
    if depth < 1 or depth % 2 == 0:
        raise InflateError(f"depth must be odd and positive, got {depth}")
    out = kernel.new_zeros(*kernel.shape[:-2], depth, *kernel.shape[-2:])
    out[..., depth // 2, :, :] = kernel
    return out


def _embed_flat(t: torch.Tensor, channels: int, kernel: tuple[int, int], depth: int) -> torch.Tensor:
    """(r, channels·kh·kw) flattened conv factor → (r, channels·depth·kh·kw)."""
    return embed_kernel(t.reshape(t.shape[0], channels, *kernel), depth).flatten(1)


def _pointwise(t: torch.Tensor) -> torch.Tensor:
    """A 2-D-conv-shaped tensor with 1×1 spatial dims → the 3-D shape (one more trailing 1)."""
    return t.unsqueeze(-1) if t.dim() == 4 else t


@dataclass
class InflateReport:
    source: str
    output: str | None
    depth: int
    inflated: list[str] = field(default_factory=list)  # k×k conv modules
    pointwise: list[str] = field(default_factory=list)  # 1×1 conv modules
    unchanged: list[str] = field(default_factory=list)  # linear modules
    copied_unknown: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        lines = [f"{self.source} -> {self.output or '(dry run)'}: depth {self.depth}",
                 f"  k×k convs inflated: {len(self.inflated)}; 1×1 convs: {len(self.pointwise)}; "
                 f"linear modules unchanged: {len(self.unchanged)}"]
        if self.copied_unknown:
            lines.append(f"  {len(self.copied_unknown)} keys not understood, copied as they are "
                         f"(e.g. {self.copied_unknown[0]})")
        return "\n".join(lines)


def _flattened(module) -> bool:
    """The file stores this module's conv factors (if it is a conv) as 2-D: its kind is not in the file."""
    if module.algo == "loha":
        return not module.tucker
    if module.algo == "lokr":
        return "lokr_w2_b" in module.keys and not module.tucker
    return False


def layer_shapes(adapter, base: str | os.PathLike | None = None) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of its layer, from a base checkpoint or the SD architecture tables."""
    if base is not None:
        entries, _meta, _start = read_safetensors_header(base)
        shapes = {k: tuple(v["shape"]) for k, v in entries.items()}
    else:
        arch = detect_adapter(adapter.modules)
        if arch == "unknown":
            return {}
        shapes = state_shapes(arch, "comfy")
    report = map_adapter(adapter.modules, shapes, allow_partial=True)
    return {name: tuple(target.shape) for name, target in report.targets.items()}


def inflate_module(module, depth: int | None = None,
                   layer_shape: tuple[int, ...] | None = None) -> tuple[dict[str, torch.Tensor], str, int]:
    """(file key -> tensor, kind, depth) for one loaded module; kind is "inflated", "pointwise" or "unchanged".

    ``layer_shape`` is the 2-D layer's weight shape, needed only for flattened LoHa/LoKr factors.
    """
    shape = tuple(module.shape)
    tensors = {role: module.source[key] for role, key in module.keys.items()}
    keys = dict(module.keys)
    if _flattened(module) and len(shape) == 2:
        conv_shaped = "dora_scale" in tensors and tensors["dora_scale"].dim() == 4
        if layer_shape is None:
            if conv_shaped:
                raise InflateError(f"{module.name}: {module.algo} stores conv factors flattened; the layer's kernel "
                                   f"is not in the file: pass the base checkpoint (--base)")
            if not _could_be_conv(shape):
                return _by_key(keys, tensors), "unchanged", 1
            raise InflateError(f"{module.name}: {module.algo} module of shape {shape} may be a flattened conv; "
                               f"pass the base checkpoint (--base) so its layer shape is known")
        if len(layer_shape) == 4 and module.fits(layer_shape):
            shape = tuple(layer_shape)
    if len(shape) != 4:
        return _by_key(keys, tensors), "unchanged", 1
    if module.algo not in SUPPORTED:
        raise InflateError(f"{module.name}: inflating a {module.algo} conv module is not supported "
                         f"(supported: {', '.join(SUPPORTED)})")
    kernel = shape[2:]
    if kernel == (1, 1):
        return _by_key(keys, {r: _pointwise(t) for r, t in tensors.items()}), "pointwise", 1
    if depth is None:  # a given depth was checked once by inflate_adapter
        depth = kernel[0]
        if depth % 2 == 0:
            raise InflateError(f"{module.name}: kernel {kernel} gives an even depth; pass an odd --depth")
    out = {}
    for role, t in tensors.items():
        if t.dim() == 4 and tuple(t.shape[-2:]) == kernel:  # the factor that carries the kernel
            out[role] = embed_kernel(t, depth)
        elif role in ("hada_w1_b", "hada_w2_b") and t.dim() == 2 and not module.tucker:
            out[role] = _embed_flat(t, shape[1], kernel, depth)
        elif role in ("lokr_w2_b", "lokr_w2") and t.dim() == 2 and not module.tucker:
            c = (tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_b"]).shape[1]
            out[role] = _embed_flat(t, shape[1] // c, kernel, depth)
        else:
            out[role] = _pointwise(t)
    return _by_key(keys, out), "inflated", depth


def _could_be_conv(shape: tuple[int, ...]) -> bool:
    """(out, cols) that could be a flattened (out, in·k·k) conv: only the model can rule it out."""
    return any(shape[1] % (k * k) == 0 for k in range(2, 8))


def _by_key(keys: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {keys[role]: t for role, t in tensors.items()}


def inflate_adapter(source: str | os.PathLike, output: str | os.PathLike | None, *, depth: int | None = None,
                    base: str | os.PathLike | None = None, shapes: dict[str, tuple[int, ...]] | None = None,
                    overwrite: bool = False, dry_run: bool = False) -> InflateReport:
    """Write the 3-D counterpart of a 2-D conv adapter (same module names, same alpha).

    ``shapes`` (module name -> 2-D layer weight shape) or ``base`` (a 2-D checkpoint) tell the
    kernels of flattened LoHa/LoKr convs; without them SD names are looked up in the tables.
    """
    check_write(output, dry_run, overwrite, [str(source)] + ([str(base)] if base is not None else []))
    if depth is not None and (depth < 1 or depth % 2 == 0):
        raise InflateError(f"depth must be a positive odd number (the 2-D kernel sits at its centre), got {depth}")
    adapter = load_adapter(source)
    report = InflateReport(str(source), None if dry_run else str(output), depth or 0)
    known = dict(shapes) if shapes is not None else None
    if known is None and any(_flattened(m) for m in adapter.modules.values()):
        known = layer_shapes(adapter, base)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in adapter.modules.items():
        out, kind, used = inflate_module(module, depth, (known or {}).get(name))
        tensors.update(out)
        getattr(report, kind).append(name)
        if kind == "inflated":
            report.depth = max(report.depth, used)
    for key in adapter.unknown_keys:
        tensors[key] = adapter.source[key]
        report.copied_unknown.append(key)
    if not report.inflated and not report.pointwise:
        raise InflateError(f"{source}: no conv module to inflate")
    if dry_run:
        return report
    meta = dict(adapter.metadata)
    meta["lycoris_inflated"] = json.dumps({"from": "2d", "to": "3d", "depth": report.depth,
                                           "modules": len(report.inflated)})
    save_tensors(tensors, Path(output), meta, overwrite=overwrite)
    return report
