"""Where adapter modules land (Target) and the outcome of one mapping (MatchReport).

Shared by the SD1/SD2/SDXL and the DiT key maps; owns the one-line summary users see and
the refusal rule. Nothing here reads tensors.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .layout import SD_PARTS, ModelLayout, is_text_part

Shape = tuple[int, ...]
OTHER = "other"  # part of a name no scheme recognises


@dataclass(frozen=True)
class Target:
    """Where one adapter module (or one piece of it) lands.

    `rows` = (start, length) on dim 0 of a fused weight (and of `bias_key`, if any): a
    split-trained `to_q` patches rows 0..h of `qkv`. `shape` is the (sliced) weight shape the
    delta must have. `transposed`: the stored tensor is the transpose of `shape` (OpenCLIP
    `text_projection` in checkpoints) - transpose the delta. `bias_key` is set only when the
    module carries a bias delta and the model has a bias.

    `source_rows` = (start, length): this target takes only those rows of the module's delta
    (and of its bias delta) - None means all of them. Modules whose delta is spread over
    several targets (a fused kohya `qkv` on a diffusers model's to_q/to_k/to_v, diffusers'
    `norm_out.linear` whose (scale, shift) halves land swapped on BFL's (shift, scale)) are
    listed in `MatchReport.pieces`, one Target per piece, and never in `targets`.
    """

    weight_key: str
    bias_key: str | None
    rows: tuple[int, int] | None
    shape: Shape
    block: str | None
    part: str
    transposed: bool = False
    source_rows: tuple[int, int] | None = None


@dataclass
class MatchReport:
    """Per-module outcome of one mapping; `summary()` is the one line to show users.

    `targets`: modules applied as one whole delta on one key (or row slice of it).
    `pieces`: modules whose delta is split over several row pieces (see Target.source_rows).
    `split_qkv`: modules detected as kohya split_qkv re-fusions, with their factor (3 or 4);
    their trained scale alpha/(rank/n) has been applied (sd-scripts#2204).
    `conflict`: why an adapter of another family or variant was refused despite fitting names.
    """

    adapter_arch: str
    model: ModelLayout
    targets: dict[str, Target] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, str, Shape, Shape]] = field(default_factory=list)
    not_applicable: list[str] = field(default_factory=list)
    part_of: dict[str, str] = field(default_factory=dict)  # every applicable module -> part
    pieces: dict[str, tuple[Target, ...]] = field(default_factory=dict)
    split_qkv: dict[str, int] = field(default_factory=dict)
    conflict: str | None = None

    @property
    def model_arch(self) -> str:
        return self.model.arch

    def matched_part(self, name: str) -> str | None:
        if name in self.targets:
            return self.targets[name].part
        if name in self.pieces:
            return self.pieces[name][0].part
        return None

    @property
    def counts(self) -> dict[str, tuple[int, int]]:
        """part -> (matched, applicable modules of that part)."""
        total = Counter(self.part_of.values())
        matched = Counter(t.part for t in self.targets.values())
        matched.update(ts[0].part for ts in self.pieces.values())
        known = [p for p in self.model.part_order() if p in total]
        rest = sorted(p for p in total if p not in known and p != OTHER)
        order = known + rest + ([OTHER] if OTHER in total else [])
        return {p: (matched[p], total[p]) for p in order}

    @property
    def matched(self) -> int:
        return len(self.targets) + len(self.pieces)

    @property
    def is_partial(self) -> bool:
        """Some applicable module was left out (unknown name or wrong shape)."""
        return bool(self.unmatched or self.mismatched)

    @property
    def refused(self) -> bool:
        """The adapter fails the architecture check (map_adapter raises unless allow_partial)."""
        applicable = len(self.part_of)
        return bool(self.mismatched) or bool(self.conflict) or 2 * self.matched < applicable

    def blocks_touched(self) -> list[str]:
        blocks = {t.block for t in self.targets.values() if t.block}
        blocks.update(t.block for ts in self.pieces.values() for t in ts if t.block)
        return sorted(blocks, key=block_order)

    def summary(self) -> str:
        return f"{self.adapter_arch} adapter on {self.model_arch} model: {self.tally()}"

    def tally(self) -> str:
        if self.model.family is None:
            parts = ", ".join(f"{p} {m}/{n}" for p, (m, n) in self.counts.items()) or "nothing"
        else:  # DiT: the diffusion model, then every text encoder together (details() splits them)
            counts = self.counts
            dm = counts.get("diffusion_model", (0, 0))
            te = [v for p, v in counts.items() if is_text_part(p) and p != OTHER]
            parts = f"diffusion_model {dm[0]}/{dm[1]}, te {sum(m for m, _ in te)}/{sum(n for _, n in te)}"
            if OTHER in counts:
                parts += f", other 0/{counts[OTHER][1]}"
        line = f"{parts} matched, {len(self.mismatched)} shape mismatches"
        if self.pieces:
            line += f", {len(self.pieces)} by row pieces"
        if self.split_qkv:
            factors = "/".join(f"x{n}" for n in sorted(set(self.split_qkv.values())))
            line += f", {len(self.split_qkv)} kohya split_qkv at trained scale ({factors})"
        if self.not_applicable:
            line += f", {len(self.not_applicable)} not applicable (part absent from the model)"
        return line

    def details(self) -> str:
        lines = [self.summary(), f"model: {self.model.describe()}"]
        if self.model.family is not None:
            lines.append("parts: " + (", ".join(f"{p} {m}/{n}" for p, (m, n) in self.counts.items()) or "none"))
        if self.conflict:
            lines.append(f"conflict: {self.conflict}")
        per_block = Counter(t.block or "none" for t in self.targets.values())
        per_block.update(ts[0].block or "none" for ts in self.pieces.values())
        order = sorted(per_block, key=lambda b: block_order(b) if b != "none" else (9, 0, 0, ""))
        lines.append("blocks: " + (", ".join(f"{b} {per_block[b]}" for b in order) or "none"))
        for module, key, mshape, wshape in self.mismatched:
            lines.append(f"shape mismatch: {module} -> {key}: module {mshape}, weight {wshape}")
        for module, ts in self.pieces.items():
            lines.append(f"row pieces: {module} -> " + ", ".join(
                f"{t.weight_key}{list(t.rows) if t.rows else ''} <- rows {list(t.source_rows or (0, t.shape[0]))}"
                for t in ts))
        for module, n in self.split_qkv.items():
            lines.append(f"kohya split_qkv: {module} x{n}")
        lines += [f"unmatched: {m}" for m in self.unmatched]
        lines += [f"not applicable: {m}" for m in self.not_applicable]
        return "\n".join(lines)


_DIT_GROUPS = {"D": 0, "S": 1, "J": 0, "B": 0, "L": 0, "NR": 1, "CR": 2}


def block_order(block: str) -> tuple[int, int, int, str]:
    """SD: BASE, IN00.., M00, OUT00..; DiT: IN, the block groups in model order (D.. then S..), OUT, text parts."""
    head = block.rstrip("0123456789")
    number = int(block[len(head):]) if block[len(head):] else -1
    if block == "BASE":
        return (0, 0, 0, "")
    if head == "IN":
        return (1, 0, number, "")
    if head == "M":
        return (2, 0, number, "")
    if head in _DIT_GROUPS and number >= 0:
        return (3, _DIT_GROUPS[head], number, "")
    if head == "OUT":
        return (4, 0, number, "")
    return (5, 0, 0, block)  # text parts


__all__ = ["OTHER", "SD_PARTS", "MatchReport", "Target", "block_order"]
