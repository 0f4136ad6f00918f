"""
The SD1.x / LDM conditional U-Net and the AutoencoderKL (VAE), from scratch, plus the checkpoint
I/O that every model file of this repo shares (read a weight file, verify a state dict strictly).
"""
import functools
import json
import math
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------
# checkpoint I/O shared by unet.py, dit.py, adapter.py, lora.py

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")


def load_weights(path):
    """Read a weight file into a flat {name: tensor} dict on the CPU.
    .safetensors via safetensors; .bin/.ckpt/.pth/.pt via torch.load(weights_only=True).
    A nested {"state_dict": ...} (original .ckpt / PixArt .pth) is unwrapped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            sd = load_file(path, device="cpu")
        except Exception as e:  # truncated or not a safetensors file at all
            raise ValueError(f"cannot read {path} as safetensors (truncated or corrupt?): {e}") from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            try:  # old (non-zip) torch files cannot be memory-mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"cannot read {path} as a torch weight file (truncated, corrupt, "
                                 f"or it needs pickled code, which we refuse to run): {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors")
    return sd


def find_weight_file(folder):
    """The weight file of a diffusers/transformers component folder, safetensors preferred."""
    for name in WEIGHT_NAMES:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"no weight file in {folder} (looked for {', '.join(WEIGHT_NAMES)})")


def read_config(folder):
    """config.json of a component folder as a dict, or None when absent."""
    p = os.path.join(folder, "config.json")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return json.load(f)


def check_state_dict(module, sd, what="model"):
    """Equal key sets and equal shapes, or one ValueError naming missing, unexpected and mis-shaped keys."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    misshaped = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or misshaped:
        def show(keys, fmt=str):
            return ", ".join(fmt(k) for k in keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
        lines = [f"{what}: the checkpoint does not fit this architecture"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {show(unexpected)}")
        if misshaped:
            lines.append(f"  wrong shape ({len(misshaped)}): " + show(misshaped, lambda k: f"{k} {got[k]} != {want[k]}"))
        raise ValueError("\n".join(lines))


def load_strict(module, sd, what="model"):
    """Verify strictly, then load. A module built on the meta device takes the tensors in place
    (assign=True), so a full checkpoint never needs two copies in memory."""
    check_state_dict(module, sd, what)
    on_meta = any(p.is_meta for p in module.parameters())
    dtype = next(module.parameters()).dtype
    if on_meta:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=on_meta)
    return module


def build_and_load(build, sd, what, dtype=torch.float32, device="cpu"):
    """build() on the meta device (no init work, no memory), the checkpoint's tensors assigned to it strictly
    (load_strict) in `dtype`, then moved to `device`, in eval mode: every from_pretrained of the repo."""
    with torch.device("meta"):
        model = build()
    return load_strict(model.to(dtype), sd, what).to(device).eval()


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


# CPU: oneDNN reorders a conv weight into its blocked layout at EVERY call; for the deep levels of a U-Net (many
# channels, few pixels) that reorder costs more than the convolution. PackedConv2d reorders once.
# Measured (fp32, one thread, 3x3 convs of the sd14 U-Net's sizes): where weight.numel() >= 5 x input.numel() the
# packed conv takes 0.3-0.9x the time of F.conv2d (0.3x: 1280 channels at 8x8); below that, 0.9-1.7x: left alone.
PACK_MIN_RATIO = 5


def _packed_conv(x, conv, transposed=False):
    w, pad = conv.packed_weight(x.shape, transposed)
    x = x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()  # either layout: oneDNN takes both
    return torch.ops.mkldnn._convolution_pointwise(x, w, None if transposed else conv.bias, pad,
                                                   conv.stride, conv.dilation, conv.groups, "none", [], "")


def _grad_padding(conv):
    """Padding of the conv that gives a stride-1 conv's input gradient from its output gradient with the flipped,
    transposed weight: d * (k - 1) - p per side; None where that does not apply (strides, negative padding)."""
    pad = tuple(d * (k - 1) - p for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation))
    return pad if conv.stride == (1, 1) and min(pad) >= 0 else None


