"""Block weights: sd-webui-lora-block-weight's fixed tables, presets and a named form.

Block IDs are LDM indices: ``BASE`` (text encoders), ``IN00``.., ``M00``, ``OUT00``..
The tables are fixed, so a vector means the same blocks for every adapter (unlike
data-driven tools that number only the blocks a file happens to contain).

Accepted inputs (case-insensitive):
- a preset name: NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5;
- a vector of 17 or 26 numbers (SD1/SD2) or 12 or 20 (SDXL), starting with BASE;
  blocks a short vector does not name get 0, as in lora-block-weight;
- a named form: ``in=0.5, mid=1, out03-05=0`` with items ``default``, ``base``, ``in``, ``mid``,
  ``out``, a block (``in04``, ``out3``, ``m00``) or a range (``out03-05``, ``in04-out02``),
  applied left to right over a default of 1.

Modules outside every block (time embedding, label embedding, conv_out, norm_out)
are not scaled by block weights: they take the plain UNet strength, as
lora-block-weight leaves its "unknown modules" at 1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

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


PRESETS = [*_PRESET_BLOCKS, "ALL0.5"]
ARCH_FAMILY = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl"}

_HELP = (
    "accepted: a preset (" + ", ".join(PRESETS) + "), a vector of 17 or 26 numbers for SD1/SD2 "
    "or 12 or 20 for SDXL (BASE first), or a named form like 'in=0.5, mid=1, out03-05=0'"
)


@dataclass(frozen=True)
class BlockWeights:
    """A parsed block-weight spec; ``resolve(arch)`` gives block ID -> weight."""

    text: str
    kind: str  # "preset" | "vector" | "named"
    values: tuple = ()

    def resolve(self, arch: str) -> dict[str, float]:
        family = ARCH_FAMILY.get(arch)
        if family is None:
            raise BlockWeightError(f"block weights need an SD1/SD2/SDXL model, not {arch!r}")
        if self.kind == "vector":
            return _from_vector(list(self.values), family, self.text)
        if self.kind == "preset":
            if family != "sd" and self.values[0] not in ("NONE", "ALL", "ALL0.5"):
                raise BlockWeightError(
                    f"preset {self.values[0]} is defined on the SD1/SD2 table; for SDXL use NONE, ALL, ALL0.5, "
                    "a 12/20-value vector or the named form"
                )
            if family == "sd":
                return _from_vector(preset_vector(self.values[0]), family, self.text)
            value = {"NONE": 0.0, "ALL": 1.0, "ALL0.5": 0.5}[self.values[0]]
            return dict.fromkeys(ALL_BLOCKS[family], value)
        return _from_named(self.values, family, self.text)


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


def _number(token: str, text: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise BlockWeightError(f"{token!r} in block weights {text!r} is not a number; {_HELP}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise BlockWeightError(f"block weight {token!r} must be finite")
    return value


def parse_block_weights(spec: str | Sequence[float] | BlockWeights | None) -> BlockWeights | None:
    """Parse a preset, vector or named form; None or blank means no block weights."""
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
        # validate names now, against the larger table, so typos fail before any work
        for name, _ in items:
            if name != "default":
                try:
                    _group(name, "sd")
                except BlockWeightError:
                    _group(name, "sdxl")
        return BlockWeights(text, "named", tuple(items))
    tokens = [t for t in re.split(r"[,\s]+", text) if t]
    values = tuple(_number(t, text) for t in tokens)
    if len(values) not in TABLES:
        raise BlockWeightError(f"block weights {text!r} have {len(values)} values; {_HELP}")
    return BlockWeights(text, "vector", values)
