"""Every LyCORIS algorithm against LyCORIS itself.

Files are made by the real ``lycoris-lora`` package (see ``lycoris_factory``) and
read back with ``load_adapter``.  The oracle is the LyCORIS module's own forward on
a random input -- never its merge functions, which scale LoHa/LoKr by alpha/rank
twice.  Our side is the original layer run with ``m.apply(W0, s)`` as its weight.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from lycoris_factory import VARIANTS, build_network, make_adapter, patched_forward, random_input
from safetensors import safe_open
from safetensors.torch import load_file
from thread_fixtures import one_thread  # noqa: F401  (autouse)

from lycoris_core import AdapterFormatError, load_adapter

RTOL = 1e-5  # float32 files, float32 math: ‖ours - LyCORIS‖ / ‖LyCORIS‖ per layer
EFFECT_RTOL = 1e-3  # the same error measured against the adapter's own effect, ‖ΔY‖
ORACLE = [v for v, spec in VARIANTS.items() if spec.forward_oracle]
DORA = [v for v in ORACLE if VARIANTS[v].kwargs.get("dora_wd")]
ROTATIONS = [v for v in ORACLE if VARIANTS[v].algo in ("diag-oft", "boft")]
LINEAR_IN_STRENGTH = [v for v in ORACLE if v not in DORA and v not in ROTATIONS]


class Case:
    """One variant: its file, the original layers, the adapter we read, LyCORIS's network."""

    def __init__(self, variant, out_dir, dtype=torch.float32):
        self.variant = variant
        self.path, self.layers = make_adapter(variant, dtype, out_dir)
        self.built = build_network(variant)
        self.adapter = load_adapter(self.path)

    def items(self):
        for name, lyco in self.built.lyco.items():
            yield name, lyco, self.layers[name], self.adapter.modules[name]


@pytest.fixture(scope="session")
def cases(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("lycoris_files")
    cache: dict = {}

    def get(variant, dtype=torch.float32):
        if (variant, dtype) not in cache:
            cache[(variant, dtype)] = Case(variant, out_dir, dtype)
        return cache[(variant, dtype)]

    return get


def ours(module, layer, x, strength=1.0):
    """The layer's output with our patched weight (and bias, for full/norm)."""
    weight = module.apply(layer.weight, strength)
    bias = None
    bias_delta = module.bias_delta()
    if bias_delta is not None:
        bias = (layer.bias if layer.bias is not None else 0) + strength * bias_delta
    return patched_forward(layer, x, weight, bias)


@contextlib.contextmanager
def lycoris_strength(lyco, strength):
    saved = lyco.multiplier
    lyco.multiplier = strength
    try:
        yield
    finally:
        lyco.multiplier = saved


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---- the file itself -------------------------------------------------------------------

@pytest.mark.parametrize("variant", ORACLE + ["dylora"])
def test_every_module_read_and_nothing_left_over(cases, variant):
    case = cases(variant)
    assert set(case.adapter.modules) == set(case.built.lyco), "module names differ from LyCORIS's"
    assert case.adapter.unknown_keys == []
    # every file key belongs to one module, and num_params counts them all (alpha aside)
    by_module = dict.fromkeys(case.adapter.modules, 0)
    with safe_open(str(case.path), "pt") as fh:
        assert fh.metadata()["ss_network_module"] == "lycoris.kohya"
        for key in fh.keys():
            name, _, suffix = key.partition(".")
            if suffix != "alpha":
                by_module[name] += torch.Size(fh.get_slice(key).get_shape()).numel()
    for name, module in case.adapter.modules.items():
        assert module.num_params == by_module[name], name


def test_names_are_realistic_sd15_kohya_names(cases):
    names = set(cases("lora").adapter.modules)
    for expected in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_conv_in",
        "lora_unet_time_embedding_linear_1",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_1_mlp_fc1",
    ):
        assert expected in names
    kinds = {tuple(layer.weight.shape[2:]) for layer in cases("lora").layers.values()}
    assert {(), (1, 1), (3, 3)} <= kinds  # linears, 1x1 convs and 3x3 convs are all covered


