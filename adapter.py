"""
Adapters that carry a language model's hidden states into a diffusion model's text-conditioning space:
- TextAdapter: LaVi-Bridge's LN -> GEGLU FF -> LN -> GEGLU FF (ShihaoZhaoZSH/LaVi-Bridge
  modules/adapters.py; released as adapter/config.json + diffusion_pytorch_model.safetensors|.bin).
- GlueNet: GlueGen's token-MLP / channel-MLP translator with a reconstruction decoder, a token
  discriminator behind gradient reversal, and the three training losses (salesforce/GlueGen
  multilingual-gluenet/model.py, train_gluenet_multi.py).
"""
import json
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
# GlueGen GlueNet


@dataclass
class GlueNetConfig:
    num_tokens: int = 77  # the token MLP mixes across a FIXED number of tokens
    in_dim: int = 1024  # source LM width (XLM-R large)
    out_dim: int = 768  # target width (CLIP-L text)
    mult: int = 2  # hidden width = mult * width, for tokens and channels alike
    depth: int = 5  # mixer blocks before the tail


def _mlp(d_in, d_hidden, d_out, norm):
    """Linear-(LN)-GELU-Linear-(LN)-GELU-Linear-(LN): indices 0..7 with norms, 0..4 without (GlueGen keys)."""
    layers = [nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(),
              nn.Linear(d_hidden, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(),
              nn.Linear(d_hidden, d_out), nn.LayerNorm(d_out)]
    if not norm:
        layers = [m for m in layers if not isinstance(m, nn.LayerNorm)]
    return nn.Sequential(*layers)


class MixerBlock(nn.Module):
    """Channel MLP then token MLP, each residual when the width is kept (GlueGen translator_base / _noln)."""

    def __init__(self, num_tokens, dim, dim_out, mult=2, norm=True):
        super().__init__()
        self.residual = dim == dim_out
        self.net_tok = _mlp(num_tokens, num_tokens * mult, num_tokens, norm)
        self.net_sen = _mlp(dim, dim * mult, dim_out, norm)

    def forward(self, x):
        """x: (B, T, dim) -> (B, T, dim_out)."""
        y = self.net_sen(x)  # (B, T, dim_out)
        if self.residual:
            y = y + x
        y = y.transpose(1, 2)  # (B, dim_out, T)
        z = self.net_tok(y)  # (B, dim_out, T)
        if self.residual:
            z = z + y
        return z.transpose(1, 2)  # (B, T, dim_out)


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
        if x.dim() != 3 or x.shape[1] != self.num_tokens:
            raise BadInput(f"GlueNet mixes exactly {self.num_tokens} tokens (pad or truncate to it); "
                           f"got shape {tuple(x.shape)}")
        for block in self.blocks:
            x = F.gelu(block(x) + x)  # (B, T, dim)
        return self.tail(x)


class GlueNet(nn.Module):
    """GlueGen GlueNet: encoder maps source-LM features into the target text space, decoder maps back
    for the reconstruction loss, a token discriminator for the adversarial loss (salesforce/GlueGen,
    Translator_noln x2 + Discriminator). GlueGen's fixed normalisations live in two buffers, so that a
    checkpoint carries them: the encoder sees src_scale * x (GlueGen: XLM-R / 3) and is trained onto
    target / tgt_scale per token (GlueGen: CLIP / (mean norm of that token position / 2)); forward()
    maps raw LM features to raw target features."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = GlueTranslator(cfg.num_tokens, cfg.in_dim, cfg.out_dim, cfg.mult, cfg.depth)
        self.decoder = GlueTranslator(cfg.num_tokens, cfg.out_dim, cfg.in_dim, cfg.mult, cfg.depth)
        self.disc = TokenDiscriminator(cfg.out_dim)  # training only, kept so that a run resumes whole
        self.register_buffer("src_scale", torch.ones(()))  # set by the trainer (GlueGen: 1 / 3)
        self.register_buffer("tgt_scale", torch.ones(cfg.num_tokens))  # (T,), set by the trainer from data

    def forward(self, x):
        """x: (B, num_tokens, in_dim) raw source features -> (B, num_tokens, out_dim) raw target features."""
        return self.encoder(x * self.src_scale) * self.tgt_scale[:, None]

    @classmethod
    def from_gluegen(cls, path):
        """Load a released GlueGen checkpoint (gluenet_<Language>_clip_overnorm_over3_noln.ckpt). GlueGen
        saved only the encoder, torch.save(Translator_noln(77, 1024, 768, 2, 5).state_dict()), whose keys
        equal our encoder's (blocks.N.net_tok|net_sen.K.*, tail.net_tok|net_sen.K.*), so the map is the
        identity, checked strictly. Sizes are read from the file. The decoder and the discriminator are
        not released: they keep their random init. Nor are the scales (GlueGen's scripts apply XLM-R / 3
        and CLIP's per-position norm / 2): src_scale and tgt_scale stay 1 until set.
        (The sound GlueNet, Translator_w_head, is a different architecture.)"""
        sd = load_weights(path)
        need = ("blocks.0.net_tok.0.weight", "blocks.0.net_sen.0.weight", "tail.net_sen.4.weight")
        if any(k not in sd for k in need):
            raise BadInput(f"{path} is not a GlueGen GlueNet encoder (needs keys {need}); "
                           f"first keys: {list(sd)[:5]}")
        # (mult*T, T), (mult*C, C)
        tok, sen = sd["blocks.0.net_tok.0.weight"], sd["blocks.0.net_sen.0.weight"]
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        cfg = GlueNetConfig(num_tokens=tok.shape[1], in_dim=sen.shape[1],
                            out_dim=sd["tail.net_sen.4.weight"].shape[0],
                            mult=sen.shape[0] // sen.shape[1], depth=depth)
        model = cls(cfg)
        load_strict(model.encoder, sd, f"GlueGen encoder {path}")
        return model


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


def gluenet_losses(gluenet, disc, x, target, token_weight=None, lam=0.1, terms=("align", "rec", "adv")):
    """GlueGen's three losses, unweighted (combine with GLUEGEN_LOSS_WEIGHTS):
    align = mean(token_weight * (enc(x) - target)^2), rec = MSE(dec(enc(x)), x),
    adv = NLL(disc(target), 0) + NLL(disc(enc(x)), 1), the encoder seeing the reversed gradient (times lam).
    x: (B, T, in_dim) source-LM features as GlueGen scales them (XLM-R / 3);
    target: (B, T, out_dim) target features (CLIP / (per-token norm / 2)); token_weight: (1, T, 1) or
    None for gluegen_token_weights(target). A loss not named in terms is not computed (None)."""
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
        logp_target = disc(target.detach(), lam)  # (B*T, 2)
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
