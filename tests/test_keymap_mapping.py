"""map_adapter / detect_model / detect_adapter with small real adapters on SD-size key tables."""

from __future__ import annotations

import pytest
from keymap_adapters import SCHEMES, full_modules, lora_modules

from lycoris_core import ArchitectureMismatchError, LycorisError
from lycoris_core.keymap import detect_adapter, detect_model, map_adapter, modules, state_shapes
from lycoris_core.keymap.spaces import space_table

ARCHS = ("sd1", "sd2", "sdxl")
SPACES = ("comfy", "checkpoint", "diffusers")
PARTS = {"sd1": ("unet", "te1"), "sd2": ("unet", "te1"), "sdxl": ("unet", "te1", "te2")}
SCHEMES_FOR = {
    "sd1": [
        "kohya_single_te",
        "kohya",
        "kohya_sgm",
        "lycoris_generic",
        "diffusers",
        "peft_unet",
        "comfy_generic",
        "transformers5_flat",
    ],
    "sd2": ["kohya_single_te", "kohya_sgm", "diffusers", "peft_unet"],
    "sdxl": [
        "kohya",
        "kohya_sgm",
        "lycoris_generic",
        "diffusers",
        "peft_unet",
        "comfy_generic",
        "transformers5_flat",
    ],
}


def named(arch: str, scheme: str, parts=None):
    """{adapter name: spec} for every module of `arch` the scheme can name."""
    rules = SCHEMES[scheme]
    return {
        rules[s.part](s.name, s.ldm): s
        for s in modules(arch)
        if s.part in rules and s.part in (parts or PARTS[arch])
    }


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize(("arch", "scheme"), [(a, s) for a in ARCHS for s in SCHEMES_FOR[a]])
def test_every_module_of_every_scheme_lands_on_its_slot(arch, scheme, space):
    specs = named(arch, scheme)
    adapter = lora_modules({name: spec.weight for name, spec in specs.items()})
    report = map_adapter(adapter, state_shapes(arch, space))
    slots = space_table(arch, space).slots
    expected_missing = sorted(n for n, s in specs.items() if (s.part, s.name) not in slots)
    assert sorted(report.unmatched) == expected_missing  # e.g. SD2 diffusers' dropped layer 23
    assert report.mismatched == [] and report.not_applicable == []
    assert report.adapter_arch == report.model_arch == arch
    for name, target in report.targets.items():
        spec, slot = specs[name], slots[(specs[name].part, specs[name].name)]
        assert (target.weight_key, target.rows, target.transposed) == (
            slot.weight_key,
            slot.rows,
            slot.transposed,
        )
        assert (target.shape, target.block, target.part) == (spec.weight, spec.block, spec.part)
    assert len(report.targets) == len(specs) - len(expected_missing)


