"""Which architecture a model or an adapter was made for.

Owns detection only: a DiT model by ComfyUI's probe keys (dit.detect), an SD model by how
much of each generated key table its state-dict shapes cover, an adapter by how many of its
modules resolve to a module whose shape they fit - SD architectures and DiT families
compared on the same count. Reads names and shapes; never loads or mutates weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from .dit.detect import detect_dit_model, guess_adapter
from .layout import UNKNOWN_MODEL, ModelLayout
from .names import resolve
from .sd_layouts import ARCHITECTURES, spec_index
from .spaces import SPACES, space_table

ARCH_NAMES = tuple(ARCHITECTURES)  # order breaks ties: sd1 before sdxl for a lone CLIP-L
PRESENT_FRACTION = 0.5  # a part is present when this share of its keys has the table's shape


class ModuleLike(Protocol):
    """What the key map needs from an adapter module (lycoris_core.AdapterModule has it)."""

    shape: tuple[int, ...]

    @property
    def has_bias(self) -> bool: ...

    def fits(self, weight_shape: tuple[int, ...]) -> bool: ...



def detect_model(shapes: Mapping[str, tuple[int, ...]]) -> ModelLayout:
    """The model's architecture, key space and parts.

    DiTs first, by ComfyUI's probe keys (cheap lookups, so SD models pay nothing); then the
    SD architecture and space whose generated key tables the shapes cover best.
    """
    dit = detect_dit_model(shapes)
    if dit is not None:
        return dit
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


def sd_adapter_scores(adapter_modules: Mapping[str, ModuleLike]) -> dict[str, int]:
    """SD architecture -> modules that name one of its modules and fit its shape."""
    scores = {}
    for arch in ARCH_NAMES:
        specs = spec_index(arch)
        scores[arch] = sum(
            any(m.fits(specs[c].weight) for c in resolve(name, arch)[0])
            for name, m in adapter_modules.items()
        )
    return scores


def identify_adapter(adapter_modules: Mapping[str, ModuleLike], prefer: str | None = None,
                     model: ModelLayout | None = None, metadata: Mapping[str, str] | None = None):
    """(architecture name, DiT Guess or None) of an adapter, SD and DiT families compared.

    The one that explains the most modules wins; on a tie the model's (or `prefer`'s)
    architecture, then SD (a lone CLIP-L adapter stays an SD1 adapter).
    """
    if metadata is None:
        metadata = _metadata_of(adapter_modules)
    scores = sd_adapter_scores(adapter_modules)
    sd_top = max(scores.values(), default=0)
    guess = guess_adapter(adapter_modules, model if model is not None and model.family else None, metadata)
    dit_wins = guess is not None and (guess.score > sd_top or (guess.score == sd_top and model is not None
                                                             and model.family == guess.family))
    if dit_wins:
        return guess.name, guess
    if sd_top == 0:
        return "unknown", guess
    if prefer in scores and scores[prefer] == sd_top:
        return prefer, guess
    return next(a for a in ARCH_NAMES if scores[a] == sd_top), guess


def detect_adapter(adapter_modules: Mapping[str, ModuleLike], prefer: str | None = None, *,
                   model: ModelLayout | None = None, metadata: Mapping[str, str] | None = None) -> str:
    """Architecture whose modules most adapter modules name and fit; `prefer` (or `model`) wins ties.

    SD adapters give sd1/sd2/sdxl; DiT adapters a published variant when their modules pin
    one (flux-dev, sd3.5-large, wan2.1-i2v-14b, ...), else the family (flux, sd3, wan, ...).
    `metadata` (default: the adapter file's header, read through the modules) breaks ties
    between families with the same names, e.g. `modelspec.architecture = chroma/lora`.
    """
    return identify_adapter(adapter_modules, prefer, model, metadata)[0]


def _metadata_of(adapter_modules: Mapping) -> Mapping[str, str]:
    """The header metadata of the file the modules came from (AdapterModule.source), if any."""
    first = next(iter(adapter_modules.values()), None)
    source = getattr(first, "source", None)
    return getattr(source, "metadata", None) or {}
