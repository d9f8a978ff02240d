"""Command line: ``python -m lycoris_core <command> --help``.

Each command is a thin wrapper over the engine; errors the engine raises on
purpose are printed as one line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import LycorisError


def _inspect(args) -> int:
    from .adapter import load_adapter
    from .inspect import summary_lines

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
    from .demo import write_demo_files

    for path in write_demo_files(args.folder, overwrite=args.overwrite):
        print(path)
    return 0


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except LycorisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
