"""Command line: ``python -m lycoris_core <command> --help``.

Each command is a thin wrapper over the engine; errors the engine raises on
purpose are printed as one line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys

import torch

from ..adapter import load_adapter
from ..adapter.describe import summary_lines
from ..errors import LycorisError
from ..testing.demo import write_demo_files
from .bake import BAKE_THREADS, bake_checkpoint
from .common import MergeError, MergeInput
from .extract import extract_adapter
from .inflate import inflate_adapter
from .merge import convert_adapter, merge_adapters, resize_adapter

ADAPTER_HELP = ("adapter file, optionally with strengths: PATH@UNET[,CLIP] (e.g. a.safetensors@0.8,1); "
                "repeat for several")
BLOCKS_HELP = ("block weights for the adapters in order (preset, 17/26/12/20-value SD vector, one value per slot "
               "of a DiT's table such as Flux's 61, or a named form like 'IN=0,OUT=1' or 'double=0.5,t5=0'); "
               "repeat once per adapter, '-' for none")


def _inspect(args) -> int:
    for i, path in enumerate(args.files):
        adapter = load_adapter(path, allow_pickle=args.allow_pickle)
        if i:
            print()
        print("\n".join(summary_lines(adapter, all_metadata=args.all_metadata)))
        if args.modules:
            for name, module in sorted(adapter.modules.items()):
                print(f"  {name}: {module.describe()} rank={module.rank} alpha={module.alpha} shape={module.shape}")
    return 0


def _demo(args) -> int:
    for path in write_demo_files(args.folder, overwrite=args.overwrite):
        print(path)
    return 0


def _inputs(args):
    blocks = list(args.blocks or [])
    if len(blocks) > len(args.adapter):
        raise MergeError(f"{len(blocks)} --blocks for {len(args.adapter)} adapters")
    out = []
    for i, spec in enumerate(args.adapter):
        path, sep, strengths = spec.rpartition("@")
        if not sep:
            path, strengths = spec, ""
        unet = clip = 1.0
        if strengths:
            try:
                values = [float(v) for v in strengths.split(",")]
            except ValueError:
                raise MergeError(f"bad strengths {strengths!r} in {spec!r}; use PATH@UNET[,CLIP]") from None
            if len(values) > 2:
                raise MergeError(f"too many strengths in {spec!r}; use PATH@UNET[,CLIP]")
            unet = values[0]
            clip = values[1] if len(values) == 2 else values[0]
        block = blocks[i] if i < len(blocks) and blocks[i] not in ("-", "") else None
        out.append(MergeInput(path, unet, clip, block))
    return out


def _rank_kwargs(args) -> dict:
    param = args.rank if args.mode == "fixed" else args.param
    if param is None:
        raise MergeError(f"--mode {args.mode} needs --param")
    return {"rank_mode": args.mode, "rank_param": param, "conv_tucker": args.tucker, "svd": args.svd}


def _finish(report, args) -> int:
    text = report.to_text()
    if not args.verbose and not args.dry_run:
        lines = text.splitlines()
        if len(lines) > 12:
            text = "\n".join(lines[:2] + ["  ... (per-module rows: pass --verbose or --dry-run)"] + lines[-2:])
    print(text)
    return 0


def _merge(args) -> int:
    report = merge_adapters(_inputs(args), args.output, **_rank_kwargs(args), base=args.base,
                            dry_run=args.dry_run, overwrite=args.overwrite, save_dtype=args.save_dtype)
    return _finish(report, args)


def _convert(args, tool) -> int:
    report = tool(args.input, args.output, **_rank_kwargs(args), base=args.base, dry_run=args.dry_run,
                  overwrite=args.overwrite, save_dtype=args.save_dtype)
    return _finish(report, args)


def _bake(args) -> int:
    report = bake_checkpoint(args.checkpoint, _inputs(args), args.output, dtype=args.dtype,
                             dry_run=args.dry_run, overwrite=args.overwrite, allow_partial=args.allow_partial)
    return _finish(report, args)


def _extract(args) -> int:
    kwargs = _rank_kwargs(args)
    kwargs["conv_rank_param"] = args.conv_rank if args.mode == "fixed" else args.conv_param
    report = extract_adapter(args.base, args.tuned, args.output, **kwargs, min_diff=args.min_diff,
                             dry_run=args.dry_run, overwrite=args.overwrite, save_dtype=args.save_dtype)
    return _finish(report, args)


def _inflate(args) -> int:
    report = inflate_adapter(args.input, args.output, depth=args.depth, base=args.base, overwrite=args.overwrite,
                             dry_run=args.dry_run)
    print(report.to_text())
    return 0


def _write_options(p, threads_default: int | None = None) -> None:
    p.add_argument("-o", "--output", help="output .safetensors (not needed with --dry-run)")
    p.add_argument("--threads", type=int, default=threads_default,
                   help="torch threads for this run (default: "
                        + (f"{threads_default}, the I/O threads need the other cores)" if threads_default
                           else "torch's own)"))
    p.add_argument("--dry-run", action="store_true", help="print the per-module report; write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("-v", "--verbose", action="store_true", help="print every per-module row")


def _rank_options(p, save_default: str = "fp32") -> None:
    p.add_argument("--mode", choices=("fixed", "ratio", "energy", "threshold"), default="fixed",
                   help="rank selection: fixed rank; ratio: keep σ > PARAM·σ_max; energy: smallest rank "
                        "keeping PARAM of Σσ² (LyCORIS 'quantile'); threshold: keep σ > PARAM")
    p.add_argument("--rank", type=int, default=16, help="rank for --mode fixed (default 16)")
    p.add_argument("--param", type=float, help="ratio / energy fraction / threshold for the other modes")
    p.add_argument("--tucker", action="store_true",
                   help="k×k convs as Tucker (lora_mid, via Tucker-2/HOSVD) instead of plain LoCon")
    p.add_argument("--svd", choices=("auto", "exact", "randomized"), default="auto",
                   help="exact: torch.linalg.svd; randomized: torch.svd_lowrank; auto (default): randomized "
                        "when its error is certified within 1%% of the exact truncation error, else exact")
    p.add_argument("--save-dtype", choices=("fp32", "fp16", "bf16"), default=save_default,
                   help=f"dtype of the written factors (default {save_default}); errors are measured after it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lycoris_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="summarise adapter files: algorithms, ranks, alpha, metadata, unknown keys")
    p.add_argument("files", nargs="+", help=".safetensors adapter files")
    p.add_argument("--modules", action="store_true", help="list every module")
    p.add_argument("--all-metadata", action="store_true", help="print every metadata field")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read .pt/.ckpt/.bin files with torch.load(weights_only=True)")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("demo", help="write small demo adapters (LoRA, LoHa, LoKr) into a folder")
    p.add_argument("folder", nargs="?", default="demo", help="output folder (default: ./demo)")
    p.add_argument("--overwrite", action="store_true", help="replace demo files that already exist")
    p.set_defaults(run=_demo)

    p = sub.add_parser("bake", help="bake adapters into a checkpoint or diffusion-model file (streamed)",
                       description="Write CHECKPOINT with the adapters applied to a new .safetensors file with the "
                                   "same keys. Reads and writes one tensor at a time; the recipe goes in the metadata.")
    p.add_argument("checkpoint", help="an SD1/SD2/SDXL single-file checkpoint, or a DiT (Flux, SD3.5, Wan, ...) "
                                      "diffusion-model-only file (as UNETLoader reads it) or single-file checkpoint")
    p.add_argument("-a", "--adapter", action="append", required=True, help=ADAPTER_HELP)
    p.add_argument("--blocks", action="append", help=BLOCKS_HELP)
    p.add_argument("--dtype", choices=("keep", "fp16", "bf16", "fp32"), default="keep",
                   help="output dtype of floating tensors (default: keep each tensor's)")
    p.add_argument("--allow-partial", action="store_true", help="bake the modules that fit when some do not")
    _write_options(p, threads_default=BAKE_THREADS)
    p.set_defaults(run=_bake)

    p = sub.add_parser("merge", help="merge adapters of any algorithm into one LoRA/LoCon by SVD",
                       description="Sum s·ΔW of every adapter per layer (exact, no strength²) and factor it "
                                   "by truncated SVD. Output: kohya names, alpha = rank (scale 1).")
    p.add_argument("-a", "--adapter", action="append", required=True, help=ADAPTER_HELP)
    p.add_argument("--blocks", action="append", help=BLOCKS_HELP)
    p.add_argument("--base", help="base checkpoint, needed by IA3/GLoRA/OFT/BOFT/DoRA modules")
    _rank_options(p)
    _write_options(p)
    p.set_defaults(run=_merge)

    for name, text, tool in (
        ("convert", "convert one adapter (LoHa, LoKr, LoCon-Tucker, ...) to LoRA/LoCon", convert_adapter),
        ("resize", "shrink an adapter's rank by truncated SVD", resize_adapter),
    ):
        p = sub.add_parser(name, help=text, description=text + ". A merge of a single adapter.")
        p.add_argument("input", help="adapter file")
        p.add_argument("--base", help="base checkpoint, needed by IA3/GLoRA/OFT/BOFT/DoRA modules")
        _rank_options(p)
        _write_options(p)
        p.set_defaults(run=lambda args, _tool=tool: _convert(args, _tool))

    p = sub.add_parser("extract", help="extract a LoCon adapter from two model files (tuned - base)",
                       description="Factor tuned − base per diffusion-model/text-encoder layer by truncated SVD; "
                                   "both files are read tensor by tensor.")
    p.add_argument("base", help="base model: an SD single-file checkpoint, or a DiT diffusion-model file or checkpoint")
    p.add_argument("tuned", help="fine-tuned model of the same architecture (either key layout)")
    _rank_options(p, save_default="fp16")
    p.add_argument("--conv-rank", type=int, help="rank for k×k convs with --mode fixed (default: --rank)")
    p.add_argument("--conv-param", type=float, help="mode parameter for k×k convs (default: --param)")
    p.add_argument("--min-diff", type=float, default=0.0, help="skip layers whose max |ΔW| is at most this")
    _write_options(p)
    p.set_defaults(run=_extract)

    p = sub.add_parser("inflate", help="turn a 2-D conv adapter into its 3-D counterpart (centre-slice embedding)",
                       description="Each k×k conv factor becomes D×k×k with the 2-D kernel at the centre depth slice "
                                   "and zeros elsewhere: with depth padding D//2 the 3-D conv equals the 2-D one per slice.")
    p.add_argument("input", help="adapter file (LoRA/LoCon, Tucker LoCon, LoHa, LoKr, full, (IA)3; DoRA too)")
    p.add_argument("--depth", type=int, help="odd size of the new kernel axis (default: each kernel's height)")
    p.add_argument("--base", help="the 2-D base checkpoint: gives the kernels of LoHa/LoKr convs, which files store "
                                  "flattened (SD1/SD2/SDXL names are found without it)")
    _write_options(p)
    p.set_defaults(run=_inflate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "output", "x") is None and not getattr(args, "dry_run", False):
        print("error: -o/--output is required unless --dry-run is given", file=sys.stderr)
        return 2
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)  # the CLI owns its process: thread policy lives here
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args)
    except LycorisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    """SIGTERM unwinds like Ctrl-C, so half-written temp files are removed before exit."""
    raise KeyboardInterrupt
