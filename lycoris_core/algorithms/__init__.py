"""Every algorithm the engine rebuilds, and the suffix table that detects them.

Owns the per-algorithm math: one file per algorithm, one ``AdapterModule`` subclass
each, declaring the file suffixes it reads (``suffixes``), shape checks at load, the
delta (built in row tiles where it can, see ``numerics.tiles``) and a plain reference
formula that tests compare the fast path with.  DoRA is pure functions in ``dora``.
Adding an algorithm is adding one file and listing its class in ``ALGORITHMS``: the
suffix table is built from the classes.

Never does I/O beyond the lazy tensor source, never decides where a weight lives
(the caller passes the device), never knows model names.
"""

from __future__ import annotations

from .base import AdapterModule
from .full import Full, Norm
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .oft import BOFT, DiagOFT

ALGORITHMS: tuple[type[AdapterModule], ...] = (LoRA, LoHa, LoKr, Full, Norm, GLoRA, DiagOFT, BOFT, IA3)


def _suffix_roles() -> dict[str, str]:
    """suffix as written after the module name -> canonical role, from every algorithm's declaration."""
    table: dict[str, str] = {}
    for cls in ALGORITHMS:
        for suffix, role in cls.all_suffixes().items():
            if table.setdefault(suffix, role) != role:
                raise AssertionError(f"suffix {suffix!r} means {table[suffix]!r} and {role!r}")
    return table


SUFFIX_ROLES: dict[str, str] = _suffix_roles()

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
