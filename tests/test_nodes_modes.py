"""The node's patch in each of ComfyUI's loading modes: one rounding, the right original, caches given back.

Through the ComfyUI stand-in (tests/comfy_stub, after ComfyUI a125cd84):

* low-VRAM loading: ``LowVramPatch`` patches on every forward with the weight in the
  compute dtype (fp16/bf16): the sum is formed in float32 and rounded once into it;
* scaled-fp8 weights: ComfyUI's op dequantises (``convert_weight``), the patch adds in
  float32, the op re-quantises (``set_weight``): one rounding, ComfyUI's;
* a patch that is not the first on its key (an upstream LoRA): weight-dependent deltas
  read the weight as it arrives and are never kept, so an upstream strength change is seen;
* when ComfyUI unloads models to make room, the node pack's caches are released.
"""
# isort: skip_file

from __future__ import annotations

import zlib

import pytest
import torch

import nodes_env as env  # activates the stand-in before any comfy import
import comfy.float  # noqa: E402
import comfy.lora  # noqa: E402
import comfy.model_management  # noqa: E402
from comfy.model_patcher import LowVramPatch  # noqa: E402

from lycoris_core import load_adapter  # noqa: E402
from lycoris_core.patch import AdapterSpec, DeltaCache, build_plan, patched_value  # noqa: E402
from nodes import glue  # noqa: E402
from nodes.loaders import LycorisLoaderModelOnly  # noqa: E402

KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras_modes")
    files = env.write_adapters(folder)
    env.use_loras(folder)
    glue.ADAPTERS.clear()
    glue.DELTAS.clear()
    return files


@pytest.fixture(scope="module")
def real_keys(loras):
    return env.touched_keys(loras.values())


def run(fn):
    with torch.inference_mode():
        return fn()


def patches_of(model, name, strength):
    new_model, _ = run(lambda: LycorisLoaderModelOnly().apply(model, name, strength))["result"]
    return new_model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_vram_patch_in_the_compute_dtype_rounds_once(loras, real_keys, dtype):
    model = env.make_model(real_keys)
    new_model = patches_of(model, "demo_loha.safetensors", 0.8)
    plan = build_plan([AdapterSpec(load_adapter(loras["demo_loha.safetensors"]), 0.8, 0.0)], env.SHAPES)
    for key in [k for k in plan.keys() if k.startswith("diffusion_model.")][:6]:
        stored = model.model.state_dict()[key]
        working = stored.to(dtype)  # the compute-dtype copy ops.cast_bias_weight hands over
        out = run(lambda k=key, w=working: LowVramPatch(k, new_model.patches)(w.clone()))
        assert out.dtype == dtype
        assert torch.equal(out, patched_value(working, plan.contributions[key], key)), key


class ScaledFp8(torch.nn.Module):
    """A linear stored as fp8 with a per-tensor scale, patched through convert/set as ComfyUI's ops do."""

    def __init__(self, weight: torch.Tensor, scale: float):
        super().__init__()
        self.scale_weight = torch.tensor(scale)
        self.weight = torch.nn.Parameter((weight / scale).to(torch.float8_e4m3fn), requires_grad=False)

    def convert_weight(self, weight, inplace=False, **_):
        return weight.mul_(self.scale_weight) if inplace else weight * self.scale_weight

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **_):
        value = comfy.float.stochastic_rounding(weight / self.scale_weight, self.weight.dtype, seed=seed)
        if return_weight:
            return value
        self.weight = torch.nn.Parameter(value, requires_grad=False)


def test_scaled_fp8_weights_are_patched_dequantised_and_rounded_once_by_comfyui(loras, real_keys):
    model = env.make_model(real_keys)
    *path, leaf = KEY.split(".")
    parent = model.model
    for part in path[:-1]:
        parent = getattr(parent, part)
    original = getattr(parent, path[-1]).weight.detach().clone()
    op = ScaledFp8(original, 0.01)
    setattr(parent, path[-1], op)
    stored = op.weight.detach().clone()
    new_model = patches_of(model, "demo_lora.safetensors", 0.7)
    run(lambda: new_model.patch_model())
    plan = build_plan([AdapterSpec(load_adapter(loras["demo_lora.safetensors"]), 0.7, 0.0)], env.SHAPES)
    dequantised = stored.to(torch.float32) * op.scale_weight
    exact = dequantised + plan.delta(KEY, dequantised)
    expected = comfy.float.stochastic_rounding(exact / op.scale_weight, torch.float8_e4m3fn,
                                               seed=zlib.crc32(KEY.encode()))
    assert torch.equal(op.weight.view(torch.uint8), expected.view(torch.uint8))
    run(lambda: new_model.unpatch_model())
    assert torch.equal(op.weight.view(torch.uint8), stored.view(torch.uint8))


def test_a_weight_dependent_patch_after_an_upstream_patch_sees_its_current_strength(loras, real_keys):
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"  # the DoRA conv of sub/w0.safetensors
    model = env.make_model(real_keys)
    w0 = model.model.state_dict()[key].detach().clone()
    upstream = torch.randn(w0.shape, generator=torch.Generator().manual_seed(5)) * 0.01
    results = []
    for strength in (1.0, 0.2):
        base = model.clone()
        base.add_patches({key: (upstream,)}, strength)  # e.g. ComfyUI's own LoRA loader before ours
        new_model = patches_of(base, "sub/w0.safetensors", 1.0)
        assert new_model.patches[key][-1][1].identity is None  # not the first patch: never kept
        run(lambda m=new_model: comfy.model_management.load_models_gpu([m]))
        results.append(new_model.model.state_dict()[key].detach().clone())
        run(lambda m=new_model: m.unpatch_model())
        plan = build_plan([AdapterSpec(load_adapter(loras["sub/w0.safetensors"]))], env.SHAPES)
        arrived = w0 + strength * upstream
        assert torch.equal(results[-1], patched_value(arrived, plan.contributions[key], key)), strength
    assert not torch.equal(results[0], results[1])


def test_caches_are_released_when_comfyui_unloads_models(loras, real_keys, monkeypatch):
    monkeypatch.setattr(glue, "DELTAS", DeltaCache(1 << 30))  # LYCORIS_CACHE_MB=1024
    model = env.make_model(real_keys)
    new_model = patches_of(model, "demo_loha.safetensors", 1.0)
    run(lambda: comfy.model_management.load_models_gpu([new_model]))
    assert glue.DELTAS.used > 0
    run(lambda: comfy.model_management.unload_all_models())
    assert glue.DELTAS.used == 0
