"""DiT adapter files from the real producers, patched into ComfyUI-space weights at strength 0.7.

Models are reduced in depth and real in width (Flux with 1 double + 1 single block, ...);
only the weights an adapter touches are real (bf16, as Flux ships). For every target the
patched tensor must equal (a) the module's own math on exactly its rows of the fused weight
(bit for bit, the rows around it untouched) and (b) the producer's formula: PEFT's
(alpha/r)·B·A (and DoRA's magnitude over W0 + that), LyCORIS's own `get_diff_weight` /
`get_merged_weight` of the module that wrote the file, kohya split_qkv's sum of the split
LoRAs at their trained scale.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from dit_models import diffusers_model
from dit_producers import BFLFlux, kohya_file, lycoris_file, peft_file
from safetensors.torch import load_file, save_file

from lycoris_core import Adapter, load_adapter
from lycoris_core.keymap import FAMILIES, dit_state_shapes, variant_config
from lycoris_core.patch import AdapterSpec, WeightPatcher

STRENGTH = 0.7
H = 3072


def reduced(variant: str, blocks: tuple[int, ...]):
    family, standard = variant_config(variant)
    cfg = FAMILIES[family].at_depth(standard, replace(standard, blocks=blocks))
    return family, cfg, dit_state_shapes(family, cfg, "comfy")


def real_weights(shapes, keys, seed=1):
    """bf16 random weights (and biases) for the given ComfyUI keys."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(keys):
        for k in (key, key.removesuffix(".weight") + ".bias"):
            if k in shapes and k not in out:
                out[k] = (torch.randn(shapes[k], generator=gen) * 0.05).to(torch.bfloat16)
    return out


class _Originals(dict):
    """The untouched base tensors, as WeightPatcher's restore source (no second in-memory backup)."""

    name = "originals"


def patch(adapter, shapes, base):
    """Patch fresh copies of `base` at strength 0.7; returns (report, originals, patched weights)."""
    weights = {k: v.clone() for k, v in base.items()}
    plan = WeightPatcher(weights, model_shapes=shapes, restore_from=_Originals(base)).apply(
        [AdapterSpec(adapter, STRENGTH, STRENGTH)])
    return plan.reports[0], base, weights


def rows_of(tensor, rows):
    return tensor if rows is None else tensor.narrow(0, rows[0], rows[1])


def check_exact(report, adapter, originals, weights):
    """Every target equals module.apply on its rows; every other row of a touched key is untouched."""
    touched = {}
    for name, target in report.targets.items():
        module = adapter.modules[name]
        want = module.apply(rows_of(originals[target.weight_key], target.rows), STRENGTH)
        assert torch.equal(rows_of(weights[target.weight_key], target.rows), want), name
        touched.setdefault(target.weight_key, []).append(target.rows)
        if target.bias_key:
            bias = rows_of(originals[target.bias_key], target.rows).float() + STRENGTH * module.bias_delta()
            assert torch.equal(rows_of(weights[target.bias_key], target.rows), bias.to(torch.bfloat16)), name
    for key, spans in touched.items():
        if None in spans:
            continue
        start = 0
        for begin, length in sorted(spans) + [(weights[key].shape[0], 0)]:
            if begin > start:  # rows between the targets' slices are untouched
                assert torch.equal(weights[key][start:begin], originals[key][start:begin]), key
            start = max(start, begin + length)


def check_formula(patched, original, delta_rows, name, step=61):
    """patched (bf16) == original + 0.7 * delta on every `step`-th row, up to bf16's rounding.

    `delta_rows(index)` gives the formula's delta on those rows (check_exact covers every row).
    """
    index = torch.arange(0, original.shape[0], step)
    want = original[index].float() + STRENGTH * delta_rows(index).float().reshape(original[index].shape)
    err = (patched[index].float() - want).abs()
    assert bool((err <= 1e-6 + 2 ** -7 * want.abs()).all()), f"{name}: max error {float(err.max())}"


def lycoris_forward_matches(lyco, module, original, bias, name):
    """Our delta of the module equals what the LyCORIS module's own forward adds, on a random input.

    (LyCORIS's merge helpers scale LoHa/LoKr by alpha/rank twice in 4.1.3: the forward is the oracle.)
    Where the forward is W0 x + delta x (LoRA, LoHa, LoKr) W0 is zeroed for the call, so the
    delta is read without cancellation; DoRA and full read W0 and are compared as a difference.
    """
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, original.shape[1], generator=gen)
    org = lyco.org_module[0]
    additive = not (module.dora or module.algo == "full")
    with torch.no_grad():
        if additive:
            saved = org.weight.data.clone(), None if org.bias is None else org.bias.data.clone()
            org.weight.data.zero_()
            if org.bias is not None:
                org.bias.data.zero_()
            added = lyco(x)
            org.weight.data.copy_(saved[0])
            if saved[1] is not None:
                org.bias.data.copy_(saved[1])
        else:
            base = torch.nn.functional.linear(x, original.float(), None if bias is None else bias.float())
            added = lyco(x) - base
    ours = x @ module.delta(original).float().T
    if module.has_bias:
        ours = ours + module.bias_delta().float()
    torch.testing.assert_close(ours, added, rtol=1e-4, atol=1e-4 * float(added.abs().max()), msg=name)


