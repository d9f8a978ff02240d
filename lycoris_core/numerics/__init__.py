"""Numerics shared by the algorithms and the patch engine: tiles, range checks, one rounding.

Owns *how* float32 deltas are built and written back, per device: the row-tile policy
(``tiles``), the one on-device check that a result is finite and fits its dtype
(``checks``), and the single rounding into a weight's dtype, with seeded stochastic
rounding for fp8 drawn on the weight's own device (``rounding``).

It knows no adapter, file or model. Everything else in ``lycoris_core`` may import it;
it imports nothing from the rest of the package but ``errors``.
"""
