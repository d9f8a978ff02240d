"""Row tiles: how deltas are built on each device, so every path gets the same bits.

A LoRA or LoHa delta is a matrix product.  Built whole on the CPU it is a full-size
float32 temporary in fresh memory (page faults cost more than the product itself on
a VM) and a round trip through RAM before it is added.  Built in tiles of output rows
into a reused, cache-sized buffer it costs the product alone, and the patch engine
adds each tile while it is still in cache.  On an accelerator the fast form is large
products and one fused add per tile, so tiles there are big (64 MiB); they still
bound the float32 workspace to two tiles beside the weight.

The policy is chosen here, in one place, by device type (``tile_elements``).
Matrix-product results depend on the shape (a 3-row tile and a 1280-row matrix may
differ in the last bit), so the tiling is part of the math: ``assemble`` (the whole
delta) and the patch kernel use the same ``tile_rows`` and the same aligned buffers
on a device, and so agree bit for bit there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

#: float32 elements per tile on the CPU (4 MiB): large enough for an efficient product, small enough for cache
CPU_TILE_ELEMENTS = 1 << 20
#: float32 elements per tile elsewhere (64 MiB): whole-matrix speed, bounded workspace
DEVICE_TILE_ELEMENTS = 1 << 24
#: the CPU policy, the one the file formats' tests and benchmarks were measured with
TILE_ELEMENTS = CPU_TILE_ELEMENTS

#: fill(start, stop, out): write rows [start, stop) of a delta into ``out`` ((stop-start, cols), float32, out's device)
RowFill = Callable[[int, int, torch.Tensor], None]

CPU = torch.device("cpu")


def tile_elements(device: torch.device | str | None = None) -> int:
    """float32 elements per tile on ``device`` (the CPU when None)."""
    return CPU_TILE_ELEMENTS if device is None or torch.device(device).type == "cpu" else DEVICE_TILE_ELEMENTS


def tile_rows(cols: int, device: torch.device | str | None = None) -> int:
    """Rows per tile for a delta with ``cols`` elements per output row."""
    return max(1, tile_elements(device) // max(1, cols))


class Workspace(threading.local):
    """Named float32 buffers reused across calls, one set per thread and device.

    Every view handed out starts at the buffer's (aligned) beginning, so a tile is
    computed at the same alignment wherever it is computed.
    """

    def __init__(self):
        self.buffers: dict[tuple[str, torch.device], torch.Tensor] = {}

    def take(self, name: str, shape, device: torch.device | str | None = None) -> torch.Tensor:
        device = CPU if device is None else torch.device(device)
        numel = 1
        for d in shape:
            numel *= int(d)
        key = (name, device)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self.buffers.pop(key, None)  # release before growing: one large buffer at a time
            # a normal tensor even when first asked for under inference mode (ComfyUI runs there),
            # so it can be written in place later outside it
            with torch.inference_mode(False):
                buffer = self.buffers[key] = torch.empty(max(numel, 1), dtype=torch.float32, device=device)
        return buffer[:numel].view(shape)

    def release(self, device: torch.device | str | None = None) -> None:
        """Drop this thread's buffers (on one device, or all): memory back to the allocator."""
        for key in [k for k in self.buffers if device is None or k[1] == torch.device(device)]:
            del self.buffers[key]


WORKSPACE = Workspace()


def tiles(rows: int, cols: int, device: torch.device | str | None = None):
    """(start, stop) of each row tile on ``device``."""
    step = tile_rows(cols, device)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def assemble(rows: int, cols: int, fill: RowFill, device: torch.device | str | None = None) -> torch.Tensor:
    """The whole (rows, cols) delta on ``device``, tile by tile, exactly as the patch kernel builds it."""
    out = torch.empty((rows, cols), dtype=torch.float32, device=device)
    for start, stop in tiles(rows, cols, device):
        tile = WORKSPACE.take("delta", (stop - start, cols), device)
        fill(start, stop, tile)
        out[start:stop].copy_(tile)
    return out