def target_of(report, name):
    return report.targets[name]


# ---- shared base weights --------------------------------------------------------------------

FLUX_KEYS = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj",
             "single_blocks.0.linear1", "final_layer.adaLN_modulation.1")


@pytest.fixture(scope="module")
def flux_base():
    """Flux with 1 double + 1 single block (real width): shapes, and real bf16 weights of its fused layers."""
    _family, _cfg, shapes = reduced("flux-dev", (1, 1))
    return shapes, real_weights(shapes, {f"diffusion_model.{k}.weight" for k in FLUX_KEYS}, seed=7)


def subset(base, keys):
    """The base tensors of these weight keys and their biases."""
    out = {}
    for key in keys:
        for k in (key, key.removesuffix(".weight") + ".bias"):
            if k in base:
                out[k] = base[k]
    return out


def _map(adapter, shapes):
    from lycoris_core.keymap import map_adapter

    return map_adapter(adapter.modules, shapes)


# ---- PEFT ------------------------------------------------------------------------------------

_D0 = r"transformer_blocks\.0\."
PEFT_CASES = {
    # variant, depth, pipeline, PEFT target_modules (a regex: PEFT fullmatches it), expected module -> (key, rows)
    "flux": ("flux-dev", {"num_layers": 1, "num_single_layers": 1}, "FluxPipeline",
             rf"({_D0}attn\.(to_q|to_k|to_v|add_v_proj|to_out\.0)|single_{_D0}(attn\.to_q|proj_mlp)|norm_out\.linear)",
             {"transformer.transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv.weight", (H, H)),
              "transformer.transformer_blocks.0.attn.add_v_proj": ("double_blocks.0.txt_attn.qkv.weight", (2 * H, H)),
              "transformer.single_transformer_blocks.0.attn.to_q": ("single_blocks.0.linear1.weight", (0, H)),
              "transformer.single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1.weight", (3 * H, 4 * H)),
              "transformer.transformer_blocks.0.attn.to_out.0": ("double_blocks.0.img_attn.proj.weight", None)}),
    "flux-dora": ("flux-dev", {"num_layers": 1, "num_single_layers": 1}, "FluxPipeline",
                  rf"{_D0}attn\.(to_k|add_q_proj)",
                  {"transformer.transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv.weight", (H, H)),
                   "transformer.transformer_blocks.0.attn.add_q_proj": ("double_blocks.0.txt_attn.qkv.weight", (0, H))}),
    "sd3.5-medium": ("sd3.5-medium", {"num_layers": 2}, "StableDiffusion3Pipeline",
                     ["to_q", "to_k", "to_v", "add_q_proj", "to_out.0"],
                     {"transformer.transformer_blocks.0.attn2.to_v": ("joint_blocks.0.x_block.attn2.qkv.weight", (3072, 1536)),
                      "transformer.transformer_blocks.1.attn.add_q_proj": ("joint_blocks.1.context_block.attn.qkv.weight",
                                                                           (0, 1536)),
                      "transformer.transformer_blocks.1.attn2.to_out.0": ("joint_blocks.1.x_block.attn2.proj.weight", None)}),
    "wan2.1-i2v-dora": ("wan2.1-i2v-14b", {"num_layers": 1}, "WanPipeline", ["attn1.to_q", "add_k_proj"],
                        {"transformer.blocks.0.attn2.add_k_proj": ("blocks.0.cross_attn.k_img.weight", None),
                         "transformer.blocks.0.attn1.to_q": ("blocks.0.self_attn.q.weight", None)}),
    "qwen-image": ("qwen-image", {"num_layers": 1}, "QwenImagePipeline", ["to_q", "add_k_proj", "img_mlp.net.2"],
                   {"transformer.transformer_blocks.0.img_mlp.net.2": ("transformer_blocks.0.img_mlp.net.2.weight", None)}),
}


