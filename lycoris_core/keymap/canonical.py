"""Every weight of a model once, in ComfyUI's key space: what merge sums on and extract reads.

For a recognised model (SD1/SD2/SDXL or a DiT at any depth) this lists each weight of the
ComfyUI key space - one tensor per module: fused where ComfyUI fuses (Flux `img_attn.qkv`,
SD3 `attn.qkv`), unfused where it does not (SD's CLIP q/k/v) - with its part, shape, block,
the kohya module name the tools write for it (`Native.kohya` for DiT weights,
`kohya_text_name` for DiT text encoders, `names.kohya_name` for SD), and where the same rows
are stored in another key space: a whole tensor, a row slice of a fused one (OpenCLIP's
in_proj), a transposed one (OpenCLIP's text_projection) or several tensors (a diffusers
folder's to_q/to_k/to_v, norm_out's swapped halves). Names and shapes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from .layout import ModelLayout
from .names import kohya_name
from .sd_layouts import ARCHITECTURES, spec_index
from .spaces import space_table

Shape = tuple[int, ...]

# weights of a text encoder that are tables, not layers: a LoRA does not target them
_EMBEDDINGS = ("embed_tokens", "shared", "token_embedding", "position_embedding", "relative_attention_bias",
               "lm_head")


@dataclass(frozen=True)
class Stored:
    """Rows [start, start + rows) of a canonical weight are rows [key_start, key_start + rows) of `key`."""

    key: str
    key_start: int
    start: int
    rows: int


@dataclass(frozen=True)
class CanonicalWeight:
    """One weight of the ComfyUI key space, as the tools see it.

    `skip` says why a LoRA/LoCon cannot carry it (a norm, an embedding table, a raw
    parameter such as Wan's `modulation`), or is None.
    """

    key: str
    part: str
    local: str  # the module's own name: SD canonical / DiT native / HF text name
    name: str  # the kohya module name written for it
    shape: Shape
    block: str | None
    skip: str | None = None


def comfy_layout(model: ModelLayout | str) -> ModelLayout:
    """The same model in ComfyUI's key space (a layout or an architecture name, full size)."""
    if isinstance(model, str):
        if model in ARCHITECTURES:
            from .spaces import PARTS

            return ModelLayout(model, "comfy", frozenset(PARTS))
        from .dit import FAMILIES, variant_config

        family, cfg = variant_config(model)
        return ModelLayout(model, "comfy", frozenset(("diffusion_model", *FAMILIES[family].text)), family, cfg)
    if model.family is None:
        return ModelLayout(model.arch, "comfy", model.parts)
    return ModelLayout(model.arch, "comfy", model.parts, model.family, model.config)


def comfy_shapes(model: ModelLayout | str) -> dict[str, Shape]:
    """The (key -> shape) state dict of the model in ComfyUI's key space, every part."""
    layout = comfy_layout(model)
    if layout.family is None:
        from .spaces import state_shapes

        return state_shapes(layout.arch, "comfy")
    from .dit import dit_state_shapes

    return dit_state_shapes(layout.family, layout.config, "comfy")


def canonical_weights(model: ModelLayout | str) -> dict[str, CanonicalWeight]:
    """ComfyUI weight key -> CanonicalWeight, in model order (every part of the architecture)."""
    layout = comfy_layout(model)
    if layout.family is None:
        return _sd_weights(layout.arch)
    return _dit_weights(layout.family, layout.config)


@cache
def _sd_weights(arch: str) -> dict[str, CanonicalWeight]:
    specs = spec_index(arch)
    out = {}
    for (part, canonical), slot in space_table(arch, "comfy").slots.items():
        skip = None
        if len(slot.shape) < 2:
            skip = "norm (LoRA covers matrices and convs)"
        elif canonical.rsplit(".", 1)[-1] in _EMBEDDINGS:
            skip = "embedding (not a LoRA target)"
        elif canonical == "text_projection":
            skip = "text projection (not a LoRA target in kohya naming)"
        out[slot.weight_key] = CanonicalWeight(slot.weight_key, part, canonical, kohya_name(arch, part, canonical),
                                               slot.shape, specs[(part, canonical)].block, skip)
    return out


@cache
def _dit_weights(family: str, cfg) -> dict[str, CanonicalWeight]:
    from .dit import FAMILIES, dit_table
    from .dit.names import kohya_text_name
    from .dit.text import text_table

    out = {}
    for native in dit_table(family, cfg).natives.values():
        key = f"diffusion_model.{native.key}"
        skip = None
        if native.leaf == "":
            skip = "raw parameter (not a LoRA target)"
        elif len(native.weight) < 2:
            skip = "norm (LoRA covers matrices and convs)"
        out[key] = CanonicalWeight(key, "diffusion_model", native.name, native.kohya, native.weight, native.block, skip)
    for part, tcfg in FAMILIES[family].text.items():
        for module in text_table(tcfg):
            key = f"{part}.transformer.{module.name}.weight"
            skip = None
            if len(module.weight) < 2:
                skip = "norm (LoRA covers matrices and convs)"
            elif module.name.rsplit(".", 1)[-1] in _EMBEDDINGS:
                skip = "embedding (not a LoRA target)"
            out[key] = CanonicalWeight(key, part, module.name, kohya_text_name(family, part, module.name),
                                       module.weight, part, skip)
    return out


def stored_in(model: ModelLayout, weight: CanonicalWeight) -> tuple[tuple[Stored, ...], bool] | None:
    """Where `weight`'s rows are in `model`'s own key space: (pieces, transposed), or None when absent."""
    if model.family is None:
        slot = space_table(model.arch, model.space).slots.get((weight.part, weight.local))
        if slot is None:
            return None
        start = slot.rows[0] if slot.rows is not None else 0
        return (Stored(slot.weight_key, start, 0, slot.shape[0]),), slot.transposed
    from .dit.spaces import placement

    place = placement(model.family, model.config, model.space)
    if weight.part == "diffusion_model":
        pieces = place.pieces.get(weight.local)
        if not pieces:
            return None
        return tuple(Stored(p.weight_key, p.key_start, p.native_start, p.rows) for p in pieces), False
    keys = place.text.get((weight.part, weight.local))
    if keys is None:
        return None
    return (Stored(keys[0], 0, 0, weight.shape[0]),), False
