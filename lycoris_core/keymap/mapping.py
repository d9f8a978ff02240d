"""Map an adapter's modules onto a model's weight keys, and refuse a wrong architecture.

Owns the decision per module (target, shape mismatch, unmatched, not applicable) and the
one-line report. Shape checks go through the module's own `fits`. Never mutates anything:
a refusal happens before any caller has touched the model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import ArchitectureMismatchError
from .detect import UNKNOWN_MODEL, ModelLayout, ModuleLike, detect_adapter, detect_model
from .names import resolve
from .sd_layouts import spec_index
from .spaces import PARTS, SPACES, Slot, SpaceTable, space_table

Shape = tuple[int, ...]
OTHER = "other"  # part of a name no scheme recognises


@dataclass(frozen=True)
class Target:
    """Where one adapter module lands.

    `rows` = (start, length) on dim 0 of a fused weight (and of `bias_key`, if any); `shape`
    is the (sliced) weight shape the delta must have. `transposed`: the stored tensor is the
    transpose of `shape` (OpenCLIP `text_projection` in checkpoints) - transpose the delta.
    `bias_key` is set only when the module carries a bias delta and the model has a bias.
    """

    weight_key: str
    bias_key: str | None
    rows: tuple[int, int] | None
    shape: Shape
    block: str | None
    part: str
    transposed: bool = False


@dataclass
class MatchReport:
    """Per-module outcome of one mapping; `summary()` is the one line to show users."""

    adapter_arch: str
    model: ModelLayout
    targets: dict[str, Target] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, str, Shape, Shape]] = field(default_factory=list)
    not_applicable: list[str] = field(default_factory=list)
    part_of: dict[str, str] = field(default_factory=dict)  # every applicable module -> part

    @property
    def model_arch(self) -> str:
        return self.model.arch

    @property
    def counts(self) -> dict[str, tuple[int, int]]:
        """part -> (matched, applicable modules of that part)."""
        total = Counter(self.part_of.values())
        matched = Counter(t.part for t in self.targets.values())
        order = [p for p in (*PARTS, OTHER) if p in total]
        return {p: (matched[p], total[p]) for p in order}

    @property
    def is_partial(self) -> bool:
        """Some applicable module was left out (unknown name or wrong shape)."""
        return bool(self.unmatched or self.mismatched)

    @property
    def refused(self) -> bool:
        """The adapter fails the architecture check (map_adapter raises unless allow_partial)."""
        applicable = len(self.part_of)
        return bool(self.mismatched) or 2 * len(self.targets) < applicable

    def blocks_touched(self) -> list[str]:
        blocks = {t.block for t in self.targets.values() if t.block}
        return sorted(blocks, key=block_order)

    def summary(self) -> str:
        return f"{self.adapter_arch} adapter on {self.model_arch} model: {self._tally()}"

    def _tally(self) -> str:
        parts = ", ".join(f"{p} {m}/{n}" for p, (m, n) in self.counts.items()) or "nothing"
        line = f"{parts} matched, {len(self.mismatched)} shape mismatches"
        if self.not_applicable:
            line += f", {len(self.not_applicable)} not applicable (part absent from the model)"
        return line

    def details(self) -> str:
        lines = [self.summary(), f"model: {self.model.describe()}"]
        per_block = Counter(t.block or "none" for t in self.targets.values())
        order = sorted(per_block, key=block_order)
        lines.append("blocks: " + (", ".join(f"{b} {per_block[b]}" for b in order) or "none"))
        for module, key, mshape, wshape in self.mismatched:
            lines.append(f"shape mismatch: {module} -> {key}: module {mshape}, weight {wshape}")
        lines += [f"unmatched: {m}" for m in self.unmatched]
        lines += [f"not applicable: {m}" for m in self.not_applicable]
        return "\n".join(lines)


def block_order(block: str) -> tuple[int, int, str]:
    """Sort key of a block ID: BASE, IN.., M.., OUT.., then any other ID by name."""
    if block == "BASE":
        return (0, 0, block)
    for rank, prefix in ((1, "IN"), (2, "M"), (3, "OUT")):
        if block.startswith(prefix) and block[len(prefix):].isdigit():
            return (rank, int(block[len(prefix):]), block)
    return (9, 0, block)


def _seen_shape(slot: Slot, table: SpaceTable, part: str, stored: Shape) -> Shape | None:
    """The weight shape the module would patch; None when a fused weight has another size."""
    if slot.rows is not None:
        return slot.shape if stored == table.keys[part][slot.weight_key] else None
    return stored[::-1] if slot.transposed else stored


def map_adapter(
    modules: Mapping[str, ModuleLike],
    shapes: Mapping[str, Shape],
    *,
    allow_partial: bool = False,
) -> MatchReport:
    """Map every module name to a Target in `shapes` (a full or partial model state dict).

    Raises ArchitectureMismatchError (with `.report`) when fewer than half of the applicable
    modules match or any matched key has the wrong shape, unless `allow_partial` is True.
    Modules whose part (unet/te1/te2) is absent from `shapes` are "not applicable".
    """
    layout = detect_model(shapes) if shapes else UNKNOWN_MODEL
    adapter_arch = detect_adapter(modules, prefer=layout.arch)
    report = MatchReport(adapter_arch, layout)
    if layout.arch != "unknown":
        arch, parts, spaces = layout.arch, layout.parts, (layout.space,)
    else:  # unrecognised model: try the adapter's own tables in every space
        arch, parts, spaces = adapter_arch, frozenset(PARTS if shapes else ()), SPACES
    tables = [space_table(arch, s) for s in spaces] if arch != "unknown" else []
    specs = spec_index(arch) if arch != "unknown" else {}

    for name, module in modules.items():
        candidates, declared = resolve(name, arch) if specs else ([], ())
        present = [c for c in candidates if c[0] in parts]
        if not present:
            if candidates or (declared and not set(declared) & parts):
                report.not_applicable.append(name)
            else:
                report.unmatched.append(name)
                report.part_of[name] = declared[0] if len(declared) == 1 else OTHER
            continue
        report.part_of[name] = present[0][0]
        mismatch = None
        for part, canonical in present:
            for table in tables:
                slot = table.slots.get((part, canonical))
                if slot is None or slot.weight_key not in shapes:
                    continue
                stored = tuple(shapes[slot.weight_key])
                shape = _seen_shape(slot, table, part, stored)
                if shape is not None and module.fits(shape):
                    bias = slot.bias_key if module.has_bias and slot.bias_key in shapes else None
                    block = specs[(part, canonical)].block
                    report.targets[name] = Target(
                        slot.weight_key, bias, slot.rows, shape, block, part, slot.transposed
                    )
                    report.part_of[name] = part
                    break
                mismatch = mismatch or (name, slot.weight_key, tuple(module.shape), stored)
            if name in report.targets:
                break
        else:
            if mismatch:
                report.mismatched.append(mismatch)
            else:
                report.unmatched.append(name)

    if report.refused and not allow_partial:
        error = ArchitectureMismatchError(_refusal(report))
        error.report = report
        raise error
    return report


def _refusal(report: MatchReport) -> str:
    first = "; ".join(f"{m} {ms} vs {k} {ws}" for m, k, ms, ws in report.mismatched[:2])
    return (
        f"{report.adapter_arch} adapter does not fit this {report.model.describe()}: "
        f"{report._tally()}"
        + (f" (e.g. {first})" if first else "")
        + ". Nothing was applied; pass allow_partial=True to apply only the modules that fit."
    )
