"""Patch-engine benchmark: first patch, strength-only change, restore and peak memory.

Every case is measured against a reference run in the same process, a stand-in written
here for what ComfyUI does per key (``bench/real_comfyui.py`` measures against ComfyUI's
own code when a checkout is present): cast the weight to float32, compute the delta, add
strength x delta, cast back; one key at a time, no caching, originals kept as backups.

    python bench/patch.py                      # SD1.5 all algorithms + SDXL LoRA/LoKr, budget sweep
    python bench/patch.py --arch sd1 --algos LoRA,LoHa --cache-mb 1024
    python bench/patch.py --write-docs         # also replace the Patch section of docs/benchmarks.md
    python bench/patch.py --device cuda        # the same on a GPU (or mps, xpu): weights there, reference there

On an accelerator the weights live on the device, the originals come back from the file
(``restore_from``: nothing kept in VRAM), and the reference builds each delta on the device
from factors freshly copied there per key, as ComfyUI does.  Peak device memory is
``torch.cuda.max_memory_allocated`` above the weights (CUDA only).  Needs torch,
safetensors, numpy and tqdm, nothing else.

Weights are random fp16 values with the real SD1.5/SDXL UNet and text-encoder names
and shapes; adapters are synthetic with realistic ranks (see ``CASES``).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import save_file  # noqa: E402

from lycoris_core import load_adapter  # noqa: E402
from lycoris_core.io.reader import SafetensorsSource  # noqa: E402
from lycoris_core.keymap import state_shapes  # noqa: E402
from lycoris_core.patch import DEFAULT_CACHE_BYTES, AdapterSpec, WeightPatcher, build_plan  # noqa: E402
from lycoris_core.testing.synthetic import attention_only, default_targets, synthetic_adapter  # noqa: E402

# name -> (synthetic algo, options)
CASES = {
    "LoRA dim32/conv16": ("lora", dict(rank=32, conv_rank=16)),
    "LoCon-Tucker dim32/conv16": ("locon_tucker", dict(rank=32, conv_rank=16)),
    "LoHa dim16": ("loha", dict(rank=16)),
    "LoHa-Tucker dim16": ("loha_tucker", dict(rank=16)),
    "LoKr factor -1": ("lokr", dict(rank=8)),
    "LoKr factor 8, full w2": ("lokr", dict(rank=8, factor=8, full_w2=True)),
    "Full, attention only": ("full", dict(select=attention_only)),
    "DoRA dim32": ("dora", dict(rank=32, conv_rank=16)),
}
SDXL_DEFAULT = ["LoRA dim32/conv16", "LoKr factor -1"]


# Polls another process's anonymous RSS every 10 ms until a line arrives on stdin, then prints the peak.
POLLER = r"""
import select, sys
status = f"/proc/{sys.argv[1]}/status"
def rss():
    with open(status) as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0
peak = rss()
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0.01)[0]:
    peak = max(peak, rss())
