"""
Adapters that carry a language model's hidden states into a diffusion model's text-conditioning space:
- TextAdapter: LaVi-Bridge's LN -> GEGLU FF -> LN -> GEGLU FF (ShihaoZhaoZSH/LaVi-Bridge
  modules/adapters.py; released as adapter/config.json + diffusion_pytorch_model.safetensors|.bin).
- GlueNet: GlueGen's token-MLP / channel-MLP translator with a reconstruction decoder, a token
  discriminator behind gradient reversal, and the three training losses (salesforce/GlueGen
  multilingual-gluenet/model.py, train_gluenet_multi.py).
- PooledHead: the pooled text vector SDXL takes beside the context, from a bridge's context.
- Resampler: OmniDiffusion's query-token adapter (llm-conditioned-diffusion/OmniDiffusion
  text_encoder/mlm_encoder.py MLMAdapter): an MLP on every LM token, an encoder-decoder transformer whose
  learned queries read the whole LM sequence, a pooled head on the mean of the middle queries.
- TSC: ELLA's timestep-aware semantic connector (TencentQQGYLab/ELLA model.py): a perceiver resampler whose
  adaptive norms and latents read the diffusion timestep.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_io import (BadInput, MissingInput, find_weight_file, load_strict, load_weights, read_config,
                      save_safetensors)
from unet import FeedForward  # GEGLU(d -> 4d) -> Dropout -> Linear(4d -> d_out), keys net.0.proj / net.2

# -----------------------------------------------------------------------------
# LaVi-Bridge TextAdapter


class TextAdapter(nn.Module):
    """LaVi-Bridge TextAdapter: LayerNorm(in) -> FF1 -> LayerNorm(mid) -> FF2 (hub shihaozhao/LaVi-Bridge,
    adapter/)."""

    def __init__(self, in_dim, mid_dim, out_dim, dropout=0.1):
        super().__init__()
        mid_dim = (in_dim + out_dim) // 2 if mid_dim is None else mid_dim
        self.in_dim, self.mid_dim, self.out_dim = in_dim, mid_dim, out_dim
        # registration order of the release (ff1, ff2, norm1, norm2), so state dicts list alike
        self.ff1 = FeedForward(in_dim, mid_dim, dropout=dropout)
        self.ff2 = FeedForward(mid_dim, out_dim, dropout=dropout)
        self.norm1 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(mid_dim)

    def forward(self, x):
        """x: (B, T, in_dim) language-model hidden states -> (B, T, out_dim)."""
        if x.shape[-1] != self.in_dim:
            raise BadInput(f"TextAdapter expects {self.in_dim}-d features, got shape {tuple(x.shape)}")
        x = self.ff1(self.norm1(x))  # (B, T, mid_dim)
        return self.ff2(self.norm2(x))  # (B, T, out_dim)

    # the release's config.json: diffusers register_to_config(in_dim, int_dim, out_dim)
    def config(self):
        return {"_class_name": "TextAdapter", "in_dim": self.in_dim, "int_dim": self.mid_dim,
                "out_dim": self.out_dim}

    @classmethod
    def from_pretrained(cls, folder, dropout=0.1):
        """Read a release adapter/ folder (config.json + diffusion_pytorch_model.safetensors or .bin),
        strictly."""
        if not os.path.isdir(folder):
            raise MissingInput(f"TextAdapter folder not found: {folder}")
        cfg = read_config(folder)
        if cfg is None:
            raise MissingInput(f"{folder}: no config.json (a LaVi-Bridge adapter/ folder holds "
                               "config.json and diffusion_pytorch_model.safetensors or .bin)")
        if cfg.get("_class_name", "TextAdapter") != "TextAdapter":
            raise BadInput(f"{folder}/config.json describes a {cfg['_class_name']}, not a TextAdapter")
        missing = [k for k in ("in_dim", "int_dim", "out_dim") if not isinstance(cfg.get(k), int)]
        if missing:
            raise BadInput(f"{folder}/config.json lacks integer {missing} "
                           "(LaVi-Bridge keys: in_dim, int_dim, out_dim)")
        sd = load_weights(find_weight_file(folder))
        with torch.device("meta"):  # no init work; load_strict assigns the file's tensors
            model = cls(cfg["in_dim"], cfg["int_dim"], cfg["out_dim"], dropout=dropout)
        return load_strict(model, sd, f"TextAdapter {folder}")

    def save_pretrained(self, folder):
        """Write config.json + diffusion_pytorch_model.safetensors, the layout from_pretrained reads."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(self.config(), f, indent=2)
        save_safetensors(self.state_dict(), os.path.join(folder, "diffusion_pytorch_model.safetensors"))


