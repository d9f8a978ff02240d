"""The generated DiT tables against three independent definitions, full size, on the meta device.

1. diffusers' own transformer classes with the released configs: the diffusers key space must
   be their state dict, key for key and shape for shape, at full size and at reduced depth
   (the config then read back from the keys), and every diffusers module name, under every
   diffusers-form naming scheme, must resolve to an address of its own shape;
2. diffusers' single-file converters (original checkpoint names -> diffusers): fed our native
   tables as tagged tensors, they must move every row where our row segments say (fused
   q/k/v splits, Lumina's 2304/768/768 GQA split, the (shift, scale) <-> (scale, shift) swap);
3. ComfyUI itself, when checked out (COMFYUI_PATH or a sibling ComfyUI/): its detection on our
   native keys must find the published configuration, its meta-built model must hold exactly
   our keys, and its LoRA key maps (diffusion model and text encoders) must agree with ours
   entry for entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dit_models import DEPTH_KEYS, DIFFUSERS_CONFIGS, diffusers_model, diffusers_shapes, row_tags, tagged

from lycoris_core import load_adapter
from lycoris_core.keymap import FAMILIES, detect_model, dit_table, map_adapter, state_shapes, variant_config
from lycoris_core.keymap.dit.names import resolve

VARIANTS = tuple(DIFFUSERS_CONFIGS)
ROOT = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI_PATH") or ROOT.parent / "ComfyUI")


@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_space_is_exactly_the_published_models_state_dict(variant):
    assert state_shapes(variant, "diffusers", ("diffusion_model",)) == diffusers_shapes(variant)


REDUCED = {  # variant -> depth overrides (diffusers config keys): "lite" models of every family
    "flux-dev": (2, 3), "flux-schnell": (1, 1), "chroma": (1, 2), "sd3.5-medium": (3,), "sd3.5-large": (2,),
    "wan2.1-i2v-14b": (2,), "wan2.2-ti2v-5b": (1,), "qwen-image": (2,), "hunyuan-video": (1, 2, 1),
    "lumina2": (2,), "hidream-i1": (1, 2), "z-image": (2,),
}


@pytest.mark.parametrize("variant", sorted(REDUCED))
def test_any_depth_is_read_from_the_keys_and_tabulated_exactly(variant):
    cls = DIFFUSERS_CONFIGS[variant][0]
    model = diffusers_model(variant, **dict(zip(DEPTH_KEYS[cls], REDUCED[variant], strict=False)))
    shapes = {f"transformer.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    layout = detect_model(shapes)
    family, standard = variant_config(variant)
    assert (layout.family, layout.space) == (family, "diffusers")
    assert layout.arch == f"{variant} [{'+'.join(map(str, layout.config.blocks))} blocks]"
    assert state_shapes_of(layout, "diffusers") == shapes
    # the same configuration read from ComfyUI-named keys, in every native space
    for space in ("comfy", "bare", "checkpoint"):
        native = state_shapes_of(layout, space)
        again = detect_model(native)
        assert (again.family, again.space, again.config) == (family, space, layout.config)


def state_shapes_of(layout, space):
    from lycoris_core.keymap import dit_state_shapes

    return dit_state_shapes(layout.family, layout.config, space, ("diffusion_model",))


DIFFUSERS_SCHEMES = {  # who writes diffusers module names, and how
    "peft": lambda d: f"transformer.{d}",
    "peft_raw": lambda d: f"base_model.model.{d}",
    "simpletuner_lycoris": lambda d: "lycoris_" + d.replace(".", "_"),
    "onetrainer": lambda d: "lora_transformer_" + d.replace(".", "_"),
    "diffsynth_bare": lambda d: d,
}


@pytest.mark.parametrize("variant", ["flux-dev", "chroma", "sd3.5-medium", "sd3.5-large", "wan2.1-i2v-14b",
                                     "wan2.2-ti2v-5b", "qwen-image", "hunyuan-video", "lumina2", "hidream-i1",
                                     "z-image"])
def test_every_diffusers_module_under_every_scheme_resolves_to_its_own_shape(variant):
    family, cfg = variant_config(variant)
    table = dit_table(family, cfg)
    shapes = diffusers_shapes(variant)
    modules = {}
    for key, shape in shapes.items():
        name = key.removeprefix("transformer.")
        if name.endswith(".bias"):
            continue
        modules[name.removesuffix(".weight")] = shape
    for scheme, spell in DIFFUSERS_SCHEMES.items():
        for name, shape in modules.items():
            found, _ = resolve(spell(name), family, cfg)
            assert found and found[0].address is not None, (scheme, name)
            assert table.shape_of(found[0].address) == shape, (scheme, name)


# ---- 2. diffusers' single-file converters ---------------------------------------------------

CONVERTERS = {  # variant (reduced depth) -> (converter, names it reads: ComfyUI's or Tencent's)
    "flux-dev": ("convert_flux_transformer_checkpoint_to_diffusers", (2, 2)),
    "chroma": ("convert_chroma_transformer_checkpoint_to_diffusers", (1, 2)),
    "sd3.5-medium": ("convert_sd3_transformer_checkpoint_to_diffusers", (3,)),
    "sd3.5-large": ("convert_sd3_transformer_checkpoint_to_diffusers", (2,)),
    "wan2.1-i2v-14b": ("convert_wan_transformer_to_diffusers", (2,)),
    "hunyuan-video": ("convert_hunyuan_video_transformer_to_diffusers", (1, 1, 2)),
    "lumina2": ("convert_lumina2_to_diffusers", (1, 1, 1)),
    "hidream-i1": ("convert_hidream_transformer_to_diffusers", (1, 1)),
    "z-image": ("convert_z_image_transformer_checkpoint_to_diffusers", (1, 1, 1)),
}


def _original_names(table):
    """native key -> the key an original checkpoint uses (Tencent's names for HunyuanVideo)."""
    out = {}
    for native in table.natives.values():
        names = [a for a, segs in table.extra.items() if table.family == "hunyuan_video"
                 and segs == ((native.name, 0, 0, native.rows),)]
        head = names[0] if names else native.name
        leaf = "weight" if native.leaf in ("weight", "scale") and names else native.leaf
        out[native.key] = f"{head}.{leaf}" if leaf else head
        if native.bias_key:
            out[native.bias_key] = f"{head}.bias"
    return out


@pytest.mark.parametrize("variant", sorted(CONVERTERS))
def test_diffusers_converter_moves_every_row_where_our_segments_say(variant):
    from dataclasses import replace

    from diffusers.loaders import single_file_utils

    converter, depth = CONVERTERS[variant]
    family, standard = variant_config(variant)
    cfg = FAMILIES[family].at_depth(standard, replace(standard, blocks=depth))
    table = dit_table(family, cfg)
    native = state_shapes_of_cfg(family, cfg, "bare")
    names = _original_names(table)
    tensors, index = tagged({names[k]: s for k, s in native.items()})
    by_tag = {i: key for key, i in index.items()}
    converted = getattr(single_file_utils, converter)(dict(tensors))
    expected_keys = state_shapes_of_cfg(family, cfg, "diffusers")
    assert {f"transformer.{k}": tuple(v.shape) for k, v in converted.items()} == expected_keys
    for dname, (leaf, segments) in table.diffusers.items():
        for suffix, attr in ((leaf, "key"), ("bias", "bias_key")):
            key = f"{dname}.{suffix}" if suffix else dname
            if key not in converted:
                continue
            got = row_tags(converted[key])
            want = torch.cat([
                torch.arange(ns, ns + rows, dtype=torch.int32) + index[names[getattr(table.natives[n], attr)]] * (1 << 16)
                for n, ns, _ds, rows in sorted(segments, key=lambda s: s[2])])
            assert torch.equal(got, want), (key, [by_tag[int(t) >> 16] for t in got[:1]])


def state_shapes_of_cfg(family, cfg, space):
    from lycoris_core.keymap import dit_state_shapes

    return dit_state_shapes(family, cfg, space, ("diffusion_model",))


# ---- 3. ComfyUI ------------------------------------------------------------------------------

COMFY_VARIANTS = ("flux-dev", "flux-schnell", "chroma", "sd3-medium", "sd3.5-medium", "sd3.5-large", "wan-t2v-14b",
                  "wan2.1-i2v-14b", "wan2.2-i2v-a14b", "wan2.1-t2v-1.3b", "wan2.2-ti2v-5b", "qwen-image",
                  "hunyuan-video", "lumina2", "hidream-i1")
COMFY_TEXT = {"flux", "sd3", "wan", "qwen_image", "hunyuan_video", "hidream", "lumina2"}
# what ComfyUI's detection must find in our keys: the published numbers
PUBLISHED = {
    "flux-dev": {"hidden_size": 3072, "depth": 19, "depth_single_blocks": 38, "guidance_embed": True, "in_channels": 16},
    "flux-schnell": {"depth": 19, "depth_single_blocks": 38, "guidance_embed": False},
    "chroma": {"image_model": "chroma", "depth": 19, "depth_single_blocks": 38},
    "sd3-medium": {"depth": 24, "x_block_self_attn_layers": [], "pos_embed_max_size": 192},
    "sd3.5-medium": {"depth": 24, "x_block_self_attn_layers": list(range(13)), "qk_norm": "rms", "pos_embed_max_size": 384},
    "sd3.5-large": {"depth": 38, "qk_norm": "rms", "pos_embed_max_size": 192},
    "wan-t2v-14b": {"dim": 5120, "ffn_dim": 13824, "num_layers": 40, "in_dim": 16, "model_type": "t2v"},
    "wan2.1-i2v-14b": {"dim": 5120, "num_layers": 40, "in_dim": 36, "model_type": "i2v"},
    "wan2.2-i2v-a14b": {"dim": 5120, "in_dim": 36, "model_type": "t2v"},
    "wan2.1-t2v-1.3b": {"dim": 1536, "ffn_dim": 8960, "num_layers": 30},
    "wan2.2-ti2v-5b": {"dim": 3072, "ffn_dim": 14336, "num_layers": 30, "in_dim": 48, "out_dim": 48},
    "qwen-image": {"num_layers": 60, "in_channels": 64},
    "hunyuan-video": {"hidden_size": 3072, "depth": 20, "depth_single_blocks": 40, "guidance_embed": True},
    "lumina2": {"dim": 2304, "n_layers": 26, "cap_feat_dim": 2304},
    "hidream-i1": {"num_layers": 16, "num_single_layers": 32},
}


def _shim_path() -> str:
    shims = os.environ.get("COMFY_SHIMS") or str(COMFYUI.parent / "comfy-shims")
    return shims if Path(shims).is_dir() else ""


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI's view of every variant, from one subprocess."""
    if not (COMFYUI / "comfy").is_dir():
        pytest.skip(f"no ComfyUI checkout at {COMFYUI} (set COMFYUI_PATH)")
    cases = []
    for variant in COMFY_VARIANTS:
        family, _ = variant_config(variant)
        shapes = state_shapes(variant, "bare", ("diffusion_model",))
        cases.append({"case": variant, "shapes": {k: list(v) for k, v in shapes.items()},
                      "text": family if family in COMFY_TEXT else None})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_shim_path(), env.get("PYTHONPATH", "")) if p)
    script = Path(__file__).with_name("dit_comfy_oracle.py")
    done = subprocess.run([sys.executable, str(script), str(COMFYUI)], input=json.dumps(cases), capture_output=True,
                          text=True, timeout=600, env=env)
    line = next((x for x in done.stdout.splitlines() if x.startswith("ORACLE ")), None)
    if line is None:
        pytest.skip(f"ComfyUI at {COMFYUI} did not run: {done.stderr[-500:]}")
    return json.loads(line[len("ORACLE "):])


