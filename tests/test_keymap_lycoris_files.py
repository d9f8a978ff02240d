"""Real full-size adapter files from lycoris-lora, read by load_adapter, mapped in every space."""

from __future__ import annotations

from collections import Counter

import pytest
from keymap_lycoris_files import to_sgm_names, write_adapter

from lycoris_core import ArchitectureMismatchError, load_adapter
from lycoris_core.keymap import map_adapter, state_shapes

SPACES = ("comfy", "checkpoint", "diffusers")
# kind -> (arch, algo, preset, LyCORIS kwargs)
KINDS = {
    "sd1_locon_norm": ("sd1", "locon", "sd1", {"train_norm": True}),
    "sd1_lokr": ("sd1", "lokr", "sd1", {}),
    "sdxl_loha": ("sdxl", "loha", "sdxl", {}),
    "sdxl_attention_lora": ("sdxl", "lora", "attention", {}),
}


@pytest.fixture(scope="session")
def adapter_file(tmp_path_factory):
    """kind -> path of a file written once per session."""
    directory = tmp_path_factory.mktemp("keymap_lycoris")
    made = {}

    def make(kind: str):
        if kind not in made:
            if kind == "sdxl_loha_sgm":
                made[kind] = to_sgm_names(
                    make("sdxl_loha"), directory / f"{kind}.safetensors", "sdxl"
                )
            else:
                arch, algo, preset, kwargs = KINDS[kind]
                made[kind] = write_adapter(
                    directory / f"{kind}.safetensors", arch, algo, preset, **kwargs
                )
        return made[kind]

    return make


@pytest.fixture(scope="session")
def modules_of(adapter_file):
    """kind -> the file's modules as lycoris_core.load_adapter reads them (read once)."""
    loaded = {}

    def read(kind: str):
        if kind not in loaded:
            adapter = load_adapter(adapter_file(kind))
            assert adapter.unknown_keys == []
            loaded[kind] = adapter.modules
        return loaded[kind]

    return read


def arch_of(kind: str) -> str:
    return kind.split("_")[0]


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("kind", [*KINDS, "sdxl_loha_sgm"])
def test_every_module_maps_to_exactly_one_key_of_the_right_shape(modules_of, kind, space):
    modules = modules_of(kind)
    shapes = state_shapes(arch_of(kind), space)
    report = map_adapter(modules, shapes)
    print(f"{kind} [{space}]: {report.summary()}")
    assert (report.unmatched, report.mismatched, report.not_applicable) == ([], [], [])
    assert set(report.targets) == set(modules)
    places = Counter((t.weight_key, t.rows) for t in report.targets.values())
    assert max(places.values()) == 1
    for name, target in report.targets.items():
        stored = shapes[target.weight_key]
        expected = (target.rows[1], *stored[1:]) if target.rows else stored
        assert target.shape == (expected[::-1] if target.transposed else expected)
        assert modules[name].fits(target.shape)


@pytest.mark.parametrize("kind", ["sd1_locon_norm", "sdxl_loha"])
def test_full_preset_touches_every_block_and_leaves_the_edges_unassigned(modules_of, kind):
    arch = arch_of(kind)
    report = map_adapter(modules_of(kind), state_shapes(arch, "comfy"))
    n = 12 if arch == "sd1" else 9
    numbered = [f"IN{i:02d}" for i in range(n)] + ["M00"] + [f"OUT{i:02d}" for i in range(n)]
    assert report.blocks_touched() == ["BASE", *numbered]
    edges = {t.weight_key.split(".")[1] for t in report.targets.values() if t.block is None}
    assert edges == ({"time_embed", "out"} | ({"label_emb"} if arch == "sdxl" else set()))


def test_train_norm_modules_carry_their_bias_key(modules_of):
    report = map_adapter(modules_of("sd1_locon_norm"), state_shapes("sd1", "checkpoint"))
    norms = {n: t for n, t in report.targets.items() if len(t.shape) == 1}
    assert len(norms) > 100
    assert all(t.bias_key == t.weight_key.removesuffix("weight") + "bias" for t in norms.values())
    target = report.targets["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_norm3"]
    assert (
        target.weight_key
        == "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm3.weight"
    )
    assert target.block == "OUT11"


def test_sgm_and_diffusers_named_sdxl_files_land_on_the_same_keys(modules_of):
    shapes = state_shapes("sdxl", "comfy")
    ours = map_adapter(modules_of("sdxl_loha"), shapes)
    sgm = map_adapter(modules_of("sdxl_loha_sgm"), shapes)
    assert sorted(t.weight_key for t in ours.targets.values()) == sorted(
        t.weight_key for t in sgm.targets.values()
    )
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in sgm.targets
    assert ours.summary() == sgm.summary()


@pytest.mark.parametrize("space", SPACES)
def test_sdxl_attention_lora_has_the_known_counts(modules_of, space):
    report = map_adapter(modules_of("sdxl_attention_lora"), state_shapes("sdxl", space))
    assert report.summary() == (
        "sdxl adapter on sdxl model: unet 722/722, te1 72/72, te2 192/192 matched, "
        "0 shape mismatches"
    )


@pytest.mark.parametrize(
    ("kind", "model_arch"), [("sd1_locon_norm", "sdxl"), ("sdxl_loha_sgm", "sd1")]
)
@pytest.mark.parametrize("space", SPACES)
def test_adapter_for_the_other_architecture_is_refused(modules_of, kind, model_arch, space):
    shapes = state_shapes(model_arch, space)
    with pytest.raises(ArchitectureMismatchError) as caught:
        map_adapter(modules_of(kind), shapes)
    message = str(caught.value)
    assert f"{arch_of(kind)} adapter does not fit this {model_arch} model" in message
    assert caught.value.report.mismatched
    print(message[:300])
