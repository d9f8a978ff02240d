"""Key maps of the diffusion transformers: Flux/Chroma, SD3/3.5, Wan, Qwen-Image, HunyuanVideo,
Lumina 2, HiDream and Z-Image.

`families` holds the published variants and reads a model's configuration from its keys;
each family's module generates its table (ComfyUI names, shapes, block IDs, the diffusers
correspondence by row segments); `text` the text encoders; `spaces` places both in the
comfy / bare / checkpoint / diffusers key spaces; `names` resolves every adapter naming
scheme; `detect` and `mapping` recognise and map.
"""

from __future__ import annotations

from .families import FAMILIES, variant_index
from .families import table as dit_table
from .spaces import SPACES as DIT_SPACES
from .spaces import dit_state_shapes
from .tables import DIFFUSION, Address, Native, Table


def variant_config(arch: str) -> tuple[str, object]:
    """(family, config) of a published variant name (flux-dev, sd3.5-large, ...) or a family name."""
    try:
        return variant_index()[arch]
    except KeyError:
        raise KeyError(f"unknown DiT architecture {arch!r}; known: {', '.join(variant_index())}") from None


def is_dit(arch: str) -> bool:
    return arch in variant_index()


__all__ = ["DIFFUSION", "DIT_SPACES", "FAMILIES", "Address", "Native", "Table", "dit_state_shapes", "dit_table",
           "is_dit", "variant_config"]
