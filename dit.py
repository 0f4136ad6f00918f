"""
PixArt-alpha DiT (PixArt-XL-2 512 / 1024-MS), from scratch in plain PyTorch.

Module names equal diffusers' PixArtTransformer2DModel (Transformer2DModel with norm_type
"ada_norm_single") state-dict keys, so a diffusers checkpoint loads with no renaming and the
original PixArt .pth layout needs only a small key map (map_pixart_key).
"""
import math
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from model_io import BadInput, apply_key_map, build_and_load, open_checkpoint
from unet import checkpointed, timestep_features

# -----------------------------------------------------------------------------
# config


@dataclass
class DiTConfig:
    num_layers: int = 28
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8               # 4 eps + 4 learned-sigma channels in PixArt-XL-2
    caption_channels: int = 4096        # T5-XXL width; the caption is projected to the hidden size
    sample_size: int = 64               # latent side the model was trained at (512 px / 8)
    interpolation_scale: float | None = None      # None: max(sample_size // 64, 1), as diffusers
    use_additional_conditions: bool | None = None  # None: sample_size == 128, as diffusers
    norm_eps: float = 1e-6

    @property
    def hidden_size(self):
        return self.num_attention_heads * self.attention_head_dim

    @property
    def pos_interpolation_scale(self):
        # diffusers PixArtTransformer2DModel.__init__: config value, else max(sample_size // 64, 1)
        s = self.interpolation_scale
        return s if s is not None else max(self.sample_size // 64, 1)

    @property
    def pos_base_size(self):
        # diffusers PatchEmbed: base_size = height // patch_size with height = sample_size
        return self.sample_size // self.patch_size

    @property
    def micro_conditions(self):
        # diffusers: use_additional_conditions None -> True exactly when sample_size == 128 (1024-MS)
        u = self.use_additional_conditions
        return u if u is not None else self.sample_size == 128

    @classmethod
    def from_diffusers(cls, config):
        """DiTConfig from a diffusers PixArtTransformer2DModel / Transformer2DModel config dict.
        Settings this implementation does not have raise a ValueError instead of being dropped."""
        config = dict(config)
        name = config.get("_class_name")
        if name not in (None, *DIT_CLASSES):
            raise BadInput(f"config.json is for {name}; DiT loads PixArtTransformer2DModel or "
                           f"Transformer2DModel with norm_type 'ada_norm_single'")
        # values fixed by this implementation (PixArt-XL-2); anything else is another architecture
        fixed = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
                 "norm_elementwise_affine": False, "only_cross_attention": False,
                 "double_self_attention": False,
                 "upcast_attention": False, "attention_type": "default", "dropout": 0.0,
                 "num_vector_embeds": None, "use_linear_projection": False}
        bad = [f"{k}={config[k]!r} (need {v!r})" for k, v in fixed.items() if k in config and config[k] != v]
        if config.get("caption_channels") is None:
            bad.append("caption_channels=None (need the text-encoder width, e.g. 4096)")
        ours = {f.name for f in fields(cls)}
        hidden = config.get("num_attention_heads", 16) * config.get("attention_head_dim", 72)
        if config.get("cross_attention_dim", hidden) != hidden:
            bad.append(f"cross_attention_dim={config['cross_attention_dim']} (need the hidden size {hidden})")
        if config.get("out_channels") is None and "out_channels" in config:
            config["out_channels"] = config.get("in_channels", 4)  # diffusers: None means in_channels
        # keys with no effect here: bookkeeping, GroupNorm groups (unused by ada_norm_single),
        # num_embeds_ada_norm (only checked to be set), and the ones already checked above
        inert = {"norm_num_groups", "num_embeds_ada_norm", "cross_attention_dim"} | set(fixed)
        unknown = sorted(k for k in config if not k.startswith("_") and k not in ours and k not in inert)
        if unknown:
            bad.append(f"unknown config keys {unknown}")
        if bad:
            raise BadInput("diffusers config not supported by DiT: " + "; ".join(bad))
        return cls(**{k: v for k, v in config.items() if k in ours})


DIT_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")  # the diffusers classes of this DiT
DIT_PRESETS = {
    "pixart-512": DiTConfig(sample_size=64),                                    # PixArt-XL-2-512x512
    "pixart-1024": DiTConfig(sample_size=128, use_additional_conditions=True),  # PixArt-XL-2-1024-MS
}


# -----------------------------------------------------------------------------
# embeddings computed on the fly (no buffers: they are not in the official checkpoints)