class _FrozenPackedConv(torch.autograd.Function):
    """conv2d with a frozen, prepacked weight. The gradient reaches the input only: for stride 1 it is the conv
    of the output gradient with the flipped, transposed weight, itself packed; other convs use the plain weight."""

    @staticmethod
    def forward(ctx, x, conv):
        ctx.conv, ctx.shape = conv, x.shape
        return _packed_conv(x, conv)

    @staticmethod
    def backward(ctx, grad):
        c = ctx.conv
        if _grad_padding(c) is not None:
            return _packed_conv(grad, c, transposed=True), None
        return torch.nn.grad.conv2d_input(ctx.shape, c.weight, grad, c.stride, c.padding, c.dilation, c.groups), None


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state-dict keys) that, on a CPU in float32, hands oneDNN a weight
    reordered once per input shape when the weight is large against the input (PACK_MIN_RATIO) and does not
    train: sampling, and the frozen base of a LoRA layer. Anything else (CUDA, other dtypes, a weight that
    trains, small weights) takes nn.Conv2d's path. The packed copy costs the weight's memory once more (in
    training twice: forward, and backward to the input); it is rebuilt when the weight changes in place
    (merge_lora) or the input shape changes. pack_convs() turns a model's Conv2d layers into these."""

    def packed_weight(self, shape, transposed=False):
        """(packed weight, padding) for an input of this shape; transposed: for the gradient of the input.
        One copy per direction is kept, for the last input shape (a new shape repacks)."""
        version = (self.weight._version, self.weight.data_ptr())
        if getattr(self, "_packed_version", None) != version:  # new or changed weight: drop every packed copy
            self._packed, self._packed_version = {}, version
        shape = tuple(shape)
        if (self._packed.get(transposed) or (None,))[0] != shape:
            w, pad = self.weight.detach(), self.padding
            if transposed:  # grad_input = conv(grad, w^T flipped, _grad_padding)
                w, pad = w.transpose(0, 1).flip(2, 3).contiguous(), _grad_padding(self)
            self._packed[transposed] = None  # free the old copy before making the new one
            self._packed[transposed] = shape, torch.ops.mkldnn._reorder_convolution_weight(
                w, pad, self.stride, self.dilation, self.groups, list(shape)), pad
        return self._packed[transposed][1:]

    def forward(self, x):
        w, grad = self.weight, torch.is_grad_enabled()
        if (x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or x.dim() != 4
                or grad and (w.requires_grad or self.bias is not None and self.bias.requires_grad)
                or w.numel() < PACK_MIN_RATIO * x.numel()):
            return super().forward(x)
        return _FrozenPackedConv.apply(x, self) if grad and x.requires_grad else _packed_conv(x, self)


def can_pack():
    """oneDNN's prepacked convolution is in this torch build."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def pack_convs(model, on=True):
    """Turn every kxk (k > 1), ungrouped, zero-padded nn.Conv2d of a model into a PackedConv2d (on=False: back).
    Parameters and state dict are untouched; on a GPU or in training of the conv itself nothing changes."""
    if on and not can_pack():
        return model
    for m in model.modules():
        if on and type(m) is nn.Conv2d and m.kernel_size != (1, 1) and m.groups == 1 and m.padding_mode == "zeros" \
                and not isinstance(m.padding, str) and m.in_channels >= 64:
            m.__class__ = PackedConv2d
        elif not on and type(m) is PackedConv2d:
            m.__class__ = nn.Conv2d
            m.__dict__.pop("_packed", None), m.__dict__.pop("_packed_version", None)
    return model


def cpu_layout(model, on=True):
    """The CPU layout of a model's convolutions (on=False: back to the standard one): prepacked frozen weights
    (pack_convs) and channels-last 4-D weights, which make every conv's output, and so every activation after the
    first conv, channels-last (N, H, W, C in memory). Then the spatial transformer's (B, C, H, W) <-> (B, HW, C)
    permutes are free views, and oneDNN's convs with few channels run faster. The U-Net hands back a contiguous
    output; state-dict tensors stay channels-last until cpu_layout(model, False)."""
    pack_convs(model, on)
    return model.to(memory_format=torch.channels_last if on else torch.contiguous_format)


class ResnetBlock2D(nn.Module):
    """Residual block of SD/LDM (diffusers ResnetBlock2D): GN-SiLU-conv, + time, GN-SiLU-dropout-conv, + shortcut."""

    def __init__(self, in_ch, out_ch, temb_ch=None, groups=32, eps=1e-5, dropout=0.0):
        super().__init__()
        # registration order conv1, time_emb_proj, conv2, conv_shortcut = diffusers' (the LoRA import walks it)
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
    """Stride-2 3x3 conv (diffusers Downsample2D); padding 0 means pad right/bottom by one first (the VAE's)."""

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
    """Multi-head (cross-)attention of the SD/LDM spatial transformer (diffusers Attention): q/k/v without bias."""

    def __init__(self, dim, heads, dim_head, context_dim=None, dropout=0.0, upcast=False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])

    def forward(self, x, context=None, bias=None):
        """x (B, N, dim); context (B, T, context_dim), None = self-attention; bias (B, 1, 1, T) additive or None"""
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