# ---- detection -------------------------------------------------------------------------

def expected_detection(lyco, layer):
    """What load_adapter must say about a module, read off the LyCORIS module that made it."""
    kind = type(lyco).__name__
    kernel = layer.weight.shape[2:]
    lora_algo = "locon" if kernel.numel() > 1 else "lora"
    algo, rank = {
        "LoConModule": (lora_algo, getattr(lyco, "lora_dim", None)),
        "DyLoraModule": (lora_algo, getattr(lyco, "lora_dim", None)),
        "LohaModule": ("loha", getattr(lyco, "lora_dim", None)),
        "LokrModule": ("lokr", None if getattr(lyco, "use_w1", 0) and getattr(lyco, "use_w2", 0)
                       else getattr(lyco, "lora_dim", None)),
        "FullModule": ("full", None),
        "IA3Module": ("ia3", None),
        "GLoRAModule": ("glora", getattr(lyco, "lora_dim", None)),
        "DiagOFTModule": ("diag-oft", getattr(lyco, "block_size", None)),
        "ButterflyOFTModule": ("boft", getattr(lyco, "block_size", None)),
        "NormModule": ("norm", None),
    }[kind]
    return {
        "algo": algo,
        "rank": rank,
        "tucker": bool(getattr(lyco, "tucker", False)),
        "dora": bool(getattr(lyco, "wd", False)),
    }


@pytest.mark.parametrize("variant", ORACLE + ["dylora"])
def test_detection_matches_the_lycoris_module(cases, variant):
    case = cases(variant)
    mismatches = []
    for name, lyco, layer, m in case.items():
        want = expected_detection(lyco, layer)
        got = {"algo": m.algo, "rank": m.rank, "tucker": m.tucker, "dora": m.dora}
        if got != want:
            mismatches.append((name, got, want))
        if want["dora"]:
            assert m.dora_axis == ("out" if lyco.wd_on_out else "in"), name
        if hasattr(lyco, "alpha") and isinstance(lyco.alpha, torch.Tensor) and m.alpha is not None:
            assert m.alpha == pytest.approx(float(lyco.alpha), rel=1e-6), name
        assert m.fits(layer.weight.shape), name
        assert m.delta(layer.weight).shape == layer.weight.shape, name
    assert not mismatches, mismatches[:5]


def test_variants_cover_what_they_claim(cases):
    """Guards the factory: each variant really produced the layout it is named after."""
    def count(variant, predicate):
        return sum(1 for m in cases(variant).adapter.modules.values() if predicate(m))

    assert count("locon-tucker", lambda m: m.tucker) == 20
    assert count("loha-tucker", lambda m: m.tucker) == 20
    assert count("lokr-tucker", lambda m: m.tucker) == 20
    assert count("lokr-decompose-both", lambda m: "lokr_w1_a" in m.keys) > 0
    assert count("lokr-full-matrix", lambda m: m.rank is None) == 95
    assert count("lokr", lambda m: m.rank is None) > 0 and count("lokr", lambda m: m.rank) > 0
    assert count("lokr-unbalanced", lambda m: m._shape("lokr_w1")[0] > m._shape("lokr_w1")[1]) > 0
    assert count("ia3", lambda m: m.on_input) > 0 and count("ia3", lambda m: not m.on_input) > 0
    assert count("ia3", lambda m: len(m.shape) == 4) > 0  # conv (1, C, 1, 1) vectors
    assert count("norms", lambda m: m.algo == "norm") == 32
    assert count("diag-oft-rescaled", lambda m: "rescale" in m.keys) == 95
    assert count("diag-oft", lambda m: "rescale" in m.keys) == 0
    assert all(m.alpha == pytest.approx(1e-3) for m in cases("diag-oft-constrained").adapter.modules.values())
    rs = cases("rs_lora").adapter.modules["lora_unet_conv_in"]
    assert rs.alpha == pytest.approx(2 * 4 ** 0.5, rel=1e-6) and rs.scale == pytest.approx(2 / 4 ** 0.5)
    full = cases("full").adapter.modules
    assert sum(m.has_bias for m in full.values()) == 71  # diff_b where the layer has a bias


