"""Extract a LoCon adapter from two checkpoints: ΔW = tuned − base, factored per module.

Both files are read tensor by tensor (the key map says which keys hold which module,
including OpenCLIP's fused q/k/v rows and transposed projection), so memory stays near
two layers.  Every 2-D and conv weight of the UNet and text encoders is a candidate;
norms, embeddings and the text projection are skipped with the reason, as are weights
that did not change.  Names and alpha follow ``merge``: kohya names, alpha = rank.
"""

from __future__ import annotations

import math
import os
import time

import torch

from ..errors import ArchitectureMismatchError
from ..io.reader import SafetensorsSource
from ..keymap import detect_model, kohya_name
from ..keymap.spaces import space_table
from .common import (
    SAVE_DTYPES,
    MergeError,
    Progress,
    ProgressFn,
    check_files,
    check_rank,
    check_write,
    file_identity,
    skip_row,
)
from .merge import ErrorTotals, MergeReport, factorize, record, save_lora

SKIP_NAMES = {
    "text_model.embeddings.token_embedding": "embedding (not a LoRA target)",
    "text_model.embeddings.position_embedding": "embedding (not a LoRA target)",
    "text_projection": "text projection (not a LoRA target in kohya naming)",
}


def _slot_tensor(reader, slot, cache: dict) -> torch.Tensor:
    key = slot.weight_key
    if key not in cache:
        cache.clear()  # keep only the last fused tensor (q, k and v come in a row)
        cache[key] = reader[key]
    w = cache[key]
    if slot.rows is not None:
        w = w[slot.rows[0]:slot.rows[0] + slot.rows[1]]
    if slot.transposed:
        w = w.T
    return w.to(torch.float32)


def _pairs(src_a, src_b, parts, report: MergeReport) -> list[tuple]:
    """(kohya name, base slot, tuned slot) of every extractable weight; the rest become report rows."""
    shapes_a = {k: src_a.shape(k) for k in src_a}
    shapes_b = {k: src_b.shape(k) for k in src_b}
    layout_a, layout_b = detect_model(shapes_a), detect_model(shapes_b)
    if layout_a.arch == "unknown" or layout_b.arch == "unknown":
        raise ArchitectureMismatchError("both checkpoints must be SD1, SD2 or SDXL single files")
    if layout_a.arch != layout_b.arch:
        raise ArchitectureMismatchError(f"base is {layout_a.describe()} but tuned is {layout_b.describe()}")
    arch = layout_a.arch
    table_a, table_b = space_table(arch, layout_a.space), space_table(arch, layout_b.space)
    report.match_lines.append(f"base: {layout_a.describe()}; tuned: {layout_b.describe()}")
    todo = []
    for (part, canonical), slot in table_a.slots.items():
        if part not in parts or part not in layout_a.parts or part not in layout_b.parts:
            continue
        name = kohya_name(arch, part, canonical)
        if len(slot.shape) < 2:
            continue  # norms: silently outside LoRA, counted once below
        if canonical in SKIP_NAMES:
            report.rows.append(skip_row(name, SKIP_NAMES[canonical]))
            continue
        other = table_b.slots.get((part, canonical))
        if other is None or other.weight_key not in shapes_b or slot.weight_key not in shapes_a:
            report.rows.append(skip_row(name, "missing from one checkpoint"))
            continue
        todo.append((name, slot, other))
    norms = sum(1 for (p, _c), s in table_a.slots.items() if p in parts and len(s.shape) < 2)
    if norms:
        report.match_lines.append(f"{norms} norm weights are not extracted (LoRA covers matrices and convs)")
    return todo


def extract_adapter(base: str, tuned: str, out_path: str | None, *, rank_mode: str = "fixed",
                    rank_param: float = 16, conv_rank_param: float | None = None, conv_tucker: bool = False,
                    svd: str = "auto", parts: tuple[str, ...] = ("unet", "te1", "te2"), min_diff: float = 0.0,
                    dry_run: bool = False, overwrite: bool = False, progress: ProgressFn | None = None,
                    save_dtype: str = "fp16") -> MergeReport:
    """LoCon of ``tuned − base`` (see the module docstring); ``conv_rank_param`` for k×k convs."""
    started = time.perf_counter()
    check_rank(rank_mode, [rank_param, conv_rank_param], save_dtype, svd)
    check_files(base, tuned)
    check_write(out_path, dry_run, overwrite, [base, tuned])

    src_a, src_b = SafetensorsSource(base), SafetensorsSource(tuned)
    report = MergeReport(dry_run=dry_run, title="extract")
    todo = _pairs(src_a, src_b, parts, report)

    totals = ErrorTotals()
    tensors: dict[str, torch.Tensor] = {}
    cache_a: dict = {}
    cache_b: dict = {}
    bar = Progress(len(todo), "extract", progress, unit="module")
    try:
        for name, slot, other in todo:
            shape = tuple(slot.shape)
            delta = _slot_tensor(src_b, other, cache_b) - _slot_tensor(src_a, slot, cache_a)
            peak = float(delta.abs().max()) if delta.numel() else 0.0
            if peak <= min_diff:
                report.rows.append(skip_row(name, "unchanged" if peak == 0 else f"max |ΔW| {peak:.2e} <= min_diff"))
                bar.update()
                continue
            is_conv = len(shape) > 2 and math.prod(shape[2:]) > 1
            param = conv_rank_param if (is_conv and conv_rank_param is not None) else rank_param
            factorized = factorize(delta, rank_mode, param, conv_tucker, svd, SAVE_DTYPES[save_dtype])
            record(report, totals, tensors, name, factorized, dry_run)
            bar.update()
            if bar.done % 16 == 0:  # drop the memory maps: read pages would count as resident
                src_a.close()
                src_b.close()
    finally:
        bar.close()
        src_a.close()
        src_b.close()
    totals.fill(report)
    if not report.merged:
        raise MergeError("the checkpoints do not differ in any extractable weight")
    if not dry_run:
        save_lora(report, tensors, out_path, overwrite, {
            "command": "extract",
            "base": {"name": os.path.basename(base), **file_identity(base, 0)},
            "tuned": {"name": os.path.basename(tuned), **file_identity(tuned, 0)},
            "rank_mode": rank_mode, "rank_param": rank_param, "conv_rank_param": conv_rank_param,
            "conv_tucker": conv_tucker, "svd": svd, "save_dtype": save_dtype,
        })
    report.seconds = time.perf_counter() - started
    return report