# -----------------------------------------------------------------------------
# the pooled head: SDXL's second text input


class PooledHead(nn.Module):
    """A bridge's pooled text vector for SDXL (bigG's projected end-of-text embedding, 1280) from the
    adapter's context (B, T, width), over the tokens of the vision mask:
    - "attn" (the default): LayerNorm, then per head a softmax over the tokens of learned scores, the
      weighted mean of that head's channels, then Linear(width -> out). The scores start at zero, so it
      starts as "mean" and learns which tokens carry the summary: bigG's vector is one token (EOT) of a
      causal encoder, whose place differs per LM (a bidirectional T5 has no such token, a causal Llama has
      it last), and a plain mean weighs every word of the prompt alike;
    - "mean": LayerNorm, the mean over the tokens, Linear (the baseline, and the cheaper one).
    It reads the context rather than the LM's states so that it sees what the cross-attention sees, whatever
    the adapter: text-only alignment trains the context towards CLIP's and the pooled vector towards
    bigG's, which bigG computes from the same tokens."""

    def __init__(self, width, out, kind="attn", heads=8):
        super().__init__()
        if kind not in ("attn", "mean"):
            raise BadInput(f"unknown pooled head {kind!r} (attn or mean)")
        if width % heads:
            raise BadInput(f"pooled head: width {width} is not a multiple of its {heads} heads")
        self.kind, self.heads = kind, heads
        self.norm = nn.LayerNorm(width)
        self.score = nn.Linear(width, heads) if kind == "attn" else None
        if self.score is not None:
            nn.init.zeros_(self.score.weight)
            nn.init.zeros_(self.score.bias)
        self.proj = nn.Linear(width, out)

    def forward(self, ctx, mask=None):
        """ctx (B, T, width), mask (B, T) 1 = a token the vision model attends to (None: all) -> (B, out)."""
        B, T, D = ctx.shape
        x = self.norm(ctx)
        keep = torch.ones(B, T, dtype=torch.bool, device=ctx.device) if mask is None else mask.bool()
        keep = keep | ~keep.any(1, keepdim=True)  # a prompt with no token kept: all of them
        if self.score is None:
            w = keep.to(x.dtype)[..., None]  # (B, T, 1)
            return self.proj((x * w).sum(1) / w.sum(1))
        s = self.score(x).masked_fill(~keep[..., None], float("-inf"))  # (B, T, H)
        a = s.softmax(dim=1)
        pooled = torch.einsum("bth,bthd->bhd", a, x.view(B, T, self.heads, D // self.heads))
        return self.proj(pooled.reshape(B, D))


# -----------------------------------------------------------------------------
# query-token adapters: OmniDiffusion's resampler, ELLA's timestep-aware connector


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention in nn.MultiheadAttention's layout (in_proj_weight / in_proj_bias
    stacking q, k, v; out_proj), so that its checkpoints load as they are. pad (B, S) True = a key to
    ignore."""

    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise BadInput(f"attention width {dim} is not a multiple of its {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q, kv, pad=None):
        """q (B, L, D), kv (B, S, D) -> (B, L, D)."""
        B, L, D = q.shape
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q, k, v = (F.linear(x, w, b).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, L|S, D/H)
                   for x, w, b in ((q, wq, bq), (kv, wk, bk), (kv, wv, bv)))
        keep = None if pad is None else ~pad[:, None, None, :]  # (B, 1, 1, S) True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class EncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer(norm_first=True, ReLU, dropout 0) in its names: pre-norm self-attention,
    then the pre-norm feed-forward."""

    def __init__(self, dim, heads, ff):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, heads)
        self.linear1, self.linear2 = nn.Linear(dim, ff), nn.Linear(ff, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, pad=None):
        h = self.norm1(x)
        x = x + self.self_attn(h, h, pad)
        return x + self.linear2(F.relu(self.linear1(self.norm2(x))))


class DecoderLayer(nn.Module):
    """nn.TransformerDecoderLayer(norm_first=True, ReLU, dropout 0) in its names: self-attention among the
    queries (no causal mask), cross-attention to the encoder's memory, the feed-forward; each pre-norm."""

    def __init__(self, dim, heads, ff):
        super().__init__()
        self.self_attn, self.multihead_attn = MultiheadAttention(dim, heads), MultiheadAttention(dim, heads)
        self.linear1, self.linear2 = nn.Linear(dim, ff), nn.Linear(ff, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, memory, memory_pad=None):
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        x = x + self.multihead_attn(self.norm2(x), memory, memory_pad)
        return x + self.linear2(F.relu(self.linear1(self.norm3(x))))


