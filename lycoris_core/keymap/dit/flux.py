"""Flux.1, Chroma and HunyuanVideo: BFL double/single stream blocks with fused q/k/v.

Facts (ComfyUI a125cd84 comfy/ldm/flux, chroma, hunyuan_video; comfy/utils.py
flux_to_diffusers; diffusers' Flux/Chroma/HunyuanVideo transformers and their single-file
converters): a double block fuses q,k,v into `{img,txt}_attn.qkv` [3h, h]; a single block
fuses q,k,v and the MLP input into `linear1` [3h + mlp, h] and attention-out with MLP-out
into `linear2` [h, h + mlp]; diffusers splits q/k/v (`to_q`, `add_q_proj`, `proj_mlp`) and
orders `norm_out.linear` as (scale, shift). Chroma drops every per-block modulation and
adds the `distilled_guidance_layer`; HunyuanVideo reuses the blocks (20 + 40) with a token
refiner on the text input and ships checkpoints in Tencent's own names.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tables import IN, OUT, Table, block


@dataclass(frozen=True)
class FluxConfig:
    blocks: tuple[int, int] = (19, 38)  # double, single
    hidden: int = 3072
    head_dim: int = 128
    mlp: int = 12288
    in_features: int = 64  # img_in: 16 latent channels x 2x2; Fill 384, Depth/Canny 128
    context: int = 4096
    vec_in: int = 768
    guidance: bool = True  # dev, Kontext, Krea, Fill; schnell has no guidance_in
    out_features: int = 64


@dataclass(frozen=True)
class ChromaConfig:
    blocks: tuple[int, int] = (19, 38)
    hidden: int = 3072
    head_dim: int = 128
    mlp: int = 12288
    in_features: int = 64
    context: int = 4096
    out_features: int = 64
    approximator: tuple[int, int, int] = (64, 5120, 5)  # in, hidden, layers


@dataclass(frozen=True)
class HunyuanVideoConfig:
    blocks: tuple[int, int, int] = (20, 40, 2)  # double, single, token-refiner
    hidden: int = 3072
    head_dim: int = 128
    mlp: int = 12288
    in_channels: int = 16  # img_in.proj Conv3d, patch 1x2x2 (I2V: 33)
    context: int = 4096
    vec_in: int = 768
    guidance: bool = True
    out_features: int = 64


def _double(t: Table, i: int, h: int, d: int, mlp: int, modulation: bool) -> None:
    n, df, blk = f"double_blocks.{i}", f"transformer_blocks.{i}", block("D", i)
    for stream, ctx, q, k, v, out, norm in (
        ("img", "", "to_q", "to_k", "to_v", "to_out.0", ""),
        ("txt", "_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "_added"),
    ):
        if modulation:
            t.add(f"{n}.{stream}_mod.lin", (6 * h, h), block=blk)
            t.rename(f"{df}.norm1{ctx}.linear", f"{n}.{stream}_mod.lin")
        qkv = f"{n}.{stream}_attn.qkv"
        t.add(qkv, (3 * h, h), block=blk)
        t.split(qkv, ((f"{df}.attn.{q}", h), (f"{df}.attn.{k}", h), (f"{df}.attn.{v}", h)))
        for which, short in (("query", "q"), ("key", "k")):
            name = f"{n}.{stream}_attn.norm.{which}_norm"
            t.add(name, (d,), bias=False, block=blk, leaf="scale")
            t.rename(f"{df}.attn.norm{norm}_{short}", name)
        t.add(f"{n}.{stream}_attn.proj", (h, h), block=blk)
        t.rename(f"{df}.attn.{out}", f"{n}.{stream}_attn.proj")
        t.add(f"{n}.{stream}_mlp.0", (mlp, h), block=blk)
        t.rename(f"{df}.ff{ctx}.net.0.proj", f"{n}.{stream}_mlp.0")
        t.add(f"{n}.{stream}_mlp.2", (h, mlp), block=blk)
        t.rename(f"{df}.ff{ctx}.net.2", f"{n}.{stream}_mlp.2")


def _single(t: Table, i: int, h: int, d: int, mlp: int, modulation: bool) -> None:
    n, df, blk = f"single_blocks.{i}", f"single_transformer_blocks.{i}", block("S", i)
    t.add(f"{n}.linear1", (3 * h + mlp, h), block=blk)
    t.split(f"{n}.linear1", ((f"{df}.attn.to_q", h), (f"{df}.attn.to_k", h),
                             (f"{df}.attn.to_v", h), (f"{df}.proj_mlp", mlp)))
    t.alias(f"{n}.linear1_qkv", f"{n}.linear1", 0, 3 * h)  # USO / ComfyUI's linear1_qkv form
    t.add(f"{n}.linear2", (h, h + mlp), block=blk)
    t.rename(f"{df}.proj_out", f"{n}.linear2")
    for which, short in (("query", "q"), ("key", "k")):
        t.add(f"{n}.norm.{which}_norm", (d,), bias=False, block=blk, leaf="scale")
        t.rename(f"{df}.attn.norm_{short}", f"{n}.norm.{which}_norm")
    if modulation:
        t.add(f"{n}.modulation.lin", (3 * h, h), block=blk)
        t.rename(f"{df}.norm.linear", f"{n}.modulation.lin")


def _stream_blocks(t: Table, cfg, modulation: bool) -> None:
    """The double and single stream blocks and the final layer (its modulation only with `modulation`)."""
    h, d, mlp = cfg.hidden, cfg.head_dim, cfg.mlp
    for i in range(cfg.blocks[0]):
        _double(t, i, h, d, mlp, modulation)
    for i in range(cfg.blocks[1]):
        _single(t, i, h, d, mlp, modulation)
    t.add("final_layer.linear", (cfg.out_features, h), block=OUT)
    t.rename("proj_out", "final_layer.linear")
    if modulation:
        t.add("final_layer.adaLN_modulation.1", (2 * h, h), block=OUT)
        t.swap("norm_out.linear", "final_layer.adaLN_modulation.1")


def _xlabs(t: Table, doubles: int, singles: int) -> None:
    """XLabs / USO processor LoRAs (x-flux DoubleStreamBlockLoraProcessor and the single one).

    The single-block `proj_lora` is added to linear2's *output* (dim -> dim), which is not a
    delta of linear2's weight shape, so it has no alias here (reported unmatched).
    """
    for i in range(doubles):
        n = f"double_blocks.{i}"
        for index, stream in (("1", "img"), ("2", "txt")):
            t.alias(f"{n}.processor.qkv_lora{index}", f"{n}.{stream}_attn.qkv")
            t.alias(f"{n}.processor.proj_lora{index}", f"{n}.{stream}_attn.proj")
    for i in range(singles):
        n = f"single_blocks.{i}"
        h3 = t.splits[f"{n}.linear1"][0] * 3
        for name in ("qkv_lora", "qkv"):  # `qkv_lora.down.weight` reads as module `...processor.qkv`
            t.alias(f"{n}.processor.{name}", f"{n}.linear1", 0, h3)


def _mlp_embedder(t: Table, native: str, diffusers: str, out: int, inp: int) -> None:
    t.add(f"{native}.in_layer", (out, inp), block=IN)
    t.rename(f"{diffusers}.linear_1", f"{native}.in_layer")
    t.add(f"{native}.out_layer", (out, out), block=IN)
    t.rename(f"{diffusers}.linear_2", f"{native}.out_layer")


def build_flux(cfg: FluxConfig) -> Table:
    t = Table("flux", cfg)
    h = cfg.hidden
    t.add("img_in", (h, cfg.in_features), block=IN)
    t.rename("x_embedder", "img_in")
    _mlp_embedder(t, "time_in", "time_text_embed.timestep_embedder", h, 256)
    _mlp_embedder(t, "vector_in", "time_text_embed.text_embedder", h, cfg.vec_in)
    if cfg.guidance:
        _mlp_embedder(t, "guidance_in", "time_text_embed.guidance_embedder", h, 256)
    t.add("txt_in", (h, cfg.context), block=IN)
    t.rename("context_embedder", "txt_in")
    _stream_blocks(t, cfg, modulation=True)
    _xlabs(t, *cfg.blocks)
    return t


def build_chroma(cfg: ChromaConfig) -> Table:
    t = Table("chroma", cfg)
    h = cfg.hidden
    t.add("img_in", (h, cfg.in_features), block=IN)
    t.rename("x_embedder", "img_in")
    t.add("txt_in", (h, cfg.context), block=IN)
    t.rename("context_embedder", "txt_in")
    a_in, a_hidden, a_layers = cfg.approximator
    g = "distilled_guidance_layer"
    t.add(f"{g}.in_proj", (a_hidden, a_in), block=IN)
    t.rename(f"{g}.in_proj", f"{g}.in_proj")
    for j in range(a_layers):
        for native, diffusers in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
            t.add(f"{g}.layers.{j}.{native}", (a_hidden, a_hidden), block=IN)
            t.rename(f"{g}.layers.{j}.{diffusers}", f"{g}.layers.{j}.{native}")
        t.add(f"{g}.norms.{j}", (a_hidden,), bias=False, block=IN, leaf="scale")
        t.rename(f"{g}.norms.{j}", f"{g}.norms.{j}")
    t.add(f"{g}.out_proj", (h, a_hidden), block=IN)
    t.rename(f"{g}.out_proj", f"{g}.out_proj")
    _stream_blocks(t, cfg, modulation=False)
    _xlabs(t, *cfg.blocks)
    return t


# ComfyUI's load-time renames of Tencent's HunyuanVideo names (supported_models.py:828-842),
# read backwards: ComfyUI name piece -> Tencent name piece
_TENCENT = (
    ("_mod.lin", "_mod.linear"),
    ("_attn.qkv", "_attn_qkv"),
    ("_attn.proj", "_attn_proj"),
    ("mlp.0", "mlp.fc1"),
    ("mlp.2", "mlp.fc2"),
    (".modulation.lin", ".modulation.linear"),
)


def _tencent(name: str) -> str:
    """The Tencent module name of a ComfyUI HunyuanVideo module (musubi/diffusion-pipe names)."""
    out = name + "."
    for comfy, original in _TENCENT:
        out = out.replace(comfy + ".", original + ".")
    for embedder in ("time_in", "guidance_in", "txt_in.t_embedder"):
        out = out.replace(f"{embedder}.in_layer.", f"{embedder}.mlp.0.")
        out = out.replace(f"{embedder}.out_layer.", f"{embedder}.mlp.2.")
    out = out.replace("txt_in.c_embedder.in_layer.", "txt_in.c_embedder.linear_1.")
    out = out.replace("txt_in.c_embedder.out_layer.", "txt_in.c_embedder.linear_2.")
    out = out.replace("_attn.norm.query_norm.", "_attn_q_norm.").replace("_attn.norm.key_norm.", "_attn_k_norm.")
    out = out.replace(".norm.query_norm.", ".q_norm.").replace(".norm.key_norm.", ".k_norm.")
    return out[:-1]


def build_hunyuan_video(cfg: HunyuanVideoConfig) -> Table:
    t = Table("hunyuan_video", cfg)
    h, mlp = cfg.hidden, cfg.mlp
    t.add("img_in.proj", (h, cfg.in_channels, 1, 2, 2), block=IN)
    t.rename("x_embedder.proj", "img_in.proj")
    _mlp_embedder(t, "time_in", "time_text_embed.timestep_embedder", h, 256)
    if cfg.vec_in:
        _mlp_embedder(t, "vector_in", "time_text_embed.text_embedder", h, cfg.vec_in)
    if cfg.guidance:
        _mlp_embedder(t, "guidance_in", "time_text_embed.guidance_embedder", h, 256)
    t.add("txt_in.input_embedder", (h, cfg.context), block=IN)
    t.rename("context_embedder.proj_in", "txt_in.input_embedder")
    _mlp_embedder(t, "txt_in.t_embedder", "context_embedder.time_text_embed.timestep_embedder", h, 256)
    _mlp_embedder(t, "txt_in.c_embedder", "context_embedder.time_text_embed.text_embedder", h, cfg.context)
    for j in range(cfg.blocks[2]):
        n, df = f"txt_in.individual_token_refiner.blocks.{j}", f"context_embedder.token_refiner.refiner_blocks.{j}"
        for norm in ("norm1", "norm2"):
            t.add(f"{n}.{norm}", (h,), block=IN)
            t.rename(f"{df}.{norm}", f"{n}.{norm}")
        t.add(f"{n}.self_attn.qkv", (3 * h, h), block=IN)
        t.split(f"{n}.self_attn.qkv", ((f"{df}.attn.to_q", h), (f"{df}.attn.to_k", h), (f"{df}.attn.to_v", h)))
        for native, diffusers, shape in (("self_attn.proj", "attn.to_out.0", (h, h)), ("mlp.0", "ff.net.0.proj", (mlp, h)),
                                         ("mlp.2", "ff.net.2", (h, mlp)), ("adaLN_modulation.1", "norm_out.linear", (2 * h, h))):
            t.add(f"{n}.{native}", shape, block=IN)
            t.rename(f"{df}.{diffusers}", f"{n}.{native}")
    _stream_blocks(t, cfg, modulation=True)
    for name in list(t.natives):
        original = _tencent(name)
        if original != name:
            t.alias(original, name)
    return t
