"""What each button does, as plain functions over ``lycoris_core``: no Gradio here.

Every function takes the ``Folders`` and the raw values the page sent, validates each name
again (``Folders.resolve`` / ``Folders.output``), calls the engine and returns plain data
(markdown strings, row lists, pandas frames) for the UI layer to show.  The engine does all
the work: reading, ΔW math, key mapping, merging and baking are never re-implemented here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lycoris_core import load_adapter
from lycoris_core.adapter.describe import architecture_text, block_norms, describe, module_rows
from lycoris_core.adapter.metadata import preview_image
from lycoris_core.io.reader import read_safetensors_header
from lycoris_core.keymap import detect_model, map_adapter
from lycoris_core.tools.bake import bake_checkpoint
from lycoris_core.tools.common import MergeInput
from lycoris_core.tools.merge import convert_adapter, merge_adapters, resize_adapter

from .folders import Folders, PanelError

ACTIONS = ("merge", "convert", "resize", "bake")
RANK_MODES = ("fixed", "ratio", "energy", "threshold")
DTYPES = ("keep", "fp16", "bf16", "fp32")
ROW_HEADERS = ["adapter", "unet", "clip", "blocks"]
REPORT_HEADERS = ["module", "rank", "kept_energy", "rel_error", "method", "skipped"]  # first, when present
MAX_METADATA_CHARS = 400
MAX_STRENGTH = 100.0


def no_progress(done: int, total: int, desc: str) -> None:
    """The engine's progress callback shape: progress(done, total, desc)."""


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


# ---- preview ------------------------------------------------------------------------------

@dataclass
class Preview:
    summary: str
    triggers: str
    metadata: pd.DataFrame
    modules: pd.DataFrame
    blocks: pd.DataFrame  # block, dw_norm, modules
    image_path: Path | None
    block_order: list[str] = field(default_factory=list)


def preview(folders: Folders, name, progress=no_progress) -> Preview:
    path = folders.resolve("lora", name)
    adapter = load_adapter(path)
    try:
        return _preview(folders, path, adapter, progress)
    finally:
        adapter.close()


def _preview(folders: Folders, path: Path, adapter, progress) -> Preview:
    facts = describe(adapter)
    norms = block_norms(adapter, progress)
    order = list(norms.norms)
    block_df = pd.DataFrame({"block": order, "dw_norm": [round(norms.norms[b], 6) for b in order],
                             "modules": [norms.modules[b] for b in order]})
    meta_df = pd.DataFrame(
        [{"key": k, "value": v if len(v) <= MAX_METADATA_CHARS else v[: MAX_METADATA_CHARS - 3] + "..."}
         for k, v in sorted(adapter.metadata.items())],
        columns=["key", "value"],
    )
    params, dense = facts.parameters, facts.dense_parameters
    lines = [
        f"### {_md_escape(path.name)}",
        "| field | value |",
        "|---|---|",
        f"| file | `{_md_escape(path.relative_to(folders.loras.resolve()).as_posix())}` ({human_size(path.stat().st_size)}) |",
        f"| architecture | **{_md_escape(architecture_text(facts))}** (detected from module names and shapes)"
        + (f"; header says `{_md_escape(facts.base_model)}`" if facts.base_model else "") + " |",
        f"| parts | {_parts(facts.parts)} |",
        f"| modules | {facts.modules} ({_counted(facts.algorithms)}) |",
        f"| ranks | {_counted(facts.ranks)} |",
        f"| parameters | {params:,} of {dense:,} dense ({params / dense:.2%}) |" if dense else f"| parameters | {params:,} |",
        f"| alpha | {_counted(facts.alpha)}" + (f" (from {_md_escape(facts.alpha_source)})" if facts.alpha_source else "")
        + " |",
        f"| unknown keys | {facts.unknown_keys} |",
    ]
    if norms.needs_weight:
        lines.append(f"\n{norms.needs_weight} module(s) need the model's weights for their ΔW and are left out of the chart.")
    if adapter.unknown_reasons:
        shown = adapter.unknown_keys[:10]
        lines.append("\nNot understood: " + "; ".join(f"`{_md_escape(k)}` ({adapter.unknown_reasons[k]})" for k in shown)
                     + (" ..." if len(adapter.unknown_reasons) > 10 else ""))

    if facts.trigger_words:
        triggers = "**Trigger words:** " + ", ".join(f"`{_md_escape(w)}`" for w in facts.trigger_words)
        triggers += "  \n<small>from a sidecar .txt/.json, modelspec.trigger_phrase, then the most frequent training tags</small>"
    else:
        triggers = "**Trigger words:** none found in the header or beside the file."

    image = preview_image(path)
    if image is not None and not _inside_folder(image, folders.loras):
        image = None
    return Preview("\n".join(lines), triggers, meta_df, pd.DataFrame(module_rows(adapter)), block_df, image, order)


