"""map_adapter / detect_model / detect_adapter on DiTs: every naming scheme, full-size maps,
detection of families and variants, and refusals between families and variants.

Shapes only (full size, no weight allocated) except the refusal tests, which check that a
few real tensors of the model stay bit-identical.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from dit_adapters import (
    DIFFUSERS_SCHEMES,
    NATIVE_SCHEMES,
    adapter_tensors,
    diffusers_modules,
    modules_for,
    native_modules,
)
from keymap_adapters import lora_modules

from lycoris_core import ArchitectureMismatchError, LycorisError, load_adapter
from lycoris_core.keymap import (
    DIT_SPACES,
    FAMILIES,
    detect_adapter,
    detect_model,
    dit_table,
    is_text_part,
    map_adapter,
    state_shapes,
    variant_config,
)
from lycoris_core.patch import AdapterSpec, WeightPatcher

PREFIX = {"comfy": "diffusion_model.", "bare": "", "checkpoint": "model.diffusion_model.", "diffusers": "transformer."}

# (variant, adapter module name, expected key in ComfyUI's space, rows of it or None); the names are
# the reference's examples per trainer (dit-architectures.md §1-7)
EXAMPLES = [
    # Flux: kohya, ComfyUI-native, diffusers/PEFT, SimpleTuner LyCORIS, OneTrainer, USO, XLabs, fal, DiffSynth
    ("flux-dev", "lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv.weight", None),
    ("flux-dev", "lora_unet_single_blocks_0_linear1", "single_blocks.0.linear1.weight", None),
    ("flux-dev", "lora_unet_single_blocks_0_modulation_lin", "single_blocks.0.modulation.lin.weight", None),
    ("flux-dev", "lora_unet_time_in_in_layer", "time_in.in_layer.weight", None),
    ("flux-dev", "lora_unet_guidance_in_out_layer", "guidance_in.out_layer.weight", None),
    ("flux-dev", "lora_unet_img_in", "img_in.weight", None),
    ("flux-dev", "diffusion_model.double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.qkv.weight", None),
    ("flux-dev", "transformer.single_transformer_blocks.0.attn.to_q", "single_blocks.0.linear1.weight", (0, 3072)),
    ("flux-dev", "transformer.single_transformer_blocks.0.attn.to_v", "single_blocks.0.linear1.weight", (6144, 3072)),
    ("flux-dev", "transformer.transformer_blocks.0.attn.add_k_proj", "double_blocks.0.txt_attn.qkv.weight", (3072, 3072)),
    ("flux-dev", "transformer.single_transformer_blocks.0.proj_mlp", "single_blocks.0.linear1.weight", (9216, 12288)),
    ("flux-dev", "transformer.transformer_blocks.3.ff_context.net.2", "double_blocks.3.txt_mlp.2.weight", None),
    ("flux-dev", "transformer.time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer.weight", None),
    ("flux-dev", "lycoris_transformer_blocks_0_attn_to_q", "double_blocks.0.img_attn.qkv.weight", (0, 3072)),
    ("flux-dev", "lycoris_single_transformer_blocks_7_proj_mlp", "single_blocks.7.linear1.weight", (9216, 12288)),
    ("flux-dev", "lora_transformer_transformer_blocks_0_attn_to_q", "double_blocks.0.img_attn.qkv.weight", (0, 3072)),
    ("flux-dev", "lora_transformer_single_transformer_blocks_0_proj_mlp", "single_blocks.0.linear1.weight", (9216, 12288)),
    ("flux-dev", "diffusion_model.single_blocks.0.linear1_qkv", "single_blocks.0.linear1.weight", (0, 9216)),
    ("flux-dev", "double_blocks.0.processor.qkv_lora1", "double_blocks.0.img_attn.qkv.weight", None),
    ("flux-dev", "double_blocks.0.processor.qkv_lora2", "double_blocks.0.txt_attn.qkv.weight", None),
    ("flux-dev", "double_blocks.18.processor.proj_lora2", "double_blocks.18.txt_attn.proj.weight", None),
    ("flux-dev", "single_blocks.37.processor.qkv", "single_blocks.37.linear1.weight", (0, 9216)),
    ("flux-dev", "double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.qkv.weight", None),
    ("flux-dev", "base_model.model.double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.qkv.weight", None),
    ("flux-dev", "transformer_blocks.0.attn.to_q", "double_blocks.0.img_attn.qkv.weight", (0, 3072)),
    ("flux-dev", "transformer.base_model.model.transformer_blocks.0.attn.to_k", "double_blocks.0.img_attn.qkv.weight",
     (3072, 3072)),
    ("flux-dev", "lora_unet_double_blocks_0_img_attn_norm_query_norm", "double_blocks.0.img_attn.norm.query_norm.scale",
     None),
    ("chroma", "lora_unet_distilled_guidance_layer_layers_0_in_layer",
     "distilled_guidance_layer.layers.0.in_layer.weight", None),
    ("chroma", "transformer.distilled_guidance_layer.layers.4.linear_2",
     "distilled_guidance_layer.layers.4.out_layer.weight", None),
    # SD3 / 3.5: kohya, ComfyUI, diffusers, raw PEFT, OneTrainer, SimpleTuner LyCORIS (attn2)
    ("sd3.5-medium", "lora_unet_joint_blocks_0_x_block_attn_qkv", "joint_blocks.0.x_block.attn.qkv.weight", None),
    ("sd3.5-medium", "lora_unet_joint_blocks_23_context_block_adaLN_modulation_1",
     "joint_blocks.23.context_block.adaLN_modulation.1.weight", None),
    ("sd3.5-medium", "diffusion_model.joint_blocks.0.context_block.mlp.fc1", "joint_blocks.0.context_block.mlp.fc1.weight",
     None),
    ("sd3.5-medium", "transformer.transformer_blocks.0.attn.to_q", "joint_blocks.0.x_block.attn.qkv.weight", (0, 1536)),
    ("sd3.5-medium", "base_model.model.transformer_blocks.0.attn.add_k_proj",
     "joint_blocks.0.context_block.attn.qkv.weight", (1536, 1536)),
    ("sd3.5-medium", "lora_transformer_transformer_blocks_0_attn_to_v", "joint_blocks.0.x_block.attn.qkv.weight",
     (3072, 1536)),
    ("sd3.5-medium", "lycoris_transformer_blocks_3_attn2_to_q", "joint_blocks.3.x_block.attn2.qkv.weight", (0, 1536)),
    ("sd3.5-large", "transformer.transformer_blocks.37.attn.add_v_proj", "joint_blocks.37.context_block.attn.qkv.weight",
     (4864, 2432)),
    # Qwen-Image: DiffSynth (.default), diffusers, ai-toolkit, musubi, SimpleTuner
    ("qwen-image", "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_q.weight", None),
    ("qwen-image", "transformer.transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.0.img_mlp.net.0.proj.weight",
     None),
    ("qwen-image", "diffusion_model.transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_k_proj.weight",
     None),
    ("qwen-image", "lora_unet_transformer_blocks_0_attn_to_q", "transformer_blocks.0.attn.to_q.weight", None),
    ("qwen-image", "lycoris_transformer_blocks_59_txt_mod_1", "transformer_blocks.59.txt_mod.1.weight", None),
    # Wan: ComfyUI/ai-toolkit, musubi, Wan-Fun, diffusers, SimpleTuner (ComfyUI#8285), bare (#11141), mixed (#869)
    ("wan2.1-i2v-14b", "diffusion_model.blocks.0.self_attn.q", "blocks.0.self_attn.q.weight", None),
    ("wan2.1-i2v-14b", "diffusion_model.blocks.0.cross_attn.v_img", "blocks.0.cross_attn.v_img.weight", None),
    ("wan2.1-i2v-14b", "lora_unet_blocks_0_cross_attn_k_img", "blocks.0.cross_attn.k_img.weight", None),
    ("wan2.1-i2v-14b", "lora_unet_blocks_0_ffn_0", "blocks.0.ffn.0.weight", None),
    ("wan2.1-i2v-14b", "lora_unet__blocks_0_cross_attn_k", "blocks.0.cross_attn.k.weight", None),
    ("wan2.1-i2v-14b", "transformer.blocks.0.attn1.to_q", "blocks.0.self_attn.q.weight", None),
    ("wan2.1-i2v-14b", "transformer.blocks.0.attn2.add_k_proj", "blocks.0.cross_attn.k_img.weight", None),
    ("wan2.1-i2v-14b", "transformer.blocks.0.ffn.net.0.proj", "blocks.0.ffn.0.weight", None),
    ("wan2.1-i2v-14b", "lycoris_blocks_14_attn2_to_q", "blocks.14.cross_attn.q.weight", None),
    ("wan2.1-i2v-14b", "lycoris_blocks_14_ffn_net_0_proj", "blocks.14.ffn.0.weight", None),
    ("wan2.1-i2v-14b", "blocks.18.self_attn.k", "blocks.18.self_attn.k.weight", None),
    ("wan2.1-i2v-14b", "lora_unet_blocks_0.cross_attn.k", "blocks.0.cross_attn.k.weight", None),
    ("wan2.1-i2v-14b", "diffusion_model.head.head", "head.head.weight", None),
    ("wan2.1-i2v-14b", "diffusion_model.blocks.0.cross_attn.norm_k_img", "blocks.0.cross_attn.norm_k_img.weight", None),
    ("wan2.1-i2v-14b", "diffusion_model.blocks.0.modulation", "blocks.0.modulation", None),
    ("wan2.1-i2v-14b", "transformer.condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1.weight", None),
    # HunyuanVideo: diffusion-pipe, musubi (Tencent names), ComfyUI, Tencent I2V trainer, diffusers
    ("hunyuan-video", "transformer.double_blocks.0.img_attn_qkv", "double_blocks.0.img_attn.qkv.weight", None),
    ("hunyuan-video", "transformer.single_blocks.0.linear1", "single_blocks.0.linear1.weight", None),
    ("hunyuan-video", "transformer.double_blocks.0.img_mlp.fc1", "double_blocks.0.img_mlp.0.weight", None),
    ("hunyuan-video", "diffusion_model.double_blocks.0.img_mod.linear", "double_blocks.0.img_mod.lin.weight", None),
    ("hunyuan-video", "lora_unet_double_blocks_0_img_mlp_fc1", "double_blocks.0.img_mlp.0.weight", None),
    ("hunyuan-video", "lora_unet_single_blocks_39_modulation_linear", "single_blocks.39.modulation.lin.weight", None),
    ("hunyuan-video", "Hunyuan_video_I2V_lora_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv.weight", None),
    ("hunyuan-video", "transformer.transformer_blocks.19.attn.to_q", "double_blocks.19.img_attn.qkv.weight", (0, 3072)),
    ("hunyuan-video", "transformer.context_embedder.token_refiner.refiner_blocks.1.attn.to_k",
     "txt_in.individual_token_refiner.blocks.1.self_attn.qkv.weight", (3072, 3072)),
    ("hunyuan-video", "lora_unet_txt_in_individual_token_refiner_blocks_0_mlp_fc1",
     "txt_in.individual_token_refiner.blocks.0.mlp.0.weight", None),
    # Lumina 2: kohya, ComfyUI, diffusers (GQA rows 2304/768/768)
    ("lumina2", "lora_unet_layers_0_attention_qkv", "layers.0.attention.qkv.weight", None),
    ("lumina2", "diffusion_model.layers.0.feed_forward.w1", "layers.0.feed_forward.w1.weight", None),
    ("lumina2", "transformer.layers.0.attn.to_q", "layers.0.attention.qkv.weight", (0, 2304)),
    ("lumina2", "transformer.layers.0.attn.to_k", "layers.0.attention.qkv.weight", (2304, 768)),
    ("lumina2", "transformer.noise_refiner.1.attn.to_v", "noise_refiner.1.attention.qkv.weight", (3072, 768)),
    ("lumina2", "transformer.layers.25.feed_forward.linear_3", "layers.25.feed_forward.w3.weight", None),
    ("lumina2", "transformer.layers.0.norm1.linear", "layers.0.adaLN_modulation.1.weight", None),
    # HiDream: SimpleTuner PEFT and LyCORIS, ai-toolkit, kohya-style
    ("hidream-i1", "transformer.double_stream_blocks.0.block.attn1.to_q", "double_stream_blocks.0.block.attn1.to_q.weight",
     None),
    ("hidream-i1", "lycoris_double_stream_blocks_0_block_attn1_to_q", "double_stream_blocks.0.block.attn1.to_q.weight",
     None),
    ("hidream-i1", "diffusion_model.double_stream_blocks.0.block.ff_i.experts.0.w1",
     "double_stream_blocks.0.block.ff_i.experts.0.w1.weight", None),
    ("hidream-i1", "lora_unet_single_stream_blocks_0_block_attn1_to_q",
     "single_stream_blocks.0.block.attn1.to_q.weight", None),
    # Z-Image: ai-toolkit / diffusion-pipe (ComfyUI#11158), musubi (ComfyUI#11487)
    ("z-image", "diffusion_model.layers.0.attention.to_q", "layers.0.attention.qkv.weight", (0, 3840)),
    ("z-image", "lora_unet_layers_0_attention_to_k", "layers.0.attention.qkv.weight", (3840, 3840)),
    ("z-image", "lora_unet_layers_0_attention_to_out_0", "layers.0.attention.out.weight", None),
]
TEXT_EXAMPLES = [
    ("flux-dev", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
     "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"),
    ("flux-dev", "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
     "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"),
    ("flux-dev", "lora_te2_encoder_block_23_layer_1_DenseReluDense_wo",
     "t5xxl.transformer.encoder.block.23.layer.1.DenseReluDense.wo.weight"),
    ("flux-dev", "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0",
     "t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0.weight"),
    ("flux-dev", "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.layer_norm",
     "t5xxl.transformer.encoder.block.0.layer.0.layer_norm.weight"),
    ("sd3.5-large", "lora_te2_text_model_encoder_layers_31_mlp_fc1",
     "clip_g.transformer.text_model.encoder.layers.31.mlp.fc1.weight"),
    ("sd3.5-large", "lora_te3_encoder_block_0_layer_0_SelfAttention_k",
     "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k.weight"),
    ("sd3.5-large", "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj",
     "clip_g.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight"),
    ("sd3.5-large", "lora_te1_text_projection", "clip_l.transformer.text_projection.weight"),
    ("wan-t2v-14b", "text_encoders.umt5xxl.transformer.encoder.block.5.layer.0.SelfAttention.relative_attention_bias",
     "umt5xxl.transformer.encoder.block.5.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("qwen-image", "text_encoders.qwen25_7b.transformer.model.layers.27.self_attn.k_proj",
     "qwen25_7b.transformer.model.layers.27.self_attn.k_proj.weight"),
    ("hunyuan-video", "text_encoder.text_model.encoder.layers.0.mlp.fc1",
     "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"),
    ("hunyuan-video", "text_encoders.llama.transformer.model.layers.31.mlp.down_proj",
     "llama.transformer.model.layers.31.mlp.down_proj.weight"),
    ("hidream-i1", "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
     "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"),
    ("hidream-i1", "text_encoder_4.model.layers.0.self_attn.q_proj", "llama.transformer.model.layers.0.self_attn.q_proj.weight"),
    ("lumina2", "lora_te_layers_0_self_attn_q_proj", "gemma2_2b.transformer.model.layers.0.self_attn.q_proj.weight"),
    ("chroma", "lora_te1_encoder_block_0_layer_0_SelfAttention_o",
     "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.o.weight"),
]


def _shape_for(shapes, key, rows):
    return (rows[1], *shapes[key][1:]) if rows else shapes[key]


@pytest.mark.parametrize(("variant", "name", "key", "rows"), EXAMPLES)
@pytest.mark.parametrize("space", ["comfy", "checkpoint", "bare"])
def test_named_examples_land_on_their_key_and_rows(variant, name, key, rows, space):
    shapes = state_shapes(variant, space)
    full = PREFIX[space] + key
    module_shape = _shape_for(shapes, full, rows)
    report = map_adapter(modules_for({name: module_shape}), shapes)
    target = report.targets[name]
    assert (target.weight_key, target.rows, target.part, target.source_rows) == (full, rows, "diffusion_model", None)
    assert target.shape == module_shape or module_shape == shapes[full]


@pytest.mark.parametrize(("variant", "name", "key"), TEXT_EXAMPLES)
@pytest.mark.parametrize("space", ["comfy", "checkpoint"])
def test_text_encoder_examples_in_comfy_and_single_file_layouts(variant, name, key, space):
    shapes = state_shapes(variant, space)
    full = ("text_encoders." if space == "checkpoint" else "") + key
    report = map_adapter(modules_for({name: shapes[full]}), shapes)
    target = report.targets[name]
    assert target.weight_key == full and is_text_part(target.part) and target.part == key.split(".")[0]
    # a diffusion-model-only file has no text encoders: the module is not applicable, never an error
    bare = map_adapter(modules_for({name: shapes[full]}), state_shapes(variant, "bare"))
    assert bare.not_applicable == [name] and not bare.refused


def test_diff_b_on_a_qkv_slice_patches_the_bias_rows():
    """ComfyUI derives the bias key of a sliced target from the tuple and drops it; rows of qkv.bias here."""
    name = "transformer.transformer_blocks.2.attn.add_v_proj"
    tensors = {f"{name}.diff": torch.zeros(3072, 3072), f"{name}.diff_b": torch.zeros(3072)}
    report = map_adapter(load_adapter(tensors).modules, state_shapes("flux-dev", "comfy"))
    target = report.targets[name]
    assert (target.weight_key, target.bias_key, target.rows) == (
        "diffusion_model.double_blocks.2.txt_attn.qkv.weight", "diffusion_model.double_blocks.2.txt_attn.qkv.bias",
        (6144, 3072))


# ---- full-size maps: every module, every key space -------------------------------------------

FULL = ("flux-dev", "sd3.5-large", "wan2.1-i2v-14b", "qwen-image")


def _covers_once(pieces, rows):
    spans = sorted(p.source_rows or (0, rows) for p in pieces)
    start = 0
    for begin, length in spans:
        if begin != start:
            return False
        start += length
    return start == rows


@pytest.mark.parametrize("variant", FULL)
def test_full_size_native_names_map_every_module_once_in_every_space(variant):
    natives = native_modules(variant)
    modules = modules_for({NATIVE_SCHEMES["kohya"](n): s for n, s in natives.items()})
    table = dit_table(*variant_config(variant))
    for space in DIT_SPACES:
        shapes = state_shapes(variant, space, ("diffusion_model",))
        report = map_adapter(modules, shapes)
        assert report.mismatched == [] and report.unmatched == [] and report.conflict is None, space
        assert len(report.targets) + len(report.pieces) == len(natives)
        for native, shape in natives.items():
            name = NATIVE_SCHEMES["kohya"](native)
            if space != "diffusers":  # one key, the whole tensor
                target = report.targets[name]
                assert (target.weight_key, target.rows, target.shape) == (
                    PREFIX[space] + table.natives[native].key, None, shape)
            elif name in report.pieces:  # fused natives on diffusers' split modules
                assert _covers_once(report.pieces[name], shape[0]), name
            else:
                assert report.targets[name].rows is None


@pytest.mark.parametrize("variant", FULL)
def test_full_size_diffusers_names_map_every_module_to_one_key_or_row_slice(variant):
    modules_spec = diffusers_modules(variant)
    modules = modules_for({DIFFUSERS_SCHEMES["peft"](d): s for d, s in modules_spec.items()})
    for space in DIT_SPACES:
        shapes = state_shapes(variant, space, ("diffusion_model",))
        report = map_adapter(modules, shapes)
        assert report.mismatched == [] and report.unmatched == [] and report.conflict is None, space
        assert report.summary().endswith(
            f"diffusion_model {len(modules)}/{len(modules)}, te 0/0 matched, 0 shape mismatches"
            + (f", {len(report.pieces)} by row pieces" if report.pieces else ""))
        for name, pieces in report.pieces.items():  # only the (scale, shift) <-> (shift, scale) swaps
            assert space != "diffusers" and len(pieces) == 2 and pieces[0].weight_key == pieces[1].weight_key, name
            assert _covers_once(pieces, modules[name].shape[0])
        for target in report.targets.values():
            assert target.source_rows is None
            assert target.rows is None or space != "diffusers"


@pytest.mark.parametrize("variant", ["flux-dev", "sd3.5-large", "hidream-i1"])
def test_full_size_text_encoders_map_in_comfy_and_checkpoint_layouts(variant):
    family, _ = variant_config(variant)
    kohya = {v: k for k, v in FAMILIES[family].kohya_text.items() if k != "lora_te_"}
    for space in ("comfy", "checkpoint"):
        shapes = state_shapes(variant, space)
        head = "text_encoders." if space == "checkpoint" else ""
        names = {}
        for part in FAMILIES[family].text:
            prefix = f"{head}{part}.transformer."
            for key, shape in shapes.items():
                if key.startswith(prefix) and key.endswith(".weight"):
                    hf = key[len(prefix):-len(".weight")]
                    names[kohya[part] + hf.replace(".", "_") if part in kohya else f"text_encoders.{part}.transformer.{hf}"] = shape
        report = map_adapter(modules_for(names), shapes)
        assert report.mismatched == [] and report.unmatched == [] and len(report.targets) == len(names)
        counts = report.counts
        assert sum(counts[p][0] for p in FAMILIES[family].text) == len(names)


def test_mapping_a_full_flux_adapter_twice_reuses_the_tables():
    """Tables are built once per configuration (lru caches), so a second map is a lookup pass."""
    from lycoris_core.keymap.dit.families import table

    modules = modules_for({DIFFUSERS_SCHEMES["peft"](d): s for d, s in diffusers_modules("flux-dev").items()})
    shapes = state_shapes("flux-dev", "comfy")
    map_adapter(modules, shapes)
    before = table.cache_info().misses
    map_adapter(modules, shapes)
    assert table.cache_info().misses == before


# ---- detection ------------------------------------------------------------------------------

ALL_VARIANTS = [v for f in FAMILIES.values() for v in f.variants]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("space", DIT_SPACES)
def test_detect_model_finds_variant_space_and_parts(variant, space):
    family, _ = variant_config(variant)
    layout = detect_model(state_shapes(variant, space))
    parts = {"diffusion_model"} | (set(FAMILIES[family].text) if space in ("comfy", "checkpoint") else set())
    assert (layout.arch, layout.family, layout.space, set(layout.parts)) == (variant, family, space, parts)


@pytest.mark.parametrize("variant", ["flux-dev", "chroma", "sd3.5-large", "wan2.1-t2v-1.3b", "qwen-image",
                                     "hunyuan-video", "lumina2", "hidream-i1"])
def test_detect_model_from_text_encoders_alone(variant):
    """ComfyUI's CLIP object of a DiT (no diffusion model keys): the family, from its encoders."""
    family, _ = variant_config(variant)
    layout = detect_model(state_shapes(variant, "comfy", tuple(FAMILIES[family].text)))
    assert layout.family == family and layout.parts == frozenset(FAMILIES[family].text)


