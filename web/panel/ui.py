"""The Gradio layout: Preview and Merge tabs wired to ``actions``.

Owns components, events, API names and the translation of every refusal into a readable
``gr.Error``.  Holds no logic of its own beyond that: names are validated in ``folders``,
work is done by ``actions`` (which calls ``lycoris_core``).
"""

from __future__ import annotations

import functools
import logging
import math

import gradio as gr
import pandas as pd
from PIL import Image

from lycoris_core import LycorisError

from . import actions
from .folders import Folders, PanelError, discover_folders

log = logging.getLogger("lycoris.panel")

WRITE_QUEUE = "lycoris_write"  # dry runs and writes share one slot: two merges never interleave

ACTION_CHOICES = [
    ("Merge adapters into one", "merge"),
    ("Convert one adapter (e.g. LoHa → LoRA)", "convert"),
    ("Resize one adapter to a smaller rank", "resize"),
    ("Bake adapters into a checkpoint", "bake"),
]

HELP = """
**Merge** rebuilds each module's ΔW (with its UNet / CLIP strength and block weights), sums them and
stores the result as a LoRA at the rank the rank mode picks (fixed rank, ratio of singular values,
energy kept, or singular-value threshold). **Convert** and **resize** do the same for one adapter.
**Bake** adds the adapters into a copy of a checkpoint. Run a **dry run** first: it lists each module's
rank, kept energy and relative error without writing anything. Block weights: a preset name or a
comma-separated vector (e.g. 17 values `BASE,IN01,…,OUT11`); empty means all 1.
"""


def _guard(fn):
    """Turn every refusal into a readable message in the page, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (PanelError, LycorisError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except (ValueError, OSError, KeyError) as exc:
            raise gr.Error(f"{type(exc).__name__}: {exc}", print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - shown to the user, logged with its traceback
            log.exception("panel action failed")
            raise gr.Error(f"unexpected error ({type(exc).__name__}): {exc}", print_exception=False) from None

    return wrapper


def _engine_progress(progress: gr.Progress):
    """The engine's progress(done, total, desc) on a Gradio progress bar."""

    def callback(done: int, total: int, desc: str) -> None:
        progress((done, max(total, 1)), desc=desc)

    return callback


def _short(name: str, width: int = 34) -> str:
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name if len(name) <= width else "…" + name[-(width - 1):]


def build_ui(folders: Folders | None = None, *, models=None, title: str = "LyCORIS panel") -> gr.Blocks:
    """The panel as a ``gr.Blocks``: launch it, or mount it in another app (A1111 tab, FastAPI)."""
    if folders is None:
        folders = discover_folders(models)
    loras, checkpoints = folders.list("lora"), folders.list("checkpoint")
    with gr.Blocks(title=title, analytics_enabled=False) as ui:
        gr.Markdown(f"## {title}\n{folders.describe()}"
                    + ("  \n*No model folder configured: showing the built-in demo models.*" if folders.is_demo else ""),
                    elem_id="lycoris-folders")
        with gr.Tab("Preview", id="preview"):
            adapter, checkpoint, refresh_btn = _preview_tab(ui, folders, loras, checkpoints)
        with gr.Tab("Merge", id="merge"):
            picks, merge_ckpt = _merge_tab(folders, loras, checkpoints)

        def do_refresh(adapter_now, checkpoint_now, picks_now, merge_ckpt_now):
            new_loras, new_ckpts = folders.list("lora"), folders.list("checkpoint")
            keep = [p for p in (picks_now or []) if p in new_loras]
            return (
                gr.Dropdown(choices=new_loras, value=adapter_now if adapter_now in new_loras else None),
                gr.Dropdown(choices=new_ckpts, value=checkpoint_now if checkpoint_now in new_ckpts else None),
                gr.Dropdown(choices=new_loras, value=keep),
                gr.Dropdown(choices=new_ckpts, value=merge_ckpt_now if merge_ckpt_now in new_ckpts else None),
            )

        lists = [adapter, checkpoint, picks, merge_ckpt]
        refresh_btn.click(do_refresh, lists, lists, api_name="refresh")
    ui.lycoris_folders = folders
    return ui


