"""Published DiT configurations as diffusers builds them, instantiated on the meta device.

Test-only oracle: diffusers' own transformer classes (0.42) with the configs of the released
checkpoints (their `transformer/config.json`), so the key map's generated tables are checked
against an independent definition, full size, without allocating a weight.
"""

from __future__ import annotations

from functools import cache

import torch

_FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
_SD3 = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
            joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
            pos_embed_max_size=192)
_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6)

# variant name (lycoris_core.keymap) -> (diffusers class, config)
DIFFUSERS_CONFIGS = {
    "flux-dev": ("FluxTransformer2DModel", _FLUX),
    "flux-schnell": ("FluxTransformer2DModel", {**_FLUX, "guidance_embeds": False}),
    "flux-fill": ("FluxTransformer2DModel", {**_FLUX, "in_channels": 384, "out_channels": 64}),
    "flux-depth": ("FluxTransformer2DModel", {**_FLUX, "in_channels": 128, "out_channels": 64}),
    "chroma": ("ChromaTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                                approximator_num_channels=64, approximator_hidden_dim=5120,
                                                approximator_layers=5)),
    "sd3-medium": ("SD3Transformer2DModel", _SD3),
    "sd3.5-medium": ("SD3Transformer2DModel", {**_SD3, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                                               "dual_attention_layers": tuple(range(13))}),
    "sd3.5-large": ("SD3Transformer2DModel", {**_SD3, "num_layers": 38, "num_attention_heads": 38,
                                              "caption_projection_dim": 2432, "qk_norm": "rms_norm"}),
    "wan-t2v-14b": ("WanTransformer3DModel", _WAN),
    "wan2.1-i2v-14b": ("WanTransformer3DModel", {**_WAN, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}),
    "wan2.2-i2v-a14b": ("WanTransformer3DModel", {**_WAN, "in_channels": 36}),
    "wan2.1-t2v-1.3b": ("WanTransformer3DModel", {**_WAN, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}),
    "wan2.2-ti2v-5b": ("WanTransformer3DModel", {**_WAN, "num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30,
                                                 "in_channels": 48, "out_channels": 48}),
    "qwen-image": ("QwenImageTransformer2DModel", dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                                                       attention_head_dim=128, num_attention_heads=24,
                                                       joint_attention_dim=3584, guidance_embeds=False,
                                                       axes_dims_rope=(16, 56, 56))),
    "hunyuan-video": ("HunyuanVideoTransformer3DModel", dict(in_channels=16, out_channels=16, num_attention_heads=24,
                                                             attention_head_dim=128, num_layers=20, num_single_layers=40,
                                                             num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
                                                             patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                                                             text_embed_dim=4096, pooled_projection_dim=768)),
    "lumina2": ("Lumina2Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, hidden_size=2304,
                                                  num_layers=26, num_refiner_layers=2, num_attention_heads=24,
                                                  num_kv_heads=8, multiple_of=256, ffn_dim_multiplier=None,
                                                  norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(32, 32, 32),
                                                  axes_lens=(300, 512, 512), cap_feat_dim=2304)),
    "hidream-i1": ("HiDreamImageTransformer2DModel", dict(patch_size=2, in_channels=16, out_channels=16, num_layers=16,
                                                          num_single_layers=32, attention_head_dim=128,
                                                          num_attention_heads=20, caption_channels=[4096, 4096],
                                                          text_emb_dim=2048, num_routed_experts=4,
                                                          num_activated_experts=2, axes_dims_rope=(64, 32, 32),
                                                          max_resolution=(128, 128),
                                                          llama_layers=list(range(32)) + [31] * 16)),
    "z-image": ("ZImageTransformer2DModel", dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840,
                                                 n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
                                                 norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
                                                 t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])),
}

# the config keys that set a model's depth, per diffusers class
DEPTH_KEYS = {
    "FluxTransformer2DModel": ("num_layers", "num_single_layers"),
    "ChromaTransformer2DModel": ("num_layers", "num_single_layers"),
    "SD3Transformer2DModel": ("num_layers",),
    "WanTransformer3DModel": ("num_layers",),
    "QwenImageTransformer2DModel": ("num_layers",),
    "HunyuanVideoTransformer3DModel": ("num_layers", "num_single_layers", "num_refiner_layers"),
    "Lumina2Transformer2DModel": ("num_layers",),
    "HiDreamImageTransformer2DModel": ("num_layers", "num_single_layers"),
    "ZImageTransformer2DModel": ("n_layers",),
}


def diffusers_model(variant: str, device: str = "meta", **overrides):
    import diffusers

    name, config = DIFFUSERS_CONFIGS[variant]
    config = {**config, **overrides}
    if name == "SD3Transformer2DModel" and "dual_attention_layers" in config:
        config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < config["num_layers"])
    with torch.device(device):
        return getattr(diffusers, name)(**config)


@cache
def diffusers_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """The full-size transformer's state dict as (key -> shape), keys under `transformer.`."""
    model = diffusers_model(variant)
    return {f"transformer.{k}": tuple(v.shape) for k, v in model.state_dict().items()}


# ---- tagged tensors: follow every row through a converter -----------------------------------

TAG = 1 << 16  # rows per key index: every DiT weight has fewer than 65536 rows


def tagged(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Stride-0 int32 tensors whose every element of row r of key number i is i * TAG + r.

    A converter that renames, splits, concatenates or swaps rows moves the tags with them,
    so its output says where each row came from, at no memory cost beyond what it copies.
    """
    index = {key: i for i, key in enumerate(sorted(shapes))}
    out = {}
    for key, shape in shapes.items():
        rows = torch.arange(shape[0], dtype=torch.int32) + index[key] * TAG
        out[key] = rows.view(-1, *([1] * (len(shape) - 1))).expand(shape)
    return out, index


def row_tags(tensor: torch.Tensor) -> torch.Tensor:
    """The tag of each row of a converted tensor (its first column)."""
    return tensor.reshape(tensor.shape[0], -1)[:, 0]
