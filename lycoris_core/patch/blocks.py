"""Block weights: sd-webui-lora-block-weight's fixed tables, presets and a named form, for every model.

Tables are fixed, so a vector means the same blocks for every adapter (unlike data-driven
tools that number only the blocks a file happens to contain).  ``resolve(model)`` turns a
spec into block ID -> weight for one model; the plan multiplies each module's strength by
its block's weight (UNet/diffusion-model strength, or CLIP strength for text encoders).

**SD1/SD2/SDXL** (block IDs are LDM indices; BASE = the text encoder(s)):

- a preset: NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5 (SDXL: NONE, ALL, ALL0.5);
- a vector of 17 or 26 numbers (SD1/SD2) or 12 or 20 (SDXL), starting with BASE; blocks a
  short vector does not name get 0, as in lora-block-weight:
  26 = BASE, IN00-IN11, M00, OUT00-OUT11;  17 = BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03-OUT11;
  20 = BASE, IN00-IN08, M00, OUT00-OUT08;  12 = BASE, IN04, IN05, IN07, IN08, M00, OUT00-OUT05;
- a named form ``in=0.5, mid=1, out03-05=0``: items ``default``, ``base``, ``in``, ``mid``, ``out``,
  a block (``in04``, ``out3``, ``m00``) or a range (``out03-05``, ``in04-out02``), applied left
  to right over a default of 1.

Modules outside every SD block (time embedding, label embedding, conv_out, norm_out) are not
scaled: they take the plain UNet strength, as lora-block-weight leaves its "unknown modules" at 1.

**Diffusion transformers**: one slot per text encoder, ``IN`` (every embedding before the first
block), the blocks by index in model order, ``OUT`` (the final layer).  Every module of a DiT
is in exactly one slot.  Full-size tables:

====================  =====  ===============================================================
family                slots  table
====================  =====  ===============================================================
Flux.1, Chroma        61     CLIP, T5, IN, D00-D18, S00-S37, OUT  (lora-block-weight's Flux
                             table; Chroma has no CLIP-L, its CLIP slot matches nothing)
SD3 / 3.5 medium      29     CLIP, CLIP_G, T5, IN, J00-J23, OUT
SD3.5 large           43     CLIP, CLIP_G, T5, IN, J00-J37, OUT
Wan 14B               43     T5, IN, B00-B39, OUT  (T5 = umT5)
Wan 1.3B, 2.2 5B      33     T5, IN, B00-B29, OUT
Qwen-Image            63     QWEN, IN, B00-B59, OUT
HunyuanVideo          64     CLIP, LLAMA, IN, D00-D19, S00-S39, OUT  (token refiner: IN)
HiDream-I1            54     CLIP, CLIP_G, T5, LLAMA, IN, D00-D15, S00-S31, OUT
Lumina 2              33     GEMMA, IN, L00-L25, NR00-NR01, CR00-CR01, OUT
Z-Image               36     IN, L00-L29, NR00-NR01, CR00-CR01, OUT
====================  =====  ===============================================================

(D = double-stream, S = single-stream, J = SD3 joint, B = Wan/Qwen blocks, L = Lumina/Z-Image
layers, NR/CR = noise/context refiners.)  Accepted for a DiT:

- a preset: NONE, ALL, ALL0.5 (and FLUXALL, lora-block-weight's 61 ones, for Flux/Chroma);
- a vector with one number per slot of the model's table.  Any depth: a reduced ("lite") model's
  table follows its real block count (Flux with 2 double and 4 single blocks: CLIP, T5, IN,
  D00-D01, S00-S03, OUT = 10 values).  A vector of the full published length is also accepted
  there and read by block ID: D00 takes D00's value, and the values of blocks the model
  lacks are not used;
- a named form ``double=0.5, single03-10=0, t5=0``: ``default``, ``base``/``te`` (every text
  encoder), a text slot (``clip``, ``clip_g``, ``t5``, ``qwen``, ``llama``, ``gemma``, or the part
  name ``t5xxl``...), ``in``, ``out``, a group (``double``, ``single``, ``joint``, ``blocks``,
  ``layers``, ``noise_refiner``, ``context_refiner``), a block (``d05``, ``double5``, ``s12``,
  ``j03``, ``b39``, ``l25``, ``nr01``) or a range (``single03-10``, ``d10-s05``, ``in-d03``).
  Indices are 0-based like the block IDs (Inspire Pack's ``%`` form is 1-based).  On a reduced
  model, names are checked against the published table and apply to the blocks the model has.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from ..errors import BlockWeightError


def _ids(prefix: str, numbers) -> list[str]:
    return [f"{prefix}{n:02d}" for n in numbers]


# every block of each family, in table order (the full-length table)
ALL_BLOCKS = {
    "sd": ["BASE", *_ids("IN", range(12)), "M00", *_ids("OUT", range(12))],
    "sdxl": ["BASE", *_ids("IN", range(9)), "M00", *_ids("OUT", range(9))],
}

# the vector lengths users type, per family, and the blocks each names
TABLES = {
    26: ("sd", ALL_BLOCKS["sd"]),
    17: ("sd", ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *_ids("OUT", range(3, 12))]),
    20: ("sdxl", ALL_BLOCKS["sdxl"]),
    12: ("sdxl", ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", *_ids("OUT", range(6))]),
}

# lora-block-weight's presets, as sets of enabled blocks of its 17-value table
_SD17 = TABLES[17][1]
_PRESET_BLOCKS = {
    "NONE": [],
    "ALL": _SD17,
    "INS": ["BASE", "IN01", "IN02", "IN04"],
    "IND": ["BASE", "IN05", "IN07", "IN08"],
    "INALL": ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08"],
    "MIDD": ["BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05"],
    "OUTD": ["BASE", "OUT03", "OUT04", "OUT05", "OUT06"],
    "OUTS": ["BASE", *_ids("OUT", range(7, 12))],
    "OUTALL": ["BASE", *_ids("OUT", range(3, 12))],
}


def preset_vector(name: str) -> list[float]:
    """The published 17-value vector of a preset."""
    name = name.upper()
    if name == "ALL0.5":
        return [0.5] * 17
    enabled = set(_PRESET_BLOCKS[name])
    return [1.0 if block in enabled else 0.0 for block in _SD17]


PRESETS = [*_PRESET_BLOCKS, "ALL0.5", "FLUXALL"]
ARCH_FAMILY = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl"}
DIT_PRESETS = ("NONE", "ALL", "ALL0.5")

_HELP = (
    "accepted: a preset (" + ", ".join(PRESETS) + "), a vector of 17 or 26 numbers for SD1/SD2 "
    "or 12 or 20 for SDXL (BASE first) or one per slot of a DiT's block table (Flux: 61, CLIP, T5, IN, "
    "D00-D18, S00-S37, OUT), or a named form like 'in=0.5, mid=1, out03-05=0' or "
    "'double=0.5, single03-10=0, t5=0'"
)


@dataclass(frozen=True)
class BlockWeights:
    """A parsed block-weight spec; ``resolve(model)`` gives block ID -> weight."""

    text: str
    kind: str  # "preset" | "vector" | "named"
    values: tuple = ()

    def resolve(self, model) -> dict[str, float]:
        """Block ID -> weight for ``model``: an architecture name (sd1, sdxl, flux-dev, wan2.1-i2v-14b,
        ...; full size) or a ``keymap.ModelLayout`` (any depth).  Raises ``BlockWeightError``
        for a spec this model's table does not accept, listing what it does."""
        table = _dit_table_of(model)
        if table is not None:
            return _resolve_dit(self, table)
        arch = getattr(model, "arch", model)
        family = ARCH_FAMILY.get(arch)
        if family is None:
            raise BlockWeightError(f"block weights need a recognised model, not {arch!r}")
        if self.kind == "vector":
            return _from_vector(list(self.values), family, self.text)
        if self.kind == "preset":
            name = self.values[0]
            if name == "FLUXALL":
                raise BlockWeightError(f"preset FLUXALL is lora-block-weight's Flux table; this is an {arch} model")
            if family != "sd" and name not in ("NONE", "ALL", "ALL0.5"):
                raise BlockWeightError(
                    f"preset {name} is defined on the SD1/SD2 table; for SDXL use NONE, ALL, ALL0.5, "
                    "a 12/20-value vector or the named form"
                )
            if family == "sd":
                return _from_vector(preset_vector(name), family, self.text)
            return dict.fromkeys(ALL_BLOCKS[family], _CONSTANT[name])
        return _from_named(self.values, family, self.text)