def _preview_tab(ui: gr.Blocks, folders: Folders, loras: list[str], checkpoints: list[str]):
    """Adapter summary, trigger words, image, ‖ΔW‖ per block, modules, metadata, match report."""

    @_guard
    def do_preview(adapter, progress=gr.Progress()):  # noqa: B008 - Gradio injects it
        p = actions.preview(folders, adapter, progress=_engine_progress(progress))
        image = None
        if p.image_path is not None:
            with Image.open(p.image_path) as img:
                img.thumbnail((768, 768))
                image = img.convert("RGB")
        plot = gr.BarPlot(value=p.blocks, x="block", y="dw_norm", sort=p.block_order or None)
        return p.summary, p.triggers, image, plot, _table(p.modules), _table(p.metadata)

    @_guard
    def do_match(adapter, checkpoint):
        text, table = actions.match_report(folders, adapter, checkpoint)
        return text, _table(table)

    with gr.Row(equal_height=True):
        adapter = gr.Dropdown(choices=loras, value=loras[0] if loras else None, label="Adapter",
                              allow_custom_value=True, scale=4, elem_id="lycoris-adapter")
        preview_btn = gr.Button("Preview", variant="primary", scale=1, elem_id="lycoris-preview-btn")
        refresh_btn = gr.Button("↻ Refresh lists", scale=1, elem_id="lycoris-refresh")
    with gr.Row():
        with gr.Column(scale=3):
            summary = gr.Markdown("*Choose an adapter to see its summary.*", elem_id="lycoris-summary")
            triggers = gr.Markdown(elem_id="lycoris-triggers")
        with gr.Column(scale=1, min_width=200):
            image = gr.Image(label="Preview image", type="pil", interactive=False, height=260, elem_id="lycoris-image")
    block_plot = gr.BarPlot(x="block", y="dw_norm", title="ΔW norm per block (‖ΔW‖_F at strength 1)",
                            x_title="block", y_title="‖ΔW‖", y_lim=[0, None], height=280, elem_id="lycoris-block-plot")
    modules_df = gr.Dataframe(label="Modules", interactive=False, max_height=320, wrap=False,
                              elem_id="lycoris-modules", visible=False)
    with gr.Accordion("Metadata", open=False):
        metadata_df = gr.Dataframe(label="Header metadata", interactive=False, max_height=320, wrap=True,
                                   visible=False)
    gr.Markdown("#### Match against a checkpoint (reads its header only)")
    with gr.Row(equal_height=True):
        checkpoint = gr.Dropdown(choices=checkpoints, value=checkpoints[0] if checkpoints else None,
                                 label="Checkpoint", allow_custom_value=True, scale=4, elem_id="lycoris-match-ckpt")
        match_btn = gr.Button("Match report", scale=1, elem_id="lycoris-match-btn")
    match_md = gr.Markdown(elem_id="lycoris-match")
    match_df = gr.Dataframe(label="Modules → checkpoint keys", interactive=False, max_height=320, visible=False)

    preview_out = [summary, triggers, image, block_plot, modules_df, metadata_df]
    preview_btn.click(do_preview, [adapter], preview_out, api_name="preview")
    adapter.input(do_preview, [adapter], preview_out, api_name=False)  # chosen by the user: shown at once
    if loras:
        ui.load(do_preview, [adapter], preview_out, api_name=False)
    match_btn.click(do_match, [adapter, checkpoint], [match_md, match_df], api_name="match_report")
    return adapter, checkpoint, refresh_btn


