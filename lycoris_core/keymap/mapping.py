"""Map an adapter's modules onto a model's weight keys, and refuse a wrong architecture.

Owns the decision per module (target, shape mismatch, unmatched, not applicable) and the
one-line report for SD1/SD2/SDXL, and hands DiT models (and DiT adapters on unknown
models) to `dit.mapping`. Shape checks go through the module's own `fits`. Touches no
weight: a refusal happens before any caller has touched the model. (The one state change:
a kohya split_qkv LoRA module is given its trained scale, see dit.mapping.)
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import ArchitectureMismatchError
from .detect import UNKNOWN_MODEL, ModuleLike, detect_model, identify_adapter
from .dit.mapping import map_dit
from .layout import ModelLayout
from .names import resolve
from .report import OTHER, MatchReport, Shape, Target
from .sd_layouts import spec_index
from .spaces import PARTS, SPACES, Slot, SpaceTable, space_table


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
    metadata: Mapping[str, str] | None = None,
) -> MatchReport:
    """Map every module name to a Target in `shapes` (a full or partial model state dict).

    Raises ArchitectureMismatchError (with `.report`) when fewer than half of the applicable
    modules match, any matched key has the wrong shape, or the adapter was made for another
    DiT family or variant (see MatchReport.conflict), unless `allow_partial` is True.
    Modules whose part (unet/te1/te2, diffusion_model/clip_l/t5xxl/...) is absent from
    `shapes` are "not applicable". `metadata` defaults to the adapter file's header.
    """
    layout = detect_model(shapes) if shapes else UNKNOWN_MODEL
    adapter_arch, guess = identify_adapter(modules, layout.arch, layout, metadata)
    if layout.family is not None or (layout.arch == "unknown" and guess is not None and adapter_arch == guess.name):
        report = map_dit(modules, shapes, layout, guess=guess)
        if guess is None or adapter_arch != guess.name:
            report.adapter_arch = adapter_arch
    else:
        report = _map_sd(modules, shapes, layout, adapter_arch)
    if report.refused and not allow_partial:
        error = ArchitectureMismatchError(_refusal(report))
        error.report = report
        raise error
    return report


def _map_sd(modules: Mapping[str, ModuleLike], shapes: Mapping[str, Shape], layout: ModelLayout,
            adapter_arch: str) -> MatchReport:
    report = MatchReport(adapter_arch, layout)
    sd_adapter = adapter_arch in ("sd1", "sd2", "sdxl")
    if layout.arch != "unknown":
        arch, parts, spaces = layout.arch, layout.parts, (layout.space,)
    else:  # unrecognised model: try the adapter's own tables in every space
        arch, parts, spaces = (adapter_arch if sd_adapter else "unknown"), frozenset(PARTS if shapes else ()), SPACES
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
    return report


def _refusal(report: MatchReport) -> str:
    first = "; ".join(f"{m} {ms} vs {k} {ws}" for m, k, ms, ws in report.mismatched[:2])
    return (
        f"{report.adapter_arch} adapter does not fit this {report.model.describe()}: "
        f"{report.tally()}"
        + (f"; {report.conflict}" if report.conflict else "")
        + (f" (e.g. {first})" if first else "")
        + ". Nothing was applied; pass allow_partial=True to apply only the modules that fit."
    )