_CONSTANT = {"NONE": 0.0, "ALL": 1.0, "ALL0.5": 0.5, "FLUXALL": 1.0}


def _from_vector(values: list[float], family: str, text: str) -> dict[str, float]:
    table = TABLES.get(len(values))
    if table is None or table[0] != family:
        lengths = "17 or 26" if family == "sd" else "12 or 20"
        raise BlockWeightError(
            f"block weights {text!r} have {len(values)} values; this model needs {lengths} (BASE first). {_HELP}"
        )
    weights = dict.fromkeys(ALL_BLOCKS[family], 0.0)
    weights.update(zip(table[1], values))
    return weights


_BLOCK_RE = re.compile(r"^(base|in|mid|m|out)(\d{1,2})?$")


def _block_index(token: str, family: str) -> int:
    """Position of a block token in the family's full table."""
    order = ALL_BLOCKS[family]
    m = _BLOCK_RE.match(token)
    if not m:
        raise BlockWeightError(f"unknown block {token!r}; {_HELP}")
    kind, number = m.group(1), m.group(2)
    if kind == "base":
        return 0
    if kind in ("mid", "m"):
        return order.index("M00")
    if number is None:
        raise BlockWeightError(f"{token!r} needs a block number inside a range, e.g. in04-out02")
    block = f"{kind.upper()}{int(number):02d}"
    if block not in order:
        raise BlockWeightError(f"this model has no block {block}; its blocks are {order[1]}..{order[-1]}")
    return order.index(block)