def _blocks_only(natives, keep):
    return {NATIVE_SCHEMES["kohya"](n): s for n, s in natives.items() if keep(n) and len(s) >= 2}


@pytest.mark.parametrize(("variant", "keep", "expected"), [
    ("flux-dev", lambda n: True, "flux-dev"),  # guidance_in and a 64-wide img_in pin dev
    ("flux-dev", lambda n: "_blocks." in n, "flux"),  # blocks only: dev, schnell, fill, depth alike
    ("flux-fill", lambda n: n.startswith("img_in"), "flux-fill"),  # the 384-wide img_in
    ("chroma", lambda n: n.startswith("distilled_guidance_layer"), "chroma"),
    ("sd3-medium", lambda n: True, "sd3-medium"),  # 6h x_block modulation in blocks 0-12
    ("sd3.5-medium", lambda n: ".attn2." in n, "sd3.5-medium"),
    ("sd3.5-large", lambda n: ".attn." in n, "sd3.5-large"),  # 2432 wide
    ("sd3.5-medium", lambda n: ".attn.qkv" in n, "sd3"),  # 3 medium and 3.5 medium alike
    ("wan2.1-i2v-14b", lambda n: "_img" in n, "wan2.1-i2v-14b"),
    ("wan2.1-t2v-1.3b", lambda n: n.startswith("blocks."), "wan2.1-t2v-1.3b"),  # 1536 wide
    ("wan2.2-ti2v-5b", lambda n: n.startswith("blocks."), "wan2.2-ti2v-5b"),  # 3072 wide
    ("wan-t2v-14b", lambda n: n.startswith("patch_embedding"), "wan-t2v-14b"),  # 16 input channels
    ("wan-t2v-14b", lambda n: n.startswith("blocks.") and "_img" not in n, "wan"),  # T2V and I2V 14B alike
    ("qwen-image", lambda n: "_mlp." in n, "qwen-image"),
    ("hunyuan-video", lambda n: "double_blocks.19." in n, "hunyuan-video"),  # Flux has 19 double blocks
    ("hunyuan-video", lambda n: n.startswith("txt_in."), "hunyuan-video"),
    ("lumina2", lambda n: "attention.qkv" in n, "lumina2"),
    ("z-image", lambda n: "attention.qkv" in n, "z-image"),  # same names as Lumina 2, 3840 wide
    ("hidream-i1", lambda n: "ff_i" in n, "hidream-i1"),
])
def test_detect_adapter_family_and_variant_from_names_and_shapes(variant, keep, expected):
    adapter = modules_for(_blocks_only(native_modules(variant), keep))
    assert detect_adapter(adapter) == expected


