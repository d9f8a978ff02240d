"""Where a DiT's tensors live in each key space.

Spaces: "comfy" (ComfyUI's model and CLIP objects: `diffusion_model.<native>`,
`<part>.transformer.<hf>`), "bare" (a diffusion-model-only file as UNETLoader and GGUF
read it: `<native>`), "checkpoint" (a single-file checkpoint: `model.diffusion_model.<native>`,
`text_encoders.<part>.transformer.<hf>`) and "diffusers" (a diffusers transformer folder:
`transformer.<diffusers name>`; text encoders are not tabulated there). A native module
sits on one key in the first three; in diffusers it may be several keys (fused q/k/v) or
swapped halves of one (`norm_out.linear`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from .families import FAMILIES, table
from .tables import DIFFUSION, Shape
from .text import text_table

SPACES = ("comfy", "bare", "checkpoint", "diffusers")
_NATIVE_PREFIX = {"comfy": "diffusion_model.", "bare": "", "checkpoint": "model.diffusion_model."}
DIFFUSERS_PREFIX = "transformer."
TEXT_PREFIX = {"comfy": "", "checkpoint": "text_encoders."}  # + "<part>.transformer."


@dataclass(frozen=True)
class Piece:
    """Rows [key_start, key_start + rows) of `weight_key` hold native rows [native_start, ...)."""

    weight_key: str
    bias_key: str | None
    key_start: int
    native_start: int
    rows: int


@dataclass(frozen=True)
class Placement:
    family: str
    space: str
    pieces: dict[str, tuple[Piece, ...]]  # native module -> where its rows are stored
    text: dict[tuple[str, str], tuple[str, str | None]]  # (part, hf name) -> (weight key, bias key)
    keys: dict[str, dict[str, Shape]]  # part -> {stored key: shape}


def text_prefix(part: str, space: str) -> str | None:
    head = TEXT_PREFIX.get(space)
    return None if head is None else f"{head}{part}.transformer."


@cache
def placement(family: str, cfg, space: str) -> Placement:
    t = table(family, cfg)
    pieces: dict[str, tuple[Piece, ...]] = {}
    keys: dict[str, dict[str, Shape]] = {DIFFUSION: {}}
    stored = keys[DIFFUSION]
    if space in _NATIVE_PREFIX:
        p = _NATIVE_PREFIX[space]
        for name, n in t.natives.items():
            bias = p + n.bias_key if n.bias_key else None
            pieces[name] = (Piece(p + n.key, bias, 0, 0, n.rows),)
            stored[p + n.key] = n.weight
            if bias:
                stored[bias] = n.bias
    else:
        p = DIFFUSERS_PREFIX
        for name, (leaf, segments) in t.diffusers.items():
            first = t.natives[segments[0][0]]
            rows = sum(s[3] for s in segments)
            weight_key = p + (f"{name}.{leaf}" if leaf else name)
            bias_key = f"{p}{name}.bias" if first.bias else None
            stored[weight_key] = (rows, *first.weight[1:])
            if bias_key:
                stored[bias_key] = (rows,)
        leaf = {n: lf for n, (lf, _s) in t.diffusers.items()}
        for native, found in t.diffusers_pieces().items():
            out = []
            for name, d_start, n_start, rows in found:
                weight_key = p + (f"{name}.{leaf[name]}" if leaf[name] else name)
                bias_key = f"{p}{name}.bias" if t.natives[native].bias else None
                out.append(Piece(weight_key, bias_key, d_start, n_start, rows))
            pieces[native] = tuple(sorted(out, key=lambda x: x.native_start))
    text: dict[tuple[str, str], tuple[str, str | None]] = {}
    for part, tcfg in FAMILIES[family].text.items():
        prefix = text_prefix(part, space)
        if prefix is None:
            continue
        part_keys = keys.setdefault(part, {})
        for module in text_table(tcfg):
            weight_key = f"{prefix}{module.name}.weight"
            bias_key = f"{prefix}{module.name}.bias" if module.bias else None
            text[(part, module.name)] = (weight_key, bias_key)
            part_keys[weight_key] = module.weight
            if bias_key:
                part_keys[bias_key] = module.bias
    return Placement(family, space, pieces, text, keys)


def dit_state_shapes(family: str, cfg, space: str, parts: tuple[str, ...] | None = None) -> dict[str, Shape]:
    """The (key -> shape) state dict of the chosen parts (default: all) in that space."""
    keys = placement(family, cfg, space).keys
    out: dict[str, Shape] = {}
    for part in parts or tuple(keys):
        out.update(keys.get(part, {}))
    return out
