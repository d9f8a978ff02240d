"""Module tables of SD1.5, SD2.1 and SDXL, generated from small configuration dicts.

Owns the facts: which weight-bearing modules each network has, their weight/bias shapes,
the diffusers <-> LDM (CompVis/SGM) name correspondence and the block ID of each module.
Pure python: no torch, no diffusers, no transformers (those only cross-check it in tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

Shape = tuple[int, ...]


@dataclass(frozen=True)
class UNetConfig:
    """The few numbers of a diffusers `UNet2DConditionModel` config that decide its weights."""

    block_out_channels: tuple[int, ...]
    has_attention: tuple[bool, ...]  # per down block (up blocks mirror it)
    transformer_depth: tuple[int, ...]  # per down block; the mid block uses the last one
    cross_attention_dim: int
    linear_projection: bool  # False: proj_in/proj_out are 1x1 convs (SD1)
    layers_per_block: int = 2
    in_channels: int = 4
    out_channels: int = 4
    addition_embed_dim: int | None = None  # SDXL "text_time": 2816


@dataclass(frozen=True)
class TextConfig:
    """A CLIP text transformer (HF layout); OpenCLIP checkpoints hold the same weights."""

    hidden: int
    layers: int
    intermediate: int
    projection_dim: int
    vocab: int = 49408
    positions: int = 77


SD15_UNET = UNetConfig((320, 640, 1280, 1280), (True, True, True, False), (1, 1, 1, 1), 768, False)
SD21_UNET = UNetConfig((320, 640, 1280, 1280), (True, True, True, False), (1, 1, 1, 1), 1024, True)
SDXL_UNET = UNetConfig(
    (320, 640, 1280), (False, True, True), (1, 2, 10), 2048, True, addition_embed_dim=2816
)
CLIP_L = TextConfig(768, 12, 3072, 768)
OPENCLIP_H = TextConfig(1024, 24, 4096, 1024)
OPENCLIP_BIGG = TextConfig(1280, 32, 5120, 1280)


@dataclass(frozen=True)
class ModuleSpec:
    """One weight-bearing module: canonical name (diffusers for the UNet, HF CLIP for text)."""

    part: str  # "unet" | "te1" | "te2"
    name: str
    ldm: str | None  # LDM/SGM name (UNet only)
    weight: Shape
    bias: Shape | None
    block: str | None  # INnn / M00 / OUTnn / BASE / None


@dataclass(frozen=True)
class Architecture:
    name: str
    unet: UNetConfig
    te1: TextConfig
    te2: TextConfig | None
    diffusers_te1_layers: int  # diffusers' SD2 text_encoder drops the last of 24 layers


ARCHITECTURES = {
    "sd1": Architecture("sd1", SD15_UNET, CLIP_L, None, 12),
    "sd2": Architecture("sd2", SD21_UNET, OPENCLIP_H, None, 23),
    "sdxl": Architecture("sdxl", SDXL_UNET, CLIP_L, OPENCLIP_BIGG, 12),
}

# diffusers resnet child -> LDM ResBlock child
_RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def block_id(ldm_name: str) -> str | None:
    """INnn / M00 / OUTnn from an LDM module name; None outside every block."""
    head, _, rest = ldm_name.partition(".")
    if head == "middle_block":
        return "M00"
    if head in ("input_blocks", "output_blocks"):
        index = int(rest.split(".", 1)[0])
        return f"{'IN' if head == 'input_blocks' else 'OUT'}{index:02d}"
    return None


class _UNetBuilder:
    """Walks the UNet in diffusers order and records every module in both namings."""

    def __init__(self, cfg: UNetConfig):
        self.cfg = cfg
        self.specs: list[ModuleSpec] = []
        self.temb = 4 * cfg.block_out_channels[0]

    def add(self, name: str, ldm: str, weight: Shape, bias: bool = True) -> None:
        bias_shape = (weight[0],) if bias else None
        self.specs.append(ModuleSpec("unet", name, ldm, weight, bias_shape, block_id(ldm)))

    def conv(self, name: str, ldm: str, out_ch: int, in_ch: int, k: int = 3) -> None:
        self.add(name, ldm, (out_ch, in_ch, k, k))

    def linear(self, name: str, ldm: str, out_f: int, in_f: int, bias: bool = True) -> None:
        self.add(name, ldm, (out_f, in_f), bias)

    def norm(self, name: str, ldm: str, ch: int) -> None:
        self.add(name, ldm, (ch,))

    def resnet(self, name: str, ldm: str, in_ch: int, out_ch: int) -> None:
        def sub(child: str) -> tuple[str, str]:
            return f"{name}.{child}", f"{ldm}.{_RESNET_LDM[child]}"

        self.norm(*sub("norm1"), in_ch)
        self.conv(*sub("conv1"), out_ch, in_ch)
        self.linear(*sub("time_emb_proj"), out_ch, self.temb)
        self.norm(*sub("norm2"), out_ch)
        self.conv(*sub("conv2"), out_ch, out_ch)
        if in_ch != out_ch:
            self.conv(*sub("conv_shortcut"), out_ch, in_ch, 1)

    def transformer(self, name: str, ldm: str, ch: int, depth: int) -> None:
        cross = self.cfg.cross_attention_dim
        proj: Shape = (ch, ch) if self.cfg.linear_projection else (ch, ch, 1, 1)
        self.norm(f"{name}.norm", f"{ldm}.norm", ch)
        self.add(f"{name}.proj_in", f"{ldm}.proj_in", proj)
        for t in range(depth):
            tb = f"transformer_blocks.{t}"
            for child, shape, bias in (
                ("norm1", (ch,), True),
                ("attn1.to_q", (ch, ch), False),
                ("attn1.to_k", (ch, ch), False),
                ("attn1.to_v", (ch, ch), False),
                ("attn1.to_out.0", (ch, ch), True),
                ("norm2", (ch,), True),
                ("attn2.to_q", (ch, ch), False),
                ("attn2.to_k", (ch, cross), False),
                ("attn2.to_v", (ch, cross), False),
                ("attn2.to_out.0", (ch, ch), True),
                ("norm3", (ch,), True),
                ("ff.net.0.proj", (8 * ch, ch), True),  # GEGLU: value and gate halves
                ("ff.net.2", (ch, 4 * ch), True),
            ):
                self.add(f"{name}.{tb}.{child}", f"{ldm}.{tb}.{child}", shape, bias)
        self.add(f"{name}.proj_out", f"{ldm}.proj_out", proj)

    def build(self) -> tuple[ModuleSpec, ...]:
        cfg = self.cfg
        chans, n_layers, n = (
            cfg.block_out_channels,
            cfg.layers_per_block,
            len(cfg.block_out_channels),
        )
        self.conv("conv_in", "input_blocks.0.0", chans[0], cfg.in_channels)
        self.linear("time_embedding.linear_1", "time_embed.0", self.temb, chans[0])
        self.linear("time_embedding.linear_2", "time_embed.2", self.temb, self.temb)
        if cfg.addition_embed_dim:
            self.linear(
                "add_embedding.linear_1", "label_emb.0.0", self.temb, cfg.addition_embed_dim
            )
            self.linear("add_embedding.linear_2", "label_emb.0.2", self.temb, self.temb)

        in_ch = chans[0]
        for i, ch in enumerate(chans):
            for j in range(n_layers):
                ldm = f"input_blocks.{1 + i * (n_layers + 1) + j}"
                self.resnet(f"down_blocks.{i}.resnets.{j}", f"{ldm}.0", in_ch, ch)
                in_ch = ch
                if cfg.has_attention[i]:
                    depth = cfg.transformer_depth[i]
                    self.transformer(f"down_blocks.{i}.attentions.{j}", f"{ldm}.1", ch, depth)
            if i < n - 1:
                ldm = f"input_blocks.{(i + 1) * (n_layers + 1)}.0.op"
                self.conv(f"down_blocks.{i}.downsamplers.0.conv", ldm, ch, ch)

        mid = chans[-1]
        self.resnet("mid_block.resnets.0", "middle_block.0", mid, mid)
        self.transformer("mid_block.attentions.0", "middle_block.1", mid, cfg.transformer_depth[-1])
        self.resnet("mid_block.resnets.1", "middle_block.2", mid, mid)

        rev = chans[::-1]
        prev_out = rev[0]
        for i, ch in enumerate(rev):
            skip_in = rev[min(i + 1, n - 1)]
            down_index = n - 1 - i
            attn = cfg.has_attention[down_index]
            for j in range(n_layers + 1):
                ldm = f"output_blocks.{i * (n_layers + 1) + j}"
                res_in = prev_out if j == 0 else ch
                skip = skip_in if j == n_layers else ch
                self.resnet(f"up_blocks.{i}.resnets.{j}", f"{ldm}.0", res_in + skip, ch)
                if attn:
                    depth = cfg.transformer_depth[down_index]
                    self.transformer(f"up_blocks.{i}.attentions.{j}", f"{ldm}.1", ch, depth)
            if i < n - 1:
                ldm = f"output_blocks.{i * (n_layers + 1) + n_layers}.{2 if attn else 1}.conv"
                self.conv(f"up_blocks.{i}.upsamplers.0.conv", ldm, ch, ch)
            prev_out = ch

        self.norm("conv_norm_out", "out.0", chans[0])
        self.conv("conv_out", "out.2", cfg.out_channels, chans[0])
        return tuple(self.specs)


def text_modules(cfg: TextConfig, part: str, layers: int | None = None) -> tuple[ModuleSpec, ...]:
    """HF CLIP text modules (`text_model.*` plus `text_projection`), all in block BASE."""
    c, f = cfg.hidden, cfg.intermediate
    rows: list[tuple[str, Shape, Shape | None]] = [
        ("text_model.embeddings.token_embedding", (cfg.vocab, c), None),
        ("text_model.embeddings.position_embedding", (cfg.positions, c), None),
    ]
    for n in range(cfg.layers if layers is None else layers):
        layer = f"text_model.encoder.layers.{n}"
        rows += [
            (f"{layer}.self_attn.k_proj", (c, c), (c,)),
            (f"{layer}.self_attn.v_proj", (c, c), (c,)),
            (f"{layer}.self_attn.q_proj", (c, c), (c,)),
            (f"{layer}.self_attn.out_proj", (c, c), (c,)),
            (f"{layer}.layer_norm1", (c,), (c,)),
            (f"{layer}.mlp.fc1", (f, c), (f,)),
            (f"{layer}.mlp.fc2", (c, f), (c,)),
            (f"{layer}.layer_norm2", (c,), (c,)),
        ]
    rows += [
        ("text_model.final_layer_norm", (c,), (c,)),
        ("text_projection", (cfg.projection_dim, c), None),
    ]
    return tuple(ModuleSpec(part, name, None, w, b, "BASE") for name, w, b in rows)


@cache
def modules(arch: str) -> tuple[ModuleSpec, ...]:
    """Every weight-bearing module of an architecture (UNet, then te1, then te2)."""
    a = ARCHITECTURES[arch]
    specs = _UNetBuilder(a.unet).build() + text_modules(a.te1, "te1")
    if a.te2 is not None:
        specs += text_modules(a.te2, "te2")
    return specs


@cache
def diffusers_to_ldm(arch: str) -> dict[str, str]:
    """The diffusers -> LDM/SGM module-name correspondence of the UNet."""
    return {s.name: s.ldm for s in modules(arch) if s.part == "unet" and s.ldm is not None}


@cache
def spec_index(arch: str) -> dict[tuple[str, str], ModuleSpec]:
    """(part, canonical name) -> ModuleSpec."""
    return {(s.part, s.name): s for s in modules(arch)}
