"""Lumina Image 2.0 and Z-Image: NextDiT with a fused grouped-query `attention.qkv`.

Facts (ComfyUI a125cd84 comfy/ldm/lumina/model.py and model_detection.py:362-375;
diffusers Lumina2Transformer2DModel / ZImageTransformer2DModel and the Lumina 2
single-file converter): `layers`, `noise_refiner` and `context_refiner` (no modulation)
blocks; q/k/v rows 2304/768/768 for Lumina 2 (8 of 24 heads are KV heads). Lumina 2's
`norm_final` is unused and has no diffusers counterpart.

Z-Image's ComfyUI names are not in the a125cd84 checkout: they follow newer ComfyUI's
`z_image_to_diffusers` as the reference records it (fused `attention.qkv`,
`attention.out`, `x_embedder`, `final_layer`) and are marked unverified there; its
diffusers table is checked against diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tables import IN, OUT, Table, block


@dataclass(frozen=True)
class Lumina2Config:
    blocks: tuple[int, int, int] = (26, 2, 2)  # layers, noise refiner, context refiner
    dim: int = 2304
    heads: int = 24
    kv_heads: int = 8
    ffn: int = 9216
    adaln: int = 1024  # min(dim, 1024)
    caption: int = 2304  # Gemma-2-2B hidden size
    in_features: int = 64
    out_features: int = 64


@dataclass(frozen=True)
class ZImageConfig:
    blocks: tuple[int, int, int] = (30, 2, 2)
    dim: int = 3840
    heads: int = 30
    kv_heads: int = 30
    ffn: int = 10240
    adaln: int = 256  # min(dim, 256)
    caption: int = 2560  # Qwen3-4B hidden size
    in_features: int = 64
    out_features: int = 64


def _lumina_block(t: Table, n: str, cfg: Lumina2Config, blk: str, modulation: bool) -> None:
    d, head = cfg.dim, cfg.dim // cfg.heads
    kv = head * cfg.kv_heads
    t.add(f"{n}.attention.qkv", (d + 2 * kv, d), bias=False, block=blk)
    t.split(f"{n}.attention.qkv", ((f"{n}.attn.to_q", d), (f"{n}.attn.to_k", kv), (f"{n}.attn.to_v", kv)))
    t.add(f"{n}.attention.out", (d, d), bias=False, block=blk)
    t.rename(f"{n}.attn.to_out.0", f"{n}.attention.out")
    for native, diffusers in (("q_norm", "norm_q"), ("k_norm", "norm_k")):
        t.add(f"{n}.attention.{native}", (head,), bias=False, block=blk)
        t.rename(f"{n}.attn.{diffusers}", f"{n}.attention.{native}")
    for native, diffusers, shape in (("w1", "linear_1", (cfg.ffn, d)), ("w2", "linear_2", (d, cfg.ffn)),
                                     ("w3", "linear_3", (cfg.ffn, d))):
        t.add(f"{n}.feed_forward.{native}", shape, bias=False, block=blk)
        t.rename(f"{n}.feed_forward.{diffusers}", f"{n}.feed_forward.{native}")
    norm1 = "norm1.norm" if modulation else "norm1"
    for native, diffusers in (("attention_norm1", norm1), ("ffn_norm1", "ffn_norm1"),
                              ("attention_norm2", "norm2"), ("ffn_norm2", "ffn_norm2")):
        t.add(f"{n}.{native}", (d,), bias=False, block=blk)
        t.rename(f"{n}.{diffusers}", f"{n}.{native}")
    if modulation:
        t.add(f"{n}.adaLN_modulation.1", (4 * d, cfg.adaln), block=blk)
        t.rename(f"{n}.norm1.linear", f"{n}.adaLN_modulation.1")


def _groups(blocks: tuple[int, int, int]):
    layers, noise, context = blocks
    yield from ((f"layers.{i}", block("L", i), True) for i in range(layers))
    yield from ((f"noise_refiner.{i}", block("NR", i), True) for i in range(noise))
    yield from ((f"context_refiner.{i}", block("CR", i), False) for i in range(context))


def build_lumina2(cfg: Lumina2Config) -> Table:
    t = Table("lumina2", cfg)
    d = cfg.dim
    t.add("x_embedder", (d, cfg.in_features), block=IN)
    t.rename("x_embedder", "x_embedder")
    t.add("t_embedder.mlp.0", (cfg.adaln, 256), block=IN)
    t.rename("time_caption_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    t.add("t_embedder.mlp.2", (cfg.adaln, cfg.adaln), block=IN)
    t.rename("time_caption_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    t.add("cap_embedder.0", (cfg.caption,), bias=False, block=IN)
    t.rename("time_caption_embed.caption_embedder.0", "cap_embedder.0")
    t.add("cap_embedder.1", (d, cfg.caption), block=IN)
    t.rename("time_caption_embed.caption_embedder.1", "cap_embedder.1")
    for n, blk, modulation in _groups(cfg.blocks):
        _lumina_block(t, n, cfg, blk, modulation)
    t.add("norm_final", (d,), bias=False, block=OUT)  # unused by the model; not in diffusers
    t.add("final_layer.linear", (cfg.out_features, d), block=OUT)
    t.rename("norm_out.linear_2", "final_layer.linear")
    t.add("final_layer.adaLN_modulation.1", (d, cfg.adaln), block=OUT)
    t.rename("norm_out.linear_1", "final_layer.adaLN_modulation.1")
    return t


def _z_block(t: Table, n: str, cfg: ZImageConfig, blk: str, modulation: bool) -> None:
    d, head = cfg.dim, cfg.dim // cfg.heads
    kv = head * cfg.kv_heads
    t.add(f"{n}.attention.qkv", (d + 2 * kv, d), bias=False, block=blk)
    a = f"{n}.attention"
    t.split(f"{a}.qkv", ((f"{a}.to_q", d), (f"{a}.to_k", kv), (f"{a}.to_v", kv)))
    t.add(f"{a}.out", (d, d), bias=False, block=blk)
    t.rename(f"{a}.to_out.0", f"{a}.out")
    for native, diffusers in (("q_norm", "norm_q"), ("k_norm", "norm_k")):
        t.add(f"{a}.{native}", (head,), bias=False, block=blk)
        t.rename(f"{a}.{diffusers}", f"{a}.{native}")
    for w, shape in (("w1", (cfg.ffn, d)), ("w2", (d, cfg.ffn)), ("w3", (cfg.ffn, d))):
        t.add(f"{n}.feed_forward.{w}", shape, bias=False, block=blk)
        t.rename(f"{n}.feed_forward.{w}", f"{n}.feed_forward.{w}")
    for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
        t.add(f"{n}.{norm}", (d,), bias=False, block=blk)
        t.rename(f"{n}.{norm}", f"{n}.{norm}")
    if modulation:
        t.add(f"{n}.adaLN_modulation.0", (4 * d, cfg.adaln), block=blk)
        t.rename(f"{n}.adaLN_modulation.0", f"{n}.adaLN_modulation.0")


def build_z_image(cfg: ZImageConfig) -> Table:
    t = Table("z_image", cfg)
    d = cfg.dim
    for token in ("x_pad_token", "cap_pad_token"):
        t.add(token, (1, d), bias=False, block=IN, leaf="")
        t.rename(token, token, leaf="")
    t.add("x_embedder", (d, cfg.in_features), block=IN)
    t.rename("all_x_embedder.2-1", "x_embedder")
    t.add("t_embedder.mlp.0", (1024, 256), block=IN)
    t.rename("t_embedder.mlp.0", "t_embedder.mlp.0")
    t.add("t_embedder.mlp.2", (cfg.adaln, 1024), block=IN)
    t.rename("t_embedder.mlp.2", "t_embedder.mlp.2")
    t.add("cap_embedder.0", (cfg.caption,), bias=False, block=IN)
    t.rename("cap_embedder.0", "cap_embedder.0")
    t.add("cap_embedder.1", (d, cfg.caption), block=IN)
    t.rename("cap_embedder.1", "cap_embedder.1")
    for n, blk, modulation in _groups(cfg.blocks):
        _z_block(t, n, cfg, blk, modulation)
    t.add("final_layer.linear", (cfg.out_features, d), block=OUT)
    t.rename("all_final_layer.2-1.linear", "final_layer.linear")
    t.add("final_layer.adaLN_modulation.1", (d, cfg.adaln), block=OUT)
    t.rename("all_final_layer.2-1.adaLN_modulation.1", "final_layer.adaLN_modulation.1")
    return t
