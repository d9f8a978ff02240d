"""Full-size SD1.5 / SDXL adapter files written by lycoris-lora's kohya wrapper.

The networks are built on meta-device diffusers/transformers models (published configs), so
LyCORIS sees every real layer and shape without allocating SDXL's 2.6B weights; only the
rank-1/2 factors are materialised and saved. SGM-named SDXL files (what sd-scripts writes)
are made by renaming the UNet modules with the key map's diffusers -> LDM table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from keymap_models import meta_text, meta_unet, with_text_model
from lycoris_factory import SD15_PRESET
from safetensors.torch import load_file, save_file

from lycoris_core.keymap import diffusers_to_ldm

SDXL_PRESET = SD15_PRESET.replace(
    '"time_embedding.linear_2"]',
    '"time_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2"]',
)
ATTENTION_PRESET = """\
enable_conv = false
unet_target_module = ["Transformer2DModel"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
PRESETS = {"sd1": SD15_PRESET, "sdxl": SDXL_PRESET, "attention": ATTENTION_PRESET}
TEXT = {"sd1": ["clip_l"], "sdxl": ["clip_l", "bigg"]}


def write_adapter(path: Path, arch: str, algo: str, preset: str, **kwargs) -> Path:
    """Build the LyCORIS network on meta models, give it random CPU factors, save it (fp16)."""
    import lycoris.kohya as lk

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    preset_file = path.with_suffix(".toml")
    preset_file.write_text(PRESETS[preset])
    unet = meta_unet(arch)
    encoders = [with_text_model(meta_text(name)) for name in TEXT[arch]]
    te = encoders[0] if len(encoders) == 1 else encoders
    cls = lk.LycorisNetworkKohya  # presets are class state: clear what an earlier one set
    cls.MODULE_ALGO_MAP, cls.NAME_ALGO_MAP, cls.USE_FNMATCH, cls.TARGET_EXCLUDE_NAME = (
        {},
        {},
        False,
        [],
    )
    net = lk.create_network(
        1.0,
        2,
        1,
        None,
        te,
        unet,
        algo=algo,
        conv_dim=1,
        conv_alpha=1,
        preset=str(preset_file),
        **kwargs,
    )
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    net.save_weights(str(path), torch.float16, {"ss_network_module": "lycoris.kohya"})
    return path


def to_sgm_names(src: Path, dst: Path, arch: str) -> Path:
    """Rename `lora_unet_<diffusers>` modules to `lora_unet_<ldm>`, as sd-scripts names SDXL."""
    rename = {
        "lora_unet_" + d.replace(".", "_"): "lora_unet_" + ldm.replace(".", "_")
        for d, ldm in diffusers_to_ldm(arch).items()
    }
    tensors = load_file(str(src))
    out = {}
    for key, value in tensors.items():
        module, dot, suffix = key.partition(".")
        out[rename.get(module, module) + dot + suffix] = value
    save_file(out, str(dst), {"ss_network_module": "lycoris.kohya"})
    return dst
