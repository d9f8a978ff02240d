"""Text encoders of the DiT families, in the HF names ComfyUI keeps under `<part>.transformer.`.

Facts (ComfyUI a125cd84 comfy/text_encoders: sd1_clip, sd3_clip, t5, llama, wan,
qwen_image, hunyuan_video, hidream, lumina2; the published HF configs): CLIP-L/CLIP-G as for
SDXL; T5-XXL (relative attention bias in block 0 only) and umT5-XXL (in every block); the
Llama-family decoders (Qwen2.5-VL-7B's language model, Llama 3 8B, Gemma 2 2B) under
`model.`. The Qwen2.5-VL vision tower (`visual.*`) is not tabulated: adapters do not train it.
Part names are ComfyUI's own (clip_l, clip_g, t5xxl, umt5xxl, qwen25_7b, llama, gemma2_2b).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from ..sd_layouts import CLIP_L, OPENCLIP_BIGG, TextConfig, text_modules

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TextModule:
    name: str  # HF name under `<part>.transformer.`
    weight: Shape
    bias: Shape | None


@dataclass(frozen=True)
class T5Config:
    layers: int = 24
    dim: int = 4096
    ffn: int = 10240
    heads: int = 64
    vocab: int = 32128
    bias_every_block: bool = False  # umT5: a relative attention bias per block


@dataclass(frozen=True)
class DecoderConfig:
    """A Llama-family decoder (Qwen2.5, Llama 3, Gemma 2)."""

    layers: int
    hidden: int
    q: int  # q_proj rows (heads x head_dim)
    kv: int  # k_proj / v_proj rows
    mlp: int
    vocab: int
    qkv_bias: bool = False
    sandwich_norms: bool = False  # Gemma 2: pre/post feed-forward norms


T5XXL = T5Config()
UMT5XXL = T5Config(vocab=256384, bias_every_block=True)
QWEN25_7B = DecoderConfig(28, 3584, 3584, 512, 18944, 152064, qkv_bias=True)
LLAMA3_8B_LLAVA = DecoderConfig(32, 4096, 4096, 1024, 14336, 128320)  # HunyuanVideo's llava-llama-3-8b
LLAMA31_8B = DecoderConfig(32, 4096, 4096, 1024, 14336, 128256)  # HiDream
GEMMA2_2B = DecoderConfig(26, 2304, 2048, 1024, 9216, 256000, sandwich_norms=True)


def _t5(cfg: T5Config) -> tuple[TextModule, ...]:
    d, out = cfg.dim, []
    for n in range(cfg.layers):
        b = f"encoder.block.{n}.layer"
        for proj in "qkvo":
            out.append(TextModule(f"{b}.0.SelfAttention.{proj}", (d, d), None))
        if n == 0 or cfg.bias_every_block:
            out.append(TextModule(f"{b}.0.SelfAttention.relative_attention_bias", (32, cfg.heads), None))
        out.append(TextModule(f"{b}.0.layer_norm", (d,), None))
        out += [TextModule(f"{b}.1.DenseReluDense.wi_0", (cfg.ffn, d), None),
                TextModule(f"{b}.1.DenseReluDense.wi_1", (cfg.ffn, d), None),
                TextModule(f"{b}.1.DenseReluDense.wo", (d, cfg.ffn), None),
                TextModule(f"{b}.1.layer_norm", (d,), None)]
    out += [TextModule("encoder.final_layer_norm", (d,), None), TextModule("shared", (cfg.vocab, d), None)]
    return tuple(out)


def _decoder(cfg: DecoderConfig) -> tuple[TextModule, ...]:
    h = cfg.hidden
    out = [TextModule("model.embed_tokens", (cfg.vocab, h), None)]
    bias = (lambda rows: (rows,)) if cfg.qkv_bias else (lambda rows: None)
    for n in range(cfg.layers):
        p = f"model.layers.{n}"
        out += [TextModule(f"{p}.self_attn.q_proj", (cfg.q, h), bias(cfg.q)),
                TextModule(f"{p}.self_attn.k_proj", (cfg.kv, h), bias(cfg.kv)),
                TextModule(f"{p}.self_attn.v_proj", (cfg.kv, h), bias(cfg.kv)),
                TextModule(f"{p}.self_attn.o_proj", (h, cfg.q), None),
                TextModule(f"{p}.mlp.gate_proj", (cfg.mlp, h), None),
                TextModule(f"{p}.mlp.up_proj", (cfg.mlp, h), None),
                TextModule(f"{p}.mlp.down_proj", (h, cfg.mlp), None),
                TextModule(f"{p}.input_layernorm", (h,), None),
                TextModule(f"{p}.post_attention_layernorm", (h,), None)]
        if cfg.sandwich_norms:
            out += [TextModule(f"{p}.pre_feedforward_layernorm", (h,), None),
                    TextModule(f"{p}.post_feedforward_layernorm", (h,), None)]
    out.append(TextModule("model.norm", (h,), None))
    return tuple(out)


def _clip(cfg: TextConfig) -> tuple[TextModule, ...]:
    return tuple(TextModule(s.name, s.weight, s.bias) for s in text_modules(cfg, "te"))


@cache
def text_table(cfg) -> tuple[TextModule, ...]:
    """Every weight-bearing module of one text encoder configuration."""
    if isinstance(cfg, T5Config):
        return _t5(cfg)
    if isinstance(cfg, DecoderConfig):
        return _decoder(cfg)
    return _clip(cfg)


@cache
def text_shapes(cfg) -> dict[str, Shape]:
    """HF name -> weight shape, for one text encoder configuration."""
    return {m.name: m.weight for m in text_table(cfg)}


__all__ = [
    "CLIP_L", "GEMMA2_2B", "LLAMA31_8B", "LLAMA3_8B_LLAVA", "OPENCLIP_BIGG", "QWEN25_7B", "T5XXL",
    "UMT5XXL", "DecoderConfig", "T5Config", "TextModule", "text_shapes", "text_table",
]
