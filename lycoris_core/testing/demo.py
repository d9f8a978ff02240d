"""Small demo adapters with real SD1.5 module names, so every command works out of the box.

Values are random (seeded); shapes and names are those of real kohya/LyCORIS files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..io.writer import save_tensors
from .synthetic import module_tensors

# (kohya module name, weight shape) — a slice of SD1.5: attention, feed-forward, conv, text encoder
DEMO_MODULES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (320, 320)),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", (320, 768)),
    ("lora_unet_down_blocks_0_resnets_0_conv1", (320, 320, 3, 3)),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2", (1280, 5120)),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", (320, 320, 1, 1)),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (768, 768)),
    ("lora_te_text_model_encoder_layers_11_mlp_fc1", (3072, 768)),
)

DEMO_METADATA = {
    "ss_network_module": "lycoris.kohya",
    "ss_base_model_version": "sd_v1",
    "ss_tag_frequency": json.dumps({"10_demo": {"lycodemo": 12, "1girl": 8, "smile": 3}}),
    "modelspec.architecture": "stable-diffusion-v1/lora",
}


# algorithm -> (rank, alpha): one each of the three most common kinds
DEMO_ALGOS = {"lora": (8, 4.0), "loha": (4, 2.0), "lokr": (4, 4.0)}


def demo_tensors(algo: str, seed: int = 0) -> dict[str, torch.Tensor]:
    rank, alpha = DEMO_ALGOS[algo]
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in DEMO_MODULES:
        for suffix, value in module_tensors(algo, shape, gen, rank=rank, alpha=alpha).items():
            tensors[f"{name}.{suffix}"] = value.to(torch.float16)
    return tensors


def write_demo_files(folder, overwrite: bool = False) -> list[Path]:
    """Write demo_lora / demo_loha / demo_lokr .safetensors into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for seed, algo in enumerate(DEMO_ALGOS):
        path = folder / f"demo_{algo}.safetensors"
        meta = dict(DEMO_METADATA, ss_network_args=json.dumps({"algo": algo}))
        written.append(save_tensors(demo_tensors(algo, seed), path, meta, overwrite=overwrite))
    return written
