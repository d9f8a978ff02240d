"""Trainable modules and networks: file layout, names, dropouts, dtypes, saving, continuing.

LyCORIS itself is the oracle for layout (its modules' saved keys and shapes for the same
layer and options) and names (the modules ``lycoris.kohya.create_network`` makes on the
same tiny SD1.5 model); the project's key map is the oracle for ComfyUI's SD1.5 layout.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from lycoris_factory import build_network, tiny_models
from torch import nn

from lycoris_core import OutputExistsError, load_adapter
from lycoris_core.keymap import map_adapter, state_shapes
from lycoris_core.train import (
    AdapterConfig,
    LayerSpec,
    Target,
    checkpoint_blocks,
    create_network,
    find_targets,
    ldm_to_diffusers,
    make_optimizer,
    preset,
    train_loop,
    training_metadata,
)

logging.getLogger("LyCORIS").setLevel(logging.ERROR)


def layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return {"linear": lambda: nn.Linear(24, 36), "conv3x3": lambda: nn.Conv2d(16, 32, 3, padding=1),
            "conv1x1": lambda: nn.Conv2d(16, 32, 1)}[kind]().requires_grad_(False)


def single(lay, **kwargs):
    kwargs.setdefault("rank", 4)
    kwargs.setdefault("alpha", 2.0)
    net = create_network([Target("lora_unet_x", "x", lay)], AdapterConfig(**kwargs), seed=0)
    return net, net["lora_unet_x"]


def randomise(net, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# ---- layout: exactly what LyCORIS saves ----------------------------------------------------------

LAYOUTS = [
    ({"algo": "lora"}, "locon", {}),
    ({"algo": "lora", "use_tucker": True}, "locon", {"use_tucker": True}),
    ({"algo": "lora", "dora": True}, "locon", {"weight_decompose": True}),
    ({"algo": "lora", "dora": True, "dora_on_output": False}, "locon", {"weight_decompose": True, "wd_on_out": False}),
    ({"algo": "loha"}, "loha", {}),
    ({"algo": "loha", "use_tucker": True}, "loha", {"use_tucker": True}),
    ({"algo": "loha", "dora": True}, "loha", {"weight_decompose": True}),
    ({"algo": "lokr", "rank": 2}, "lokr", {"lora_dim": 2}),
    ({"algo": "lokr", "rank": 8}, "lokr", {"lora_dim": 8}),  # too large for w2: full lokr_w2
    ({"algo": "lokr", "rank": 1, "decompose_both": True, "factor": 8}, "lokr",
     {"lora_dim": 1, "decompose_both": True, "factor": 8}),
    ({"algo": "lokr", "rank": 2, "use_tucker": True}, "lokr", {"lora_dim": 2, "use_tucker": True}),
    ({"algo": "lokr", "full_matrix": True}, "lokr", {"full_matrix": True}),
    ({"algo": "lokr", "rank": 2, "factor": 4, "unbalanced_factorization": True}, "lokr",
     {"lora_dim": 2, "factor": 4, "unbalanced_factorization": True}),
    ({"algo": "ia3"}, "ia3", {}),
    ({"algo": "full"}, "full", {}),
]


def lycoris_module(kind, lay, kwargs):
    from lycoris.modules import FullModule, IA3Module, LoConModule, LohaModule, LokrModule

    cls = {"locon": LoConModule, "loha": LohaModule, "lokr": LokrModule, "ia3": IA3Module, "full": FullModule}[kind]
    kwargs = dict(kwargs)
    dim = kwargs.pop("lora_dim", 4)
    return cls("x", lay, 1.0, lora_dim=dim, alpha=2.0, **kwargs)


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1"])
@pytest.mark.parametrize("index", range(len(LAYOUTS)), ids=[str(c[0]) for c in LAYOUTS])
def test_file_layout_is_lycoris_layout(index, kind):
    ours_kwargs, lyco_kind, lyco_kwargs = LAYOUTS[index]
    lay = layer(kind)
    _, module = single(lay, **ours_kwargs)
    lyco = lycoris_module(lyco_kind, lay, lyco_kwargs)
    theirs = {k: tuple(v.shape) for k, v in lyco.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in module.file_tensors().items()}
    assert ours == theirs
    if "alpha" in theirs:
        assert float(module.file_tensors()["alpha"]) == float(lyco.state_dict()["alpha"])


def test_init_rule_gives_zero_delta_and_random_input_side():
    for kwargs in ({"algo": "lora"}, {"algo": "lora", "use_tucker": True}, {"algo": "loha"},
                   {"algo": "loha", "use_tucker": True}, {"algo": "lokr", "rank": 2}, {"algo": "lokr", "full_matrix": True},
                   {"algo": "ia3"}, {"algo": "full"}, {"algo": "lora", "dora": True}):
        lay = layer("conv3x3")
        _, m = single(lay, **kwargs)
        # exactly 0, except DoRA's W·‖W‖/(‖W‖ + eps) − W, a few ulps (as in LyCORIS)
        limit = 1e-6 * float(lay.weight.abs().max()) if kwargs.get("dora") else 0.0
        assert float(m.effective_delta().abs().max()) <= limit, kwargs
        nonzero = [r for r in m.present if getattr(m, r).abs().max() > 0]
        if kwargs["algo"] in ("lora", "loha", "lokr"):
            assert nonzero, kwargs  # the input side starts random (kaiming / normal), the output side at 0
    _, m = single(layer("linear"), algo="lora", dora=True)
    assert torch.allclose(m.dora_scale.flatten(), m.layer.weight.norm(dim=1))


# ---- names: the ones real files use ----------------------------------------------------------------

def test_names_equal_lycoris_full_preset():
    """unet-full + clip on the tiny SD1.5 model name exactly the modules LyCORIS's classic full preset makes."""
    unet, te = tiny_models(seed=0)
    ours = {t.name for t in find_targets(unet, "unet-full", "lora_unet") + find_targets(te, "clip", "lora_te")}
    theirs = set(build_network("lora").lyco)
    assert ours == theirs


