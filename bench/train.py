"""Training benchmark: memory and time per step, our modules against the same math done naively.

Three ways to train the same adapter (same rank, same init, same batch) on the same frozen model:

- ``ours``: ``lycoris_core.train`` — LoRA/LoCon and LoKr in bypass (W0·x + s·branch(x), no
  weight-sized ΔW or gradient), LoHa through ``RebuiltOp`` + ``HadaWeight`` (only x and the
  factors are kept for backward; each Hadamard half is rebuilt in backward).
- ``plain``: plain autograd on the same math — W' = W0 + s·ΔW(factors) per layer, then
  ``F.linear``/``F.conv2d`` on W' (autograd keeps W', and for LoHa both dense halves).
- ``comfy``: ComfyUI's weight-wrapper approach (``TrainLoraNode``): W' = W0 + ΔW rebuilt per
  layer every step, LoHa's ΔW through a custom backward that keeps only the factors
  (ComfyUI's ``HadaWeight``), then the layer on W'.  For LoRA and LoKr it is ``plain``.

Models: the SD1.5 UNet's 16 transformer blocks at their real widths and token counts (the
"attention stack"; diffusers ``Transformer2DModel``, random init), and with ``--unet`` the whole
random-weight SD1.5 ``UNet2DConditionModel``.  Adapters on attn1/attn2 q/k/v/out (unet-attn).

Each case runs in its own process (fresh allocator; ``MALLOC_MMAP_THRESHOLD_`` so freed tensors
leave RSS).  Memory: peak RSS during a step above RSS at its start (model, factors and optimizer
state already resident: what remains is activations, saved tensors and gradients), polled from a
child process; on a GPU, ``max_memory_allocated`` above the start.  The ``base`` case runs the
frozen model's own forward and backward (no adapter; one trainable scalar added to each adapted
layer's output, so backward runs where it runs with adapters and keeps nothing for itself): its peak
is the activation memory every method shares, and "adapter" columns are the peak above it.  Time: the
fastest step, in process CPU seconds on one thread by default (this box is shared: CPU time is
steadier than wall time), or wall seconds on a GPU.  Gradients of ``ours`` and ``comfy`` are
compared with ``plain`` on the same first batch.

    python bench/train.py                               # attention stack, 256 px, batch 1, rank 8
    python bench/train.py --unet --resolution 256       # + the whole SD1.5 UNet
    python bench/train.py --write-docs                  # also replace the table in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lycoris_core.train import AdapterConfig, HadaWeight, create_network, find_targets  # noqa: E402

ALGOS = ("lora", "loha", "lokr")
METHODS = ("ours", "plain", "comfy")
BASE = "base"
DOC_TITLE = "## Training"


# ---- models --------------------------------------------------------------------------------------

# (channels, latent side at 512 px) of SD1.5's transformer blocks: down 2+2+2, mid 1, up 3+3+3
SD15_BLOCKS = [(320, 64)] * 2 + [(640, 32)] * 2 + [(1280, 16)] * 2 + [(1280, 8)] + \
              [(1280, 16)] * 3 + [(640, 32)] * 3 + [(320, 64)] * 3


class AttentionStack(torch.nn.Module):
    """SD1.5's 16 Transformer2DModel blocks, each on its own input; activations all kept until backward."""

    def __init__(self, resolution: int):
        super().__init__()
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        scale = resolution / 512
        self.sides = [max(1, int(side * scale)) for _, side in SD15_BLOCKS]
        self.blocks = torch.nn.ModuleList(
            Transformer2DModel(num_attention_heads=8, attention_head_dim=c // 8, in_channels=c, num_layers=1,
                               cross_attention_dim=768, norm_num_groups=32, use_linear_projection=False)
            for c, _ in SD15_BLOCKS)

    def inputs(self, batch: int, gen: torch.Generator):
        xs = [torch.randn(batch, b.in_channels, s, s, generator=gen) for b, s in zip(self.blocks, self.sides)]
        return xs, torch.randn(batch, 77, 768, generator=gen)

    def loss(self, inputs):
        xs, context = inputs
        return sum(b(x, encoder_hidden_states=context).sample.square().mean() for b, x in zip(self.blocks, xs))


