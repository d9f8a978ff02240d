"""LoRA / LoCon: ΔW = (α/r)·up·down, with the Tucker mid for k×k convs and DyLoRA's 2-D conv up.

Reference::

    up, down = up.flatten(1), down.flatten(1)                 # (out, r), (r, in·k…)
    delta = scale * (up @ down)                               # plain
    delta = scale * einsum("ij…,pi,jr->pr…", mid, up, down)   # Tucker
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import AdapterModule


class LoRA(AdapterModule):
    algo = "lora"
    suffixes = {
        # kohya and LyCORIS
        ".lora_down.weight": "lora_down",
        ".lora_up.weight": "lora_up",
        ".lora_mid.weight": "lora_mid",
        # PEFT, diffusers and other trainers
        ".lora_A.weight": "lora_down",
        ".lora_B.weight": "lora_up",
        ".lora_A.default.weight": "lora_down",
        ".lora_B.default.weight": "lora_up",
        ".lora.down.weight": "lora_down",
        ".lora.up.weight": "lora_up",
        "_lora.down.weight": "lora_down",  # old diffusers attn processors: <...>.to_q_lora.down.weight
        "_lora.up.weight": "lora_up",
        ".lora_linear_layer.down.weight": "lora_down",
        ".lora_linear_layer.up.weight": "lora_up",
        ".down.weight": "lora_down",  # XLabs Flux processors: <...>.processor.qkv_lora1.down.weight
        ".up.weight": "lora_up",
        ".lora_A": "lora_down",
        ".lora_B": "lora_up",
    }
    required = ("lora_up", "lora_down")
    supports_dora = True
    optional = ("lora_mid",)

    def _validate(self) -> None:
        up, down = self._shape("lora_up"), self._shape("lora_down")
        if len(up) < 2 or len(down) < 2:
            raise self._fail(f"lora factors must be at least 2-D, got up {up} and down {down}", "lora_up")
        rank = down[0]
        up_rank = math.prod(up[1:])
        if self._has("lora_mid"):
            mid = self._shape("lora_mid")
            if len(mid) < 3 or mid[0] != up_rank or mid[1] != rank or math.prod(down[2:]) != 1:
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
        if len(kernel) and math.prod(kernel) > 1:
            self.algo = "locon"

    def _factors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale·up, down) flattened so that delta rows are rows of their product."""
        # the scale goes into the smallest factor: no extra pass over the full-size delta
        up = self._t("lora_up", device).flatten(1) * self.scale
        down = self._t("lora_down", device).flatten(1)
        if self.tucker:
            # mid (rank_up, rank_down, k...) joined with down once: (rank_up, in·k...), then rows of up @ it
            down = torch.einsum("ab...,bi->ai...", self._t("lora_mid", device), down).flatten(1)
        return up, down

    def row_fill(self, device=None):
        up, down = self._factors(device)

        def fill(start, stop, out):
            torch.mm(up[start:stop], down, out=out)

        return fill

    def reference_delta(self, weight=None):
        up, down = self._t("lora_up").flatten(1).double(), self._t("lora_down").flatten(1).double()
        if self.tucker:  # LyCORIS's rebuild: mid ×₁ up ×₂ down
            return self.scale * torch.einsum("ij...,pi,jr->pr...", self._t("lora_mid").double(), up, down)
        return (self.scale * (up @ down)).reshape(self.shape)

    def low_rank_factors(self):
        """(α/r)·up (out, r) and down (r, in·k·k); None for the Tucker mid and DoRA."""
        if self.tucker or self.dora:
            return None
        return self._factors()

    # ---- kohya split_qkv (sd-scripts#2204) ----------------------------------------------------
    def kohya_split(self, row_splits: Sequence[int]) -> int:
        """n when this LoRA is n rank-r LoRAs re-fused along ``row_splits``, else 0.

        sd-scripts' ``split_qkv`` trains q, k, v (and linear1's MLP part) as separate LoRAs
        and saves them fused: ``lora_down`` is the n downs stacked (n*r rows), ``lora_up``
        is block diagonal (rows of part j only in columns j*r..(j+1)*r), and the alpha is
        the split LoRAs' own. Only that exact structure counts; reads ``lora_up``.
        """
        n = len(row_splits)
        if n < 2 or self.tucker or self.dora or not self.rank or self.rank % n:
            return 0
        if self.shape[0] != sum(row_splits):
            return 0
        r = self.rank // n
        up = self._t("lora_up").flatten(1)
        start = 0
        for j, rows in enumerate(row_splits):
            part = up[start : start + rows]
            if torch.count_nonzero(part[:, : j * r]) or torch.count_nonzero(part[:, (j + 1) * r :]):
                return 0
            start += rows
        return n

    def use_split_scale(self, n: int) -> None:
        """Apply the trained scale alpha / (rank / n) of a kohya split_qkv module (idempotent)."""
        if self.alpha:
            self.scale = self.alpha * n / self.rank
        self.split = n
