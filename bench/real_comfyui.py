"""Patch benchmark against the real ComfyUI: its own LoRA loader and ModelPatcher beside our nodes.

    COMFYUI_PYTHON=/path/to/ComfyUI/python python bench/real_comfyui.py            # ../ComfyUI or COMFYUI_PATH
    python bench/real_comfyui.py --algos "LoRA dim8/conv4" --runs 2 --allocator steady
    python bench/real_comfyui.py --from-json /tmp/w/results-*.json    # re-render earlier runs
    python bench/real_comfyui.py --write-docs      # replace the "Real ComfyUI" section of docs/benchmarks.md

Both paths run in one ComfyUI process on the same model and the same adapter file, with
ComfyUI on the CPU (``--cpu``), runs interleaved (the order alternates every run):

* **ComfyUI**: its ``LoraLoader`` node (``load_torch_file`` + ``load_lora_for_models``), then
  ``comfy.model_management.load_models_gpu`` on the UNet and CLIP, which patches every key
  through ``ModelPatcher.patch_weight_to_device`` as sampling does;
* **ours**: this project's ``LycorisLoader`` node, then the same ``load_models_gpu``.

Each run of each path measures, in this order, what a user trying adapters meets:
**cold** (first use of the file: our file and delta caches emptied, a new ComfyUI
``LoraLoader``), **strength change** (the node again at another strength while the first
patch is loaded, and the patch, which unpatches the old clone first), **warm** (everything
unloaded, the node at strength 1 again: the file is cached by both loaders) and
**unload** (``unload_all_models``: the exact restore).  Peak anonymous RSS of each run is
measured above its start (``bench/patch.py``'s ``PeakRSS``, polled from a child process).  The time inside the patch is split
by timers around ComfyUI's own functions (file read, key mapping, the float32 working
copy, ``calculate_weight``, the cast back); "bookkeeping" is the rest of ``load_models_gpu``.

Each set of runs is made twice, in two ComfyUI processes (``--allocator both``): once with
glibc's malloc as ComfyUI runs by default, where a float32 working copy may land in fresh
pages (page faults: seconds per model on a VM, and the run-to-run spread), and once with big
blocks kept in the heap, the steady state with no page faults, which shows the arithmetic.

The model is a random-weight SD1.5 single file with the real layout (UNet + CLIP-L, fp16;
ComfyUI keeps it in float32 on the CPU).  Adapters are synthetic, in kohya naming and
LyCORIS's layout, on every UNet and CLIP target (attention, feed-forward, resnet convs),
at the small ranks LyCORIS users train and at the larger ones of ``bench/patch.py``.
Without a ComfyUI checkout use ``bench/patch.py``, whose reference is an in-process
stand-in for ComfyUI's arithmetic (labelled so in its table).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

# name -> (synthetic algorithm, options); the first three are the kind users download
CASES = {
    "LoRA dim8/conv4": ("lora", dict(rank=8, conv_rank=4)),
    "LoHa dim4/conv4": ("loha", dict(rank=4, conv_rank=4)),
    "LoKr dim8/conv4": ("lokr", dict(rank=8, conv_rank=4)),
    "LoRA dim32/conv16": ("lora", dict(rank=32, conv_rank=16)),
    "LoHa dim16": ("loha", dict(rank=16)),
    "LoKr factor 8, full w2": ("lokr", dict(rank=8, factor=8, full_w2=True)),
    "DoRA dim32": ("dora", dict(rank=32, conv_rank=16)),
}
# the docs table: the LyCORIS-user kind, then the sizes of bench/patch.py (~10 minutes for both allocators)
DEFAULT = ["LoRA dim8/conv4", "LoHa dim4/conv4", "LoKr dim8/conv4", "LoRA dim32/conv16", "LoHa dim16", "DoRA dim32"]
PHASES = ("cold", "strength", "warm", "unload")


def find_comfyui(given: str | None) -> Path | None:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from real_comfyui import find_comfyui as find
        from real_comfyui import is_checkout
    finally:
        sys.path.pop(0)
    if given:
        return Path(given).resolve() if is_checkout(Path(given)) else None
    return find()


def peak_rss():
    """bench/patch.py's PeakRSS: anonymous RSS polled from a child process, above its start."""
    spec = importlib.util.spec_from_file_location("lycoris_bench_patch", ROOT / "bench" / "patch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PeakRSS


class Timers:
    """Seconds spent inside wrapped functions (outermost call only), per label."""

    def __init__(self):
        self.totals = defaultdict(float)
        self._depth = defaultdict(int)

    def wrap(self, owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            self._depth[label] += 1
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._depth[label] -= 1
                if not self._depth[label]:
                    self.totals[label] += time.perf_counter() - t0

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        out, self.totals = dict(self.totals), defaultdict(float)
        return out


def comfy_setup(comfyui: Path):
    """Import ComfyUI on the CPU with its own argument parser, and this project as a custom node."""
    sys.path.insert(0, str(comfyui))
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu", "--disable-all-custom-nodes"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses --cpu now)
        import comfy.float
        import comfy.lora
        import comfy.model_management
        import comfy.model_patcher
        import comfy.sd
        import comfy.utils
        import folder_paths

        import nodes as comfy_nodes
    finally:
        sys.argv = argv
    spec = importlib.util.spec_from_file_location("comfyui_lycoris", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    ours = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_lycoris"] = ours
    spec.loader.exec_module(ours)
    return comfy_nodes, folder_paths, ours


def comfy_commit(comfyui: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(comfyui), "rev-parse", "--short=8", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", help="ComfyUI checkout (default: COMFYUI_PATH or ../ComfyUI)")
    ap.add_argument("--algos", default=",".join(DEFAULT), help=f"comma list of: {', '.join(CASES)}")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", help="keep the generated checkpoint and adapters here between runs")
    ap.add_argument("--allocator", choices=["default", "steady", "both"], default="both",
                    help="glibc malloc as ComfyUI runs by default, and/or with big blocks kept in the heap "
                         "(no page faults on ComfyUI's float32 copies: the steady state)")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--from-json", nargs="+", help="render the tables from results-*.json of earlier runs")
    ap.add_argument("--results", help=argparse.SUPPRESS)  # the child's output file
    ap.add_argument("--mode", default="default", help=argparse.SUPPRESS)  # the child's allocator mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # runs inside ComfyUI's Python
    ap.add_argument("--check", action="store_true",
                    help="only check that both paths give bit-identical weights (UNet and CLIP)")
    args = ap.parse_args(argv)
    if args.from_json:
        return render([Path(p) for p in args.from_json], args.write_docs)
    names = [n.strip() for n in args.algos.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")

    comfyui = find_comfyui(args.comfyui)
    if comfyui is None:
        print("no ComfyUI checkout found (COMFYUI_PATH, --comfyui or ../ComfyUI); "
              "bench/patch.py measures against an in-process stand-in instead", file=sys.stderr)
        return 2
    if not args.child:
        # one ComfyUI process per allocator mode, in ComfyUI's own environment (COMFYUI_PYTHON)
        work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lyc_comfy_"))
        python = os.environ.get("COMFYUI_PYTHON") or sys.executable
        base = [python, __file__, "--child", "--comfyui", str(comfyui), "--algos", ",".join(names),
                "--runs", str(args.runs), "--workdir", str(work)]
        try:
            if args.check:
                return subprocess.call(base + ["--check"])
            outputs = []
            for mode in (["default", "steady"] if args.allocator == "both" else [args.allocator]):
                env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
                if mode == "steady":
                    env.update(MALLOC_MMAP_THRESHOLD_=str(256 << 20), MALLOC_TRIM_THRESHOLD_=str(8 << 30))
                out = work / f"results-{mode}.json"
                print(f"== allocator: {mode}", flush=True)
                if subprocess.call(base + ["--results", str(out), "--mode", mode], env=env) != 0:
                    return 1
                outputs.append(out)
            return render(outputs, args.write_docs)
        finally:
            if not args.workdir:  # the 2 GB checkpoint and the adapters were only for this run
                shutil.rmtree(work, ignore_errors=True)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lyc_comfy_"))
    (work / "loras").mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    from lycoris_core.testing.synthetic import synthetic_adapter, write_checkpoint

    ckpt = work / "sd15_random.safetensors"
    if not ckpt.exists():
        print("writing a random-weight SD1.5 checkpoint ...", flush=True)
        write_checkpoint(ckpt, "sd1", ("unet", "te1"))
    files = {}
    for i, name in enumerate(names):
        algo, options = CASES[name]
        fname = name.replace("/", "_").replace(" ", "_").replace(",", "") + ".safetensors"
        if not (work / "loras" / fname).exists():
            save_file(synthetic_adapter("sd1", algo, seed=10 + i, **options), str(work / "loras" / fname))
        files[name] = fname

    comfy_nodes, folder_paths, ours = comfy_setup(comfyui)
    import comfy.float
    import comfy.lora
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    glue = sys.modules["comfyui_lycoris.nodes.glue"]
    folder_paths.add_model_folder_path("loras", str(work / "loras"), is_default=True)

    timers = Timers()
    PeakRSS = peak_rss()  # noqa: N806  (a class)
    timers.wrap(comfy.utils, "load_torch_file", "read file")
    timers.wrap(glue, "load", "read file")
    timers.wrap(comfy.sd, "load_lora_for_models", "map keys")
    timers.wrap(glue, "build_plan", "map keys")
    timers.wrap(mm, "cast_to_device", "float32 copy")
    timers.wrap(comfy.lora, "calculate_weight", "delta + add")
    timers.wrap(comfy.float, "stochastic_rounding", "cast back")
    timers.wrap(mm, "load_models_gpu", "patch (total)")
    timers.wrap(mm, "unload_all_models", "unload (total)")

    model, clip, *_ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=True)
    print(f"ComfyUI {comfy_commit(comfyui)} at {comfyui}; UNet {next(model.model.parameters()).dtype}, "
          f"{torch.get_num_threads()} threads", flush=True)

    def ours_path(strength, cold):
        if cold:
            glue.ADAPTERS.clear()
            glue.DELTAS.clear()
        out = ours.NODE_CLASS_MAPPINGS["LycorisLoader"]().apply(model, clip, files[name], strength, strength)
        return (out["result"] if isinstance(out, dict) else out)[:2]

    comfy_loader = {}

    def comfy_path(strength, cold):
        if cold:
            comfy_loader["node"] = comfy_nodes.LoraLoader()
        return comfy_loader["node"].load_lora(model, clip, files[name], strength, strength)

    def patch(m, c):
        mm.load_models_gpu([m, c.patcher], force_full_load=True)

    if args.check:
        for name in names:
            same = check_same_weights(model, clip, lambda s: comfy_path(s, True), lambda s: ours_path(s, True),
                                      patch, mm)
            print(f"{name}: ComfyUI and ours give {'the same' if same[0] else 'DIFFERENT'} weights "
                  f"({same[1]} keys compared, strength 1)", flush=True)
        return 0

    # one untimed patch first: the process's allocator then holds pages for the float32
    # working copies, as in a ComfyUI that has run before (else the first case pays the page faults)
    name = names[0]
    patch(*comfy_path(1.0, True))
    mm.unload_all_models()
    timers.take()

    keys = {}
    results = defaultdict(lambda: defaultdict(list))  # (case, path) -> phase -> [(seconds, breakdown, peak)]
    for name in names:
        for run in range(args.runs):
            order = [("ComfyUI", comfy_path), ("ours", ours_path)]
            if run % 2:
                order.reverse()
            for label, path in order:
                mm.unload_all_models()
                gc.collect()
                timers.take()
                phases = {}
                with PeakRSS() as peak:
                    for phase, strength, cold in (("cold", 1.0, True), ("strength", 0.5, False),
                                                  ("warm", 1.0, False)):
                        if phase == "warm":
                            mm.unload_all_models()
                            timers.take()
                        t0 = time.perf_counter()
                        m, c = path(strength, cold)
                        keys[(name, label)] = len(m.patches) + len(c.patcher.patches)
                        patch(m, c)
                        phases[phase] = (time.perf_counter() - t0, timers.take())
                        del m, c
                    t0 = time.perf_counter()
                    mm.unload_all_models()
                    phases["unload"] = (time.perf_counter() - t0, timers.take())
                for phase, (seconds, parts) in phases.items():
                    results[(name, label)][phase].append((seconds, parts, peak.above_start))
                print(f"{name:24s} run {run + 1} {label:8s} {keys[(name, label)]} keys " +
                      "  ".join(f"{p} {phases[p][0]:6.2f}s" for p in PHASES) +
                      f"  peak +{peak.above_start / 2**20:,.0f} MiB", flush=True)
    glue.DELTAS.clear()
    glue.ADAPTERS.clear()

    env = (f"ComfyUI {comfy_commit(comfyui)}, torch {torch.__version__}, {platform.machine()}, "
           f"{os.cpu_count()} cores, {torch.get_num_threads()} threads")
    save_results(Path(args.results), names, results, keys, args.runs, env, args.mode)
    return 0


def render(paths: list[Path], write: bool) -> int:
    """Print (and with ``write`` put into docs/benchmarks.md) the tables of each allocator mode."""
    blocks = []
    for path in paths:
        names, results, keys, runs, env, mode = load_results(path)
        title = {"default": "glibc malloc as ComfyUI runs by default",
                 "steady": "big blocks kept in the heap (`MALLOC_MMAP_THRESHOLD_=256MiB`, "
                           "`MALLOC_TRIM_THRESHOLD_=8GiB`): no page faults on the float32 copies"}[mode]
        blocks.append(f"### Allocator: {title}\n\n" + format_tables(names, results, keys, runs, env))
    body = "\n\n".join(blocks)
    print(body)
    if write:
        write_docs(body)
    return 0


def write_docs(body: str) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from patch import write_docs_section

    write_docs_section("Real ComfyUI", body)


def check_same_weights(model, clip, comfy_path, ours_path, patch, mm) -> tuple[bool, int]:
    """Patch with each path at one strength; compare every weight's bits (as int64 checksums of
    the raw bits, whole and strided, so two full copies of the model never sit in memory)."""
    import torch

    def digests(strength, path):
        m, c = path(strength)
        patch(m, c)
        out = {}
        for prefix, module in (("unet.", m.model), ("clip.", c.patcher.model)):
            for k, t in module.state_dict().items():
                bits = t.detach().contiguous().view(-1).view(torch.int32 if t.element_size() == 4 else torch.int16)
                out[prefix + k] = (int(bits.to(torch.int64).sum()), int(bits[::7].to(torch.int64).square().sum()))
        mm.unload_all_models()
        return out

    a, b = digests(1.0, comfy_path), digests(1.0, ours_path)
    return a == b, len(a)


def format_tables(names, results, keys, runs, env) -> str:
    """The docs tables: times and ratios, then where the time goes, from the runs' medians."""
    def med(name, label, phase, part=None):
        samples = results[(name, label)][phase]
        if part is None:
            return statistics.median([s for s, _, _ in samples])
        return statistics.median([p.get(part, 0.0) for _, p, _ in samples])

    lines = [
        f"Made by `COMFYUI_PYTHON=<ComfyUI's python> python bench/real_comfyui.py --write-docs` — {env}; "
        f"median of {runs} interleaved runs, seconds; × = ComfyUI / ours (goal: ≥2× cold and warm, "
        "≥5× strength change). \"best ×\" is the ratio if our own work (the deltas and their add) took "
        "no time at all: ComfyUI's fixed costs in our path (its float32 copy of every weight, the cast "
        "back, its bookkeeping, the unpatch) bound what any loader inside ComfyUI can reach. Peak RSS is "
        "anonymous memory (RssAnon, polled) over the whole run of a path (all four phases), above its start.",
        "",
        "| adapter | keys patched | phase | ComfyUI (s) | ours (s) | × | best × | peak RSS ComfyUI / ours (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        n = keys[(name, "ComfyUI")]
        n = n if n == keys[(name, "ours")] else f"{n} / {keys[(name, 'ours')]}"
        for phase in PHASES:
            c, o = med(name, "ComfyUI", phase), med(name, "ours", phase)
            fixed = o - med(name, "ours", phase, "delta + add")
            best = f"{c / fixed:.1f}×" if phase != "unload" and fixed > 0 else ""
            peak = ""
            if phase == "cold":
                pc = statistics.median([p for *_, p in results[(name, "ComfyUI")][phase]]) / 2**20
                po = statistics.median([p for *_, p in results[(name, "ours")][phase]]) / 2**20
                peak = f"{pc:,.0f} / {po:,.0f}"
            lines.append(f"| {name} | {n} | {phase} | {c:.2f} | {o:.2f} | {c / o:.2f}× | {best} | {peak} |")
    parts = ("read file", "map keys", "float32 copy", "delta + add", "cast back")
    lines += ["", "Where the time goes (medians of the same runs; timers around ComfyUI's functions: "
              "\"read file\" is `load_torch_file` / our file cache, \"map keys\" `load_lora_for_models` / "
              "our `build_plan`, \"float32 copy\" ComfyUI's `cast_to_device` working copy of each weight, "
              "\"delta + add\" `calculate_weight` (ours: the tile kernel), \"cast back\" `stochastic_rounding`, "
              "\"bookkeeping\" the rest of `load_models_gpu` (unpatching the previous clone included), "
              "\"node\" the rest of the node call):", "",
              "| adapter | phase | path | read file | map keys | node | float32 copy | delta + add | cast back | "
              "bookkeeping | total |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        for phase in ("cold", "strength", "warm"):
            for label in ("ComfyUI", "ours"):
                part = {k: med(name, label, phase, k) for k in (*parts, "patch (total)")}
                total = med(name, label, phase)
                inside = part["float32 copy"] + part["delta + add"] + part["cast back"]
                bookkeeping = max(part["patch (total)"] - inside, 0.0)
                node = max(total - part["patch (total)"] - part["read file"] - part["map keys"], 0.0)
                cells = [part["read file"], part["map keys"], node, part["float32 copy"], part["delta + add"],
                         part["cast back"], bookkeeping, total]
                lines.append(f"| {name} | {phase} | {label} | " + " | ".join(f"{x:.2f}" for x in cells) + " |")
    return "\n".join(lines)


def save_results(path: Path, names, results, keys, runs, env, mode) -> None:
    """The raw samples, so the tables can be re-rendered (``--from-json``) without re-running."""
    raw = {"names": names, "runs": runs, "env": env, "mode": mode,
           "keys": [[n, label, k] for (n, label), k in keys.items()],
           "results": [[n, label, phase, samples] for (n, label), phases in results.items()
                       for phase, samples in phases.items()]}
    path.write_text(json.dumps(raw))


def load_results(path: Path):
    raw = json.loads(path.read_text())
    results = defaultdict(lambda: defaultdict(list))
    for n, label, phase, samples in raw["results"]:
        results[(n, label)][phase] = [tuple(s) for s in samples]
    keys = {(n, label): k for n, label, k in raw["keys"]}
    return raw["names"], results, keys, raw["runs"], raw["env"], raw["mode"]

if __name__ == "__main__":
    sys.exit(main())