# CPU: the GEGLU's (rows, 8*dim) activations of a 64x64 latent are 40-80 MB, above glibc's largest mmap threshold
# (32 MB), so each one is fresh memory whose pages fault in at every call (~0.5 ms/MB here). Rows in blocks of
# FF_CPU_ROWS keep them under it, reused from the heap. sd14's first-level feed-forward at 2x4096 rows, one thread:
# 0.82x the time, equal outputs (the ops are row-wise).
FF_CPU_ROWS = 1024


class FeedForward(nn.Module):
    """GEGLU feed-forward dim -> 4*dim -> dim (diffusers FeedForward; keys net.0.proj, net.2)."""

    def __init__(self, dim, dropout=0.0):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        """x (B, N, dim) -> (B, N, dim); on a CPU in blocks of FF_CPU_ROWS rows"""
        if x.device.type == "cpu" and x.shape[:-1].numel() > FF_CPU_ROWS:
            rows = x.reshape(-1, x.shape[-1]).split(FF_CPU_ROWS)
            return torch.cat([self.forward(r) for r in rows]).view(*x.shape[:-1], -1)
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
        self.ff = FeedForward(dim, dropout)

    def forward(self, x, context, bias=None):
        """x (B, N, dim), context (B, T, context_dim), bias (B, 1, 1, T) or None"""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, bias)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GN, 1x1 conv (or Linear) in, transformer blocks over the H*W tokens, out, residual (LDM SpatialTransformer,
    diffusers Transformer2DModel with continuous input)."""

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
        # attn: None, or kwargs of SpatialTransformer less ch; `attentions` registered before `resnets` (diffusers)
        self.attentions = None
        if attn is not None:
            self.attentions = nn.ModuleList([SpatialTransformer(out_ch, **attn) for _ in range(n_layers)])
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_ch, groups, eps, dropout)
                                      for j in range(n_layers)])
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
    """One decoder level: resnets (U-Net: on [x, skip] concatenated), each followed by a spatial transformer when
    attn is given, then an upsampler (diffusers CrossAttnUpBlock2D / UpBlock2D / UpDecoderBlock2D)."""

    def __init__(self, in_ch, out_ch, n_layers, temb_ch, groups, eps, dropout=0.0, upsample=True, skip_chs=None,
                 attn=None):
        super().__init__()
        skip_chs = skip_chs or [0] * n_layers  # the VAE decoder has no skips
        self.attentions = None
        if attn is not None:
            self.attentions = nn.ModuleList([SpatialTransformer(out_ch, **attn) for _ in range(n_layers)])
        self.resnets = nn.ModuleList([ResnetBlock2D((in_ch if j == 0 else out_ch) + skip_chs[j], out_ch, temb_ch,
                                                    groups, eps, dropout) for j in range(n_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x, skips=None, temb=None, context=None, bias=None):
        """x (B, C_in, H, W); skips: the U-Net's skip list, popped from the end (None for the VAE)"""
        for j, resnet in enumerate(self.resnets):
            if skips is not None:
                x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, bias)
        if self.upsamplers is not None:
            # upsample to the next skip's size (2x, or the odd size the encoder had)
            x = self.upsamplers[0](x, skips[-1].shape[-2:] if skips else None)
        return x


