"""Shared helpers for the reliability suite (issue 8): counting, memory probes, reporting.

Every reliability test records what it tried in a ``Tally``; ``tests/conftest.py``
prints all tallies in the terminal summary (so the counts show with or without
``-s``), and writes them as JSON when ``LYCORIS_RELIABILITY_JSON`` names a file.

``LYCORIS_LONG=1`` selects the long variants (more fuzz inputs, more cycles, atheris).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter

import psutil

LONG = os.environ.get("LYCORIS_LONG", "").strip() not in ("", "0")
MiB = 1 << 20


def scaled(short: int, long: int) -> int:
    """``short`` in CI, ``long`` under LYCORIS_LONG=1."""
    return long if LONG else short


class Tally:
    """Named counters plus maxima (e.g. slowest case, largest allocation) for one area."""

    def __init__(self, area: str):
        self.area = area
        self.counts: Counter = Counter()
        self.maxima: dict[str, float] = {}
        self.notes: list[str] = []
        self.started = time.perf_counter()
        self.seconds = 0.0

    def add(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    def peak(self, what: str, value: float) -> None:
        if value > self.maxima.get(what, float("-inf")):
            self.maxima[what] = value

    def note(self, text: str) -> None:
        self.notes.append(text)

    def stop(self) -> None:
        self.seconds = time.perf_counter() - self.started

    def line(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        maxima = ", ".join(f"max {k} {_fmt(v)}" for k, v in self.maxima.items())
        parts = [p for p in (counts, maxima) if p]
        text = f"{self.area}: " + "; ".join(parts)
        if self.seconds:
            text += f" ({self.seconds:.1f}s)"
        for n in self.notes:
            text += f"\n    {n}"
        return text

    def as_dict(self) -> dict:
        return {"counts": dict(self.counts), "maxima": self.maxima, "notes": self.notes,
                "seconds": round(self.seconds, 2)}


def _fmt(value: float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3g}"
    return str(int(value))


_TALLIES: dict[str, Tally] = {}


def tally(area: str) -> Tally:
    """The session's tally for ``area`` (created on first use, reported at the end)."""
    if area not in _TALLIES:
        _TALLIES[area] = Tally(area)
    return _TALLIES[area]


def report_lines() -> list[str]:
    mode = "long (LYCORIS_LONG=1)" if LONG else "short (set LYCORIS_LONG=1 for the long run)"
    if not _TALLIES:
        return []
    return [f"reliability suite, {mode}:"] + [t.line() for t in _TALLIES.values()]


def write_json(path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"long": LONG, **{k: t.as_dict() for k, t in _TALLIES.items()}}, fh, indent=1)


# ---- memory ------------------------------------------------------------------------------

class Memory:
    """Resident memory of this process, and its high-water mark since the last ``reset_peak``.

    Linux resets the peak (VmHWM) when "5" is written to /proc/self/clear_refs; torch's
    allocations, invisible to tracemalloc, show up here.  Elsewhere the peak falls back
    to sampling the current RSS (weaker: a transient spike between samples is missed).
    """

    def __init__(self):
        self._proc = psutil.Process()
        self.exact_peak = self._try_reset()

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return _status_kib("VmHWM") is not None
        except OSError:
            return False

    def rss(self) -> int:
        return self._proc.memory_info().rss

    def settled_rss(self) -> int:
        """RSS after a garbage collection and, with glibc, handing freed heap pages back to the OS."""
        import gc

        gc.collect()
        if _TRIM is not None:
            _TRIM(0)
        return self.rss()

    def reset_peak(self) -> None:
        if self.exact_peak:
            self._try_reset()
        self._fallback = self.rss()

    def peak(self) -> int:
        if self.exact_peak:
            return _status_kib("VmHWM") * 1024
        return max(self._fallback, self.rss())


def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def _status_kib(field: str) -> int | None:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