def _peft_delta(tensors, name, original, dora: bool):
    """PEFT's own formula on some rows: (alpha/r)·B·A, for DoRA m ⊙ (W0 + that) / ||W0 + that||_row - W0."""
    up, down = tensors[f"{name}.lora_B.weight"].float(), tensors[f"{name}.lora_A.weight"].float()

    def rows(index):
        delta = (8 / 4) * up[index] @ down
        if not dora:
            return delta
        w0 = original[index].float().reshape(delta.shape)
        merged = w0 + delta
        magnitude = tensors[f"{name}.lora_magnitude_vector"].float().reshape(-1, 1)[index]
        return magnitude * merged / merged.norm(dim=1, keepdim=True) - w0

    return rows


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_files_from_save_lora_weights_patch_their_rows(tmp_path, flux_base, case):
    variant, depth, pipeline, targets, expected = PEFT_CASES[case]
    dora = case.endswith("dora")
    family, _ = variant_config(variant)
    path = peft_file(tmp_path, diffusers_model(variant, **depth), pipeline, targets, dora=dora)
    adapter = load_adapter(path)
    assert adapter.alpha_source == "metadata" and {m.alpha for m in adapter.modules.values()} == {8.0}
    if family == "flux":
        shapes, base = flux_base[0], subset(flux_base[1], {"diffusion_model." + k for k, _ in expected.values()} |
                                            {"diffusion_model.final_layer.adaLN_modulation.1.weight"})
    else:
        _family, _cfg, shapes = reduced(variant, (depth["num_layers"],))
        base = real_weights(shapes, {t.weight_key for t in _map(adapter, shapes).targets.values()})
    report, originals, weights = patch(adapter, shapes, base)
    assert report.summary().startswith(f"{report.adapter_arch} adapter on {variant} [")
    assert report.adapter_arch == {"flux": "flux", "sd3": "sd3.5-medium", "wan": "wan2.1-i2v-14b"}.get(family, variant)
    assert report.unmatched == [] and report.mismatched == [] and report.not_applicable == []
    for name, (key, rows) in expected.items():
        target = report.targets[name]
        assert (target.weight_key, target.rows) == ("diffusion_model." + key, rows), name
    check_exact(report, adapter, originals, weights)
    tensors = load_file(str(path))
    for name, target in report.targets.items():
        original = rows_of(originals[target.weight_key], target.rows)
        check_formula(rows_of(weights[target.weight_key], target.rows), original,
                      _peft_delta(tensors, name, original, dora), name)
    if case == "flux":
        _check_swap_pieces(report, adapter, originals, weights)


def _check_swap_pieces(report, adapter, originals, weights):
    """diffusers' norm_out.linear is (scale, shift); ComfyUI's final_layer.adaLN_modulation.1 is (shift, scale).

    The report lists it as two pieces; applied as they say (rows [h, 2h) of the weight take
    rows [0, h) of the delta and the other way round) they give the swapped delta - what
    comfy.utils.swap_scale_shift does to it - and the patch engine applies them so.
    """
    name = "transformer.norm_out.linear"
    key = "diffusion_model.final_layer.adaLN_modulation.1.weight"
    base = originals[key].float()
    delta = adapter.modules[name].delta()
    applied = base.clone()
    for piece in report.pieces[name]:
        assert piece.weight_key == key and piece.bias_key is None
        applied.narrow(0, *piece.rows).add_(delta.narrow(0, *piece.source_rows), alpha=STRENGTH)
    shift, scale = delta.chunk(2)
    expected = base + STRENGTH * torch.cat([scale, shift])
    torch.testing.assert_close(applied, expected, rtol=1e-6, atol=1e-7)
    patched = weights[key]
    assert not torch.equal(patched, originals[key])
    torch.testing.assert_close(patched.float(), expected.to(patched.dtype).float(), rtol=8e-3, atol=1e-6)


# ---- LyCORIS generic wrapper on a diffusers transformer --------------------------------------

DOUBLE_TARGETS = {  # diffusers module -> (ComfyUI module, rows)
    "transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv", (0, H)),
    "transformer_blocks.0.attn.add_v_proj": ("double_blocks.0.txt_attn.qkv", (2 * H, H)),
}
SINGLE_TARGETS = {  # linear1 = q, k, v, MLP-in
    "single_transformer_blocks.0.attn.to_k": ("single_blocks.0.linear1", (H, H)),
    "single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1", (3 * H, 4 * H)),
}
LYCORIS_ALGOS = {  # name -> (algo, kwargs, also linear1's slices)
    "lora": ("lora", {}, True),
    "loha": ("loha", {}, False),
    "lokr": ("lokr", {"factor": 8}, True),
    "lora-dora": ("lora", {"dora_wd": True}, False),
    "lokr-dora-in": ("lokr", {"factor": 8, "dora_wd": True, "wd_on_output": False}, False),
    "full": ("full", {}, True),  # diff + diff_b: the bias rows of the slice too
}