class UNetMidBlock(nn.Module):
    """resnet, (spatial transformer, resnet) x depth-1 at the lowest resolution (diffusers UNetMidBlock2DCrossAttn)."""

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
    t * exp(-ln(max_period) i / (dim/2 - freq_shift)), computed in fp32 like diffusers' get_timestep_embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))  # (half,)
    args = t[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)],
                    dim=-1)  # (B, 2*half)
    return F.pad(emb, (0, dim % 2))


def _per_block(value, n, name):
    """int -> (int,)*n; a list/tuple must have one entry per block."""
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"{name}={value!r} needs one entry per block ({n})")
    return tuple(value)


def _check_fixed(d, fixed, what):
    """Raise on any diffusers config key whose value this implementation does not support."""
    for k, ok in fixed.items():
        v = d.get(k, ok)
        if isinstance(v, (list, tuple)) and not isinstance(ok, (list, tuple)):  # per-block lists of one value
            v = v[0] if len(set(v)) == 1 else v
        if v != ok:
            raise ValueError(f"{what}: unsupported config value {k}={v!r} (only {ok!r} is implemented)")


def _dataclass_from_dict(cls, d):
    """Known fields from d (lists -> tuples); other keys are ignored."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


# -----------------------------------------------------------------------------
# the conditional U-Net of SD 1.x and LDM

UNET_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UNET_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers UNet2DConditionModel options this U-Net does not implement: the only accepted value of each
UNET_FIXED = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "mid_block_scale_factor": 1, "act_fn": "silu",
    "dual_cross_attention": False, "num_attention_heads": None, "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "attention_type": "default", "cross_attention_norm": None,
}


@dataclass
class UNetConfig:
    """Field names and meanings of diffusers' UNet2DConditionModel config (defaults: SD1.4's unet/config.json)."""
    sample_size: int = 64  # latent side the model was trained at (64 = 512 px)
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    attention_head_dim: object = 8  # SD quirk: the number of HEADS (int, or one per block), head dim = ch // heads
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

    def __post_init__(self):
        for f in ("block_out_channels", "down_block_types", "up_block_types"):
            setattr(self, f, tuple(getattr(self, f)))
        for f in ("attention_head_dim", "transformer_layers_per_block", "layers_per_block", "cross_attention_dim"):
            v = getattr(self, f)
            if isinstance(v, (list, tuple)):
                setattr(self, f, v[0] if f in ("layers_per_block", "cross_attention_dim") and len(set(v)) == 1
                        else tuple(v))
        if not isinstance(self.layers_per_block, int) or not isinstance(self.cross_attention_dim, int):
            raise ValueError("UNetConfig: per-block layers_per_block / cross_attention_dim are not supported: "
                             f"{self.layers_per_block!r}, {self.cross_attention_dim!r}")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNetConfig: {n} block_out_channels but {len(self.down_block_types)} down and "
                             f"{len(self.up_block_types)} up block types")
        bad = [t for t in self.down_block_types if t not in UNET_DOWN_TYPES]
        bad += [t for t in self.up_block_types if t not in UNET_UP_TYPES]
        if bad:
            raise ValueError(f"UNetConfig: unsupported block types {bad} "
                             f"(supported: {UNET_DOWN_TYPES + UNET_UP_TYPES})")
        heads = _per_block(self.attention_head_dim, n, "attention_head_dim")
        _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        for c, h in zip(self.block_out_channels, heads):
            if c % h or c % self.norm_num_groups:
                raise ValueError(f"UNetConfig: {c} channels do not divide into {h} heads / "
                                 f"{self.norm_num_groups} groups")

    @classmethod
    def from_diffusers(cls, d):
        """From a diffusers unet/config.json dict; unknown keys are ignored, unsupported values raise."""
        if d.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise ValueError(f"config is for a {d['_class_name']}, not a UNet2DConditionModel")
        _check_fixed(d, UNET_FIXED, "UNetConfig")
        return _dataclass_from_dict(cls, d)


UNET_PRESETS = {
    "sd14": UNetConfig(),
    "ldm": UNetConfig(cross_attention_dim=1280, sample_size=32),  # CompVis/ldm-text2im-large-256
    # 4.1M params; no attention at the top level (a 32x32 pixel model: in/out_channels=3 via dataclasses.replace)
    "tiny": UNetConfig(sample_size=32, block_out_channels=(32, 64, 128), layers_per_block=1,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=(2, 4, 8), cross_attention_dim=64, norm_num_groups=8),
}


class UNet(nn.Module):
    """Text-conditional U-Net of Stable Diffusion 1.x / LDM (Rombach et al. 2022; diffusers UNet2DConditionModel)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        ch, n, L = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
        heads = _per_block(cfg.attention_head_dim, n, "attention_head_dim")
        depth = _per_block(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")
        temb = 4 * ch[0]
        common = dict(temb_ch=temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout)

        def attn(i):
            return dict(heads=heads[i], depth=depth[i], context_dim=cfg.cross_attention_dim, groups=cfg.norm_num_groups,
                        linear=cfg.use_linear_projection, dropout=cfg.dropout, upcast=cfg.upcast_attention)

        # registration order = diffusers': conv_in, time_embedding, down_blocks, up_blocks, mid_block, conv_norm_out,
        # conv_out (the LoRA import format walks modules in this order)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList()
        skip_chs = [ch[0]]  # channels of every skip activation, in the order the encoder produces them
        for i, kind in enumerate(cfg.down_block_types):
            last = i == n - 1
            self.down_blocks.append(DownBlock(ch[max(i - 1, 0)], ch[i], L, downsample=not last,
                                              padding=cfg.downsample_padding,
                                              attn=attn(i) if kind == "CrossAttnDownBlock2D" else None, **common))
            skip_chs += [ch[i]] * (L + (not last))
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            level = n - 1 - i
            skips = [skip_chs.pop() for _ in range(L + 1)]
            self.up_blocks.append(UpBlock(ch[min(level + 1, n - 1)], ch[level], L + 1, upsample=level > 0,
                                          skip_chs=skips, attn=attn(level) if kind == "CrossAttnUpBlock2D" else None,
                                          **common))
        self.mid_block = UNetMidBlock(ch[-1], attn=attn(n - 1), **common)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, x, t, context, context_mask=None):
        """x (B, C, h, w) noisy latents; t (B,) or a scalar (int, float, 0-d tensor); context (B, T, D);
        context_mask (B, T) bool or 0/1, 1 = attend (diffusers' encoder_attention_mask).
        Returns eps (B, C_out, h, w)."""
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0 or t.numel() == 1:
            t = t.reshape(1).expand(B)  # (B,)
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or of shape ({B},), got {tuple(t.shape)}")
        if context.dim() != 3 or context.shape[0] != B or context.shape[2] != self.cfg.cross_attention_dim:
            raise ValueError(f"context must be (B={B}, T, {self.cfg.cross_attention_dim}), got {tuple(context.shape)}")
        bias = None
        if context_mask is not None:
            if context_mask.shape != context.shape[:2]:
                raise ValueError(f"context_mask must be {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}")
            bias = ((1 - context_mask.to(x.dtype)) * -10000.0)[:, None, None, :]  # (B, 1, 1, T), as diffusers
        temb = self.time_embedding(timestep_features(t, self.cfg.block_out_channels[0], self.cfg.flip_sin_to_cos,
                                                     self.cfg.freq_shift).to(x.dtype))  # (B, 4*C0)

        h = self.conv_in(x)  # channels-last when the weights are (cpu_layout): then so is every activation after it
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, temb, context, bias)
            skips += s
        h = self.mid_block(h, temb, context, bias)
        for block in self.up_blocks:
            h = block(h, skips, temb, context, bias)
        return self.conv_out(F.silu(self.conv_norm_out(h))).contiguous()

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
            raise ValueError(f"VAEConfig: channels {bad} do not divide into {self.norm_num_groups} groups")

    @classmethod
    def from_diffusers(cls, d):
        """From a diffusers vae/config.json dict; unknown keys are ignored, unsupported values raise."""
        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"config is for a {d['_class_name']}, not an AutoencoderKL")
        _check_fixed(d, VAE_FIXED, "VAEConfig")
        return _dataclass_from_dict(cls, d)