@pytest.mark.parametrize(
    ("arch", "space", "name", "key", "rows"),
    [
        (
            "sd1",
            "comfy",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            None,
        ),
        (
            "sd1",
            "diffusers",
            "lora_unet_input_blocks_1_1_proj_in",
            "unet.down_blocks.0.attentions.0.proj_in.weight",
            None,
        ),
        (
            "sd1",
            "comfy",
            "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor.to_out",
            "diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_out.0.weight",
            None,
        ),
        (
            "sd1",
            "comfy",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_k",
            "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight",
            None,
        ),
        (
            "sd1",
            "checkpoint",
            "base_model.model.down_blocks.0.resnets.0.conv1",
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
            None,
        ),
        (
            "sd1",
            "diffusers",
            "diffusion_model.output_blocks.2.1.conv",
            "unet.up_blocks.0.upsamplers.0.conv.weight",
            None,
        ),
        (
            "sd1",
            "comfy",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            None,
        ),
        (
            "sd1",
            "checkpoint",
            "text_encoder.text_model.encoder.layers.4.self_attn.to_v",
            "cond_stage_model.transformer.text_model.encoder.layers.4.self_attn.v_proj.weight",
            None,
        ),
        (
            "sd2",
            "checkpoint",
            "lora_te_text_model_encoder_layers_3_self_attn_k_proj",
            "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight",
            (1024, 1024),
        ),
        (
            "sd2",
            "comfy",
            "lora_te_text_model_encoder_layers_3_self_attn_k_proj",
            "clip_h.transformer.text_model.encoder.layers.3.self_attn.k_proj.weight",
            None,
        ),
        (
            "sd2",
            "checkpoint",
            "lora_te1_text_model_encoder_layers_23_mlp_fc2",
            "cond_stage_model.model.transformer.resblocks.23.mlp.c_proj.weight",
            None,
        ),
        (
            "sdxl",
            "checkpoint",
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
            None,
        ),
        (
            "sdxl",
            "comfy",
            "lycoris_mid_block_attentions_0_proj_out",
            "diffusion_model.middle_block.1.proj_out.weight",
            None,
        ),
        (
            "sdxl",
            "diffusers",
            "lora_unet_label_emb_0_0",
            "unet.add_embedding.linear_1.weight",
            None,
        ),
        (
            "sdxl",
            "checkpoint",
            "lora_te1_text_model_encoder_layers_11_mlp_fc2",
            "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
            None,
        ),
        (
            "sdxl",
            "checkpoint",
            "lora_te2_text_model_encoder_layers_31_self_attn_v_proj",
            "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
            (2560, 1280),
        ),
        (
            "sdxl",
            "checkpoint",
            "lora_te2_text_model_encoder_layers_0_mlp_fc1",
            "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight",
            None,
        ),
        (
            "sdxl",
            "comfy",
            "text_encoder_2.text_model.encoder.layers.2.self_attn.out_proj",
            "clip_g.transformer.text_model.encoder.layers.2.self_attn.out_proj.weight",
            None,
        ),
        (
            "sdxl",
            "comfy",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            None,
        ),
        (
            "sdxl",
            "comfy",
            "text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1",
            "clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
            None,
        ),
        (
            "sdxl",
            "comfy",
            "lora_te2_text_projection",
            "clip_g.transformer.text_projection.weight",
            None,
        ),
    ],
)
def test_named_examples(arch, space, name, key, rows):
    stored = state_shapes(arch, space)[key]
    shape = (rows[1], *stored[1:]) if rows else stored
    report = map_adapter(lora_modules({name: shape}), state_shapes(arch, space))
    target = report.targets[name]
    assert (target.weight_key, target.rows) == (key, rows)


def test_peft_text_module_picks_the_encoder_its_shape_fits():
    """`base_model.model.` does not say which SDXL text encoder; the shape does."""
    name = "base_model.model.text_model.encoder.layers.0.mlp.fc1"
    shapes = state_shapes("sdxl", "comfy")
    for shape, prefix in (((3072, 768), "clip_l."), ((5120, 1280), "clip_g.")):
        target = map_adapter(lora_modules({name: shape}), shapes).targets[name]
        assert (
            target.weight_key == f"{prefix}transformer.text_model.encoder.layers.0.mlp.fc1.weight"
        )


def test_transposed_openclip_projection_is_flagged():
    name = "lora_te2_text_projection"
    report = map_adapter(lora_modules({name: (1280, 1280)}), state_shapes("sdxl", "checkpoint"))
    target = report.targets[name]
    assert (target.weight_key, target.transposed) == (
        "conditioner.embedders.1.model.text_projection",
        True,
    )
    comfy = map_adapter(lora_modules({name: (1280, 1280)}), state_shapes("sdxl", "comfy"))
    assert comfy.targets[name].transposed is False


