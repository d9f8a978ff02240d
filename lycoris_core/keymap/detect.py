"""Which architecture a model or an adapter was made for.

Owns detection only: a model by how much of each generated key table its state-dict shapes
cover, an adapter by how many of its modules resolve to a module whose shape they fit.
Reads names and shapes; never loads or mutates weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from .names import resolve
from .sd_layouts import ARCHITECTURES, spec_index
from .spaces import PARTS, SPACES, space_table

ARCH_NAMES = tuple(ARCHITECTURES)  # order breaks ties: sd1 before sdxl for a lone CLIP-L
PRESENT_FRACTION = 0.5  # a part is present when this share of its keys has the table's shape


class ModuleLike(Protocol):
    """What the key map needs from an adapter module (lycoris_core.AdapterModule has it)."""

    shape: tuple[int, ...]

    @property
    def has_bias(self) -> bool: ...

    def fits(self, weight_shape: tuple[int, ...]) -> bool: ...


@dataclass(frozen=True)
class ModelLayout:
    arch: str  # "sd1" | "sd2" | "sdxl" | "unknown"
    space: str  # "comfy" | "checkpoint" | "diffusers" | "unknown"
    parts: frozenset[str]

    def describe(self) -> str:
        parts = ", ".join(p for p in PARTS if p in self.parts) or "no known parts"
        return f"{self.arch} model ({self.space} keys: {parts})"


UNKNOWN_MODEL = ModelLayout("unknown", "unknown", frozenset())


def detect_model(shapes: Mapping[str, tuple[int, ...]]) -> ModelLayout:
    """Best (architecture, space) by the number of keys found with the expected shape."""
    best, best_score = UNKNOWN_MODEL, 0
    for arch in ARCH_NAMES:
        for space in SPACES:
            parts, score = set(), 0
            for part, keys in space_table(arch, space).keys.items():
                hits = sum(1 for k, s in keys.items() if k in shapes and tuple(shapes[k]) == s)
                if hits >= PRESENT_FRACTION * len(keys):
                    parts.add(part)
                    score += hits
            if score > best_score:
                best, best_score = ModelLayout(arch, space, frozenset(parts)), score
    return best


def detect_adapter(adapter_modules: Mapping[str, ModuleLike], prefer: str | None = None) -> str:
    """Architecture whose modules most adapter modules name and fit; `prefer` wins ties."""
    scores = {}
    for arch in ARCH_NAMES:
        specs = spec_index(arch)
        scores[arch] = sum(
            any(m.fits(specs[c].weight) for c in resolve(name, arch)[0])
            for name, m in adapter_modules.items()
        )
    top = max(scores.values(), default=0)
    if top == 0:
        return "unknown"
    if prefer in scores and scores[prefer] == top:
        return prefer
    return next(a for a in ARCH_NAMES if scores[a] == top)
