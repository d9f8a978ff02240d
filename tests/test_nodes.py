"""The nodes run through the ComfyUI stand-in: patched weights equal lycoris_core's, inputs untouched,
unpatch bit-identical, one patch object per key for a stack, fail-fast on a wrong architecture."""
# isort: skip_file

from __future__ import annotations

import logging
import os
import zlib

import pytest
import torch

import nodes_env as env  # activates the stand-in before any comfy import
import comfy.float  # noqa: E402
import comfy.lora  # noqa: E402
import comfy.model_management  # noqa: E402
from comfy.weight_adapter import WeightAdapterBase  # noqa: E402

from lycoris_core import load_adapter  # noqa: E402
from lycoris_core.errors import ArchitectureMismatchError, BlockWeightError  # noqa: E402
from lycoris_core.patch import AdapterSpec, DeltaCache, accumulate, build_plan  # noqa: E402
from nodes import glue  # noqa: E402
from nodes.loaders import (  # noqa: E402
    NODE_CLASS_MAPPINGS,
    LycorisInfo,
    LycorisLoader,
    LycorisLoaderModelOnly,
    LycorisStack,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    files = env.write_adapters(folder)
    env.use_loras(folder)
    glue.ADAPTERS.clear()
    glue.DELTAS.clear()
    return files


@pytest.fixture(scope="module")
def real_keys(loras):
    return env.touched_keys(loras.values())


@pytest.fixture()
def model(real_keys):
    return env.make_model(real_keys)


@pytest.fixture()
def clip(real_keys):
    return env.make_clip(real_keys)


def _placeholder(t):
    return t.dim() > 0 and all(s == 0 for s in t.stride())  # the stride-0 stand-ins of untouched weights


def snapshot(module):
    return {k: (v, None if _placeholder(v) else v.detach().clone())
            for k, v in module.state_dict(keep_vars=True).items()}


def assert_restored(module, snap):
    for k, v in module.state_dict(keep_vars=True).items():
        obj, copy = snap[k]
        assert v.data_ptr() == obj.data_ptr(), k  # ComfyUI's backup keeps the original storage
        if copy is None:
            assert _placeholder(v) and v.dtype == obj.dtype, k
        else:
            assert v.dtype == copy.dtype and torch.equal(v.detach(), copy), k


def expected_plan(loras, rows):
    specs = [AdapterSpec(load_adapter(loras[n]), sm, sc, bw or None) for n, sm, sc, bw in rows]
    return build_plan(specs, env.SHAPES)


def check_patched(patcher, plan, originals, prefix):
    keys = [k for k in plan.keys() if k.startswith(prefix)]
    assert keys
    state = patcher.model.state_dict()
    for key in keys:
        expected = plan.patched(key, originals[key][1])
        assert state[key].dtype == expected.dtype
        assert torch.equal(state[key], expected), key
    return keys


def run(fn):
    with torch.inference_mode():
        return fn()


def test_loader_matches_core_and_unpatches_exactly(loras, model, clip):
    snap_m, snap_c = snapshot(model.model), snapshot(clip.cond_stage_model)
    out = run(lambda: LycorisLoader().apply(model, clip, "demo_loha.safetensors", 0.7, -0.4))
    new_model, new_clip, text = out["result"]
    assert new_model is not model and new_clip is not clip
    assert model.patches == {} and clip.patcher.patches == {}  # inputs never mutated
    assert "te1" in text and "unet" in text and "lycodemo" in text
    assert out["ui"]["lycoris"] == [text]
    for patches in (new_model.patches, new_clip.patcher.patches):
        for entries in patches.values():
            assert len(entries) == 1 and isinstance(entries[0][1], WeightAdapterBase)
            assert entries[0][0] == 1.0 and entries[0][3] is None
    plan = expected_plan(loras, [("demo_loha.safetensors", 0.7, -0.4, "")])
    run(lambda: new_model.patch_model())
    run(lambda: new_clip.load_model())
    check_patched(new_model, plan, snap_m, "diffusion_model.")
    check_patched(new_clip.patcher, plan, snap_c, "clip_l.")
    run(lambda: new_model.unpatch_model())
    run(lambda: new_clip.patcher.unpatch_model())
    assert_restored(model.model, snap_m)
    assert_restored(clip.cond_stage_model, snap_c)


def test_stack_sums_once_per_key(loras, model, clip):
    snap_m, snap_c = snapshot(model.model), snapshot(clip.cond_stage_model)
    inputs = {
        "adapter_name_1": "demo_lora.safetensors", "strength_model_1": 1.0, "strength_clip_1": 0.5,
        "adapter_name_2": "demo_loha.safetensors", "strength_model_2": -0.6, "strength_clip_2": 1.0,
        "block_weights_2": "in=0.5, mid=0, out=2",
        "adapter_name_3": "demo_lokr.safetensors", "strength_model_3": 0.3, "strength_clip_3": 0.0,
        "adapter_name_4": "sub/w0.safetensors", "strength_model_4": 0.8, "strength_clip_4": 1.2,
        "adapter_name_5": "demo_lora.safetensors", "enabled_5": False,
    }
    new_model, new_clip, text = run(lambda: LycorisStack().apply(model, clip, **inputs))["result"]
    assert text.count("adapter on sd1 model") == 4
    rows = [("demo_lora.safetensors", 1.0, 0.5, ""), ("demo_loha.safetensors", -0.6, 1.0, "in=0.5, mid=0, out=2"),
            ("demo_lokr.safetensors", 0.3, 0.0, ""), ("sub/w0.safetensors", 0.8, 1.2, "")]
    plan = expected_plan(loras, rows)
    conv = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert len(plan.contributions[conv]) == 4  # four adapters on one key ...
    assert len(new_model.patches[conv]) == 1  # ... one patch object holding them all
    assert len(new_model.patches[conv][0][1].contributions) == 4
    run(lambda: comfy.model_management.load_models_gpu([new_model]))
    run(lambda: new_clip.load_model())
    check_patched(new_model, plan, snap_m, "diffusion_model.")
    clip_keys = check_patched(new_clip.patcher, plan, snap_c, "clip_l.")
    assert any("layers.0.self_attn.q_proj" in k for k in clip_keys)  # the fp16 DoRA key
    run(lambda: new_model.unpatch_model())
    run(lambda: new_clip.patcher.unpatch_model())
    assert_restored(model.model, snap_m)
    assert_restored(clip.cond_stage_model, snap_c)


def test_nodes_keep_no_deltas_by_default(loras, model):
    """Measured in a real ComfyUI, kept deltas cost more than they save there (docs/benchmarks.md)."""
    assert "LYCORIS_CACHE_MB" in os.environ or glue.DELTAS.budget == 0
    snap = snapshot(model.model)
    loader = LycorisLoaderModelOnly()
    first, _ = run(lambda: loader.apply(model, "demo_loha.safetensors", 1.0))["result"]
    run(lambda: comfy.model_management.load_models_gpu([first]))
    loads = glue.ADAPTERS.misses
    second, _ = run(lambda: loader.apply(model, "demo_loha.safetensors", 0.25))["result"]
    run(lambda: comfy.model_management.load_models_gpu([second]))
    assert glue.ADAPTERS.misses == loads  # the file is not read again
    assert glue.DELTAS.used == 0
    check_patched(second, expected_plan(loras, [("demo_loha.safetensors", 0.25, 0.0, "")]), snap, "diffusion_model.")
    run(lambda: second.unpatch_model())
    assert_restored(model.model, snap)


def test_strength_change_reuses_file_and_deltas(loras, model, monkeypatch):
    monkeypatch.setattr(glue, "DELTAS", DeltaCache(1 << 30))  # LYCORIS_CACHE_MB=1024
    snap = snapshot(model.model)
    loader = LycorisLoaderModelOnly()
    first, _ = run(lambda: loader.apply(model, "demo_loha.safetensors", 1.0))["result"]
    run(lambda: comfy.model_management.load_models_gpu([first]))
    loads, hits, misses = glue.ADAPTERS.misses, glue.DELTAS.hits, glue.DELTAS.misses
    second, _ = run(lambda: loader.apply(model, "demo_loha.safetensors", 0.25))["result"]
    run(lambda: comfy.model_management.load_models_gpu([second]))  # another clone: unpatch, re-patch
    assert glue.ADAPTERS.misses == loads
    assert glue.DELTAS.misses == misses and glue.DELTAS.hits > hits
    plan = expected_plan(loras, [("demo_loha.safetensors", 0.25, 0.0, "")])
    check_patched(second, plan, snap, "diffusion_model.")
    run(lambda: second.unpatch_model())
    assert_restored(model.model, snap)


def test_model_only_leaves_clip_keys_alone(loras, model):
    new_model, text = run(lambda: LycorisLoaderModelOnly().apply(model, "demo_lora.safetensors", 1.0))["result"]
    assert new_model.patches and all(k.startswith("diffusion_model.") for k in new_model.patches)
    assert "not applicable" in text


def test_zero_strengths_return_inputs(loras, model, clip):
    m, c, text = run(lambda: LycorisLoader().apply(model, clip, "demo_lora.safetensors", 0.0, 0.0))["result"]
    assert m is model and c is clip and "no adapter applied" in text
    m, c, _ = run(lambda: LycorisLoader().apply(model, clip, "demo_lora.safetensors", 0.0, 1.0))["result"]
    assert m.patches == {} and c.patcher.patches


def test_wrong_architecture_fails_fast_with_one_message(loras, model, clip, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ArchitectureMismatchError) as err:
        run(lambda: LycorisStack().apply(model, clip, adapter_name_1="demo_lora.safetensors",
                                         adapter_name_2="sdxl_lora.safetensors"))
    message = str(err.value)
    assert "sdxl_lora.safetensors" in message and "sdxl adapter does not fit" in message
    assert model.patches == {} and clip.patcher.patches == {}
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 0


def test_bad_block_weights_name_the_adapter(loras, model, clip):
    with pytest.raises(BlockWeightError, match="demo_lora"):
        run(lambda: LycorisLoader().apply(model, clip, "demo_lora.safetensors", 1.0, 1.0, "1, 2, 3"))
    assert model.patches == {}


def test_one_info_line_per_load(loras, model, clip, caplog):
    caplog.set_level(logging.INFO, logger="comfyui-lycoris")
    run(lambda: LycorisLoader().apply(model, clip, "demo_loha.safetensors", 1.0, 1.0))
    ours = [r for r in caplog.records if r.name == "comfyui-lycoris"]
    assert len(ours) == 1 and ours[0].levelno == logging.INFO and "demo_loha" in ours[0].getMessage()


def test_missing_file_raises_comfy_message(loras, model, clip):
    with pytest.raises(FileNotFoundError, match="Model in folder 'loras' with filename 'nope.safetensors'"):
        run(lambda: LycorisLoader().apply(model, clip, "nope.safetensors", 1.0, 1.0))


def test_info_node(loras):
    out = run(lambda: LycorisInfo().describe("demo_lora.safetensors"))
    summary, words, blocks = out["result"]
    assert "algorithms: lora x6, locon x1" in summary and "rank" in summary and "sd_v1" in summary
    assert "architecture (from module names and shapes): sd1" in summary
    assert words.split(", ")[0] == "lycodemo"
    assert "BASE" in blocks and "IN01" in blocks and "M00" in blocks


def _identity(a):
    return a


def test_adapter_contract_offset_function_strength(loras, real_keys):
    """calculate_weight as comfy.lora calls it: in place under an offset, function and strength respected."""
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    adapter = load_adapter(loras["demo_lora.safetensors"])
    plan = build_plan([AdapterSpec(adapter)], env.SHAPES)
    patch = glue.patch_class()(key, env.SHAPES[key], plan.contributions[key])
    w = torch.randn(env.SHAPES[key])
    delta = plan.delta(key, w)
    out = comfy.lora.calculate_weight([(0.5, patch, 1.0, None, None)], w.clone(), key)
    assert torch.equal(out, accumulate(w.clone(), w, plan.contributions[key], scale=0.5))
    out = comfy.lora.calculate_weight([(1.0, patch, 2.0, None, lambda d: d * 3)], w.clone(), key)
    torch.testing.assert_close(out, 2 * w + 3 * delta)
    out = comfy.lora.calculate_weight([(1.0, patch, 1.0, (0, 100, 50), None)], w.clone(), key)
    torch.testing.assert_close(out[100:150], w[100:150] + delta[100:150])
    assert torch.equal(out[:100], w[:100]) and torch.equal(out[150:], w[150:])


def test_fp8_weights_use_comfy_rounding(loras, real_keys):
    model = env.make_model(real_keys, unet_dtype=torch.float8_e4m3fn)
    snap = snapshot(model.model)
    new_model, _ = run(lambda: LycorisLoaderModelOnly().apply(model, "demo_loha.safetensors", 1.0))["result"]
    run(lambda: new_model.patch_model())
    plan = expected_plan(loras, [("demo_loha.safetensors", 1.0, 0.0, "")])
    state = new_model.model.state_dict()
    for key in (k for k in plan.keys() if k.startswith("diffusion_model.")):
        base = snap[key][1]
        exact = accumulate(base.to(torch.float32), base, plan.contributions[key])
        expected = comfy.float.stochastic_rounding(exact, base.dtype, seed=zlib.crc32(key.encode()))
        assert state[key].dtype == torch.float8_e4m3fn and torch.equal(state[key].view(torch.uint8),
                                                                         expected.view(torch.uint8)), key
    run(lambda: new_model.unpatch_model())
    assert_restored(model.model, snap)


def test_node_definitions():
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("Lycoris") and cls.CATEGORY == ("training" if node_id == "LycorisTrain" else "loaders/lycoris")
        assert callable(getattr(cls, cls.FUNCTION))
    req = LycorisLoader.INPUT_TYPES()["required"]
    assert req["strength_model"][1] == {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                        "display": "slider", "tooltip": "Strength on the diffusion model."}
    stack = LycorisStack.INPUT_TYPES()["optional"]
    assert stack["adapter_name_6"][0][0] == "None"


def test_pack_imports_like_comfyui(loras):
    import comfy_nodes

    module = comfy_nodes.load_custom_node(ROOT)
    assert set(module.NODE_CLASS_MAPPINGS) <= set(comfy_nodes.NODE_CLASS_MAPPINGS)
    assert comfy_nodes.NODE_CLASS_MAPPINGS["LycorisLoader"].RELATIVE_PYTHON_MODULE.startswith("custom_nodes.")
    web_dir = comfy_nodes.EXTENSION_WEB_DIRS[os.path.basename(ROOT)]
    assert os.path.isfile(os.path.join(web_dir, "lycoris.js"))
