"""One error family for everything the engine refuses.

Adapter files come from strangers, so every refusal is typed and names the file
and, where there is one, the key. Callers catch ``LycorisError`` to catch all.
"""

from __future__ import annotations


class LycorisError(Exception):
    """Base of every error the engine raises on purpose."""


class AdapterFormatError(LycorisError, ValueError):
    """A file or tensor dict that cannot be read as an adapter."""

    def __init__(self, source: str, message: str, key: str | None = None):
        self.source = str(source)
        self.key = key
        self.reason = message
        where = f"{self.source}" + (f" [{key}]" if key else "")
        super().__init__(f"{where}: {message}")


class PickleRefusedError(AdapterFormatError):
    """A pickle-based file (.pt/.ckpt/.bin) read without the explicit opt-in."""


class ArchitectureMismatchError(LycorisError):
    """An adapter made for one model architecture applied to another."""


class WeightRangeError(LycorisError, ValueError):
    """A patched value that the weight's dtype cannot hold (e.g. beyond fp16's ±65504)."""


class BlockWeightError(LycorisError, ValueError):
    """A block-weight preset, vector or named form that cannot be parsed."""


class OutputExistsError(LycorisError, FileExistsError):
    """A write that would overwrite an existing file without permission."""
