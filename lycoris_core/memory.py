"""How much host memory the engine's caches may take: sized from what is free, not from total RAM.

The engine's caches (loaded adapter files, strength-1 deltas) are invisible to the
memory manager of the application around them (ComfyUI's model management, a browser,
a second model).  So a cache never grows into the last ``RESERVE_FRACTION`` of RAM,
or the last ``RESERVE_BYTES``, whichever is larger, and gives memory back before
taking more when that reserve is reached.  ``MemAvailable`` (Linux) counts the page
cache as reclaimable, as the kernel does; elsewhere psutil answers, when installed.
"""

from __future__ import annotations

import os

RESERVE_BYTES = 2 << 30  # never leave less than this free because of a cache
RESERVE_FRACTION = 0.15  # ... nor less than this share of RAM


def total_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 16 << 30


def available_bytes() -> int:
    """Memory the system can hand out now without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return total_bytes() // 2
    return int(psutil.virtual_memory().available)


def reserve_bytes() -> int:
    return max(RESERVE_BYTES, int(RESERVE_FRACTION * total_bytes()))


def spare_bytes() -> int:
    """What a cache may still take now: free memory above the reserve (0 when below it)."""
    return max(0, available_bytes() - reserve_bytes())


def budget_from_env(var: str, default_bytes: int) -> int:
    """A byte budget from an environment variable in MiB (blank or invalid -> default)."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default_bytes
    try:
        return max(0, int(float(raw) * (1 << 20)))
    except ValueError:
        return default_bytes
