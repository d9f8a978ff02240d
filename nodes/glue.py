"""Hand ``lycoris_core`` patch plans to ComfyUI's ModelPatcher / CLIP patch API.

Nothing here computes a delta: ``LycorisPatch.calculate_weight`` calls the core's patch
kernel (``lycoris_core.patch.accumulate``) with the contributions of one weight key, on
the working copy ComfyUI hands over (on its device, in its dtype).  ComfyUI itself
decides when to patch (full load, low-VRAM on-the-fly patching, hooks), keeps the
backups and unpatches exactly, so the input MODEL/CLIP are only cloned, never mutated.

ComfyUI modules are imported at call time, so this file imports without ComfyUI.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Sequence

import torch

from lycoris_core.adapter.cache import DEFAULT_ADAPTER_CACHE_BYTES, AdapterCache
from lycoris_core.adapter.metadata import trigger_words
from lycoris_core.errors import BlockWeightError, LycorisError
from lycoris_core.memory import budget_from_env
from lycoris_core.patch import (
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

# One of each per process: every node shares loaded files and (when asked for) strength-1 deltas.
ADAPTERS = AdapterCache(budget_from_env("LYCORIS_ADAPTER_CACHE_MB", DEFAULT_ADAPTER_CACHE_BYTES))
# No deltas are kept by default, on any device.  Measured in a real ComfyUI (bench/real_comfyui.py,
# docs/benchmarks.md "Real ComfyUI"): every ComfyUI patch already pays its own float32 copy of
# each weight and the unpatch, so a kept delta saves at most the product (~0.5 s for a whole SD1.5
# LoRA), while filling the cache costs 2-5 s of page faults and gigabytes beside the model.
# ``LYCORIS_CACHE_MB`` opts in (the standalone WeightPatcher, with no such floor, keeps them).
NODE_CACHE_BYTES = 0
DELTAS = DeltaCache(budget_from_env("LYCORIS_CACHE_MB", NODE_CACHE_BYTES),
                    budget_from_env("LYCORIS_DEVICE_CACHE_MB", 0))


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
    """All contributions of a stack to one weight (or bias) key: summed once, in place.

    ``identity`` names the original weight this patch sees (see ``patch.cache``): set when
    this is the first patch on its key of a known model, so W0-dependent deltas may be
    kept across strength changes; None otherwise (they are rebuilt every time).
    """

    name = "lycoris"

    def __init__(self, key: str, shape: Sequence[int], contributions: Sequence[Contribution],
                 cache: DeltaCache | None = None, identity=None):
        self.key = key
        self.shape = tuple(shape)
        self.contributions = tuple(contributions)
        self.cache = cache
        self.identity = identity
        self.loaded_keys: set[str] = set()
        self.weights = ()

    def __repr__(self) -> str:
        return f"<LycorisPatch {self.key}: {len(self.contributions)} contributions>"

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        # ``weight`` is ComfyUI's working copy (float32, or the compute dtype in low-VRAM mode),
        # on its device, already times strength_model, narrowed to ``offset`` when there is one;
        # it is changed in place and returned: the sum is formed in float32 and rounded once.
        if strength == 0 or not self.contributions:
            return weight
        if offset is None and tuple(weight.shape) == self.shape and _is_identity(function):
            identity = None if self.identity is None else (*self.identity, weight.dtype)
            return accumulate(weight, None, self.contributions, self.cache, scale=strength,
                              identity=identity, key=key)
        if offset is not None and any(c.module.uses_weight and not c.bias for c in self.contributions):
            raise LycorisError(
                f"{key}: a LyCORIS patch that depends on the original weight cannot be applied to a "
                f"slice {offset} of it"
            )
        if offset is None and tuple(weight.shape) != self.shape:
            raise LycorisError(f"{key}: weight is {tuple(weight.shape)}, the LyCORIS patch was built for {self.shape}")
        # a ``function`` (e.g. a scaled-fp8 weight's scale) or an offset: the float32 delta first
        base = weight if offset is None else None
        delta = accumulate(torch.zeros(self.shape, dtype=torch.float32, device=weight.device),
                           base, self.contributions, None, scale=strength, key=key)
        if offset is not None:
            delta = delta.narrow(*offset)
        return weight.copy_(weight.to(torch.float32).add_(function(delta)))


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


# ---- memory: give the caches back when ComfyUI frees memory for models ------------------------

_HOOKED = threading.Lock()
_hooked = False


def release_caches() -> None:
    """Drop every kept delta and every factor kept on an accelerator."""
    DELTAS.clear()
    ADAPTERS.release_devices()


def _hook_model_unloads() -> None:
    """Once per process: when ComfyUI unloads models to make room, our caches go too."""
    global _hooked
    with _HOOKED:
        if _hooked:
            return
        _hooked = True
        import comfy.model_management as mm

        free_memory = mm.free_memory

        def free_memory_and_lycoris_caches(*args, **kwargs):
            unloaded = free_memory(*args, **kwargs)
            if unloaded:
                release_caches()
            return unloaded

        mm.free_memory = free_memory_and_lycoris_caches


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

_MODEL_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENS = itertools.count()


def _model_token(patcher) -> int:
    """A number for the torch module behind a ModelPatcher, never reused while it lives."""
    module = patcher.model
    token = _MODEL_TOKENS.get(module)
    if token is None:
        token = _MODEL_TOKENS[module] = next(_TOKENS)
    return token


def _shapes(patcher) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in patcher.model_state_dict().items()}


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
    _hook_model_unloads()
    specs = []
    for name, sm, sc, bw in rows:
        adapter = load(name)
        try:
            specs.append(AdapterSpec(adapter, strength_unet=sm, strength_clip=sc, blocks=(bw or "").strip() or None))
        except BlockWeightError as exc:
            raise BlockWeightError(f"LyCORIS adapter '{name}': {exc}") from None
    model_keys = _shapes(model)
    clip_keys = _shapes(clip.patcher) if clip is not None else {}
    plan: PatchPlan = build_plan(specs, {**model_keys, **clip_keys})
    # deltas of this stack are protected from eviction by older ones
    DELTAS.new_epoch(c.module for cs in plan.contributions.values() for c in cs)

    new_model = model.clone()
    new_clip = clip.clone() if clip is not None else None
    offered = accepted = 0
    for target, keys in ((new_model, model_keys), (new_clip.patcher if new_clip is not None else None, clip_keys)):
        if target is None:
            continue
        patches = _patches(plan, keys, target)
        offered += len(patches)
        if patches:
            owner = new_model if target is new_model else new_clip
            accepted += len(owner.add_patches(patches, 1.0))
    if offered != accepted:  # cannot happen with keys from the model's own state dict; say so once if it does
        log.warning("[LyCORIS] %d patched keys were not accepted by the model", offered - accepted)

    lines = []
    for (name, *_), spec, report in zip(rows, specs, plan.reports, strict=True):
        line = f"{name}: {report.summary()}"
        if spec.adapter.unknown_reasons:
            line += f"; {len(spec.adapter.unknown_reasons)} adapter keys not understood"
        lines.append(line)
        log.info("[LyCORIS] %s", line)
    return new_model, new_clip if clip is not None else clip, plan, lines


def _patches(plan: PatchPlan, keys: dict, patcher) -> dict:
    """One LycorisPatch per key of this model part that the plan touches at a non-zero strength."""
    cls = patch_class()
    token = _model_token(patcher)
    out = {}
    for key, contributions in plan.contributions.items():
        live = [c for c in contributions if c.strength != 0]
        if key not in keys or not live:
            continue
        # the original weight is what this patch sees only when no earlier patch is on the key
        identity = None if patcher.patches.get(key) else (token, key)
        out[key] = cls(key, keys[key], live, DELTAS, identity)
    return out


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