def test_attention_preset_selects_only_attention_projections():
    unet, _ = tiny_models(seed=0)
    targets = find_targets(unet, "unet-attn", "lora_unet")
    assert targets and all(t.path.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for t in targets)
    assert all(".attn1." in t.path or ".attn2." in t.path for t in targets)
    n_blocks = sum(1 for n, _ in unet.named_modules() if n.endswith("transformer_blocks.0"))
    assert len(targets) == 8 * n_blocks


def test_conv_rank_zero_leaves_kxk_convs_out_and_conv_rank_applies():
    unet, _ = tiny_models(seed=0)
    targets = find_targets(unet, "unet-full", "lora_unet")
    net = create_network(targets, AdapterConfig("lora", rank=4, conv_rank=0))
    assert all(not m.spec.is_kxk for m in net)
    assert any(m.spec.kind == "conv" for m in net)  # 1×1 convs stay, at the linear rank
    net = create_network(targets, AdapterConfig("lora", rank=4, alpha=4, conv_rank=2, conv_alpha=1))
    kxk = [m for m in net if m.spec.is_kxk]
    assert kxk and all(m.rank == 2 and m.scale == 0.5 for m in kxk)
    assert all(m.rank == 4 and m.scale == 1.0 for m in net if not m.spec.is_kxk)


def _meta_ldm_unet(arch="sd1", part="unet"):
    """ComfyUI's diffusion model layout (LDM names for SD1.5, the model's own for DiTs), as real
    Linear/Conv2d layers on meta."""
    root = nn.Module()
    with torch.device("meta"):
        for key, shape in state_shapes(arch, "comfy", (part,)).items():
            if not key.endswith(".weight") or len(shape) not in (2, 4):
                continue
            *path, _ = key.removeprefix("diffusion_model.").split(".")
            parent = root
            for part in path[:-1]:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            layer = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], shape[2])
            parent.add_module(path[-1], layer)
    return root


