"""
The conditional U-Net of Stable Diffusion 1.x / LDM and its AutoencoderKL (VAE), from scratch in plain
PyTorch. Module names follow diffusers' state-dict keys (UNet2DConditionModel, AutoencoderKL), so a diffusers
folder loads with no renaming; the original single-file layout (CompVis) needs the key maps at the end of
this file.
"""
import functools
import math
import re
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from model_io import (BadInput, apply_key_map, build_and_load, check_fixed, dataclass_from_dict,
                      open_checkpoint)

# -----------------------------------------------------------------------------
# building blocks (module names follow diffusers' state-dict keys, so its layout maps 1:1)


def checkpointed(forward):
    """Gradient checkpointing for a module's forward: recomputed in backward when self.grad_ckpt is set
    (set_grad_checkpointing), so its activations are not kept. Pure forwards only."""
    @functools.wraps(forward)
    def wrapper(self, *args):
        if getattr(self, "grad_ckpt", False) and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, self, *args, use_reentrant=False)
        return forward(self, *args)
    return wrapper


def set_grad_checkpointing(model, on=True):
    """Turn gradient checkpointing of every @checkpointed block of a model on or off."""
    for m in model.modules():
        m.grad_ckpt = on
    return model


class ResnetBlock2D(nn.Module):
    """Residual block of SD/LDM (diffusers ResnetBlock2D): GN-SiLU-conv, + time, GN-SiLU-dropout-conv,
    + shortcut."""

    def __init__(self, in_ch, out_ch, temb_ch=None, groups=32, eps=1e-5, dropout=0.0):
        super().__init__()
        # registration order conv1, time_emb_proj, conv2, conv_shortcut = diffusers' (the LoRA import walks
        # it)
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch) if temb_ch else None  # the VAE has no time input
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    @checkpointed
    def forward(self, x, temb=None):
        """x (B, C_in, H, W), temb (B, temb_ch) or None -> (B, C_out, H, W)"""
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C_out, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (diffusers Downsample2D); padding 0 means pad right/bottom by one first (the
    VAE's)."""

    def __init__(self, ch, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):
        """x (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))"""
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 conv (diffusers Upsample2D)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        """x (B, C, H, W) -> (B, C, *size), size defaulting to (2H, 2W) (odd sizes: the skip's size)"""
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head (cross-)attention of the SD/LDM spatial transformer (diffusers Attention): q/k/v without
    bias."""

    def __init__(self, dim, heads, dim_head, context_dim=None, dropout=0.0, upcast=False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])

    def forward(self, x, context=None, bias=None):
        """x (B, N, dim); context (B, T, context_dim), None = self-attention; bias (B, 1, 1, T) additive or
        None"""
        context = x if context is None else context
        B, N, _ = x.shape
        T = context.shape[1]
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, H, N, D)
        k = self.to_k(context).view(B, T, self.heads, -1).transpose(1, 2)  # (B, H, T, D)
        v = self.to_v(context).view(B, T, self.heads, -1).transpose(1, 2)  # (B, H, T, D)
        if self.upcast:  # SD2.1's upcast_attention: scores in fp32 (a no-op in fp32)
            q, k, v = q.float(), k.float(), v.float()
            bias = None if bias is None else bias.float()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, N, D), scale 1/sqrt(D)
        out = out.transpose(1, 2).reshape(B, N, -1).to(x.dtype)  # (B, N, H*D)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """Gated GELU projection, exact-erf GELU (Shazeer 2020; diffusers GEGLU)."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        """x (B, N, dim) -> (B, N, inner)"""
        h, gate = self.proj(x).chunk(2, dim=-1)  # 2 x (B, N, inner)
        return h * F.gelu(gate)



class FeedForward(nn.Module):
    """GEGLU feed-forward dim -> mult*dim -> dim_out (diffusers FeedForward; keys net.0.proj, net.2)."""

    def __init__(self, dim, dim_out=None, mult=4, dropout=0.0):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim_out or dim)])

    def forward(self, x):
        """x (B, N, dim) -> (B, N, dim_out)"""
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention, GEGLU FF (LDM BasicTransformerBlock)."""

    def __init__(self, dim, heads, context_dim, dropout=0.0, upcast=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads, None, dropout, upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim, dropout, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x, context, bias=None):
        """x (B, N, dim), context (B, T, context_dim), bias (B, 1, 1, T) or None"""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, bias)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GN, 1x1 conv (or Linear) in, transformer blocks over the H*W tokens, out, residual (LDM
    SpatialTransformer, diffusers Transformer2DModel with continuous input)."""

    def __init__(self, ch, heads, depth, context_dim, groups=32, linear=False, dropout=0.0, upcast=False):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(ch, heads, context_dim, dropout, upcast) for _ in range(depth)])
        self.proj_out = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)

    @checkpointed
    def forward(self, x, context, bias=None):
        """x (B, C, H, W), context (B, T, D), bias (B, 1, 1, T) or None -> (B, C, H, W)"""
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, bias)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return h + x


class DownBlock(nn.Module):
    """One encoder level: resnets (each followed by a spatial transformer when attn is given), then a
    downsampler (diffusers CrossAttnDownBlock2D / DownBlock2D / DownEncoderBlock2D)."""

    def __init__(self, in_ch, out_ch, n_layers, temb_ch, groups, eps, dropout=0.0, downsample=True, padding=1,
                 attn=None):
        super().__init__()
        # attn: None, or kwargs of SpatialTransformer less ch; `attentions` registered before `resnets`
        # (diffusers)
        self.attentions = None
        if attn is not None:
            self.attentions = nn.ModuleList([SpatialTransformer(out_ch, **attn) for _ in range(n_layers)])
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_ch, groups, eps,
                                                    dropout) for j in range(n_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding)]) if downsample else None

    def forward(self, x, temb=None, context=None, bias=None):
        """x (B, C_in, H, W) -> (B, C_out, H', W') and the list of skip activations (U-Net)"""
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, bias)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """One decoder level: resnets (U-Net: on [x, skip] concatenated), each followed by a spatial transformer
    when attn is given, then an upsampler (diffusers CrossAttnUpBlock2D / UpBlock2D / UpDecoderBlock2D)."""

    def __init__(self, in_ch, out_ch, n_layers, temb_ch, groups, eps, dropout=0.0, upsample=True,
                 skip_chs=None, attn=None):
        super().__init__()
        skip_chs = skip_chs or [0] * n_layers  # the VAE decoder has no skips
        self.attentions = None
        if attn is not None:
            self.attentions = nn.ModuleList([SpatialTransformer(out_ch, **attn) for _ in range(n_layers)])
        self.resnets = nn.ModuleList([ResnetBlock2D((in_ch if j == 0 else out_ch) + skip_chs[j], out_ch,
                                                    temb_ch, groups, eps, dropout) for j in range(n_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x, skips=None, temb=None, context=None, bias=None, size=None):
        """x (B, C_in, H, W); skips: this block's skips, taken from the end (None for the VAE); size: the
        upsampler's output size (the next block's skips', odd where the encoder's were; None: 2x). The list
        is not changed (a wrapper's pre-forward hook, FSDP's, may pass a copy)."""
        for j, resnet in enumerate(self.resnets):
            if skips is not None:
                x = torch.cat([x, skips[-1 - j]], dim=1)  # (B, C + C_skip, H, W)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, bias)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class UNetMidBlock(nn.Module):
    """resnet, (spatial transformer, resnet) x depth-1 at the lowest resolution (diffusers
    UNetMidBlock2DCrossAttn)."""

    def __init__(self, ch, temb_ch, groups, eps, dropout, attn):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialTransformer(ch, **attn)])
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_ch, groups, eps, dropout) for _ in range(2)])

    def forward(self, x, temb, context, bias=None):
        """x (B, C, H, W) -> (B, C, H, W)"""
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context, bias), temb)


class TimestepEmbedding(nn.Module):
    """Linear-SiLU-Linear on the sinusoidal timestep features (diffusers TimestepEmbedding)."""

    def __init__(self, dim_in, dim):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        """x (B, dim_in) -> (B, dim)"""
        return self.linear_2(F.silu(self.linear_1(x)))


def timestep_features(t, dim, flip_sin_to_cos=True, freq_shift=0, max_period=10000):
    """Sinusoidal features of timesteps t (B,) -> (B, dim): [sin, cos] (or [cos, sin] flipped) of
    t * exp(-ln(max_period) i / (dim/2 - freq_shift)), computed in fp32 like diffusers'
    get_timestep_embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))  # (half,)
    args = t[:, None].float() * freqs[None]  # (B, half)
    cos_sin = [torch.cos(args), torch.sin(args)]
    emb = torch.cat(cos_sin if flip_sin_to_cos else cos_sin[::-1], dim=-1)  # (B, 2*half)
    return F.pad(emb, (0, dim % 2))