print(max(peak, rss()), flush=True)
"""


class PeakRSS:
    """Peak anonymous RSS (/proc/<pid>/status RssAnon) above its value at the start.

    Polled from a child process: a polling thread in this process would compete for the GIL
    with the code being measured (it made the many small torch calls of a LoKr pass 3x slower).
    """

    @staticmethod
    def _read() -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        self.start = self._read()
        self._child = subprocess.Popen([sys.executable, "-c", POLLER, str(os.getpid())], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        self._child.stdout.readline()  # "ready": polling has begun
        return self

    def __exit__(self, *exc):
        out, _ = self._child.communicate("stop\n", timeout=60)
        self.peak = max(int(out.split()[-1]), self._read())

    @property
    def above_start(self) -> int:
        return self.peak - self.start


def make_weights(arch: str) -> dict[str, torch.Tensor]:
    shapes = state_shapes(arch, "comfy")
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for key, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.float16)
        t.copy_(torch.rand(shape, generator=gen, dtype=torch.float32).sub_(0.5).mul_(0.1))
        weights[key] = t
    return weights


def comfy_style_delta(module, weight):
    """ΔW the way ComfyUI's adapters build it per key: factors copied to the weight's device and
    cast to float32 each time, the full product first, the alpha/rank scale applied later as a
    separate pass."""

    def t(role):
        return module.source[module.keys[role]].to(weight.device, torch.float32)

    if module.algo in ("lora", "locon") and not module.dora and not module.tucker:
        diff = torch.mm(t("lora_up").flatten(1), t("lora_down").flatten(1))
    elif module.algo == "loha" and not module.dora and not module.tucker:
        diff = (t("hada_w1_a") @ t("hada_w1_b")) * (t("hada_w2_a") @ t("hada_w2_b"))
    elif module.algo == "lokr" and not module.dora and not module.tucker:
        w1 = t("lokr_w1") if "lokr_w1" in module.keys else t("lokr_w1_a") @ t("lokr_w1_b")
        w2 = t("lokr_w2") if "lokr_w2" in module.keys else t("lokr_w2_a") @ t("lokr_w2_b")
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        diff = torch.kron(w1, w2.contiguous())
    elif module.algo == "full":
        return t("diff"), 1.0
    else:  # Tucker, DoRA and the rest: the engine's delta, still scaled as a separate pass
        base = weight.reshape(module.shape) if module.uses_weight and weight.numel() == module.dense_params else weight
        return module.delta(base if module.uses_weight else None), 1.0
    return diff, module.scale


def reference_patch(weights, plan):
    """ComfyUI's per-key path: fp32 copy, delta, (strength x scale) x delta, add, cast back; backups kept."""
    backups = {}
    for key, contributions in plan.contributions.items():
        weight = weights[key]
        backups[key] = weight
        temp = weight.to(torch.float32, copy=True)
        for c in contributions:
            if c.bias:
                temp += c.strength * c.module.bias_delta(temp.device)
            elif c.module.linear_in_strength:
                diff, scale = comfy_style_delta(c.module, temp)
                temp += ((c.strength * scale) * diff).reshape(temp.shape)
            else:
                temp += c.module.strength_delta(weight, c.strength).reshape(temp.shape)
        weights[key] = temp.to(weight.dtype)
    return backups


def reference_restore(weights, backups):
    for key, original in backups.items():
        weights[key] = original


CPU = torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type not in ("cpu", "meta"):  # meta: a dry run of the device code path, nothing to wait for
        torch.accelerator.synchronize(device)


def timed(fn, device: torch.device = CPU):
    gc.collect()
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


class PeakDevice:
    """Peak allocated device memory above its value at the start (CUDA; None elsewhere)."""

    def __init__(self, device: torch.device):
        self.device, self.above_start = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.above_start = torch.cuda.max_memory_allocated(self.device) - self.start


def largest_layers_bytes(weights, keys, n=2) -> int:
    sizes = sorted((weights[k].numel() * 4 for k in keys), reverse=True)  # float32 working copies
    return sum(sizes[:n])


