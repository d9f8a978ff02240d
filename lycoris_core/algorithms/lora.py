"""LoRA / LoCon: ΔW = (α/r)·up·down, with the Tucker mid for k×k convs and DyLoRA's 2-D conv up."""

from __future__ import annotations

import torch

from .base import AdapterModule, prod


class LoRA(AdapterModule):
    algo = "lora"
    required = ("lora_up", "lora_down")
    supports_dora = True
    optional = ("lora_mid",)

    def _validate(self) -> None:
        up, down = self._shape("lora_up"), self._shape("lora_down")
        if len(up) < 2 or len(down) < 2:
            raise self._fail(f"lora factors must be at least 2-D, got up {up} and down {down}", "lora_up")
        rank = down[0]
        up_rank = prod(up[1:])
        if self._has("lora_mid"):
            mid = self._shape("lora_mid")
            if len(mid) < 3 or mid[0] != up_rank or mid[1] != rank or prod(down[2:]) != 1:
                raise self._fail(
                    f"tucker mid {mid} does not join up {up} and down {down}", "lora_mid"
                )
            if up_rank <= 0:
                raise self._fail(f"rank must be positive, got {up_rank}", "lora_up")
            self.tucker = True
            kernel = mid[2:]
        else:
            if up_rank != rank:
                raise self._fail(f"up {up} and down {down} disagree on the rank", "lora_up")
            kernel = down[2:]
        self._set_rank_scale(rank, "lora_down")
        self.tiled = True
        self.shape = (up[0], down[1], *kernel)
        if len(kernel) and prod(kernel) > 1:
            self.algo = "locon"

    def _raw_delta(self, weight):
        return self._tiled_delta()

    def row_fill(self):
        # the scale goes into the smallest factor: no extra pass over the full-size delta
        up = self._t("lora_up").flatten(1) * self.scale
        down = self._t("lora_down").flatten(1)
        if self.tucker:
            # mid (rank_up, rank_down, k...) joined with down once: (rank_up, in·k...), then rows of up @ it
            down = torch.einsum("ab...,bi->ai...", self._t("lora_mid"), down).flatten(1)

        def fill(start, stop, out):
            torch.mm(up[start:stop], down, out=out)

        return fill

    def low_rank_factors(self):
        """(α/r)·up (out, r) and down (r, in·k·k); None for the Tucker mid and DoRA."""
        if self.tucker or self.dora:
            return None
        return self._t("lora_up").flatten(1) * self.scale, self._t("lora_down").flatten(1)