def test_oft_constraint_is_active(cases):
    """Otherwise the constrained variants would not test the alpha·out_dim clamp."""
    for variant in ("diag-oft-constrained", "boft-constrained"):
        for name, lyco, _layer, _m in cases(variant).items():
            q = lyco.oft_blocks - lyco.oft_blocks.transpose(-1, -2)
            if q.norm() > 0:
                assert q.norm() > lyco.constraint > 0, name


# ---- numbers: strength 1 against LyCORIS's forward ---------------------------------------

@pytest.mark.parametrize("variant", ORACLE)
def test_strength_one_matches_lycoris_forward(cases, variant):
    case = cases(variant)
    failures, trivial = [], 0
    with torch.no_grad():
        for name, lyco, layer, m in case.items():
            x = random_input(layer.module)
            expected = lyco(x)
            got = ours(m, layer, x)
            effect = expected - layer.module(x)
            if float(effect.norm()) <= 1e-4 * float(expected.norm()):
                trivial += 1  # e.g. diag-oft on 4 channels: 1x1 blocks, always the identity
                continue
            err = rel(got, expected)
            effect_err = float((got - expected).norm() / effect.norm())
            if err > RTOL or effect_err > EFFECT_RTOL:
                failures.append((name, m.describe(), f"{err:.2e}", f"{effect_err:.2e}"))
    assert not failures, failures[:8]
    assert trivial <= 1, f"{trivial} modules had no effect: randomisation failed?"


# ---- strength semantics --------------------------------------------------------------------

@pytest.mark.parametrize("variant", ORACLE)
def test_strength_zero_is_exactly_w0(cases, variant):
    for name, _lyco, layer, m in cases(variant).items():
        for w0 in (layer.weight, layer.weight.to(torch.bfloat16)):
            out = m.apply(w0, 0.0)
            assert out.dtype == w0.dtype
            assert torch.equal(out, w0), name


@pytest.mark.parametrize("variant", LINEAR_IN_STRENGTH)
def test_half_strength_matches_lycoris_multiplier(cases, variant):
    """W0 + s·ΔW: LyCORIS's own multiplier has the same meaning for these algorithms."""
    failures = []
    with torch.no_grad():
        for name, lyco, layer, m in cases(variant).items():
            x = random_input(layer.module)
            with lycoris_strength(lyco, 0.5):
                expected = lyco(x)
            err = rel(ours(m, layer, x, 0.5), expected)
            if err > RTOL:
                failures.append((name, f"{err:.2e}"))
    assert not failures, failures[:8]


@pytest.mark.parametrize("variant", DORA)
def test_dora_strength_is_a_slider_from_w0(cases, variant):
    """s=0.5 is the midpoint of W0 and LyCORIS's s=1 result (LyCORIS itself only scales the magnitude)."""
    failures = []
    with torch.no_grad():
        for name, lyco, layer, m in cases(variant).items():
            x = random_input(layer.module)
            midpoint = 0.5 * (layer.module(x) + lyco(x))
            err = rel(ours(m, layer, x, 0.5), midpoint)
            w_mid = 0.5 * (layer.weight + m.apply(layer.weight, 1.0))
            if err > RTOL or rel(m.apply(layer.weight, 0.5), w_mid) > RTOL:
                failures.append((name, f"{err:.2e}"))
    assert not failures, failures[:8]


