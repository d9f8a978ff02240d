"""Wan 2.1 / 2.2 (T2V, I2V, TI2V) in the original Wan names ComfyUI keeps.

Facts (ComfyUI a125cd84 comfy/ldm/wan/model.py and model_detection.py:377-422; diffusers
WanTransformer3DModel and its single-file converter): no fused weights; Wan 2.1 I2V adds
image cross-attention `cross_attn.k_img/v_img/norm_k_img` and the CLIP-vision MLP
`img_emb`; `modulation` and `head.modulation` are raw parameters; diffusers renames
self_attn/cross_attn to attn1/attn2 and swaps the names norm2/norm3.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tables import IN, OUT, Table, block


@dataclass(frozen=True)
class WanConfig:
    blocks: tuple[int] = (40,)
    dim: int = 5120
    ffn: int = 13824
    in_dim: int = 16  # patch_embedding input channels: T2V 16, I2V 36, TI2V-5B 48
    out_dim: int = 16
    image_cross_attention: bool = False  # Wan 2.1 I2V: k_img / v_img and img_emb
    text_dim: int = 4096
    image_dim: int = 1280  # CLIP-vision features (img_emb)


_ATTN = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))


def build_wan(cfg: WanConfig) -> Table:
    t = Table("wan", cfg)
    d, f = cfg.dim, cfg.ffn
    t.add("patch_embedding", (d, cfg.in_dim, 1, 2, 2), block=IN)
    t.rename("patch_embedding", "patch_embedding")
    for native, diffusers, inp in (("text_embedding", "text_embedder", cfg.text_dim), ("time_embedding", "time_embedder", 256)):
        t.add(f"{native}.0", (d, inp), block=IN)
        t.rename(f"condition_embedder.{diffusers}.linear_1", f"{native}.0")
        t.add(f"{native}.2", (d, d), block=IN)
        t.rename(f"condition_embedder.{diffusers}.linear_2", f"{native}.2")
    t.add("time_projection.1", (6 * d, d), block=IN)
    t.rename("condition_embedder.time_proj", "time_projection.1")
    if cfg.image_cross_attention:
        e, ie = cfg.image_dim, "condition_embedder.image_embedder"
        for native, diffusers, shape in (("proj.0", "norm1", (e,)), ("proj.1", "ff.net.0.proj", (e, e)),
                                         ("proj.3", "ff.net.2", (d, e)), ("proj.4", "norm2", (d,))):
            t.add(f"img_emb.{native}", shape, block=IN)
            t.rename(f"{ie}.{diffusers}", f"img_emb.{native}")
    for i in range(cfg.blocks[0]):
        n, df, blk = f"blocks.{i}", f"blocks.{i}", block("B", i)
        t.add(f"{n}.modulation", (1, 6, d), bias=False, block=blk, leaf="")
        t.rename(f"{df}.scale_shift_table", f"{n}.modulation", leaf="")
        for native, diffusers in (("self_attn", "attn1"), ("cross_attn", "attn2")):
            for short, long in _ATTN:
                t.add(f"{n}.{native}.{short}", (d, d), block=blk)
                t.rename(f"{df}.{diffusers}.{long}", f"{n}.{native}.{short}")
            for norm in ("norm_q", "norm_k"):
                t.add(f"{n}.{native}.{norm}", (d,), bias=False, block=blk)
                t.rename(f"{df}.{diffusers}.{norm}", f"{n}.{native}.{norm}")
        if cfg.image_cross_attention:
            for native, diffusers in (("k_img", "add_k_proj"), ("v_img", "add_v_proj")):
                t.add(f"{n}.cross_attn.{native}", (d, d), block=blk)
                t.rename(f"{df}.attn2.{diffusers}", f"{n}.cross_attn.{native}")
            t.add(f"{n}.cross_attn.norm_k_img", (d,), bias=False, block=blk)
            t.rename(f"{df}.attn2.norm_added_k", f"{n}.cross_attn.norm_k_img")
        t.add(f"{n}.norm3", (d,), block=blk)
        t.rename(f"{df}.norm2", f"{n}.norm3")
        t.add(f"{n}.ffn.0", (f, d), block=blk)
        t.rename(f"{df}.ffn.net.0.proj", f"{n}.ffn.0")
        t.add(f"{n}.ffn.2", (d, f), block=blk)
        t.rename(f"{df}.ffn.net.2", f"{n}.ffn.2")
    t.add("head.head", (4 * cfg.out_dim, d), block=OUT)
    t.rename("proj_out", "head.head")
    t.add("head.modulation", (1, 2, d), bias=False, block=OUT, leaf="")
    t.rename("scale_shift_table", "head.modulation", leaf="")
    return t