class Stack(nn.Module):
    """Layers then a final LayerNorm: nn.TransformerEncoder / Decoder as nn.Transformer builds them."""

    def __init__(self, layers, dim):
        super().__init__()
        self.layers, self.norm = nn.ModuleList(layers), nn.LayerNorm(dim)


class QueryTransformer(nn.Module):
    """nn.Transformer(batch_first=True, norm_first=True, dropout=0) as OmniDiffusion uses it, in its names
    (encoder.layers.N, encoder.norm, decoder.layers.N, decoder.norm): src -> memory; tgt (the queries) ->
    output."""

    def __init__(self, dim, heads, ff, enc_layers, dec_layers):
        super().__init__()
        self.encoder = Stack([EncoderLayer(dim, heads, ff) for _ in range(enc_layers)], dim)
        self.decoder = Stack([DecoderLayer(dim, heads, ff) for _ in range(dec_layers)], dim)

    def forward(self, src, tgt, src_pad=None):
        for layer in self.encoder.layers:
            src = layer(src, src_pad)
        memory = self.encoder.norm(src)
        for layer in self.decoder.layers:
            tgt = layer(tgt, memory, src_pad)
        return self.decoder.norm(tgt)


@dataclass
class ResamplerConfig:
    """OmniDiffusion's published sizes (Baichuan2-7B -> SDXL) are the defaults."""
    in_dim: int = 4096        # the LM's width
    width: int = 2048         # the transformer's width = the context's (SDXL's 2048)
    queries: int = 227        # learned query tokens = context tokens (OmniDiffusion: 3 x 75 + 2)
    heads: int = 8            # nn.Transformer's default
    ff: int = 8192            # 4 x width
    enc_layers: int = 4
    dec_layers: int = 4
    pooled: int = 1280        # the pooled head's width (SDXL's text_embeds); 0: none
    out_dim: int = 0          # 0: the context is `width` wide; else a Linear to out_dim after (not in
    # OmniDiffusion: for vision models whose context is wider than the transformer)


class Resampler(nn.Module):
    """OmniDiffusion's adapter: fc (Linear in -> width, GELU, Linear) on every LM token; the encoder reads
    them (padding masked: an improvement on OmniDiffusion, which has batch 1 and no padding), the decoder's
    learned queries (t2i_decoder_prompt) attend to the encoder's output; the queries' outputs are the
    context, whatever the LM's token count. Pooled head fc1 (Linear width -> pooled, GELU, Linear) on the
    mean of the outputs without the first and the last query, as OmniDiffusion pools at inference."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Sequential(nn.Linear(cfg.in_dim, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.width))
        self.t2i_decoder_prompt = nn.Parameter(torch.randn(1, cfg.queries, cfg.width))
        self.llm_to_t2i_mapping = QueryTransformer(cfg.width, cfg.heads, cfg.ff, cfg.enc_layers,
                                                   cfg.dec_layers)
        if cfg.pooled:
            self.fc1 = nn.Sequential(nn.Linear(cfg.width, cfg.pooled), nn.GELU(),
                                     nn.Linear(cfg.pooled, cfg.pooled))
        if cfg.out_dim:
            self.proj_out = nn.Linear(cfg.width, cfg.out_dim)

    def forward(self, x, mask=None):
        """x (B, T, in_dim) LM features, mask (B, T) 1 = a real token (None: all) -> context (B, queries,
        out_dim or width) and the pooled vector (B, pooled) or None."""
        pad = None if mask is None else ~mask.bool()
        if pad is not None:
            pad = pad & pad.sum(1, keepdim=True).lt(pad.shape[1])  # an all-pad prompt: attend to all
        q = self.t2i_decoder_prompt.expand(x.shape[0], -1, -1).to(x.dtype)
        out = self.llm_to_t2i_mapping(self.fc(x), q, pad)  # (B, Q, width)
        pooled = self.fc1(out[:, 1:-1].mean(1)) if self.cfg.pooled else None
        return (self.proj_out(out) if self.cfg.out_dim else out), pooled


def timestep_sinusoid(t, dim):
    """diffusers' Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0): [cos, sin] of t times
    exp(-ln(1e4) i / (dim / 2)), (B,) -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AdaLayerNorm(nn.Module):
    """ELLA's AdaLayerNorm: LayerNorm without affine (eps 1e-6), then (1 + scale) and + shift from
    Linear(SiLU(timestep embedding)), zero-initialised (it starts as a plain LayerNorm)."""

    def __init__(self, dim, t_dim):
        super().__init__()
        self.linear = nn.Linear(t_dim, 2 * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, temb):
        shift, scale = self.linear(F.silu(temb)).view(len(x), 1, -1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class PerceiverBlock(nn.Module):
    """ELLA's PerceiverAttentionBlock: the latents attend to [themselves, the text] (both adaptively
    normed), then a squared-ReLU MLP (c_fc 4x, c_proj), each residual."""

    def __init__(self, dim, heads, t_dim):
        super().__init__()
        self.attn = MultiheadAttention(dim, heads)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(dim, 4 * dim), "c_proj": nn.Linear(4 * dim, dim)})
        self.ln_1, self.ln_2, self.ln_ff = (AdaLayerNorm(dim, t_dim) for _ in range(3))

    def forward(self, x, latents, temb, pad=None):
        q = self.ln_1(latents, temb)
        kv = torch.cat([q, self.ln_2(x, temb)], dim=1)  # (B, L + T, D)
        kv_pad = None if pad is None else torch.cat([pad.new_zeros(pad.shape[0], q.shape[1]), pad], 1)
        latents = latents + self.attn(q, kv, kv_pad)
        h = self.ln_ff(latents, temb)
        return latents + self.mlp["c_proj"](torch.relu(self.mlp["c_fc"](h)) ** 2)


