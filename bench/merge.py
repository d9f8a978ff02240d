"""Benchmark bake / merge / resize (a script, not a test).

    python bench/merge.py [--quick] [--workdir DIR]

* bake: SD1.5 fp16 single file (real keys and shapes, random values; --quick: the CLIP
  text encoder only) with two adapters, against the I/O floor: the same streamed read
  and write with no adapter.
* merge/resize: every module of synthetic SD1.5 adapters factored by full SVD
  (torch.linalg.svd) and by randomized SVD (torch.svd_lowrank), time and error.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lycoris_core.bake import StreamReader, StreamWriter, bake_checkpoint  # noqa: E402
from lycoris_core.keymap import state_shapes  # noqa: E402
from lycoris_core.merge import MergeInput, merge_adapters  # noqa: E402
from lycoris_core.synthetic import attention_only, default_targets, synthetic_adapter  # noqa: E402


def write_checkpoint(path, parts):
    shapes = state_shapes("sd1", "checkpoint", parts)
    w = StreamWriter(path, [(k, "F16", s) for k, s in shapes.items()], {})
    gen = torch.Generator().manual_seed(0)
    for k, s in shapes.items():
        t = torch.empty(s, dtype=torch.float16)
        if t.numel():
            t.uniform_(-0.05, 0.05, generator=gen)
        w.write(k, t)
    w.close()


def io_floor(src, dst):
    from lycoris_core.reader import read_safetensors_header

    entries, meta, _ = read_safetensors_header(src)
    order = sorted(entries, key=lambda k: entries[k]["data_offsets"][0])
    reader = StreamReader(src)
    t0 = time.perf_counter()
    w = StreamWriter(dst, [(k, entries[k]["dtype"], tuple(entries[k]["shape"])) for k in order], meta)
    for k in order:
        b, e = entries[k]["data_offsets"]
        w.write(k, reader.get(k, e - b))
    w.close()
    return time.perf_counter() - t0


def svd_compare(adapters, rank, label):
    out = {}
    for method in ("exact", "randomized", "auto"):
        t0 = time.perf_counter()
        r = merge_adapters([MergeInput(p, 0.8, 0.8) for p in adapters], None, rank_param=rank, svd=method,
                           dry_run=True, progress=lambda d, t, s: None)
        out[method] = (time.perf_counter() - t0, r)
    ex, rnd, auto = out["exact"][1], out["randomized"][1], out["auto"][1]
    worst = max((b["rel_error"] - a["rel_error"]) / max(a["rel_error"], 1e-12)
                for a, b in zip(ex.merged, rnd.merged))
    n_rand = sum(1 for r in auto.merged if r["method"] == "randomized")
    return (f"| {label} | {len(ex.merged)} | {rank} | {out['exact'][0]:.1f} | {out['randomized'][0]:.1f} | "
            f"{out['exact'][0] / out['randomized'][0]:.1f}x | {ex.total_error:.4f} | {rnd.total_error:.4f} | "
            f"{100 * (rnd.total_error / ex.total_error - 1):+.2f}% / {100 * worst:+.2f}% | "
            f"{out['auto'][0]:.1f} ({n_rand}/{len(auto.merged)} randomized) |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="text encoder checkpoint, attention modules only")
    ap.add_argument("--workdir", help="folder for the files (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lyc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")

    parts = ("te1",) if args.quick else ("unet", "te1")
    ckpt = work / ("sd15-te.safetensors" if args.quick else "sd15.safetensors")
    if not ckpt.exists():
        write_checkpoint(ckpt, parts)
    size = ckpt.stat().st_size
    select = default_targets
    ad = []
    for algo, seed in (("lora", 0), ("loha", 1)):
        p = work / f"{algo}.safetensors"
        if not p.exists():
            save_file(synthetic_adapter("sd1", algo, select=select, rank=8, dtype=torch.float16, seed=seed), str(p))
        ad.append(str(p))
    floor_path, bake_path = work / "floor.safetensors", work / "baked.safetensors"
    for p in (floor_path, bake_path):
        if p.exists():
            p.unlink()
    floor = io_floor(str(ckpt), str(floor_path))
    t0 = time.perf_counter()
    rep = bake_checkpoint(str(ckpt), [MergeInput(p, 0.8, 0.8) for p in ad], str(bake_path),
                          progress=lambda d, t, s: None)
    bake = time.perf_counter() - t0
    print("\n| checkpoint | size | tensors patched | I/O floor (s) | bake (s) | bake / floor |")
    print("|---|---|---|---|---|---|")
    print(f"| SD1.5 {'+'.join(parts)} fp16 | {size / 1e9:.2f} GB | {rep.patched} | {floor:.1f} | {bake:.1f} | "
          f"{bake / floor:.2f}x |")
    for p in (floor_path, bake_path):
        p.unlink()

    sel = attention_only if args.quick else default_targets
    tag = "attention" if args.quick else "all"
    files = {}
    for algo, rank, seed in (("lora", 32, 2), ("lora", 32, 3), ("loha", 8, 4), ("lokr", 8, 5)):
        p = work / f"svd-{algo}-{seed}.safetensors"
        if not p.exists():
            save_file(synthetic_adapter("sd1", algo, select=sel, rank=rank, dtype=torch.float32, seed=seed), str(p))
        files[(algo, seed)] = str(p)
    print("\n| job | modules | rank | full SVD (s) | randomized (s) | speed-up | error full | error randomized "
          "| extra error total / worst module | auto (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(svd_compare([files[("lora", 2)], files[("lora", 3)]], 32, f"merge 2 LoRA r32 ({tag})"))
    print(svd_compare([files[("lora", 2)]], 16, f"resize LoRA r32→16 ({tag})"))
    print(svd_compare([files[("loha", 4)]], 16, f"convert LoHa r8→LoRA 16 ({tag})"))
    print(svd_compare([files[("lokr", 5)]], 16, f"convert LoKr→LoRA 16 ({tag})"))


if __name__ == "__main__":
    main()
