"""The panel's API, driven with gradio_client against the app served in-process on demo models.

Every action (preview, match report, dry run, merge, convert, resize, bake) is called as a
browser would call it; path traversal, bad output names and overwrites are refused with a
readable message and leave the folders untouched.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio_client")

from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from panel_app import DEMO_CHECKPOINT, free_port, launch_panel, make_models  # noqa: E402

from lycoris_core import load_adapter  # noqa: E402
from web.panel import folders as folders_mod  # noqa: E402
from web.panel.folders import Folders, PanelError, discover_folders  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MERGE_DEFAULTS = dict(checkpoint=None, rank_mode="fixed", rank_param=8, conv_tucker=False, dtype="keep")


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    root = make_models(tmp_path_factory.mktemp("models"))
    running = launch_panel(root)
    client = Client(running.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    running.client = client
    yield running
    client.close()
    running.ui.close()


def rows(*items):
    """Adapter rows as the page's Dataframe sends them."""
    return {"headers": ["adapter", "unet", "clip", "blocks"], "data": [list(i) for i in items], "metadata": None}


def dry_run(panel, action, *items, **kw):
    args = {**MERGE_DEFAULTS, **kw}
    return panel.client.predict(action, rows(*items), args["checkpoint"], args["rank_mode"], args["rank_param"],
                                args["conv_tucker"], args["dtype"], api_name="/dry_run")


def run(panel, action, *items, output_name, overwrite=False, **kw):
    args = {**MERGE_DEFAULTS, **kw}
    return panel.client.predict(action, rows(*items), args["checkpoint"], args["rank_mode"], args["rank_param"],
                                args["conv_tucker"], args["dtype"], output_name, overwrite, api_name="/run")


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def frame_rows(value) -> list[list]:
    """Rows of a table output; tables come as updates (they are shown only once they have data)."""
    if isinstance(value, dict) and value.get("__type__") == "update":
        assert value.get("visible") is True
        value = value["value"]
    return value["data"] if isinstance(value, dict) else value


# ---- preview and match report ------------------------------------------------------------

def test_preview_shows_summary_triggers_image_modules_and_block_norms(panel):
    summary, triggers, image, plot, modules, metadata = panel.client.predict(
        "demo_lora.safetensors", api_name="/preview")
    assert "demo_lora.safetensors" in summary and "**sd1**" in summary
    assert "of 10,874,880 dense" in summary
    assert "lycotrigger" in triggers and "shiny style" in triggers  # sidecar .txt
    assert "lycodemo" in triggers  # ss_tag_frequency
    assert image is not None  # demo_lora.preview.png
    module_rows = frame_rows(modules)
    assert len(module_rows) == 7 and {r[1] for r in module_rows} <= {"lora", "locon"}
    blocks = [r[0] for r in plot["value"]["data"]]
    assert blocks == ["BASE", "IN01", "M00", "OUT11"]
    assert all(r[1] > 0 for r in plot["value"]["data"])
    keys = [r[0] for r in frame_rows(metadata)]
    assert "ss_tag_frequency" in keys and "ss_network_module" in keys


def test_preview_of_loha_without_sidecars_has_no_image(panel):
    summary, triggers, image, _plot, modules, _meta = panel.client.predict(
        "demo_loha.safetensors", api_name="/preview")
    assert "loha ×7" in summary and image is None
    assert "lycotrigger" not in triggers and "lycodemo" in triggers
    assert {r[1] for r in frame_rows(modules)} == {"loha"}


def test_match_report_maps_every_demo_module_onto_the_demo_checkpoint(panel):
    text, table = panel.client.predict("demo_lokr.safetensors", DEMO_CHECKPOINT, api_name="/match_report")
    assert "All applicable modules match" in text
    data = frame_rows(table)
    assert len(data) == 7 and {r[0] for r in data} == {"matched"}
    assert any(r[2].startswith("model.diffusion_model.middle_block.1") for r in data)
    assert "blocks touched: BASE, IN01, M00, OUT11" in text


