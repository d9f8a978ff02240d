"""Which DiT a model or an adapter was made for.

A model: ComfyUI's probe keys, tried in each key space, then its configuration read from
its shapes (so any depth gets an exact table), and its text encoders by how much of each
table is present. An adapter: for every family its names could belong to, how many of its
modules resolve, with a fitting shape, in each published variant's table - at the model's
depth when there is a model. Metadata (`modelspec.architecture`) only breaks ties (Flux and
Chroma LoRAs have the same names). Reads names and shapes only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..layout import ModelLayout
from .families import ADAPTER_ORDER, FAMILIES, PROBE_ORDER, KeyView, table
from .names import TEXT_LIKE, mentions, resolve
from .spaces import placement
from .tables import DIFFUSION
from .text import text_shapes

PRESENT_FRACTION = 0.5
# (space, prefix of the diffusion model, names): the first probe that fires wins
_SPACES = (("comfy", "diffusion_model.", "native"), ("checkpoint", "model.diffusion_model.", "native"),
           ("diffusers", "transformer.", "diffusers"), ("bare", "", "native"))
# one key per DiT-only text encoder, to recognise a CLIP object or TE file without a diffusion model
_TEXT_PROBES = {
    "t5xxl": "encoder.block.0.layer.0.SelfAttention.q.weight",
    "umt5xxl": "encoder.block.0.layer.0.SelfAttention.q.weight",
    "qwen25_7b": "model.layers.0.self_attn.q_proj.weight",
    "llama": "model.layers.0.self_attn.q_proj.weight",
    "gemma2_2b": "model.layers.0.self_attn.q_proj.weight",
}
FAMILY_LABEL = {"flux": "flux", "chroma": "chroma", "sd3": "sd3", "wan": "wan", "qwen_image": "qwen-image",
                "hunyuan_video": "hunyuan-video", "lumina2": "lumina2", "hidream": "hidream-i1", "z_image": "z-image"}
# kohya modelspec.architecture prefixes (sd-scripts library/sai_model_spec.py) -> family
_MODELSPEC = (("flux-1-dev", "flux"), ("flux-1-schnell", "flux"), ("flux", "flux"), ("chroma", "chroma"),
              ("stable-diffusion-3", "sd3"), ("lumina-2", "lumina2"), ("qwen-image", "qwen_image"),
              ("wan", "wan"), ("hunyuan-video", "hunyuan_video"), ("hidream", "hidream"))
# ... and the variant, where the names cannot tell (a schnell LoRA is a dev LoRA without guidance_in);
# sd-scripts writes "stable-diffusion-3" followed by e.g. "-m" or "-5-large" [the SD3 forms unverified]
_MODELSPEC_VARIANT = (("flux-1-dev", "flux-dev"), ("flux-1-schnell", "flux-schnell"),
                      ("stable-diffusion-3-5-large", "sd3.5-large"), ("stable-diffusion-3-5-m", "sd3.5-medium"),
                      ("stable-diffusion-3-m", "sd3-medium"))


def _text_parts(family: str, cfg, space: str, shapes: Mapping) -> set[str]:
    found = set()
    keys = placement(family, cfg, space).keys
    for part in FAMILIES[family].text:
        wanted = keys.get(part, {})
        hits = sum(1 for k, s in wanted.items() if k in shapes and tuple(shapes[k]) == s)
        if wanted and hits >= PRESENT_FRACTION * len(wanted):
            found.add(part)
    return found


def detect_dit_model(shapes: Mapping[str, tuple[int, ...]]) -> ModelLayout | None:
    """The DiT layout of a state dict (key -> shape), or None when it is no DiT."""
    for space, prefix, names in _SPACES:
        view = KeyView(shapes, prefix)
        for name in PROBE_ORDER:
            family = FAMILIES[name]
            if not (family.probe if names == "native" else family.probe_diffusers)(view):
                continue
            cfg = (family.read if names == "native" else family.read_diffusers)(view)
            parts = {DIFFUSION} | (_text_parts(name, cfg, space, shapes) if space in ("comfy", "checkpoint") else set())
            return ModelLayout(family.variant_name(cfg), space, frozenset(parts), name, cfg)
    return _text_only(shapes)


def _text_only(shapes: Mapping) -> ModelLayout | None:
    """A text-encoder-only state dict (ComfyUI's CLIP object, a TE file) of a DiT family."""
    for space, head in (("comfy", ""), ("checkpoint", "text_encoders.")):
        if not any(f"{head}{part}.transformer.{key}" in shapes for part, key in _TEXT_PROBES.items()):
            continue
        best = None
        for name in ADAPTER_ORDER:
            family = FAMILIES[name]
            if not family.text:
                continue
            cfg = next(iter(family.variants.values()))
            parts = _text_parts(name, cfg, space, shapes)
            if not parts & set(_TEXT_PROBES):
                continue
            rank = (parts == set(family.text), len(parts))
            if best is None or rank > best[0]:
                best = (rank, name, cfg, parts)
        if best:
            _rank, name, cfg, parts = best
            return ModelLayout(FAMILY_LABEL[name], space, frozenset(parts), name, cfg)
    return None


# ---- adapters -------------------------------------------------------------------------------

_NON_CLIP = ("encoder_block", "encoder.block", "SelfAttention", "DenseReluDense", "gate_proj", "o_proj",
             "embed_tokens", "layers_0_self_attn", "model_layers", "model.layers")


@dataclass(frozen=True)
class Guess:
    """The best DiT explanation of an adapter's modules."""

    family: str
    name: str  # a published variant when the modules pin one, else the family label
    score: int  # modules that resolve and fit
    variants: tuple[str, ...]  # every variant with that score
    config: object  # the configuration it scored best on
    metadata_says: str | None = None  # `modelspec.architecture`, when it decided between equal families


def _fits(module, shape) -> bool:
    return shape is not None and module.fits(shape)


def score(modules: Mapping, family: str, cfg) -> int:
    """How many modules resolve in this table with a shape they fit."""
    t = table(family, cfg)
    texts = FAMILIES[family].text
    count = 0
    for name, module in modules.items():
        found, _declared = resolve(name, family, cfg)
        if not found:
            continue
        hit = found[0]
        if hit.part == DIFFUSION:
            shape = t.shape_of(hit.address)
        else:
            shape = text_shapes(texts[hit.part])[hit.name]
        count += _fits(module, shape)
    return count


def candidate_families(names) -> list[str]:
    names = list(names)
    out = [f for f in ADAPTER_ORDER if any(mentions(n, f) for n in names)]
    if any(n.startswith(TEXT_LIKE) and any(s in n for s in _NON_CLIP) for n in names):
        out += [f for f in ADAPTER_ORDER if f not in out and set(FAMILIES[f].text) & set(_TEXT_PROBES)]
    return out


def modelspec_family(metadata: Mapping[str, str] | None) -> str | None:
    arch = (metadata or {}).get("modelspec.architecture", "").lower()
    return next((family for prefix, family in _MODELSPEC if arch.startswith(prefix)), None)


def modelspec_variant(metadata: Mapping[str, str] | None) -> str | None:
    arch = (metadata or {}).get("modelspec.architecture", "").lower()
    return next((variant for prefix, variant in _MODELSPEC_VARIANT if arch.startswith(prefix)), None)


def guess_adapter(modules: Mapping, model: ModelLayout | None = None,
                  metadata: Mapping[str, str] | None = None) -> Guess | None:
    """The family/variant whose tables explain most modules; None when no DiT explains any.

    With a DiT `model`, variants are scored at the model's depth and the model's own
    configuration competes too. Ties go to the family the metadata names (a `chroma/lora`
    file is a Chroma LoRA even though Flux has all its names), then to the model's family,
    then to the earlier family.
    """
    families = candidate_families(modules)
    model_family = model.family if model is not None and model.config is not None else None
    if model_family and model_family not in families:
        families.append(model_family)
    hinted = modelspec_family(metadata)
    best: tuple | None = None
    runner_up: tuple | None = None
    for name in families:
        family = FAMILIES[name]
        configs: dict[str, object] = {}
        if name == model_family and DIFFUSION in model.parts:
            configs[model.arch] = model.config
            for vname, cfg in family.variants.items():
                configs.setdefault(vname, family.at_depth(cfg, model.config))
        else:
            configs.update(family.variants)
        scores = {vname: score(modules, name, cfg) for vname, cfg in configs.items()}
        top = max(scores.values(), default=0)
        if top == 0:
            continue
        tops = tuple(v for v, s in scores.items() if s == top)
        rank = (top, name == hinted, name == model_family, -ADAPTER_ORDER.index(name))
        if best is None or rank > best[0]:
            runner_up = best
            best = (rank, name, tops, configs)
        elif runner_up is None or rank > runner_up[0]:
            runner_up = (rank, name, tops, configs)
    if best is None:
        return None
    (top, *_), name, tops, configs = best
    decided = runner_up is not None and runner_up[0][0] == top and name == hinted
    published = tuple(v for v in tops if v in FAMILIES[name].variants)
    hinted_variant = modelspec_variant(metadata)
    if len(published) == 1:
        label = published[0]
    elif hinted_variant in published:
        label = hinted_variant
    else:
        label = FAMILY_LABEL[name]
    says = (metadata or {}).get("modelspec.architecture") if decided else None
    return Guess(name, label, top, published or tops, configs[tops[0]], says)