def _group(name: str, family: str) -> list[str]:
    order = ALL_BLOCKS[family]
    if name == "default":
        return order
    if name == "base":
        return ["BASE"]
    if name in ("mid", "m", "m00", "middle"):
        return ["M00"]
    if name in ("in", "input"):
        return [b for b in order if b.startswith("IN")]
    if name in ("out", "output"):
        return [b for b in order if b.startswith("OUT")]
    if "-" in name:
        first, last = name.split("-", 1)
        if last.isdigit():  # out03-05: the range keeps the first token's kind
            last = re.sub(r"\d+$", "", first) + last
        lo, hi = _block_index(first, family), _block_index(last, family)
        if lo > hi:
            raise BlockWeightError(f"range {name!r} runs backwards")
        return order[lo : hi + 1]
    return [order[_block_index(name, family)]]


def _from_named(items, family: str, text: str) -> dict[str, float]:
    weights = dict.fromkeys(ALL_BLOCKS[family], 1.0)
    for name, value in items:
        for block in _group(name, family):
            weights[block] = value
    return weights


# ---- diffusion transformers -------------------------------------------------------------------

# text-encoder part (ComfyUI's name) -> its slot in the block tables
TEXT_SLOTS = {"clip_l": "CLIP", "clip_g": "CLIP_G", "t5xxl": "T5", "umt5xxl": "T5", "qwen25_7b": "QWEN",
              "llama": "LLAMA", "gemma2_2b": "GEMMA"}
# the text slots a family's table lists where they are not its own encoders: Chroma keeps Flux's layout
TABLE_TEXT = {"chroma": ("clip_l", "t5xxl")}
TEXT_WORDS = {"clip": "CLIP", "clip_l": "CLIP", "clipl": "CLIP", "clip_g": "CLIP_G", "clipg": "CLIP_G",
              "t5": "T5", "t5xxl": "T5", "umt5": "T5", "umt5xxl": "T5", "qwen": "QWEN", "qwen25_7b": "QWEN",
              "llama": "LLAMA", "gemma": "GEMMA", "gemma2_2b": "GEMMA"}
ALL_TEXT_WORDS = ("base", "te", "text")
GROUP_WORDS = {"d": "D", "double": "D", "s": "S", "single": "S", "j": "J", "joint": "J", "b": "B", "block": "B",
               "blocks": "B", "l": "L", "layer": "L", "layers": "L", "nr": "NR", "noise_refiner": "NR",
               "cr": "CR", "context_refiner": "CR"}
_DIT_TOKEN = re.compile(r"^([a-z_]+?)_?(\d{1,3})$")


@dataclass(frozen=True)
class DitBlockTable:
    """One DiT model's block table: slot labels in order, and the key-map block ID of each.

    ``full`` is the table of the published variant at its full depth (the same as ``slots``
    for a full-size model or a configuration that matches no published variant).
    """

    model: str
    slots: tuple[str, ...]
    ids: dict[str, str]  # slot -> block ID on the key map's targets (CLIP -> clip_l, D00 -> D00)
    full: tuple[str, ...]
    full_name: str
    fluxall: bool  # lora-block-weight's FLUXALL preset applies

    @property
    def text_slots(self) -> tuple[str, ...]:
        return tuple(s for s in self.slots if self.ids[s] != s)

    def describe(self, slots: tuple[str, ...] | None = None) -> str:
        """The table in short: 'CLIP, T5, IN, D00-D18, S00-S37, OUT'."""
        return describe_slots(self.slots if slots is None else slots)


