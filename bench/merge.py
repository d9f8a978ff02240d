"""Benchmark bake / merge / convert / resize (a script, not a test).

    python bench/merge.py [--quick] [--rounds N] [--workdir DIR]

* bake: a real-layout SD1.5 fp16 single-file checkpoint (UNet + CLIP, ~2 GB, random
  values; --quick: the CLIP text encoder only) with a LoRA dim 32 / conv dim 16, against
  the I/O floor: the same streamed read and write (``bake.stream_copy``: reader thread,
  reused buffers, writer thread, fsync) with nothing patched.  Floor and bake run
  alternately, best of N, once with the source dropped from the page cache before each
  run (posix_fadvise DONTNEED on that file only: "cold-ish") and once warm.
* SVD: every module of synthetic SD1.5 adapters (LoRA dim 32, two LoRAs merged, LoHa dim
  16, LoKr), at target ranks 16 and 32.  "full SVD" is torch.linalg.svd; its cost depends
  on the shape only, so it is timed once per distinct shape and summed over the modules
  (timing all 354 modules x 4 jobs would take ~1 h here).  The SVD section runs on one
  torch thread (see main()).  The reference error of each
  module is the optimal (Eckart-Young) truncation error from its exact spectrum
  (float64; from the exact low-rank factors when they are smaller than the matrix,
  else from a dense SVD), cross-checked against the timed full SVDs.  randomized and
  auto are timed on every module, through lycoris_core.tools.svd.truncate as merge calls it,
  and their errors are measured on the factors they return.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lycoris_core.io.stream import StreamItem, StreamWriter, stream_copy  # noqa: E402
from lycoris_core.keymap.canonical import comfy_shapes  # noqa: E402
from lycoris_core.testing.synthetic import attention_only, default_targets, synthetic_adapter, write_checkpoint  # noqa: E402
from lycoris_core.tools.bake import BAKE_THREADS, bake_checkpoint  # noqa: E402
from lycoris_core.tools.merge import MergeInput, gather, load_inputs, merge_model, summed_delta, summed_factors  # noqa: E402
from lycoris_core.tools.svd import auto_plan, truncate  # noqa: E402

COMMAND = "python bench/merge.py"


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def io_floor(src, dst):
    """The same stream as bake (reader thread, reused buffers, writer thread, fsync), nothing patched."""
    from lycoris_core.io.reader import read_safetensors_header

    t0 = time.perf_counter()
    entries, meta, start = read_safetensors_header(src)
    order = sorted(entries, key=lambda k: entries[k]["data_offsets"][0])
    items = [StreamItem(k, entries[k]["dtype"], tuple(entries[k]["shape"]), start + entries[k]["data_offsets"][0],
                        entries[k]["data_offsets"][1] - entries[k]["data_offsets"][0], False) for k in order]
    w = StreamWriter(dst, [(k, entries[k]["dtype"], tuple(entries[k]["shape"])) for k in order], meta)
    stream_copy(src, items, w)
    w.close()
    return time.perf_counter() - t0


def bench_bake(work, ckpt, adapter, rounds):
    size = ckpt.stat().st_size
    out = {"cold": {"floor": [], "bake": []}, "warm": {"floor": [], "bake": []}}
    patched = 0
    threads = torch.get_num_threads()
    for state in ("cold", "warm"):
        for _ in range(rounds):
            for what in ("floor", "bake"):
                dst = work / f"{what}.safetensors"
                if dst.exists():
                    dst.unlink()
                os.sync()  # nothing of an earlier run is still being written back while this one is timed
                if state == "cold":
                    drop_cache(str(ckpt))
                if what == "floor":
                    out[state][what].append(io_floor(str(ckpt), str(dst)))
                else:
                    torch.set_num_threads(BAKE_THREADS)  # as the CLI runs a bake (library code leaves threads alone)
                    t0 = time.perf_counter()
                    rep = bake_checkpoint(str(ckpt), [MergeInput(adapter, 0.8, 0.8)], str(dst),
                                          progress=lambda d, t, s: None)
                    out[state][what].append(time.perf_counter() - t0)
                    torch.set_num_threads(threads)
                    patched = rep.patched
                drop_cache(str(dst))  # do not let the last output crowd the cache for the next run
                dst.unlink()
    rows = []
    for state in ("cold", "warm"):
        f, b = min(out[state]["floor"]), min(out[state]["bake"])
        rows.append((state, size, patched, f, b))
    return rows


# ---- SVD ---------------------------------------------------------------------------------------

def job_matrices(paths, strength=0.8):
    """(name, dense delta (out, in·k·k), factors or None) for every module, as merge builds them."""
    inputs = [MergeInput(p, strength, strength) for p in paths]
    adapters = load_inputs(inputs)
    groups = gather(adapters, inputs, comfy_shapes(merge_model(adapters)), [], [])
    out = []
    for key, contribs in groups.items():
        shape = tuple(contribs[0].target.shape)
        if len(shape) < 2:
            continue
        delta = summed_delta(contribs, None, shape).reshape(shape[0], -1)
        out.append((key, delta, summed_factors(contribs, shape)))
    for a in adapters:
        a.close()
    return out


def optimal_errors(m, factors, ranks):
    """Eckart-Young relative errors at each rank from the exact spectrum (float64)."""
    if factors is not None and factors[0].shape[1] < min(m.shape):
        u, v = factors[0].double(), factors[1].double()
        r1 = torch.linalg.qr(u)[1]
        r2 = torch.linalg.qr(v.T)[1]
        s = torch.linalg.svdvals(r1 @ r2.T)
    else:
        s = torch.linalg.svdvals(m.double())
    sq = s * s
    total = float(sq.sum())
    return {r: math.sqrt(max(0.0, float(sq[r:].sum())) / total) for r in ranks}, s


def full_svd_times(jobs):
    """torch.linalg.svd timed once per distinct shape (on a real module of that shape)."""
    per_shape = {}
    check = 0.0
    for mats in jobs.values():
        for _name, m, factors in mats:
            shape = tuple(m.shape)
            if shape in per_shape:
                continue
            t0 = time.perf_counter()
            s = torch.linalg.svd(m, full_matrices=False)[1]
            per_shape[shape] = time.perf_counter() - t0
            _errs, s_ref = optimal_errors(m, factors, [1])
            n = min(len(s), len(s_ref))
            check = max(check, float((s[:n].double() - s_ref[:n]).abs().max() / s_ref[0]))
    return per_shape, check


def svd_rows(label, mats, ranks, per_shape):
    counts = Counter(tuple(m.shape) for _n, m, _f in mats)
    full_time = sum(per_shape[s] * n for s, n in counts.items())
    rows = []
    refs = [optimal_errors(m, f, ranks)[0] for _n, m, f in mats]
    for r in ranks:
        res = {}
        for method in ("randomized", "auto"):
            t0 = time.perf_counter()
            outs = [truncate(m, "fixed", r, method, factors=f) for _n, m, f in mats]
            res[method] = (time.perf_counter() - t0, outs)
        sq_tot = [float(m.double().norm() ** 2) for _n, m, _f in mats]
        tot = sum(sq_tot)

        def total_err(errs, sq_tot=sq_tot, tot=tot):
            return math.sqrt(sum(e * e * t for e, t in zip(errs, sq_tot)) / tot)

        ex = total_err([ref[r] for ref in refs])
        row = {"label": label, "modules": len(mats), "rank": r, "full": full_time, "ex": ex}
        for method, (secs, outs) in res.items():
            errs = [o.rel_error for o in outs]
            worst = max((e - ref[r]) / max(ref[r], 1e-12) if ref[r] > 1e-6 else 0.0
                        for e, ref in zip(errs, refs))
            row[method] = (secs, total_err(errs), worst)
        methods = Counter(o.method + (" fallback" if o.fallback else "") for o in res["auto"][1])
        row["auto_methods"] = ", ".join(f"{n} {k}" for k, n in sorted(methods.items()))
        plans = Counter(auto_plan(m.shape, "fixed", r, None, f[0].shape[1] if f is not None else None)
                        for _n, m, f in mats)
        row["plans"] = plans
        rows.append(row)
    return rows


def extra(err, ref):
    """Relative extra error in %, or the absolute error when the optimum is (numerically) zero."""
    return f"{100 * (err / ref - 1):+.2f}%" if ref > 1e-6 else f"abs {err:.1e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="text encoder checkpoint, attention modules only")
    ap.add_argument("--rounds", type=int, default=3, help="floor/bake runs per cache state (best of N)")
    ap.add_argument("--workdir", help="folder for the files (default: a temp dir)")
    ap.add_argument("--skip-bake", action="store_true")
    ap.add_argument("--skip-svd", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lyc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    command = COMMAND + (" --quick" if args.quick else "")
    print(f"command: {command}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")

    if not args.skip_bake:
        parts = ("te1",) if args.quick else ("unet", "te1")
        ckpt = work / ("sd15-te.safetensors" if args.quick else "sd15.safetensors")
        if not ckpt.exists():
            write_checkpoint(ckpt, "sd1", parts)
        lora = work / "bake-lora32.safetensors"
        if not lora.exists():
            save_file(synthetic_adapter("sd1", "lora", rank=32, conv_rank=16, dtype=torch.float16, seed=0), str(lora))
        rows = bench_bake(work, ckpt, str(lora), args.rounds)
        print("\n| checkpoint | cache | size | tensors patched | I/O floor (s) | bake (s) | bake / floor |")
        print("|---|---|---|---|---|---|---|")
        for state, size, patched, f, b in rows:
            print(f"| SD1.5 {'+'.join(parts)} fp16, LoRA dim 32 / conv 16 | {state} | {size / 1e9:.2f} GB | "
                  f"{patched} | {f:.2f} | {b:.2f} | {b / f:.2f}x |")

    if not args.skip_svd:
        sel = attention_only if args.quick else default_targets
        tag = "attention" if args.quick else "all"
        specs = {"lora32-a": ("lora", 32, 2), "lora32-b": ("lora", 32, 3), "loha16": ("loha", 16, 4),
                 "lokr": ("lokr", 8, 5)}
        files = {}
        for name, (algo, rank, seed) in specs.items():
            p = work / f"svd-{name}.safetensors"
            if not p.exists():
                conv = 16 if algo == "lora" else None
                save_file(synthetic_adapter("sd1", algo, select=sel, rank=rank, conv_rank=conv, dtype=torch.float16,
                                            seed=seed), str(p))
            files[name] = str(p)
        jobs = {
            f"resize LoRA dim 32 ({tag})": [files["lora32-a"]],
            f"merge 2 LoRA dim 32 ({tag})": [files["lora32-a"], files["lora32-b"]],
            f"convert LoHa dim 16 ({tag})": [files["loha16"]],
            f"convert LoKr ({tag})": [files["lokr"]],
        }
        # one torch thread: on 2 shared cores, 2 OpenMP threads make LAPACK/BLAS calls 2-200x
        # slower whenever another process is busy; one thread keeps every solver's timing stable
        torch.set_num_threads(1)
        mats = {label: job_matrices(paths) for label, paths in jobs.items()}
        per_shape, check = full_svd_times(mats)
        print(f"\nfull SVD timed on {len(per_shape)} distinct shapes; largest singular-value gap to the "
              f"reference spectrum {check:.1e} (relative to sigma_1)")
        print("\n| job | modules | rank | full SVD (s) | randomized (s) | speed-up | auto (s) | speed-up "
              "| error optimal | error randomized | extra error total / worst module | error auto "
              "| extra (auto) total / worst | auto used |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for label, m in mats.items():
            for row in svd_rows(label, m, (16, 32), per_shape):
                rs, re, rw = row["randomized"]
                a_s, ae, aw = row["auto"]
                ex = row["ex"]
                print(f"| {label} | {row['modules']} | {row['rank']} | {row['full']:.1f} | {rs:.1f} | "
                      f"{row['full'] / rs:.1f}x | {a_s:.1f} | {row['full'] / a_s:.1f}x | {ex:.4f} | {re:.4f} | "
                      f"{extra(re, ex)} / {100 * rw:+.2f}% | {ae:.4f} | "
                      f"{extra(ae, ex)} / {100 * aw:+.2f}% | {row['auto_methods']} |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s; command: {command}")


if __name__ == "__main__":
    main()
