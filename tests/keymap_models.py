"""Published SD1.5 / SD2.1 / SDXL model configurations, instantiated on the meta device.

Test-only: diffusers and transformers are the independent oracle the key map's generated
tables are checked against. Meta tensors carry shapes, so even SDXL costs no memory.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

UNET_CONFIGS = {
    "sd1": dict(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    "sd2": dict(
        sample_size=96,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    ),
    "sdxl": dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        use_linear_projection=True,
    ),
}

# (hidden, layers, intermediate, heads, projection) as published; diffusers' SD2
# text_encoder keeps 23 of OpenCLIP-H's 24 layers, checkpoints keep all 24.
TEXT_CONFIGS = {
    "clip_l": (768, 12, 3072, 12, False),
    "openclip_h": (1024, 24, 4096, 16, False),
    "openclip_h_diffusers": (1024, 23, 4096, 16, False),
    "bigg": (1280, 32, 5120, 20, True),
}


def meta_unet(arch: str) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**UNET_CONFIGS[arch])


def meta_text(name: str) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden, layers, inter, heads, projection = TEXT_CONFIGS[name]
    config = CLIPTextConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=inter,
        num_attention_heads=heads,
        projection_dim=hidden,
        hidden_act="gelu" if name != "clip_l" else "quick_gelu",
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with torch.device("meta"):
        return cls(config)


class TextModelWrap(nn.Module):
    """Gives a transformers 5 CLIPTextModel back its `text_model` level (files on disk have it)."""

    def __init__(self, te: nn.Module):
        super().__init__()
        self.text_model = te


def with_text_model(te: nn.Module) -> nn.Module:
    return te if hasattr(te, "text_model") else TextModelWrap(te)


@cache
def diffusers_state_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """The state dict of a diffusers pipeline folder, prefixed by subfolder, as (key -> shape)."""
    encoders = {"sd1": ["clip_l"], "sd2": ["openclip_h_diffusers"], "sdxl": ["clip_l", "bigg"]}[
        arch
    ]
    out = {f"unet.{k}": tuple(v.shape) for k, v in meta_unet(arch).state_dict().items()}
    for folder, name in zip(
        ("text_encoder", "text_encoder_2")[: len(encoders)], encoders, strict=True
    ):
        te = with_text_model(meta_text(name))
        out.update({f"{folder}.{k}": tuple(v.shape) for k, v in te.state_dict().items()})
    return out