@pytest.mark.parametrize("variant", ROTATIONS)
@pytest.mark.parametrize("strength", [0.5, 0.25])
def test_rotation_strength_moves_rotation_and_rescale_toward_identity(cases, variant, strength):
    """R → I + s(R−I) is LyCORIS's own multiplier; rescale → 1 + s(rescale−1) is ours,
    so the oracle is LyCORIS's forward at multiplier s with its rescale set to that value."""
    failures = []
    with torch.no_grad():
        for name, lyco, layer, m in cases(variant).items():
            x = random_input(layer.module)
            rescale = getattr(lyco, "rescale", None) if getattr(lyco, "rescaled", False) else None
            saved = None if rescale is None else rescale.detach().clone()
            try:
                if rescale is not None:
                    rescale.copy_(1 + strength * (saved - 1))
                with lycoris_strength(lyco, strength):
                    expected = lyco(x)
            finally:
                if rescale is not None:
                    rescale.copy_(saved)
            err = rel(ours(m, layer, x, strength), expected)
            if err > RTOL:
                failures.append((name, f"{err:.2e}"))
    assert not failures, failures[:8]


# ---- other dtypes and the algorithms without a forward oracle ------------------------------

@pytest.mark.parametrize("variant", ["loha-dora", "lokr-tucker", "rs_lora", "diag-oft-constrained"])
def test_fp16_file_reads_fine(cases, variant):
    half, single = cases(variant, torch.float16), cases(variant)
    assert {t.dtype for t in load_file(str(half.path)).values()} == {torch.float16}
    assert half.adapter.unknown_keys == []
    assert set(half.adapter.modules) == set(single.adapter.modules)
    failures = []
    with torch.no_grad():
        for name, lyco, layer, m in half.items():
            twin = single.adapter.modules[name]
            assert (m.algo, m.rank, m.tucker, m.dora) == (twin.algo, twin.rank, twin.tucker, twin.dora)
            delta = m.delta(layer.weight)
            assert delta.dtype == torch.float32
            x = random_input(layer.module)
            err = rel(ours(m, layer, x), lyco(x))  # only fp16 rounding of the factors separates them
            if err > 2e-3:
                failures.append((name, f"{err:.2e}"))
            assert torch.equal(m.apply(layer.weight.half(), 0.0), layer.weight.half())
            assert m.apply(layer.weight.half(), 1.0).dtype == torch.float16
    assert not failures, failures[:8]


def test_dylora_reads_as_plain_lora(cases):
    """DyLoRA's forward picks a random rank each call, so check the file's meaning instead:
    plain LoRA keys (conv lora_up saved 2-D) with ΔW = (α/r)·up@down."""
    case = cases("dylora")
    tensors = load_file(str(case.path))
    convs = 0
    for name, m in case.adapter.modules.items():
        w0 = case.layers[name].weight
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        alpha, rank = float(tensors[f"{name}.alpha"]), down.shape[0]
        assert up.dim() == 2
        if w0.dim() == 4:
            convs += 1
            assert down.dim() == 4
        assert m.shape == tuple(w0.shape)
        assert m.rank == rank
        expected = (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
        assert rel(m.delta(), expected) < 1e-6, name
    assert convs > 0


def test_tlora_is_refused_and_never_silently_dropped(cases):
    """T-LoRA's SVD base is not saved, so it cannot be rebuilt: refused alone, listed when mixed."""
    path, _layers = make_adapter("tlora", torch.float32, cases("lora").path.parent)
    with pytest.raises(AdapterFormatError, match="no usable adapter module"):
        load_adapter(path)
    mixed = {**load_file(str(path)), **load_file(str(cases("lora").path))}
    adapter = load_adapter(mixed)
    tlora_keys = sorted(k for k in mixed if k.endswith(("q_layer.weight", "p_layer.weight", "lambda_layer")))
    assert tlora_keys and sorted(adapter.unknown_keys) == tlora_keys
    assert all("T-LoRA" in adapter.unknown_reasons[k] for k in tlora_keys)
    assert set(adapter.modules) == set(cases("lora").adapter.modules)