def describe_slots(slots: Sequence[str]) -> str:
    out: list[str] = []
    run: list[str] = []

    def flush():
        if run:
            out.append(run[0] if len(run) == 1 else f"{run[0]}-{run[-1]}")
            run.clear()

    for slot in slots:
        head = slot.rstrip("0123456789")
        if run and head == run[-1].rstrip("0123456789") and head != slot:
            run.append(slot)
            continue
        flush()
        if head != slot and head not in ("IN", "OUT"):
            run.append(slot)
        else:
            out.append(slot)
    flush()
    return ", ".join(out)


def _block_ids(family: str, cfg) -> list[str]:
    from ..keymap import block_order
    from ..keymap.dit.families import table

    found = {n.block for n in table(family, cfg).natives.values() if n.block}
    return sorted(found, key=block_order)


@cache
def dit_block_table(family: str, cfg, name: str | None = None) -> DitBlockTable:
    """The block table of one DiT configuration (``name``: how to call the model in messages)."""
    from ..keymap.dit.families import FAMILIES

    f = FAMILIES[family]
    text = [p for p in TABLE_TEXT.get(family, tuple(f.text)) if p in TEXT_SLOTS]
    ids = {TEXT_SLOTS[p]: p for p in text}
    slots = [*ids, *_block_ids(family, cfg)]
    ids.update({s: s for s in slots if s not in ids})
    standard = f.standard_of(cfg)
    full, full_name = tuple(slots), f.variant_name(cfg)
    if standard is not None and standard[1].blocks != cfg.blocks:
        full_cfg = f.at_depth(cfg, standard[1])
        full = (*(TEXT_SLOTS[p] for p in text), *_block_ids(family, full_cfg))
        full_name = standard[0]
    return DitBlockTable(name or f.variant_name(cfg), tuple(slots), ids, full, full_name,
                         family in ("flux", "chroma"))


def _dit_table_of(model) -> DitBlockTable | None:
    """The DiT block table of a ModelLayout or a DiT architecture name; None for SD (and unknown)."""
    if getattr(model, "family", None) is not None:
        return dit_block_table(model.family, model.config, model.arch)
    arch = getattr(model, "arch", model)
    if not isinstance(arch, str) or arch in ARCH_FAMILY or arch == "unknown":
        return None
    from ..keymap.dit import variant_config

    try:
        family, cfg = variant_config(arch)
    except KeyError:
        return None
    return dit_block_table(family, cfg, arch)


def _dit_help(t: DitBlockTable) -> str:
    lengths = f"{len(t.slots)} numbers ({t.describe()})"
    if t.full != t.slots:
        lengths += f" or {len(t.full)} (the full {t.full_name} table, read by block ID)"
    presets = ", ".join(DIT_PRESETS + (("FLUXALL",) if t.fluxall else ()))
    return (f"accepted for this {t.model} model: a preset ({presets}), a vector of {lengths}, or a named "
            "form like 'double=0.5, single03-10=0, t5=0' (see the block-weight table in the README)")


def _resolve_dit(spec: BlockWeights, t: DitBlockTable) -> dict[str, float]:
    if spec.kind == "preset":
        name = spec.values[0]
        if name not in DIT_PRESETS and not (name == "FLUXALL" and t.fluxall):
            raise BlockWeightError(f"preset {name} is not defined for DiT models; {_dit_help(t)}")
        return {t.ids[s]: _CONSTANT[name] for s in t.slots}
    if spec.kind == "vector":
        values = list(spec.values)
        if len(values) == len(t.slots):
            labels = t.slots
        elif len(values) == len(t.full):
            labels = t.full
        else:
            raise BlockWeightError(f"block weights {spec.text!r} have {len(values)} values; {_dit_help(t)}")
        by_slot = dict(zip(labels, values))
        return {t.ids[s]: by_slot[s] for s in t.slots}
    weights = dict.fromkeys(t.slots, 1.0)
    for name, value in spec.values:
        for slot in _dit_group(name, t):
            weights[slot] = value
    return {t.ids[s]: w for s, w in weights.items()}


