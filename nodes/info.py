"""What the Info node and ``GET /lycoris/info`` show about an adapter, and the name check both routes use.

The facts come from ``lycoris_core.adapter.describe`` (the one description every front
end shows); this module only shapes them for the node and the JSON route.  No ComfyUI
and no aiohttp here, so tests call it directly.
"""

from __future__ import annotations

import os

from lycoris_core.adapter import Adapter
from lycoris_core.adapter.describe import describe, summary_lines


def adapter_info(adapter: Adapter, name: str | None = None) -> dict:
    """Everything the front end shows about one adapter, as JSON-ready values."""
    return describe(adapter, name or os.path.basename(adapter.name)).as_json()


def summary_text(adapter: Adapter) -> str:
    """The Info node's summary output: one fact per line."""
    return "\n".join(summary_lines(adapter, unknown_limit=10))


# ---- name resolution shared by both routes ---------------------------------------------------

class InvalidName(ValueError):
    """A name that is not a plain relative file name inside the folder (HTTP 400)."""


def check_name(name: str | None) -> str:
    """Refuse empty, absolute and parent-relative names before any lookup."""
    if not name or "\x00" in name or len(name) > 1024:
        raise InvalidName("missing or invalid 'name'")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts or (len(name) > 1 and name[1] == ":"):
        raise InvalidName("adapter names are relative to the loras folder")
    return name