@dataclass
class TSCConfig:
    """ELLA's released SD 1.5 connector (flan-t5-xl -> SD 1.5) is the default."""
    in_dim: int = 2048        # the LM's width (flan-t5-xl)
    width: int = 768          # = SD 1.5's context
    layers: int = 6
    heads: int = 8
    latents: int = 64         # output tokens, whatever the LM's count
    time_channel: int = 320   # the timestep sinusoid
    time_dim: int = 768       # the timestep embedding
    out_dim: int = 0          # 0: the context is `width` wide; else ELLA's optional proj_out (Linear, LN)
    masked: bool = True       # mask the LM's padding in attention (ELLA's fixed mode attends to it)


class TSC(nn.Module):
    """ELLA's timestep-aware semantic connector, in ELLA's names: time_embedding (the diffusers
    TimestepEmbedding of the timestep's sinusoid), connector (latents + time_aware_linear(SiLU(t_emb)),
    proj_in of the LM features, perceiver_blocks, optional proj_out). forward(x, t, mask): the context at
    diffusion timestep t."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.time_embedding = nn.ModuleDict({"linear_1": nn.Linear(cfg.time_channel, cfg.time_dim),
                                             "linear_2": nn.Linear(cfg.time_dim, cfg.time_dim)})
        c = nn.Module()
        c.latents = nn.Parameter(cfg.width ** -0.5 * torch.randn(cfg.latents, cfg.width))
        c.time_aware_linear = nn.Linear(cfg.time_dim, cfg.width)
        c.proj_in = nn.Linear(cfg.in_dim, cfg.width)
        c.perceiver_blocks = nn.ModuleList(PerceiverBlock(cfg.width, cfg.heads, cfg.time_dim)
                                           for _ in range(cfg.layers))
        if cfg.out_dim:
            c.proj_out = nn.Sequential(nn.Linear(cfg.width, cfg.out_dim), nn.LayerNorm(cfg.out_dim))
        self.connector = c

    def forward(self, x, t, mask=None):
        """x (B, T, in_dim) LM features, t (B,) timesteps (or one for all), mask (B, T) 1 = real token ->
        context (B, latents, out_dim or width)."""
        B, c = x.shape[0], self.connector
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        te = self.time_embedding
        temb = te["linear_2"](F.silu(te["linear_1"](timestep_sinusoid(t, self.cfg.time_channel).to(x.dtype))))
        temb = temb[:, None]  # (B, 1, time_dim)
        latents = c.latents[None].to(x.dtype) + c.time_aware_linear(F.silu(temb))  # (B, L, width)
        pad = None if mask is None or not self.cfg.masked else ~mask.bool()
        if pad is not None:
            pad = pad & pad.sum(1, keepdim=True).lt(pad.shape[1])  # an all-pad prompt: attend to all
        h = c.proj_in(x)
        for block in c.perceiver_blocks:
            latents = block(h, latents, temb, pad)
        return c.proj_out(latents) if self.cfg.out_dim else latents


# -----------------------------------------------------------------------------
# GlueGen GlueNet

# GlueGen's per-position L2 norms of CLIP ViT-L/14's last hidden state (SD 1.x's text encoder), a constant in
# its code (train_gluenet_multi.py:205, train_gluenet_sound_text.py:115, ldm/modules/encoders/modules.py:287):
# training targets are CLIP / (norm / 2), GlueNet's outputs are multiplied by norm / 2
GLUEGEN_CLIP_NORMS = (
    43.8203, 28.3668, 27.9345, 28.0084, 28.2958, 28.2576, 28.3373, 28.2695, 28.4097, 28.2790,
    28.2825, 28.2807, 28.2775, 28.2708, 28.2682, 28.2624, 28.2589, 28.2611, 28.2616, 28.2639,
    28.2613, 28.2566, 28.2615, 28.2665, 28.2799, 28.2885, 28.2852, 28.2863, 28.2780, 28.2818,
    28.2764, 28.2532, 28.2412, 28.2336, 28.2514, 28.2734, 28.2763, 28.2977, 28.2971, 28.2948,
    28.2818, 28.2676, 28.2831, 28.2890, 28.2979, 28.2999, 28.3117, 28.3363, 28.3554, 28.3626,
    28.3589, 28.3597, 28.3543, 28.3660, 28.3731, 28.3717, 28.3812, 28.3753, 28.3810, 28.3777,
    28.3693, 28.3713, 28.3670, 28.3691, 28.3679, 28.3624, 28.3703, 28.3703, 28.3720, 28.3594,
    28.3576, 28.3562, 28.3438, 28.3376, 28.3389, 28.3433, 28.3191)


@dataclass
class GlueNetConfig:
    num_tokens: int = 77  # tokens out; the token MLPs mix across a FIXED number of tokens
    in_dim: int = 1024  # source width (XLM-R large; the sound release: 64, AudioCLIP's 1024 as 16 x 64)
    out_dim: int = 768  # target width (CLIP-L text)
    mult: int = 2  # hidden width = mult * width, for tokens and channels alike
    depth: int = 5  # mixer blocks before the tail (head: 3 before the token change, depth - 3 after)
    in_tokens: int = 0  # 0: num_tokens (Translator_noln); else the tokens in, which a head changes
    # (Translator_w_head)


def _mlp(d_in, d_hidden, d_out, norm, gelu_out=False):
    """Linear-(LN)-GELU-Linear-(LN)-GELU-Linear-(LN)(-GELU): GlueGen's Sequential indices (0..7 with norms,
    0..4 without)."""
    layers = [nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(),
              nn.Linear(d_hidden, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(),
              nn.Linear(d_hidden, d_out), nn.LayerNorm(d_out)]
    if not norm:
        layers = [m for m in layers if not isinstance(m, nn.LayerNorm)] + ([nn.GELU()] if gelu_out else [])
    return nn.Sequential(*layers)


class MixerBlock(nn.Module):
    """Channel MLP then token MLP, each residual when neither the width nor the token count changes
    (GlueGen translator_base / _noln / translator_tok_dim); the token MLP's hidden width is mult times
    the tokens in."""

    def __init__(self, num_tokens, dim, dim_out, mult=2, norm=True, tokens_out=None, gelu_out=False,
                 residual=True):
        super().__init__()
        tokens_out = tokens_out or num_tokens
        self.residual = residual and dim == dim_out and tokens_out == num_tokens
        self.net_tok = _mlp(num_tokens, num_tokens * mult, tokens_out, norm)
        self.net_sen = _mlp(dim, dim * mult, dim_out, norm, gelu_out)

    def forward(self, x):
        """x: (B, T, dim) -> (B, tokens_out, dim_out)."""
        y = self.net_sen(x)  # (B, T, dim_out)
        if self.residual:
            y = y + x
        y = y.transpose(1, 2)  # (B, dim_out, T)
        z = self.net_tok(y)  # (B, dim_out, tokens_out)
        if self.residual:
            z = z + y
        return z.transpose(1, 2)  # (B, tokens_out, dim_out)


def _check_tokens(x, n):
    if x.dim() != 3 or x.shape[1] != n:
        raise BadInput(f"GlueNet mixes exactly {n} tokens (pad or truncate to it); "
                       f"got shape {tuple(x.shape)}")


class GlueTranslator(nn.Module):
    """depth LN mixer blocks, each x = gelu(block(x) + x), then a no-LN tail to dim_out (GlueGen
    Translator_noln)."""

    def __init__(self, num_tokens, dim, dim_out, mult=2, depth=5):
        super().__init__()
        self.num_tokens = num_tokens
        self.blocks = nn.ModuleList([MixerBlock(num_tokens, dim, dim, mult, norm=True) for _ in range(depth)])
        self.tail = MixerBlock(num_tokens, dim, dim_out, mult, norm=False)

    def forward(self, x):
        """x: (B, num_tokens, dim) -> (B, num_tokens, dim_out)."""
        _check_tokens(x, self.num_tokens)
        for block in self.blocks:
            x = F.gelu(block(x) + x)  # (B, T, dim)
        return self.tail(x)


class GlueHeadTranslator(nn.Module):
    """GlueGen's sound translator (Translator_w_head): 3 mixer blocks at the source's token count and width,
    a head that changes both (trans), depth - 3 blocks at the target's, then
    x = tail_2(tail_1(x) + x), the tails without LayerNorms and with a GELU after their channel MLP."""

    def __init__(self, in_tokens, num_tokens, dim, dim_out, mult=4, depth=5):
        super().__init__()
        if depth < 3:
            raise BadInput(f"the head translator has 3 blocks before its head: depth {depth} must be >= 3")
        self.in_tokens = in_tokens
        self.in_blocks = nn.ModuleList([MixerBlock(in_tokens, dim, dim, mult) for _ in range(3)])
        self.trans = MixerBlock(in_tokens, dim, dim_out, mult, tokens_out=num_tokens, residual=False)
        self.out_blocks = nn.ModuleList([MixerBlock(num_tokens, dim_out, dim_out, mult)
                                         for _ in range(depth - 3)])
        # translator_tok_dim never adds its input
        self.tail_1, self.tail_2 = (MixerBlock(num_tokens, dim_out, dim_out, mult, norm=False, gelu_out=True,
                                               residual=False) for _ in range(2))

    def forward(self, x):
        """x: (B, in_tokens, dim) -> (B, num_tokens, dim_out)."""
        _check_tokens(x, self.in_tokens)
        for block in self.in_blocks:
            x = F.gelu(block(x) + x)  # (B, T_in, dim)
        x = self.trans(x)  # (B, T, dim_out)
        for block in self.out_blocks:
            x = F.gelu(block(x) + x)
        return self.tail_2(self.tail_1(x) + x)


class GlueNet(nn.Module):
    """GlueGen GlueNet: encoder maps source features into the target text space, decoder maps back for the
    reconstruction loss, a token discriminator for the adversarial loss (salesforce/GlueGen: Translator_noln
    x2 + Discriminator; with cfg.in_tokens, the sound model's Translator_w_head x2). GlueGen's fixed
    normalisations live in two buffers, so that a checkpoint carries them: the encoder sees src_scale * x
    (GlueGen: XLM-R / 3) and is trained onto target / tgt_scale per token (GlueGen: CLIP / (its per-position
    norm / 2)); forward() maps raw source features to raw target features."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.in_tokens:
            c = cfg
            self.encoder = GlueHeadTranslator(c.in_tokens, c.num_tokens, c.in_dim, c.out_dim, c.mult, c.depth)
            self.decoder = GlueHeadTranslator(c.num_tokens, c.in_tokens, c.out_dim, c.in_dim, c.mult, c.depth)
        else:
            self.encoder = GlueTranslator(cfg.num_tokens, cfg.in_dim, cfg.out_dim, cfg.mult, cfg.depth)
            self.decoder = GlueTranslator(cfg.num_tokens, cfg.out_dim, cfg.in_dim, cfg.mult, cfg.depth)
        self.disc = TokenDiscriminator(cfg.out_dim)  # training only, kept so that a run resumes whole
        self.register_buffer("src_scale", torch.ones(()))  # set by the trainer (GlueGen: 1 / 3)
        self.register_buffer("tgt_scale", torch.ones(cfg.num_tokens))  # (T,), set by the trainer

    @property
    def in_tokens(self):
        return self.cfg.in_tokens or self.cfg.num_tokens

    def forward(self, x):
        """x: (B, in_tokens, in_dim) raw source features -> (B, num_tokens, out_dim) raw target features."""
        return self.encoder(x * self.src_scale) * self.tgt_scale[:, None]

    def set_gluegen_scales(self, src_div=3.0):
        """GlueGen's inference scales: the source / src_div, the output times its CLIP norms / 2."""
        if self.cfg.num_tokens != len(GLUEGEN_CLIP_NORMS):
            raise BadInput(f"GlueGen's CLIP norms are for {len(GLUEGEN_CLIP_NORMS)} tokens; this GlueNet "
                           f"gives {self.cfg.num_tokens}")
        with torch.no_grad():
            self.src_scale.fill_(1.0 / src_div)
            self.tgt_scale.copy_(torch.tensor(GLUEGEN_CLIP_NORMS) / 2)
        return self

    @classmethod
    def from_gluegen(cls, path):
        """Load a released GlueGen checkpoint: the encoder alone, as GlueGen saved it with
        torch.save(module.state_dict()). Multilingual (gluenet_<Language>_clip_overnorm_over3_noln.ckpt):
        Translator_noln(77, 1024, 768, 2, 5), keys blocks.N.net_tok|net_sen.K.*, tail.*; sound:
        Translator_w_head(16, 77, 64, 768, 4, 5), keys in_blocks.*, trans.*, out_blocks.*, tail_1|2.*. Both
        equal our encoder's, so the map is the identity, checked strictly; sizes are read from the file.
        The decoder and discriminator are not released (they keep their random init); the scales are
        GlueGen's inference ones (multilingual: XLM-R / 3; sound: AudioCLIP as it is), output x norms / 2."""
        sd = load_weights(path)
        if "trans.net_tok.0.weight" in sd:  # the sound translator
            tok, sen = sd["in_blocks.0.net_tok.0.weight"], sd["in_blocks.0.net_sen.0.weight"]
            outs = {k.split(".")[1] for k in sd if k.startswith("out_blocks.")}
            cfg = GlueNetConfig(num_tokens=sd["trans.net_tok.6.weight"].shape[0], in_dim=sen.shape[1],
                                out_dim=sd["trans.net_sen.6.weight"].shape[0],
                                mult=sen.shape[0] // sen.shape[1], depth=3 + len(outs),
                                in_tokens=tok.shape[1])
            src_div = 1.0
        elif all(k in sd for k in ("blocks.0.net_tok.0.weight", "blocks.0.net_sen.0.weight",
                                   "tail.net_sen.4.weight")):
            tok, sen = sd["blocks.0.net_tok.0.weight"], sd["blocks.0.net_sen.0.weight"]  # (2T, T), (2C, C)
            cfg = GlueNetConfig(num_tokens=tok.shape[1], in_dim=sen.shape[1],
                                out_dim=sd["tail.net_sen.4.weight"].shape[0],
                                mult=sen.shape[0] // sen.shape[1],
                                depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}))
            src_div = 3.0
        else:
            raise BadInput(f"{path} is not a GlueGen GlueNet encoder (neither the multilingual "
                           f"Translator_noln keys blocks.*/tail.* nor the sound Translator_w_head keys "
                           f"in_blocks.*/trans.*); first keys: {list(sd)[:5]}")
        model = cls(cfg)
        load_strict(model.encoder, sd, f"GlueGen encoder {path}")
        return model.set_gluegen_scales(src_div)


