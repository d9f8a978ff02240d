"""merge / convert / resize on DiT adapters: fused and split targets aligned through the key map,
output in the family's kohya naming (the fused weight ComfyUI stores), text encoders by part.

Each merged file is loaded back and patched onto a reduced-depth, real-width model; the patched
weights must equal the inputs' strength-scaled sum patched directly (up to the float32 rounding
of an SVD at a rank that holds the sum exactly).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from dit_adapters import adapter_tensors
from safetensors.torch import save_file

from lycoris_core import load_adapter
from lycoris_core.errors import ArchitectureMismatchError
from lycoris_core.keymap import FAMILIES, dit_state_shapes, variant_config
from lycoris_core.keymap.canonical import canonical_weights
from lycoris_core.keymap.layout import ModelLayout
from lycoris_core.patch import AdapterSpec, build_plan
from lycoris_core.testing.synthetic import module_tensors
from lycoris_core.tools.merge import MergeInput, convert_adapter, merge_adapters, read_weight, resize_adapter

H = 3072


def reduced(variant, blocks):
    family, cfg = variant_config(variant)
    cfg = FAMILIES[family].at_depth(cfg, replace(cfg, blocks=blocks))
    return family, cfg, dit_state_shapes(family, cfg, "comfy")


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata)
    return str(path)


def kohya_flux(tmp_path):
    """kohya lora_flux names on BFL's fused weights, CLIP-L (lora_te1_) and T5 (lora_te2_)."""
    return write(tmp_path / "kohya.safetensors", adapter_tensors({
        "lora_unet_double_blocks_0_img_attn_qkv": (3 * H, H),
        "lora_unet_single_blocks_0_linear1": (7 * H, H),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q": (4096, 4096),
    }, rank=2, seed=1))


def peft_flux(tmp_path):
    """diffusers/PEFT names: rows of img_attn.qkv and linear1, and norm_out.linear (swapped halves)."""
    tensors = adapter_tensors({
        "transformer.transformer_blocks.0.attn.to_q": (H, H),
        "transformer.transformer_blocks.0.attn.to_k": (H, H),
        "transformer.transformer_blocks.0.attn.to_v": (H, H),
        "transformer.single_transformer_blocks.0.proj_mlp": (4 * H, H),
        "transformer.norm_out.linear": (2 * H, H),
    }, rank=2, seed=2)
    return write(tmp_path / "peft.safetensors", {k: v for k, v in tensors.items() if not k.endswith(".alpha")})


def patched_sum(shapes, keys, specs):
    """The patch engine's float32 sum per key for `specs` (what the merge must reproduce)."""
    plan = build_plan(specs, shapes)
    return {k: plan.delta(k, torch.zeros(shapes[k])) for k in keys if k in plan and k.endswith(".weight")}


def test_kohya_and_peft_flux_merge_into_fused_kohya_modules(tmp_path):
    _f, _c, shapes = reduced("flux-dev", (1, 1))
    a, b = kohya_flux(tmp_path), peft_flux(tmp_path)
    out = tmp_path / "merged.safetensors"
    report = merge_adapters([MergeInput(a, 0.8, 0.6), MergeInput(b, 0.5, 1.0)], str(out), rank_param=8)
    merged = load_adapter(str(out))
    assert set(merged.modules) == {
        "lora_unet_double_blocks_0_img_attn_qkv",  # kohya's rank 2 + to_q/to_k/to_v rank 2 each: rank 8 holds it
        "lora_unet_single_blocks_0_linear1",  # kohya's + proj_mlp on rows 9216..21503
        "lora_unet_final_layer_adaLN_modulation_1",  # norm_out.linear, halves swapped into BFL's order
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q",
    }
    assert all(m.alpha == m.rank for m in merged.modules.values())
    rows = {r["module"]: r for r in report.merged}  # row slices keep the exact factored solver
    assert rows["lora_unet_double_blocks_0_img_attn_qkv"]["rank"] == 8
    assert all(r["method"].startswith("factored") and r["rel_error"] < 1e-5 for r in rows.values())
    assert all("adapter on flux-dev model" in line for line in report.match_lines)
    keys = [w.key for w in canonical_weights("flux-dev").values() if w.key in shapes]
    want = patched_sum(shapes, keys, [AdapterSpec(load_adapter(a), 0.8, 0.6), AdapterSpec(load_adapter(b), 0.5, 1.0)])
    got = patched_sum(shapes, keys, [AdapterSpec(merged)])
    assert set(got) == set(want)
    for key, delta in want.items():
        assert float((got[key] - delta).norm()) <= 1e-5 * float(delta.norm()), key
    # the rows around the split targets stay zero: to_q/to_k/to_v cover qkv, proj_mlp only linear1's MLP rows
    linear1 = "diffusion_model.single_blocks.0.linear1.weight"
    peft_only = patched_sum(shapes, [linear1], [AdapterSpec(load_adapter(b))])
    assert float(peft_only[linear1][:3 * H].abs().max()) == 0 and float(peft_only[linear1][3 * H:].abs().max()) > 0