def run_case(arch, weights, source, name, cache_bytes, reference=True, device_cache_bytes=0):
    algo, options = CASES[name]
    options = dict(options)
    select = options.pop("select", default_targets)
    adapter = load_adapter(synthetic_adapter(arch, algo, select=select, seed=1, **options))
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    spec = [AdapterSpec(adapter, 1.0, 1.0)]
    touched = build_plan(spec, shapes).keys()

    os.sync()  # no writeback of earlier files (the weights file, other runs) during the timings
    device = next(iter(weights.values())).device
    t_ref = None
    if reference:  # no cache: its strength change is this same full re-patch
        plan = build_plan(spec, shapes)
        t_ref, backups = timed(lambda: reference_patch(weights, plan), device)
        reference_restore(weights, backups)
        backups = None

    patcher = WeightPatcher(weights, cache_bytes=cache_bytes, restore_from=source,
                            device_cache_bytes=device_cache_bytes)
    with PeakRSS() as mem, PeakDevice(device) as vram:
        t_first, _ = timed(lambda: patcher.apply(spec), device)
        t_strength, _ = timed(lambda: patcher.apply([AdapterSpec(adapter, 0.5, 0.5)]), device)
        t_restore, _ = timed(patcher.restore, device)
    cache_used = patcher.cache.used + patcher.cache.device_used
    patcher.cache.clear()
    factors = adapter.resident_bytes
    adapter.release()
    on_host = device.type == "cpu"
    # host: the budget plus two float32 layers; a device: its largest layer in float32 plus the factors
    bound = cache_bytes + largest_layers_bytes(weights, touched) if on_host else \
        device_cache_bytes + largest_layers_bytes(weights, touched, n=1) + factors
    peak = mem.above_start if on_host else vram.above_start
    return {
        "case": name, "keys": len(touched), "modules": len(adapter.modules), "ref": t_ref,
        "first": t_first, "strength": t_strength, "restore": t_restore,
        "peak_mb": None if peak is None else peak / 2**20, "rss_mb": mem.above_start / 2**20,
        "cache_mb": cache_used / 2**20, "budget_mb": (cache_bytes if on_host else device_cache_bytes) / 2**20,
        "bound_mb": bound / 2**20, "bound_ok": peak is None or peak <= bound,
    }


def fmt_table(rows, arch, device):
    host = device.type == "cpu"
    memory = "peak RSS above weights | bound: budget + 2 largest layers" if host else \
        "peak device memory above weights | bound: largest layer (fp32) + factors | host RSS above start"
    lines = [
        f"**{arch} on {device.type}, against the in-process stand-in** (seconds; × = stand-in reference / ours; "
        "the reference is this repo's imitation of ComfyUI's per-key arithmetic, not ComfyUI itself — "
        "`bench/real_comfyui.py` measures the real one; it keeps no cache, so its strength change is the "
        "same full re-patch)",
        "",
        f"| adapter | keys | reference patch | our first patch | × | our strength change | × | our restore "
        f"| cache used / budget | {memory} |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("" if host else "---|"),
    ]
    for r in rows:
        peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f} MiB"
        line = (f"| {r['case']} | {r['keys']} | {r['ref']:.2f} | {r['first']:.2f} | {r['ref'] / r['first']:.1f} "
                f"| {r['strength']:.2f} | {r['ref'] / r['strength']:.1f} | {r['restore']:.2f} "
                f"| {r['cache_mb']:.0f} / {r['budget_mb']:.0f} MiB | {peak} "
                f"| {r['bound_mb']:.0f} MiB {'ok' if r['bound_ok'] else 'OVER'} |")
        lines.append(line + ("" if host else f" {r['rss_mb']:.0f} MiB |"))
    return "\n".join(lines)


def fmt_budget(rows, arch, ref):
    lines = [f"**{arch} {rows[0]['case']}: delta-cache budget trade-off** (reference patch {ref:.2f} s)", "",
             "| budget | cache used | first patch | strength change | × vs reference | peak RSS above weights |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget_mb']:.0f} MiB | {r['cache_mb']:.0f} MiB | {r['first']:.2f} | {r['strength']:.2f} "
                     f"| {ref / r['strength']:.1f} | {r['peak_mb']:.0f} MiB |")
    return "\n".join(lines)


