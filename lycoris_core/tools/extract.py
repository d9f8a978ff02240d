"""Extract a LoCon adapter from two model files: ΔW = tuned − base, factored per module.

Both files are read tensor by tensor (the key map says which keys hold which module:
``keymap.canonical`` - OpenCLIP's fused q/k/v rows and transposed projection, a DiT's
diffusion-model-only file (bare keys, as UNETLoader reads it) or single-file checkpoint,
a diffusers folder's split q/k/v), so memory stays near two layers.  Every 2-D and conv
weight of the diffusion model and text encoders is a candidate; norms, embeddings, raw
parameters and the text projection are skipped with the reason, as are weights that did
not change.  Names and alpha follow ``merge``: the family's kohya names (fused DiT weights
as ComfyUI stores them), alpha = rank.
"""

from __future__ import annotations

import math
import os
import time

import torch

from ..errors import ArchitectureMismatchError
from ..io.reader import SafetensorsSource
from ..keymap import detect_model
from ..keymap.canonical import canonical_weights, stored_in
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
from .merge import ErrorTotals, MergeReport, factorize, read_weight, record, save_lora


def _same_model(a, b) -> bool:
    return (a.family, a.config, a.arch if a.family is None else None) == (b.family, b.config,
                                                                          b.arch if b.family is None else None)


def _pairs(src_a, src_b, parts, report: MergeReport) -> tuple[list[tuple], object, object]:
    """(kohya name, canonical weight) of every extractable weight, and both layouts; the rest become rows."""
    shapes_a = {k: src_a.shape(k) for k in src_a}
    shapes_b = {k: src_b.shape(k) for k in src_b}
    layout_a, layout_b = detect_model(shapes_a), detect_model(shapes_b)
    if layout_a.arch == "unknown" or layout_b.arch == "unknown":
        raise ArchitectureMismatchError("both files must be models the key map knows: SD1/SD2/SDXL single files, "
                                        "or DiT diffusion-model files or checkpoints")
    if not _same_model(layout_a, layout_b):
        raise ArchitectureMismatchError(f"base is {layout_a.describe()} but tuned is {layout_b.describe()}")
    report.match_lines.append(f"base: {layout_a.describe()}; tuned: {layout_b.describe()}")
    todo = []
    norms = 0
    for weight in canonical_weights(layout_a).values():
        if (parts is not None and weight.part not in parts) or weight.part not in layout_a.parts \
                or weight.part not in layout_b.parts:
            continue
        if len(weight.shape) < 2:
            norms += 1  # norms: silently outside LoRA, counted once below
            continue
        if weight.skip:
            report.rows.append(skip_row(weight.name, weight.skip))
            continue
        found_a, found_b = stored_in(layout_a, weight), stored_in(layout_b, weight)
        if found_a is None or found_b is None or any(p.key not in shapes_a for p in found_a[0]) \
                or any(p.key not in shapes_b for p in found_b[0]):
            report.rows.append(skip_row(weight.name, "missing from one checkpoint"))
            continue
        todo.append((weight.name, weight))
    if norms:
        report.match_lines.append(f"{norms} norm weights are not extracted (LoRA covers matrices and convs)")
    return todo, layout_a, layout_b


def extract_adapter(base: str, tuned: str, out_path: str | None, *, rank_mode: str = "fixed",
                    rank_param: float = 16, conv_rank_param: float | None = None, conv_tucker: bool = False,
                    svd: str = "auto", parts: tuple[str, ...] | None = None, min_diff: float = 0.0,
                    dry_run: bool = False, overwrite: bool = False, progress: ProgressFn | None = None,
                    save_dtype: str = "fp16") -> MergeReport:
    """LoCon of ``tuned − base`` (see the module docstring); ``conv_rank_param`` for k×k convs.

    ``parts`` limits the parts extracted (unet, te1, te2; diffusion_model, clip_l, t5xxl, ...);
    None: every part both files hold.
    """
    started = time.perf_counter()
    check_rank(rank_mode, [rank_param, conv_rank_param], save_dtype, svd)
    check_files(base, tuned)
    check_write(out_path, dry_run, overwrite, [base, tuned])

    src_a, src_b = SafetensorsSource(base), SafetensorsSource(tuned)
    report = MergeReport(dry_run=dry_run, title="extract")
    todo, layout_a, layout_b = _pairs(src_a, src_b, parts, report)

    totals = ErrorTotals()
    tensors: dict[str, torch.Tensor] = {}
    cache_a: dict = {}
    cache_b: dict = {}
    bar = Progress(len(todo), "extract", progress, unit="module")
    try:
        for name, weight in todo:
            shape = tuple(weight.shape)
            delta = read_weight(src_b, layout_b, weight, cache_b) - read_weight(src_a, layout_a, weight, cache_a)
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