def _set_real(module, weight, bias=None):
    module.weight = torch.nn.Parameter(weight.float().clone())
    if bias is not None:
        module.bias = torch.nn.Parameter(bias.float().clone())


@pytest.mark.parametrize("algo", sorted(LYCORIS_ALGOS))
def test_lycoris_create_lycoris_on_diffusers_flux_lands_on_fused_rows(tmp_path, flux_base, algo):
    shapes, all_base = flux_base
    name, kwargs, single = LYCORIS_ALGOS[algo]
    targets = DOUBLE_TARGETS | (SINGLE_TARGETS if single else {})
    base = subset(all_base, {f"diffusion_model.{n}.weight" for n, _ in targets.values()})
    transformer = diffusers_model("flux-dev", num_layers=1, num_single_layers=1)
    for d, (native, rows) in targets.items():  # LyCORIS reads W0 for full and DoRA
        key = f"diffusion_model.{native}"
        _set_real(transformer.get_submodule(d), rows_of(base[key + ".weight"], rows), rows_of(base[key + ".bias"], rows))
    path, lycos = lycoris_file(tmp_path / f"{algo}.safetensors", transformer, list(targets), name, **kwargs)
    adapter = load_adapter(path)
    report, originals, weights = patch(adapter, shapes, base)
    assert report.unmatched == [] and report.mismatched == [] and len(report.targets) == len(targets)
    for d, (native, rows) in targets.items():
        target = report.targets["lycoris_" + d.replace(".", "_")]
        assert (target.weight_key, target.rows) == (f"diffusion_model.{native}.weight", rows)
        assert target.bias_key == (f"diffusion_model.{native}.bias" if algo == "full" else None)
    check_exact(report, adapter, originals, weights)
    for lyco_name, lyco in lycos.items():
        target = report.targets[lyco_name]
        lycoris_forward_matches(lyco, adapter.modules[lyco_name], rows_of(originals[target.weight_key], target.rows),
                                rows_of(originals[target.weight_key.replace(".weight", ".bias")], target.rows), lyco_name)


# ---- LyCORIS kohya wrapper on BFL names ------------------------------------------------------

@pytest.mark.parametrize(("algo", "kwargs"), [("lora", {}), ("loha", {}), ("lokr", {"factor": 8}),
                                              ("lora", {"dora_wd": True})])
def test_lycoris_kohya_wrapper_on_bfl_names_patches_whole_fused_weights(tmp_path, flux_base, algo, kwargs):
    shapes, all_base = flux_base
    with torch.device("meta"):
        unet = BFLFlux(double=1, single=1)
    whole_tree = algo == "lora" and not kwargs  # every block linear once; the others by name
    targets = {"double_blocks.0.img_attn.qkv": "lora_unet_double_blocks_0_img_attn_qkv"}
    if whole_tree:
        targets["single_blocks.0.linear1"] = "lora_unet_single_blocks_0_linear1"
    base = subset(all_base, {f"diffusion_model.{n}.weight" for n in targets})
    for native in targets:  # real W0 where LyCORIS (DoRA) and the forward check read it
        key = f"diffusion_model.{native}"
        _set_real(unet.get_submodule(native), base[key + ".weight"], base[key + ".bias"])
    path, lycos = kohya_file(tmp_path / "kohya.safetensors", unet, algo, names=None if whole_tree else list(targets),
                             **kwargs)
    adapter = load_adapter(path)
    kept = Adapter(adapter.source, {n: adapter.modules[n] for n in targets.values()}, {})
    report, originals, weights = patch(kept, shapes, base)
    assert set(report.targets) == set(targets.values()) and report.split_qkv == {}
    assert all(t.rows is None for t in report.targets.values())
    check_exact(report, kept, originals, weights)
    for native, name in targets.items():
        key = f"diffusion_model.{native}"
        lycoris_forward_matches(lycos[name], kept.modules[name], originals[key + ".weight"], originals[key + ".bias"], name)
    if whole_tree:  # the whole file: every block linear of the BFL tree, in kohya's spelling, maps
        names = set(adapter.modules)
        assert {"lora_unet_double_blocks_0_txt_mod_lin", "lora_unet_double_blocks_0_img_mlp_2",
                "lora_unet_single_blocks_0_linear2", "lora_unet_single_blocks_0_modulation_lin"} <= names
        full = _map(adapter, shapes)
        assert full.unmatched == [] and full.mismatched == [] and full.matched == len(names) == 13


