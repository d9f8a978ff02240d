"""Hand ``lycoris_core`` patch plans to ComfyUI's ModelPatcher / CLIP patch API.

Nothing here computes a delta: ``LycorisPatch.calculate_weight`` calls
``lycoris_core.patch.accumulate`` with the contributions of one weight key.  ComfyUI
itself decides when to patch (full load, low-VRAM on-the-fly patching, hooks), keeps the
backups and unpatches exactly, so the input MODEL/CLIP are only cloned, never mutated.

ComfyUI modules are imported at call time, so this file imports without ComfyUI.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from lycoris_core.adapter_cache import DEFAULT_ADAPTER_CACHE_BYTES, AdapterCache, budget_from_env
from lycoris_core.errors import BlockWeightError, LycorisError
from lycoris_core.metadata import trigger_words
from lycoris_core.patch import (
    DEFAULT_CACHE_BYTES,
    AdapterSpec,
    Contribution,
    DeltaCache,
    PatchPlan,
    accumulate,
    build_plan,
)

log = logging.getLogger("comfyui-lycoris")

NONE = "None"
LORA_FOLDER = "loras"

# One of each per process: every node shares loaded files and strength-1 deltas.
ADAPTERS = AdapterCache(budget_from_env("LYCORIS_ADAPTER_CACHE_MB", DEFAULT_ADAPTER_CACHE_BYTES))
DELTAS = DeltaCache(budget_from_env("LYCORIS_CACHE_MB", DEFAULT_CACHE_BYTES))


# ---- the adapter object ComfyUI calls -------------------------------------------------------

def _is_identity(function) -> bool:
    """ComfyUI passes ``lambda a: a`` when no function was given; it returns its argument."""
    if function is None:
        return True
    probe = torch.empty(0)
    try:
        return function(probe) is probe
    except Exception:
        return False


class _LycorisPatchMixin:
    """All contributions of a stack to one weight (or bias) key: summed once, in place."""

    name = "lycoris"

    def __init__(self, key: str, shape: Sequence[int], contributions: Sequence[Contribution],
                 cache: DeltaCache | None = None):
        self.key = key
        self.shape = tuple(shape)
        self.contributions = tuple(contributions)
        self.cache = cache
        self.loaded_keys: set[str] = set()
        self.weights = ()
        self.needs_original = any(c.module.uses_weight and not c.bias for c in self.contributions)

    def __repr__(self) -> str:
        return f"<LycorisPatch {self.key}: {len(self.contributions)} contributions>"

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        # ``weight`` is ComfyUI's float32 working copy (already times strength_model),
        # narrowed to ``offset`` when there is one; it must be changed in place.
        if strength == 0 or not self.contributions:
            return weight
        if offset is None and tuple(weight.shape) == self.shape:
            # W0-dependent deltas (DoRA, GLoRA, IA3, OFT) read the weight as it arrived
            base = weight.detach().clone() if self.needs_original else weight
            if weight.dtype == torch.float32 and _is_identity(function):
                accumulate(weight, base, self.contributions, self.cache, scale=strength)
            else:
                delta = accumulate(torch.zeros(self.shape, dtype=torch.float32, device=weight.device),
                                   base, self.contributions, self.cache, scale=strength)
                weight += function(delta).to(weight.dtype)
            return weight
        if self.needs_original:
            raise LycorisError(
                f"{key}: a LyCORIS patch that depends on the original weight cannot be applied to a "
                f"slice {offset} of it"
            )
        if offset is None:
            raise LycorisError(f"{key}: weight is {tuple(weight.shape)}, the LyCORIS patch was built for {self.shape}")
        full = torch.zeros(self.shape, dtype=torch.float32, device=weight.device)
        accumulate(full, full, self.contributions, self.cache, scale=strength)
        weight += function(full.narrow(*offset)).to(weight.dtype)
        return weight


_PATCH_CLASSES: dict[type, type] = {}


def patch_class() -> type:
    """The ``comfy.weight_adapter.WeightAdapterBase`` subclass, made once per base class."""
    import comfy.weight_adapter as weight_adapter

    base = weight_adapter.WeightAdapterBase
    cls = _PATCH_CLASSES.get(base)
    if cls is None:
        cls = type("LycorisPatch", (_LycorisPatchMixin, base), {"__module__": __name__})
        _PATCH_CLASSES[base] = cls
    return cls


# ---- files ------------------------------------------------------------------------------------

def adapter_names() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(LORA_FOLDER)


def adapter_path(name: str) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise(LORA_FOLDER, name)


def load(name: str):
    return ADAPTERS.get(adapter_path(name))


# ---- planning and applying ----------------------------------------------------------------

def _shapes(patcher) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in patcher.model_state_dict().items()}


def plan_for(specs: Sequence[AdapterSpec], model_shapes: dict, clip_shapes: dict) -> PatchPlan:
    """One plan for the whole stack on MODEL (+ CLIP) weights; the core's refusal names the adapter file."""
    return build_plan(specs, {**model_shapes, **clip_shapes})