def _per_block(value, n, name):
    """int -> (int,)*n; a list/tuple must have one entry per block."""
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise BadInput(f"{name}={value!r} needs one entry per block ({n})")
    return tuple(value)


# -----------------------------------------------------------------------------
# the conditional U-Net of SD 1.x and LDM

UNET_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UNET_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers UNet2DConditionModel options this U-Net does not implement: the only accepted value of each
UNET_FIXED = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "mid_block_scale_factor": 1, "act_fn": "silu",
    "dual_cross_attention": False, "num_attention_heads": None, "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "class_embed_type": None, "num_class_embeds": None,
    "class_embeddings_concat": False, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "attention_type": "default", "cross_attention_norm": None,
}


@dataclass
class UNetConfig:
    """Field names and meanings of diffusers' UNet2DConditionModel config (defaults: SD1.4's
    unet/config.json)."""
    sample_size: int = 64  # latent side the model was trained at (64 = 512 px)
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                               "DownBlock2D")
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    # SD quirk: the number of HEADS (int, or one per block), head dim = ch // heads
    attention_head_dim: object = 8
    transformer_layers_per_block: object = 1  # int or one per block
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    use_linear_projection: bool = False  # SD2: proj_in/proj_out are Linear, else 1x1 convs
    upcast_attention: bool = False
    dropout: float = 0.0
    # SDXL: "text_time" adds Linear-SiLU-Linear(pooled text ++ sinusoids of the six size / crop ids) to the
    # time embedding; projection_class_embeddings_input_dim = pooled width + 6 * addition_time_embed_dim
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None

    def __post_init__(self):
        self.upcast_attention = bool(self.upcast_attention)  # SDXL's file says null: diffusers' False
        for f in ("block_out_channels", "down_block_types", "up_block_types"):
            setattr(self, f, tuple(getattr(self, f)))
        for f in ("attention_head_dim", "transformer_layers_per_block", "layers_per_block",
                  "cross_attention_dim"):
            v = getattr(self, f)
            if isinstance(v, (list, tuple)):
                setattr(self, f, v[0] if f in ("layers_per_block", "cross_attention_dim") and len(set(v)) == 1
                        else tuple(v))
        if not isinstance(self.layers_per_block, int) or not isinstance(self.cross_attention_dim, int):
            raise BadInput(f"UNetConfig: per-block layers_per_block / cross_attention_dim are not "
                           f"supported: {self.layers_per_block!r}, {self.cross_attention_dim!r}")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise BadInput(f"UNetConfig: {n} block_out_channels but {len(self.down_block_types)} down and "
                           f"{len(self.up_block_types)} up block types")
        bad = [t for t in self.down_block_types if t not in UNET_DOWN_TYPES]
        bad += [t for t in self.up_block_types if t not in UNET_UP_TYPES]
        if bad:
            raise BadInput(f"UNetConfig: unsupported block types {bad} "
                           f"(supported: {UNET_DOWN_TYPES + UNET_UP_TYPES})")
        heads = _per_block(self.attention_head_dim, n, "attention_head_dim")
        _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        if self.addition_embed_type not in (None, "text_time"):
            raise BadInput(f"UNetConfig: addition_embed_type {self.addition_embed_type!r} is not supported "
                           f"(None, or SDXL's text_time)")
        if self.addition_embed_type and not (self.addition_time_embed_dim and
                                             self.projection_class_embeddings_input_dim):
            raise BadInput("UNetConfig: text_time needs addition_time_embed_dim and "
                           "projection_class_embeddings_input_dim")
        for c, h in zip(self.block_out_channels, heads):
            if c % h or c % self.norm_num_groups:
                raise BadInput(f"UNetConfig: {c} channels do not divide into {h} heads / "
                               f"{self.norm_num_groups} groups")

    @classmethod
    def from_diffusers(cls, d):
        """From a diffusers unet/config.json dict; unknown keys are ignored, unsupported values raise."""
        if d.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise BadInput(f"config is for a {d['_class_name']}, not a UNet2DConditionModel")
        check_fixed(d, UNET_FIXED, "UNetConfig")
        return dataclass_from_dict(cls, d)


