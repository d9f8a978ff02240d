"""What a diffusion-transformer table is made of: native modules and row segments.

A family's table lists every weight-bearing module of the diffusion model in ComfyUI's own
names ("native": BFL names for Flux, SAI `joint_blocks` for SD3, the original Wan names),
with stored shapes and a block ID. Every other naming (diffusers, Tencent originals, XLabs
processors, ...) is an *address*: the row segments of native modules it covers, in order.
A split-trained `to_q` is one segment (rows 0..h of the fused `qkv`), diffusers'
`norm_out.linear` two swapped halves of `final_layer.adaLN_modulation.1`. The same segments,
read the other way, place native modules in the diffusers key space.
Pure python over names and shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

Shape = tuple[int, ...]
DIFFUSION = "diffusion_model"  # the part name of every DiT's diffusion model


@dataclass(frozen=True)
class Native:
    """One stored weight-like tensor of the diffusion model, in ComfyUI's names.

    `leaf` is the tensor's suffix: "weight", "scale" (BFL RMSNorm) or "" (a raw
    nn.Parameter such as Wan's `modulation`, whose key is the module name itself).
    """

    name: str
    weight: Shape
    bias: Shape | None
    block: str | None
    leaf: str = "weight"

    @property
    def key(self) -> str:
        return f"{self.name}.{self.leaf}" if self.leaf else self.name

    @property
    def bias_key(self) -> str | None:
        return f"{self.name}.bias" if self.bias else None

    @property
    def rows(self) -> int:
        return self.weight[0]

    @property
    def kohya(self) -> str:
        """The kohya/sd-scripts module name ComfyUI loads for it (merge and convert write this)."""
        return "lora_unet_" + self.name.replace(".", "_")


# (native module, first native row, first row of the adapter module's delta, rows)
Segment = tuple[str, int, int, int]


@dataclass(frozen=True)
class Address:
    """Where an adapter module's delta lands, as native row segments covering its rows in order."""

    segments: tuple[Segment, ...]

    @property
    def natives(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s[0] for s in self.segments))


@dataclass
class Table:
    """One model configuration of one family: natives, diffusers names and other dialects.

    `diffusers` maps a diffusers module name to (leaf, segments); `extra` maps further
    dotted names (originals, processor names) to segments. `splits` records, per fused
    native, the row lengths of its parts (q, k, v[, mlp]): kohya split_qkv files are block
    sparse along them.
    """

    family: str
    config: object
    natives: dict[str, Native] = field(default_factory=dict)
    diffusers: dict[str, tuple[str, tuple[Segment, ...]]] = field(default_factory=dict)
    extra: dict[str, tuple[Segment, ...]] = field(default_factory=dict)
    splits: dict[str, tuple[int, ...]] = field(default_factory=dict)

    # ---- building ---------------------------------------------------------------------------
    def add(self, name: str, weight: Shape, bias: bool = True, block: str | None = None,
            leaf: str = "weight") -> Native:
        if name in self.natives:
            raise AssertionError(f"{self.family}: {name} listed twice")
        native = Native(name, tuple(weight), (weight[0],) if bias else None, block, leaf)
        self.natives[name] = native
        return native

    def rename(self, diffusers: str, native: str, leaf: str = "weight") -> None:
        """A diffusers module that is a native module under another name."""
        rows = self.natives[native].rows
        self._diffusers(diffusers, leaf, ((native, 0, 0, rows),))

    def split(self, native: str, parts: Iterable[tuple[str, int]]) -> None:
        """Diffusers modules that are consecutive row ranges of one fused native, in order."""
        start, lengths = 0, []
        for diffusers, rows in parts:
            self._diffusers(diffusers, "weight", ((native, start, 0, rows),))
            start += rows
            lengths.append(rows)
        if start != self.natives[native].rows:
            raise AssertionError(f"{self.family}: parts of {native} cover {start} rows")
        self.splits[native] = tuple(lengths)

    def swap(self, diffusers: str, native: str) -> None:
        """diffusers' AdaLayerNormContinuous: (scale, shift) where BFL/SAI store (shift, scale)."""
        half = self.natives[native].rows // 2
        self._diffusers(diffusers, "weight", ((native, half, 0, half), (native, 0, half, half)))

    def alias(self, name: str, native: str, start: int = 0, rows: int | None = None) -> None:
        """Another dialect's name for a native module, or for a row range of it."""
        rows = self.natives[native].rows - start if rows is None else rows
        segments = ((native, start, 0, rows),)
        if self.extra.setdefault(name, segments) != segments:
            raise AssertionError(f"{self.family}: alias {name} names two places")

    def _diffusers(self, name: str, leaf: str, segments: tuple[Segment, ...]) -> None:
        if name in self.diffusers:
            raise AssertionError(f"{self.family}: diffusers name {name} listed twice")
        self.diffusers[name] = (leaf, segments)

    # ---- reading ----------------------------------------------------------------------------
    def address(self, native: str) -> Address:
        return Address(((native, 0, 0, self.natives[native].rows),))

    def shape_of(self, address: Address) -> Shape:
        """The delta shape an adapter module at this address has."""
        first = self.natives[address.segments[0][0]]
        return (sum(s[3] for s in address.segments), *first.weight[1:])

    def diffusers_pieces(self) -> dict[str, list[tuple[str, int, int, int]]]:
        """native -> [(diffusers module, its first row, first native row, rows)]."""
        pieces: dict[str, list[tuple[str, int, int, int]]] = {}
        for name, (_leaf, segments) in self.diffusers.items():
            for native, native_start, d_start, rows in segments:
                pieces.setdefault(native, []).append((name, d_start, native_start, rows))
        return pieces


def block(prefix: str, index: int) -> str:
    """Block IDs: a group letter and two digits (D00, S37, J12, B39, L25, NR01, CR00)."""
    return f"{prefix}{index:02d}"


IN, OUT = "IN", "OUT"  # the embeddings before the first block / the layers after the last
