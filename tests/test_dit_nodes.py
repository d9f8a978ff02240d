"""The nodes, the Info node, GET /lycoris/info and `inspect` on DiT models and adapters.

A reduced-depth, real-width Flux MODEL (1 double + 1 single block, ComfyUI's `diffusion_model.`
keys) and a CLIP object holding CLIP-L and T5-XXL, through the ComfyUI stand-in: the loaders
work on them unchanged, block weights scale the DiT's blocks and text encoders, and every
front end shows the architecture, its variant and the parts.
"""
# isort: skip_file

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import nodes_env as env  # activates the stand-in before any comfy import
import comfy.sd  # noqa: E402
from comfy.model_patcher import ModelPatcher  # noqa: E402

from dit_adapters import adapter_tensors  # noqa: E402
from lycoris_core import load_adapter  # noqa: E402
from lycoris_core.io.writer import save_tensors  # noqa: E402
from lycoris_core.keymap import FAMILIES, dit_state_shapes, variant_config  # noqa: E402
from lycoris_core.patch import AdapterSpec, build_plan  # noqa: E402
from lycoris_core.tools.cli import main  # noqa: E402
from nodes import glue  # noqa: E402
from nodes.info import adapter_info  # noqa: E402
from nodes.loaders import BLOCKS_TOOLTIP, LycorisInfo, LycorisLoader, LycorisLoaderModelOnly  # noqa: E402

H = 3072
KOHYA = {  # kohya sd-scripts lora_flux names: fused BFL weights, lora_te1 = CLIP-L, lora_te2 = T5
    "lora_unet_double_blocks_0_img_attn_qkv": (3 * H, H),
    "lora_unet_single_blocks_0_linear2": (H, 5 * H),
    "lora_unet_final_layer_linear": (64, H),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    "lora_te2_encoder_block_0_layer_0_SelfAttention_q": (4096, 4096),
}
PEFT = {  # diffusers/PEFT names: rows of the fused weights, and norm_out's swapped halves
    "transformer.transformer_blocks.0.attn.to_k": (H, H),
    "transformer.single_transformer_blocks.0.proj_mlp": (4 * H, H),
    "transformer.norm_out.linear": (2 * H, H),
}


def flux_shapes():
    family, cfg = variant_config("flux-dev")
    cfg = FAMILIES[family].at_depth(cfg, replace(cfg, blocks=(1, 1)))
    return dit_state_shapes(family, cfg, "comfy")


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit_loras")
    meta = {"modelspec.architecture": "flux-1-dev/lora", "ss_network_module": "networks.lora_flux"}
    save_tensors(adapter_tensors(KOHYA, rank=2, seed=1), folder / "flux_kohya.safetensors", meta, overwrite=True)
    peft = {k: v for k, v in adapter_tensors(PEFT, rank=2, seed=2).items() if not k.endswith(".alpha")}
    save_tensors(peft, folder / "flux_peft.safetensors", {}, overwrite=True)
    env.use_loras(folder)
    glue.ADAPTERS.clear()
    glue.DELTAS.clear()
    return folder


@pytest.fixture(scope="module")
def shapes():
    return flux_shapes()


@pytest.fixture(scope="module")
def touched(loras, shapes):
    keys = set()
    for name in ("flux_kohya", "flux_peft"):
        keys |= set(build_plan([AdapterSpec(load_adapter(loras / f"{name}.safetensors"))], shapes).keys())
    return keys


@pytest.fixture()
def model(shapes, touched):
    dm = {k: v for k, v in shapes.items() if k.startswith("diffusion_model.")}
    return ModelPatcher(env.module_from_shapes(dm, touched, torch.bfloat16, 0), torch.device("cpu"),
                        torch.device("cpu"))


@pytest.fixture()
def clip(shapes, touched):
    te = {k: v for k, v in shapes.items() if not k.startswith("diffusion_model.")}
    return comfy.sd.CLIP(cond_stage_model=env.module_from_shapes(te, touched, torch.float16, 1))


def originals(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if all(s != 0 for s in v.stride())}


def run(fn):
    with torch.inference_mode():
        return fn()