# ---- dry run and writes ------------------------------------------------------------------

def test_dry_run_reports_per_module_error_and_writes_nothing(panel):
    before = snapshot(panel.root)
    status, plot, table, text = dry_run(panel, "merge", ["demo_lora.safetensors", 1.0, 1.0, ""],
                                        ["demo_loha.safetensors", 0.5, 0.0, ""], rank_param=24)
    assert "Dry run" in status and "Nothing was written" in status
    assert len(frame_rows(table)) == 7
    assert len(plot["value"]["data"]) == 7
    assert "dry run" in text
    assert snapshot(panel.root) == before


def test_merge_writes_a_loadable_adapter_and_reports_path_and_size(panel):
    status, _plot, table, _text = run(panel, "merge", ["demo_lora.safetensors", 1.0, 1.0, ""],
                                      ["demo_loha.safetensors", 0.7, 1.0, ""], output_name="api_merge", rank_param=24)
    out = panel.root / "loras" / "api_merge.safetensors"
    assert out.is_file() and "Written" in status and "api_merge.safetensors" in status and "MB" in status
    ad = load_adapter(out)
    assert len(ad.modules) == 7 and max(ad.ranks()) <= 24
    assert len(frame_rows(table)) == 7


def test_convert_turns_a_loha_into_a_lora(panel):
    status, *_ = run(panel, "convert", ["demo_loha.safetensors", 1.0, 1.0, ""], output_name="api_convert.safetensors",
                     rank_param=16)
    ad = load_adapter(panel.root / "loras" / "api_convert.safetensors")
    assert "Written" in status and {m.algo for m in ad.modules.values()} <= {"lora", "locon"}


def test_resize_shrinks_the_rank_and_refuses_a_larger_one(panel):
    run(panel, "resize", ["demo_lora.safetensors", 1.0, 1.0, ""], output_name="api_resize.safetensors", rank_param=2)
    ad = load_adapter(panel.root / "loras" / "api_resize.safetensors")
    assert set(ad.ranks()) == {2}
    with pytest.raises(AppError, match="rank below the adapter's current 8"):
        dry_run(panel, "resize", ["demo_lora.safetensors", 1.0, 1.0, ""], rank_param=8)
    with pytest.raises(AppError, match="exactly one adapter"):
        dry_run(panel, "resize", ["demo_lora.safetensors", 1, 1, ""], ["demo_loha.safetensors", 1, 1, ""],
                rank_param=2)


def test_bake_dry_run_then_write_a_checkpoint(panel):
    pytest.importorskip("lycoris_core.tools.bake")
    status, _plot, table, _text = dry_run(panel, "bake", ["demo_lora.safetensors", 1.0, 1.0, ""],
                                          checkpoint=DEMO_CHECKPOINT)
    assert "Dry run" in status and len(frame_rows(table)) > 0
    status, *_ = run(panel, "bake", ["demo_lora.safetensors", 1.0, 1.0, ""], checkpoint=DEMO_CHECKPOINT,
                     output_name="api_baked.safetensors", dtype="fp16")
    assert (panel.root / "checkpoints" / "api_baked.safetensors").is_file() and "Written" in status


def test_bake_needs_a_checkpoint(panel):
    with pytest.raises(AppError, match="choose a checkpoint"):
        dry_run(panel, "bake", ["demo_lora.safetensors", 1.0, 1.0, ""])


# ---- safety ------------------------------------------------------------------------------

TRAVERSALS = [
    "../checkpoints/" + DEMO_CHECKPOINT,  # exists, but outside the adapter folder
    "/etc/passwd",
    "..\\..\\etc\\passwd",
    "sub/../../checkpoints/" + DEMO_CHECKPOINT,
    "C:\\Windows\\win.ini",
    "demo_lora.txt",  # inside, but not a .safetensors file
]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_preview_refuses_names_outside_the_adapter_folder(panel, name):
    with pytest.raises(AppError) as info:
        panel.client.predict(name, api_name="/preview")
    message = str(info.value)
    assert "Traceback" not in message
    assert any(w in message for w in ("outside", "absolute path", "plain name", "not a .safetensors"))


