"""Key mapping: adapter module names -> model weight keys, for SD1.x, SD2.x and SDXL.

Tables, not string-replace chains: `sd_layouts` generates every module of each architecture
from a small config, `spaces` places it in ComfyUI / checkpoint / diffusers key spaces,
`names` turns each adapter naming scheme into the canonical names, `detect` recognises
architectures and `mapping` decides per module. Pure python over names and shapes: it never
reads a tensor, never changes a model, and a refusal happens before any caller patches.
"""

from .detect import ModelLayout, detect_adapter, detect_model
from .mapping import MatchReport, Target, block_order, map_adapter
from .names import kohya_name
from .sd_layouts import ARCHITECTURES, diffusers_to_ldm, modules
from .spaces import SPACES, state_shapes

__all__ = [
    "ARCHITECTURES",
    "SPACES",
    "MatchReport",
    "ModelLayout",
    "Target",
    "block_order",
    "detect_adapter",
    "detect_model",
    "kohya_name",
    "diffusers_to_ldm",
    "map_adapter",
    "modules",
    "state_shapes",
]