def test_comfy_sd15_layout_gets_kohya_diffusers_names_that_map_back():
    """Names written for ComfyUI's LDM-named SD1.5 UNet are kohya's, and the key map sends each home."""
    root = _meta_ldm_unet()
    targets = find_targets(root, "unet-full", "lora_unet", rename=ldm_to_diffusers("sd1"))
    assert len(targets) > 250
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in {t.name for t in targets}
    tensors = {}
    for t in targets:
        spec = LayerSpec.of(t.layer)
        tensors[f"{t.name}.lora_down.weight"] = torch.zeros(1, spec.in_features, *spec.kernel)
        tensors[f"{t.name}.lora_up.weight"] = torch.zeros(spec.out_features, 1, *((1,) * spec.dims))
    report = map_adapter(load_adapter(tensors).modules, state_shapes("sd1", "comfy"))
    assert not report.unmatched and not report.mismatched
    for t in targets:
        assert report.targets[t.name].weight_key == f"diffusion_model.{t.path}.weight"


def test_unknown_presets_are_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("everything")


# full size, on meta: per family, (layers "dit" adapts per first block, per first single/second-kind block)
DIT_FAMILIES = {
    "flux-dev": ("double_blocks.0.", 8, "single_blocks.0.", 2),
    "chroma": ("double_blocks.0.", 8, "single_blocks.0.", 2),
    "sd3.5-medium": ("joint_blocks.0.", 10, None, 0),
    "wan2.1-i2v-14b": ("blocks.0.", 12, None, 0),
    "qwen-image": ("transformer_blocks.0.", 12, None, 0),
    "hunyuan-video": ("double_blocks.0.", 8, "single_blocks.0.", 2),
    "lumina2": ("layers.0.", 5, "noise_refiner.0.", 5),
    "hidream-i1": ("double_stream_blocks.0.", None, "single_stream_blocks.0.", None),
    "z-image": ("layers.0.", 5, "context_refiner.0.", 5),
}


@pytest.mark.parametrize("variant", list(DIT_FAMILIES))
def test_dit_presets_name_what_the_loader_maps_back(variant):
    """`dit` adapts every Linear of the transformer blocks but the modulation, `dit-attn` the attention
    projections; the saved kohya names map to exactly those weights of ComfyUI's model."""
    root = _meta_ldm_unet(variant, "diffusion_model")
    first, n_first, second, n_second = DIT_FAMILIES[variant]
    everything = find_targets(root, "dit", "lora_unet")
    attention = find_targets(root, "dit-attn", "lora_unet")
    assert attention and {t.path for t in attention} < {t.path for t in everything}
    assert not any(w in t.path for t in everything for w in ("_mod.", "modulation", "_embed", "img_in", "txt_in."))
    if n_first is not None:
        assert sum(t.path.startswith(first) for t in everything) == n_first
    if second is not None and n_second is not None:
        assert sum(t.path.startswith(second) for t in everything) == n_second
    assert all(("attn" in t.path or "attention" in t.path or t.path.endswith(("linear1", "linear2")))
               and "mlp" not in t.path and "ffn" not in t.path and "feed_forward" not in t.path for t in attention)
    tensors = {}
    for t in everything:
        spec = LayerSpec.of(t.layer)
        tensors[f"{t.name}.lora_down.weight"] = torch.zeros(1, spec.in_features)
        tensors[f"{t.name}.lora_up.weight"] = torch.zeros(spec.out_features, 1)
    report = map_adapter(load_adapter(tensors).modules, state_shapes(variant, "comfy", ("diffusion_model",)))
    assert not report.unmatched and not report.mismatched
    for t in everything:
        assert report.targets[t.name].weight_key == f"diffusion_model.{t.path}.weight"


# ---- dropouts as LyCORIS defines them -----------------------------------------------------------

