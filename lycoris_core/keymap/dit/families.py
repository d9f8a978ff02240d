"""The DiT families: standard variants, how to recognise each and read its config from keys.

Owns, per family: the published full-size variants (by name), the text encoders with
their ComfyUI part names and the adapter prefixes trainers use for them, and the probes
and readers that recognise a model and infer its configuration from its state-dict
shapes - depth included, so reduced or "lite" models get exact tables. Probes follow
ComfyUI's `detect_unet_config` (model_detection.py:37-549) in native names and diffusers'
own key checks in diffusers names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from functools import cache

from . import text
from .flux import ChromaConfig, FluxConfig, HunyuanVideoConfig, build_chroma, build_flux, build_hunyuan_video
from .lumina import Lumina2Config, ZImageConfig, build_lumina2, build_z_image
from .qwen import HiDreamConfig, QwenImageConfig, build_hidream, build_qwen_image
from .sd3 import SD3Config, build_sd3
from .tables import Table
from .wan import WanConfig, build_wan

Shape = tuple[int, ...]


class KeyView:
    """A model's keys under one prefix, read by their unprefixed names."""

    def __init__(self, shapes: Mapping[str, Shape], prefix: str):
        self.shapes, self.prefix = shapes, prefix

    def shape(self, key: str) -> Shape | None:
        found = self.shapes.get(self.prefix + key)
        return None if found is None else tuple(found)

    def has(self, key: str) -> bool:
        return (self.prefix + key) in self.shapes

    def count(self, group: str) -> int:
        """1 + the highest index N of `<group>.N.` among the keys (0 when there is none)."""
        head = self.prefix + group + "."
        top = -1
        for key in self.shapes:
            if key.startswith(head):
                index = key[len(head):].split(".", 1)[0]
                if index.isdigit():
                    top = max(top, int(index))
        return top + 1


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[object], Table]
    variants: dict[str, object]  # published full-size configs, most common first
    text: dict[str, object]  # ComfyUI text-encoder part -> its text.* config
    kohya_text: dict[str, str]  # kohya / OneTrainer prefix -> text part
    diffusers_text: dict[str, str]  # diffusers/PEFT prefix -> text part
    probe: Callable[[KeyView], bool]
    probe_diffusers: Callable[[KeyView], bool]
    read: Callable[[KeyView], object]
    read_diffusers: Callable[[KeyView], object]

    def standard_of(self, cfg) -> tuple[str, object] | None:
        """(name, full-size config) of the published variant `cfg` is at some depth, or None."""
        for name, standard in self.variants.items():
            if _without_depth(standard) == _without_depth(cfg):
                return name, standard
        return None

    def variant_name(self, cfg) -> str:
        """The published variant this config is, with its depth when reduced."""
        found = self.standard_of(cfg)
        if found is None:
            return f"{self.name} (custom)"
        name, standard = found
        if standard.blocks == cfg.blocks:
            return name
        return f"{name} [{'+'.join(map(str, cfg.blocks))} blocks]"

    def at_depth(self, cfg, like) -> object:
        """`cfg` with the block counts of `like` (a variant of the model's own depth)."""
        out = replace(cfg, blocks=like.blocks)
        if isinstance(out, SD3Config):
            out = replace(out, dual_attention=tuple(i for i in cfg.dual_attention if i < like.blocks[0]))
        return out


def _without_depth(cfg):
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "blocks"}
    if isinstance(cfg, SD3Config):
        values["dual_attention"] = bool(cfg.dual_attention)  # 3.5 medium at any depth
    return tuple(sorted(values.items()))


def _first(view: KeyView, *keys: str) -> Shape | None:
    for key in keys:
        shape = view.shape(key)
        if shape is not None:
            return shape
    return None


# ---- Flux / Chroma / HunyuanVideo -----------------------------------------------------------

def _probe_flux(v: KeyView) -> bool:
    return v.has("double_blocks.0.img_attn.norm.key_norm.scale") and v.has("img_in.weight") \
        and not v.has("distilled_guidance_layer.in_proj.weight")


def _probe_chroma(v: KeyView) -> bool:
    return v.has("double_blocks.0.img_attn.norm.key_norm.scale") and v.has("distilled_guidance_layer.in_proj.weight")