@pytest.mark.parametrize("variant", COMFY_VARIANTS)
def test_comfyui_detects_the_published_config_and_builds_exactly_our_keys(comfy, variant):
    seen = comfy[variant]
    for key, value in PUBLISHED[variant].items():
        assert seen["unet_config"][key] == value, key
    assert {k: tuple(v) for k, v in seen["shapes"].items()} == state_shapes(variant, "bare", ("diffusion_model",))


@pytest.mark.parametrize("variant", [v for v in COMFY_VARIANTS if variant_config(v)[0] in COMFY_TEXT])
def test_comfyui_text_encoders_hold_exactly_our_keys(comfy, variant):
    family, _ = variant_config(variant)
    theirs = {k: tuple(v) for k, v in comfy[variant]["text_shapes"].items()
              if not k.endswith("logit_scale") and ".transformer.visual." not in k}
    assert theirs == state_shapes(variant, "comfy", tuple(FAMILIES[family].text))


def _lora_for(names_to_shapes):
    tensors = {}
    for name, shape in names_to_shapes.items():
        if len(shape) == 1:
            tensors[f"{name}.w_norm"] = torch.zeros(shape)
            continue
        if len(shape) > 2 or shape[0] == 1:  # convs and raw parameters: a full diff
            tensors[f"{name}.diff"] = torch.zeros(shape)
            continue
        tensors[f"{name}.lora_down.weight"] = torch.zeros((1, shape[1]))
        tensors[f"{name}.lora_up.weight"] = torch.zeros((shape[0], 1))
    return load_adapter(tensors).modules


