"""Small real adapters (tensor dicts read by lycoris_core.load_adapter) for key-map tests.

Names follow each writer's convention as documented (kohya/LyCORIS, LyCORIS generic,
diffusers incl. old attn processors, PEFT, ComfyUI), written here independently of the
key map's own alias tables so the tests check one against the other.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lycoris_core import load_adapter

Shape = tuple[int, ...]


def lora_tensors(targets: Mapping[str, Shape], rank: int = 1) -> dict[str, torch.Tensor]:
    """Rank-`rank` LoRA/LoCon factors per module (w_norm/b_norm for 1-D norm weights)."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in targets.items():
        if len(shape) == 1:
            out[f"{name}.w_norm"] = torch.zeros(shape)
            out[f"{name}.b_norm"] = torch.zeros(shape)
            continue
        kernel = tuple(shape[2:])
        out[f"{name}.lora_down.weight"] = torch.zeros((rank, shape[1], *kernel))
        out[f"{name}.lora_up.weight"] = torch.zeros((shape[0], rank, *(1 for _ in kernel)))
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def lora_modules(targets: Mapping[str, Shape], rank: int = 1):
    return load_adapter(lora_tensors(targets, rank)).modules


def full_modules(targets: Mapping[str, Shape], bias: bool = True):
    """LyCORIS "full" modules (diff + diff_b): they carry a bias delta."""
    out = {}
    for name, shape in targets.items():
        out[f"{name}.diff"] = torch.zeros(shape)
        if bias:
            out[f"{name}.diff_b"] = torch.zeros(shape[:1])
    return load_adapter(out).modules


def us(path: str) -> str:
    return path.replace(".", "_")


# scheme -> part -> function(canonical name, ldm name) -> adapter module name (None: not written)
SCHEMES = {
    "kohya": {
        "unet": lambda n, ldm: f"lora_unet_{us(n)}",
        "te1": lambda n, ldm: f"lora_te1_{us(n)}",
        "te2": lambda n, ldm: f"lora_te2_{us(n)}",
    },
    "kohya_single_te": {"te1": lambda n, ldm: f"lora_te_{us(n)}"},
    "kohya_sgm": {"unet": lambda n, ldm: f"lora_unet_{us(ldm)}"},
    "lycoris_generic": {"unet": lambda n, ldm: f"lycoris_{us(n)}"},
    "diffusers": {
        "unet": lambda n, ldm: f"unet.{n}",
        "te1": lambda n, ldm: f"text_encoder.{n}",
        "te2": lambda n, ldm: f"text_encoder_2.{n}",
    },
    "peft_unet": {"unet": lambda n, ldm: f"base_model.model.{n}"},
    "comfy_generic": {"unet": lambda n, ldm: f"diffusion_model.{ldm}"},
    "transformers5_flat": {
        "te1": lambda n, ldm: f"lora_te1_{us(n.removeprefix('text_model.'))}",
        "te2": lambda n, ldm: f"lora_te2_{us(n.removeprefix('text_model.'))}",
    },
}
