"""Write adapters into model weights at UNet/CLIP/block strengths, and restore exactly.

In reading order:

- ``plan``: ``AdapterSpec`` (an adapter with its strengths and block weights) and
  ``build_plan``, which maps a stack onto a model's keys and records each module's
  ``Contribution`` per weight key;
- ``blocks``: block-weight tables, presets and the named form;
- ``kernel``: the one patch kernel every front end goes through — ``patched_value`` and
  ``accumulate``: float32 sums in row tiles on the weight's device, one rounding, one
  range check per weight;
- ``cache``: ``DeltaCache``, strength-1 deltas under a memory-aware budget, and the
  ``DeltaSource`` protocol the kernel asks (bake's prefetcher implements it too);
- ``patcher``: ``WeightPatcher``, patching a state dict or module in place with exact
  restore.

Never imports ComfyUI: ``nodes/`` wraps ``accumulate`` in ComfyUI's adapter interface.
"""

from .blocks import BlockWeights, parse_block_weights
from .cache import DEFAULT_CACHE_BYTES, DeltaCache, DeltaSource
from .kernel import accumulate, contribution_delta, module_delta, patched_value, streams
from .patcher import WeightPatcher
from .plan import AdapterSpec, Contribution, PatchPlan, build_plan, contribution_strength

__all__ = [
    "DEFAULT_CACHE_BYTES", "AdapterSpec", "BlockWeights", "Contribution", "DeltaCache", "DeltaSource", "PatchPlan",
    "WeightPatcher", "accumulate", "build_plan", "contribution_delta", "contribution_strength", "module_delta",
    "parse_block_weights", "patched_value", "streams",
]
