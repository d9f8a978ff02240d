"""DiT block weights: the published Flux table, every family's table at any depth, the named form,
errors that list what is accepted, and per family that a block's weight scales exactly its modules.

The numeric checks use reduced-depth, real-width models (2 blocks per group) where only the
weights the adapter touches are real bf16 tensors; every other key is a shape only.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from dit_adapters import NATIVE_SCHEMES, adapter_tensors

from lycoris_core import BlockWeightError, load_adapter
from lycoris_core.keymap import FAMILIES, dit_state_shapes, dit_table, map_adapter, variant_config
from lycoris_core.keymap.dit.names import kohya_text_name
from lycoris_core.keymap.dit.text import text_table
from lycoris_core.keymap.layout import ModelLayout
from lycoris_core.patch import AdapterSpec, WeightPatcher
from lycoris_core.patch.blocks import dit_block_table, parse_block_weights

# sd-webui-lora-block-weight (scripts/lora_block_weight.py, BLOCKID for Flux), written out by hand
HAKO_FLUX = ["CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)), "OUT"]

# the block groups of each family (dit-architectures.md §11), as the README documents them
DOCUMENTED = {
    "flux-dev": "CLIP, T5, IN, D00-D18, S00-S37, OUT",
    "chroma": "CLIP, T5, IN, D00-D18, S00-S37, OUT",
    "sd3-medium": "CLIP, CLIP_G, T5, IN, J00-J23, OUT",
    "sd3.5-medium": "CLIP, CLIP_G, T5, IN, J00-J23, OUT",
    "sd3.5-large": "CLIP, CLIP_G, T5, IN, J00-J37, OUT",
    "wan-t2v-14b": "T5, IN, B00-B39, OUT",
    "wan2.1-t2v-1.3b": "T5, IN, B00-B29, OUT",
    "wan2.2-ti2v-5b": "T5, IN, B00-B29, OUT",
    "qwen-image": "QWEN, IN, B00-B59, OUT",
    "hunyuan-video": "CLIP, LLAMA, IN, D00-D19, S00-S39, OUT",
    "hidream-i1": "CLIP, CLIP_G, T5, LLAMA, IN, D00-D15, S00-S31, OUT",
    "lumina2": "GEMMA, IN, L00-L25, NR00-NR01, CR00-CR01, OUT",
    "z-image": "IN, L00-L29, NR00-NR01, CR00-CR01, OUT",
}
STRENGTH, CLIP_STRENGTH = 0.8, 0.6


def table_of(variant, blocks=None):
    family, cfg = variant_config(variant)
    if blocks is not None:
        cfg = FAMILIES[family].at_depth(cfg, replace(cfg, blocks=blocks))
    return family, cfg, dit_block_table(family, cfg)


def layout(variant, blocks=None):
    family, cfg, t = table_of(variant, blocks)
    return ModelLayout(t.model, "comfy", frozenset({"diffusion_model", *FAMILIES[family].text}), family, cfg)


def test_flux_table_is_lora_block_weights_61_slots_and_fluxall_is_all_ones():
    _f, _c, t = table_of("flux-dev")
    assert list(t.slots) == HAKO_FLUX
    assert parse_block_weights("FLUXALL").resolve("flux-dev") == dict.fromkeys(
        ["clip_l", "t5xxl", "IN", *HAKO_FLUX[3:-1], "OUT"], 1.0)
    vector = [i / 100 for i in range(61)]
    w = parse_block_weights(vector).resolve("flux-dev")
    assert (w["clip_l"], w["t5xxl"], w["IN"], w["D00"], w["D18"], w["S00"], w["S37"], w["OUT"]) == \
        (0.0, 0.01, 0.02, 0.03, 0.21, 0.22, 0.59, 0.60)


@pytest.mark.parametrize("variant", sorted(DOCUMENTED))
def test_every_family_table_is_the_documented_one(variant):
    _f, _c, t = table_of(variant)
    assert t.describe() == DOCUMENTED[variant]
    assert t.full == t.slots
    assert parse_block_weights(",".join(["0.5"] * len(t.slots))).resolve(variant) == dict.fromkeys(t.ids.values(), 0.5)


def test_readme_and_docstring_list_every_table():
    from pathlib import Path

    from lycoris_core.patch import blocks

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    for table in set(DOCUMENTED.values()):
        assert f"`{table}`" in readme, table
        assert table in blocks.__doc__, table


def test_every_module_of_every_family_is_in_one_slot():
    for variant in DOCUMENTED:
        family, cfg, t = table_of(variant)
        blocks = {n.block for n in dit_table(family, cfg).natives.values()}
        assert None not in blocks and blocks <= set(t.slots), variant


def test_named_form_on_flux():
    w = parse_block_weights("double=0.5, single03-10=0, t5=0").resolve("flux-dev")
    assert w["D00"] == w["D18"] == 0.5 and w["S02"] == 1 and w["S03"] == w["S10"] == 0 and w["S11"] == 1
    assert w["t5xxl"] == 0 and w["clip_l"] == 1 and w["IN"] == w["OUT"] == 1
    w = parse_block_weights("default=0, d10-s01=0.7, base=0.2, in=1").resolve("flux-dev")
    assert w["D09"] == 0 and w["D10"] == w["D18"] == w["S00"] == w["S01"] == 0.7 and w["S02"] == 0
    assert w["clip_l"] == w["t5xxl"] == 0.2 and w["IN"] == 1 and w["OUT"] == 0
    w = parse_block_weights("joint=0, j05=2, clip_g=0.5").resolve("sd3.5-large")
    assert w["J04"] == 0 and w["J05"] == 2 and w["J37"] == 0 and w["clip_g"] == 0.5 and w["clip_l"] == 1
    w = parse_block_weights("layers=0, nr=0.5, cr01=2, gemma=0").resolve("lumina2")
    assert w["L25"] == 0 and w["NR00"] == w["NR01"] == 0.5 and w["CR00"] == 1 and w["CR01"] == 2
    assert w["gemma2_2b"] == 0
    w = parse_block_weights("blocks=0.5, b30-39=0, t5=0").resolve("wan2.1-i2v-14b")
    assert w["B29"] == 0.5 and w["B30"] == w["B39"] == 0 and w["umt5xxl"] == 0


def test_reduced_model_table_follows_its_depth_and_reads_a_full_vector_by_block_id():
    lite = layout("flux-dev", (2, 3))
    t = dit_block_table(lite.family, lite.config)
    assert t.describe() == "CLIP, T5, IN, D00-D01, S00-S02, OUT" and len(t.full) == 61
    own = parse_block_weights([0.1 * i for i in range(len(t.slots))]).resolve(lite)
    assert [round(v, 6) for v in own.values()] == [round(0.1 * i, 6) for i in range(9)]
    full = parse_block_weights([i / 100 for i in range(61)]).resolve(lite)
    assert full == {"clip_l": 0.0, "t5xxl": 0.01, "IN": 0.02, "D00": 0.03, "D01": 0.04, "S00": 0.22, "S01": 0.23,
                    "S02": 0.24, "OUT": 0.6}
    # names are checked against the published table; they set the blocks the model has
    w = parse_block_weights("single01-10=0, d18=5").resolve(lite)
    assert (w["S00"], w["S01"], w["S02"], w["D01"]) == (1, 0, 0, 1)


@pytest.mark.parametrize(
    "spec, model, message",
    [
        ("1,1,1", "flux-dev", "61 numbers \\(CLIP, T5, IN, D00-D18, S00-S37, OUT\\)"),
        (",".join(["1"] * 17), "wan-t2v-14b", "43 numbers \\(T5, IN, B00-B39, OUT\\)"),
        ("MIDD", "sd3-medium", "preset MIDD is not defined for DiT models.*NONE, ALL, ALL0.5"),
        ("FLUXALL", "qwen-image", "NONE, ALL, ALL0.5\\)"),
        ("FLUXALL", "sdxl", "Flux table"),
        ("d19=0", "flux-dev", "no slot D19; its table is CLIP, T5, IN, D00-D18, S00-S37, OUT"),
        ("joint=0", "flux-dev", "no joint blocks"),
        ("qwen=0", "flux-dev", "no slot QWEN"),
        ("s10-03=0", "flux-dev", "runs backwards"),
        ("double=0", "sd1", "unknown block 'double'"),
        ("dbl=1", "flux-dev", "unknown block 'dbl'"),
    ],
)
def test_bad_dit_specs_say_what_is_accepted(spec, model, message):
    with pytest.raises(BlockWeightError, match=message):
        parse_block_weights(spec).resolve(model)


def test_reduced_model_error_lists_both_lengths():
    with pytest.raises(BlockWeightError, match="a vector of 9 numbers .* or 61 \\(the full flux-dev table"):
        parse_block_weights("1,1").resolve(layout("flux-dev", (2, 3)))


# ---- per family: a block's weight scales exactly that block's modules -------------------------

REDUCED = {  # two blocks in some group of each kind of ID, one elsewhere (the time goes into real-width tensors)
    "flux-dev": (2, 1), "chroma": (1, 1), "sd3.5-medium": (2,), "wan2.1-i2v-14b": (1,), "qwen-image": (2,),
    "hunyuan-video": (1, 1, 1), "hidream-i1": (1, 2), "lumina2": (2, 1, 1), "z-image": (1, 1, 1),
}


def _one_module_per_slot(family, cfg):
    """The smallest 2-D native module of every block slot (kohya names), and one module per text encoder."""
    natives = {}
    for n in dit_table(family, cfg).natives.values():
        if len(n.weight) < 2 or not n.leaf == "weight":
            continue
        best = natives.get(n.block)
        if best is None or _numel(n.weight) < _numel(best.weight):
            natives[n.block] = n
    targets = {NATIVE_SCHEMES["kohya"](n.name): n.weight for n in natives.values()}
    for part, tcfg in FAMILIES[family].text.items():
        module = next(m for m in text_table(tcfg)
                      if m.name.endswith(("layers.0.self_attn.q_proj", "block.0.layer.0.SelfAttention.q")))
        targets[kohya_text_name(family, part, module.name)] = module.weight
    return targets


def _numel(shape):
    out = 1
    for d in shape:
        out *= d
    return out


@pytest.mark.parametrize("variant", sorted(REDUCED))
def test_block_weight_scales_exactly_its_blocks_modules(variant):
    family, cfg, t = table_of(variant, REDUCED[variant])
    shapes = dit_state_shapes(family, cfg, "comfy")
    adapter = load_adapter(adapter_tensors(_one_module_per_slot(family, cfg), rank=2, seed=3))
    weights_by_slot = {slot: round(0.25 + 0.1 * i, 2) for i, slot in enumerate(t.slots)}
    spec = AdapterSpec(adapter, STRENGTH, CLIP_STRENGTH, [weights_by_slot[s] for s in t.slots])

    report = map_adapter(adapter.modules, shapes)
    assert not report.unmatched and not report.mismatched and len(report.targets) == len(adapter.modules)
    gen = torch.Generator().manual_seed(5)
    originals = {target.weight_key: (torch.randn(shapes[target.weight_key], generator=gen) * 0.05).to(torch.bfloat16)
                 for target in report.targets.values()}
    weights = {k: v.clone() for k, v in originals.items()}
    WeightPatcher(weights, model_shapes=shapes).apply([spec])

    slot_of_block = {block: slot for slot, block in t.ids.items()}
    seen = set()
    for name, target in report.targets.items():
        slot = slot_of_block[target.block]
        text = target.part != "diffusion_model"
        strength = (CLIP_STRENGTH if text else STRENGTH) * weights_by_slot[slot]
        want = adapter.modules[name].apply(originals[target.weight_key], strength)
        assert torch.equal(weights[target.weight_key], want), (name, slot)
        seen.add(slot)
    assert seen == set(t.slots) - ({"CLIP"} if family == "chroma" else set())  # Chroma has no CLIP-L


def test_row_slices_take_their_fused_weights_block():
    """diffusers to_q / proj_mlp land on rows of BFL's fused qkv / linear1: each at its own block's weight."""
    family, cfg, t = table_of("flux-dev", (2, 1))
    shapes = dit_state_shapes(family, cfg, "comfy")
    modules = {"transformer.transformer_blocks.1.attn.to_q": (3072, 3072),
               "transformer.transformer_blocks.0.attn.add_v_proj": (3072, 3072),
               "transformer.single_transformer_blocks.0.proj_mlp": (12288, 3072)}
    adapter = load_adapter(adapter_tensors(modules, rank=2, seed=4))
    report = map_adapter(adapter.modules, shapes)
    assert {n: (tg.block, tg.rows) for n, tg in report.targets.items()} == {
        "transformer.transformer_blocks.1.attn.to_q": ("D01", (0, 3072)),
        "transformer.transformer_blocks.0.attn.add_v_proj": ("D00", (6144, 3072)),
        "transformer.single_transformer_blocks.0.proj_mlp": ("S00", (9216, 12288))}
    gen = torch.Generator().manual_seed(6)
    originals = {tg.weight_key: (torch.randn(shapes[tg.weight_key], generator=gen) * 0.05).to(torch.bfloat16)
                 for tg in report.targets.values()}
    weights = {k: v.clone() for k, v in originals.items()}
    WeightPatcher(weights, model_shapes=shapes).apply([AdapterSpec(adapter, STRENGTH, 1.0, "d00=0.5, d01=1.5, s00=-1")])
    per_block = {"D00": 0.5, "D01": 1.5, "S00": -1.0}
    for name, tg in report.targets.items():
        start, length = tg.rows
        want = adapter.modules[name].apply(originals[tg.weight_key][start:start + length], STRENGTH * per_block[tg.block])
        assert torch.equal(weights[tg.weight_key][start:start + length], want), name