UNET_PRESETS = {
    "sd14": UNetConfig(),
    "ldm": UNetConfig(cross_attention_dim=1280, sample_size=32),  # CompVis/ldm-text2im-large-256
    # stabilityai/stable-diffusion-xl-base-1.0: no attention at the first level, 1 / 2 / 10 transformer
    # layers (the mid block 10), linear projections, 2048-d context, pooled 1280 + 6 x 256 ids into the time
    "sdxl": UNetConfig(sample_size=128, block_out_channels=(320, 640, 1280),
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                       cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                       addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
}


class UNet(nn.Module):
    """Text-conditional U-Net of Stable Diffusion 1.x / LDM (Rombach et al. 2022; diffusers
    UNet2DConditionModel)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        ch, n, L = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
        heads = _per_block(cfg.attention_head_dim, n, "attention_head_dim")
        depth = _per_block(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")
        temb = 4 * ch[0]
        common = dict(temb_ch=temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout)

        def attn(i):
            return dict(heads=heads[i], depth=depth[i], context_dim=cfg.cross_attention_dim,
                        groups=cfg.norm_num_groups, linear=cfg.use_linear_projection, dropout=cfg.dropout,
                        upcast=cfg.upcast_attention)

        # registration order = diffusers': conv_in, time_embedding, down_blocks, up_blocks, mid_block,
        # conv_norm_out, conv_out (the LoRA import format walks modules in this order)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        if cfg.addition_embed_type == "text_time":  # SDXL's micro-conditions and pooled text
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)
        self.down_blocks = nn.ModuleList()
        skip_chs = [ch[0]]  # channels of every skip activation, in the order the encoder produces them
        for i, kind in enumerate(cfg.down_block_types):
            last = i == n - 1
            a = attn(i) if kind == "CrossAttnDownBlock2D" else None
            self.down_blocks.append(DownBlock(ch[max(i - 1, 0)], ch[i], L, downsample=not last,
                                              padding=cfg.downsample_padding, attn=a, **common))
            skip_chs += [ch[i]] * (L + (not last))
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            level = n - 1 - i
            skips = [skip_chs.pop() for _ in range(L + 1)]
            a = attn(level) if kind == "CrossAttnUpBlock2D" else None
            self.up_blocks.append(UpBlock(ch[min(level + 1, n - 1)], ch[level], L + 1, upsample=level > 0,
                                          skip_chs=skips, attn=a, **common))
        self.mid_block = UNetMidBlock(ch[-1], attn=attn(n - 1), **common)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, x, t, context, context_mask=None, text_embeds=None, time_ids=None):
        """x (B, C, h, w) noisy latents; t (B,) or a scalar (int, float, 0-d tensor); context (B, T, D);
        context_mask (B, T) bool or 0/1, 1 = attend (diffusers' encoder_attention_mask). SDXL (text_time):
        text_embeds (B, P) pooled text, time_ids (B, 6) = original size (h, w), crop top-left (y, x),
        target size (h, w), in pixels. Returns eps (B, C_out, h, w)."""
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0 or t.numel() == 1:
            t = t.reshape(1).expand(B)  # (B,)
        if t.shape != (B,):
            raise BadInput(f"t must be a scalar or of shape ({B},), got {tuple(t.shape)}")
        if context.dim() != 3 or context.shape[0] != B or context.shape[2] != self.cfg.cross_attention_dim:
            raise BadInput(f"context must be (B={B}, T, {self.cfg.cross_attention_dim}), got "
                           f"{tuple(context.shape)}")
        bias = None
        if context_mask is not None:
            if context_mask.shape != context.shape[:2]:
                raise BadInput(f"context_mask must be {tuple(context.shape[:2])}, got "
                               f"{tuple(context_mask.shape)}")
            bias = ((1 - context_mask.to(x.dtype)) * -10000.0)[:, None, None, :]  # (B, 1, 1, T), as diffusers
        c = self.cfg
        temb = timestep_features(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)  # (B, C0)
        temb = self.time_embedding(temb.to(x.dtype))  # (B, 4*C0)
        if c.addition_embed_type == "text_time":
            temb = temb + self.add_embedding(self.text_time(text_embeds, time_ids, B).to(temb.dtype))

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, temb, context, bias)
            skips += s
        h = self.mid_block(h, temb, context, bias)
        for block in self.up_blocks:
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            h = block(h, mine, temb, context, bias, skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def text_time(self, text_embeds, time_ids, B):
        """SDXL's added condition: pooled text (B, P) ++ the sinusoids of the six ids, each
        addition_time_embed_dim wide (diffusers' add_time_proj) -> (B, projection_class_embeddings_input_dim).
        """
        c = self.cfg
        if text_embeds is None or time_ids is None:
            raise BadInput("this U-Net (SDXL, text_time) needs text_embeds (B, pooled) and time_ids (B, 6)")
        want = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        if text_embeds.shape != (B, want) or time_ids.shape != (B, 6):
            raise BadInput(f"text_embeds must be ({B}, {want}) and time_ids ({B}, 6), got "
                           f"{tuple(text_embeds.shape)} and {tuple(time_ids.shape)}")
        ids = timestep_features(time_ids.flatten(), c.addition_time_embed_dim, c.flip_sin_to_cos,
                                c.freq_shift)  # (B * 6, addition_time_embed_dim)
        return torch.cat([text_embeds, ids.reshape(B, -1).to(text_embeds.dtype)], dim=-1)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """A diffusers unet folder, a pipeline folder (its unet/), or an original SD/LDM single file
        (.safetensors/.ckpt; config inferred from the tensor shapes)."""
        cfg, sd = _unet_checkpoint(path)
        return build_and_load(lambda: cls(cfg), sd, f"U-Net {path}", dtype, device)


# -----------------------------------------------------------------------------
# the AutoencoderKL (VAE) of SD 1.x / LDM

# diffusers AutoencoderKL options this VAE does not implement: the only accepted value of each
VAE_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
             "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
             "down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


@dataclass
class VAEConfig:
    """Field names of diffusers' AutoencoderKL config (defaults: SD1.4's vae/config.json)."""
    sample_size: int = 512
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # latents for the U-Net = scaling_factor * encoder mean (or sample)

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise BadInput(f"VAEConfig: channels {bad} do not divide into {self.norm_num_groups} groups")

    @classmethod
    def from_diffusers(cls, d):
        """From a diffusers vae/config.json dict; unknown keys are ignored, unsupported values raise."""
        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise BadInput(f"config is for a {d['_class_name']}, not an AutoencoderKL")
        check_fixed(d, VAE_FIXED, "VAEConfig")
        return dataclass_from_dict(cls, d)


VAE_PRESETS = {"sd": VAEConfig()}


class VAEAttention(nn.Module):
    """Single-head self-attention over the H*W positions with GN and residual (the VAE mid-block's; diffusers
    Attention with the new names group_norm, to_q, to_k, to_v, to_out.0)."""

    def __init__(self, ch, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch), nn.Dropout(0.0)])

    def forward(self, x):
        """x (B, C, H, W) -> (B, C, H, W)"""
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.to_q(h)[:, None], self.to_k(h)[:, None], self.to_v(h)[:, None]  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + h


class VAEMidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution of the VAE (diffusers UNetMidBlock2D)."""

    def __init__(self, ch, groups):
        super().__init__()
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)])
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, None, groups, 1e-6) for _ in range(2)])

    def forward(self, x):
        """x (B, C, H, W) -> (B, C, H, W)"""
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    """VAE encoder: image -> mean and logvar moments (LDM Encoder, double_z; diffusers Encoder)."""

    def __init__(self, cfg):
        super().__init__()
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, None, cfg.norm_num_groups, 1e-6,
                      downsample=i < n - 1, padding=0) for i in range(n)])
        self.mid_block = VAEMidBlock(ch[-1], cfg.norm_num_groups)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        """x (B, 3, H, W) -> (B, 2*latent, H/f, W/f)"""
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """VAE decoder: latent -> image (LDM Decoder; diffusers Decoder)."""

    def __init__(self, cfg):
        super().__init__()
        ch, n = cfg.block_out_channels[::-1], len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.up_blocks = nn.ModuleList([  # registered before mid_block, as diffusers
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, None, cfg.norm_num_groups, 1e-6,
                    upsample=i < n - 1) for i in range(n)])
        self.mid_block = VAEMidBlock(ch[0], cfg.norm_num_groups)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        """z (B, latent, h, w) -> (B, 3, h*f, w*f)"""
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class VAE(nn.Module):
    """KL-regularised autoencoder of SD 1.x / LDM (Rombach et al. 2022; diffusers AutoencoderKL)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def downscale(self):
        """Pixels per latent along each side: the encoder halves at every level but the last."""
        return 2 ** (len(self.cfg.block_out_channels) - 1)

    def encode(self, x):
        """x (B, 3, H, W) image in [-1, 1] -> (mean, logvar), each (B, latent, H/8, W/8) UNSCALED
        (multiply by cfg.scaling_factor for the U-Net); logvar clamped to [-30, 20]."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)  # 2 x (B, latent, h, w)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """z (B, latent, h, w) UNSCALED latents (divide U-Net latents by cfg.scaling_factor first) ->
        image (B, 3, 8h, 8w) nominally in [-1, 1] (not clamped, as diffusers)."""
        return self.decoder(self.post_quant_conv(z))

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """A diffusers vae folder (new or old attention names), a pipeline folder (its vae/ or vqvae/), or an
        original SD/LDM single file or bare VAE file (.safetensors/.ckpt; config inferred from the shapes)."""
        cfg, sd = _vae_checkpoint(path)
        return build_and_load(lambda: cls(cfg), sd, f"VAE {path}", dtype, device)


# -----------------------------------------------------------------------------
# checkpoint layouts: one pure (key, tensor) -> [(key, tensor)] map per layout, into diffusers names (= ours)

UNET_PREFIX = "model.diffusion_model."  # the U-Net inside an original SD/LDM single file
VAE_PREFIX = "first_stage_model."  # the VAE inside an original SD/LDM single file
SDXL_VAE_SCALING = 0.13025  # SGM's sd_xl_base.yaml scale_factor (SD 1.x: 0.18215)
# The rest of an original SD/LDM single file, skipped by both loaders (anything else is an error):
SINGLE_FILE_OTHER_PREFIXES = (
    "cond_stage_model.",  # the text encoder (CLIP in SD, LDMBert in LDM): loaded elsewhere
    "conditioner.",  # SDXL's two text encoders (conditioner.embedders.0 / .1): loaded elsewhere
    "model_ema.",  # EMA copies under flattened names (sd-v1-4-full-ema.ckpt); the plain weights are used
    "loss.",  # discriminator / LPIPS of a bare VAE training checkpoint
)
SINGLE_FILE_OTHER_KEYS = (  # the DDPM schedule buffers of the original LatentDiffusion module
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
)

_UNET_TOP_NAMES = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
                   "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
                   # SDXL's added conditions (SGM's label_emb, "sequential")
                   "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2."}
_UNET_RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                      "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def unet_key_from_original(key, tensor, layers_per_block=2):
    """Original SD/LDM U-Net name (prefix stripped) -> diffusers name. input_blocks/output_blocks are numbered
    consecutively, so the level and layer come from layers_per_block L: input_blocks.{(L+1)i+j+1}.0/.1 =
    down_blocks.i.resnets.j/attentions.j, input_blocks.{(L+1)(i+1)}.0.op = its downsampler;
    output_blocks.{(L+1)i+j} = up_blocks.i.resnets.j/attentions.j, its upsampler .1.conv (no attention) or
    .2.conv. Unknown keys pass through unchanged (the strict check reports them)."""
    L1 = layers_per_block + 1
    for old, new in _UNET_TOP_NAMES.items():
        if key.startswith(old):
            return [(new + key[len(old):], tensor)]
    if m := re.match(r"input_blocks\.(\d+)\.0\.op\.(.*)", key):
        return [(f"down_blocks.{int(m[1]) // L1 - 1}.downsamplers.0.conv.{m[2]}", tensor)]
    if m := re.match(r"output_blocks\.(\d+)\.[12]\.conv\.(.*)", key):
        return [(f"up_blocks.{int(m[1]) // L1}.upsamplers.0.conv.{m[2]}", tensor)]
    if m := re.match(r"input_blocks\.(\d+)\.([01])\.(.*)", key):
        i, j = divmod(int(m[1]) - 1, L1)
        key = f"down_blocks.{i}.{('resnets', 'attentions')[int(m[2])]}.{j}.{m[3]}"
    elif m := re.match(r"output_blocks\.(\d+)\.([01])\.(.*)", key):
        i, j = divmod(int(m[1]), L1)
        key = f"up_blocks.{i}.{('resnets', 'attentions')[int(m[2])]}.{j}.{m[3]}"
    elif m := re.match(r"middle_block\.([012])\.(.*)", key):
        key = "mid_block." + ("resnets.0", "attentions.0", "resnets.1")[int(m[1])] + "." + m[2]
    resnet_part = r"in_layers\.[02]|emb_layers\.1|out_layers\.[03]|skip_connection"
    if m := re.match(rf"(.*\.resnets\.\d+\.)({resnet_part})\.(.*)", key):
        key = m[1] + _UNET_RESNET_NAMES[m[2]] + "." + m[3]
    # spatial transformers (norm, proj_in, transformer_blocks.*, proj_out) already have diffusers' names
    return [(key, tensor)]


def vae_key_from_original(key, tensor, num_levels=4):
    """Original SD/LDM VAE name (prefix stripped) -> diffusers name. The decoder's up.{k} counts from the
    LOWEST resolution's opposite end: up.{k} = up_blocks.{num_levels-1-k}. The mid attention's 1x1 convs
    become Linear weights (squeezed). Unknown keys pass through unchanged."""
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    if m := re.match(r"decoder\.up\.(\d+)\.(block|upsample)\.(.*)", key):
        i = num_levels - 1 - int(m[1])
        key = f"decoder.up_blocks.{i}." + ("resnets." if m[2] == "block" else "upsamplers.0.") + m[3]
    key = re.sub(r"\.mid\.block_([12])\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", key)
    if m := re.match(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", key):
        new = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}[m[2]]
        key = f"{m[1]}.mid_block.attentions.0.{new}.{m[3]}"
        if tensor.dim() == 4:  # (C, C, 1, 1) conv -> (C, C) linear
            tensor = tensor.reshape(tensor.shape[:2])
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    return [(key.replace(".nin_shortcut.", ".conv_shortcut."), tensor)]


def vae_key_from_old_diffusers(key, tensor):
    """VAE mid attention names of diffusers < 0.14 files (SD1.4's own vae/): query/key/value/proj_attn ->
    to_q/to_k/to_v/to_out.0 (all other names, and new files, pass through)."""
    m = re.match(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$", key)
    if m:
        new = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}[m[2]]
        key = m[1] + new + "." + m[3]
    return [(key, tensor)]


def _component(sd, prefix, path, what):
    """The keys under `prefix` (prefix stripped) of an original single file; the other components' keys are
    dropped (SINGLE_FILE_OTHER_*), anything else is an error."""
    mine, stray = {}, []
    others = tuple(p for p in (UNET_PREFIX, VAE_PREFIX) + SINGLE_FILE_OTHER_PREFIXES if p != prefix)
    for k, v in sd.items():
        if k.startswith(prefix):
            mine[k[len(prefix):]] = v
        elif not (k.startswith(others) or k in SINGLE_FILE_OTHER_KEYS):
            stray.append(k)
    if stray:
        raise BadInput(f"{path}: {len(stray)} keys belong to no known component of an SD/LDM single file "
                       f"(the {what} lives under '{prefix}'): {', '.join(sorted(stray)[:10])}")
    return mine


def _count(sd, pattern):
    """How many distinct values the (\\d+) group of `pattern` takes over the keys of sd."""
    return len({m[1] for k in sd if (m := re.match(pattern, k))})


def infer_unet_config(sd):
    """UNetConfig from the names and shapes of a diffusers-layout U-Net state dict. Head count, norm groups
    and eps are not in the tensors: SD1.x/LDM conventions are assumed (8 heads at every level, 32 groups, eps
    1e-5); Linear proj_in (SD2.x layout) means heads of 64 channels, as SD2's configs."""
    n = _count(sd, r"down_blocks\.(\d+)\.")
    ch = tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n))
    cross = next(v.shape[1] for key, v in sd.items() if key.endswith("attn2.to_k.weight"))
    linear = sd["mid_block.attentions.0.proj_in.weight"].dim() == 2
    depth = [_count(sd, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") or 1
             for i in range(n)]
    depth[-1] = _count(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")  # diffusers: the last
    # SDXL: its added conditions' width is in the tensors, the 256 sinusoid width of each id is its convention
    added = sd.get("add_embedding.linear_1.weight")
    sdxl = {} if added is None else dict(addition_embed_type="text_time", addition_time_embed_dim=256,
                                         projection_class_embeddings_input_dim=added.shape[1])
    return UNetConfig(
        **sdxl,
        # LDM text2im-large-256 (32), SDXL (128) vs SD1.x at 512 px (64): a default only
        sample_size={1280: 32, 2048: 128}.get(cross, 64),
        in_channels=sd["conv_in.weight"].shape[1], out_channels=sd["conv_out.weight"].shape[0],
        block_out_channels=ch, layers_per_block=_count(sd, r"down_blocks\.0\.resnets\.(\d+)\."),
        down_block_types=tuple("CrossAttnDownBlock2D" if f"down_blocks.{i}.attentions.0.norm.weight" in sd
                               else "DownBlock2D" for i in range(n)),
        up_block_types=tuple("CrossAttnUpBlock2D" if f"up_blocks.{i}.attentions.0.norm.weight" in sd
                             else "UpBlock2D" for i in range(n)),
        attention_head_dim=tuple(c // 64 for c in ch) if linear else 8,
        transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else tuple(depth),
        cross_attention_dim=cross, use_linear_projection=linear)


def infer_vae_config(sd):
    """VAEConfig from the names and shapes of a diffusers-layout VAE state dict (32 groups and scaling_factor
    0.18215 assumed: SD1.x/LDM conventions, not in the tensors)."""
    n = _count(sd, r"encoder\.down_blocks\.(\d+)\.")
    return VAEConfig(
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
        block_out_channels=tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                                 for i in range(n)),
        layers_per_block=_count(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        latent_channels=sd["post_quant_conv.weight"].shape[0])


def _infer(fn, sd, path):
    """fn(sd), with a clear error when a tensor it reads is absent (an incomplete checkpoint)."""
    try:
        return fn(sd)
    except (KeyError, StopIteration) as e:
        raise BadInput(f"{path}: cannot infer the config, the checkpoint lacks {e or 'attn2.to_k weights'} "
                       "(incomplete file?)") from None


def _unet_checkpoint(path):
    """-> (UNetConfig, diffusers-layout state dict) for UNet.from_pretrained."""
    cfg, sd, is_folder = open_checkpoint(path, ("unet",), ("UNet2DConditionModel",), "U-Net")
    if is_folder:
        return UNetConfig.from_diffusers(cfg), sd
    if any(k.startswith(UNET_PREFIX) for k in sd):  # original SD/LDM single file
        sd = _component(sd, UNET_PREFIX, path, "U-Net")
    if "input_blocks.0.0.weight" in sd:  # original layout
        L = _count(sd, r"output_blocks\.(\d+)\.") // (_count(sd, r"input_blocks\.(\d+)\.0\.op\.") + 1) - 1
        sd = apply_key_map(sd, lambda k, v: unet_key_from_original(k, v, L))
        return _infer(infer_unet_config, sd, path), sd
    if "conv_in.weight" in sd and "time_embedding.linear_1.weight" in sd:  # diffusers layout, bare file
        if cfg is not None and cfg.get("_class_name") == "UNet2DConditionModel":
            return UNetConfig.from_diffusers(cfg), sd
        return _infer(infer_unet_config, sd, path), sd
    raise BadInput(f"{path} is not an SD/LDM U-Net checkpoint: no '{UNET_PREFIX}*', 'input_blocks.*' or "
                   f"diffusers 'conv_in.*'/'time_embedding.*' keys (it has e.g. {', '.join(list(sd)[:5])})")


def _vae_checkpoint(path):
    """-> (VAEConfig, diffusers-layout state dict with the new attention names) for VAE.from_pretrained."""
    cfg, sd, is_folder = open_checkpoint(path, ("vae", "vqvae"), ("AutoencoderKL",), "VAE")
    if is_folder:
        return VAEConfig.from_diffusers(cfg), apply_key_map(sd, vae_key_from_old_diffusers)
    sdxl = any(k.startswith("conditioner.") for k in sd)  # SDXL's single file: its VAE scales by 0.13025
    if any(k.startswith(VAE_PREFIX) for k in sd):  # original SD/LDM single file
        sd = _component(sd, VAE_PREFIX, path, "VAE")
    if "encoder.down.0.block.0.conv1.weight" in sd:  # original layout
        # bare VAE file: loss.*
        sd = {k: v for k, v in sd.items() if not k.startswith(SINGLE_FILE_OTHER_PREFIXES)}
        n = _count(sd, r"encoder\.down\.(\d+)\.")
        sd = apply_key_map(sd, lambda k, v: vae_key_from_original(k, v, n))
        cfg = _infer(infer_vae_config, sd, path)
        return (replace(cfg, scaling_factor=SDXL_VAE_SCALING) if sdxl else cfg), sd
    if "encoder.conv_in.weight" in sd and "post_quant_conv.weight" in sd:  # diffusers layout, bare file
        sd = apply_key_map(sd, vae_key_from_old_diffusers)
        if cfg is not None and cfg.get("_class_name") == "AutoencoderKL":
            return VAEConfig.from_diffusers(cfg), sd
        return _infer(infer_vae_config, sd, path), sd
    raise BadInput(f"{path} is not an SD/LDM VAE (AutoencoderKL) checkpoint: no '{VAE_PREFIX}*', "
                   "'encoder.down.*' or diffusers 'encoder.conv_in.*' keys (it has e.g. "
                   f"{', '.join(list(sd)[:5])})")
