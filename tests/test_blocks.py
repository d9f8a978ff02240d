"""Block-weight tables, presets and parsing match sd-webui-lora-block-weight's published lists."""

from __future__ import annotations

import pytest

from lycoris_core import BlockWeightError
from lycoris_core.patch.blocks import ALL_BLOCKS, TABLES, parse_block_weights, preset_vector

# published in sd-webui-lora-block-weight (scripts/lora_block_weight.py), written out by hand here
PUBLISHED_TABLES = {
    26: "BASE IN00 IN01 IN02 IN03 IN04 IN05 IN06 IN07 IN08 IN09 IN10 IN11 M00 "
        "OUT00 OUT01 OUT02 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11",
    17: "BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11",
    20: "BASE IN00 IN01 IN02 IN03 IN04 IN05 IN06 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08",
    12: "BASE IN04 IN05 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT04 OUT05",
}
PUBLISHED_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,0,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}


@pytest.mark.parametrize("length", sorted(PUBLISHED_TABLES))
def test_tables_equal_published_lists(length):
    assert TABLES[length][1] == PUBLISHED_TABLES[length].split()


@pytest.mark.parametrize("name", sorted(PUBLISHED_PRESETS))
def test_presets_equal_published_vectors(name):
    assert preset_vector(name) == [float(v) for v in PUBLISHED_PRESETS[name].split(",")]
    resolved = parse_block_weights(name.lower()).resolve("sd1")
    vector = dict(zip(PUBLISHED_TABLES[17].split(), preset_vector(name)))
    for block, weight in resolved.items():
        assert weight == vector.get(block, 0.0), block  # blocks outside the 17-table get 0


def test_short_vector_expands_with_zeros_for_unnamed_blocks():
    weights = parse_block_weights(",".join(["1"] * 12)).resolve("sdxl")
    assert weights["IN04"] == 1 and weights["IN00"] == 0 and weights["OUT08"] == 0 and weights["BASE"] == 1
    assert set(weights) == set(ALL_BLOCKS["sdxl"])


def test_named_form_applies_left_to_right_over_default_one():
    w = parse_block_weights("in=0.5, mid=1, out03-05=0").resolve("sd1")
    assert w["BASE"] == 1 and w["IN00"] == 0.5 and w["IN11"] == 0.5 and w["M00"] == 1
    assert (w["OUT02"], w["OUT03"], w["OUT05"], w["OUT06"]) == (1, 0, 0, 1)
    w = parse_block_weights("default=0, in04-out01=0.7, base=1").resolve("sdxl")
    assert w["IN03"] == 0 and w["IN04"] == 0.7 and w["M00"] == 0.7 and w["OUT01"] == 0.7 and w["OUT02"] == 0
    assert w["BASE"] == 1


def test_list_input_is_a_vector():
    assert parse_block_weights([1.0] * 26).resolve("sd2")["OUT11"] == 1.0


@pytest.mark.parametrize(
    "spec, arch, message",
    [
        ("1,1,1", "sd1", "17 or 26"),
        (",".join(["1"] * 17), "sdxl", "12 or 20"),
        (",".join(["1"] * 12), "sd1", "17 or 26"),
        ("SOMETHING", "sd1", "NONE, ALL, INS"),
        ("1,1,x,1,1,1,1,1,1,1,1,1", "sdxl", "not a number"),
        ("in=abc", "sd1", "not a number"),
        ("inn=1", "sd1", "unknown block"),
        ("out20=1", "sd1", "no block OUT20"),
        ("MIDD", "sdxl", "SD1/SD2 table"),
        ("in=nan", "sd1", "finite"),
    ],
)
def test_bad_specs_say_what_is_accepted(spec, arch, message):
    with pytest.raises(BlockWeightError, match=message):
        parse_block_weights(spec).resolve(arch)


def test_blank_means_no_block_weights():
    assert parse_block_weights("  ") is None and parse_block_weights(None) is None
