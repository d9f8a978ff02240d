"""Safe writes: temp file in the target folder, flush, verify, rename into place.

A crash or a full disk never leaves a partial file under the final name, and an
existing file is never replaced unless the caller says so.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..errors import LycorisError, OutputExistsError
from .reader import read_safetensors_header

#: the dtypes written files may hold, by the names the tools, the CLI and the nodes accept
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class WriteError(LycorisError, OSError):
    """The output could not be written or did not read back as written."""


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output early, before any long work starts."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite to replace it")
    if not path.parent.is_dir():
        raise WriteError(f"output folder {path.parent} does not exist")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temp path beside ``path``; on success it is fsynced and renamed over it."""
    path = check_output(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if path.exists() and not overwrite:  # appeared while we worked
            raise OutputExistsError(f"{path} appeared while writing; not replaced")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def verify_written(path: str | os.PathLike, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Read the header back and compare tensor names and shapes with what was meant."""
    entries, _meta, _start = read_safetensors_header(path)
    got = {k: tuple(v["shape"]) for k, v in entries.items()}
    if got != {k: tuple(v) for k, v in expected.items()}:
        missing = sorted(set(expected) - set(got))[:3]
        raise WriteError(f"{path} did not read back as written (missing e.g. {missing})")


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write a whole state dict safely and verify it."""
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    final = Path(path)
    try:
        with atomic_path(final, overwrite) as tmp:
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
            verify_written(tmp, shapes)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as SafetensorError
        if isinstance(exc, LycorisError):
            raise
        raise WriteError(f"could not write {final}: {getattr(exc, 'strerror', None) or exc}") from exc
    return final
