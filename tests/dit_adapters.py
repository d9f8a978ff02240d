"""DiT adapter names as their writers spell them, and small real adapters for key-map tests.

The spellings follow each trainer's convention as the reference records it (kohya/musubi
`lora_unet_` + underscored ComfyUI names, ComfyUI `diffusion_model.`, PEFT `transformer.` and
`base_model.model.`, SimpleTuner `lycoris_`, OneTrainer `lora_transformer_`, DiffSynth bare
names), written here independently of the key map's alias tables.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lycoris_core import load_adapter
from lycoris_core.keymap import dit_table, variant_config

Shape = tuple[int, ...]


def us(path: str) -> str:
    return path.replace(".", "_")


# scheme -> spelling of a ComfyUI-named (native) module
NATIVE_SCHEMES = {
    "kohya": lambda n: f"lora_unet_{us(n)}",
    "comfy": lambda n: f"diffusion_model.{n}",
    "bare": lambda n: n,  # UNETLoader-style files, BFL control LoRAs
    "fal_peft": lambda n: f"base_model.model.{n}",
}
# scheme -> spelling of a diffusers-named module
DIFFUSERS_SCHEMES = {
    "peft": lambda d: f"transformer.{d}",
    "peft_raw": lambda d: f"base_model.model.{d}",
    "simpletuner_lycoris": lambda d: f"lycoris_{us(d)}",
    "onetrainer": lambda d: f"lora_transformer_{us(d)}",
    "diffsynth": lambda d: d,
}


def native_modules(variant: str, skip_large_raw: bool = True) -> dict[str, Shape]:
    """ComfyUI module name -> weight shape, every module of a published variant.

    Raw parameters larger than a million elements (SD3's pos_embed) are left out: a full
    diff of them is a 900 MB zero tensor, and no trainer targets them.
    """
    table = dit_table(*variant_config(variant))
    out = {}
    for native in table.natives.values():
        if skip_large_raw and not native.leaf and _numel(native.weight) > 1 << 20:
            continue
        out[native.name] = native.weight
    return out


def diffusers_modules(variant: str, skip_large_raw: bool = True) -> dict[str, Shape]:
    """diffusers module name -> weight shape, every module of a published variant."""
    table = dit_table(*variant_config(variant))
    out = {}
    for name, (leaf, segments) in table.diffusers.items():
        first = table.natives[segments[0][0]]
        shape = (sum(s[3] for s in segments), *first.weight[1:])
        if skip_large_raw and not leaf and _numel(shape) > 1 << 20:
            continue
        out[name] = shape
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def adapter_tensors(targets: Mapping[str, Shape], rank: int = 1, seed: int | None = None,
                    raw: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Per module: a rank-`rank` LoRA (linear or conv), a norm delta (1-D) or a full diff (`raw`).

    Zeros unless `seed` is given (then small random values).
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def make(shape):
        if gen is None:
            return torch.zeros(shape)
        return torch.randn(shape, generator=gen) * 0.05

    out: dict[str, torch.Tensor] = {}
    for name, shape in targets.items():
        if name in raw or (len(shape) >= 3 and shape[0] == 1):
            out[f"{name}.diff"] = make(shape)
        elif len(shape) == 1:
            out[f"{name}.w_norm"] = make(shape)
        else:
            kernel = tuple(shape[2:])
            out[f"{name}.lora_down.weight"] = make((rank, shape[1], *kernel))
            out[f"{name}.lora_up.weight"] = make((shape[0], rank, *(1 for _ in kernel)))
            out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def modules_for(targets: Mapping[str, Shape], **kwargs):
    return load_adapter(adapter_tensors(targets, **kwargs)).modules
