"""Adapter module names of DiT adapters -> (part, address), through generated alias tables.

Owns the naming schemes: a scheme is a prefix (kohya/musubi `lora_unet_`, LyCORIS
`lycoris_`, OneTrainer `lora_transformer_`, ComfyUI `diffusion_model.`, diffusers/PEFT
`transformer.` and `base_model.model.`, bare names for DiffSynth/XLabs/Wan, the text
encoders' `lora_te{n}_`, `text_encoder{_n}.` and `text_encoders.<part>.transformer.`) and
a separator form: dotted names are looked up as written, underscored ones against the
underscored aliases (never by re-inserting dots). Every dialect of a family (ComfyUI
names, diffusers names, the family's extras) is indexed once per configuration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cache

from .families import FAMILIES, table
from .tables import DIFFUSION, Address
from .text import text_table

# prefix -> form, for the diffusion model; longest first so `lora_unet__` beats `lora_unet_`
DIFFUSION_PREFIXES: tuple[tuple[str, str], ...] = tuple(sorted((
    ("lora_unet__", "us"),  # Wan-Fun reward LoRAs
    ("lora_unet_", "us"),
    ("lycoris_", "us"),
    ("lora_transformer_", "us"),
    ("Hunyuan_video_I2V_lora_", "us"),  # Tencent HunyuanVideo-I2V trainer
    ("model.diffusion_model.", "dot"),
    ("diffusion_model.", "dot"),
    ("transformer.base_model.model.", "dot"),  # old SimpleTuner saves
    ("base_model.model.", "dot"),  # raw PEFT, fal Kontext
    ("transformer.", "dot"),
), key=lambda p: -len(p[0]))) + (("", "dot"),)  # bare names: DiffSynth, XLabs, Wan, BFL control


@dataclass(frozen=True)
class Resolved:
    part: str
    address: Address | None  # diffusion model modules
    name: str | None  # text-encoder modules: the HF name


@cache
def diffusion_index(family: str, cfg) -> dict[str, dict[str, Address]]:
    """form -> alias -> address, over every dialect of the family. Raises on an alias naming two places."""
    t = table(family, cfg)
    index: dict[str, dict[str, Address]] = {"dot": {}, "us": {}}

    def put(name: str, address: Address) -> None:
        for form, alias in (("dot", name), ("us", name.replace(".", "_"))):
            if index[form].setdefault(alias, address) != address:
                raise AssertionError(f"{family}: alias {alias!r} names two places")

    for name, native in t.natives.items():
        put(name, t.address(name))
        if native.leaf == "scale":  # ComfyUI also keys non-.weight tensors by their full key
            put(native.key, t.address(name))
    for name, (_leaf, segments) in t.diffusers.items():
        put(name, Address(segments))
    for name, segments in t.extra.items():
        put(name, Address(segments))
    return index


@cache
def text_index(cfg) -> dict[str, dict[str, str]]:
    """form -> alias -> HF name, for one text encoder (flattened CLIP and `model.`-less decoders too)."""
    index: dict[str, dict[str, str]] = {"dot": {}, "us": {}}
    for module in text_table(cfg):
        aliases = {module.name}
        for head in ("text_model.", "model."):
            if module.name.startswith(head):
                aliases.add(module.name[len(head):])
        for alias in aliases:
            for form, key in (("dot", alias), ("us", alias.replace(".", "_"))):
                if index[form].setdefault(key, module.name) != module.name:
                    raise AssertionError(f"{cfg}: alias {key!r} names two modules")
    return index


@cache
def _text_prefixes(family: str) -> tuple[tuple[str, str, str], ...]:
    """(prefix, form, part) for the family's text encoders, longest prefix first."""
    f = FAMILIES[family]
    rules = [(p, "us", part) for p, part in f.kohya_text.items()]
    rules += [(p, "dot", part) for p, part in f.diffusers_text.items()]
    rules += [(f"text_encoders.{part}.transformer.", "dot", part) for part in f.text]
    return tuple(sorted(rules, key=lambda r: -len(r[0])))


TEXT_LIKE = ("lora_te", "text_encoder", "lora_prior_te")
TEXT = "te"  # the part of a text-encoder name no table knows


def resolve(name: str, family: str, cfg) -> tuple[list[Resolved], tuple[str, ...]]:
    """Places an adapter module name can mean in this family, and the parts its prefix declares.

    Text prefixes are tried first (they are longer and unambiguous); then the diffusion
    model's prefixes, the bare form last.
    """
    f = FAMILIES[family]
    for prefix, form, part in _text_prefixes(family):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if form == "us":
                rest = rest.replace(".", "_")
            # the prefix's own encoder first; then the others (HunyuanVideo's `text_encoder.` is
            # its Llama in diffusers but CLIP-L for ComfyUI; their module names never collide)
            for candidate in (part, *(p for p in f.text if p != part)):
                hit = text_index(f.text[candidate])[form].get(rest)
                if hit:
                    return [Resolved(candidate, None, hit)], (part,)
            return [], (part,)
    index = diffusion_index(family, cfg)
    for prefix, form in DIFFUSION_PREFIXES:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        if form == "us":
            rest = rest.replace(".", "_")  # `lora_unet_blocks_0.cross_attn.k`: mixed separators
        hit = index[form].get(rest)
        if hit is not None:
            return [Resolved(DIFFUSION, hit, None)], (DIFFUSION,)
    return [], ((TEXT,) if name.startswith(TEXT_LIKE) else (DIFFUSION,))


@cache
def _roots(family: str) -> re.Pattern:
    """The first name pieces of every dialect of the family, to skip families cheaply."""
    roots: set[str] = set()
    f = FAMILIES[family]
    for cfg in f.variants.values():  # depth never changes a root: one block per group is enough
        tiny = f.at_depth(cfg, replace(cfg, blocks=(1,) * len(cfg.blocks)))
        t = table(family, tiny)
        for name in (*t.natives, *t.diffusers, *t.extra):
            roots.add(name.split(".", 1)[0])
    pieces = sorted({r.replace(".", "_") for r in roots} | roots, key=len, reverse=True)
    return re.compile("(?:" + "|".join(map(re.escape, pieces)) + r")(?:[._]|$)")


def mentions(name: str, family: str) -> bool:
    """Could this name be one of the family's diffusion-model modules (prefix stripped)?"""
    pattern = _roots(family)
    for prefix, _form in DIFFUSION_PREFIXES:
        if name.startswith(prefix) and pattern.match(name, len(prefix)):
            return True
    return False


def kohya_text_name(family: str, part: str, hf_name: str) -> str:
    """The module name merge/convert write for a text-encoder module: kohya's where it exists."""
    for prefix, target in FAMILIES[family].kohya_text.items():
        if target == part and prefix != "lora_te_":
            return prefix + hf_name.replace(".", "_")
    return f"text_encoders.{part}.transformer.{hf_name}"