def test_detect_adapter_hunyuan_original_names_and_metadata_tie_breaks():
    musubi = {"lora_unet_double_blocks_0_img_mlp_fc1": (12288, 3072), "lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072)}
    assert detect_adapter(modules_for(musubi)) == "hunyuan-video"
    flux_like = {"lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072)}
    assert detect_adapter(modules_for(flux_like)) == "flux"  # ambiguous: the earlier family
    assert detect_adapter(modules_for(flux_like), metadata={"modelspec.architecture": "chroma/lora"}) == "chroma"
    # a schnell LoRA has dev's names minus guidance_in: only its metadata says schnell
    assert detect_adapter(modules_for(flux_like), metadata={"modelspec.architecture": "flux-1-schnell/lora"}) == \
        "flux-schnell"
    assert detect_adapter(modules_for(flux_like), model=detect_model(state_shapes("hunyuan-video", "comfy"))) == \
        "hunyuan-video"


def test_chroma_metadata_tells_a_chroma_lora_from_a_flux_one(tmp_path):
    """Same names, same shapes: kohya's modelspec.architecture (read from the file) decides, and refuses on Flux."""
    from safetensors.torch import save_file

    names = {"lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072), "lora_unet_single_blocks_3_linear2": (3072, 15360)}
    path = tmp_path / "chroma.safetensors"
    save_file(adapter_tensors(names), str(path), {"modelspec.architecture": "chroma/lora"})
    adapter = load_adapter(path)
    with pytest.raises(ArchitectureMismatchError, match="chroma adapter .* metadata says 'chroma/lora'"):
        map_adapter(adapter.modules, state_shapes("flux-dev", "comfy"))
    on_chroma = map_adapter(adapter.modules, state_shapes("chroma", "comfy"))
    assert on_chroma.adapter_arch == "chroma" and on_chroma.matched == 2
    plain = load_adapter(adapter_tensors(names))  # no metadata: a Flux LoRA on Flux
    assert map_adapter(plain.modules, state_shapes("flux-dev", "comfy")).adapter_arch == "flux"


def test_detect_adapter_keeps_sd_answers_for_sd_adapters():
    clip_only = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}
    assert detect_adapter(lora_modules(clip_only)) == "sd1"
    # ... but on a Flux model the same CLIP-L module is Flux's clip_l
    report = map_adapter(lora_modules(clip_only), state_shapes("flux-dev", "comfy"))
    assert report.adapter_arch == "flux" and report.targets["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].part == "clip_l"


def test_summary_line_for_a_flux_peft_adapter():
    """Every linear of the 19 double and 38 single blocks in diffusers names: 19 x 14 + 38 x 6 = 494."""
    d = {n: s for n, s in diffusers_modules("flux-dev").items() if len(s) >= 2 and "blocks." in n}
    assert len(d) == 494
    report = map_adapter(modules_for({f"transformer.{k}": v for k, v in d.items()}), state_shapes("flux-dev", "comfy"))
    assert report.summary() == "flux adapter on flux-dev model: diffusion_model 494/494, te 0/0 matched, 0 shape mismatches"
    assert report.blocks_touched() == [*(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38))]


def test_reduced_depth_models_are_detected_and_mapped():
    """A Flux with 2 double and 3 single blocks: its own table, its own adapters, nothing refused."""
    from dataclasses import replace

    from lycoris_core.keymap import dit_state_shapes

    cfg = replace(variant_config("flux-dev")[1], blocks=(2, 3))
    shapes = dit_state_shapes("flux", cfg, "comfy")
    layout = detect_model(shapes)
    assert (layout.arch, layout.config) == ("flux-dev [2+3 blocks]", cfg)
    table = dit_table("flux", cfg)
    modules = modules_for({f"transformer.{d}": (sum(s[3] for s in segs), *table.natives[segs[0][0]].weight[1:])
                           for d, (_leaf, segs) in table.diffusers.items()})
    report = map_adapter(modules, shapes)
    assert report.unmatched == [] and report.mismatched == [] and report.matched == len(modules)
    assert report.summary().startswith("flux-dev adapter on flux-dev [2+3 blocks] model")  # guidance_in pins dev


# ---- refusals -------------------------------------------------------------------------------

FAMILY_ADAPTERS = {  # one typical full-size adapter per family: (variant, scheme, which natives)
    "flux": ("flux-dev", "kohya", lambda n: True),
    "chroma": ("chroma", "comfy", lambda n: True),
    "sd3": ("sd3.5-large", "kohya", lambda n: True),
    "wan": ("wan2.1-i2v-14b", "kohya", lambda n: n.startswith("blocks.")),
    "qwen_image": ("qwen-image", "bare", lambda n: True),
    "hunyuan_video": ("hunyuan-video", "comfy", lambda n: True),
    "lumina2": ("lumina2", "kohya", lambda n: True),
    "hidream": ("hidream-i1", "comfy", lambda n: True),
    "z_image": ("z-image", "kohya", lambda n: True),
}
_CACHE: dict = {}


def _family_adapter(family):
    if family not in _CACHE:
        if family == "sdxl":
            from lycoris_core.keymap import modules as sd_modules

            names = {f"lora_unet_{s.ldm.replace('.', '_')}": s.weight for s in sd_modules("sdxl")
                     if s.part == "unet" and ".attentions." in s.name and len(s.weight) >= 2}
        else:
            variant, scheme, keep = FAMILY_ADAPTERS[family]
            names = {NATIVE_SCHEMES[scheme](n): s for n, s in native_modules(variant).items() if keep(n) and len(s) >= 2}
        _CACHE[family] = load_adapter(adapter_tensors(names))
    return _CACHE[family]


MODEL_OF = {f: FAMILY_ADAPTERS[f][0] for f in FAMILY_ADAPTERS} | {"sdxl": "sdxl"}
LABEL = {"flux": "flux-dev", "chroma": "chroma", "sd3": "sd3.5-large", "wan": "wan2.1-i2v-14b",
         "qwen_image": "qwen-image", "hunyuan_video": "hunyuan-video", "lumina2": "lumina2", "hidream": "hidream-i1",
         "z_image": "z-image", "sdxl": "sdxl"}


def _few_real_weights(shapes, count=12):
    """Small real tensors for some of the model's keys (1-D ones): enough to see any write."""
    gen = torch.Generator().manual_seed(3)
    keys = [k for k, s in sorted(shapes.items()) if len(s) == 1][:count]
    return {k: torch.randn(shapes[k], generator=gen).to(torch.bfloat16) for k in keys}


@pytest.mark.parametrize(("adapter_family", "model_family"),
                         [(a, m) for a, m in itertools.permutations(MODEL_OF, 2)])
def test_an_adapter_of_another_family_is_refused_naming_both_and_the_model_is_untouched(adapter_family, model_family):
    adapter = _family_adapter(adapter_family)
    shapes = state_shapes(MODEL_OF[model_family], "comfy")
    weights = _few_real_weights(shapes)
    before = {k: v.clone() for k, v in weights.items()}
    with pytest.raises(ArchitectureMismatchError) as caught:
        WeightPatcher(weights, model_shapes=shapes).apply([AdapterSpec(adapter, 0.8, 0.8)])
    message = str(caught.value)
    assert isinstance(caught.value, LycorisError)
    assert f"{LABEL[adapter_family]} adapter" in message, message
    assert f"{MODEL_OF[model_family]} model" in message and "allow_partial" in message
    assert all(torch.equal(weights[k], before[k]) for k in weights)


@pytest.mark.parametrize(("adapter_variant", "keep", "model_variant"), [
    ("wan2.1-i2v-14b", lambda n: n.startswith("blocks."), "wan-t2v-14b"),  # a Wan 2.1 I2V LoRA on Wan 2.2 T2V
    ("wan2.1-i2v-14b", lambda n: n.startswith("blocks."), "wan2.2-i2v-a14b"),
    ("flux-dev", lambda n: True, "flux-schnell"),  # trained guidance_in: schnell has none
    ("sd3.5-medium", lambda n: ".attn" in n, "sd3-medium"),  # x_block.attn2 in blocks 0-12
])
def test_an_adapter_of_another_variant_is_refused_naming_both(adapter_variant, keep, model_variant):
    adapter = modules_for(_blocks_only(native_modules(adapter_variant), keep))
    shapes = state_shapes(model_variant, "comfy")
    with pytest.raises(ArchitectureMismatchError) as caught:
        map_adapter(adapter, shapes)
    message = str(caught.value)
    assert f"{adapter_variant} adapter" in message and f"{model_variant} model" in message, message
    assert f"exist only in {adapter_variant}" in message
    report = map_adapter(adapter, shapes, allow_partial=True)
    assert report.refused and report.conflict and report.mismatched == []
    assert all("_img" in n or "guidance_in" in n or "attn2" in n for n in report.unmatched)
    assert report.matched == len(adapter) - len(report.unmatched)


@pytest.mark.parametrize(("adapter_variant", "keep", "model_variant"), [
    ("wan-t2v-14b", lambda n: n.startswith("blocks."), "wan2.1-i2v-14b"),  # T2V LoRAs run on I2V models
    ("flux-schnell", lambda n: True, "flux-dev"),
    ("flux-dev", lambda n: "_blocks." in n, "flux-schnell"),  # block LoRAs of dev on schnell
    ("sd3-medium", lambda n: ".attn.qkv" in n, "sd3.5-medium"),
])
def test_compatible_variants_are_not_refused(adapter_variant, keep, model_variant):
    adapter = modules_for(_blocks_only(native_modules(adapter_variant), keep))
    report = map_adapter(adapter, state_shapes(model_variant, "comfy"))
    assert report.unmatched == [] and report.conflict is None and report.matched == len(adapter)


def test_unknown_model_and_empty_shapes():
    adapter = modules_for({"lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072)})
    with pytest.raises(ArchitectureMismatchError, match="unknown model"):
        map_adapter(adapter, {"some.other.weight": (8, 8)})
    empty = map_adapter(adapter, {})
    assert empty.not_applicable == ["lora_unet_double_blocks_0_img_attn_qkv"] and not empty.refused
