"""Key mapping: adapter module names -> model weight keys, for SD1.x/SD2.x/SDXL and the DiTs.

Tables, not string-replace chains: `sd_layouts` generates every module of each SD
architecture from a small config and `dit` every diffusion transformer's (Flux, Chroma,
SD3/3.5, Wan 2.1/2.2, Qwen-Image, HunyuanVideo, Lumina 2, HiDream, Z-Image; any depth),
`spaces` places them in ComfyUI / checkpoint / diffusers key spaces, `names` turns each
adapter naming scheme into the canonical names, `detect` recognises architectures and
`mapping` decides per module. Pure python over names and shapes (kohya split_qkv detection
alone reads a module's up factor); it never changes a model, and a refusal happens before any
caller patches.
"""

from .detect import detect_adapter, detect_model
from .dit import DIT_SPACES, FAMILIES, dit_state_shapes, dit_table, is_dit, variant_config
from .layout import ModelLayout, is_text_part
from .mapping import map_adapter
from .names import kohya_name
from .report import MatchReport, Target, block_order
from .sd_layouts import ARCHITECTURES, diffusers_to_ldm, modules
from .spaces import SPACES, state_shapes

__all__ = [
    "ARCHITECTURES",
    "DIT_SPACES",
    "FAMILIES",
    "SPACES",
    "MatchReport",
    "ModelLayout",
    "Target",
    "block_order",
    "detect_adapter",
    "detect_model",
    "kohya_name",
    "diffusers_to_ldm",
    "dit_state_shapes",
    "dit_table",
    "is_dit",
    "is_text_part",
    "map_adapter",
    "modules",
    "state_shapes",
    "variant_config",
]
