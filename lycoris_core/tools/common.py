"""What merge, bake and extract share: inputs, argument checks, progress and report rows.

Each tool checks its arguments before any long work (``check_write``, ``check_rank``),
reports progress through ``Progress`` (a caller's callback, or a tqdm bar), and lists
every module it did not use with the reason (``skip_row``, ``match_rows``), so nothing
is dropped silently.  The reports render their footer with ``footer``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from ..errors import LycorisError
from ..io.writer import SAVE_DTYPES, check_output
from .svd import SVD_METHODS, check_mode

ProgressFn = Callable[[int, int, str], None]



class MergeError(LycorisError):
    """Adapters that cannot be merged, converted, baked or extracted as asked."""


@dataclass
class MergeInput:
    """An adapter file as a tool takes it: strengths and optional block weights."""

    path: str
    strength_unet: float = 1.0
    strength_clip: float = 1.0
    blocks: str | None = None

    def recipe(self) -> dict:
        return {"name": os.path.basename(self.path), **file_identity(self.path),
                "strength_unet": self.strength_unet, "strength_clip": self.strength_clip,
                "blocks": self.blocks}


def file_identity(path: str, hash_limit: int = 2 << 30) -> dict:
    """sha256 of a file (streamed), or only its size when it is larger than ``hash_limit``."""
    size = os.path.getsize(path)
    if size > hash_limit:
        return {"size": size}
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


# ---- argument checks, before any long work ----------------------------------------------------

def check_write(out_path: str | None, dry_run: bool, overwrite: bool, inputs: Sequence[str] = ()) -> None:
    """An output is needed unless this is a dry run; it is never an input and never replaced silently."""
    if dry_run:
        return
    if out_path is None:
        raise MergeError("an output path is needed unless dry_run is set")
    if any(os.path.abspath(out_path) == os.path.abspath(p) for p in inputs):
        raise MergeError("the output must not be one of the inputs")
    check_output(out_path, overwrite)


def check_rank(rank_mode: str, rank_params: Sequence[float | None], save_dtype: str, svd: str = "auto") -> None:
    """Rank mode and its parameters (``None`` entries skipped), SVD method and the saved dtype."""
    try:
        for param in rank_params:
            if param is not None:
                check_mode(rank_mode, param)
    except ValueError as exc:
        raise MergeError(str(exc)) from None
    if svd not in SVD_METHODS:
        raise MergeError(f"svd must be one of {', '.join(SVD_METHODS)}, not {svd!r}")
    if save_dtype not in SAVE_DTYPES:
        raise MergeError(f"save dtype must be one of {', '.join(SAVE_DTYPES)}, not {save_dtype!r}")


def check_files(*paths: str, what: str = "checkpoint") -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise MergeError(f"{what} {path} does not exist")


# ---- progress ---------------------------------------------------------------------------------

class Progress:
    """Calls ``callback(done, total, desc)``, or shows a tqdm bar when there is none."""

    def __init__(self, total: int, desc: str, callback: ProgressFn | None = None, unit: str = "it"):
        self.total, self.desc, self.callback, self.done = total, desc, callback, 0
        self.bar = None
        if callback is None:
            self.bar = tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False)
        else:
            callback(0, total, desc)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        else:
            self.callback(self.done, self.total, self.desc)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- report rows ---------------------------------------------------------------------------------

def skip_row(name: str, reason: str, adapter=None) -> dict:
    """A report row for something not used, with the reason and the file it came from."""
    source = os.path.basename(adapter.name) if adapter is not None else ""
    return {"module": name, "rank": 0, "kept_energy": 0.0, "rel_error": 0.0, "skipped": reason, "source": source}


def match_rows(adapter, report) -> list[dict]:
    """Skip rows for every module the key map left out, and every key the reader did not understand."""
    rows = [skip_row(name, "no matching layer in the model", adapter) for name in report.unmatched]
    rows += [skip_row(name, f"shape {ms} does not fit {key} {ws}", adapter) for name, key, ms, ws in report.mismatched]
    rows += [skip_row(name, "its model part is absent", adapter) for name in report.not_applicable]
    rows += [skip_row(key, f"unknown key: {reason}", adapter) for key, reason in adapter.unknown_reasons.items()]
    return rows


def footer(report) -> list[str]:
    """The last report line: where the output went, or that nothing was written."""
    if report.path:
        return [f"wrote {report.path} ({report.size_bytes} bytes) in {report.seconds:.1f}s"]
    return ["dry run: nothing written"] if report.dry_run else []
