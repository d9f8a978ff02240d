"""``python -m web.panel [--host H] [--port P] [--models DIR] [--demo]``: start the panel."""

from __future__ import annotations

import argparse
import os
import sys

from .folders import MODELS_ENV, PanelError, discover_folders

HOST_ENV, PORT_ENV = "LYCORIS_PANEL_HOST", "LYCORIS_PANEL_PORT"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m web.panel", description="LyCORIS adapter panel (Gradio).")
    parser.add_argument("--host", default=os.environ.get(HOST_ENV, "127.0.0.1"),
                        help=f"address to listen on (default 127.0.0.1; env {HOST_ENV})")
    parser.add_argument("--port", type=int, default=int(os.environ.get(PORT_ENV, "7860")),
                        help=f"port (default 7860; env {PORT_ENV})")
    parser.add_argument("--models", metavar="DIR", default=None,
                        help=f"folder holding loras/ and checkpoints/ (env {MODELS_ENV}; default: ComfyUI's "
                             "models/ when installed in custom_nodes/, else the built-in demo)")
    parser.add_argument("--demo", action="store_true", help="use the built-in demo models")
    args = parser.parse_args(argv)
    try:
        folders = discover_folders(args.models, demo=args.demo)
    except PanelError as exc:
        parser.error(str(exc))
    from .ui import build_ui  # here, not at the top: --help answers without importing Gradio

    print(f"LyCORIS panel: {folders.describe()}", file=sys.stderr)
    ui = build_ui(folders)
    ui.queue().launch(server_name=args.host, server_port=args.port, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