def test_module_dropout_skips_the_adapter():
    lay = layer("linear")
    net, m = single(lay, module_dropout=0.5)
    randomise(net)
    x = torch.randn(3, 24)
    base = F.linear(x, lay.weight, lay.bias)
    with net.attached():
        outs = []
        for seed in range(12):
            torch.manual_seed(seed)
            skip = float(torch.rand(())) < 0.5
            torch.manual_seed(seed)
            outs.append((skip, torch.equal(lay(x), base)))
        net.eval()
        assert not torch.equal(lay(x), base)  # never in eval mode
    assert all(skip == same for skip, same in outs)
    assert {s for s, _ in outs} == {True, False}


@pytest.mark.parametrize("bypass", [True, False])
def test_rank_dropout_of_locon_masks_rank_channels(bypass):
    lay = layer("conv3x3")
    net, m = single(lay, rank_dropout=0.5, bypass=bypass)
    randomise(net)
    x = torch.randn(2, 16, 5, 5)
    torch.manual_seed(4)
    mask = (torch.rand(4) > 0.5).float()
    up = m.lora_up.flatten(1) * mask * m.scale
    want = F.conv2d(x, lay.weight + (up @ m.lora_down.flatten(1)).reshape(lay.weight.shape), lay.bias, padding=1)
    torch.manual_seed(4)
    with net.attached():
        got = lay(x)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_rank_dropout_of_other_algorithms_masks_output_rows(algo):
    lay = layer("linear")
    net, m = single(lay, algo=algo, rank=2, rank_dropout=0.5, rank_dropout_scale=True)
    randomise(net)
    x = torch.randn(3, 24)
    delta = m.effective_delta()
    torch.manual_seed(7)
    mask = (torch.rand(36) > 0.5).float()
    mask = mask / mask.mean()
    want = F.linear(x, lay.weight + delta * mask[:, None], lay.bias)
    torch.manual_seed(7)
    with net.attached():
        got = lay(x)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_dropout_drops_elements_of_the_adapter_branch(algo):
    lay = layer("linear")
    net, m = single(lay, algo=algo, rank=2, dropout=0.5)
    randomise(net)
    x = torch.randn(4, 24)
    base = F.linear(x, lay.weight, lay.bias)
    branch = F.linear(x, m.effective_delta())
    with net.attached():
        got = lay(x) - base
    kept = (got - 2 * branch).abs() < 1e-5
    dropped = got.abs() < 1e-6
    assert bool((kept | dropped).all()) and kept.any() and dropped.any()


# ---- dtypes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("base_dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_frozen_base_in_low_precision(base_dtype, algo):
    lay = layer("linear").to(base_dtype)
    net, m = single(lay, algo=algo, rank=2)
    randomise(net)
    x = torch.randn(3, 24, requires_grad=True)
    with net.attached():
        y = lay(x)
    w0 = lay.weight.to(torch.float32)
    want = F.linear(x, w0 + m.effective_delta(), lay.bias.to(torch.float32))
    assert y.dtype == torch.float32
    assert torch.allclose(y, want, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
    assert x.grad is not None


def test_bf16_factor_math_with_float32_masters():
    lay = layer("linear")
    net32, m32 = single(lay, algo="loha")
    randomise(net32)
    net16, m16 = single(lay, algo="loha", factor_dtype=torch.bfloat16)
    m16.load_state_dict(m32.state_dict())
    x = torch.randn(3, 24)
    with net32.attached():
        y32 = lay(x)
    with net16.attached():
        y16 = lay(x)
        y16.sum().backward()
    assert float((y16 - y32).detach().abs().max()) < 0.05 * float(y32.detach().abs().max())
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net16.parameters())


@pytest.mark.parametrize("kwargs", [{"algo": "lora"}, {"algo": "loha"}, {"algo": "lokr", "rank": 2},
                                    {"algo": "lora", "dora": True}, {"algo": "ia3"}, {"algo": "full"}])
