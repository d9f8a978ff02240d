"""Adapter files for DiTs written by the real producers, on reduced-depth, real-width models.

The producers never need the base weights to write an adapter, so the models are built on
the meta device; only the adapters' own parameters (and, where a producer reads the base
weight - LyCORIS full and DoRA - the targeted layers) are real. Base weights for patching
are real only for the keys an adapter touches, in ComfyUI's key space.

- PEFT: `add_adapter` on a diffusers transformer, `get_peft_model_state_dict`, and the
  family pipeline's `save_lora_weights` (PEFT's names, alpha in `lora_adapter_metadata`);
- LyCORIS `create_lycoris` on a diffusers transformer (`lycoris_<diffusers path>` names);
- LyCORIS's kohya wrapper on a module tree in BFL/ComfyUI names (`lora_unet_double_blocks_...`),
  the tree written here from the BFL layout (DoubleStreamBlock/SingleStreamBlock), not from
  the key map's tables.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

NOISE = 0.05


def randomize(params, seed: int) -> None:
    """Replace every parameter by small random values (real tensors, even where it was meta)."""
    gen = torch.Generator().manual_seed(seed)
    for module, name, param in params:
        value = torch.randn(param.shape, generator=gen) * NOISE
        module._parameters[name] = nn.Parameter(value)


def adapter_params(model: nn.Module, marker: str):
    """(module, name, parameter) of every parameter whose path contains `marker`."""
    out = []
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if marker in f"{path}.{name}":
                out.append((module, name, param))
    return out


def peft_file(path: Path, transformer: nn.Module, pipeline: str, targets: list[str], *, rank: int = 4,
              alpha: float = 8, dora: bool = False, seed: int = 0) -> Path:
    """PEFT LoRA/DoRA on a (meta) diffusers transformer, saved by the pipeline's save_lora_weights."""
    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_dora=dora, init_lora_weights=False)
    transformer.add_adapter(config)
    randomize(adapter_params(transformer, "lora_"), seed)
    state = get_peft_model_state_dict(transformer)
    getattr(diffusers, pipeline).save_lora_weights(str(path), transformer_lora_layers=state,
                                                   transformer_lora_adapter_metadata=config.to_dict())
    return path / "pytorch_lora_weights.safetensors"


def lycoris_file(path: Path, model: nn.Module, names: list[str], algo: str, seed: int = 0, **kwargs):
    """LyCORIS's generic wrapper on the named modules; returns (file, {lycoris name: LyCORIS module})."""
    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    LycorisNetwork.apply_preset({"target_module": [], "target_name": names})
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo=algo, **kwargs)
    net.apply_to()
    _randomize_network(net, seed)
    net.save_weights(str(path), torch.float32, {})
    return path, {m.lora_name: m for m in net.loras}


def _randomize_network(net: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            for name, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=gen) * NOISE
                if type(module).__name__ == "FullModule":
                    param.add_(noise)  # LyCORIS "full" holds W0 + diff: keep it near W0
                elif name == "dora_scale":
                    param.mul_(1 + noise)  # a magnitude near the original norm
                else:
                    param.copy_(noise)


# ---- a module tree in BFL / ComfyUI names (comfy/ldm/flux/layers.py's layout) ------------------

class _QKNorm(nn.Module):
    def __init__(self, head: int):
        super().__init__()
        self.query_norm, self.key_norm = nn.Module(), nn.Module()
        self.query_norm.scale = nn.Parameter(torch.ones(head))
        self.key_norm.scale = nn.Parameter(torch.ones(head))


class _SelfAttention(nn.Module):
    def __init__(self, h: int, head: int):
        super().__init__()
        self.qkv = nn.Linear(h, 3 * h)
        self.norm = _QKNorm(head)
        self.proj = nn.Linear(h, h)


class _Modulation(nn.Module):
    def __init__(self, h: int, n: int):
        super().__init__()
        self.lin = nn.Linear(h, n * h)


class DoubleStreamBlock(nn.Module):
    def __init__(self, h: int, mlp: int, head: int):
        super().__init__()
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", _Modulation(h, 6))
            setattr(self, f"{stream}_attn", _SelfAttention(h, head))
            setattr(self, f"{stream}_mlp", nn.Sequential(nn.Linear(h, mlp), nn.GELU(), nn.Linear(mlp, h)))


class SingleStreamBlock(nn.Module):
    def __init__(self, h: int, mlp: int, head: int):
        super().__init__()
        self.linear1 = nn.Linear(h, 3 * h + mlp)
        self.linear2 = nn.Linear(h + mlp, h)
        self.norm = _QKNorm(head)
        self.modulation = _Modulation(h, 3)


class BFLFlux(nn.Module):
    """Flux's module tree as BFL and ComfyUI name it (no forward: producers only walk it)."""

    def __init__(self, double: int, single: int, h: int = 3072, mlp: int = 12288, head: int = 128):
        super().__init__()
        self.img_in = nn.Linear(64, h)
        self.txt_in = nn.Linear(4096, h)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(h, mlp, head) for _ in range(double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(h, mlp, head) for _ in range(single))


def kohya_file(path: Path, unet: nn.Module, algo: str, seed: int = 0, names: list[str] | None = None, **kwargs):
    """LyCORIS's kohya wrapper on the DoubleStreamBlock/SingleStreamBlock linears of a BFL tree (or on `names`)."""
    import lycoris.kohya as lk

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    preset = path.with_suffix(".toml")
    modules = [] if names else ["DoubleStreamBlock", "SingleStreamBlock"]
    preset.write_text(f"enable_conv = false\nunet_target_module = {modules!r}\nunet_target_name = {list(names or [])!r}\n"
                      "text_encoder_target_module = []\ntext_encoder_target_name = []\n".replace("'", '"'))
    cls = lk.LycorisNetworkKohya  # presets are class state: clear what an earlier one set
    cls.MODULE_ALGO_MAP, cls.NAME_ALGO_MAP, cls.USE_FNMATCH, cls.TARGET_EXCLUDE_NAME = {}, {}, False, []
    text_encoder = nn.Module()
    net = lk.create_network(1.0, 4, 2, None, text_encoder, unet, algo=algo, preset=str(preset), **kwargs)
    net.apply_to(text_encoder, unet, apply_text_encoder=False, apply_unet=True)
    _randomize_network(net, seed)
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return path, {m.lora_name: m for m in net.unet_loras}
