"""Which layers get an adapter, and the kohya module names they are saved under.

A preset is a set of anchored regexes over a layer's *canonical* path (diffusers names
for the SD UNets, Hugging Face names for CLIP).  ComfyUI holds SD1.x/SD2.x UNets in LDM
naming (``input_blocks.1.1…``); ``ldm_to_diffusers`` renames them first, so presets and
saved names are the same whichever way the model was loaded, and the saved names are
the ones real kohya/LyCORIS files use (``lora_unet_down_blocks_0_attentions_0_…``).
SDXL files from sd-scripts use the LDM names themselves, so SDXL keeps them.

DiTs keep ComfyUI's own module paths (BFL names for Flux, SAI ``joint_blocks`` for SD3,
the original Wan/Qwen names), which are the names kohya, musubi and ComfyUI's own files use;
``dit`` and ``dit-attn`` select their transformer blocks whatever the family.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from torch import nn


@dataclass(frozen=True)
class Preset:
    name: str
    include: tuple[str, ...]  # a layer is adapted when one of these fully matches its canonical path
    exclude: tuple[str, ...] = ()
    description: str = ""

    @property
    def _compiled(self):
        return _compile(self.include), _compile(self.exclude)

    def matches(self, path: str) -> bool:
        include, exclude = self._compiled
        return any(p.fullmatch(path) for p in include) and not any(p.fullmatch(path) for p in exclude)


@cache
def _compile(patterns: tuple[str, ...]):
    return tuple(re.compile(p) for p in patterns)


_ATTN = r"(.*\.)?attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_TRANSFORMER = r"(.*\.)?(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)"
_CLIP_ATTN = r"(.*\.)?self_attn\.(q_proj|k_proj|v_proj|out_proj)"
_CLIP_MLP = r"(.*\.)?mlp\.(fc1|fc2)"

# DiTs in ComfyUI's own module paths (the names real files use: lora_unet_double_blocks_0_img_attn_qkv, ...)
_DIT_BLOCK = (r"(double_blocks|single_blocks|joint_blocks|blocks|transformer_blocks|layers|noise_refiner|"
              r"context_refiner|double_stream_blocks|single_stream_blocks)\.\d+")
_DIT_MOD = r"(.*\.)?(img_mod|txt_mod|modulation|adaLN_modulation)(\..*)?"
_DIT_ATTN = (r"(img_attn|txt_attn|attn|attn1|attn2|self_attn|cross_attn|attention)\."
             r"(qkv|proj|q|k|v|o|k_img|v_img|out|to_q|to_k|to_v|to_out(\.0)?|add_q_proj|add_k_proj|add_v_proj|"
             r"to_add_out|to_q_t|to_k_t|to_v_t|to_out_t)")

PRESETS: dict[str, Preset] = {
    "unet-attn": Preset("unet-attn", (_ATTN,), description="SD UNet attention only: to_q/to_k/to_v/to_out of attn1/attn2"),
    "unet-transformer": Preset("unet-transformer", (_TRANSFORMER,),
                               description="SD UNet transformer blocks: attention, feed-forward, proj_in/proj_out"),
    "unet-full": Preset("unet-full", (r".*",), (r"(.*\.)?(add_embedding|label_emb)(\..*)?",),
                        description="every Linear and Conv of the SD UNet (resnets, samplers, conv_in/out, time "
                                    "embedding), as LyCORIS's full preset; k×k convs use the conv rank"),
    "clip": Preset("clip", (_CLIP_ATTN, _CLIP_MLP), description="CLIP text encoder attention and MLP"),
    "clip-attn": Preset("clip-attn", (_CLIP_ATTN,), description="CLIP text encoder attention only"),
    "dit": Preset("dit", (_DIT_BLOCK + r"\..+",), (_DIT_MOD,),
                  description="every Linear in a DiT's transformer blocks (attention, MLP, Flux's fused single-block "
                              "layers; Flux, Chroma, SD3/3.5, Wan, Qwen-Image, HunyuanVideo, Lumina 2, HiDream, "
                              "Z-Image), without the modulation layers"),
    "dit-attn": Preset("dit-attn", (_DIT_BLOCK + r"\.(.*\.)?" + _DIT_ATTN, _DIT_BLOCK + r"\.(linear1|linear2)"),
                       description="DiT attention projections only (Flux/HunyuanVideo single blocks: linear1/linear2, "
                                   "where attention and MLP share one layer)"),
}


def preset(name: str | Preset) -> Preset:
    if isinstance(name, Preset):
        return name
    if name in PRESETS:
        return PRESETS[name]
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


@dataclass(frozen=True)
class Target:
    """A layer to adapt: its kohya name, its path in the model, and the layer itself."""

    name: str
    path: str
    layer: nn.Module


def kohya_name(prefix: str, path: str) -> str:
    """``lora_unet`` + ``down_blocks.0.attentions.0…`` -> ``lora_unet_down_blocks_0_attentions_0…``."""
    return f"{prefix}_{path.replace('.', '_')}" if path else prefix


def is_trainable_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
    )


def find_targets(root: nn.Module, which: str | Preset, prefix: str = "lora_unet",
                 rename: Callable[[str], str | None] | None = None) -> list[Target]:
    """Every Linear/Conv under ``root`` that the preset selects, with its saved name.

    ``rename`` maps a path to its canonical path (or None to skip the layer).
    """
    chosen = preset(which)
    out, seen = [], set()
    for path, module in root.named_modules():
        if not is_trainable_layer(module) or id(module) in seen:
            continue
        canonical = rename(path) if rename else path
        if canonical is None or not chosen.matches(canonical):
            continue
        seen.add(id(module))
        out.append(Target(kohya_name(prefix, canonical), path, module))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two layers would be saved as {dup}")
    return out


@cache
def _ldm_index(arch: str) -> dict[str, str]:
    from ..keymap import diffusers_to_ldm

    return {ldm: name for name, ldm in diffusers_to_ldm(arch).items()}


def ldm_to_diffusers(arch: str) -> Callable[[str], str | None]:
    """Rename LDM UNet paths (as ComfyUI holds SD1/SD2) to the diffusers paths kohya files use."""
    index = _ldm_index(arch)

    def rename(path: str) -> str | None:
        return index.get(path)

    return rename


def unet_naming(arch: str) -> Callable[[str], str | None] | None:
    """The rename that gives real-file names for a ComfyUI diffusion model of this architecture.

    SD1.x/SD2.x: LDM -> diffusers (kohya's names).  SDXL and everything else: the model's own
    paths (sd-scripts' SDXL names are the LDM ones; ComfyUI maps ``lora_unet_<path>`` for all).
    """
    return ldm_to_diffusers(arch) if arch in ("sd1", "sd2") else None