def gluegen_mix(sound, text, split=3):
    """GlueGen's sound + text condition (sound2img_audio_text_mix_loop.py:448-458): the sound's first `split`
    tokens, then the text's first `split`, then the mean of both from token 2 * split on; as many tokens as
    each input (B, T, D) -> (B, T, D). Its script loops split over 3..7 of CLIP's 77 tokens."""
    if sound.shape != text.shape:
        raise BadInput(f"mixing needs equal shapes: sound {tuple(sound.shape)}, text {tuple(text.shape)}")
    if not 1 <= split <= sound.shape[1] // 2:
        raise BadInput(f"mix split {split}: must be from 1 to {sound.shape[1] // 2} for {sound.shape[1]} "
                       f"tokens")
    i = split
    return torch.cat([sound[:, :i], text[:, :i], (sound[:, 2 * i:] + text[:, 2 * i:]) / 2], dim=1)


class GradReverse(torch.autograd.Function):
    """Identity forward, gradient times -lam backward (Ganin & Lempitsky 2015; GlueGen GradReverse)."""

    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


def grad_reverse(x, lam=1.0):
    return GradReverse.apply(x, lam)


class TokenDiscriminator(nn.Module):
    """Per-token domain classifier Linear(d -> d/4)-BN-ReLU-Linear(-> 2)-LogSoftmax behind gradient reversal
    (GlueGen Discriminator)."""

    def __init__(self, dim, n_domains=2, mult=0.25):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(nn.Linear(dim, inner), nn.BatchNorm1d(inner), nn.ReLU(),
                                 nn.Linear(inner, n_domains), nn.LogSoftmax(dim=1))

    def forward(self, x, lam=0.1):
        """x: (B, T, dim) -> log-probabilities (B * T, n_domains); the gradient into x is reversed, times
        lam."""
        x = grad_reverse(x.reshape(-1, x.shape[-1]), lam)  # (B*T, dim)
        return self.net(x)