def fmt_device_cache(rows, arch, ref):
    lines = [f"**{arch} {rows[0]['case']}: deltas kept in VRAM or rebuilt on the device** (reference patch "
             f"{ref:.2f} s; host RAM never holds deltas of device weights)", "",
             "| VRAM budget | kept | first patch | strength change | × vs reference | peak device memory above weights |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f} MiB"
        lines.append(f"| {r['budget_mb']:.0f} MiB | {r['cache_mb']:.0f} MiB | {r['first']:.2f} | {r['strength']:.2f} "
                     f"| {ref / r['strength']:.1f} | {peak} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd1,sdxl", help="comma list of sd1, sd2, sdxl")
    parser.add_argument("--algos", default="", help="comma list of case-name prefixes (default: all for sd1, "
                                                     "LoRA and LoKr for sdxl)")
    parser.add_argument("--cache-mb", type=int, default=DEFAULT_CACHE_BYTES >> 20,
                        help="delta-cache budget for the main table (default: the engine's default)")
    parser.add_argument("--sweep", default="0,1024", help="extra budgets (MiB) for the LoRA trade-off table")
    parser.add_argument("--device", default="cpu", help="where the weights live: cpu, cuda, mps, xpu")
    parser.add_argument("--device-cache-mb", default="0,2048",
                        help="on an accelerator: delta-cache budgets in VRAM to compare for the first case")
    parser.add_argument("--write-docs", action="store_true", help="replace the Patch section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    command = "python bench/patch.py " + " ".join(argv if argv is not None else sys.argv[1:])
    where = "" if device.type == "cpu" else \
        f", device {torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type}"
    out = [f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
           f"{torch.get_num_threads()} threads{where}, load average before the run "
           f"{os.getloadavg()[0]:.1f}. Command: `{command.strip()}`"]
    t_all = time.perf_counter()
    for arch in args.arch.split(","):
        t0 = time.perf_counter()
        weights = make_weights(arch)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.safetensors"
            save_file(weights, str(path))
            os.sync()  # written out before anything is timed: a flush in the background skews every number
            source = SafetensorsSource(path)
            weights = {k: v.to(device) for k, v in weights.items()}
            total = sum(t.numel() * t.element_size() for t in weights.values())
            print(f"{arch}: {len(weights)} tensors, {total / 2**30:.2f} GiB fp16 (setup {time.perf_counter() - t0:.0f}s)",
                  flush=True)
            names = [n for n in CASES if not args.algos or any(n.startswith(a) for a in args.algos.split(","))]
            if arch == "sdxl" and not args.algos:
                names = SDXL_DEFAULT
            rows = []
            for name in names:
                row = run_case(arch, weights, source, name, args.cache_mb << 20)
                rows.append(row)
                print(f"  {name}: reference {row['ref']:.2f}s, first {row['first']:.2f}s, strength "
                      f"{row['strength']:.2f}s, peak {row['peak_mb']:.0f} MiB", flush=True)
            table = fmt_table(rows, arch, device)
            print(table, flush=True)
            out.append(table)
            if device.type != "cpu" and args.device_cache_mb and arch == args.arch.split(",")[0]:
                budgets = [int(b) for b in args.device_cache_mb.split(",") if b]
                sweep = [run_case(arch, weights, source, names[0], 0, reference=False, device_cache_bytes=b << 20)
                         for b in budgets]
                text = fmt_device_cache(sweep, arch, rows[0]["ref"])
                print(text, flush=True)
                out.append(text)
            elif args.sweep and arch == args.arch.split(",")[0]:
                budgets = [int(b) for b in args.sweep.split(",") if b]
                sweep = [run_case(arch, weights, source, names[0], b << 20, reference=False) for b in budgets]
                sweep.append(rows[0])
                text = fmt_budget(sweep, arch, rows[0]["ref"])
                print(text, flush=True)
                out.append(text)
            source.close()
        del weights
        gc.collect()
    out.append(f"Total run time: {time.perf_counter() - t_all:.0f} s.")
    text = "\n\n".join(out)
    if args.write_docs:
        write_docs_section("Patch" if device.type == "cpu" else f"Patch on {device.type}", text)
    return 0


def write_docs_section(title: str, body: str) -> None:
    """Replace (or append) the '## <title>' section's generated block in docs/benchmarks.md."""
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- {title.lower()}:start -->", f"<!-- {title.lower()}:end -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
