"""bake and extract on DiT model files: a diffusion-model-only file (bare keys, the UNETLoader / GGUF
case) and a single-file checkpoint (`model.diffusion_model.` + `text_encoders.`), streamed.

Models are Flux at real width and reduced depth (1 double + 1 single block, 1.1 GB in bf16).
Only the tensors the adapters touch hold random values (float32, so an extracted delta is
exact); the rest are zeros, which costs nothing to write and streams like any other tensor.
The memory check bakes two depths in a subprocess: the peak RSS follows the largest layer,
not the file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dit_adapters import adapter_tensors
from safetensors import safe_open
from safetensors.torch import save_file

from lycoris_core import load_adapter
from lycoris_core.io.stream import NAME_OF, StreamWriter
from lycoris_core.keymap import FAMILIES, dit_state_shapes, variant_config
from lycoris_core.patch import AdapterSpec, build_plan
from lycoris_core.tools.bake import bake_checkpoint
from lycoris_core.tools.extract import extract_adapter
from lycoris_core.tools.merge import MergeInput

H = 3072
REAL = ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.qkv.bias", "single_blocks.0.linear1.weight",
        "final_layer.adaLN_modulation.1.weight", "text_model.encoder.layers.0.self_attn.q_proj.weight")


def flux_cfg(blocks):
    family, cfg = variant_config("flux-dev")
    return family, FAMILIES[family].at_depth(cfg, replace(cfg, blocks=blocks))


def write_model(path, shapes, real=REAL, seed=0) -> str:
    """bf16 zeros, except float32 random values (and biases) for the keys ending in one of `real`; streamed."""
    gen = torch.Generator().manual_seed(seed)
    dtype = {k: torch.float32 if k.endswith(real) else torch.bfloat16 for k in shapes}
    writer = StreamWriter(path, [(k, NAME_OF[dtype[k]], s) for k, s in shapes.items()], {"format": "pt"})
    for key, shape in shapes.items():
        if dtype[key] == torch.float32:
            writer.write(key, torch.randn(shape, generator=gen) * 0.05)
        else:
            writer.write(key, torch.zeros(shape, dtype=torch.bfloat16))
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit_bake")
    family, cfg = flux_cfg((1, 1))
    bare = write_model(folder / "flux-lite-bare.safetensors", dit_state_shapes(family, cfg, "bare"))
    ckpt_shapes = dit_state_shapes(family, cfg, "checkpoint", ("diffusion_model", "clip_l"))
    ckpt = write_model(folder / "flux-lite-ckpt.safetensors", ckpt_shapes)  # the same diffusion-model values
    kohya = folder / "kohya.safetensors"
    save_file(adapter_tensors({"lora_unet_double_blocks_0_img_attn_qkv": (3 * H, H),
                               "lora_unet_single_blocks_0_linear1": (7 * H, H),
                               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}, rank=2, seed=3),
              str(kohya))
    peft = folder / "peft.safetensors"  # rows of the fused weights, a bias delta on a q/k/v slice, norm_out's halves
    tensors = adapter_tensors({"transformer.transformer_blocks.0.attn.to_v": (H, H),
                               "transformer.single_transformer_blocks.0.proj_mlp": (4 * H, H),
                               "transformer.norm_out.linear": (2 * H, H)}, rank=2, seed=4)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    gen = torch.Generator().manual_seed(5)  # a full diff with diff_b on the k slice (LyCORIS full, diffusers names)
    tensors["transformer.transformer_blocks.0.attn.to_k.diff"] = torch.zeros(H, H)  # the bias is what counts here
    tensors["transformer.transformer_blocks.0.attn.to_k.diff_b"] = torch.randn(H, generator=gen) * 0.01
    save_file(tensors, str(peft))
    return {"folder": folder, "bare": bare, "ckpt": ckpt, "kohya": str(kohya), "peft": str(peft)}


def check_bit_exact(model_file, out, inputs):
    with safe_open(model_file, "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    specs = [AdapterSpec(load_adapter(i.path), i.strength_unet, i.strength_clip, i.blocks) for i in inputs]
    plan = build_plan(specs, shapes)
    with safe_open(model_file, "pt") as a, safe_open(out, "pt") as b:
        assert list(a.keys()) == list(b.keys())  # the same keys: UNETLoader / the checkpoint loader read it as before
        for key in plan.keys():
            want = plan.patched(key, a.get_tensor(key))
            assert torch.equal(b.get_tensor(key), want), key
        for key in ("img_in.weight", "model.diffusion_model.img_in.weight"):
            if key in shapes:
                assert torch.equal(a.get_tensor(key), b.get_tensor(key))
    return plan


def test_bake_diffusion_model_only_file(files):
    out = str(files["folder"] / "baked-bare.safetensors")
    inputs = [MergeInput(files["kohya"], 0.8, 1.0, "d00=0.5"), MergeInput(files["peft"], -0.6)]
    report = bake_checkpoint(files["bare"], inputs, out, progress=lambda *a: None)
    assert "flux adapter on flux-dev [1+1 blocks] model: diffusion_model 2/2, te 0/0 matched" in report.match_lines[0]
    assert "1 not applicable" in report.match_lines[0]  # the CLIP-L module: a bare file has no text encoder
    assert "1 by row pieces" in report.match_lines[1]
    plan = check_bit_exact(files["bare"], out, inputs)
    assert "double_blocks.0.img_attn.qkv.bias" in plan.keys()  # diff_b on the k slice: ComfyUI drops it, bake applies it
    files["baked_bare"] = out


def test_bake_single_file_checkpoint_with_text_encoder(files):
    out = str(files["folder"] / "baked-ckpt.safetensors")
    inputs = [MergeInput(files["kohya"], 1.0, 0.5)]
    report = bake_checkpoint(files["ckpt"], inputs, out, progress=lambda *a: None)
    assert "diffusion_model 2/2, te 1/1 matched" in report.match_lines[0]
    check_bit_exact(files["ckpt"], out, inputs)
    files["baked_ckpt"] = out


def test_extract_from_two_diffusion_model_files(files, tmp_path):
    """A diffusion-model-only file (bare keys) against a baked single-file checkpoint of the same model."""
    tuned = files.get("baked_ckpt")
    if tuned is None:
        pytest.skip("needs the bake test's output")
    out = tmp_path / "extracted.safetensors"
    report = extract_adapter(files["bare"], tuned, str(out), rank_param=2, save_dtype="fp32")
    assert "base: flux-dev [1+1 blocks] model (bare keys" in report.match_lines[0]
    extracted = load_adapter(str(out))
    pairs = {"lora_unet_double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv.weight",
             "lora_unet_single_blocks_0_linear1": "single_blocks.0.linear1.weight"}
    assert set(extracted.modules) == set(pairs), report.to_text()  # the text encoder is only in one file
    with safe_open(files["bare"], "pt") as a, safe_open(tuned, "pt") as b:
        for name, key in pairs.items():
            want = b.get_tensor(f"model.diffusion_model.{key}") - a.get_tensor(key)
            got = extracted.modules[name].delta()
            assert float((got - want).norm()) <= 1e-5 * float(want.norm()), name


# VmHWM belongs to this process's own address space; ru_maxrss would carry over the forking pytest's peak
RSS_SCRIPT = """
import sys
from lycoris_core.tools.bake import bake_checkpoint
from lycoris_core.tools.merge import MergeInput
bake_checkpoint(sys.argv[1], [MergeInput(sys.argv[3], 0.9)], sys.argv[2], progress=lambda d, t, s: None)
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def _peak_rss(model_file, adapter, out) -> int:
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, model_file, str(out), adapter], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1], timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    os.remove(out)
    return int(proc.stdout.split()[-1])


def test_bake_peak_memory_follows_the_largest_layer_not_the_file(files):
    """Three more single blocks add 850 MB to the file and must add (almost) nothing to the peak."""
    family, cfg = flux_cfg((1, 4))
    deep = write_model(files["folder"] / "flux-deeper.safetensors", dit_state_shapes(family, cfg, "bare"))
    folder = files["folder"]
    small = _peak_rss(files["bare"], files["kohya"], folder / "rss-small.safetensors")
    large = _peak_rss(deep, files["kohya"], folder / "rss-large.safetensors")
    size_small, size_large = os.path.getsize(files["bare"]), os.path.getsize(deep)
    layer = 7 * H * H * 4  # the largest layer, single_blocks.N.linear1, in float32
    print(f"peak RSS {small / 1e6:.0f} MB for {size_small / 1e6:.0f} MB, {large / 1e6:.0f} MB for "
          f"{size_large / 1e6:.0f} MB; largest layer {layer / 1e6:.0f} MB in float32")
    assert abs(large - small) < 0.1 * (size_large - size_small)
    assert large < 0.6 * size_large
    os.remove(deep)