def sincos_pos_embed_2d(dim, h, w, base_size, interpolation_scale, device=None):
    """PixArt's 2-D sin-cos position embedding for an h x w patch grid -> (h*w, dim) float64.
    Positions are arange(n) / (n / base_size) / interpolation_scale (in fp32, as the original and
    diffusers do); the first dim/2 channels encode the width coordinate, the last dim/2 the height."""
    if dim % 4:
        raise BadInput(f"the hidden size must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
    ys = torch.arange(h, dtype=torch.float32, device=device) / (h / base_size) / interpolation_scale
    xs = torch.arange(w, dtype=torch.float32, device=device) / (w / base_size) / interpolation_scale
    omega = torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4)
    omega = 1.0 / 10000 ** omega  # (dim/4,)

    def embed_1d(pos):  # (n,) -> (n, dim/2)
        out = pos.double()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    ex = embed_1d(xs)[None].expand(h, w, dim // 2)  # (h, w, dim/2)
    ey = embed_1d(ys)[:, None].expand(h, w, dim // 2)  # (h, w, dim/2)
    return torch.cat([ex, ey], dim=-1).reshape(h * w, dim)  # (h*w, dim)


# -----------------------------------------------------------------------------
# modules


class PatchEmbed(nn.Module):
    """Patchify conv (k = s = patch) plus the 2-D sin-cos position embedding (PixArt x_embedder)."""

    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.base_size = cfg.pos_base_size
        self.interpolation_scale = cfg.pos_interpolation_scale
        self._pos_cache = {}  # (h, w, device) -> (1, h*w, D) fp32; a plain attribute, never saved

    def pos_embed(self, h, w, device):
        key = (h, w, str(device))
        if key not in self._pos_cache:
            pe = sincos_pos_embed_2d(self.proj.out_channels, h, w, self.base_size, self.interpolation_scale,
                                     device)
            self._pos_cache[key] = pe.float()[None]  # (1, h*w, D)
        return self._pos_cache[key]

    def forward(self, x):
        """x (B, C, H, W) -> tokens (B, H/p * W/p, D)."""
        tokens = self.proj(x)  # (B, D, h, w)
        h, w = tokens.shape[-2:]
        tokens = rearrange(tokens, "b d h w -> b (h w) d")  # (B, h*w, D)
        return (tokens + self.pos_embed(h, w, x.device)).to(tokens.dtype)  # add in fp32, as diffusers


class TimestepEmbedding(nn.Module):
    """256-d [cos, sin] sinusoid -> Linear -> SiLU -> Linear (PixArt t_embedder, csize_embedder,
    ar_embedder)."""

    def __init__(self, dim_out):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim_out)
        self.linear_2 = nn.Linear(dim_out, dim_out)

    def forward(self, t):
        """t (N,) float -> (N, dim_out)."""
        emb = timestep_features(t, 256).to(self.linear_1.weight.dtype)  # (N, 256) [cos, sin]
        return self.linear_2(F.silu(self.linear_1(emb)))


class ConditionEmbedding(nn.Module):
    """Timestep embedding, plus resolution and aspect-ratio embeddings for 1024-MS (diffusers
    adaln_single.emb)."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.timestep_embedder = TimestepEmbedding(d)
        self.micro_conditions = cfg.micro_conditions
        if self.micro_conditions:
            if d % 3:
                raise BadInput(f"micro-conditions need a hidden size divisible by 3, got {d}")
            self.resolution_embedder = TimestepEmbedding(d // 3)    # height and width, d/3 each
            self.aspect_ratio_embedder = TimestepEmbedding(d // 3)

    def forward(self, t, resolution=None, aspect_ratio=None):
        """t (B,); resolution (B, 2) = (height, width) in pixels; aspect_ratio (B, 1) = height / width."""
        emb = self.timestep_embedder(t)  # (B, D)
        if not self.micro_conditions:
            return emb
        if resolution is None or aspect_ratio is None:
            raise BadInput("this DiT (1024-MS) needs resolution (B, 2) and aspect_ratio (B, 1) "
                           "micro-conditions")
        B = t.shape[0]
        resolution = torch.as_tensor(resolution, device=t.device).reshape(-1)  # (2B,)
        aspect_ratio = torch.as_tensor(aspect_ratio, device=t.device).reshape(-1)  # (B,)
        if resolution.numel() != 2 * B or aspect_ratio.numel() != B:
            raise BadInput(f"resolution must be (B, 2) and aspect_ratio (B, 1) with B={B}, "
                           f"got {resolution.numel()} and {aspect_ratio.numel()} values")
        res = self.resolution_embedder(resolution).reshape(B, -1)  # (B, 2D/3)
        ar = self.aspect_ratio_embedder(aspect_ratio).reshape(B, -1)  # (B, D/3)
        return emb + torch.cat([res, ar], dim=1)


class AdaLNSingle(nn.Module):
    """adaLN-single (PixArt-alpha, arXiv 2310.00426 sec 2.3): one Linear(SiLU(t)) -> 6 D shared by all
    blocks."""

    def __init__(self, cfg):
        super().__init__()
        self.emb = ConditionEmbedding(cfg)
        self.linear = nn.Linear(cfg.hidden_size, 6 * cfg.hidden_size)

    def forward(self, t, resolution=None, aspect_ratio=None):
        """t (B,) -> (modulation (B, 6D), embedded timestep (B, D))."""
        emb = self.emb(t, resolution, aspect_ratio)  # (B, D)
        return self.linear(F.silu(emb)), emb


class CaptionProjection(nn.Module):
    """Caption projection Linear -> GELU(tanh) -> Linear (PixArt y_embedder.y_proj)."""

    def __init__(self, cfg):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.caption_channels, cfg.hidden_size)
        self.linear_2 = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, context):
        """context (B, T, caption_channels) -> (B, T, D)."""
        return self.linear_2(F.gelu(self.linear_1(context), approximate="tanh"))


class Attention(nn.Module):
    """Multi-head attention with biases, diffusers Attention names (to_q, to_k, to_v, to_out.0).
    The class name is part of the LaVi-Bridge LoRA import format: keep it."""

    def __init__(self, dim, heads, head_dim):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, heads * head_dim)
        self.to_k = nn.Linear(dim, heads * head_dim)
        self.to_v = nn.Linear(dim, heads * head_dim)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])  # index 0 as in diffusers

    def forward(self, x, context=None, bias=None):
        """x (B, N, D); context (B, T, D) or None for self-attention; bias broadcastable to (B, H, N, T)."""
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)  # (B, H, N, d)
        k = rearrange(self.to_k(context), "b t (h d) -> b h t d", h=self.heads)  # (B, H, T, d)
        v = rearrange(self.to_v(context), "b t (h d) -> b h t d", h=self.heads)  # (B, H, T, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, N, d)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, D)
        return self.to_out[0](out)


class GELUProj(nn.Module):
    """Linear then tanh-GELU (diffusers' GELU module, key ff.net.0.proj)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """PixArt MLP D -> 4D -> D with GELU(tanh); net.1 is diffusers' (zero) dropout slot."""

    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        """x (B, N, D) -> (B, N, D)."""
        return self.net(x)


class DiTBlock(nn.Module):
    """PixArt-alpha block: adaLN-single-modulated self-attention, plain cross-attention, modulated MLP."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn1 = Attention(d, cfg.num_attention_heads, cfg.attention_head_dim)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn2 = Attention(d, cfg.num_attention_heads, cfg.attention_head_dim)
        self.ff = FeedForward(d)
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d ** 0.5)

    @checkpointed
    def forward(self, x, context, t6, bias=None):
        """x (B, N, D); context (B, T, D); t6 (B, 6D) from adaLN-single; bias (B, 1, 1, T) or None."""
        B = x.shape[0]
        mod = self.scale_shift_table[None] + t6.reshape(B, 6, -1)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # (B, 1, D) each
        x = x + gate_msa * self.attn1(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.attn2(x, context, bias)  # no norm, no gate
        x = x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x


class DiT(nn.Module):
    """PixArt-alpha DiT (PixArt-XL-2; keys of diffusers PixArtTransformer2DModel)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        # registration order = diffusers' (the LaVi-Bridge LoRA list walks modules in this order)
        self.pos_embed = PatchEmbed(cfg)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)  # 1e-6 fixed, as diffusers
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d ** 0.5)
        self.proj_out = nn.Linear(d, cfg.patch_size ** 2 * cfg.out_channels)
        self.adaln_single = AdaLNSingle(cfg)
        self.caption_projection = CaptionProjection(cfg)

    def forward(self, x, t, context, context_mask=None, resolution=None, aspect_ratio=None):
        """x (B, in_channels, H, W) latents; t (B,) or scalar timesteps in [0, 1000);
        context (B, T, caption_channels); context_mask (B, T), 1 = keep, 0 = ignore;
        resolution (B, 2) and aspect_ratio (B, 1): 1024-MS micro-conditions (ignored by models without them).
        Returns all output channels (B, out_channels, H, W) (PixArt-XL-2: eps then learned sigma)."""
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise BadInput(f"latent size {H}x{W} is not divisible by the patch size {p}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != self.cfg.caption_channels:
            raise BadInput(f"context must be (B={B}, T, {self.cfg.caption_channels}), "
                           f"got {tuple(context.shape)}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t.reshape(-1)  # (B,)
        if t.shape[0] != B:
            raise BadInput(f"t must be a scalar or (B={B},), got {t.shape[0]} values")

        tokens = self.pos_embed(x)  # (B, N, D)
        t6, temb = self.adaln_single(t, resolution, aspect_ratio)  # (B, 6D), (B, D)
        context = self.caption_projection(context)  # (B, T, D)
        bias = None
        if context_mask is not None:
            if context_mask.shape != context.shape[:2]:
                raise BadInput(f"context_mask must be (B, T) = {tuple(context.shape[:2])}, "
                               f"got {tuple(context_mask.shape)}")
            bias = (1 - context_mask.to(tokens.dtype)) * -10000.0  # (B, T)
            bias = bias[:, None, None, :]  # (B, 1, 1, T), broadcast over heads and queries
        for block in self.transformer_blocks:
            tokens = block(tokens, context, t6, bias)

        shift, scale = (self.scale_shift_table[None] + temb[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        tokens = self.norm_out(tokens) * (1 + scale) + shift
        out = self.proj_out(tokens)  # (B, N, p*p*C)
        # (B, C, H, W)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=H // p, w=W // p, p=p, q=p)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", config=None):
        """Load a diffusers component folder (config.json + weights), a pipeline folder (uses
        transformer/), or a single weight file in diffusers or original PixArt layout (.pth /
        .safetensors, config inferred from keys and shapes unless `config` (a DiTConfig) is given).
        Built on the meta device and loaded by assignment: peak memory ~ one copy of the weights."""
        diffusers_config, sd, is_folder = open_checkpoint(path, ("transformer",), DIT_CLASSES, "DiT")
        if is_folder:
            cfg = config or DiTConfig.from_diffusers(diffusers_config)
            sd = convert_state_dict(sd, what=path)
        else:  # a single file: diffusers or original PixArt layout
            pos = sd.get("pos_embed", sd.get("module.pos_embed"))  # original-layout buffer (1, N, D)
            pos_tokens = pos.shape[1] if pos is not None else None
            sd = convert_state_dict(sd, what=path)
            cfg = config or infer_config(sd, pos_tokens)
        return build_and_load(lambda: cls(cfg), sd, f"DiT from {path}", dtype, device)


# -----------------------------------------------------------------------------
# checkpoint layouts: pure (key, tensor) -> [(key, tensor), ...] maps

# Tensors that checkpoints carry but this model does not use: dropped by exact name, never by pattern.
DIFFUSERS_IGNORED = {
    "caption_projection.y_embedding",  # learned null caption [120, 4096] in files saved by diffusers
                                       # 0.22-0.24; unused: CFG here encodes the empty prompt instead
    "pos_embed.pos_embed",             # sin-cos buffer, recomputed on the fly (diffusers does not save it)
}
PIXART_IGNORED = {
    "y_embedder.y_embedding",          # the same learned null caption, original name
    "pos_embed",                       # sin-cos buffer (1, N, D), recomputed on the fly
}


def map_diffusers_key(key, tensor):
    """diffusers PixArtTransformer2DModel layout: our names already; drop the ignored extras."""
    return [] if key in DIFFUSERS_IGNORED else [(key, tensor)]


_PIXART_RENAMES = [  # original PixArt (PixArt-alpha repo .pth) prefix -> diffusers prefix
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "adaln_single.emb.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "adaln_single.emb.timestep_embedder.linear_2."),
    ("csize_embedder.mlp.0.", "adaln_single.emb.resolution_embedder.linear_1."),
    ("csize_embedder.mlp.2.", "adaln_single.emb.resolution_embedder.linear_2."),
    ("ar_embedder.mlp.0.", "adaln_single.emb.aspect_ratio_embedder.linear_1."),
    ("ar_embedder.mlp.2.", "adaln_single.emb.aspect_ratio_embedder.linear_2."),
    ("t_block.1.", "adaln_single.linear."),
    ("y_embedder.y_proj.fc1.", "caption_projection.linear_1."),
    ("y_embedder.y_proj.fc2.", "caption_projection.linear_2."),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.scale_shift_table", "scale_shift_table"),
]
_PIXART_BLOCK_RENAMES = [  # inside blocks.N.
    ("attn.proj.", "attn1.to_out.0."),
    ("cross_attn.q_linear.", "attn2.to_q."),
    ("cross_attn.proj.", "attn2.to_out.0."),
    ("mlp.fc1.", "ff.net.0.proj."),
    ("mlp.fc2.", "ff.net.2."),
    ("scale_shift_table", "scale_shift_table"),
]


def map_pixart_key(key, tensor):
    """Original PixArt .pth layout (PixArt-alpha repo) -> diffusers layout. Fused projections are
    split: attn.qkv in 3 (to_q, to_k, to_v), cross_attn.kv_linear in 2 (to_k, to_v). Unknown keys
    pass through unchanged, so the strict check reports them."""
    key = key.removeprefix("module.")  # saved from a DDP-wrapped model
    if key in PIXART_IGNORED:
        return []
    m = re.match(r"blocks\.(\d+)\.(.+)", key)
    if m is None:
        for old, new in _PIXART_RENAMES:
            if key.startswith(old):
                return [(new + key[len(old):], tensor)]
        return [(key, tensor)]
    prefix, rest = f"transformer_blocks.{m.group(1)}.", m.group(2)
    if rest.startswith("attn.qkv."):
        suffix = rest[len("attn.qkv."):]  # weight or bias
        return [(f"{prefix}attn1.to_{n}.{suffix}", x) for n, x in zip("qkv", tensor.chunk(3, dim=0))]
    if rest.startswith("cross_attn.kv_linear."):
        suffix = rest[len("cross_attn.kv_linear."):]
        return [(f"{prefix}attn2.to_{n}.{suffix}", x) for n, x in zip("kv", tensor.chunk(2, dim=0))]
    for old, new in _PIXART_BLOCK_RENAMES:
        if rest.startswith(old):
            return [(prefix + new + rest[len(old):], tensor)]
    return [(key, tensor)]


def convert_state_dict(sd, what="checkpoint"):
    """Detect the layout (diffusers or original PixArt) and map every key; ValueError for other models."""
    keys = list(sd)
    if any(k.startswith("transformer_blocks.") for k in keys):
        fn = map_diffusers_key
    elif any(k.removeprefix("module.").startswith("blocks.") for k in keys):
        fn = map_pixart_key
    else:
        if any(k.startswith(("down_blocks.", "model.diffusion_model.", "input_blocks.")) for k in keys):
            guess = "a U-Net checkpoint"
        elif any(k.startswith(("encoder.down", "decoder.up")) for k in keys):
            guess = "a VAE checkpoint"
        else:
            guess = "an unknown model"
        raise BadInput(f"{what} is not a PixArt DiT checkpoint (no 'transformer_blocks.*' or 'blocks.*' "
                       f"keys); it looks like {guess}. First keys: {keys[:5]}")
    return apply_key_map(sd, fn, what)


def infer_config(sd, pos_tokens=None):
    """DiTConfig from a diffusers-layout state dict's keys and shapes (for single files with no config).
    pos_tokens: the patch count of an original checkpoint's pos_embed buffer, which fixes sample_size."""
    need = ["pos_embed.proj.weight", "proj_out.weight", "caption_projection.linear_1.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise BadInput(f"cannot infer the DiT config: missing {missing}")
    hidden, in_channels, patch = sd["pos_embed.proj.weight"].shape[:3]
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    micro = "adaln_single.emb.resolution_embedder.linear_1.weight" in sd
    # The head count is not visible in any shape. PixArt-XL-2 (hidden 1152) uses 16 heads of 72;
    # other widths are assumed to keep PixArt's head dim of 72. Pass config= for anything else.
    heads = 16 if hidden == 1152 else hidden // 72
    if heads < 1 or hidden % heads:
        raise BadInput(f"cannot infer the head count for hidden size {hidden}; pass config=DiTConfig(...)")
    if pos_tokens is not None:
        sample_size = math.isqrt(pos_tokens) * patch
    else:  # no buffer to read it from: PixArt-XL-2 1024-MS has micro-conditions, 512 has not
        sample_size = 128 if micro else 64
    return DiTConfig(num_layers=len(blocks), num_attention_heads=heads, attention_head_dim=hidden // heads,
                     patch_size=patch, in_channels=in_channels,
                     out_channels=sd["proj_out.weight"].shape[0] // patch ** 2,
                     caption_channels=sd["caption_projection.linear_1.weight"].shape[1],
                     sample_size=sample_size, use_additional_conditions=micro)
