"""Whole-file tools over the engine, and the command line.

- ``merge``: merge, convert and resize adapters of any algorithm into one LoRA/LoCon by
  per-module truncated SVD of the exact strength-scaled sum;
- ``bake``: adapters baked into a checkpoint, streamed tensor by tensor;
- ``extract``: a LoCon from two checkpoints (tuned − base);
- ``svd``: rank selection, exact / randomized / factored SVD, Tucker-2;
- ``common``: inputs, argument checks, progress and report rows the tools share;
- ``cli``: ``python -m lycoris_core <command>``; the only code that sets process-wide
  state (torch's thread count, signal handlers).

Tools write only through ``io.writer`` / ``io.stream`` (temp file, verify, rename).
"""