def _probe_flux_diffusers(v: KeyView) -> bool:
    return v.has("x_embedder.weight") and v.has("single_transformer_blocks.0.proj_mlp.weight") \
        and not v.has("distilled_guidance_layer.in_proj.weight")


def _probe_chroma_diffusers(v: KeyView) -> bool:
    return v.has("x_embedder.weight") and v.has("distilled_guidance_layer.in_proj.weight")


def _mlp(v: KeyView, hidden: int, double: str, single: str) -> int:
    shape = v.shape(double)
    if shape:
        return shape[0]
    shape = v.shape(single)
    return shape[0] - 3 * hidden if shape else 4 * hidden


def _read_flux(v: KeyView) -> FluxConfig:
    h, inp = v.shape("img_in.weight")
    return FluxConfig(
        blocks=(v.count("double_blocks"), v.count("single_blocks")), hidden=h,
        head_dim=(_first(v, "double_blocks.0.img_attn.norm.query_norm.scale") or (128,))[0],
        mlp=_mlp(v, h, "double_blocks.0.img_mlp.0.weight", "single_blocks.0.linear1.weight"),
        in_features=inp, context=(v.shape("txt_in.weight") or (h, 4096))[1],
        vec_in=(v.shape("vector_in.in_layer.weight") or (h, 768))[1],
        guidance=v.has("guidance_in.in_layer.weight"),
        out_features=(v.shape("final_layer.linear.weight") or (64,))[0])


def _read_flux_diffusers(v: KeyView) -> FluxConfig:
    h, inp = v.shape("x_embedder.weight")
    return FluxConfig(
        blocks=(v.count("transformer_blocks"), v.count("single_transformer_blocks")), hidden=h,
        head_dim=(_first(v, "transformer_blocks.0.attn.norm_q.weight") or (128,))[0],
        mlp=(_first(v, "transformer_blocks.0.ff.net.0.proj.weight", "single_transformer_blocks.0.proj_mlp.weight")
             or (4 * h,))[0],
        in_features=inp, context=(v.shape("context_embedder.weight") or (h, 4096))[1],
        vec_in=(v.shape("time_text_embed.text_embedder.linear_1.weight") or (h, 768))[1],
        guidance=v.has("time_text_embed.guidance_embedder.linear_1.weight"),
        out_features=(v.shape("proj_out.weight") or (64,))[0])


def _read_chroma(v: KeyView) -> ChromaConfig:
    h, inp = v.shape("img_in.weight")
    a_hidden, a_in = v.shape("distilled_guidance_layer.in_proj.weight")
    return ChromaConfig(
        blocks=(v.count("double_blocks"), v.count("single_blocks")), hidden=h,
        head_dim=(_first(v, "double_blocks.0.img_attn.norm.query_norm.scale") or (128,))[0],
        mlp=_mlp(v, h, "double_blocks.0.img_mlp.0.weight", "single_blocks.0.linear1.weight"),
        in_features=inp, context=(v.shape("txt_in.weight") or (h, 4096))[1],
        out_features=(v.shape("final_layer.linear.weight") or (64,))[0],
        approximator=(a_in, a_hidden, v.count("distilled_guidance_layer.layers")))


def _read_chroma_diffusers(v: KeyView) -> ChromaConfig:
    h, inp = v.shape("x_embedder.weight")
    a_hidden, a_in = v.shape("distilled_guidance_layer.in_proj.weight")
    return ChromaConfig(
        blocks=(v.count("transformer_blocks"), v.count("single_transformer_blocks")), hidden=h,
        head_dim=(_first(v, "transformer_blocks.0.attn.norm_q.weight") or (128,))[0],
        mlp=(_first(v, "transformer_blocks.0.ff.net.0.proj.weight", "single_transformer_blocks.0.proj_mlp.weight")
             or (4 * h,))[0],
        in_features=inp, context=(v.shape("context_embedder.weight") or (h, 4096))[1],
        out_features=(v.shape("proj_out.weight") or (64,))[0],
        approximator=(a_in, a_hidden, v.count("distilled_guidance_layer.layers")))


def _probe_hunyuan(v: KeyView) -> bool:
    return v.has("txt_in.individual_token_refiner.blocks.0.norm1.weight")


def _probe_hunyuan_diffusers(v: KeyView) -> bool:
    return v.has("context_embedder.token_refiner.refiner_blocks.0.norm1.weight")