def test_autocast_bf16(kwargs):
    lay = layer("conv3x3")
    net, m = single(lay, **kwargs)
    randomise(net)
    x = torch.randn(2, 16, 5, 5)
    want = F.conv2d(x, lay.weight + m.effective_delta(), lay.bias, padding=1)
    if kwargs["algo"] == "full":
        want = want + m.diff_b.view(1, -1, 1, 1)
    with net.attached(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = lay(x)
    assert y.dtype == torch.bfloat16
    assert float((y.float() - want).detach().abs().max()) < 0.05 * float(want.detach().abs().max())
    y.float().sum().backward()
    assert all(p.grad is not None for p in net.parameters())


# ---- saving and continuing ------------------------------------------------------------------------

def test_saved_file_metadata_dtype_and_no_silent_overwrite(tmp_path):
    lay = layer("conv3x3")
    config = AdapterConfig("loha", rank=4, alpha=0.3, use_tucker=True, dora=True, dora_on_output=False)
    net = create_network([Target("lora_unet_conv_in", "conv_in", lay)], config)
    randomise(net)
    meta = training_metadata(config, arch="sd1", title="test", resolution=(512, 512), prediction="epsilon",
                             steps=10, learning_rate=1e-4, optimizer="AdamW", seed=3)
    path = net.save(tmp_path / "a.safetensors", torch.float16, meta)
    adapter = load_adapter(path)
    assert adapter.metadata["ss_network_module"] == "lycoris.kohya"
    assert adapter.metadata["ss_network_dim"] == "4" and adapter.metadata["ss_network_alpha"] == "0.3"
    args = json.loads(adapter.metadata["ss_network_args"])
    assert args == {"algo": "loha", "conv_dim": "4", "conv_alpha": "0.3", "use_tucker": "True", "dora_wd": "True",
                    "wd_on_output": "False"}
    assert adapter.metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert adapter.metadata["ss_base_model_version"] == "sd_v1"
    source = adapter.source
    assert source.dtype("lora_unet_conv_in.hada_t1") == torch.float16
    assert source.dtype("lora_unet_conv_in.alpha") == torch.float32  # 0.3 is not an fp16 number: kept exact
    module = adapter.modules["lora_unet_conv_in"]
    assert module.alpha == net["lora_unet_conv_in"].alpha == pytest.approx(0.3, rel=1e-7)
    assert module.tucker and module.dora_axis == "in"
    with pytest.raises(OutputExistsError):
        net.save(path, torch.float16, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temp file left behind


def test_continue_training_from_a_file(tmp_path):
    unet, te = tiny_models(seed=0)
    targets = find_targets(unet, "unet-transformer", "lora_unet")
    config = AdapterConfig("lokr", rank=2, dora=True, factor=4)
    net = create_network(targets, config)
    randomise(net)
    path = net.save(tmp_path / "a.safetensors", torch.float32)
    again = create_network(targets, AdapterConfig("lora"), existing=load_adapter(path))
    assert again.names() == net.names() and not again.skipped_existing
    for name, m in net.adapters.items():
        assert type(again[name]) is type(m)
        assert torch.equal(again[name].effective_delta(), m.effective_delta())
    fewer = create_network(find_targets(unet, "unet-attn", "lora_unet"), config, existing=load_adapter(path))
    assert fewer.skipped_existing and len(fewer) < len(net)


def test_network_never_changes_the_model_tree_and_detaches_cleanly():
    unet, _ = tiny_models(seed=0)
    keys = list(unet.state_dict())
    x = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 32))
    with torch.no_grad():
        before = unet(x[0], x[1], encoder_hidden_states=x[2]).sample
    net = create_network(find_targets(unet, "unet-full", "lora_unet"), AdapterConfig("lora", rank=2))
    randomise(net)
    with net.attached():
        assert list(unet.state_dict()) == keys
        with torch.no_grad():
            during = unet(x[0], x[1], encoder_hidden_states=x[2]).sample
    with torch.no_grad():
        after = unet(x[0], x[1], encoder_hidden_states=x[2]).sample
    assert not torch.equal(before, during) and torch.equal(before, after)
    assert all("forward" not in m.__dict__ for m in unet.modules())