def _dit_token(token: str) -> str | None:
    """The slot a single token names (syntax only), or None."""
    if token in ("in", "input"):
        return "IN"
    if token in ("out", "output"):
        return "OUT"
    if token in TEXT_WORDS:
        return TEXT_WORDS[token]
    m = _DIT_TOKEN.match(token)
    if m and m.group(1) in GROUP_WORDS:
        return f"{GROUP_WORDS[m.group(1)]}{int(m.group(2)):02d}"
    return None


def _dit_syntax_ok(name: str) -> bool:
    if name == "default" or name in ALL_TEXT_WORDS or name in GROUP_WORDS or _dit_token(name):
        return True
    first, sep, last = name.partition("-")
    return bool(sep) and _dit_token(first) is not None and (last.isdigit() or _dit_token(last) is not None)


def _dit_slot(token: str, t: DitBlockTable, name: str) -> str:
    slot = _dit_token(token)
    if slot is None:
        raise BlockWeightError(f"unknown block {token!r} in {name!r}; {_dit_help(t)}")
    if slot not in t.full:
        raise BlockWeightError(f"this {t.model} model has no slot {slot}; its table is {t.describe(t.full)}")
    return slot


def _dit_group(name: str, t: DitBlockTable) -> list[str]:
    """The model's slots a named-form item sets (checked against the published table)."""
    if name == "default":
        return list(t.slots)
    if name in ALL_TEXT_WORDS:
        return list(t.text_slots)
    if name in GROUP_WORDS:
        head = GROUP_WORDS[name]
        found = [s for s in t.full if s.rstrip("0123456789") == head]
        if not found:
            raise BlockWeightError(f"this {t.model} model has no {name} blocks; its table is {t.describe(t.full)}")
        return [s for s in found if s in t.slots]
    if "-" in name:
        first, last = name.split("-", 1)
        lo_slot = _dit_slot(first, t, name)
        if last.isdigit():  # single03-10: the range keeps the first token's kind
            hi_slot = _dit_slot(re.sub(r"_?\d+$", "", first) + last, t, name)
        else:
            hi_slot = _dit_slot(last, t, name)
        lo, hi = t.full.index(lo_slot), t.full.index(hi_slot)
        if lo > hi:
            raise BlockWeightError(f"range {name!r} runs backwards (table order: {t.describe(t.full)})")
        return [s for s in t.full[lo:hi + 1] if s in t.slots]
    slot = _dit_slot(name, t, name)
    return [slot] if slot in t.slots else []


# ---- parsing ----------------------------------------------------------------------------------

def _number(token: str, text: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise BlockWeightError(f"{token!r} in block weights {text!r} is not a number; {_HELP}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise BlockWeightError(f"block weight {token!r} must be finite")
    return value


def _check_name(name: str) -> None:
    """A named-form item some table accepts (SD or DiT), so typos fail before any work."""
    if name == "default" or _dit_syntax_ok(name):
        return
    try:
        _group(name, "sd")
    except BlockWeightError:
        _group(name, "sdxl")


def parse_block_weights(spec: str | Sequence[float] | BlockWeights | None) -> BlockWeights | None:
    """Parse a preset, vector or named form; None or blank means no block weights.

    The syntax is checked here; whether the model's table accepts it, in ``resolve``.
    """
    if spec is None or isinstance(spec, BlockWeights):
        return spec
    if not isinstance(spec, str):
        values = tuple(_number(str(v), str(list(spec))) for v in spec)
        return BlockWeights(str(list(spec)), "vector", values)
    text = spec.strip()
    if not text:
        return None
    if text.upper() in PRESETS:
        return BlockWeights(text, "preset", (text.upper(),))
    if "=" in text:
        items = []
        for part in filter(None, (p.strip() for p in re.split(r"[,;\n]", text.lstrip("%")))):
            if "=" not in part:
                raise BlockWeightError(f"{part!r} in {text!r} is not name=value; {_HELP}")
            name, value = (s.strip() for s in part.split("=", 1))
            items.append((name.lower().replace(" ", ""), _number(value, text)))
        for name, _ in items:
            _check_name(name)
        return BlockWeights(text, "named", tuple(items))
    tokens = [t for t in re.split(r"[,\s]+", text) if t]
    values = tuple(_number(t, text) for t in tokens)
    return BlockWeights(text, "vector", values)