@pytest.mark.parametrize(
    ("space", "weight", "bias", "rows"),
    [
        (
            "comfy",
            "clip_h.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight",
            "clip_h.transformer.text_model.encoder.layers.0.self_attn.v_proj.bias",
            None,
        ),
        (
            "checkpoint",
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias",
            (2048, 1024),
        ),
    ],
)
def test_bias_key_for_modules_with_a_bias_delta(space, weight, bias, rows):
    name = "lora_te_text_model_encoder_layers_0_self_attn_v_proj"
    shapes = state_shapes("sd2", space)
    target = map_adapter(full_modules({name: (1024, 1024)}), shapes).targets[name]
    assert (target.weight_key, target.bias_key, target.rows) == (weight, bias, rows)
    assert map_adapter(lora_modules({name: (1024, 1024)}), shapes).targets[name].bias_key is None


def test_bias_key_absent_when_the_model_weight_has_no_bias():
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # to_q: no bias
    target = map_adapter(full_modules({name: (320, 320)}), state_shapes("sd1", "comfy")).targets[
        name
    ]
    assert target.bias_key is None


def test_norm_module_targets_the_groupnorm_weight_and_bias():
    name = "lora_unet_down_blocks_0_resnets_0_norm1"
    target = map_adapter(lora_modules({name: (320,)}), state_shapes("sd1", "comfy")).targets[name]
    prefix = "diffusion_model.input_blocks.1.0.in_layers.0"
    assert (target.weight_key, target.bias_key, target.block) == (
        f"{prefix}.weight",
        f"{prefix}.bias",
        "IN01",
    )


def test_linear_lora_fits_sd1_conv_projection():
    """SD1 proj_in is a 1x1 conv; adapters trained on a linear view of it still apply."""
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    target = map_adapter(lora_modules({name: (320, 320)}), state_shapes("sd1", "comfy")).targets[
        name
    ]
    assert target.shape == (320, 320, 1, 1)


def _is_classic_lora_target(spec) -> bool:
    """What an attention LoRA trains: linears of the UNet transformers and of the TE layers."""
    inside = ".attentions." if spec.part == "unet" else ".layers."
    return inside in spec.name and len(spec.weight) >= 2


def _attention_adapter(arch: str, unet_scheme: str, te_scheme: str):
    unet = named(arch, unet_scheme, ("unet",))
    te = named(arch, te_scheme, ("te1", "te2"))
    return {n: s for n, s in (unet | te).items() if _is_classic_lora_target(s)}


def _sd1_attention_adapter():
    return _attention_adapter("sd1", "kohya", "kohya_single_te")


def _sdxl_attention_adapter():
    return _attention_adapter("sdxl", "kohya_sgm", "kohya")


@pytest.mark.parametrize(("adapter_arch", "model_arch"), [("sd1", "sdxl"), ("sdxl", "sd1")])
@pytest.mark.parametrize("space", SPACES)
def test_other_architecture_is_refused_naming_both(adapter_arch, model_arch, space):
    specs = _sd1_attention_adapter() if adapter_arch == "sd1" else _sdxl_attention_adapter()
    adapter = lora_modules({n: s.weight for n, s in specs.items()})
    shapes = state_shapes(model_arch, space)
    before = dict(shapes)
    with pytest.raises(ArchitectureMismatchError) as caught:
        map_adapter(adapter, shapes)
    assert isinstance(caught.value, LycorisError)
    message = str(caught.value)
    assert f"{adapter_arch} adapter" in message and f"{model_arch} model" in message
    assert "allow_partial" in message
    assert shapes == before
    report = map_adapter(adapter, shapes, allow_partial=True)
    assert report.refused and report.is_partial
    assert (report.adapter_arch, report.model_arch) == (adapter_arch, model_arch)
    sorted_out = [
        *report.targets,
        *(m[0] for m in report.mismatched),
        *report.unmatched,
        *report.not_applicable,
    ]
    assert sorted(sorted_out) == sorted(adapter)
    assert all(adapter[n].fits(t.shape) for n, t in report.targets.items())