# GlueGen's weights: loss = 1e4 * align + 1e4 * rec + 0.1 * adv
GLUEGEN_LOSS_WEIGHTS = {"align": 1e4, "rec": 1e4, "adv": 0.1}


@torch.no_grad()
def gluegen_token_weights(target):
    """GlueGen's per-token weights of the alignment MSE from a batch of targets (B, T, C) -> (1, T, 1):
    mean |batch-mean token - batch-mean LAST token| over channels, normalised to mean 1; the last token
    gets the mean of the two before it (so padding-like positions weigh little)."""
    if target.shape[1] < 3:
        raise BadInput(f"GlueGen token weights need at least 3 tokens, got {target.shape[1]}")
    mean = target.float().mean(0)  # (T, C)
    w = (mean - mean[-1]).abs().mean(1)  # (T,)
    w = w / w.mean().clamp_min(1e-12)
    w[-1] = (w[-2] + w[-3]) / 2
    return w[None, :, None].to(target.dtype)  # (1, T, 1)


def gluegen_targets(y, tgt_scale, token_weights="raw", disc_real="raw"):
    """From raw target features y (B, T, C) and the per-token divisor tgt_scale (T,): (the normalised target
    y / tgt_scale, the MSE's token weights (1, T, 1), the discriminator's real tokens). GlueGen computes the
    weights from the raw CLIP features (token_weights "raw"; "normalised": from the target; "off": ones) and
    gives the discriminator the raw ones in its multilingual script (disc_real "raw"), the normalised target
    in its sound script ("normalised")."""
    normed = y / tgt_scale[:, None]
    weights = {"raw": lambda: gluegen_token_weights(y), "normalised": lambda: gluegen_token_weights(normed),
               "off": lambda: y.new_ones(1, y.shape[1], 1)}
    if token_weights not in weights or disc_real not in ("raw", "normalised"):
        raise BadInput(f"token weights {token_weights!r} (raw, normalised, off), discriminator input "
                       f"{disc_real!r} (raw, normalised)")
    return normed, weights[token_weights](), y if disc_real == "raw" else normed