def _read_hunyuan(v: KeyView) -> HunyuanVideoConfig:
    h, inp = v.shape("img_in.proj.weight")[:2]
    vec = v.shape("vector_in.in_layer.weight")
    return HunyuanVideoConfig(
        blocks=(v.count("double_blocks"), v.count("single_blocks"), v.count("txt_in.individual_token_refiner.blocks")),
        hidden=h, head_dim=(_first(v, "double_blocks.0.img_attn.norm.query_norm.scale") or (128,))[0],
        mlp=_mlp(v, h, "double_blocks.0.img_mlp.0.weight", "single_blocks.0.linear1.weight"),
        in_channels=inp, context=(v.shape("txt_in.input_embedder.weight") or (h, 4096))[1],
        vec_in=vec[1] if vec else 0, guidance=v.has("guidance_in.in_layer.weight"),
        out_features=(v.shape("final_layer.linear.weight") or (64,))[0])


def _read_hunyuan_diffusers(v: KeyView) -> HunyuanVideoConfig:
    h, inp = v.shape("x_embedder.proj.weight")[:2]
    vec = v.shape("time_text_embed.text_embedder.linear_1.weight")
    return HunyuanVideoConfig(
        blocks=(v.count("transformer_blocks"), v.count("single_transformer_blocks"),
                v.count("context_embedder.token_refiner.refiner_blocks")),
        hidden=h, head_dim=(_first(v, "transformer_blocks.0.attn.norm_q.weight") or (128,))[0],
        mlp=(_first(v, "transformer_blocks.0.ff.net.0.proj.weight", "single_transformer_blocks.0.proj_mlp.weight")
             or (4 * h,))[0],
        in_channels=inp, context=(v.shape("context_embedder.proj_in.weight") or (h, 4096))[1],
        vec_in=vec[1] if vec else 0, guidance=v.has("time_text_embed.guidance_embedder.linear_1.weight"),
        out_features=(v.shape("proj_out.weight") or (64,))[0])


# ---- SD3 ------------------------------------------------------------------------------------

def _read_sd3(v: KeyView) -> SD3Config:
    h, inp = v.shape("x_embedder.proj.weight")[:2]
    depth = v.count("joint_blocks")
    pos = v.shape("pos_embed")
    return SD3Config(
        blocks=(depth,), hidden=h,
        dual_attention=tuple(i for i in range(depth) if v.has(f"joint_blocks.{i}.x_block.attn2.qkv.weight")),
        qk_norm=v.has("joint_blocks.0.x_block.attn.ln_q.weight"), pos_embed=pos[1] if pos else 36864,
        in_channels=inp, context=(v.shape("context_embedder.weight") or (h, 4096))[1],
        pooled=(v.shape("y_embedder.mlp.0.weight") or (h, 2048))[1],
        out_features=(v.shape("final_layer.linear.weight") or (64,))[0])


def _read_sd3_diffusers(v: KeyView) -> SD3Config:
    h, inp = v.shape("pos_embed.proj.weight")[:2]
    depth = v.count("transformer_blocks")
    pos = v.shape("pos_embed.pos_embed")
    return SD3Config(
        blocks=(depth,), hidden=h,
        dual_attention=tuple(i for i in range(depth) if v.has(f"transformer_blocks.{i}.attn2.to_q.weight")),
        qk_norm=v.has("transformer_blocks.0.attn.norm_q.weight"), pos_embed=pos[1] if pos else 36864,
        in_channels=inp, context=(v.shape("context_embedder.weight") or (h, 4096))[1],
        pooled=(v.shape("time_text_embed.text_embedder.linear_1.weight") or (h, 2048))[1],
        out_features=(v.shape("proj_out.weight") or (64,))[0])


# ---- Wan ------------------------------------------------------------------------------------

def _read_wan(v: KeyView) -> WanConfig:
    d = v.shape("head.modulation")[-1]
    image = v.shape("img_emb.proj.1.weight")
    return WanConfig(
        blocks=(v.count("blocks"),), dim=d, ffn=(v.shape("blocks.0.ffn.0.weight") or (4 * d,))[0],
        in_dim=(v.shape("patch_embedding.weight") or (d, 16))[1],
        out_dim=(v.shape("head.head.weight") or (64,))[0] // 4,
        image_cross_attention=v.has("blocks.0.cross_attn.k_img.weight") or image is not None,
        text_dim=(v.shape("text_embedding.0.weight") or (d, 4096))[1], image_dim=image[1] if image else 1280)


