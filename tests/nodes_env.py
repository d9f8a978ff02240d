"""Shared set-up for the node tests: the ComfyUI stand-in, real adapter files, real-layout models.

Models use the exact ComfyUI SD1.5 key names and shapes (``state_shapes("sd1", "comfy")``);
weights an adapter touches are real random tensors, every other parameter is a stride-0
view (right shape, no memory), so architecture detection sees the whole model.
"""

# isort: skip_file
from __future__ import annotations

import json
from pathlib import Path

import comfy_stub
import torch
from torch import nn

comfy_stub.activate()

import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
from comfy.model_patcher import ModelPatcher  # noqa: E402

from lycoris_core import load_adapter  # noqa: E402
from lycoris_core.testing.demo import DEMO_METADATA, demo_tensors  # noqa: E402
from lycoris_core.keymap import state_shapes  # noqa: E402
from lycoris_core.patch import AdapterSpec, build_plan  # noqa: E402
from lycoris_core.io.writer import save_tensors  # noqa: E402

SHAPES = state_shapes("sd1", "comfy")
UNET_SHAPES = {k: v for k, v in SHAPES.items() if k.startswith("diffusion_model.")}
CLIP_SHAPES = {k: v for k, v in SHAPES.items() if k.startswith("clip_l.")}

Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"


def w0_tensors(seed: int = 7) -> dict[str, torch.Tensor]:
    """Deltas that depend on the original weight: DoRA on a CLIP and a conv key, (IA)3 on a UNet key."""
    g = torch.Generator().manual_seed(seed)
    t = {
        f"{Q}.lora_down.weight": torch.randn(4, 768, generator=g) * 0.05,
        f"{Q}.lora_up.weight": torch.randn(768, 4, generator=g) * 0.05,
        f"{Q}.alpha": torch.tensor(2.0),
        f"{Q}.dora_scale": torch.rand(768, 1, generator=g) + 0.5,
        f"{CONV1}.lora_down.weight": torch.randn(4, 320, 3, 3, generator=g) * 0.05,
        f"{CONV1}.lora_up.weight": torch.randn(320, 4, 1, 1, generator=g) * 0.05,
        f"{CONV1}.alpha": torch.tensor(4.0),
        f"{CONV1}.dora_scale": torch.rand(320, 1, 1, 1, generator=g) + 0.5,
        f"{TO_K}.weight": torch.randn(320, generator=g) * 0.1,
        f"{TO_K}.on_input": torch.tensor(False),
    }
    return t


def sdxl_tensors(seed: int = 3) -> dict[str, torch.Tensor]:
    """An SDXL-shaped LoRA: blocks SD1.5 lacks and a 2048-wide cross-attention."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in (
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q", (640, 640)),
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", (640, 2048)),
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v", (640, 2048)),
        ("lora_unet_mid_block_attentions_0_transformer_blocks_3_attn1_to_q", (1280, 1280)),
    ):
        out[f"{name}.lora_down.weight"] = torch.randn(4, shape[1], generator=g)
        out[f"{name}.lora_up.weight"] = torch.randn(shape[0], 4, generator=g)
        out[f"{name}.alpha"] = torch.tensor(4.0)
    return out


def write_adapters(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for seed, algo in enumerate(("lora", "loha", "lokr")):
        meta = dict(DEMO_METADATA, ss_network_args=json.dumps({"algo": algo}))
        files[f"demo_{algo}.safetensors"] = save_tensors(demo_tensors(algo, seed), folder / f"demo_{algo}.safetensors",
                                                         meta, overwrite=True)
    (folder / "sub").mkdir(exist_ok=True)
    files["sub/w0.safetensors"] = save_tensors(w0_tensors(), folder / "sub" / "w0.safetensors",
                                               {"ss_base_model_version": "sd_v1"}, overwrite=True)
    files["sdxl_lora.safetensors"] = save_tensors(sdxl_tensors(), folder / "sdxl_lora.safetensors",
                                                  {"ss_base_model_version": "sdxl_base_v1-0"}, overwrite=True)
    (folder / "not_an_adapter.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return files


def touched_keys(paths) -> set[str]:
    keys = set()
    for path in paths:
        try:
            plan = build_plan([AdapterSpec(load_adapter(path))], SHAPES)
        except Exception:
            continue
        keys |= set(plan.keys())
    return keys


def module_from_shapes(shapes, real: set[str], dtype: torch.dtype, seed: int) -> nn.Module:
    root = nn.Module()
    g = torch.Generator().manual_seed(seed)
    for key, shape in shapes.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            child = mod._modules.get(part)
            if child is None:
                child = nn.Module()
                mod.add_module(part, child)
            mod = child
        if key in real:
            value = (torch.randn(shape, generator=g) * 0.05).to(dtype)
        else:
            value = torch.zeros((), dtype=dtype).expand(shape)
        mod.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    return root


def make_model(real: set[str], unet_dtype=torch.float32, seed: int = 0) -> ModelPatcher:
    root = module_from_shapes(UNET_SHAPES, real, unet_dtype, seed)
    sampling = nn.Module()
    sampling.register_buffer("sigmas", torch.linspace(0.03, 14.6, 1000))
    root.add_module("model_sampling", sampling)
    return ModelPatcher(root, torch.device("cpu"), torch.device("cpu"))


def make_clip(real: set[str], dtype=torch.float16, seed: int = 1):
    return comfy.sd.CLIP(cond_stage_model=module_from_shapes(CLIP_SHAPES, real, dtype, seed))


def use_loras(folder: Path) -> None:
    folder_paths.reset(str(folder))
