"""What the Info node and ``GET /lycoris/info`` show about an adapter: pure functions.

No ComfyUI and no aiohttp here, so tests call them directly; the HTTP handlers in
``routes.py`` only resolve the name and serialise what ``adapter_info`` returns.
"""

from __future__ import annotations

import os
import weakref
from collections import Counter

from lycoris_core.adapter import Adapter
from lycoris_core.keymap import detect_adapter, map_adapter, state_shapes
from lycoris_core.metadata import base_model, preview_image, trigger_words
from lycoris_core.summary import HEADLINE_METADATA

METADATA_VALUE_LIMIT = 500
_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _counts(counter: Counter) -> dict[str, int]:
    """Counter -> JSON object, most frequent first (numbers as compact strings)."""
    def label(value):
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return f"{value:g}" if isinstance(value, float) else str(value)

    return {label(k): v for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))}


def adapter_info(adapter: Adapter, name: str | None = None) -> dict:
    """Everything the front end shows about one adapter, as JSON-ready values (cached per object)."""
    cached = _INFO.get(adapter)
    if cached is not None:
        return dict(cached, name=name or cached["name"])
    path = adapter.path
    arch = detect_adapter(adapter.modules)
    blocks, parts = [], {}
    if arch != "unknown":
        report = map_adapter(adapter.modules, state_shapes(arch, "comfy"), allow_partial=True)
        blocks = report.blocks_touched()
        parts = {part: {"matched": m, "modules": n} for part, (m, n) in report.counts.items()}
    meta = {
        k: (v if len(v) <= METADATA_VALUE_LIMIT else v[: METADATA_VALUE_LIMIT - 3] + "...")
        for k, v in sorted(adapter.metadata.items()) if k in HEADLINE_METADATA
    }
    info = {
        "name": name or os.path.basename(adapter.name),
        "file_size": os.path.getsize(path) if path else None,
        "modules": len(adapter.modules),
        "parameters": adapter.num_params,
        "algorithms": _counts(adapter.algorithms()),
        "ranks": _counts(adapter.ranks()),
        "alpha": _counts(adapter.alphas()),
        "alpha_source": adapter.alpha_source,
        "base_model": base_model(adapter.metadata),
        "architecture": arch,
        "parts": parts,
        "blocks": blocks,
        "trigger_words": trigger_words(adapter.metadata, path),
        "unknown_keys": len(adapter.unknown_reasons),
        "metadata": meta,
        "metadata_fields": len(adapter.metadata),
        "has_preview": preview_image(path) is not None,
    }
    _INFO[adapter] = info
    return dict(info)


def _first(counts: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "-"


def summary_text(info: dict) -> str:
    """The Info node's summary output: one fact per line."""
    lines = [
        f"{info['name']}: {info['modules']} modules, {info['parameters']:,} parameters",
        f"algorithms: {_first(info['algorithms'])}",
        f"ranks: {_first(info['ranks'])}",
        f"alpha: {_first(info['alpha'])}" + (f" (from {info['alpha_source']})" if info["alpha_source"] else ""),
        f"base model (metadata): {info['base_model'] or 'not stated'}",
        f"architecture (from module names and shapes): {info['architecture']}",
    ]
    if info["parts"]:
        lines.append("parts: " + ", ".join(f"{p} {v['matched']}/{v['modules']}" for p, v in info["parts"].items()))
    if info["unknown_keys"]:
        lines.append(f"keys not understood: {info['unknown_keys']}")
    return "\n".join(lines)


# ---- name resolution shared by both routes ---------------------------------------------------

class NameError400(ValueError):
    """A name that is not a plain relative file name inside the folder."""


def check_name(name: str | None) -> str:
    """Refuse empty, absolute and parent-relative names before any lookup."""
    if not name or "\x00" in name or len(name) > 1024:
        raise NameError400("missing or invalid 'name'")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts or (len(name) > 1 and name[1] == ":"):
        raise NameError400("adapter names are relative to the loras folder")
    return name