def test_refusal_when_a_single_matched_key_has_the_wrong_shape():
    specs = _sd1_attention_adapter()
    sizes = {n: s.weight for n, s in specs.items()}
    wrong = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    sizes[wrong] = (640, 1024)  # an SD2-sized cross-attention in an otherwise SD1 adapter
    with pytest.raises(ArchitectureMismatchError, match="1 shape mismatches"):
        map_adapter(lora_modules(sizes), state_shapes("sd1", "comfy"))
    report = map_adapter(lora_modules(sizes), state_shapes("sd1", "comfy"), allow_partial=True)
    assert report.mismatched == [
        (
            wrong,
            "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
            (640, 1024),
            (640, 768),
        )
    ]
    assert wrong in report.details()


def test_summary_line_and_parts_absent_from_the_model():
    specs = _sdxl_attention_adapter()
    adapter = lora_modules({n: s.weight for n, s in specs.items()})
    full = map_adapter(adapter, state_shapes("sdxl", "comfy"))
    assert (
        full.summary()
        == "sdxl adapter on sdxl model: unet 722/722, te1 72/72, te2 192/192 matched, "
        "0 shape mismatches"
    )
    unet_only = map_adapter(adapter, state_shapes("sdxl", "comfy", ("unet",)))
    assert len(unet_only.not_applicable) == 72 + 192 and unet_only.counts == {"unet": (722, 722)}
    assert unet_only.summary().endswith("264 not applicable (part absent from the model)")
    assert unet_only.blocks_touched() == ["IN04", "IN05", "IN07", "IN08", "M00"] + [
        f"OUT{i:02d}" for i in range(6)
    ]
    assert full.blocks_touched()[0] == "BASE"


def test_unknown_names_count_against_the_adapter():
    sizes = {
        n: s.weight for n, s in named("sd1", "kohya", ("unet",)).items() if ".attentions." in s.name
    }
    junk = {f"lora_unet_not_a_layer_{i}": (320, 320) for i in range(len(sizes) + 1)}
    with pytest.raises(ArchitectureMismatchError):
        map_adapter(lora_modules(sizes | junk), state_shapes("sd1", "comfy"))
    report = map_adapter(
        lora_modules(sizes | junk), state_shapes("sd1", "comfy"), allow_partial=True
    )
    assert sorted(report.unmatched) == sorted(junk)
    assert report.counts["unet"] == (len(sizes), 2 * len(sizes) + 1)


def test_unrecognised_model_is_refused_and_empty_shapes_are_a_no_op():
    adapter = lora_modules({"lora_unet_conv_in": (320, 4, 3, 3)})
    with pytest.raises(ArchitectureMismatchError, match="unknown model"):
        map_adapter(adapter, {"transformer.blocks.0.weight": (8, 8)})
    empty = map_adapter(adapter, {})
    assert empty.not_applicable == ["lora_unet_conv_in"] and not empty.refused


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("parts", [("unet",), ("te1",), None])
def test_detect_model_each_architecture_space_and_part(arch, space, parts):
    if parts == ("te1",) and arch == "sdxl":
        parts = ("te1", "te2")  # a lone CLIP-L is SD1's text encoder (ties go to sd1)
    parts = parts or PARTS[arch]
    layout = detect_model(state_shapes(arch, space, parts))
    assert (layout.arch, layout.space, layout.parts) == (arch, space, frozenset(parts))


def test_detect_model_ignores_extra_keys_and_tolerates_a_changed_conv_in():
    shapes = state_shapes("sd1", "checkpoint") | {
        "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)
    }
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)  # inpainting
    assert detect_model(shapes).arch == "sd1"
    assert detect_model({"some.other.weight": (3, 3)}).arch == "unknown"


@pytest.mark.parametrize("arch", ARCHS)
def test_detect_adapter_from_names_and_shapes(arch):
    specs = (
        _sd1_attention_adapter()
        if arch == "sd1"
        else _sdxl_attention_adapter()
        if arch == "sdxl"
        else named("sd2", "kohya_single_te")
    )
    assert detect_adapter(lora_modules({n: s.weight for n, s in specs.items()})) == arch