def _parts(parts: dict) -> str:
    """Matched modules per model part: 'diffusion_model 494/494, t5xxl 72/72'."""
    return ", ".join(f"{p} {v['matched']}/{v['modules']}" for p, v in parts.items()) or "–"


def _counted(counts: dict) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in counts.items()) or "–"


def _inside_folder(path: Path, root: Path) -> bool:
    real, real_root = path.resolve(), root.resolve()
    return real_root in real.parents


# ---- match report -------------------------------------------------------------------------

def match_report(folders: Folders, adapter_name, checkpoint_name) -> tuple[str, pd.DataFrame]:
    """How the adapter's modules land on a checkpoint, from its header only (no tensors read)."""
    path = folders.resolve("lora", adapter_name)
    ckpt = folders.resolve("checkpoint", checkpoint_name)
    entries, ckpt_meta, _ = read_safetensors_header(ckpt)
    shapes = {k: tuple(v["shape"]) for k, v in entries.items()}
    adapter = load_adapter(path)
    try:
        report = map_adapter(adapter.modules, shapes, allow_partial=True)
    finally:
        adapter.close()
    layout = detect_model(shapes)
    verdict = (
        "**Would be refused**: shape mismatches, or fewer than half of the modules match."
        if report.refused else
        ("**Partial match**: some modules would be skipped." if report.is_partial else "**All applicable modules match.**")
    )
    lines = [
        f"### {_md_escape(path.name)} → {_md_escape(ckpt.name)}",
        verdict,
        "",
        f"- {_md_escape(report.summary())}",
        f"- checkpoint: {_md_escape(layout.describe())}, {len(shapes):,} tensors"
        + (f"; header says `{_md_escape(ckpt_meta['modelspec.architecture'])}`" if "modelspec.architecture" in ckpt_meta else ""),
        f"- blocks touched: {', '.join(report.blocks_touched()) or 'none'}",
    ]
    rows = [{"status": "matched", "module": n, "target": t.weight_key, "block": t.block or "", "detail": ""}
            for n, t in report.targets.items()]
    rows += [{"status": "shape mismatch", "module": m, "target": k, "block": "", "detail": f"module {ms} vs weight {ws}"}
             for m, k, ms, ws in report.mismatched]
    rows += [{"status": "unmatched", "module": m, "target": "", "block": "", "detail": ""} for m in report.unmatched]
    rows += [{"status": "not applicable", "module": m, "target": "", "block": "", "detail": "part absent from the model"}
             for m in report.not_applicable]
    return "\n".join(lines), pd.DataFrame(rows, columns=["status", "module", "target", "block", "detail"])


# ---- merge / convert / resize / bake ------------------------------------------------------

@dataclass
class JobResult:
    status: str  # markdown
    table: pd.DataFrame
    errors: pd.DataFrame  # module, rel_error (for the plot)
    text: str
    path: Path | None = None


def _rows(rows) -> list[list]:
    if rows is None:
        return []
    if isinstance(rows, pd.DataFrame):
        return rows.values.tolist()
    if isinstance(rows, dict) and "data" in rows:  # the Dataframe's JSON form
        return list(rows["data"])
    return [list(r) for r in rows]


def _strength(value, what: str) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        return 1.0
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise PanelError(f"{what} strength {value!r} is not a number") from None
    if not math.isfinite(s) or abs(s) > MAX_STRENGTH:
        raise PanelError(f"{what} strength {value!r} must be a finite number between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g}")
    return s


def parse_inputs(folders: Folders, rows):
    """The adapter rows of the page, validated, as the engine's MergeInput list."""
    inputs = []
    for row in _rows(rows):
        row = list(row) + [None] * (4 - len(row))
        name, unet, clip, blocks = row[:4]
        if name is None or (isinstance(name, float) and math.isnan(name)) or not str(name).strip():
            continue
        path = folders.resolve("lora", str(name))
        blocks = None if blocks is None or (isinstance(blocks, float) and math.isnan(blocks)) else str(blocks).strip()
        inputs.append(MergeInput(str(path), _strength(unet, f"{name}: UNet"), _strength(clip, f"{name}: CLIP"),
                                 blocks or None))
    if not inputs:
        raise PanelError("add at least one adapter")
    return inputs


