"""SD3 / SD3.5 (MMDiT) in SAI's `joint_blocks` names.

Facts (ComfyUI a125cd84 comfy/ldm/modules/diffusionmodules/mmdit.py, comfy/utils.py
mmdit_to_diffusers; diffusers SD3Transformer2DModel and published configs): hidden = 64 x
heads; each joint block has an `x_block` and a `context_block` with fused `attn.qkv`; SD3.5
medium adds a second self-attention `x_block.attn2` in blocks 0-12 (its x_block modulation
is then 9h wide); the last context block is "pre only" (qkv and a 2h modulation, no proj or
MLP), and diffusers stores that modulation, like `norm_out.linear`, as (scale, shift).
"""

from __future__ import annotations

from dataclasses import dataclass

from .tables import IN, OUT, Table, block


@dataclass(frozen=True)
class SD3Config:
    blocks: tuple[int] = (24,)
    hidden: int = 1536
    dual_attention: tuple[int, ...] = ()  # blocks with x_block.attn2 (3.5 medium: 0-12)
    qk_norm: bool = False  # RMS ln_q/ln_k (3.5 medium and large)
    pos_embed: int = 36864  # 192^2 (3.5 medium: 384^2)
    in_channels: int = 16
    context: int = 4096
    pooled: int = 2048
    out_features: int = 64

    @property
    def head_dim(self) -> int:
        return 64


def _attention(t: Table, n: str, df: str, h: int, qk_norm: bool, blk: str, proj: bool,
               names: tuple[str, str, str, str], norms: tuple[str, str]) -> None:
    q, k, v, out = names
    t.add(f"{n}.qkv", (3 * h, h), block=blk)
    t.split(f"{n}.qkv", ((f"{df}.{q}", h), (f"{df}.{k}", h), (f"{df}.{v}", h)))
    if proj:
        t.add(f"{n}.proj", (h, h), block=blk)
        t.rename(f"{df}.{out}", f"{n}.proj")
    if qk_norm:
        for native, diffusers in zip(("ln_q", "ln_k"), norms, strict=True):
            t.add(f"{n}.{native}", (64,), bias=False, block=blk)
            t.rename(f"{df}.{diffusers}", f"{n}.{native}")


def build_sd3(cfg: SD3Config) -> Table:
    t = Table("sd3", cfg)
    h, depth = cfg.hidden, cfg.blocks[0]
    t.add("pos_embed", (1, cfg.pos_embed, h), bias=False, block=IN, leaf="")
    t.rename("pos_embed.pos_embed", "pos_embed", leaf="")
    t.add("x_embedder.proj", (h, cfg.in_channels, 2, 2), block=IN)
    t.rename("pos_embed.proj", "x_embedder.proj")
    for native, diffusers, inp in (("t_embedder", "timestep_embedder", 256), ("y_embedder", "text_embedder", cfg.pooled)):
        t.add(f"{native}.mlp.0", (h, inp), block=IN)
        t.rename(f"time_text_embed.{diffusers}.linear_1", f"{native}.mlp.0")
        t.add(f"{native}.mlp.2", (h, h), block=IN)
        t.rename(f"time_text_embed.{diffusers}.linear_2", f"{native}.mlp.2")
    t.add("context_embedder", (h, cfg.context), block=IN)
    t.rename("context_embedder", "context_embedder")
    for i in range(depth):
        n, df, blk = f"joint_blocks.{i}", f"transformer_blocks.{i}", block("J", i)
        last = i == depth - 1
        dual = i in cfg.dual_attention
        _attention(t, f"{n}.x_block.attn", f"{df}.attn", h, cfg.qk_norm, blk, True,
                   ("to_q", "to_k", "to_v", "to_out.0"), ("norm_q", "norm_k"))
        if dual:
            _attention(t, f"{n}.x_block.attn2", f"{df}.attn2", h, cfg.qk_norm, blk, True,
                       ("to_q", "to_k", "to_v", "to_out.0"), ("norm_q", "norm_k"))
        t.add(f"{n}.x_block.mlp.fc1", (4 * h, h), block=blk)
        t.rename(f"{df}.ff.net.0.proj", f"{n}.x_block.mlp.fc1")
        t.add(f"{n}.x_block.mlp.fc2", (h, 4 * h), block=blk)
        t.rename(f"{df}.ff.net.2", f"{n}.x_block.mlp.fc2")
        t.add(f"{n}.x_block.adaLN_modulation.1", ((9 if dual else 6) * h, h), block=blk)
        t.rename(f"{df}.norm1.linear", f"{n}.x_block.adaLN_modulation.1")
        _attention(t, f"{n}.context_block.attn", f"{df}.attn", h, cfg.qk_norm, blk, not last,
                   ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"), ("norm_added_q", "norm_added_k"))
        if not last:
            t.add(f"{n}.context_block.mlp.fc1", (4 * h, h), block=blk)
            t.rename(f"{df}.ff_context.net.0.proj", f"{n}.context_block.mlp.fc1")
            t.add(f"{n}.context_block.mlp.fc2", (h, 4 * h), block=blk)
            t.rename(f"{df}.ff_context.net.2", f"{n}.context_block.mlp.fc2")
        t.add(f"{n}.context_block.adaLN_modulation.1", ((2 if last else 6) * h, h), block=blk)
        if last:
            t.swap(f"{df}.norm1_context.linear", f"{n}.context_block.adaLN_modulation.1")
        else:
            t.rename(f"{df}.norm1_context.linear", f"{n}.context_block.adaLN_modulation.1")
    t.add("final_layer.linear", (cfg.out_features, h), block=OUT)
    t.rename("proj_out", "final_layer.linear")
    t.add("final_layer.adaLN_modulation.1", (2 * h, h), block=OUT)
    t.swap("norm_out.linear", "final_layer.adaLN_modulation.1")
    return t
