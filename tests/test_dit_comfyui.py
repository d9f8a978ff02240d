"""Against a real ComfyUI: a reduced-depth random Flux diffusion model (bare keys) loaded by ComfyUI's
UNETLoader path (`comfy.sd.load_diffusion_model`, bf16), then patched by ComfyUI's own LoRA loader and by
this project's model-only loader node, compared on every weight ComfyUI loads.

- a kohya-named LoRA (`lora_unet_<BFL name>`, alpha/rank) on every 2-D weight of the model, and a
  diffusers/PEFT LoRA (`transformer.<diffusers name>`, no alpha) on every diffusers module: both must
  agree with ComfyUI's patch on every weight, bit for bit or within one bf16 step (the float32 sums
  are formed in another order; where they cancel to ~0, within 1e-6);
- what ComfyUI drops and the project applies: XLabs processor names (`processor.qkv_lora1.down`,
  Comfy-Org/ComfyUI#4607) and `diff_b` on a split q/k/v (ComfyUI slices the tuple, not the bias):
  ComfyUI leaves those weights untouched, ours equal the formula.

Needs a ComfyUI checkout (see real_comfyui.py) and COMFYUI_PYTHON, a python that imports ComfyUI
(here: /work/comfy-tools/comfy-python); about 2-3 minutes and 5 GB of RAM, so it is not run without it.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dit_adapters import adapter_tensors
from real_comfyui import COMFYUI, PROJECT, SKIP_REASON
from safetensors.torch import save_file

from lycoris_core.io.stream import StreamWriter
from lycoris_core.keymap import FAMILIES, dit_state_shapes, dit_table, variant_config

PYTHON = os.environ.get("COMFYUI_PYTHON")
pytestmark = [
    pytest.mark.skipif(COMFYUI is None, reason=SKIP_REASON),
    pytest.mark.skipif(not PYTHON, reason="set COMFYUI_PYTHON to a python that imports ComfyUI (2-3 minutes, 5 GB)"),
]
H = 3072
STRENGTH = 0.7


def write_flux(path, cfg) -> str:
    """A bare-key Flux diffusion model file with seeded random bf16 values, streamed tensor by tensor."""
    shapes = dit_state_shapes("flux", cfg, "bare")
    writer = StreamWriter(path, [(k, "BF16", s) for k, s in shapes.items()], {})
    gen = torch.Generator().manual_seed(0)
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=gen) * (0.05 if len(shape) > 1 else 1.0)
        writer.write(key, value.to(torch.bfloat16))
    writer.close()
    return str(path)


def lora_files(folder: Path, cfg) -> list[dict]:
    table = dit_table("flux", cfg)
    natives = {n.name: n.weight for n in table.natives.values() if n.leaf == "weight" and len(n.weight) == 2}
    kohya = adapter_tensors({f"lora_unet_{n.replace('.', '_')}": s for n, s in natives.items()}, rank=4, seed=1)
    kohya.update({k: torch.tensor(2.0) for k in kohya if k.endswith(".alpha")})  # alpha 2 on rank 4: scale 0.5
    save_file(kohya, str(folder / "flux_kohya.safetensors"))

    diffusers = {}
    for name, (leaf, segments) in table.diffusers.items():
        first = table.natives[segments[0][0]]
        if leaf == "weight" and len(first.weight) == 2:
            diffusers[f"transformer.{name}"] = (sum(s[3] for s in segments), first.weight[1])
    peft = adapter_tensors(diffusers, rank=4, seed=2)
    save_file({k: v for k, v in peft.items() if not k.endswith(".alpha")}, str(folder / "flux_peft.safetensors"))

    gen = torch.Generator().manual_seed(3)
    xlabs, formula = {}, []
    for proc, native, rows in (("qkv_lora1", "img_attn.qkv", 3 * H), ("qkv_lora2", "txt_attn.qkv", 3 * H),
                               ("proj_lora1", "img_attn.proj", H), ("proj_lora2", "txt_attn.proj", H)):
        up, down = f"double_blocks.0.processor.{proc}.up.weight", f"double_blocks.0.processor.{proc}.down.weight"
        xlabs[down] = torch.randn(4, H, generator=gen) * 0.05
        xlabs[up] = torch.randn(rows, 4, generator=gen) * 0.05
        formula.append({"key": f"diffusion_model.double_blocks.0.{native}.weight", "kind": "lora", "up": up,
                        "down": down, "scale": 1.0, "rows": None})
    save_file(xlabs, str(folder / "flux_xlabs.safetensors"))

    split = {"transformer.transformer_blocks.0.attn.to_k.diff": torch.randn(H, H, generator=gen) * 0.01,
             "transformer.transformer_blocks.0.attn.to_k.diff_b": torch.randn(H, generator=gen) * 0.01,
             "transformer.single_transformer_blocks.0.attn.to_v.diff": torch.randn(H, H, generator=gen) * 0.01,
             "transformer.single_transformer_blocks.0.attn.to_v.diff_b": torch.randn(H, generator=gen) * 0.01}
    save_file(split, str(folder / "flux_diff_b.safetensors"))
    bias = [{"key": "diffusion_model.double_blocks.0.img_attn.qkv.bias", "kind": "bias",
             "diff": "transformer.transformer_blocks.0.attn.to_k.diff_b", "rows": [H, H]},
            {"key": "diffusion_model.single_blocks.0.linear1.bias", "kind": "bias",
             "diff": "transformer.single_transformer_blocks.0.attn.to_v.diff_b", "rows": [2 * H, H]}]
    return [{"file": "flux_kohya.safetensors", "strength": STRENGTH},
            {"file": "flux_peft.safetensors", "strength": STRENGTH},
            {"file": "flux_xlabs.safetensors", "strength": STRENGTH, "formula": formula},
            {"file": "flux_diff_b.safetensors", "strength": STRENGTH, "formula": bias}]


@pytest.fixture(scope="module")
def comfy_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit_comfy")
    family, cfg = variant_config("flux-dev")
    cfg = FAMILIES[family].at_depth(cfg, replace(cfg, blocks=(1, 1)))
    model = write_flux(folder / "flux-lite.safetensors", cfg)
    loras = folder / "loras"
    loras.mkdir()
    cases = lora_files(loras, cfg)
    script = Path(__file__).with_name("dit_comfy_apply.py")
    done = subprocess.run([PYTHON, str(script), str(COMFYUI), str(PROJECT), model, str(loras)],
                          input=json.dumps(cases), capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, COMFYUI_PATH=str(COMFYUI)))
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, done.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    print(json.dumps(result, indent=1))
    return result


def test_comfyui_loads_the_reduced_flux_as_flux(comfy_run):
    assert comfy_run["model_class"] == "Flux"
    assert comfy_run["unet_config"]["depth"] == 1 and comfy_run["unet_config"]["depth_single_blocks"] == 1


@pytest.mark.parametrize("name", ["flux_kohya.safetensors", "flux_peft.safetensors"])
def test_ours_equals_comfyuis_patch_on_every_weight(comfy_run, name):
    seen = comfy_run[name]
    assert seen["comfy_not_loaded"] == 0 and seen["comfy_patched"] == seen["ours_patched"] > 0
    assert seen["compared"] == comfy_run["weights"]
    assert seen["beyond_one_ulp"] == []
    assert "0 shape mismatches" in seen["ours_summary"] and "diffusion_model" in seen["ours_summary"]


@pytest.mark.parametrize("name", ["flux_xlabs.safetensors", "flux_diff_b.safetensors"])
def test_ours_applies_what_comfyui_drops(comfy_run, name):
    seen = comfy_run[name]
    assert seen["formula"]
    for key, check in seen["formula"].items():
        assert check["comfy_unchanged"] and check["ours_changed"] and check["ours_beyond_one_ulp"] == 0, key
    assert seen["beyond_one_ulp"] == []  # every other weight: the same as ComfyUI (diff on the q/k/v rows)
    if name == "flux_xlabs.safetensors":
        assert seen["comfy_not_loaded"] == 8 and seen["comfy_patched"] == 0 and seen["ours_patched"] == 4
