"""Shared fixtures for the panel tests: demo models in a tmp folder and the panel served in-process."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("gradio")

from web.panel import Folders, build_ui  # noqa: E402
from web.panel.demo_models import DEMO_CHECKPOINT, ensure_demo  # noqa: E402

DEMO_ADAPTERS = ("demo_lora.safetensors", "demo_loha.safetensors", "demo_lokr.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_models(root: Path) -> Path:
    """The demo models plus a trigger-word sidecar and a preview image for demo_lora."""
    ensure_demo(root)
    loras = root / "loras"
    (loras / "demo_lora.txt").write_text("lycotrigger, shiny style\n", encoding="utf-8")
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 80, 40)).save(loras / "demo_lora.preview.png")
    return root


@dataclass
class RunningPanel:
    url: str
    root: Path
    folders: Folders
    ui: object


def launch_panel(root: Path) -> RunningPanel:
    folders = Folders(root / "loras", root / "checkpoints", "test")
    ui = build_ui(folders)
    ui.queue()
    _app, url, _share = ui.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                  quiet=True, show_error=True)
    return RunningPanel(url, root, folders, ui)


__all__ = ["DEMO_ADAPTERS", "DEMO_CHECKPOINT", "RunningPanel", "free_port", "launch_panel", "make_models"]