def test_gradient_checkpointing_gives_the_same_gradients():
    unet, _ = tiny_models(seed=0)
    unet.requires_grad_(False)
    net = create_network(find_targets(unet, "unet-transformer", "lora_unet"), AdapterConfig("loha", rank=2, dropout=0.2))
    randomise(net)
    x = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 32))

    def grads():
        torch.manual_seed(0)
        with net.attached():
            unet(x[0], x[1], encoder_hidden_states=x[2]).sample.square().mean().backward()
        out = [p.grad.clone() for p in net.parameters()]
        net.zero_grad()
        return out

    plain = grads()
    restore = checkpoint_blocks(unet)
    checkpointed = grads()
    restore()
    assert all("forward" not in m.__dict__ for m in unet.modules())
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain, checkpointed))


def test_gradient_accumulation_averages_micro_batches():
    lay = layer("linear")
    xs = torch.randn(4, 24)
    target = torch.randn(4, 36)

    def run(batches, accumulation):
        net, _ = single(lay)
        randomise(net)
        opt = make_optimizer(net.parameters(), "SGD", 0.1)
        chunk = len(xs) // batches
        with net.attached():
            train_loop(lambda i: F.mse_loss(lay(xs[(i % batches) * chunk:][:chunk]), target[(i % batches) * chunk:][:chunk]),
                       opt, steps=1, grad_accumulation=accumulation)
        return [p.detach().clone() for p in net.parameters()]

    for a, b in zip(run(1, 1), run(2, 2)):
        assert torch.allclose(a, b, atol=1e-6)


def test_bad_options_are_refused():
    for kwargs in ({"algo": "oft"}, {"rank": 0}, {"dropout": 1.0}, {"algo": "ia3", "dora": True},
                   {"algo": "full", "dropout": 0.1}, {"conv_rank": -1}):
        with pytest.raises(ValueError):
            AdapterConfig(**kwargs)
    with pytest.raises(ValueError, match="nothing to train"):
        create_network([], AdapterConfig())


LYCORIS_READS = [
    {"algo": "lora"}, {"algo": "lora", "use_tucker": True}, {"algo": "lora", "dora": True},
    {"algo": "loha"}, {"algo": "loha", "use_tucker": True}, {"algo": "loha", "dora": True},
    {"algo": "lokr", "rank": 2}, {"algo": "lokr", "rank": 1, "decompose_both": True},
    {"algo": "lokr", "rank": 2, "factor": 4}, {"algo": "lokr", "full_matrix": True},
    {"algo": "lokr", "rank": 2, "dora": True}, {"algo": "full"},
]


@pytest.mark.parametrize("kwargs", LYCORIS_READS, ids=[str(k) for k in LYCORIS_READS])
def test_lycoris_create_network_from_weights_gives_the_same_layers(tmp_path, kwargs):
    """The algorithms and forms lycoris-lora 4.1.3's loader can rebuild come back with the same layer outputs.

    It cannot rebuild (IA)³ (wrong argument count), input-axis DoRA (always made on the output
    axis), LoKr Tucker (rank read from the wrong axis of lokr_w2_a) or a LoKr factor it cannot
    re-derive from the shapes; this project's loader reads all of those (test_train_run & co).
    """
    import copy

    import lycoris.kohya as lk

    root = nn.Module()
    root.lin, root.conv, root.pw = layer("linear"), layer("conv3x3"), layer("conv1x1")
    targets = [Target(f"lora_unet_{n}", n, getattr(root, n)) for n in ("lin", "conv", "pw")]
    kwargs = dict(kwargs)
    net = create_network(targets, AdapterConfig(rank=kwargs.pop("rank", 4), alpha=2.0, **kwargs))
    randomise(net)
    path = net.save(tmp_path / "a.safetensors", torch.float32)
    fresh = copy.deepcopy(root)
    lyco, _ = lk.create_network_from_weights(1.0, str(path), None, None, fresh, for_inference=True)
    assert len(lyco.unet_loras) == 3
    lyco.apply_to(None, fresh, apply_text_encoder=False, apply_unet=True)
    xs = {"lin": torch.randn(2, 24), "conv": torch.randn(2, 16, 5, 5), "pw": torch.randn(2, 16, 5, 5)}
    for t in targets:
        with torch.no_grad(), net.attached():
            ours = t.layer(xs[t.path])
        with torch.no_grad():
            theirs = getattr(fresh, t.path)(xs[t.path])
        assert torch.allclose(theirs, ours, rtol=1e-4, atol=1e-5), t.name


