"""Where each module's weight lives in the three model key spaces.

Owns the per-space tables: for an architecture and a space ("comfy", "checkpoint",
"diffusers"), every module's weight key, bias key, row slice of a fused q/k/v weight, and the
shape of every stored tensor. Generated once from `sd_layouts`; never touches real tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from .sd_layouts import ARCHITECTURES, ModuleSpec, Shape, modules

SPACES = ("comfy", "checkpoint", "diffusers")
PARTS = ("unet", "te1", "te2")


@dataclass(frozen=True)
class Slot:
    """A module's place in one key space.

    `rows` is (start, length) on dim 0 of a fused weight (and of its bias). `shape` is the
    weight shape the module sees, in Linear orientation: for `transposed` slots (OpenCLIP's
    `text_projection`, stored as x @ P) the stored tensor is the transpose of `shape`.
    """

    weight_key: str
    bias_key: str | None
    rows: tuple[int, int] | None
    shape: Shape
    transposed: bool = False


@dataclass(frozen=True)
class TextLayout:
    """How one text encoder is stored in a space."""

    prefix: str
    openclip: bool
    layers: int
    projection: bool


@dataclass(frozen=True)
class SpaceTable:
    arch: str
    space: str
    slots: dict[tuple[str, str], Slot]  # (part, canonical module name) -> Slot
    keys: dict[str, dict[str, Shape]]  # part -> {stored key: stored shape}


_UNET_PREFIX = {
    "comfy": "diffusion_model.",
    "checkpoint": "model.diffusion_model.",
    "diffusers": "unet.",
}

# (arch, part, space) -> (prefix, openclip layout?, projection stored?); layers default to all
_TEXT = {
    ("sd1", "te1", "comfy"): ("clip_l.transformer.", False, True),
    ("sd1", "te1", "checkpoint"): ("cond_stage_model.transformer.", False, False),
    ("sd1", "te1", "diffusers"): ("text_encoder.", False, False),
    ("sd2", "te1", "comfy"): ("clip_h.transformer.", False, True),
    ("sd2", "te1", "checkpoint"): ("cond_stage_model.model.", True, True),
    ("sd2", "te1", "diffusers"): ("text_encoder.", False, False),
    ("sdxl", "te1", "comfy"): ("clip_l.transformer.", False, True),
    ("sdxl", "te1", "checkpoint"): ("conditioner.embedders.0.transformer.", False, False),
    ("sdxl", "te1", "diffusers"): ("text_encoder.", False, False),
    ("sdxl", "te2", "comfy"): ("clip_g.transformer.", False, True),
    ("sdxl", "te2", "checkpoint"): ("conditioner.embedders.1.model.", True, True),
    ("sdxl", "te2", "diffusers"): ("text_encoder_2.", False, True),
}

# HF CLIP layer child -> OpenCLIP resblock child (q/k/v are fused, handled apart)
_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPENCLIP_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
_OPENCLIP_TOP = {  # HF name -> (OpenCLIP key, has ".weight"/".bias" children?)
    "text_model.embeddings.token_embedding": ("token_embedding", True),
    "text_model.embeddings.position_embedding": ("positional_embedding", False),
    "text_model.final_layer_norm": ("ln_final", True),
    "text_projection": ("text_projection", False),
}


def text_layout(arch: str, part: str, space: str) -> TextLayout | None:
    entry = _TEXT.get((arch, part, space))
    if entry is None:
        return None
    prefix, openclip, projection = entry
    a = ARCHITECTURES[arch]
    cfg = a.te1 if part == "te1" else a.te2
    layers = a.diffusers_te1_layers if (space, part) == ("diffusers", "te1") else cfg.layers
    return TextLayout(prefix, openclip, layers, projection)


def _layer_index(name: str) -> int | None:
    if not name.startswith("text_model.encoder.layers."):
        return None
    return int(name.split(".")[3])


def _hf_slot(spec: ModuleSpec, prefix: str) -> Slot:
    bias = f"{prefix}{spec.name}.bias" if spec.bias else None
    return Slot(f"{prefix}{spec.name}.weight", bias, None, spec.weight)


def _openclip_slot(spec: ModuleSpec, prefix: str) -> Slot:
    if spec.name in _OPENCLIP_TOP:
        key, has_children = _OPENCLIP_TOP[spec.name]
        if not has_children:
            transposed = spec.name == "text_projection"
            return Slot(f"{prefix}{key}", None, None, spec.weight, transposed)
        bias = f"{prefix}{key}.bias" if spec.bias else None
        return Slot(f"{prefix}{key}.weight", bias, None, spec.weight)
    parts = spec.name.split(".")
    block = f"{prefix}transformer.resblocks.{parts[3]}."
    child = ".".join(parts[4:])
    if child in _OPENCLIP_QKV:
        c = spec.weight[0]
        rows = (_OPENCLIP_QKV[child] * c, c)
        return Slot(f"{block}attn.in_proj_weight", f"{block}attn.in_proj_bias", rows, spec.weight)
    key = f"{block}{_OPENCLIP_LAYER[child]}"
    bias = f"{key}.bias" if spec.bias else None
    return Slot(f"{key}.weight", bias, None, spec.weight)


def _stored(slot: Slot, spec: ModuleSpec) -> dict[str, Shape]:
    """Stored tensors behind a slot, with their full (unsliced, untransposed) shapes."""
    if slot.rows is not None:
        fused = 3 * slot.rows[1]
        return {slot.weight_key: (fused, *spec.weight[1:]), slot.bias_key: (fused,)}
    out = {slot.weight_key: spec.weight[::-1] if slot.transposed else spec.weight}
    if slot.bias_key:
        out[slot.bias_key] = spec.bias
    return out


@cache
def space_table(arch: str, space: str) -> SpaceTable:
    slots: dict[tuple[str, str], Slot] = {}
    keys: dict[str, dict[str, Shape]] = {}
    for spec in modules(arch):
        if spec.part == "unet":
            prefix = _UNET_PREFIX[space]
            name = spec.name if space == "diffusers" else spec.ldm
            bias = f"{prefix}{name}.bias" if spec.bias else None
            slot = Slot(f"{prefix}{name}.weight", bias, None, spec.weight)
        else:
            layout = text_layout(arch, spec.part, space)
            layer = _layer_index(spec.name)
            if layer is not None and layer >= layout.layers:
                continue
            if spec.name == "text_projection" and not layout.projection:
                continue
            make = _openclip_slot if layout.openclip else _hf_slot
            slot = make(spec, layout.prefix)
        slots[(spec.part, spec.name)] = slot
        keys.setdefault(spec.part, {}).update(_stored(slot, spec))
    return SpaceTable(arch, space, slots, keys)


def state_shapes(arch: str, space: str, parts: tuple[str, ...] | None = None) -> dict[str, Shape]:
    """The (key -> shape) state dict of the chosen parts, as a model in that space holds it.

    `arch` is sd1/sd2/sdxl or a DiT variant (flux-dev, wan2.1-i2v-14b, ...; full size):
    DiT spaces are comfy, bare, checkpoint and diffusers, parts diffusion_model and the
    family's text encoders (clip_l, t5xxl, ...). `parts` defaults to every part.
    """
    if arch not in ARCHITECTURES:
        from .dit import dit_state_shapes, variant_config

        family, cfg = variant_config(arch)
        return dit_state_shapes(family, cfg, space, parts)
    parts = PARTS if parts is None else parts
    table = space_table(arch, space)
    out: dict[str, Shape] = {}
    for part in parts:
        out.update(table.keys.get(part, {}))
    return out