def _report_frames(report) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The engine's report rows as a table (its own columns, module first) and the error plot's data."""
    columns = [c for c in REPORT_HEADERS if any(c in r for r in report.rows)]
    for r in report.rows:
        columns += [k for k in r if k not in columns]
    rows = [{c: _cell(r.get(c)) for c in columns} for r in report.rows]
    table = pd.DataFrame(rows, columns=columns)
    plot_rows = [{"module": r["module"], "rel_error": float(r["rel_error"])} for r in report.rows
                 if isinstance(r.get("rel_error"), (int, float)) and not r.get("skipped")]
    return table, pd.DataFrame(plot_rows, columns=["module", "rel_error"])


def _cell(value):
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, (tuple, list)):
        return "×".join(str(v) for v in value)
    return "" if value is None else value


def run_job(folders: Folders, action: str, rows, *, checkpoint=None, rank_mode="fixed", rank_param=16,
            conv_tucker=False, dtype="keep", output_name=None, overwrite=False, dry_run=True,
            progress=no_progress) -> JobResult:
    """A dry run (nothing written) or the real write of one of ACTIONS."""
    if action not in ACTIONS:
        raise PanelError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    if rank_mode not in RANK_MODES:
        raise PanelError(f"rank mode must be one of {', '.join(RANK_MODES)}")
    if dtype not in DTYPES:
        raise PanelError(f"dtype must be one of {', '.join(DTYPES)}")
    try:
        rank_param = float(rank_param)
    except (TypeError, ValueError):
        raise PanelError(f"rank parameter {rank_param!r} is not a number") from None
    if rank_mode == "fixed":
        if rank_param != int(rank_param) or rank_param < 1:
            raise PanelError("fixed rank must be a whole number of at least 1")
        rank_param = int(rank_param)

    inputs = parse_inputs(folders, rows)
    ckpt = folders.resolve("checkpoint", checkpoint) if (action == "bake" or checkpoint) else None
    if action in ("convert", "resize") and len(inputs) != 1:
        raise PanelError(f"{action} takes exactly one adapter ({len(inputs)} given)")
    if action == "resize":
        _check_resize(inputs[0].path, rank_mode, rank_param)

    notes = []
    if ckpt is not None and action != "bake" and not _needs_base(inputs):
        notes.append(f"`{_md_escape(ckpt.name)}` not used: no module depends on the base weight")
        ckpt = None

    out_kind = "checkpoint" if action == "bake" else "lora"
    out_path = None
    if not dry_run:
        used = tuple(Path(i.path) for i in inputs) + ((ckpt,) if ckpt else ())
        out_path = folders.output(out_kind, output_name, bool(overwrite), used)

    target = None if out_path is None else str(out_path)
    if action == "bake":
        report = bake_checkpoint(str(ckpt), inputs, target, dtype=None if dtype == "keep" else dtype,
                                 dry_run=dry_run, overwrite=bool(overwrite), progress=progress)
    else:
        options = dict(rank_mode=rank_mode, rank_param=rank_param, conv_tucker=bool(conv_tucker),
                       base=None if ckpt is None else str(ckpt), dry_run=dry_run, overwrite=bool(overwrite),
                       progress=progress, **({} if dtype == "keep" else {"save_dtype": dtype}))
        if action == "merge":
            report = merge_adapters(inputs, target, **options)
        else:
            report = (convert_adapter if action == "convert" else resize_adapter)(inputs[0].path, target, **options)
    table, errors = _report_frames(report)
    total_error = getattr(report, "total_error", None)
    if action == "bake":
        err = f"{getattr(report, 'patched', '?')} of {getattr(report, 'tensors', '?')} checkpoint tensors patched (exact)"
    else:
        err = f"total relative error **{total_error:.4g}**" if isinstance(total_error, (int, float)) else ""
    skipped = sum(1 for r in report.rows if r.get("skipped"))
    what = f"{action} of {len(inputs)} adapter(s)" + (f" into `{_md_escape(ckpt.name)}`" if action == "bake" else "")
    if dry_run:
        status = f"**Dry run** — {what}: {len(table)} modules, {skipped} skipped; {err}. Nothing was written."
        path = None
    else:
        path = Path(getattr(report, "path", None) or out_path)
        size = getattr(report, "size_bytes", None) or (path.stat().st_size if path.is_file() else 0)
        root = folders.root(out_kind).resolve()
        shown = path.resolve().relative_to(root).as_posix() if _inside_folder(path, root) else path.name
        status = (f"**Written** — {what}: `{_md_escape(shown)}` ({human_size(size)}) in `{_md_escape(root)}`; "
                  f"{len(table)} modules, {skipped} skipped; {err}.")
    if notes:
        status += "  \n<small>" + "; ".join(notes) + "</small>"
    return JobResult(status, table, errors, report.to_text(), path)


def _needs_base(inputs) -> bool:
    """Does any module's delta depend on the model's weight (IA³, GLoRA, OFT/BOFT, DoRA)?"""
    for item in inputs:
        adapter = load_adapter(item.path)
        try:
            if any(m.uses_weight for m in adapter.modules.values()):
                return True
        finally:
            adapter.close()
    return False


def _check_resize(path: str, rank_mode: str, rank_param) -> None:
    adapter = load_adapter(path)
    try:
        ranks = [m.rank for m in adapter.modules.values() if m.rank is not None]
    finally:
        adapter.close()
    if rank_mode == "fixed" and ranks and rank_param >= max(ranks):
        raise PanelError(f"resize needs a rank below the adapter's current {max(ranks)} (got {rank_param}); "
                         "use convert to keep the rank")