def _read_wan_diffusers(v: KeyView) -> WanConfig:
    d = v.shape("scale_shift_table")[-1]
    image = v.shape("condition_embedder.image_embedder.ff.net.0.proj.weight")
    return WanConfig(
        blocks=(v.count("blocks"),), dim=d, ffn=(v.shape("blocks.0.ffn.net.0.proj.weight") or (4 * d,))[0],
        in_dim=(v.shape("patch_embedding.weight") or (d, 16))[1],
        out_dim=(v.shape("proj_out.weight") or (64,))[0] // 4,
        image_cross_attention=v.has("blocks.0.attn2.add_k_proj.weight") or image is not None,
        text_dim=(v.shape("condition_embedder.text_embedder.linear_1.weight") or (d, 4096))[1],
        image_dim=image[1] if image else 1280)


# ---- Qwen-Image, HiDream --------------------------------------------------------------------

def _read_qwen(v: KeyView) -> QwenImageConfig:
    h, inp = v.shape("img_in.weight")
    return QwenImageConfig(
        blocks=(v.count("transformer_blocks"),), hidden=h,
        head_dim=(v.shape("transformer_blocks.0.attn.norm_q.weight") or (128,))[0], in_features=inp,
        context=(v.shape("txt_in.weight") or (h, 3584))[1], out_features=(v.shape("proj_out.weight") or (64,))[0])


def _read_hidream(v: KeyView) -> HiDreamConfig:
    h, inp = v.shape("x_embedder.proj.weight")
    first = "double_stream_blocks.0.block" if v.has("double_stream_blocks.0.block.adaLN_modulation.1.weight") \
        else "single_stream_blocks.0.block"
    captions = []
    while (shape := v.shape(f"caption_projection.{len(captions)}.linear.weight")) is not None:
        captions.append(shape[1])
    return HiDreamConfig(
        blocks=(v.count("double_stream_blocks"), v.count("single_stream_blocks")), hidden=h,
        experts=v.count(f"{first}.ff_i.experts"),
        expert_ffn=(v.shape(f"{first}.ff_i.experts.0.w1.weight") or (6912,))[0],
        shared_ffn=(v.shape(f"{first}.ff_i.shared_experts.w1.weight") or (3584,))[0], in_features=inp,
        pooled=(v.shape("p_embedder.pooled_embedder.linear_1.weight") or (h, 2048))[1],
        caption=captions[0] if len(captions) > 1 else 4096, caption_t5=captions[-1] if captions else 4096,
        out_features=(v.shape("final_layer.linear.weight") or (64,))[0])


# ---- Lumina 2, Z-Image ----------------------------------------------------------------------

