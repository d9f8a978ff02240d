"""What an adapter's metadata says about itself: trigger words, base model, training args.

Reads kohya ``ss_*`` fields, ``modelspec.*`` fields and sidecar files beside the
adapter (A1111's ``<name>.json`` with "activation text", a ``<name>.txt`` of words).
Never trusts sizes: sidecars over 1 MB and unparsable JSON are ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SIDECAR_LIMIT = 1_000_000
PREVIEW_SUFFIXES = (".preview.png", ".png", ".jpg", ".jpeg", ".webp", ".preview.jpg", ".preview.webp")


def _json(text: str | None):
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _split_words(text: str) -> list[str]:
    return [w.strip() for w in text.replace("\n", ",").split(",") if w.strip()]


def _sidecar(path: str | os.PathLike | None, suffix: str) -> str | None:
    if not path:
        return None
    side = Path(path).with_suffix(suffix)
    try:
        if side.is_file() and side.stat().st_size <= SIDECAR_LIMIT:
            return side.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return None


def trigger_words(metadata: dict[str, str], path: str | os.PathLike | None = None, limit: int = 20) -> list[str]:
    """Trigger words, most specific first: sidecars, modelspec, then the most frequent training tags."""
    words: list[str] = []
    side = _json(_sidecar(path, ".json"))
    if isinstance(side, dict):
        for field in ("activation text", "activation_text", "trigger_words", "trainedWords"):
            value = side.get(field)
            if isinstance(value, str):
                words += _split_words(value)
            elif isinstance(value, list):
                words += [str(v).strip() for v in value if str(v).strip()]
    text = _sidecar(path, ".txt")
    if text:
        words += _split_words(text)
    for field in ("modelspec.trigger_phrase", "ss_trigger_words", "trigger_phrase"):
        if metadata.get(field):
            words += _split_words(metadata[field])
    freq = _json(metadata.get("ss_tag_frequency"))
    if isinstance(freq, dict):
        totals: dict[str, int] = {}
        for tags in freq.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if isinstance(count, (int, float)):
                        totals[tag.strip()] = totals.get(tag.strip(), 0) + int(count)
        words += [t for t, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])) if t]
    seen, unique = set(), []
    for word in words:
        if word.lower() not in seen:
            seen.add(word.lower())
            unique.append(word)
    return unique[:limit]


def base_model(metadata: dict[str, str]) -> str | None:
    """The base model the metadata claims (e.g. 'sd_v1', 'sdxl_base_v1-0', a modelspec architecture)."""
    for field in ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name"):
        if metadata.get(field):
            return metadata[field]
    if metadata.get("ss_v2") == "True":
        return "sd_v2"
    return None


def preview_image(path: str | os.PathLike | None) -> Path | None:
    """A preview image beside the adapter: <name>.preview.png, <name>.png, .jpg, .webp."""
    if not path:
        return None
    path = Path(path)
    stem = path.with_suffix("")
    for suffix in PREVIEW_SUFFIXES:
        candidate = Path(str(stem) + suffix)
        if candidate.is_file():
            return candidate
    return None