def gluenet_losses(gluenet, disc, x, target, token_weight=None, lam=0.1, terms=("align", "rec", "adv"),
                   real=None):
    """GlueGen's three losses, unweighted (combine with GLUEGEN_LOSS_WEIGHTS):
    align = mean(token_weight * (enc(x) - target)^2), rec = MSE(dec(enc(x)), x),
    adv = NLL(disc(real), 0) + NLL(disc(enc(x)), 1), the encoder seeing the reversed gradient (times lam).
    x: (B, T_in, in_dim) source features as GlueGen scales them (XLM-R / 3);
    target: (B, T, out_dim) target features (CLIP / (per-token norm / 2)); token_weight: (1, T, 1), or None
    for gluegen_token_weights(target) (GlueGen computes them from the raw CLIP features: pass those);
    real: the discriminator's "real" tokens (B, T, out_dim), None for target (GlueGen's multilingual script
    gives it the raw CLIP features, its sound script the normalised target). A loss not named in terms is
    not computed (None)."""
    unknown = set(terms) - {"align", "rec", "adv"}
    if unknown:
        raise BadInput(f"unknown GlueNet loss terms {sorted(unknown)} (align, rec, adv)")
    y = gluenet.encoder(x)  # (B, T, out_dim)
    align = rec = adv = None
    if "align" in terms:
        if token_weight is None:
            token_weight = gluegen_token_weights(target)
        align = (F.mse_loss(y, target, reduction="none") * token_weight).mean()
    if "rec" in terms:
        rec = F.mse_loss(gluenet.decoder(y), x)  # decoder: (B, T, out_dim) -> (B, T, in_dim)
    if "adv" in terms:
        logp_target = disc((target if real is None else real).detach(), lam)  # (B*T, 2)
        logp_ours = disc(y, lam)  # (B*T, 2)
        zeros = torch.zeros(logp_target.shape[0], dtype=torch.long, device=x.device)
        adv = F.nll_loss(logp_target, zeros) + F.nll_loss(logp_ours, zeros + 1)
    return align, rec, adv


def alignment_loss(pred, target, mask=None, kind="cosine", norm_weight=2e-5):
    """OmniDiffusion stage 1: per token 1 - cos(pred, target) + norm_weight * (|pred| - |target|)^2
    (kind "cosine"), or the squared error averaged over channels (kind "mse"); the mean over the tokens
    where mask is 1. pred, target (B, T, C); mask (B, T) or None (every token)."""
    if pred.shape != target.shape:
        raise BadInput(f"alignment_loss: prediction {tuple(pred.shape)} and target "
                       f"{tuple(target.shape)} differ")
    if kind == "cosine":
        per_token = (1 - F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
                     + norm_weight * (pred.norm(dim=-1) - target.norm(dim=-1)) ** 2)  # (B, T)
    elif kind == "mse":
        per_token = ((pred - target) ** 2).mean(-1)  # (B, T)
    else:
        raise BadInput(f"unknown alignment loss {kind!r} (cosine or mse)")
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)