def _read_nextdit(v: KeyView, cls, adaln: str, names: dict[str, str]):
    d, inp = v.shape(names["x"])
    head = (v.shape(names["q_norm"]) or (d // 24,))[0]
    kv_rows = names["kv"](v)
    return cls(
        blocks=(v.count("layers"), v.count("noise_refiner"), v.count("context_refiner")), dim=d, heads=d // head,
        kv_heads=(kv_rows // head) if kv_rows else d // head, ffn=(v.shape(names["w1"]) or (4 * d,))[0],
        adaln=(v.shape(adaln) or (0, min(d, 1024)))[1], caption=(v.shape(names["cap"]) or (d, d))[1],
        in_features=inp, out_features=(v.shape(names["out"]) or (64,))[0])


def _qkv_kv(key: str) -> Callable[[KeyView], int | None]:
    def read(v: KeyView) -> int | None:
        shape = v.shape(key)
        return None if shape is None else (shape[0] - shape[1]) // 2
    return read


def _split_kv(key: str) -> Callable[[KeyView], int | None]:
    def read(v: KeyView) -> int | None:
        shape = v.shape(key)
        return None if shape is None else shape[0]
    return read


_LUMINA_NATIVE = {"x": "x_embedder.weight", "q_norm": "layers.0.attention.q_norm.weight",
                  "kv": _qkv_kv("layers.0.attention.qkv.weight"), "w1": "layers.0.feed_forward.w1.weight",
                  "cap": "cap_embedder.1.weight", "out": "final_layer.linear.weight"}
_LUMINA_DIFFUSERS = {"x": "x_embedder.weight", "q_norm": "layers.0.attn.norm_q.weight",
                     "kv": _split_kv("layers.0.attn.to_k.weight"), "w1": "layers.0.feed_forward.linear_1.weight",
                     "cap": "time_caption_embed.caption_embedder.1.weight", "out": "norm_out.linear_2.weight"}
_Z_NATIVE = dict(_LUMINA_NATIVE)
_Z_DIFFUSERS = {"x": "all_x_embedder.2-1.weight", "q_norm": "layers.0.attention.norm_q.weight",
                "kv": _split_kv("layers.0.attention.to_k.weight"), "w1": "layers.0.feed_forward.w1.weight",
                "cap": "cap_embedder.1.weight", "out": "all_final_layer.2-1.linear.weight"}


def _probe_lumina(v: KeyView) -> bool:
    return v.has("cap_embedder.1.weight") and not v.has("layers.0.adaLN_modulation.0.weight")


def _probe_z_image(v: KeyView) -> bool:
    return v.has("cap_embedder.1.weight") and v.has("layers.0.adaLN_modulation.0.weight") \
        and v.has("layers.0.attention.qkv.weight")


# ---- the registry ---------------------------------------------------------------------------

FLUX_TEXT = {"clip_l": text.CLIP_L, "t5xxl": text.T5XXL}
SD3_TEXT = {"clip_l": text.CLIP_L, "clip_g": text.OPENCLIP_BIGG, "t5xxl": text.T5XXL}
_SD3_KOHYA = {"lora_te1_": "clip_l", "lora_te_": "clip_l", "lora_te2_": "clip_g", "lora_te3_": "t5xxl"}
_SD3_DIFFUSERS = {"text_encoder.": "clip_l", "text_encoder_2.": "clip_g", "text_encoder_3.": "t5xxl"}
_35M = tuple(range(13))

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(
        "flux", build_flux,
        {"flux-dev": FluxConfig(), "flux-schnell": FluxConfig(guidance=False),
         "flux-fill": FluxConfig(in_features=384), "flux-depth": FluxConfig(in_features=128)},
        FLUX_TEXT,
        # sd-scripts lora_flux writes lora_te1 (CLIP-L) and lora_te2 or, in older versions, lora_te3 (T5)
        {"lora_te1_": "clip_l", "lora_te_": "clip_l", "lora_te2_": "t5xxl", "lora_te3_": "t5xxl"},
        {"text_encoder.": "clip_l", "text_encoder_2.": "t5xxl"},
        _probe_flux, _probe_flux_diffusers, _read_flux, _read_flux_diffusers),
    Family(
        "chroma", build_chroma, {"chroma": ChromaConfig()}, {"t5xxl": text.T5XXL},
        {"lora_te1_": "t5xxl", "lora_te_": "t5xxl"}, {"text_encoder.": "t5xxl"},
        _probe_chroma, _probe_chroma_diffusers, _read_chroma, _read_chroma_diffusers),
    Family(
        "sd3", build_sd3,
        {"sd3-medium": SD3Config(), "sd3.5-medium": SD3Config(dual_attention=_35M, qk_norm=True, pos_embed=147456),
         "sd3.5-large": SD3Config(blocks=(38,), hidden=2432, qk_norm=True)},
        SD3_TEXT, _SD3_KOHYA, _SD3_DIFFUSERS,
        lambda v: v.has("joint_blocks.0.context_block.attn.qkv.weight"),
        lambda v: v.has("transformer_blocks.0.attn.add_q_proj.weight") and v.has("pos_embed.proj.weight"),
        _read_sd3, _read_sd3_diffusers),
    Family(
        "wan", build_wan,
        {"wan-t2v-14b": WanConfig(),
         "wan2.1-i2v-14b": WanConfig(in_dim=36, image_cross_attention=True),
         "wan2.2-i2v-a14b": WanConfig(in_dim=36),
         "wan2.1-t2v-1.3b": WanConfig(blocks=(30,), dim=1536, ffn=8960),
         "wan2.2-ti2v-5b": WanConfig(blocks=(30,), dim=3072, ffn=14336, in_dim=48, out_dim=48)},
        {"umt5xxl": text.UMT5XXL}, {}, {"text_encoder.": "umt5xxl"},
        lambda v: v.has("head.modulation"),
        lambda v: v.has("scale_shift_table") and v.has("condition_embedder.time_proj.weight"),
        _read_wan, _read_wan_diffusers),
    Family(
        "qwen_image", build_qwen_image, {"qwen-image": QwenImageConfig()}, {"qwen25_7b": text.QWEN25_7B},
        {}, {"text_encoder.": "qwen25_7b"},
        lambda v: v.has("txt_norm.weight") and v.has("img_in.weight"),
        lambda v: v.has("txt_norm.weight") and v.has("img_in.weight"),
        _read_qwen, _read_qwen),
    Family(
        "hunyuan_video", build_hunyuan_video, {"hunyuan-video": HunyuanVideoConfig()},
        {"clip_l": text.CLIP_L, "llama": text.LLAMA3_8B_LLAVA},
        {"lora_te1_": "clip_l", "lora_te_": "clip_l"}, {"text_encoder.": "llama", "text_encoder_2.": "clip_l"},
        _probe_hunyuan, _probe_hunyuan_diffusers, _read_hunyuan, _read_hunyuan_diffusers),
    Family(
        "lumina2", build_lumina2, {"lumina2": Lumina2Config()}, {"gemma2_2b": text.GEMMA2_2B},
        # sd-scripts lora_lumina: prefix lora_te on the Gemma2 model (ComfyUI drops these)
        {"lora_te_": "gemma2_2b", "lora_te1_": "gemma2_2b"}, {"text_encoder.": "gemma2_2b"},
        _probe_lumina, lambda v: v.has("time_caption_embed.caption_embedder.1.weight"),
        lambda v: _read_nextdit(v, Lumina2Config, "layers.0.adaLN_modulation.1.weight", _LUMINA_NATIVE),
        lambda v: _read_nextdit(v, Lumina2Config, "layers.0.norm1.linear.weight", _LUMINA_DIFFUSERS)),
    Family(
        "hidream", build_hidream, {"hidream-i1": HiDreamConfig()},
        {"clip_l": text.CLIP_L, "clip_g": text.OPENCLIP_BIGG, "t5xxl": text.T5XXL, "llama": text.LLAMA31_8B},
        {"lora_te1_": "clip_l", "lora_te_": "clip_l", "lora_te2_": "clip_g", "lora_te3_": "t5xxl"},
        {"text_encoder.": "clip_l", "text_encoder_2.": "clip_g", "text_encoder_3.": "t5xxl", "text_encoder_4.": "llama"},
        lambda v: v.has("caption_projection.0.linear.weight"), lambda v: v.has("caption_projection.0.linear.weight"),
        _read_hidream, _read_hidream),
    Family(
        "z_image", build_z_image, {"z-image": ZImageConfig()}, {}, {}, {},
        _probe_z_image, lambda v: v.has("all_x_embedder.2-1.weight"),
        lambda v: _read_nextdit(v, ZImageConfig, "layers.0.adaLN_modulation.0.weight", _Z_NATIVE),
        lambda v: _read_nextdit(v, ZImageConfig, "layers.0.adaLN_modulation.0.weight", _Z_DIFFUSERS)),
)}

# model probes run in ComfyUI's order: the first family whose probe fires wins
PROBE_ORDER = ("sd3", "hunyuan_video", "flux", "chroma", "z_image", "lumina2", "wan", "hidream", "qwen_image")
ADAPTER_ORDER = tuple(FAMILIES)  # ties between adapter guesses go to the earlier family


@cache
def variant_index() -> dict[str, tuple[str, object]]:
    """Every published variant name -> (family, config); a family name -> its first variant."""
    out: dict[str, tuple[str, object]] = {}
    for family in FAMILIES.values():
        for name, cfg in family.variants.items():
            out[name] = (family.name, cfg)
        out.setdefault(family.name, (family.name, next(iter(family.variants.values()))))
    return out


@cache
def table(family: str, cfg) -> Table:
    """The generated table of one configuration (cached: every config is a frozen dataclass)."""
    return FAMILIES[family].build(cfg)