def _comfy_targets(key_map, model_shapes, prefix=""):
    """ComfyUI key-map entries whose target is a weight-like key of the model: name -> (key, rows, swap)."""
    out = {}
    for name, value in key_map.items():
        key, rows, swap = (value, None, False) if isinstance(value, str) else (
            value[0], tuple(value[1][1:]) if value[1] else None, len(value) == 3)
        if key.endswith(".bias"):
            continue  # bias-only "modules": ComfyUI applies .diff patches to a bias key; not an adapter module
        out[name] = (key, rows, swap)
    return out


@pytest.mark.parametrize("variant", COMFY_VARIANTS)
def test_every_comfyui_lora_key_lands_where_comfyui_puts_it(comfy, variant):
    """ComfyUI's model_lora_keys_unet for this model, entry by entry: same key, same rows, same swap.

    Entries whose target the model does not have are what ComfyUI drops silently; ours must
    be unmatched (never silently elsewhere).
    """
    shapes = state_shapes(variant, "comfy")
    entries = _comfy_targets(comfy[variant]["key_map"], shapes)
    present = {n: e for n, e in entries.items() if e[0] in shapes}
    dropped = [n for n, e in entries.items() if e[0] not in shapes]

    def sliced(entry):
        key, rows, _swap = entry
        return (rows[1], *shapes[key][1:]) if rows else shapes[key]

    report = map_adapter(_lora_for({n: sliced(e) for n, e in present.items()}), shapes)
    assert report.mismatched == [] and report.unmatched == []
    for name, (key, rows, swap) in present.items():
        if swap:
            pieces = report.pieces[name]
            half = shapes[key][0] // 2
            assert [(p.weight_key, p.rows, p.source_rows) for p in pieces] == [
                (key, (half, half), (0, half)), (key, (0, half), (half, half))], name
            continue
        target = report.targets[name]
        assert (target.weight_key, target.rows) == (key, rows), name
    if dropped:
        family, _ = variant_config(variant)
        table = dit_table(*variant_config(variant))
        for name in dropped:
            found, _ = resolve(name, family, table.config)
            assert not found, f"{name}: ComfyUI's target {entries[name][0]} is absent, yet it resolves"


@pytest.mark.parametrize("variant", [v for v in COMFY_VARIANTS if variant_config(v)[0] in COMFY_TEXT])
def test_every_comfyui_text_lora_key_lands_where_comfyui_puts_it(comfy, variant):
    shapes = state_shapes(variant, "comfy")
    # lora_prior_te_*: Stable Cascade's prefix, which ComfyUI also registers wherever a CLIP-G is
    # the Qwen2.5-VL vision tower is not tabulated (adapters do not train it; see keymap.dit.text)
    key_map = {n: k for n, k in comfy[variant]["text_key_map"].items()
               if not n.startswith("lora_prior_") and ".transformer.visual." not in k}
    entries = {n: k for n, k in key_map.items() if k in shapes}
    assert len(entries) == len(key_map)  # ComfyUI maps only keys its encoders have
    report = map_adapter(_lora_for({n: shapes[k] for n, k in entries.items()}), shapes)
    assert report.mismatched == [] and report.unmatched == [] and not report.pieces
    assert {n: t.weight_key for n, t in report.targets.items()} == entries
