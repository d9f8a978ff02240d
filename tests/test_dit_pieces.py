"""Modules spread over several weights are patched by row pieces, for every algorithm that allows it.

A kohya/ComfyUI-named Flux adapter trains BFL's fused weights (``img_attn.qkv``,
``single_blocks.N.linear1`` = q, k, v, MLP-in); a diffusers-folder model stores them split
(``to_q``, ``to_k``, ``to_v``, ``proj_mlp``).  Each split weight takes its rows of the fused
delta: the result equals patching the fused weight and splitting it.  Algorithms whose rows
depend only on the same rows of W0 split this way (DoRA on the output axis included);
Diag-OFT/BOFT and input-axis DoRA cannot, and are refused with the model left untouched.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lycoris_core import LycorisError, load_adapter
from lycoris_core.keymap import FAMILIES, dit_state_shapes, variant_config
from lycoris_core.patch import AdapterSpec, WeightPatcher, build_plan
from lycoris_core.testing.synthetic import module_tensors

H = 3072
FUSED = {  # kohya module -> (BFL ComfyUI weight, diffusers weights in row order)
    "lora_unet_double_blocks_0_img_attn_qkv": ("double_blocks.0.img_attn.qkv", [
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"]),
    "lora_unet_single_blocks_0_linear1": ("single_blocks.0.linear1", [
        "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"]),
}


def flux_shapes(space: str) -> dict[str, tuple[int, ...]]:
    family, cfg = variant_config("flux-dev")
    cfg = FAMILIES[family].at_depth(cfg, replace(cfg, blocks=(1, 1)))
    return dit_state_shapes(family, cfg, space)


QKV = "lora_unet_double_blocks_0_img_attn_qkv"


def adapter_for(algo: str, seed: int = 0, modules=tuple(FUSED), **options):
    gen = torch.Generator().manual_seed(seed)
    shapes = flux_shapes("comfy")
    tensors = {}
    for name in modules:
        fused = FUSED[name][0]
        shape = shapes[f"diffusion_model.{fused}.weight"]
        for suffix, value in module_tensors(algo, shape, gen, rank=4, alpha=2.0, **options).items():
            tensors[f"{name}.{suffix}"] = value
    return load_adapter(tensors)


def weights(shapes, keys, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(shapes[k], generator=gen) * 0.05).to(torch.bfloat16) for k in keys}


@pytest.mark.parametrize("algo,modules", [("lora", tuple(FUSED)), ("loha", (QKV,)), ("lokr", (QKV,)), ("dora", (QKV,)),
                                          ("full", (QKV,)), ("glora", (QKV,)), ("ia3", (QKV,))])
def test_a_fused_module_on_split_weights_equals_the_fused_patch_split(algo, modules):
    adapter = adapter_for(algo, modules=modules)
    comfy, diffusers = flux_shapes("comfy"), flux_shapes("diffusers")
    plan = build_plan([AdapterSpec(adapter, 0.7)], diffusers)
    assert not plan.reports[0].targets and set(plan.reports[0].pieces) == set(modules)
    fused_parts = [FUSED[name] for name in modules]
    split_keys = [f"transformer.{s}.weight" for _f, split in fused_parts for s in split]
    split = weights(diffusers, split_keys)
    fused = {f"diffusion_model.{f}.weight": torch.cat([split[f"transformer.{s}.weight"] for s in parts])
             for f, parts in fused_parts}
    WeightPatcher(split, model_shapes=diffusers).apply([AdapterSpec(adapter, 0.7)])
    WeightPatcher(fused, model_shapes=comfy).apply([AdapterSpec(adapter, 0.7)])
    for f, parts in fused_parts:
        rebuilt = torch.cat([split[f"transformer.{s}.weight"] for s in parts])
        assert torch.equal(rebuilt, fused[f"diffusion_model.{f}.weight"]), (algo, f)


def test_pieces_keep_their_deltas_across_a_strength_change_and_restore_exactly():
    adapter = adapter_for("loha", seed=1, modules=(QKV,))
    diffusers = flux_shapes("diffusers")
    keys = [f"transformer.{s}.weight" for s in FUSED[QKV][1]]
    live = weights(diffusers, keys)
    original = {k: v.clone() for k, v in live.items()}
    patcher = WeightPatcher(live, model_shapes=diffusers)
    patcher.apply([AdapterSpec(adapter, 1.0)])
    hits = patcher.cache.hits
    patcher.apply([AdapterSpec(adapter, -0.5)])
    assert patcher.cache.hits > hits  # the pieces' deltas were kept at strength 1
    fresh = {k: v.clone() for k, v in original.items()}
    WeightPatcher(fresh, model_shapes=diffusers).apply([AdapterSpec(adapter, -0.5)])
    assert all(torch.equal(live[k], fresh[k]) for k in keys)
    patcher.restore()
    assert all(torch.equal(live[k], original[k]) for k in keys)


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_rotations_cannot_be_split_and_nothing_is_applied(algo):
    adapter = adapter_for(algo, seed=2)
    diffusers = flux_shapes("diffusers")
    keys = [f"transformer.{s}.weight" for _f, split in FUSED.values() for s in split]
    live = {k: torch.ones((), dtype=torch.bfloat16).expand(diffusers[k]) for k in keys}  # refused before any read
    with pytest.raises(LycorisError, match="cannot be split"):
        WeightPatcher(live, model_shapes=diffusers).apply([AdapterSpec(adapter)])
    assert all(bool((live[k] == 1).all()) for k in keys)