def test_convert_lycoris_lokr_on_wan_diffusers_names_to_kohya_original_names(tmp_path):
    """SimpleTuner LyCORIS LoKr on Wan (diffusers names, which ComfyUI drops) -> a LoRA ComfyUI loads."""
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for name, shape in (("lycoris_blocks_0_attn1_to_q", (5120, 5120)), ("lycoris_blocks_0_ffn_net_0_proj", (13824, 5120)),
                        ("text_encoder.encoder.block.0.layer.0.SelfAttention.q", (4096, 4096))):
        for suffix, t in module_tensors("lokr", shape, gen, rank=1, factor=4).items():  # kron of rank 4
            tensors[f"{name}.{suffix}"] = t
    src = write(tmp_path / "wan_lokr.safetensors", tensors)
    out = tmp_path / "wan_lora.safetensors"
    report = convert_adapter(src, str(out), rank_param=4)
    converted = load_adapter(str(out))
    assert set(converted.modules) == {"lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_ffn_0",
                                      "text_encoders.umt5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"}
    assert report.total_error < 1e-5
    _f, _c, shapes = reduced("wan-t2v-14b", (1,))
    plan = build_plan([AdapterSpec(converted)], shapes)
    assert plan.reports[0].summary().startswith("wan") and not plan.reports[0].unmatched


def test_resize_keeps_names_and_block_weights_scale_dit_blocks(tmp_path):
    src = write(tmp_path / "qwen.safetensors", adapter_tensors({
        "lora_unet_transformer_blocks_0_attn_to_q": (H, H), "lora_unet_transformer_blocks_1_img_mlp_net_2": (H, 4 * H),
    }, rank=4, seed=5))
    out = tmp_path / "small.safetensors"
    resize_adapter(src, str(out), rank_param=2)
    small = load_adapter(str(out))
    assert set(small.modules) == {"lora_unet_transformer_blocks_0_attn_to_q", "lora_unet_transformer_blocks_1_img_mlp_net_2"}
    assert {m.rank for m in small.modules.values()} == {2}
    report = merge_adapters([MergeInput(src, 1.0, 1.0, "b01=0")], None, dry_run=True)
    assert [r["module"] for r in report.merged] == ["lora_unet_transformer_blocks_0_attn_to_q"]


def test_adapters_of_different_families_or_variants_are_refused(tmp_path):
    flux = kohya_flux(tmp_path)
    wan = write(tmp_path / "wan.safetensors", adapter_tensors({"lora_unet_blocks_0_self_attn_q": (5120, 5120)}, rank=1))
    with pytest.raises(ArchitectureMismatchError, match="different architectures"):
        merge_adapters([MergeInput(flux), MergeInput(wan)], None, dry_run=True)
    fill = write(tmp_path / "fill.safetensors", adapter_tensors({"lora_unet_img_in": (H, 384)}, rank=1, seed=1))
    depth = write(tmp_path / "depth.safetensors", adapter_tensors({"lora_unet_img_in": (H, 128)}, rank=1, seed=1))
    with pytest.raises(ArchitectureMismatchError, match="fill.safetensors: flux-fill, depth.safetensors: flux-depth"):
        merge_adapters([MergeInput(fill), MergeInput(depth)], None, dry_run=True)
    # a Flux LoRA that could be any variant goes with one that pins flux-dev (img_in 64 wide + guidance_in)
    dev = write(tmp_path / "dev.safetensors", adapter_tensors(
        {"lora_unet_img_in": (H, 64), "lora_unet_guidance_in_in_layer": (H, 256)}, rank=1, seed=1))
    report = merge_adapters([MergeInput(flux), MergeInput(dev)], None, dry_run=True)
    assert all("on flux-dev model" in line for line in report.match_lines)


def test_raw_parameters_are_skipped_with_the_reason(tmp_path):
    src = write(tmp_path / "wan_diff.safetensors", {
        "diffusion_model.blocks.0.modulation.diff": torch.randn(1, 6, 5120) * 0.01,
        **adapter_tensors({"diffusion_model.blocks.0.self_attn.o": (5120, 5120)}, rank=1, seed=1)})
    report = merge_adapters([MergeInput(src)], None, rank_param=1, dry_run=True)
    assert [r["module"] for r in report.merged] == ["lora_unet_blocks_0_self_attn_o"]
    assert any("raw parameter" in r["skipped"] for r in report.skipped)


def test_read_weight_assembles_fused_rows_from_a_diffusers_folder():
    """A diffusers transformer stores img_attn.qkv as to_q/to_k/to_v and final_layer's modulation swapped."""
    family, cfg = variant_config("flux-dev")
    cfg = FAMILIES[family].at_depth(cfg, replace(cfg, blocks=(1, 1)))
    model = ModelLayout("flux-dev [1+1 blocks]", "diffusers", frozenset({"diffusion_model"}), family, cfg)
    gen = torch.Generator().manual_seed(0)
    src = {f"transformer.transformer_blocks.0.attn.to_{x}.weight": torch.randn(H, H, generator=gen) for x in "qkv"}
    src["transformer.norm_out.linear.weight"] = torch.randn(2 * H, H, generator=gen)
    weights = canonical_weights(model)
    qkv = read_weight(src, model, weights["diffusion_model.double_blocks.0.img_attn.qkv.weight"])
    assert torch.equal(qkv, torch.cat([src[f"transformer.transformer_blocks.0.attn.to_{x}.weight"] for x in "qkv"]))
    mod = read_weight(src, model, weights["diffusion_model.final_layer.adaLN_modulation.1.weight"])
    scale, shift = src["transformer.norm_out.linear.weight"].chunk(2)
    assert torch.equal(mod, torch.cat([shift, scale]))
