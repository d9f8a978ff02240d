"""Row tiles: how low-rank deltas are built, so every path gets the same bits.

A LoRA or LoHa delta is a matrix product.  Built whole, it is a full-size float32
temporary in fresh memory (page faults cost more than the product itself on a VM)
and a round trip through RAM before it is added.  Built in tiles of output rows into
a reused, cache-sized buffer, it costs the product alone, and the patch engine can
add each tile while it is still in cache.

MKL's results depend on the shape of the product (a 3-row tile and a 1280-row
matrix may differ in the last bit), so the tiling is part of the math: ``assemble``
(the whole delta) and the patch engine's streamed path use the same ``tile_rows``
and the same aligned buffers, and so agree bit for bit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

#: float32 elements per tile (4 MiB): large enough for an efficient product, small enough for cache
TILE_ELEMENTS = 1 << 20

#: fill(start, stop, out): write rows [start, stop) of a delta into ``out`` ((stop-start, cols), float32)
RowFill = Callable[[int, int, torch.Tensor], None]


def tile_rows(cols: int) -> int:
    """Rows per tile for a delta with ``cols`` elements per output row."""
    return max(1, TILE_ELEMENTS // max(1, cols))


class Workspace(threading.local):
    """Named float32 buffers reused across calls, one set per thread.

    Every view handed out starts at the buffer's (64-byte aligned) beginning, so a
    tile is computed at the same alignment wherever it is computed.
    """

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= int(d)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[name] = torch.empty(max(numel, 1), dtype=torch.float32)
        return buffer[:numel].view(shape)


WORKSPACE = Workspace()


def tiles(rows: int, cols: int):
    """(start, stop) of each row tile."""
    step = tile_rows(cols)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def assemble(rows: int, cols: int, fill: RowFill) -> torch.Tensor:
    """The whole (rows, cols) delta, tile by tile, exactly as the streamed path builds it."""
    out = torch.empty((rows, cols), dtype=torch.float32)
    for start, stop in tiles(rows, cols):
        tile = WORKSPACE.take("delta", (stop - start, cols))
        fill(start, stop, tile)
        out[start:stop].copy_(tile)
    return out
