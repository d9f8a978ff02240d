"""Adapter module names -> canonical module names, through lookup tables.

Owns the naming schemes adapters use (kohya/LyCORIS `lora_unet_`/`lora_te*_`, LyCORIS's
generic `lycoris_`, diffusers `unet.`/`text_encoder*.` incl. the old `.processor.to_q` form,
PEFT `base_model.model.`, ComfyUI's `diffusion_model.`/`text_encoders.`). A scheme is a prefix
plus a form; every form's aliases are generated once per architecture from `sd_layouts`.
"""

from __future__ import annotations

from functools import cache

from .sd_layouts import modules, spec_index

Candidate = tuple[str, str]  # (part, canonical module name)

# (prefix, form, parts it may address), longest prefixes first
PREFIX_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("lora_unet_", "us", ("unet",)),
    ("lora_te1_", "us", ("te1",)),
    ("lora_te2_", "us", ("te2",)),
    ("lora_te_", "us", ("te1",)),
    ("lycoris_", "us", ("unet", "te1", "te2")),
    ("unet.base_model.model.", "dot", ("unet",)),
    ("unet.", "dot", ("unet",)),
    ("text_encoder_2.", "dot", ("te2",)),
    ("text_encoder.", "dot", ("te1",)),
    ("base_model.model.", "dot", ("unet", "te1", "te2")),
    ("model.diffusion_model.", "dot", ("unet",)),
    ("diffusion_model.", "dot", ("unet",)),
    ("text_encoders.clip_l.transformer.", "dot", ("te1",)),
    ("text_encoders.clip_h.transformer.", "dot", ("te1",)),
    ("text_encoders.clip_g.transformer.", "dot", ("te2",)),
    ("", "dot", ("unet", "te1", "te2")),  # bare diffusers/LDM paths (old attn-processor files)
)

_PROCESSOR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}


def _dotted_aliases(part: str, name: str, ldm: str | None) -> set[str]:
    aliases = {name}
    if ldm:
        aliases.add(ldm)
    if part == "unet":
        head, sep, tail = name.rpartition(".attn")
        if sep:  # "...attn1.to_q" -> "...attn1.processor.to_q"
            index, _, child = tail.partition(".")
            if child in _PROCESSOR:
                aliases.add(f"{head}.attn{index}.processor.{_PROCESSOR[child]}")
    elif name.startswith("text_model."):
        aliases.add(name[len("text_model.") :])  # transformers 5 flattens CLIPTextModel
        head, sep, proj = name.rpartition(".self_attn.")
        if sep and proj.endswith("_proj"):  # old diffusers TE processors: self_attn.to_q
            aliases.add(f"{head}.self_attn.to_{proj[: -len('_proj')]}")
    return aliases


@cache
def alias_index(arch: str) -> dict[str, dict[str, dict[str, str]]]:
    """form ("dot" | "us") -> part -> alias -> canonical name. Raises on an ambiguous alias."""
    index: dict[str, dict[str, dict[str, str]]] = {"dot": {}, "us": {}}
    for spec in modules(arch):
        for dotted in _dotted_aliases(spec.part, spec.name, spec.ldm):
            for form, alias in (("dot", dotted), ("us", dotted.replace(".", "_"))):
                table = index[form].setdefault(spec.part, {})
                if table.setdefault(alias, spec.name) != spec.name:
                    raise AssertionError(f"{arch}: alias {alias!r} names two modules")
    return index


def resolve(name: str, arch: str) -> tuple[list[Candidate], tuple[str, ...]]:
    """Candidates (part, canonical) for an adapter module name, and the parts its prefix names.

    Several candidates arise only where a scheme does not say which text encoder it means
    (`lycoris_`, `base_model.model.`); the caller picks the one whose shape fits.
    """
    index = alias_index(arch)
    declared: tuple[str, ...] | None = None
    for prefix, form, parts in PREFIX_RULES:
        if not name.startswith(prefix):
            continue
        if declared is None:
            declared = parts
        rest = name[len(prefix) :]
        found = [(p, index[form][p][rest]) for p in parts if rest in index[form].get(p, {})]
        if found:
            return found, parts
    return [], declared or ()


def kohya_name(arch: str, part: str, canonical: str) -> str:
    """The kohya module name of a canonical (part, name): SD1/SD2 UNet names follow diffusers,
    SDXL's follow SGM; text encoders are lora_te_ (one TE) or lora_te1_/lora_te2_."""
    if part == "unet":
        if arch == "sdxl":  # SGM names
            canonical = spec_index(arch)[(part, canonical)].ldm or canonical
        return "lora_unet_" + canonical.replace(".", "_")
    prefix = "lora_te_" if arch != "sdxl" else ("lora_te1_" if part == "te1" else "lora_te2_")
    return prefix + canonical.replace(".", "_")