class CastingLinear(nn.Linear):
    """Like ComfyUI's ops: its own forward casts the weight (and runs any weight functions) each call."""

    weight_function: list = []

    def forward(self, x):
        weight = self.weight.to(x.dtype)
        for f in self.weight_function:
            weight = f(weight)
        return F.linear(x, weight, self.bias.to(x.dtype))


@pytest.mark.parametrize("algo", ["lora", "lokr"])
@pytest.mark.parametrize("where", ["plain", "comfy-op", "autocast"])
def test_a_cast_base_weight_is_not_kept_for_backward(algo, where):
    torch.manual_seed(0)
    lay = (CastingLinear if where == "comfy-op" else nn.Linear)(64, 96).to(torch.float16).requires_grad_(False)
    net, m = single(lay, algo=algo, rank=2)
    randomise(net)
    x = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), net.attached():
        if where == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = lay(x)
        else:
            y = lay(x)
    assert not [t for t in saved if t.numel() >= lay.weight.numel() and t.data_ptr() != lay.weight.data_ptr()]
    dtype = torch.bfloat16 if where == "autocast" else torch.float32
    want = F.linear(x.to(dtype), (lay.weight.float() + m.effective_delta()).to(dtype), lay.bias.to(dtype))
    assert y.dtype == dtype and torch.allclose(y.float(), want.float(), atol=2e-2 if where == "autocast" else 1e-5)
    y.float().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in net.parameters())


def test_a_layer_with_weight_functions_keeps_its_own_forward():
    lay = CastingLinear(8, 8).to(torch.float16).requires_grad_(False)
    lay.weight_function = [lambda w: w * 0]  # e.g. ComfyUI's low-VRAM patch: only its forward applies it
    net, m = single(lay)
    x = torch.randn(2, 8)
    with net.attached():
        assert torch.allclose(lay(x), torch.zeros(2, 8) + lay.bias.float())  # ΔW starts at 0: base alone


@pytest.mark.parametrize("algo", ["loha", "full", "lokr", "lora"])
def test_rebuilt_algorithms_keep_the_layers_own_forward_too(algo):
    """LoHa, full (and any non-bypass path) on a layer whose forward changes its weight: W0 is what
    that forward uses (here ×0, as a low-VRAM patch or a scaled-fp8 scale would change it)."""
    torch.manual_seed(0)
    lay = CastingLinear(8, 8).requires_grad_(False)
    lay.weight_function = [lambda w: w * 0]
    net, m = single(lay, algo=algo, bypass=False)
    randomise(net)
    x = torch.randn(2, 8)
    with net.attached():
        y = lay(x)
    want = F.linear(x, m.effective_delta(), lay.bias)
    assert torch.allclose(y, want, atol=1e-6)


def test_dora_on_a_layer_that_computes_its_own_weight_is_refused():
    lay = CastingLinear(8, 8).requires_grad_(False)
    lay.weight_function = [lambda w: w * 0]
    net, _ = single(lay, algo="lora", dora=True)
    with net.attached(), pytest.raises(ValueError, match="DoRA needs the layer's weight"):
        lay(torch.randn(2, 8))


def test_ia3_refuses_rank_dropout():
    with pytest.raises(ValueError, match="rank dropout"):
        AdapterConfig("ia3", rank_dropout=0.1)
