"""Realistic adapter files made by the real ``lycoris-lora`` package, for tests and benchmarks.

Why a factory: hand-written fixtures only test our reading of our own idea of the
format.  Here LyCORIS itself builds each network on a tiny SD1.5-like model, every
parameter is randomised (LyCORIS starts "up" factors, OFT blocks, IA³ vectors at
zero, which would make any delta trivially right), and LyCORIS's own
``save_weights`` writes the file.  Module names are therefore the real kohya ones
(``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``,
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``, ...).

Usage::

    from lycoris_factory import make_adapter, VARIANTS
    path, layers = make_adapter("loha", torch.float32, out_dir)
    layers["lora_unet_conv_in"].weight       # W0 before the adapter
    layers["lora_unet_conv_in"].module       # an untouched copy of the torch layer

    built = build_network("loha")            # the live LyCORIS network, for oracles
    built.lyco["lora_unet_conv_in"](x)       # LyCORIS's own forward of that layer

Recipe facts (see /work/shared/reference/lycoris-formats.md §5): a TOML preset
avoids lycoris-lora 4.1.3's duplicate-name crash on ``TimestepEmbedding``; the
transformers 5 ``CLIPTextModel`` is wrapped in a ``text_model`` attribute so TE
names match real files; every network gets fresh models (``full`` deletes layer
weights, presets are class state); booleans are passed as real bools.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

NOISE = 0.05
LINEAR_DIM, LINEAR_ALPHA = 8, 4
CONV_DIM, CONV_ALPHA = 4, 2

SD15_PRESET = """\
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""

# The built-in "ia3" preset matches nothing in 4.1.3 (re.match on full paths), so
# regexes; fc2/ff_net_2/conv_shortcut scale their *input* as IA³ does for MLP outputs.
IA3_PRESET = r"""
enable_conv = true
unet_target_module = []
unet_target_name = ['.*to_k$', '.*to_v$', '.*ff\.net\.2$', '.*conv_shortcut$', '^conv_in$']
text_encoder_target_module = []
text_encoder_target_name = ['.*k_proj$', '.*v_proj$', '.*mlp\.fc2$']

[name_algo_map.'.*ff\.net\.2$']
train_on_input = true
[name_algo_map.'.*mlp\.fc2$']
train_on_input = true
[name_algo_map.'.*conv_shortcut$']
train_on_input = true
"""


@dataclass(frozen=True)
class Variant:
    """One way of training: create_network's algo, dims and kwargs."""

    algo: str
    kwargs: dict = field(default_factory=dict)
    dim: int = LINEAR_DIM
    alpha: float = LINEAR_ALPHA
    conv_dim: int = CONV_DIM
    conv_alpha: float = CONV_ALPHA
    preset: str = "sd15"  # "sd15" or "ia3"
    #: False when LyCORIS's forward cannot serve as the oracle for the saved file:
    #: DyLoRA picks a random rank per call, T-LoRA's SVD base is never saved
    forward_oracle: bool = True


VARIANTS: dict[str, Variant] = {
    "lora": Variant("lora"),
    "locon": Variant("locon"),
    "locon-tucker": Variant("locon", {"use_tucker": True}),
    "rs_lora": Variant("lora", {"rs_lora": True}),
    "use_scalar": Variant("lora", {"use_scalar": True}),
    "lora-dora-out": Variant("lora", {"dora_wd": True, "wd_on_output": True}),
    "lora-dora-in": Variant("lora", {"dora_wd": True, "wd_on_output": False}),
    "loha": Variant("loha"),
    "loha-tucker": Variant("loha", {"use_tucker": True}),
    "loha-dora": Variant("loha", {"dora_wd": True}),
    "loha-dora-in": Variant("loha", {"dora_wd": True, "wd_on_output": False}),
    "lokr": Variant("lokr"),
    "lokr-factor": Variant("lokr", {"factor": 8}, conv_dim=2),
    "lokr-decompose-both": Variant("lokr", {"decompose_both": True}, dim=2, alpha=1),
    "lokr-tucker": Variant("lokr", {"use_tucker": True}, dim=2, alpha=1, conv_dim=2, conv_alpha=1),
    "lokr-full-matrix": Variant("lokr", {"full_matrix": True}),
    "lokr-unbalanced": Variant("lokr", {"unbalanced_factorization": True, "factor": 4}),
    "lokr-dora": Variant("lokr", {"dora_wd": True, "factor": 4}),
    "full": Variant("full"),
    "ia3": Variant("ia3", preset="ia3"),
    "glora": Variant("glora"),
    "diag-oft": Variant("diag-oft"),
    "diag-oft-rescaled": Variant("diag-oft", {"rescaled": True}),
    "diag-oft-constrained": Variant("diag-oft", {"constraint": 1e-3, "rescaled": True}),
    "boft": Variant("boft", {"rescaled": True}),
    "boft-constrained": Variant("boft", {"constraint": 1e-3}),
    "norms": Variant("lora", {"train_norm": True}),
    "dylora": Variant("dylora", {"block_size": 2}, forward_oracle=False),
    "tlora": Variant("tlora", forward_oracle=False),
}