# ---- kohya split_qkv (sd-scripts#2204) -------------------------------------------------------

def split_qkv_file(path, rank=4, alpha=2.0, converter_rescaled=False, dense=False, seed=5):
    """sd-scripts lora_flux with split_qkv=True, as its state_dict() re-fuses it on save.

    Layout (sd-scripts networks/lora_flux.py LoRANetwork.state_dict): a double block's
    `img_attn.qkv` is trained as 3 rank-r LoRAs (q, k, v: 3072 rows each), a single block's
    `linear1` as 4 (q, k, v and the 12288-row MLP input). Saved fused: `lora_down` = the downs
    stacked (n*r, 3072); `lora_up` block diagonal (sum of rows, n*r): part j's rows only in
    columns j*r..(j+1)*r; `alpha` the split LoRAs' own (unchanged). `converter_rescaled`:
    alpha multiplied by n, as musubi's converters do; `dense`: an ordinary rank-n*r LoRA.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors, parts = {}, {}
    for name, splits in (("lora_unet_double_blocks_0_img_attn_qkv", (H, H, H)),
                         ("lora_unet_single_blocks_0_linear1", (H, H, H, 4 * H))):
        n = len(splits)
        downs = [torch.randn(rank, H, generator=gen) * 0.05 for _ in splits]
        ups = [torch.randn(rows, rank, generator=gen) * 0.05 for rows in splits]
        up = torch.zeros(sum(splits), n * rank)
        start = 0
        for j, (rows, part) in enumerate(zip(splits, ups, strict=True)):
            up[start:start + rows, j * rank:(j + 1) * rank] = part
            start += rows
        if dense:
            up = torch.randn(up.shape, generator=gen) * 0.05
        tensors[f"{name}.lora_down.weight"] = torch.cat(downs)
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alpha * (n if converter_rescaled else 1))
        parts[name] = (downs, ups)
    # an ordinary module of the same file (rank r, the network alpha)
    tensors["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"] = torch.randn(rank, H, generator=gen) * 0.05
    tensors["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] = torch.randn(H, rank, generator=gen) * 0.05
    tensors["lora_unet_double_blocks_0_img_attn_proj.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), {"ss_network_module": "networks.lora_flux", "ss_network_args": '{"split_qkv": "True"}'})
    return path, parts


def test_kohya_split_qkv_gets_its_trained_scale(tmp_path, flux_base):
    shapes, all_base = flux_base
    rank, alpha = 4, 2.0
    path, parts = split_qkv_file(tmp_path / "split.safetensors", rank, alpha)
    adapter = load_adapter(path)
    base = subset(all_base, {"diffusion_model.double_blocks.0.img_attn.qkv.weight",
                             "diffusion_model.single_blocks.0.linear1.weight",
                             "diffusion_model.double_blocks.0.img_attn.proj.weight"})
    report, originals, weights = patch(adapter, shapes, base)
    assert report.split_qkv == {"lora_unet_double_blocks_0_img_attn_qkv": 3, "lora_unet_single_blocks_0_linear1": 4}
    assert "2 kohya split_qkv at trained scale (x3/x4)" in report.summary()
    check_exact(report, adapter, originals, weights)
    for name, (downs, ups) in parts.items():  # what the split LoRAs were trained to add: each at alpha / r
        key = report.targets[name].weight_key
        delta = torch.cat([(alpha / rank) * u @ d for u, d in zip(ups, downs, strict=True)])
        check_formula(weights[key], originals[key], lambda index, d=delta: d[index], name)
    assert adapter.modules["lora_unet_double_blocks_0_img_attn_proj"].scale == alpha / rank


@pytest.mark.parametrize("variant", ["converter_rescaled", "dense"])
def test_split_qkv_lookalikes_keep_their_stored_scale(tmp_path, flux_base, variant):
    """alpha already multiplied by n (a converter's fix), or a dense fused LoRA: nothing to correct."""
    shapes, _ = flux_base
    rank, alpha = 4, 2.0
    path, _parts = split_qkv_file(tmp_path / "s.safetensors", rank, alpha, converter_rescaled=variant == "converter_rescaled",
                                  dense=variant == "dense")
    adapter = load_adapter(path)
    report = _map(adapter, shapes)
    assert report.split_qkv == {} and "split_qkv" not in report.summary()
    n = {"lora_unet_double_blocks_0_img_attn_qkv": 3, "lora_unet_single_blocks_0_linear1": 4}
    for name, parts in n.items():
        stored_alpha = alpha * parts if variant == "converter_rescaled" else alpha
        assert adapter.modules[name].scale == stored_alpha / (parts * rank)