def test_symlink_leading_out_of_the_folder_is_neither_listed_nor_readable(panel, tmp_path):
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes((panel.root / "loras" / "demo_lokr.safetensors").read_bytes())
    link = panel.root / "loras" / "link.safetensors"
    link.symlink_to(outside)
    try:
        assert "link.safetensors" not in panel.folders.list("lora")
        with pytest.raises(AppError, match="outside the adapter folder"):
            panel.client.predict("link.safetensors", api_name="/preview")
    finally:
        link.unlink()


def test_match_report_and_merge_rows_refuse_traversal(panel):
    with pytest.raises(AppError, match="not a plain name inside the folder"):
        panel.client.predict("demo_lora.safetensors", "../loras/demo_lora.safetensors", api_name="/match_report")
    with pytest.raises(AppError, match="not a plain name inside the folder"):
        dry_run(panel, "merge", ["../checkpoints/" + DEMO_CHECKPOINT, 1, 1, ""])


@pytest.mark.parametrize("name", [
    "../escape.safetensors", "sub/escape.safetensors", "..\\escape.safetensors", "/tmp/escape.safetensors",
    "escape.ckpt", "escape.pt", ".hidden.safetensors", "a..b.safetensors", "",
])
def test_bad_output_names_are_refused_and_nothing_is_written(panel, name):
    before = snapshot(panel.root)
    with pytest.raises(AppError):
        run(panel, "merge", ["demo_lora.safetensors", 1, 1, ""], output_name=name)
    assert snapshot(panel.root) == before
    assert not Path("/tmp/escape.safetensors").exists()


def test_existing_output_is_only_replaced_with_the_overwrite_box(panel):
    run(panel, "merge", ["demo_lora.safetensors", 1, 1, ""], output_name="api_dup.safetensors")
    out = panel.root / "loras" / "api_dup.safetensors"
    first = out.read_bytes()
    with pytest.raises(AppError, match="already exists; tick 'Overwrite'"):
        run(panel, "merge", ["demo_loha.safetensors", 1, 1, ""], output_name="api_dup.safetensors")
    assert out.read_bytes() == first
    status, *_ = run(panel, "merge", ["demo_loha.safetensors", 1, 1, ""], output_name="api_dup.safetensors",
                     overwrite=True)
    assert "Written" in status and out.read_bytes() != first


def test_an_input_is_never_overwritten_even_with_the_box(panel):
    before = snapshot(panel.root)
    with pytest.raises(AppError, match="is one of the inputs"):
        run(panel, "convert", ["demo_loha.safetensors", 1, 1, ""], output_name="demo_loha.safetensors",
            overwrite=True)
    assert snapshot(panel.root) == before


def test_bad_strengths_and_rank_are_readable_errors(panel):
    with pytest.raises(AppError, match="strength"):
        dry_run(panel, "merge", ["demo_lora.safetensors", "lots", 1, ""])
    with pytest.raises(AppError, match="fixed rank"):
        dry_run(panel, "merge", ["demo_lora.safetensors", 1, 1, ""], rank_param=2.5)
    with pytest.raises(AppError, match="add at least one adapter"):
        dry_run(panel, "merge")


def test_two_writes_at_once_are_queued_not_interleaved(panel, monkeypatch):
    from web.panel import actions

    real = actions.merge_adapters
    spans, lock = [], threading.Lock()

    def recording(*args, **kwargs):
        start = time.monotonic()
        time.sleep(0.4)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                spans.append((start, time.monotonic()))

    monkeypatch.setattr(actions, "merge_adapters", recording)
    jobs = [panel.client.submit("merge", rows(["demo_lora.safetensors", 1, 1, ""]), None, "fixed", 4, False, "keep",
                                f"api_queue_{i}.safetensors", False, api_name="/run") for i in range(2)]
    for job in jobs:
        job.result(timeout=60)
    assert len(spans) == 2
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0, f"the two merges overlapped: {spans}"


