"""Qwen-Image and HiDream-I1: diffusion transformers whose ComfyUI names are diffusers' names.

Facts (ComfyUI a125cd84 comfy/ldm/qwen_image/model.py, comfy/ldm/hidream/model.py,
model_detection.py:453-470 and :544-549; diffusers QwenImageTransformer2DModel and
HiDreamImageTransformer2DModel): no fused weights and no renaming, so the diffusers key
space is the native one under `transformer.`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tables import IN, OUT, Table, block


@dataclass(frozen=True)
class QwenImageConfig:
    blocks: tuple[int] = (60,)
    hidden: int = 3072
    head_dim: int = 128
    in_features: int = 64
    context: int = 3584  # Qwen2.5-VL-7B hidden size
    out_features: int = 64


@dataclass(frozen=True)
class HiDreamConfig:
    blocks: tuple[int, int] = (16, 32)  # double stream, single stream
    hidden: int = 2560
    experts: int = 4
    expert_ffn: int = 6912
    shared_ffn: int = 3584
    in_features: int = 64
    pooled: int = 2048
    caption: int = 4096  # Llama-3.1 hidden size: one caption projection per block
    caption_t5: int = 4096  # and one for T5, last
    out_features: int = 64


def _same(t: Table, name: str, shape, bias: bool = True, blk: str | None = None, leaf: str = "weight") -> None:
    t.add(name, shape, bias=bias, block=blk, leaf=leaf)
    t.rename(name, name, leaf=leaf)


def build_qwen_image(cfg: QwenImageConfig) -> Table:
    t = Table("qwen_image", cfg)
    h, d = cfg.hidden, cfg.head_dim
    _same(t, "img_in", (h, cfg.in_features), blk=IN)
    _same(t, "txt_norm", (cfg.context,), bias=False, blk=IN)
    _same(t, "txt_in", (h, cfg.context), blk=IN)
    _same(t, "time_text_embed.timestep_embedder.linear_1", (h, 256), blk=IN)
    _same(t, "time_text_embed.timestep_embedder.linear_2", (h, h), blk=IN)
    for i in range(cfg.blocks[0]):
        n, blk = f"transformer_blocks.{i}", block("B", i)
        for stream in ("img", "txt"):
            _same(t, f"{n}.{stream}_mod.1", (6 * h, h), blk=blk)
            _same(t, f"{n}.{stream}_mlp.net.0.proj", (4 * h, h), blk=blk)
            _same(t, f"{n}.{stream}_mlp.net.2", (h, 4 * h), blk=blk)
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            _same(t, f"{n}.attn.{proj}", (h, h), blk=blk)
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            _same(t, f"{n}.attn.{norm}", (d,), bias=False, blk=blk)
    _same(t, "norm_out.linear", (2 * h, h), blk=OUT)  # (scale, shift) in ComfyUI too: no swap
    _same(t, "proj_out", (cfg.out_features, h), blk=OUT)
    return t


def _moe(t: Table, n: str, cfg: HiDreamConfig, blk: str) -> None:
    h = cfg.hidden
    for w, shape in (("w1", (cfg.shared_ffn, h)), ("w2", (h, cfg.shared_ffn)), ("w3", (cfg.shared_ffn, h))):
        _same(t, f"{n}.ff_i.shared_experts.{w}", shape, bias=False, blk=blk)
    for e in range(cfg.experts):
        for w, shape in (("w1", (cfg.expert_ffn, h)), ("w2", (h, cfg.expert_ffn)), ("w3", (cfg.expert_ffn, h))):
            _same(t, f"{n}.ff_i.experts.{e}.{w}", shape, bias=False, blk=blk)
    _same(t, f"{n}.ff_i.gate", (cfg.experts, h), bias=False, blk=blk)


def _hidream_attention(t: Table, n: str, h: int, blk: str, suffix: str) -> None:
    for proj in ("to_q", "to_k", "to_v", "to_out"):
        _same(t, f"{n}.attn1.{proj}{suffix}", (h, h), blk=blk)
    for norm in ("q_rms_norm", "k_rms_norm"):
        _same(t, f"{n}.attn1.{norm}{suffix}", (h,), bias=False, blk=blk)


def build_hidream(cfg: HiDreamConfig) -> Table:
    t = Table("hidream", cfg)
    h = cfg.hidden
    _same(t, "t_embedder.timestep_embedder.linear_1", (h, 256), blk=IN)
    _same(t, "t_embedder.timestep_embedder.linear_2", (h, h), blk=IN)
    _same(t, "p_embedder.pooled_embedder.linear_1", (h, cfg.pooled), blk=IN)
    _same(t, "p_embedder.pooled_embedder.linear_2", (h, h), blk=IN)
    _same(t, "x_embedder.proj", (h, cfg.in_features), blk=IN)
    widths = [cfg.caption] * sum(cfg.blocks) + [cfg.caption_t5]  # as diffusers/ComfyUI build them
    for j, width in enumerate(widths):
        _same(t, f"caption_projection.{j}.linear", (h, width), bias=False, blk=IN)
    for i in range(cfg.blocks[0]):
        n, blk = f"double_stream_blocks.{i}.block", block("D", i)
        _same(t, f"{n}.adaLN_modulation.1", (12 * h, h), blk=blk)
        _hidream_attention(t, n, h, blk, "")
        _hidream_attention(t, n, h, blk, "_t")
        _moe(t, n, cfg, blk)
        for w, shape in (("w1", (cfg.expert_ffn, h)), ("w2", (h, cfg.expert_ffn)), ("w3", (cfg.expert_ffn, h))):
            _same(t, f"{n}.ff_t.{w}", shape, bias=False, blk=blk)
    for i in range(cfg.blocks[1]):
        n, blk = f"single_stream_blocks.{i}.block", block("S", i)
        _same(t, f"{n}.adaLN_modulation.1", (6 * h, h), blk=blk)
        _hidream_attention(t, n, h, blk, "")
        _moe(t, n, cfg, blk)
    _same(t, "final_layer.linear", (cfg.out_features, h), blk=OUT)
    _same(t, "final_layer.adaLN_modulation.1", (2 * h, h), blk=OUT)
    return t
