"""Every algorithm the engine rebuilds, and the suffix table that detects them.

Adding an algorithm is adding one file with an ``AdapterModule`` subclass and
listing it in ``ALGORITHMS``; its file suffixes go in ``SUFFIX_ROLES``.
"""

from __future__ import annotations

from .base import AdapterModule
from .full import Full
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .norm import Norm
from .oft import BOFT, DiagOFT

ALGORITHMS: tuple[type[AdapterModule], ...] = (LoRA, LoHa, LoKr, Full, Norm, GLoRA, DiagOFT, BOFT, IA3)

# suffix as written after the module name -> canonical role
SUFFIX_ROLES: dict[str, str] = {
    # LoRA / LoCon as kohya and LyCORIS write it
    ".lora_down.weight": "lora_down",
    ".lora_up.weight": "lora_up",
    ".lora_mid.weight": "lora_mid",
    # PEFT, diffusers and other trainers
    ".lora_A.weight": "lora_down",
    ".lora_B.weight": "lora_up",
    ".lora_A.default.weight": "lora_down",
    ".lora_B.default.weight": "lora_up",
    ".lora.down.weight": "lora_down",
    ".lora.up.weight": "lora_up",
    "_lora.down.weight": "lora_down",  # old diffusers attn processors: <...>.to_q_lora.down.weight
    "_lora.up.weight": "lora_up",
    ".lora_linear_layer.down.weight": "lora_down",
    ".lora_linear_layer.up.weight": "lora_up",
    ".down.weight": "lora_down",  # XLabs Flux processors: <...>.processor.qkv_lora1.down.weight
    ".up.weight": "lora_up",
    ".lora_A": "lora_down",
    ".lora_B": "lora_up",
    ".lora_magnitude_vector": "dora_scale",  # PEFT DoRA, output axis
    ".lora_magnitude_vector.weight": "dora_scale",
    ".lora_magnitude_vector.default.weight": "dora_scale",
    ".alpha": "alpha",
    ".dora_scale": "dora_scale",
    # LoHa
    ".hada_w1_a": "hada_w1_a",
    ".hada_w1_b": "hada_w1_b",
    ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1",
    ".hada_t2": "hada_t2",
    # LoKr
    ".lokr_w1": "lokr_w1",
    ".lokr_w1_a": "lokr_w1_a",
    ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2",
    ".lokr_w2_a": "lokr_w2_a",
    ".lokr_w2_b": "lokr_w2_b",
    ".lokr_t2": "lokr_t2",
    # full, norms, (IA)³, GLoRA, OFT/BOFT
    ".diff": "diff",
    ".diff_b": "diff_b",
    ".w_norm": "w_norm",
    ".b_norm": "b_norm",
    ".weight": "weight",
    ".on_input": "on_input",
    ".a1.weight": "a1",
    ".a2.weight": "a2",
    ".b1.weight": "b1",
    ".b2.weight": "b2",
    ".oft_blocks": "oft_blocks",
    ".rescale": "rescale",
}

# suffixes recognised but not applied: listed with the reason, never dropped silently
UNSUPPORTED_SUFFIXES: dict[str, str] = {
    ".bm.weight": "GLoRA Tucker (bm) is not supported",
    ".q_layer.weight": "T-LoRA is not supported",
    ".p_layer.weight": "T-LoRA is not supported",
    ".lambda_layer": "T-LoRA is not supported",
    ".bias_indices": "sparse bias from the LyCORIS extractor is not supported",
    ".bias_values": "sparse bias from the LyCORIS extractor is not supported",
    ".bias_size": "sparse bias from the LyCORIS extractor is not supported",
    ".set_weight": "'set' patches are not supported",
    ".reshape_weight": "'reshape_weight' patches are not supported",
}

_ORDERED = sorted({**SUFFIX_ROLES, **UNSUPPORTED_SUFFIXES}, key=len, reverse=True)


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, suffix) for a file key, trying the longest suffix first."""
    for suffix in _ORDERED:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None


def detect(roles: set[str], shape_of) -> type[AdapterModule] | None:
    """The algorithm that claims these roles, or None."""
    for cls in ALGORITHMS:
        if cls.claims(roles, shape_of):
            return cls
    return None


__all__ = [
    "ALGORITHMS", "AdapterModule", "BOFT", "DiagOFT", "Full", "GLoRA", "IA3", "LoHa", "LoKr", "LoRA",
    "Norm", "SUFFIX_ROLES", "UNSUPPORTED_SUFFIXES", "detect", "split_key",
]