def apply_stack(model, clip, rows: Sequence[tuple[str, float, float, str]]):
    """Clone MODEL/CLIP and add one patch per weight key for the enabled ``rows``.

    ``rows``: (adapter name, strength_model, strength_clip, block weights).  Returns
    (model, clip, plan or None, lines) where ``lines`` is one summary line per adapter.
    """
    rows = [r for r in rows if r[0] and r[0] != NONE]
    if clip is None:
        rows = [r for r in rows if r[1] != 0]
    else:
        rows = [r for r in rows if r[1] != 0 or r[2] != 0]
    if not rows:
        return model, clip, None, []
    specs = []
    for name, sm, sc, bw in rows:
        adapter = load(name)
        try:
            specs.append(AdapterSpec(adapter, strength_unet=sm, strength_clip=sc, blocks=(bw or "").strip() or None))
        except BlockWeightError as exc:
            raise BlockWeightError(f"LyCORIS adapter '{name}': {exc}") from None
    model_keys = _shapes(model)
    clip_keys = _shapes(clip.patcher) if clip is not None else {}
    plan = plan_for(specs, model_keys, clip_keys)
    # deltas of this stack are protected from eviction by older ones
    DELTAS.new_epoch(c.module for cs in plan.contributions.values() for c in cs)
    names = [r[0] for r in rows]

    cls = patch_class()
    shapes = {**model_keys, **clip_keys}
    model_patches, clip_patches = {}, {}
    for key, contributions in plan.contributions.items():
        live = [c for c in contributions if c.strength != 0]
        if not live:
            continue
        patch = cls(key, shapes[key], live, DELTAS)
        if key in model_keys:
            model_patches[key] = patch
        elif key in clip_keys:
            clip_patches[key] = patch

    new_model = model.clone()
    accepted = new_model.add_patches(model_patches, 1.0) if model_patches else []
    new_clip = clip
    if clip is not None:
        new_clip = clip.clone()
        accepted = list(accepted) + list(new_clip.add_patches(clip_patches, 1.0) if clip_patches else [])
    dropped = len(model_patches) + len(clip_patches) - len(accepted)
    if dropped:  # cannot happen with keys from the model's own state dict; say so once if it does
        log.warning("[LyCORIS] %d patched keys were not accepted by the model", dropped)

    lines = []
    for name, spec, report in zip(names, specs, plan.reports, strict=True):
        line = f"{name}: {report.summary()}"
        if spec.adapter.unknown_reasons:
            line += f"; {len(spec.adapter.unknown_reasons)} adapter keys not understood"
        lines.append(line)
        log.info("[LyCORIS] %s", line)
    return new_model, new_clip, plan, lines


def trigger_lines(names: Sequence[str]) -> list[str]:
    lines = []
    for name in names:
        if not name or name == NONE:
            continue
        adapter = load(name)
        words = trigger_words(adapter.metadata, adapter.path)
        if words:
            lines.append(f"{name}: {', '.join(words)}")
    return lines