def test_loader_on_a_flux_model_and_clip_with_block_weights(loras, shapes, model, clip):
    base_m, base_c = originals(model.model), originals(clip.cond_stage_model)
    blocks = "d00=0.5, s00=2, out=0, clip=3, t5=0"
    new_model, new_clip, text = run(lambda: LycorisLoader().apply(model, clip, "flux_kohya.safetensors", 0.8, 0.5,
                                                                  blocks))["result"]
    assert "flux-dev adapter on flux-dev [1+1 blocks] model: diffusion_model 3/3, te 2/2 matched" in text
    assert model.patches == {} and clip.patcher.patches == {}
    final = "diffusion_model.final_layer.linear.weight"
    t5 = "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"
    assert final not in new_model.patches and t5 not in new_clip.patcher.patches  # weight 0: no patch at all
    run(lambda: new_model.patch_model())
    run(lambda: new_clip.load_model())
    adapter = load_adapter(loras / "flux_kohya.safetensors")
    state = new_model.model.state_dict()
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    linear2 = "diffusion_model.single_blocks.0.linear2.weight"
    assert torch.equal(state[qkv], adapter.modules["lora_unet_double_blocks_0_img_attn_qkv"].apply(base_m[qkv], 0.4))
    assert torch.equal(state[linear2], adapter.modules["lora_unet_single_blocks_0_linear2"].apply(base_m[linear2], 1.6))
    q = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    clip_state = new_clip.patcher.model.state_dict()
    assert torch.equal(clip_state[q], adapter.modules["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"].apply(
        base_c[q], 1.5))
    assert torch.equal(clip_state[t5], base_c[t5])
    run(lambda: new_model.unpatch_model())
    assert torch.equal(new_model.model.state_dict()[qkv], base_m[qkv])


def test_model_only_loader_applies_peft_row_slices_and_pieces(loras, model):
    base = originals(model.model)
    new_model, text = run(lambda: LycorisLoaderModelOnly().apply(model, "flux_peft.safetensors", 0.7))["result"]
    assert "diffusion_model 3/3" in text and "1 by row pieces" in text
    plan = build_plan([AdapterSpec(load_adapter(loras / "flux_peft.safetensors"), 0.7, 0.0)], flux_shapes())
    run(lambda: new_model.patch_model())
    state = new_model.model.state_dict()
    for key in plan.keys():
        assert torch.equal(state[key], plan.patched(key, base[key])), key


def test_info_node_route_json_and_inspect_show_family_variant_and_parts(loras, capsys):
    summary, _words, blocks = run(lambda: LycorisInfo().describe("flux_kohya.safetensors"))["result"]
    assert "architecture (from module names and shapes): flux, variant flux-dev" in summary
    assert "parts: diffusion_model 3/3, clip_l 1/1, t5xxl 1/1" in summary
    assert blocks == "D00, S00, OUT, clip_l, t5xxl"
    info = adapter_info(glue.load("flux_peft.safetensors"))
    assert (info["architecture"], info["family"], info["variant"]) == ("flux", "flux", None)
    assert info["variants"] == ["flux-dev", "flux-schnell", "flux-fill", "flux-depth"] and info["row_pieces"] == 1
    assert info["blocks"] == ["D00", "S00", "OUT"]
    json.dumps(info)
    assert main(["inspect", str(loras / "flux_peft.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "flux (variant not pinned by the modules; fits flux-dev, flux-schnell, flux-fill, flux-depth)" in out
    assert "1 modules by row pieces" in out


def test_block_weights_tooltip_names_the_dit_tables():
    assert "61" in BLOCKS_TOOLTIP and "double=0.5" in BLOCKS_TOOLTIP


def test_panel_preview_shows_the_architecture_parts_and_dit_blocks(loras, tmp_path):
    pytest.importorskip("gradio")
    from web.panel.actions import preview
    from web.panel.folders import Folders

    shown = preview(Folders(loras, tmp_path, "test"), "flux_kohya.safetensors")
    assert "**flux, variant flux-dev**" in shown.summary
    assert "| parts | diffusion_model 3/3, clip_l 1/1, t5xxl 1/1 |" in shown.summary
    assert list(shown.blocks["block"]) == ["D00", "S00", "OUT", "clip_l", "t5xxl"]
    peft = preview(Folders(loras, tmp_path, "test"), "flux_peft.safetensors")
    assert list(peft.blocks["block"]) == ["D00", "S00", "OUT"]  # norm_out's row pieces are charted too
    assert sum(peft.blocks["modules"]) == 3
