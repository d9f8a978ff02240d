"""What a model's state dict was recognised as: architecture, key space, parts present."""

from __future__ import annotations

from dataclasses import dataclass

SD_PARTS = ("unet", "te1", "te2")
DIFFUSION_PARTS = ("unet", "diffusion_model")  # every other part is a text encoder


def is_text_part(part: str) -> bool:
    """True for a text-encoder part (te1, te2, clip_l, t5xxl, ...), False for the UNet/diffusion model.

    CLIP strength applies to every text part, the model strength to the rest.
    """
    return part not in DIFFUSION_PARTS


@dataclass(frozen=True)
class ModelLayout:
    """A recognised model. `arch` names it (sd1, sdxl, flux-dev, wan2.1-i2v-14b, ...).

    DiT layouts also carry their `family` (flux, sd3, wan, ...) and the `config` their
    tables were generated from (depth included); both are None for SD1/SD2/SDXL.
    """

    arch: str
    space: str
    parts: frozenset[str]
    family: str | None = None
    config: object = None

    def part_order(self) -> tuple[str, ...]:
        if self.family is None:
            return SD_PARTS
        from .dit.families import FAMILIES

        return ("diffusion_model", *FAMILIES[self.family].text)

    def describe(self) -> str:
        parts = ", ".join(p for p in self.part_order() if p in self.parts) or "no known parts"
        return f"{self.arch} model ({self.space} keys: {parts})"


UNKNOWN_MODEL = ModelLayout("unknown", "unknown", frozenset())