# ---- folders -----------------------------------------------------------------------------

def test_comfyui_models_are_found_by_walking_up_from_custom_nodes(tmp_path):
    project = tmp_path / "ComfyUI" / "custom_nodes" / "comfyui-lycoris"
    project.mkdir(parents=True)
    for sub in ("loras", "checkpoints"):
        (tmp_path / "ComfyUI" / "models" / sub).mkdir(parents=True)
    found = discover_folders(project_root=project)
    assert found.origin == "ComfyUI"
    assert found.loras == (tmp_path / "ComfyUI" / "models" / "loras").resolve()
    assert found.checkpoints == (tmp_path / "ComfyUI" / "models" / "checkpoints").resolve()


def test_models_option_and_env_override_comfyui_and_demo(tmp_path, monkeypatch):
    project = tmp_path / "ComfyUI" / "custom_nodes" / "x"
    project.mkdir(parents=True)
    (tmp_path / "ComfyUI" / "models" / "loras").mkdir(parents=True)
    mine = tmp_path / "mine"
    (mine / "Lora").mkdir(parents=True)  # A1111 spelling works too
    (mine / "Stable-diffusion").mkdir()
    monkeypatch.setenv(folders_mod.MODELS_ENV, str(mine))
    env = discover_folders(project_root=project)
    assert env.origin == folders_mod.MODELS_ENV and env.loras.name == "Lora" and env.checkpoints.name == "Stable-diffusion"
    other = tmp_path / "other"
    other.mkdir()
    explicit = discover_folders(other, project_root=project)
    assert explicit.origin == "--models" and explicit.loras == other.resolve() / "loras"
    with pytest.raises(PanelError, match="does not exist"):
        discover_folders(tmp_path / "missing", project_root=project)


def test_fresh_machine_gets_the_demo_models_once(tmp_path, monkeypatch):
    monkeypatch.delenv(folders_mod.MODELS_ENV, raising=False)
    monkeypatch.setenv("LYCORIS_DEMO_DIR", str(tmp_path / "cache"))
    found = discover_folders(project_root=tmp_path / "lonely" / "project")
    assert found.is_demo
    assert found.list("lora") == ["demo_loha.safetensors", "demo_lokr.safetensors", "demo_lora.safetensors"]
    assert found.list("checkpoint") == [DEMO_CHECKPOINT]
    stamp = (found.checkpoints / DEMO_CHECKPOINT).stat().st_mtime_ns
    assert discover_folders(project_root=tmp_path / "lonely" / "project").is_demo
    assert (found.checkpoints / DEMO_CHECKPOINT).stat().st_mtime_ns == stamp  # not regenerated


def test_output_names_are_validated_before_any_work(tmp_path):
    (tmp_path / "loras").mkdir()
    f = Folders(tmp_path / "loras", tmp_path / "checkpoints", "test")
    assert f.output("lora", "ok name", False).name == "ok name.safetensors"
    assert f.output("lora", "v1.5 style.safetensors", False).name == "v1.5 style.safetensors"
    for bad in ("x.pt", "x.safetensors.pt", "../x", "x/y", ".x.safetensors", "x..safetensors"):
        with pytest.raises(PanelError):
            f.output("lora", bad, False)


def test_python_m_web_panel_serves_the_page(tmp_path):
    port = free_port()
    env = dict(os.environ, LYCORIS_DEMO_DIR=str(tmp_path / "demo"), GRADIO_ANALYTICS_ENABLED="False")
    env.pop(folders_mod.MODELS_ENV, None)
    proc = subprocess.Popen([sys.executable, "-m", "web.panel", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as resp:
                    assert "LyCORIS panel" in resp.read().decode()
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(proc.stderr.read().decode()[-2000:]) from None
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