VAE_PRESETS = {
    "sd": VAEConfig(),
    "tiny": VAEConfig(sample_size=64, block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
}


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
# The rest of an original SD/LDM single file, skipped by both loaders (anything else is an error):
SINGLE_FILE_OTHER_PREFIXES = (
    "cond_stage_model.",  # the text encoder (CLIP in SD, LDMBert in LDM): loaded elsewhere
    "model_ema.",  # EMA copies under flattened names (sd-v1-4-full-ema.ckpt); the plain weights are used
    "loss.",  # discriminator / LPIPS of a bare VAE training checkpoint
)
SINGLE_FILE_OTHER_KEYS = (  # the DDPM schedule buffers of the original LatentDiffusion module
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
)

_UNET_RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                      "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def unet_key_from_original(key, tensor, layers_per_block=2):
    """Original SD/LDM U-Net name (prefix stripped) -> diffusers name. input_blocks/output_blocks are numbered
    consecutively, so the level and layer come from layers_per_block L: input_blocks.{(L+1)i+j+1}.0/.1 =
    down_blocks.i.resnets.j/attentions.j, input_blocks.{(L+1)(i+1)}.0.op = its downsampler; output_blocks.{(L+1)i+j}
    = up_blocks.i.resnets.j/attentions.j, its upsampler .1.conv (no attention) or .2.conv. Unknown keys pass
    through unchanged (the strict check reports them)."""
    L1 = layers_per_block + 1
    for old, new in (("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
                     ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")):
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
    if m := re.match(r"(.*\.resnets\.\d+\.)(in_layers\.[02]|emb_layers\.1|out_layers\.[03]|skip_connection)\.(.*)",
                     key):
        key = m[1] + _UNET_RESNET_NAMES[m[2]] + "." + m[3]
    # spatial transformers (norm, proj_in, transformer_blocks.*, proj_out) already have diffusers' names
    return [(key, tensor)]


def vae_key_from_original(key, tensor, num_levels=4):
    """Original SD/LDM VAE name (prefix stripped) -> diffusers name. The decoder's up.{k} counts from the LOWEST
    resolution's opposite end: up.{k} = up_blocks.{num_levels-1-k}. The mid attention's 1x1 convs become Linear
    weights (squeezed). Unknown keys pass through unchanged."""
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
        key = m[1] + {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}[m[2]] + "." + m[3]
    return [(key, tensor)]


def apply_key_map(sd, fn):
    """Run a (key, tensor) -> [(key, tensor)] map over a state dict; two sources for one name is an error."""
    out = {}
    for k, v in sd.items():
        for nk, nv in fn(k, v):
            if nk in out:
                raise ValueError(f"two checkpoint tensors map to {nk} (the second from {k})")
            out[nk] = nv
    return out


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
        raise ValueError(f"{path}: {len(stray)} keys belong to no known component of an SD/LDM single file "
                         f"(the {what} lives under '{prefix}'): {', '.join(sorted(stray)[:10])}")
    return mine


def _open_checkpoint(path, subfolders, class_names, what):
    """-> (diffusers config dict or None, flat state dict, is_folder). A component folder (config.json + weights),
    a pipeline folder (the first of `subfolders` present), or a single weight file (with the config.json beside
    it, if any)."""
    if os.path.isdir(path):
        cfg = read_config(path)
        if cfg is None:
            for sub in subfolders:
                if os.path.isfile(os.path.join(path, sub, "config.json")):
                    return _open_checkpoint(os.path.join(path, sub), subfolders, class_names, what)
            raise FileNotFoundError(f"{path}: not a diffusers {what} folder (no config.json) nor a pipeline folder "
                                    f"(no {' or '.join(s + '/config.json' for s in subfolders)})")
        if cfg.get("_class_name", class_names[0]) not in class_names:
            raise ValueError(f"{path} holds a {cfg['_class_name']}, not a {what} ({' / '.join(class_names)})")
        try:
            weights = find_weight_file(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{what} folder without weights: {e}") from None
        return cfg, load_weights(weights), True
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    return read_config(os.path.dirname(os.path.abspath(path))), load_weights(path), False


def _count(sd, pattern):
    """How many distinct values the (\\d+) group of `pattern` takes over the keys of sd."""
    return len({m[1] for k in sd if (m := re.match(pattern, k))})


def infer_unet_config(sd):
    """UNetConfig from the names and shapes of a diffusers-layout U-Net state dict. Head count, norm groups and
    eps are not in the tensors: SD1.x/LDM conventions are assumed (8 heads at every level, 32 groups, eps 1e-5);
    Linear proj_in (SD2.x layout) means heads of 64 channels, as SD2's configs."""
    n = _count(sd, r"down_blocks\.(\d+)\.")
    ch = tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n))
    cross = next(v.shape[1] for key, v in sd.items() if key.endswith("attn2.to_k.weight"))
    linear = sd["mid_block.attentions.0.proj_in.weight"].dim() == 2
    depth = [_count(sd, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") or 1 for i in range(n)]
    depth[-1] = _count(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")  # diffusers: mid uses the last
    return UNetConfig(
        sample_size=32 if cross == 1280 else 64,  # LDM text2im-large-256 (32) vs SD1.x at 512 px (64): a default only
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
        in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
        block_out_channels=tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n)),
        layers_per_block=_count(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        latent_channels=sd["post_quant_conv.weight"].shape[0])


def _infer(fn, sd, path):
    """fn(sd), with a clear error when a tensor it reads is absent (an incomplete checkpoint)."""
    try:
        return fn(sd)
    except (KeyError, StopIteration) as e:
        raise ValueError(f"{path}: cannot infer the config, the checkpoint lacks {e or 'attn2.to_k weights'} "
                         "(incomplete file?)") from None


def _unet_checkpoint(path):
    """-> (UNetConfig, diffusers-layout state dict) for UNet.from_pretrained."""
    cfg, sd, is_folder = _open_checkpoint(path, ("unet",), ("UNet2DConditionModel",), "U-Net")
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
    raise ValueError(f"{path} is not an SD/LDM U-Net checkpoint: no '{UNET_PREFIX}*', 'input_blocks.*' or "
                     f"diffusers 'conv_in.*'/'time_embedding.*' keys (it has e.g. {', '.join(list(sd)[:5])})")


def _vae_checkpoint(path):
    """-> (VAEConfig, diffusers-layout state dict with the new attention names) for VAE.from_pretrained."""
    cfg, sd, is_folder = _open_checkpoint(path, ("vae", "vqvae"), ("AutoencoderKL",), "VAE")
    if is_folder:
        return VAEConfig.from_diffusers(cfg), apply_key_map(sd, vae_key_from_old_diffusers)
    if any(k.startswith(VAE_PREFIX) for k in sd):  # original SD/LDM single file
        sd = _component(sd, VAE_PREFIX, path, "VAE")
    if "encoder.down.0.block.0.conv1.weight" in sd:  # original layout
        sd = {k: v for k, v in sd.items() if not k.startswith(SINGLE_FILE_OTHER_PREFIXES)}  # bare VAE file: loss.*
        n = _count(sd, r"encoder\.down\.(\d+)\.")
        sd = apply_key_map(sd, lambda k, v: vae_key_from_original(k, v, n))
        return _infer(infer_vae_config, sd, path), sd
    if "encoder.conv_in.weight" in sd and "post_quant_conv.weight" in sd:  # diffusers layout, bare file
        sd = apply_key_map(sd, vae_key_from_old_diffusers)
        if cfg is not None and cfg.get("_class_name") == "AutoencoderKL":
            return VAEConfig.from_diffusers(cfg), sd
        return _infer(infer_vae_config, sd, path), sd
    raise ValueError(f"{path} is not an SD/LDM VAE (AutoencoderKL) checkpoint: no '{VAE_PREFIX}*', "
                     f"'encoder.down.*' or diffusers 'encoder.conv_in.*' keys (it has e.g. {', '.join(list(sd)[:5])})")
