"""The generated SD1.5 / SD2.1 / SDXL tables against the published models and known facts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from keymap_models import diffusers_state_shapes
from real_comfyui import COMFYUI, SKIP_REASON

from lycoris_core.keymap import diffusers_to_ldm, modules, state_shapes
from lycoris_core.keymap.names import alias_index
from lycoris_core.keymap.sd_layouts import block_id
from lycoris_core.keymap.spaces import space_table

ARCHS = ("sd1", "sd2", "sdxl")


@pytest.mark.parametrize("arch", ARCHS)
def test_diffusers_space_is_exactly_the_meta_models_state_dict(arch):
    assert state_shapes(arch, "diffusers") == diffusers_state_shapes(arch)


@pytest.mark.parametrize(
    ("arch", "space", "part", "count"),
    [
        # known tensor counts of the published single-file checkpoints
        ("sd1", "checkpoint", "unet", 686),
        ("sd2", "checkpoint", "unet", 686),
        ("sdxl", "checkpoint", "unet", 1680),
        ("sd1", "checkpoint", "te1", 196),  # CLIP-L without the position_ids buffer
        ("sdxl", "checkpoint", "te1", 196),
        ("sd2", "checkpoint", "te1", 24 * 12 + 5),  # resblocks + tok/pos emb, ln_final x2, proj
        ("sdxl", "checkpoint", "te2", 32 * 12 + 5),
        ("sdxl", "comfy", "te2", 32 * 16 + 5),  # q/k/v split: 16 tensors a layer
    ],
)
def test_tensor_counts_match_the_published_checkpoints(arch, space, part, count):
    assert len(state_shapes(arch, space, (part,))) == count


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("space", ["comfy", "checkpoint"])
def test_ldm_unet_keys_hold_the_same_tensors_as_diffusers(arch, space):
    """Every LDM key is one diffusers key renamed, with the same shape, and none is left out."""
    ldm = state_shapes(arch, space, ("unet",))
    prefix = {"comfy": "diffusion_model.", "checkpoint": "model.diffusion_model."}[space]
    renamed = {}
    for name, ldm_name in diffusers_to_ldm(arch).items():
        for leaf in ("weight", "bias"):
            renamed[f"{prefix}{ldm_name}.{leaf}"] = f"unet.{name}.{leaf}"
    expected = diffusers_state_shapes(arch)
    assert {k: expected[renamed[k]] for k in ldm} == ldm
    assert len(ldm) == sum(1 for k in expected if k.startswith("unet."))


def test_sd1_projections_are_1x1_convs_and_sd2_sdxl_linear():
    key = "diffusion_model.input_blocks.{}.1.proj_in.weight"
    assert state_shapes("sd1", "comfy")[key.format(1)] == (320, 320, 1, 1)
    assert state_shapes("sd2", "comfy")[key.format(1)] == (320, 320)
    assert state_shapes("sdxl", "comfy")[key.format(4)] == (640, 640)


@pytest.mark.parametrize(
    ("arch", "diffusers", "ldm"),
    [
        (
            "sd1",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        ),
        ("sd1", "down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
        ("sd1", "down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("sd1", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("sd1", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
        ("sd1", "mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
        ("sd1", "up_blocks.3.resnets.2.conv_shortcut", "output_blocks.11.0.skip_connection"),
        (
            "sdxl",
            "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
            "input_blocks.4.1.transformer_blocks.1.attn2.to_k",
        ),
        ("sdxl", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("sdxl", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("sdxl", "add_embedding.linear_2", "label_emb.0.2"),
        ("sdxl", "conv_out", "out.2"),
    ],
)
def test_diffusers_to_ldm_spot_checks(arch, diffusers, ldm):
    assert diffusers_to_ldm(arch)[diffusers] == ldm


@pytest.mark.parametrize(
    ("ldm", "block"),
    [
        ("input_blocks.0.0", "IN00"),
        ("input_blocks.11.0.out_layers.3", "IN11"),
        ("middle_block.1.proj_in", "M00"),
        ("output_blocks.7.1.norm", "OUT07"),
        ("time_embed.0", None),
        ("label_emb.0.0", None),
        ("out.2", None),
        ("out.0", None),
    ],
)
def test_block_id_from_ldm_index(ldm, block):
    assert block_id(ldm) == block


@pytest.mark.parametrize(
    ("arch", "blocks"),
    [
        (
            "sd1",
            ["IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"]
            + [f"OUT{i:02d}" for i in range(3, 12)],
        ),
        ("sdxl", ["IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)]),
    ],
)
def test_attention_modules_sit_in_the_lora_block_tables(arch, blocks):
    """peers-and-block-weights §2.1: the 17 (SD1) / 12 (SDXL) tables are the attention blocks."""
    attention = {s.block for s in modules(arch) if ".attentions." in s.name}
    assert sorted(attention) == sorted(blocks)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_unet_module_in_a_numbered_block_except_the_edges(arch):
    outside = sorted(s.name for s in modules(arch) if s.part == "unet" and s.block is None)
    edges = ["conv_norm_out", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
    if arch == "sdxl":
        edges += ["add_embedding.linear_1", "add_embedding.linear_2"]
    assert outside == sorted(edges)
    ids = {s.block for s in modules(arch) if s.block}
    n = 12 if arch != "sdxl" else 9
    assert ids == {"BASE", "M00"} | {f"IN{i:02d}" for i in range(n)} | {
        f"OUT{i:02d}" for i in range(n)
    }


def test_sdxl_attention_lora_counts_are_the_known_722_72_192():
    def count(part, inside):
        linear = [s for s in modules("sdxl") if s.part == part and len(s.weight) >= 2]
        return sum(1 for s in linear if inside(s.name))

    assert count("unet", lambda n: ".attentions." in n and not n.endswith(".norm")) == 722
    layer_linear = ("_proj", ".fc1", ".fc2")
    assert count("te1", lambda n: ".layers." in n and n.endswith(layer_linear)) == 72
    assert count("te2", lambda n: ".layers." in n and n.endswith(layer_linear)) == 192


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_openclip_checkpoint_fuses_qkv_rows_in_order(arch):
    part, prefix = {
        "sd2": ("te1", "cond_stage_model.model."),
        "sdxl": ("te2", "conditioner.embedders.1.model."),
    }[arch]
    table = space_table(arch, "checkpoint")
    width = {"sd2": 1024, "sdxl": 1280}[arch]
    block = f"{prefix}transformer.resblocks.5.attn."
    for i, proj in enumerate("qkv"):
        slot = table.slots[(part, f"text_model.encoder.layers.5.self_attn.{proj}_proj")]
        assert (slot.weight_key, slot.bias_key) == (
            block + "in_proj_weight",
            block + "in_proj_bias",
        )
        assert slot.rows == (i * width, width)
    assert table.keys[part][block + "in_proj_weight"] == (3 * width, width)
    projection = table.slots[(part, "text_projection")]
    assert (projection.weight_key, projection.transposed) == (f"{prefix}text_projection", True)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_alias_names_two_modules(arch):
    """Building the alias index raises on any collision; underscores are lossy, so check."""
    index = alias_index(arch)
    assert index["us"]["unet"]["input_blocks_0_0"] == "conv_in"


@pytest.fixture(scope="module")
def comfy_oracle():
    """ComfyUI's own tables for every architecture, from one subprocess."""
    if COMFYUI is None:
        pytest.skip(SKIP_REASON)
    script = Path(__file__).with_name("keymap_comfy_oracle.py")
    done = subprocess.run(
        [sys.executable, str(script), str(COMFYUI)], capture_output=True, text=True, timeout=300
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("ORACLE ")), None)
    if line is None:
        pytest.skip(f"ComfyUI at {COMFYUI} did not run: {done.stderr[-300:]}")
    return json.loads(line[len("ORACLE ") :])


@pytest.mark.parametrize("arch", ARCHS)
def test_ldm_tables_agree_with_comfyui_itself(comfy_oracle, arch):
    """ComfyUI's own UNetModel (meta) and unet_to_diffusers are an independent oracle."""
    oracle = comfy_oracle[arch]
    ours = {
        k.removeprefix("diffusion_model."): v
        for k, v in state_shapes(arch, "comfy", ("unet",)).items()
    }
    assert ours == {k: tuple(v) for k, v in oracle["shapes"].items()}
    theirs = oracle["diffusers_to_ldm"]
    for name, ldm in diffusers_to_ldm(arch).items():
        assert theirs[f"{name}.weight"] == f"{ldm}.weight", name
