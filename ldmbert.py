"""
LDMBert, the text encoder of CompVis/ldm-text2im-large-256 (diffusers LDMBertModel), from scratch: token and
learned position embeddings, 32 pre-LN BART-style encoder layers, a final LayerNorm. Module names are the
release's bert/ keys (model.*, plus its unused MLM head to_logits.*), so the file loads with no renaming.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_io import (BadInput, MissingInput, build_and_load, dataclass_from_dict, find_weight_file,
                      load_weights, read_config)

LDMBERT_ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@dataclass
class LDMBertConfig:
    """CompVis/ldm-text2im-large-256 bert/config.json (diffusers LDMBertConfig); the defaults are the
    release's."""
    vocab_size: int = 30522
    max_position_embeddings: int = 77
    encoder_layers: int = 32
    encoder_ffn_dim: int = 5120
    encoder_attention_heads: int = 8
    head_dim: int = 64  # attention width heads * head_dim = 512, not d_model
    d_model: int = 1280
    activation_function: str = "gelu"
    dropout: float = 0.1  # embeddings and residual branches, in training
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0

    @classmethod
    def from_dict(cls, d):
        """From a bert/config.json dict: unknown keys ignored, a missing size an error."""
        sizes = ("vocab_size", "max_position_embeddings", "encoder_layers", "encoder_ffn_dim",
                 "encoder_attention_heads", "head_dim", "d_model")
        missing = [k for k in sizes if k not in d]
        if missing:
            raise BadInput(f"LDMBert config.json lacks {missing}")
        if d.get("activation_function", "gelu") not in LDMBERT_ACT:
            raise BadInput(f"LDMBert activation {d['activation_function']!r} not supported "
                           f"({', '.join(LDMBERT_ACT)})")
        return dataclass_from_dict(cls, d)


class LDMBertLayer(nn.Module):
    """Pre-LN encoder block (BART layout): x + out(attn(ln(x))), x + fc2(act(fc1(ln(x)))); q/k/v have no
    bias."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, inner = cfg, cfg.encoder_attention_heads * cfg.head_dim
        self.self_attn = nn.Module()
        for name in ("k_proj", "v_proj", "q_proj"):  # the release's registration order
            setattr(self.self_attn, name, nn.Linear(cfg.d_model, inner, bias=False))
        self.self_attn.out_proj = nn.Linear(inner, cfg.d_model)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x, bias=None):
        """x: (B, T, C); bias: additive attention bias (B, 1, 1, T) or None."""
        cfg, a, train = self.cfg, self.self_attn, self.training
        B, T, _ = x.shape
        h = self.self_attn_layer_norm(x)
        q, k, v = (p(h).view(B, T, cfg.encoder_attention_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
                   for p in (a.q_proj, a.k_proj, a.v_proj))
        p = cfg.attention_dropout if train else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # (B, H, T, D)
        x = x + F.dropout(a.out_proj(y.transpose(1, 2).reshape(B, T, -1)), cfg.dropout, train)
        h = LDMBERT_ACT[cfg.activation_function](self.fc1(self.final_layer_norm(x)))
        h = F.dropout(h, cfg.activation_dropout, train)
        return x + F.dropout(self.fc2(h), cfg.dropout, train)


class LDMBert(nn.Module):
    """LDM's text encoder (diffusers LDMBertModel): token + learned position embeddings, pre-LN layers, a
    final LayerNorm. Keys are the release's bert/ file (model.*, plus the unused MLM head to_logits.*)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.d_model),
            embed_positions=nn.Embedding(cfg.max_position_embeddings, cfg.d_model),
            layers=nn.ModuleList(LDMBertLayer(cfg) for _ in range(cfg.encoder_layers)),
            layer_norm=nn.LayerNorm(cfg.d_model)))
        self.to_logits = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, ids, mask=None):
        """ids: (B, T), T <= max_position_embeddings; mask: (B, T) 1 = attend (keys only) or None -> (B, T,
        C). As diffusers, masked keys get finfo.min, not -inf (a fully masked row attends evenly, no NaN).
        The LDM pipeline passes no mask: it attends to its 77 padded tokens."""
        m, T = self.model, ids.shape[1]
        if T > self.cfg.max_position_embeddings:
            raise BadInput(f"LDMBert takes at most {self.cfg.max_position_embeddings} tokens, got {T}")
        x = m.embed_tokens(ids) + m.embed_positions(torch.arange(T, device=ids.device))  # (B, T, C)
        x = F.dropout(x, self.cfg.dropout, self.training)
        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(
                mask.to(x.dtype) != 1, torch.finfo(x.dtype).min)[:, None, None, :]  # (B, 1, 1, T)
        for layer in m.layers:
            x = layer(x, bias)
        return m.layer_norm(x)

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32, device="cpu"):
        """A pipeline's bert/ folder (config.json + weights), loaded strictly."""
        cfg = read_config(folder)
        if cfg is None:
            raise MissingInput(f"{folder}: no config.json (LDMBert's bert/ folder)")
        sd = load_weights(find_weight_file(folder))
        return build_and_load(lambda: cls(LDMBertConfig.from_dict(cfg)), sd, f"LDMBert {folder}", dtype,
                              device)