class WholeUNet(torch.nn.Module):
    """The random-weight SD1.5 UNet (diffusers' SD1.5 config)."""

    def __init__(self, resolution: int):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        self.side = resolution // 8

    def inputs(self, batch: int, gen: torch.Generator):
        return (torch.randn(batch, 4, self.side, self.side, generator=gen), torch.randint(0, 1000, (batch,), generator=gen),
                torch.randn(batch, 77, 768, generator=gen), torch.randn(batch, 4, self.side, self.side, generator=gen))

    def loss(self, inputs):
        x, t, context, target = inputs
        return F.mse_loss(self.unet(x, t, encoder_hidden_states=context).sample, target)


# ---- the two naive ways ----------------------------------------------------------------------------

def naive_weight(m, custom_hada: bool):
    """W0 + s·ΔW from the module's own factors, with ordinary autograd (optionally ComfyUI's LoHa backward)."""
    p = {r: getattr(m, r) for r in m.present}
    w0 = m.layer.weight
    if m.algo in ("lora", "locon"):
        delta = (p["lora_up"].flatten(1) @ p["lora_down"].flatten(1)) * m.scale
    elif m.algo == "loha":
        if custom_hada:
            delta = HadaWeight.apply(p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"], m.scale)
        else:
            delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * m.scale
    else:
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        delta = torch.kron(w1, w2.flatten(1)) * m.scale
    return w0 + delta.reshape(w0.shape)


def install_naive(net, custom_hada: bool):
    for m in net:
        layer = m.layer

        def forward(x, *args, _m=m, _layer=layer, **kwargs):
            return _m.spec.forward(x, naive_weight(_m, custom_hada), _layer.bias)

        layer.forward = forward


# ---- one case, in its own process ------------------------------------------------------------------

def run_case(args) -> dict:
    from patch import PeakRSS  # bench/patch.py: RssAnon polled from a child process

    model_name, algo, method = args.case.split(":")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = (AttentionStack if model_name == "attn" else WholeUNet)(args.resolution).to(device)
    model.requires_grad_(False)
    inputs = tuple(t.to(device) for t in _flatten(model.inputs(args.batch, torch.Generator().manual_seed(2))))
    net = None
    targets = find_targets(model, "unet-attn", "lora_unet")
    if method == BASE:  # the frozen model alone, plus one scalar added to each adapted layer's output:
        shift = torch.nn.Parameter(torch.zeros((), device=device))  # backward then runs where it runs with
        for t in targets:  # adapters, and its gradient (a sum) keeps nothing
            t.layer.forward = lambda x, *a, _f=t.layer.forward, **k: _f(x, *a, **k) + shift
        params = [shift]
    else:
        net = create_network(targets, AdapterConfig(algo, rank=args.rank, alpha=args.rank / 2, factor=-1), seed=0)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # every factor non-zero: the gradients then mean something
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(device) * 0.01)
        if method == "ours":
            net.attach()
        else:
            install_naive(net, custom_hada=method == "comfy")
        params = list(net.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    inputs = _unflatten(model, inputs)

    def step():
        loss = model.loss(inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    loss = model.loss(inputs)  # first step: gradients to compare, optimizer state allocated
    loss.backward()
    if args.grads and net is not None:
        save_file({n: p.grad.detach().cpu().contiguous() for n, p in net.named_parameters()}, args.grads)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times, peaks = [], []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_alloc = torch.cuda.memory_allocated()
        wall, cpu = time.perf_counter(), time.process_time()
        with PeakRSS() as rss:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        times.append(time.perf_counter() - wall if device.type == "cuda" else time.process_time() - cpu)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated() - start_alloc)
        else:
            peaks.append(rss.above_start)
    return {"case": args.case, "step_s": min(times), "peak_bytes": max(peaks),
            "modules": len(net) if net is not None else 0, "device": device.type}


def _flatten(inputs):
    if isinstance(inputs, tuple) and isinstance(inputs[0], list):
        return (*inputs[0], inputs[1])
    return inputs


def _unflatten(model, flat):
    if isinstance(model, AttentionStack):
        return list(flat[:-1]), flat[-1]
    return flat


# ---- the orchestra --------------------------------------------------------------------------------

def spawn(case: str, args, grads: str | None) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--resolution", str(args.resolution), "--batch", str(args.batch),
           "--rank", str(args.rank), "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]
    if grads:
        cmd += ["--grads", grads]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def grad_error(a: str, b: str) -> float:
    """Largest per-parameter relative gradient difference.

    Each parameter's difference is measured against its own gradient, floored at 1e-3 of the
    largest one: a gradient that is zero in exact arithmetic (attention over a single token at
    a small resolution) is float32 noise in both runs, and its "relative error" means nothing.
    """
    ga, gb = load_file(a), load_file(b)  # safetensors: nothing is unpickled
    floor = 1e-3 * max(float(g.norm()) for g in gb.values())
    return max(float((ga[k] - gb[k]).norm()) / max(float(gb[k].norm()), floor, 1e-30) for k in ga)


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def _versus(r: dict, other: dict | None, base: dict | None) -> str:
    if other is None or other is r or r["method"] == BASE or base is None:
        return "–"
    ours, theirs = r["peak_bytes"] - base["peak_bytes"], other["peak_bytes"] - base["peak_bytes"]
    saved = 1 - ours / theirs if theirs > 0 else 0.0
    word = f"{saved:.0%} less" if saved >= 0 else f"{-saved:.0%} more"
    return f"{word}, {r['step_s'] / other['step_s']:.2f}×"


def table(rows: list[dict]) -> list[str]:
    """One row per case; ratios against plain autograd and ComfyUI's weight wrapper, same model and algorithm."""
    out = ["| model | algo | method | step (s) | peak above start (MiB) | adapter share (MiB) | "
           "vs plain: adapter memory, time | vs comfy: adapter memory, time | grads vs plain |",
           "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["algo"], r["method"]): r for r in rows}
    for r in rows:
        base = by.get((r["model"], BASE, BASE))
        share = "–" if base is None or r["method"] == BASE else mib(r["peak_bytes"] - base["peak_bytes"])
        grads = f"{r['grad_error']:.1e}" if r.get("grad_error") is not None else "–"
        plain, comfy = by.get((r["model"], r["algo"], "plain")), by.get((r["model"], r["algo"], "comfy"))
        out.append(f"| {r['model']} | {r['algo']} | {r['method']} | {r['step_s']:.2f} | {mib(r['peak_bytes'])} | "
                   f"{share} | {_versus(r, plain, base)} | {_versus(r, comfy, base)} | {grads} |")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent = /8); default 256")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per case (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier CPU time)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument("--unet", action="store_true", help="also the whole random-weight SD1.5 UNet")
    parser.add_argument("--models", help="comma-separated subset of attn,unet (overrides --unet)")
    parser.add_argument("--write-docs", action="store_true", help="replace the Training table in docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args)))
        return 0
    models = args.models.split(",") if args.models else ["attn"] + (["unet"] if args.unet else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            r = spawn(f"{model}:{BASE}:{BASE}", args, None)
            r.update(model=model, algo=BASE, method=BASE)
            rows.append(r)
            print(f"{model} frozen model alone: {r['step_s']:.2f} s/step, {mib(r['peak_bytes'])} MiB above start",
                  flush=True)
            for algo in args.algos.split(","):
                grads = {}
                for method in METHODS:
                    grads[method] = os.path.join(tmp, f"{model}-{algo}-{method}.safetensors")
                    r = spawn(f"{model}:{algo}:{method}", args, grads[method])
                    r.update(model=model, algo=algo, method=method)
                    rows.append(r)
                    print(f"{model} {algo} {method}: {r['step_s']:.2f} s/step, {mib(r['peak_bytes'])} MiB above start",
                          flush=True)
                for r in rows[-len(METHODS):]:
                    r["grad_error"] = None if r["method"] == "plain" else grad_error(grads[r["method"]], grads["plain"])
    lines = table(rows)
    print("\n".join(lines))
    if args.write_docs:
        write_docs(lines, args, models)
    return 0


def write_docs(lines, args, models):
    """Replace this run's table (between its train-table markers) in the Training section of docs/benchmarks.md."""
    start, end = f"<!-- train-table {','.join(models)} -->", f"<!-- /train-table {','.join(models)} -->"
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text()
    cmd = "python bench/train.py" + (f" --models {args.models}" if args.models else " --unet" if args.unet else "") + \
          f" --resolution {args.resolution} --batch {args.batch} --rank {args.rank} --steps {args.steps}" + \
          f" --threads {args.threads}"
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.device}"
    block = "\n".join([start, f"`{cmd}` ({machine}, {time.strftime('%Y-%m-%d')}):", "", *lines, end])
    if start in text:
        text = re.sub(rf"{re.escape(start)}.*?{re.escape(end)}", lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n{DOC_TITLE}\n\n{block}\n"
    doc.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