@dataclass
class Layer:
    """The original layer an adapter module targets, captured before LyCORIS wrapped it."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    module: nn.Module  # an untouched copy: call it, or functional_call it with a patched weight


@dataclass
class Built:
    variant: str
    net: nn.Module
    unet: nn.Module
    te: nn.Module
    layers: dict[str, Layer]
    lyco: dict[str, nn.Module]  # lora name -> LyCORIS module (its forward is the oracle)


class _TextModelWrap(nn.Module):
    """transformers 5 flattened CLIPTextModel; real SD1.5 files name ``text_model.*``."""

    def __init__(self, te: nn.Module):
        super().__init__()
        self.text_model = te


def tiny_models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(unet, text encoder): SD1.5 layout, small enough to build in milliseconds.

    Has 3×3 convs (resnets, conv_in/out, down/upsamplers), 1×1 convs
    (conv_shortcut, proj_in/proj_out), linears, GroupNorm and LayerNorm.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    )
    te = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ))
    return unet.eval(), _TextModelWrap(te).eval()


def _preset_file(kind: str) -> str:
    directory = Path(tempfile.gettempdir()) / "lycoris_factory_presets"
    directory.mkdir(exist_ok=True)
    path = directory / f"{kind}.toml"
    text = SD15_PRESET if kind == "sd15" else IA3_PRESET
    if not path.exists() or path.read_text() != text:
        _atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return str(path)


def _atomic_write(path: Path, write) -> None:
    """Other test processes may read the same path: they see the old file or the new, never half."""
    # the temporary name keeps the extension: save_weights picks the format from it
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.stem}-", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def _quiet_gc():
    """T-LoRA calls gc.collect() once per module; with the other networks alive that is seconds each."""
    import lycoris.modules.tlora as tlora

    saved = tlora.gc
    tlora.gc = types.SimpleNamespace(collect=lambda *args: 0)
    try:
        yield
    finally:
        tlora.gc = saved


_BUILT: dict[tuple[str, int], Built] = {}
_WRITTEN: set[Path] = set()


def build_network(variant: str, seed: int = 0) -> Built:
    """The randomised LyCORIS network for a variant (built once per process)."""
    if (variant, seed) in _BUILT:
        return _BUILT[(variant, seed)]
    import lycoris.kohya as lk

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    spec = VARIANTS[variant]
    unet, te = tiny_models(seed)
    # apply_preset only overwrites keys a preset names, so maps from an earlier preset leak
    cls = lk.LycorisNetworkKohya
    cls.MODULE_ALGO_MAP, cls.NAME_ALGO_MAP, cls.USE_FNMATCH, cls.TARGET_EXCLUDE_NAME = {}, {}, False, []
    with _quiet_gc():
        net = lk.create_network(
            1.0, spec.dim, spec.alpha, None, te, unet,
            algo=spec.algo, conv_dim=spec.conv_dim, conv_alpha=spec.conv_alpha,
            preset=_preset_file(spec.preset), **spec.kwargs,
        )
    modules = list(net.text_encoder_loras) + list(net.unet_loras)
    if not modules:
        raise RuntimeError(f"variant {variant!r} created no LyCORIS modules")
    layers = {}
    for m in modules:
        org = m.org_module[0]
        layers[m.lora_name] = Layer(
            weight=org.weight.detach().clone(),
            bias=None if getattr(org, "bias", None) is None else org.bias.detach().clone(),
            module=copy.deepcopy(org),
        )
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in net.named_parameters():
            if pname.endswith("scalar"):
                p.fill_(1.0)  # starts at 0; a trained one is O(1) and is folded into "up" on save
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * NOISE)
    net.eval()
    built = Built(variant, net, unet, te, layers, {m.lora_name: m for m in modules})
    _BUILT[(variant, seed)] = built
    return built


def make_adapter(variant: str, dtype: torch.dtype = torch.float32, out_dir=None,
                 seed: int = 0) -> tuple[Path, dict[str, Layer]]:
    """Save a variant with LyCORIS's own ``save_weights``; returns (path, name -> original layer).

    The same network (same numbers) is behind every dtype of one variant and seed.
    """
    built = build_network(variant, seed)
    out_dir = Path(out_dir or Path(tempfile.gettempdir()) / "lycoris_factory")
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = str(dtype).removeprefix("torch.")
    path = out_dir / f"{variant}-s{seed}-{tag}.safetensors"
    if path not in _WRITTEN:  # never trust a file from an earlier run: the recipe may have changed
        metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": repr(VARIANTS[variant])}
        _atomic_write(path, lambda tmp: built.net.save_weights(tmp, dtype, metadata))
        _WRITTEN.add(path)
    return path, built.layers


def random_input(layer: nn.Module, seed: int = 0) -> torch.Tensor:
    """A small random input the layer accepts (batch 2)."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(layer, nn.Linear):
        shape = (2, 3, layer.in_features)
    elif isinstance(layer, nn.Conv2d):
        shape = (2, layer.in_channels, 6, 6)
    elif isinstance(layer, nn.Conv1d):
        shape = (2, layer.in_channels, 6)
    elif isinstance(layer, nn.LayerNorm):
        shape = (2, 3, *layer.normalized_shape)
    elif isinstance(layer, nn.GroupNorm):
        shape = (2, layer.num_channels, 4, 4)
    else:
        raise TypeError(f"no input recipe for {type(layer).__name__}")
    return torch.randn(shape, generator=gen)


def patched_forward(layer: Layer, x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The original layer's forward with a replaced weight (and bias, default the original)."""
    params = {"weight": weight}
    if layer.bias is not None or bias is not None:
        params["bias"] = layer.bias if bias is None else bias
    return torch.func.functional_call(layer.module, params, (x,))