def _merge_tab(folders: Folders, loras: list[str], checkpoints: list[str]):
    """Merge / convert / resize / bake: adapter rows, options, dry run, write, the per-module report."""

    def job_outputs(result: actions.JobResult):
        errors = result.errors.copy()
        labels = [f"{i + 1}. {_short(m)}" for i, m in enumerate(errors["module"])]
        errors["module"] = labels
        plot = gr.BarPlot(value=errors, x="module", y="rel_error", sort=labels or None)
        return result.status, plot, _table(result.table), result.text

    @_guard
    def do_dry_run(action, rows, checkpoint, rank_mode, rank_param, conv_tucker, dtype, progress=gr.Progress()):  # noqa: B008 - Gradio injects it
        result = actions.run_job(folders, action, rows, checkpoint=checkpoint or None, rank_mode=rank_mode,
                                 rank_param=rank_param, conv_tucker=conv_tucker, dtype=dtype, dry_run=True,
                                 progress=_engine_progress(progress))
        return job_outputs(result)

    @_guard
    def do_run(action, rows, checkpoint, rank_mode, rank_param, conv_tucker, dtype, output_name, overwrite,
               progress=gr.Progress()):  # noqa: B008 - Gradio injects it
        result = actions.run_job(folders, action, rows, checkpoint=checkpoint or None, rank_mode=rank_mode,
                                 rank_param=rank_param, conv_tucker=conv_tucker, dtype=dtype,
                                 output_name=output_name, overwrite=overwrite, dry_run=False,
                                 progress=_engine_progress(progress))
        return job_outputs(result)

    gr.Markdown(HELP)
    action = gr.Radio(choices=ACTION_CHOICES, value="merge", label="Action", elem_id="lycoris-action")
    picks = gr.Dropdown(choices=loras, value=[], multiselect=True, label="Adapters", allow_custom_value=True,
                        elem_id="lycoris-picks")
    rows = gr.Dataframe(headers=actions.ROW_HEADERS, datatype=["str", "number", "number", "str"], type="array",
                        interactive=True, label="Per adapter: UNet strength, CLIP strength, block weights (edit the cells)",
                        elem_id="lycoris-rows")
    with gr.Row():
        merge_ckpt = gr.Dropdown(choices=checkpoints, value=None, allow_custom_value=True,
                                 label="Checkpoint (bake: required; merge: optional base for DoRA/OFT)",
                                 elem_id="lycoris-merge-ckpt")
        dtype = gr.Dropdown(choices=list(actions.DTYPES), value="keep", label="Bake dtype")
    with gr.Row():
        rank_mode = gr.Dropdown(choices=list(actions.RANK_MODES), value="fixed", label="Rank mode")
        rank_param = gr.Number(value=16, label="Rank / ratio / energy / threshold", elem_id="lycoris-rank")
        conv_tucker = gr.Checkbox(value=False, label="Tucker for 3×3 convs")
    with gr.Row(equal_height=True):
        output_name = gr.Textbox(label="Output file name (.safetensors, saved in the adapter folder; "
                                       "bake: in the checkpoint folder)",
                                 placeholder="my_merge.safetensors", scale=3, elem_id="lycoris-output")
        overwrite = gr.Checkbox(value=False, label="Overwrite an existing file", scale=1, elem_id="lycoris-overwrite")
    with gr.Row():
        dry_btn = gr.Button("Dry run (writes nothing)", elem_id="lycoris-dry-btn")
        run_btn = gr.Button("Write", variant="primary", elem_id="lycoris-run-btn")
    status = gr.Markdown(elem_id="lycoris-status")
    error_plot = gr.BarPlot(x="module", y="rel_error", title="Relative error per module", x_title="module",
                            y_title="‖ΔW − ΔW_r‖ / ‖ΔW‖", x_label_angle=-40, y_lim=[0, None], height=300,
                            elem_id="lycoris-error-plot")
    report_df = gr.Dataframe(label="Per-module report", interactive=False, max_height=320, elem_id="lycoris-report",
                             visible=False)
    with gr.Accordion("Report as text", open=False):
        report_text = gr.Textbox(show_label=False, lines=8, max_lines=20)

    picks.change(_sync_rows, [picks, rows], [rows], api_name=False)
    job_inputs = [action, rows, merge_ckpt, rank_mode, rank_param, conv_tucker, dtype]
    job_out = [status, error_plot, report_df, report_text]
    dry_btn.click(do_dry_run, job_inputs, job_out, api_name="dry_run", concurrency_limit=1,
                  concurrency_id=WRITE_QUEUE)
    run_btn.click(do_run, job_inputs + [output_name, overwrite], job_out, api_name="run", concurrency_limit=1,
                  concurrency_id=WRITE_QUEUE)
    return picks, merge_ckpt


def _sync_rows(picks, rows):
    """One strength row per chosen adapter, keeping what was typed for those already there."""
    old = {}
    for row in actions._rows(rows):
        if row and isinstance(row[0], str) and row[0]:
            old[row[0]] = list(row) + [None] * (4 - len(row))
    out = []
    for name in picks or []:
        prev = old.get(name)
        unet = prev[1] if prev and _finite(prev[1]) else 1.0
        clip = prev[2] if prev and _finite(prev[2]) else 1.0
        blocks = prev[3] if prev and isinstance(prev[3], str) else ""
        out.append([name, unet, clip, blocks])
    return pd.DataFrame(out, columns=actions.ROW_HEADERS)


def _table(frame: pd.DataFrame) -> gr.Dataframe:
    """A table shown only once it has data (an empty one would show placeholder columns)."""
    return gr.Dataframe(value=frame, visible=True)


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
