"""
Train a bridge between a language model and a pretrained text-to-image model (LaVi-Bridge: LoRA in
both + a TextAdapter), or the shapes world's base model. One script for one process or many:

python train.py                                            # the shapes world on 2 CPU cores, ~6 min
python train.py --preset shapes-base                       # the shapes base model itself (~45 min)
torchrun --nproc_per_node 8 train.py --lm llama2 --vision sd14 --data train.tsv --dtype bf16 --compile true
"""
import argparse
import functools
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from adapter import GLUEGEN_LOSS_WEIGHTS, alignment_loss, gluenet_losses
from model import (Bridge, BridgeConfig, PixelCodec, SHAPES_SCHEDULER, UNet, WordEncoder, WordEncoderConfig,
                   build_bridge, init_trainable, is_shapes, load_native_encoder, load_trainable, read_checkpoint,
                   save_checkpoint, save_shapes_base, shapes_unet_config, token_count, trainable_state_dict)
from lora import lora_parameters
from unet import cpu_layout, set_grad_checkpointing

# -----------------------------------------------------------------------------
# presets: the release's recipes and the shapes world. Explicit flags override a preset.

DEFAULTS = dict(
    method="lavi", lm="t5-large", vision="sd14", adapter="text", adapter_mid=0, adapter_dropout=0.1, lora_rank=32, lora_lm=True,
    lora_vision=True, lora_dropout=0.1, max_length=0,
    data="shapes", size=512, flip=True, latent_cache="", num_workers=2,
    steps=1000, batch_size=1, grad_accum=1, lr_vision=1e-4, lr_lm=5e-6, lr_adapter=1e-4, weight_decay=1e-2,
    warmup=500, grad_clip=1.0, caption_dropout=0.0, ema=0.0,
    dtype="fp32", compile=False, grad_checkpointing=False, cpu_layout=True, device="", seed=0,
    out="out/bridge", resume=False, init_from="", log_every=10, save_every=500, sample_every=0,
    sample_prompts="a photo of a cat|a red car in the snow", eval=False, eval_n=48, eval_sets="seen,unseen,paraphrase",
    # text-only methods (gluenet, align): GlueGen's loss weights and scales, OmniDiffusion's stage-1 loss
    native="", loss_align=GLUEGEN_LOSS_WEIGHTS["align"], loss_rec=GLUEGEN_LOSS_WEIGHTS["rec"],
    loss_adv=GLUEGEN_LOSS_WEIGHTS["adv"], token_weights=True, adv_lambda=0.1, src_div=3.0, glue_depth=5, glue_mult=2,
    align_loss="cosine",
)
PRESETS = {
    # LaVi-Bridge releases (REFERENCE.md): AdamW wd 1e-2, warm-up 500, clip 1.0, 512 px
    "t5-sd14": dict(lm="t5-large", vision="sd14"),
    "llama2-sd14": dict(lm="llama2", vision="sd14"),
    "t5-pixart": dict(lm="t5-large", vision="pixart-512", lr_vision=2e-5, lr_adapter=2e-5),
    # the shapes world (data.py): MiniLM bridged into the shipped base model, on a CPU
    "shapes": dict(lm="minilm", vision="shapes", data="shapes", size=32, steps=300, batch_size=32, max_length=16,
                   lora_rank=8, lora_dropout=0.0, lr_vision=5e-4, lr_lm=5e-5, lr_adapter=1e-3, warmup=50,
                   caption_dropout=0.1, out="out/shapes", save_every=100, log_every=10, eval=True,
                   sample_prompts="a small red circle on the left|a large blue square at the top"),
    "shapes-base": dict(method="base", lm="words", vision="shapes", data="shapes", size=32, steps=3000,
                        batch_size=32, lora_rank=0, lr_vision=1e-3, lr_adapter=1e-3, warmup=100,
                        caption_dropout=0.1, weight_decay=0.0, out="out/shapes-base", save_every=250, eval=True),
    # text-only bridges into the shapes base model (issue 6): captions of the training grammar, no images
    # GlueGen's losses without its token weights (measured in the README: they cost accuracy on this world)
    "shapes-gluenet": dict(method="gluenet", lm="minilm", vision="shapes", data="shapes", steps=2000, batch_size=32,
                           max_length=16, glue_depth=2, lora_rank=0, lr_adapter=1e-3, warmup=50, caption_dropout=0.1,
                           token_weights=False, out="out/shapes-gluenet", save_every=500, log_every=10, eval=True),
    "shapes-align": dict(method="align", lm="minilm", vision="shapes", data="shapes", steps=500, batch_size=32,
                         max_length=16, lora_rank=0, lr_adapter=1e-3, warmup=50, caption_dropout=0.1,
                         out="out/shapes-align", save_every=100, log_every=10, eval=True),
}


def release_preset(lm, vision):
    """The release preset whose (lm, vision) pair this is, for its learning rates."""
    for name, p in PRESETS.items():
        if p.get("lm") == lm and p.get("vision") == vision:
            return p
    return {}


def resolve_args(args):
    """DEFAULTS < preset (or the release recipe of --lm/--vision) < explicit flags."""
    given = {k: v for k, v in vars(args).items() if v is not None and k != "preset"}
    # no preset: the shapes world, unless --lm/--vision name real models (then the release recipe of the pair)
    real = given.get("lm") or (given.get("vision") and not is_shapes(given["vision"]))
    preset = args.preset or ("" if real else "shapes")
    p = dict(PRESETS[preset]) if preset else release_preset(given.get("lm", DEFAULTS["lm"]),
                                                            given.get("vision", DEFAULTS["vision"]))
    cfg = {**DEFAULTS, **p, **given, "preset": preset}
    return argparse.Namespace(**cfg)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b = lambda s: s.lower() in ("1", "true", "yes", "on")  # noqa: E731
    p.add_argument("--preset", choices=list(PRESETS), help="a named recipe; explicit flags override it (default: shapes)")
    # model
    p.add_argument("--method", choices=["lavi", "base", "gluenet", "align"],
                   help="lavi: LoRA + adapter bridge; base: train the shapes base model; text only (no images): "
                        "gluenet: GlueGen's GlueNet, align: OmniDiffusion stage 1 (TextAdapter onto the native encoder)")
    p.add_argument("--lm", help="language model: a preset (t5-large, llama2, minilm, ...), hub id or local folder")
    p.add_argument("--vision", help="vision model: sd14, sd15, ldm, pixart-512, pixart-1024, shapes, or a local path")
    p.add_argument("--adapter", choices=["text", "gluenet", "none"],
                   help="TextAdapter, GlueNet (GlueGen), or none when the widths already match")
    p.add_argument("--adapter-mid", type=int, help="adapter middle width (0: (in + out) / 2)")
    p.add_argument("--adapter-dropout", type=float, help="dropout inside the adapter (release: 0.1)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (0: no LoRA)")
    p.add_argument("--lora-lm", type=b, help="LoRA in the language model (true/false)")
    p.add_argument("--lora-vision", type=b, help="LoRA in the vision model (true/false)")
    p.add_argument("--lora-dropout", type=float, help="dropout on the LoRA branch")
    p.add_argument("--max-length", type=int, help="text tokens (0: the recipe's)")
    # data
    p.add_argument("--data", help="shapes, a TSV (path<TAB>caption), a folder of image+.txt, or .tar shards (comma-separated)")
    p.add_argument("--size", type=int, help="image size in pixels")
    p.add_argument("--flip", type=b, help="random horizontal flips")
    p.add_argument("--latent-cache", help="folder of precomputed VAE latents (made once if missing)")
    p.add_argument("--num-workers", type=int, help="data-loader workers per rank")
    # optimisation
    p.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--batch-size", type=int, help="images per rank per micro-step")
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimiser step")
    p.add_argument("--lr-vision", type=float, help="LR of the vision LoRA (base: of the whole base model)")
    p.add_argument("--lr-lm", type=float, help="LR of the LM LoRA")
    p.add_argument("--lr-adapter", type=float, help="LR of the adapter (base: of the word encoder)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, help="linear warm-up steps, then constant")
    p.add_argument("--grad-clip", type=float, help="gradient-norm clip (0: off)")
    p.add_argument("--caption-dropout", type=float, help="probability of an empty caption (for CFG)")
    p.add_argument("--ema", type=float, help="EMA decay of the trainable weights (0: off)")
    # system
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "fp64"],
                   help="AMP compute dtype (bf16/fp16: CUDA only); fp64 for exact numerical checks")
    p.add_argument("--compile", type=b, help="torch.compile the bridge")
    p.add_argument("--grad-checkpointing", type=b, help="recompute vision activations in backward")
    p.add_argument("--cpu-layout", type=b, help="CPU: channels-last activations, frozen conv weights laid out once for "
                                                "oneDNN (faster; the big ones take up to twice their memory again)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--seed", type=int, help="seed of data order, noise and init")
    # output
    p.add_argument("--out", help="output folder (checkpoint ckpt.safetensors, samples/)")
    p.add_argument("--resume", type=b, help="continue from OUT/ckpt.safetensors")
    p.add_argument("--init-from", help="initialise the trainable weights from a checkpoint (a new run)")
    p.add_argument("--log-every", type=int, help="steps between log lines and NaN checks")
    p.add_argument("--save-every", type=int, help="steps between checkpoints")
    p.add_argument("--sample-every", type=int, help="steps between sample grids (0: off)")
    p.add_argument("--sample-prompts", help="|-separated prompts for the sample grids")
    p.add_argument("--eval", type=b, help="shapes world: evaluate attribute accuracy at the end")
    p.add_argument("--eval-n", type=int, help="images per evaluation set")
    p.add_argument("--eval-sets", help="comma-separated evaluation sets (seen, unseen, paraphrase, spanish)")
    # text-only methods: --data is shapes (training captions), shapes:spanish (Spanish -> English pairs),
    # a .txt (one caption a line: source = target) or a TSV (source<TAB>target)
    p.add_argument("--native", help="target text encoder (default: --vision's own; or an LM, e.g. clip)")
    p.add_argument("--loss-align", type=float, help="gluenet: weight of the token-weighted MSE (0: off; GlueGen 1e4)")
    p.add_argument("--loss-rec", type=float, help="gluenet: weight of the reconstruction MSE (0: off; GlueGen 1e4)")
    p.add_argument("--loss-adv", type=float, help="gluenet: weight of the adversarial NLL (0: off; GlueGen 0.1)")
    p.add_argument("--token-weights", type=b, help="gluenet: GlueGen's per-token weights in the MSE (false: uniform)")
    p.add_argument("--adv-lambda", type=float, help="gluenet: gradient-reversal factor (GlueGen 0.1)")
    p.add_argument("--src-div", type=float, help="gluenet: the LM's features are divided by this (GlueGen 3)")
    p.add_argument("--glue-depth", type=int, help="gluenet: mixer blocks (GlueGen 5)")
    p.add_argument("--glue-mult", type=int, help="gluenet: hidden width multiplier (GlueGen 2)")
    p.add_argument("--align-loss", choices=["cosine", "mse"],
                   help="align: 1 - cosine + 2e-5 * (norm difference)^2 per token (OmniDiffusion), or MSE")
    return p


# -----------------------------------------------------------------------------
# helpers

def lr_at(step, base_lr, warmup):
    """Linear warm-up then constant."""
    return base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr


def sample_draws(seed, g, caption_dropout, num_train_timesteps=1000):
    """(drop caption?, timestep, normal(shape) drawer) of global sample g: keyed by (seed, g) alone, so
    a run draws the same whatever its world size, batch split or resume point."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + g)
    drop = bool(torch.rand((), generator=gen) < caption_dropout)
    t = int(torch.randint(0, num_train_timesteps, (), generator=gen))
    return drop, t, lambda shape: torch.randn(shape, generator=gen)


def build_base(args, device):
    """A fresh shapes base model: U-Net + word encoder, all trainable, in a Bridge."""
    cfg = BridgeConfig(lm="words", vision=args.vision, adapter="none", lora_rank=0)
    unet = UNet(shapes_unet_config()).to(device)
    words = WordEncoder(WordEncoderConfig(vocab_size=len(data.WORDS) + 2)).to(device)
    return Bridge(cfg, words, None, unet, PixelCodec(), dict(SHAPES_SCHEDULER), "unet")


def param_groups(bridge, args):
    """AdamW groups: vision LoRA, LM LoRA, adapter (base: the whole U-Net and word encoder)."""
    if args.method == "base":
        groups = [("vision", list(bridge.denoiser.parameters()), args.lr_vision),
                  ("text", list(bridge.text.parameters()), args.lr_adapter)]
    else:
        groups = [("vision", lora_parameters(bridge.denoiser), args.lr_vision),
                  ("lm", lora_parameters(bridge.text.model), args.lr_lm),
                  ("adapter", list(bridge.adapter.parameters()) if bridge.adapter is not None else [], args.lr_adapter)]
    return [dict(params=ps, lr=lr, base_lr=lr, name=n) for n, ps, lr in groups if ps]


class IndexedImages(torch.utils.data.Dataset):
    """Global sample index g -> (image (3, H, W), caption, g) or None when the image does not decode.
    g walks epochs of a seeded permutation (epoch g // N); the flip is seeded by g. The data a step sees
    therefore depends only on (seed, step), whatever the world size, the workers, or a resume."""

    def __init__(self, ds, seed):
        self.ds, self.seed, self._perm = ds, seed, (None, None)

    def __len__(self):
        return 1 << 62

    def position(self, g):
        """(item index, flip) of global sample g."""
        epoch, pos = divmod(g, len(self.ds.items))
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.ds.items)))
        flip = bool(self.ds.flip and np.random.default_rng([self.seed, g, 1]).random() < 0.5)
        return int(self._perm[1][pos]), flip

    def __getitem__(self, g):
        i, flip = self.position(g)
        out = self.ds.load(i, flip)
        return None if out is None else (out[0], out[1], g)


class StepSampler(torch.utils.data.Sampler):
    """This rank's global sample indices, one list per micro-batch, from `start` micro-batch on."""

    def __init__(self, start, batch_size, rank, world):
        self.start, self.bs, self.rank, self.world = start, batch_size, rank, world

    def __iter__(self):
        m = self.start
        while True:
            lo = (m * self.world + self.rank) * self.bs
            yield list(range(lo, lo + self.bs))
            m += 1


def collate(items):
    """Drop unreadable images (counted by the caller), stack the rest."""
    ok = [x for x in items if x is not None]
    if not ok:
        return None, [], [], len(items)
    return torch.stack([x[0] for x in ok]), [x[1] for x in ok], [x[2] for x in ok], len(items) - len(ok)


@torch.no_grad()
def build_latent_cache(bridge, ds, folder, batch_size=8, dtype=torch.float16):
    """Encode every item of ds once, both flips, into folder/latents.safetensors: mean and std of the
    VAE posterior (N, 2, C, h, w) (the release samples from it, so the cache keeps the distribution)
    and a valid flag (N,) (0 = the image did not decode: counted, skipped in training)."""
    from safetensors.torch import save_file
    dev = next(bridge.vae.parameters(), torch.zeros(())).device
    n, means, stds, valid = len(ds.items), [], [], torch.zeros(len(ds.items), dtype=torch.uint8)
    for lo in tqdm(range(0, n, batch_size), desc="latent cache"):
        idx = range(lo, min(n, lo + batch_size))
        loaded = [(ds.load(i, False), ds.load(i, True)) for i in idx]
        for j, (a, b) in zip(idx, loaded):
            valid[j] = a is not None and b is not None
        imgs = [torch.stack([a[0], b[0]]) if a is not None and b is not None else torch.zeros(2, 3, ds.size, ds.size)
                for a, b in loaded]
        x = torch.cat(imgs).to(dev, next(bridge.vae.parameters()).dtype)  # (2 * b, 3, H, W)
        mean, logvar = bridge.vae.encode(x)
        means.append(mean.view(-1, 2, *mean.shape[1:]).to("cpu", dtype))
        stds.append(torch.exp(0.5 * logvar).view(-1, 2, *mean.shape[1:]).to("cpu", dtype))
    os.makedirs(folder, exist_ok=True)
    meta = {"source": json.dumps(ds.source), "size": str(ds.size), "items": str(n),
            "captions": json.dumps([it[3] for it in ds.items])}
    tmp = os.path.join(folder, f"latents.safetensors.tmp{os.getpid()}")
    save_file({"mean": torch.cat(means), "std": torch.cat(stds), "valid": valid}, tmp, metadata=meta)
    os.replace(tmp, os.path.join(folder, "latents.safetensors"))
    return int(n - valid.sum())


def load_latent_cache(folder, ds):
    """(mean, std, valid) of a cache made by build_latent_cache for this very dataset, else a clear error."""
    from safetensors import safe_open
    path = os.path.join(folder, "latents.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        if json.loads(meta["source"]) != ds.source or int(meta["size"]) != ds.size or int(meta["items"]) != len(ds.items):
            raise ValueError(f"{path} was made for {meta['source']} at {meta['size']} px ({meta['items']} items), "
                             f"not for {ds.source!r} at {ds.size} px ({len(ds.items)} items): delete it or pass another --latent-cache")
        return f.get_tensor("mean"), f.get_tensor("std"), f.get_tensor("valid")


class Data:
    """This rank's micro-batches by step: (images or None, posterior (mean, std) or None, captions, g).
    The shapes world is drawn procedurally from (seed, step); real data comes through a DataLoader (or the
    latent cache) indexed by global sample index. Unreadable images are counted and skipped."""

    def __init__(self, args, bridge, rank, world, start_step, master):
        self.args, self.rank, self.world = args, rank, world
        self.skipped = 0
        if args.data == "shapes":
            return
        self.ds = data.ImageTextDataset(args.data.split(",") if "," in args.data else args.data,
                                        size=args.size, flip=args.flip)
        self.indexed = IndexedImages(self.ds, args.seed)
        self.cache = None
        if args.latent_cache:
            if not os.path.isfile(os.path.join(args.latent_cache, "latents.safetensors")):
                if master:
                    bad = build_latent_cache(bridge, self.ds, args.latent_cache)
                    print(f"latent cache written to {args.latent_cache} ({bad} unreadable images)")
                if world > 1:
                    dist.barrier()
            self.cache = load_latent_cache(args.latent_cache, self.ds)
            return
        sampler = StepSampler(start_step * args.grad_accum, args.batch_size, rank, world)
        self.loader = iter(torch.utils.data.DataLoader(
            self.indexed, batch_sampler=sampler, collate_fn=collate, num_workers=args.num_workers,
            persistent_workers=args.num_workers > 0, prefetch_factor=4 if args.num_workers > 0 else None,
            generator=torch.Generator().manual_seed(args.seed)))  # not the global RNG: dropout's

    def next(self, step, micro):
        a = self.args
        m = step * a.grad_accum + micro
        lo = (m * self.world + self.rank) * a.batch_size
        if a.data == "shapes":  # the global batch of this micro-step, this rank's slice
            rng = np.random.default_rng([a.seed, m])
            images, captions, _ = data.sample_batch(rng, a.batch_size * self.world, a.size)
            s = slice(self.rank * a.batch_size, (self.rank + 1) * a.batch_size)
            return images[s], None, captions[s], list(range(lo, lo + a.batch_size))
        if self.cache is not None:
            mean, std, valid = self.cache
            pos = [self.indexed.position(g) + (g,) for g in range(lo, lo + a.batch_size)]
            keep = [(i, f, g) for i, f, g in pos if valid[i]]
            self.skipped += len(pos) - len(keep)
            if not keep:
                raise RuntimeError(f"every image of rank {self.rank}'s batch at step {step} is unreadable")
            i, f = torch.tensor([k[0] for k in keep]), torch.tensor([int(k[1]) for k in keep])
            post = (mean[i, f].float(), std[i, f].float())  # (b, C, h, w)
            return None, post, [self.ds.items[k[0]][3] for k in keep], [k[2] for k in keep]
        images, captions, gs, bad = next(self.loader)
        self.skipped += bad
        if images is None:
            raise RuntimeError(f"every image of rank {self.rank}'s batch at step {step} is unreadable")
        return images, None, captions, gs

    def report(self):
        if self.args.data == "shapes":
            return ""
        return f"{self.ds.report()}; skipped in training: {self.skipped} unreadable"


# -----------------------------------------------------------------------------

def main(args):
    args = resolve_args(args)
    if args.method in ("gluenet", "align"):
        return train_text_only(args)
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        use_cuda = torch.cuda.is_available() and args.device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    master = rank == 0
    if args.dtype in ("bf16", "fp16") and device.type != "cuda":
        raise SystemExit(f"--dtype {args.dtype} is AMP for CUDA; on {device.type} use --dtype fp32")
    ptdtype = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    amp = args.dtype in ("bf16", "fp16")
    autocast = torch.autocast(device.type, dtype=ptdtype) if amp else nullcontext()
    wdtype = torch.float64 if args.dtype == "fp64" else torch.float32  # trainable weights, latents, loss
    torch.manual_seed(args.seed)

    # model: frozen parts in the compute dtype, trainable parts in fp32
    if args.method == "base":
        bridge = build_base(args, device).to(wdtype)
    else:
        cfg = BridgeConfig(**{f.name: getattr(args, f.name) for f in fields(BridgeConfig)})
        bridge = build_bridge(cfg, device=device, dtype=wdtype)
        for p in bridge.parameters():
            if not p.requires_grad:
                p.data = p.data.to(ptdtype)
    if args.grad_checkpointing:  # recompute the vision model's blocks in backward instead of keeping activations
        set_grad_checkpointing(bridge.denoiser)
    if device.type == "cpu" and args.cpu_layout and not args.compile:  # channels-last, conv weights packed once
        cpu_layout(bridge.denoiser)
    groups = param_groups(bridge, args)
    trainable = [p for g in groups for p in g["params"]]
    if master:
        n_train = sum(p.numel() for p in trainable)
        n_all = sum(p.numel() for p in bridge.parameters())
        print(f"{args.preset or 'custom'}: lm={args.lm} vision={args.vision} method={args.method} "
              f"trainable {n_train / 1e6:.2f}M of {n_all / 1e6:.1f}M params, {world} process(es) on {device}")
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups],
                                  betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")

    whole = args.method == "base"  # the base model trains (and saves) every weight
    ckpt_path = os.path.join(args.out, "ckpt.safetensors")
    start, ema = 0, None
    if args.ema > 0:
        ema = {k: v.clone() for k, v in trainable_state_dict(bridge, whole).items()}
    if args.resume and os.path.isfile(ckpt_path):
        weights, opt_state, _, start, _ = read_checkpoint(ckpt_path)
        load_trainable(bridge, {k: v for k, v in weights.items() if not k.startswith("ema.")})
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        if ema is not None:
            ema = {k: weights.get(f"ema.{k}", v).to(v.device) for k, v in ema.items()}
        if master:
            print(f"resumed from {ckpt_path} at step {start}")
    elif args.init_from:
        weights, _, _, step0, _ = read_checkpoint(args.init_from)
        if whole:
            load_trainable(bridge, {k: v for k, v in weights.items() if not k.startswith("ema.")})
            parts = ["unet", "text"]
        else:  # across methods: e.g. the adapter of an align (stage 1) run into a lavi run with LoRA
            parts = init_trainable(bridge, weights)
        if ema is not None:
            ema = {k: v.clone() for k, v in trainable_state_dict(bridge, whole).items()}
        if master:
            print(f"initialised {', '.join(parts) or 'nothing'} from {args.init_from} (step {step0})")
    live = list(trainable_state_dict(bridge, whole).values())  # views of the trainable weights

    raw = bridge  # the uncompiled module, for saving and sampling
    model = torch.compile(bridge) if args.compile else bridge
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def with_ema(fn):
        """Run fn with the EMA weights in place (if EMA is on)."""
        if ema is None:
            return fn()
        backup = {k: v.clone() for k, v in trainable_state_dict(raw, whole).items()}
        load_trainable(raw, ema)
        try:
            return fn()
        finally:
            load_trainable(raw, backup)

    def save(step):
        if master:
            extra = {f"ema.{k}": v for k, v in ema.items()} if ema is not None else None
            save_checkpoint(ckpt_path, raw, step, train_args=vars(args), optimizer=optimizer, extra=extra, whole=whole)
            if whole:
                with_ema(lambda: save_shapes_base(os.path.join(args.out, "base.safetensors"), raw.denoiser, raw.text, step))

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    shapes_eval = master and args.eval and is_shapes(args.vision)
    before = None
    if shapes_eval and args.method == "lavi" and start == 0:
        import sample
        before = sample.shapes_eval(raw, n=args.eval_n, sets=eval_sets(args))  # the bridge as initialised
    batches = Data(args, raw, rank, world, start, master)
    raw.train()  # dropout on, as the release trains (LoRA dropout, the LM's own dropout)
    losses = []  # device tensors since the last check: no host sync inside the step
    pbar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not master, desc="train")
    t0, seen, history = time.time(), 0, []  # history: (step, mean loss since the last log line)
    for step in pbar:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, g["base_lr"], args.warmup)
        torch.manual_seed(args.seed + 7919 * (step * world + rank))  # dropout masks: a function of the step, so resumes are exact
        for micro in range(args.grad_accum):
            images, post, captions, gs = batches.next(step, micro)
            # every random draw is keyed by the global sample index: any world size, any resume, same draws
            draws = [sample_draws(args.seed, g, args.caption_dropout, raw.train_sched.num_train_timesteps) for g in gs]
            captions = ["" if d[0] else c for c, d in zip(captions, draws)]
            ids, mask = raw.text.tokenize(captions)
            ids, mask = ids.to(device), mask.to(device)
            t = torch.tensor([d[1] for d in draws], device=device)
            with torch.no_grad():
                if post is None:
                    with autocast:
                        mean, logvar = raw.vae.encode(images.to(device, ptdtype if amp else wdtype))
                    post = (mean, torch.exp(0.5 * logvar))
                shape = post[0].shape[1:]
                eps = torch.stack([d[2](shape) for d in draws]).to(device, wdtype)     # posterior sample
                noise = torch.stack([d[2](shape) for d in draws]).to(device, wdtype)   # diffusion noise
                mean, std = post[0].to(device, wdtype), post[1].to(device, wdtype)
                latents = (mean + std * eps) * raw.vae.cfg.scaling_factor
            sync = nullcontext() if not ddp or micro == args.grad_accum - 1 else model.no_sync()
            with sync, autocast:
                loss = model(latents, ids, mask, t, noise) / args.grad_accum
            scaler.scale(loss).backward()
            losses.append(loss.detach() * args.grad_accum)
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                decay = min(args.ema, (2 + step) / (11 + step))  # warm-up: the random init fades out fast
                torch._foreach_lerp_(list(ema.values()), live, 1 - decay)
        seen += args.batch_size * args.grad_accum * world
        done = step + 1
        if done % args.log_every == 0 or done % args.save_every == 0 or done == args.steps or stop["signal"]:
            ls = torch.stack(losses).float().view(-1, args.grad_accum).mean(1)  # (steps since check,)
            bad = (~torch.isfinite(ls)).nonzero()
            if len(bad):
                raise SystemExit(f"non-finite loss at step {done - len(ls) + int(bad[0]) + 1}: stopping; "
                                 f"the last checkpoint ({ckpt_path}) is intact")
            lmean = ls.mean()
            if ddp:
                dist.all_reduce(lmean, op=dist.ReduceOp.AVG)
            losses = []
            history.append((done, lmean.item()))
            pbar.set_postfix(loss=f"{lmean.item():.4f}", img_s=f"{seen / (time.time() - t0):.1f}",
                             lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        if done % args.save_every == 0 or done == args.steps or stop["signal"]:
            save(done)
        if master and args.sample_every and done % args.sample_every == 0:
            write_samples(raw, args, done)
        if stop["signal"]:
            if master:
                print(f"signal {stop['signal']}: checkpoint written at step {done}, exiting")
            break
    pbar.close()
    if master and args.data != "shapes":
        print(batches.report())
    if shapes_eval and not stop["signal"]:
        import sample
        raw.eval()
        if whole:
            print(sample.format_eval({"base model + own encoder": with_ema(lambda: sample.shapes_eval(raw, n=args.eval_n))}))
        else:
            with_ema(lambda: sample.print_shapes_eval(raw, n=args.eval_n, before=before, device=device,
                                                      sets=eval_sets(args)))
    if ddp:  # DDP keeps replicas equal; say so, or say how far they drifted
        flat = torch.cat([v.flatten().float() for v in live])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        if master:
            print(f"ranks agree: max |difference| of trainable weights across {world} ranks = {(hi - lo).abs().max().item():.3g}")
        dist.destroy_process_group()
    return SimpleNamespace(bridge=raw, history=history)


def write_samples(bridge, args, step):
    """A grid of the fixed sample prompts, OUT/samples/step_NNNNNN.png."""
    from sample import SHAPES_GUIDANCE, save_grid
    bridge.eval()
    guidance = SHAPES_GUIDANCE if is_shapes(args.vision) else 7.5  # the CFG sample.py uses for this model
    imgs = bridge.sample(args.sample_prompts.split("|"), steps=20, guidance=guidance, seed=0, progress=False)
    bridge.train()
    save_grid(imgs, os.path.join(args.out, "samples", f"step_{step:06d}.png"))


# -----------------------------------------------------------------------------
# text-only bridges (issue 6): GlueGen's GlueNet and OmniDiffusion's stage 1, no images, the vision model
# untouched. The LM's features of a caption are mapped onto the features the vision model's NATIVE text
# encoder gives for the same caption (or for its translation).

def eval_sets(args):
    return tuple(s.strip() for s in args.eval_sets.split(",") if s.strip())


def text_pairs(spec):
    """[(source caption, target caption)]: "shapes" (every training caption, itself as target),
    "shapes:<language>" (data.parallel_captions: the foreign caption, its English original), a text file of
    one caption a line (itself as target), or "source<TAB>target" lines (e.g. a translation, its original)."""
    if spec == "shapes":
        return [(c, c) for c in data.all_captions("train")]
    if spec.startswith("shapes:"):
        return data.parallel_captions("train", spec[len("shapes:"):])
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"caption file not found: {spec} (text-only methods read shapes, shapes:<language>, "
                                f"a .txt of captions or a source<TAB>target file)")
    pairs, bad = [], []
    with open(spec, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            src, tab, tgt = line.partition("\t")
            if tab and (not src.strip() or not tgt.strip() or "\t" in tgt):
                bad.append(n)
                continue
            pairs.append((src.strip(), tgt.strip() if tab else src.strip()))
    if bad:
        print(f"{spec}: skipped {len(bad)} malformed line(s) (an empty side or more than one TAB), e.g. line {bad[0]}")
    if not pairs:
        raise ValueError(f"{spec}: no caption in it")
    if sum(s.lower().endswith(data.IMAGE_EXTS) for s, _ in pairs) > len(pairs) // 2:
        raise ValueError(f"{spec} looks like an image-caption TSV (path<TAB>caption): the text-only methods "
                         f"read captions, or source<TAB>target caption pairs")
    return pairs


def fit_tokens(x, n):
    """Pad with zeros or truncate dim 1 of x (B, T, ...) to n tokens."""
    if x.shape[1] >= n:
        return x[:, :n]
    return torch.cat([x, x.new_zeros((x.shape[0], n - x.shape[1], *x.shape[2:]))], dim=1)  # (B, n, ...)


@torch.no_grad()
def native_targets(native, captions, n, device, dtype):
    """The native encoder's (features (B, n, D), mask (B, n) bool) for captions, padded with zeros or truncated
    to n tokens. mask: the tokens the vision model attends to (every token when the encoder passes it no mask;
    for a caption with no real token, e.g. the empty one, every token too: the -10000 bias of an all-pad
    mask makes the attention uniform)."""
    ids, mask = native.tokenize(captions)
    h, vmask = native(ids.to(device), mask.to(device))  # (B, T, D)
    m = torch.ones(h.shape[:2], dtype=torch.bool, device=device) if vmask is None else vmask.to(device).bool()
    m[~m.any(1)] = True
    return fit_tokens(h.to(dtype), n), fit_tokens(m, n)


class FeatureCache:
    """A frozen encoder's outputs per caption: each distinct caption is encoded once (the text-only methods
    train no LoRA, and their encoders pad to a fixed length, so a caption's features do not depend on its
    batch), while at most `limit` captions are stored; beyond that every batch is encoded afresh."""

    def __init__(self, encode, limit=20000):
        self.encode, self.limit, self.store = encode, limit, {}

    def __call__(self, captions):
        """captions -> the tuple of tensors encode(captions) gives, each (B, ...)."""
        new = sorted({c for c in captions if c not in self.store})
        if len(self.store) + len(new) > self.limit:
            return self.encode(captions)
        if new:
            outs = self.encode(new)
            for i, c in enumerate(new):
                self.store[c] = tuple(o[i] for o in outs)
        return tuple(torch.stack([self.store[c][j] for c in captions]) for j in range(len(self.store[captions[0]])))


def target_scale(native, pairs, n, device, dtype, count=512, batch=64):
    """GlueGen's per-position target divisor: the mean L2 norm of the native features at each of the n
    positions over (up to) count target captions, halved, (n,); positions that are only zero padding get 1."""
    caps = [pairs[i][1] for i in np.random.default_rng(0).permutation(len(pairs))[:count]]
    norms = torch.cat([native_targets(native, caps[i:i + batch], n, device, dtype)[0].norm(dim=-1)
                       for i in range(0, len(caps), batch)])  # (N, n)
    scale = norms.mean(0) / 2
    return torch.where(scale > 1e-6, scale, torch.ones_like(scale))


@functools.lru_cache(maxsize=2)
def _epoch_order(seed, epoch, n):
    return np.random.default_rng([seed, epoch]).permutation(n)


def text_batch(pairs, args, step):
    """The (sources, targets) of a step: epochs of a seeded permutation by global sample index; a pair is
    replaced by ("", "") with probability caption_dropout (so the empty caption of CFG maps right too)."""
    out = []
    for g in range(step * args.batch_size, (step + 1) * args.batch_size):
        epoch, pos = divmod(g, len(pairs))
        i = _epoch_order(args.seed, epoch, len(pairs))[pos]
        drop = np.random.default_rng([args.seed, g, 2]).random() < args.caption_dropout
        out.append(("", "") if drop else pairs[i])
    return [s for s, _ in out], [t for _, t in out]


def train_text_only(args):
    """--method gluenet | align: a bridge trained on text alone. gluenet: GlueGen's GlueNet maps the LM's
    (B, T, D_lm) onto the native encoder's (B, T, D_native) (both padded to T tokens), losses token-weighted
    MSE + reconstruction + adversarial, each weighted by a flag (0: off). align: OmniDiffusion stage 1, the
    TextAdapter regressed token by token onto the native features (positions padded or truncated to the
    native length, masked by the native mask and the LM's). The checkpoint is a bridge (no LoRA) that
    sample.py loads like any other, and that a lavi run can start from (--init-from: stage 2)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("RANK", -1)) != -1:
        raise SystemExit(f"--method {args.method} trains on one process (it is cheap: no vision model runs)")
    if args.dtype in ("bf16", "fp16") and device.type != "cuda":
        raise SystemExit(f"--dtype {args.dtype} is for CUDA; on {device.type} use --dtype fp32")
    ptdtype = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    wdtype = torch.float64 if args.dtype == "fp64" else torch.float32  # the adapter and the losses
    torch.manual_seed(args.seed)
    glue = args.method == "gluenet"

    native = load_native_encoder(args.native or args.vision, dtype=ptdtype, device=device)
    n_native = token_count(native)
    if n_native is None:
        raise SystemExit("the native encoder pads to the batch's longest prompt: give it a fixed max_length")
    adapter_kind = "gluenet" if glue else args.adapter
    if adapter_kind == "none":
        raise SystemExit("--adapter none has nothing to train")
    # the LM is padded to the native token count unless --max-length says otherwise (GlueNet: its token count)
    cfg = BridgeConfig(**{**{f.name: getattr(args, f.name) for f in fields(BridgeConfig)}, "adapter": adapter_kind,
                          "lora_rank": 0, "max_length": args.max_length or n_native})
    bridge = build_bridge(cfg, device=device, dtype=wdtype)
    for p in bridge.parameters():
        if not p.requires_grad:
            p.data = p.data.to(ptdtype)
    adapter = bridge.adapter
    ctx_width = bridge.denoiser.cfg.cross_attention_dim if bridge.kind == "unet" else bridge.denoiser.cfg.caption_channels
    if native.width != ctx_width:
        raise SystemExit(f"the native encoder gives {native.width}-d features but the vision model takes {ctx_width}: "
                         f"wrong --native?")
    n = adapter.cfg.num_tokens if glue else n_native  # tokens the loss compares
    pairs = text_pairs(args.data)
    terms = [k for k, w in (("align", args.loss_align), ("rec", args.loss_rec), ("adv", args.loss_adv)) if w > 0]
    if glue and not terms:
        raise SystemExit("every GlueNet loss is off (--loss-align/--loss-rec/--loss-adv all 0)")
    weights = {"align": args.loss_align, "rec": args.loss_rec, "adv": args.loss_adv}
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr_adapter, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    print(f"{args.preset or 'custom'}: lm={args.lm} -> {adapter_kind} -> native {args.native or args.vision} "
          f"({n_native} tokens, width {native.width}), method={args.method}, {len(pairs)} caption pairs, "
          f"trainable {sum(p.numel() for p in params) / 1e6:.2f}M params on {device}")

    ckpt_path = os.path.join(args.out, "ckpt.safetensors")
    start = 0
    if args.resume and os.path.isfile(ckpt_path):
        w, opt_state, _, start, _ = read_checkpoint(ckpt_path)
        load_trainable(bridge, {k: v for k, v in w.items() if not k.startswith("ema.")})
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        print(f"resumed from {ckpt_path} at step {start}")
    elif args.init_from:
        w, _, _, step0, _ = read_checkpoint(args.init_from)
        print(f"initialised {', '.join(init_trainable(bridge, w)) or 'nothing'} from {args.init_from} (step {step0})")
    elif glue:  # GlueGen's fixed normalisations, kept in the adapter's buffers
        with torch.no_grad():
            adapter.src_scale.fill_(1.0 / args.src_div)
            adapter.tgt_scale.copy_(target_scale(native, pairs, n, device, wdtype))

    @torch.no_grad()
    def encode_source(captions):
        ids, mask = bridge.text.tokenize(captions)
        h, smask = bridge.text(ids.to(device), mask.to(device))  # (B, T_lm, D_lm)
        smask = torch.ones(h.shape[:2], dtype=torch.bool, device=device) if smask is None else smask.bool()
        return h.to(wdtype), smask
    fixed = token_count(bridge.text) is not None
    source = FeatureCache(encode_source, limit=20000 if fixed else 0)
    target = FeatureCache(lambda caps: native_targets(native, caps, n, device, wdtype))

    adapter.train()
    history, parts_log = [], []
    pbar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.method)
    for step in pbar:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, args.lr_adapter, args.warmup)
        torch.manual_seed(args.seed + 7919 * step)  # dropout masks: a function of the step
        sources, targets = text_batch(pairs, args, step)
        h, smask = source(sources)  # (B, T_lm, D_lm), (B, T_lm): the tokens the vision model would see
        y, ymask = target(targets)  # (B, n, D_native), (B, n)
        if glue:
            x = h * adapter.src_scale
            tw = None if args.token_weights else torch.ones(1, n, 1, device=device, dtype=wdtype)
            losses = dict(zip(("align", "rec", "adv"), gluenet_losses(
                adapter, adapter.disc, x, y / adapter.tgt_scale[:, None], tw, lam=args.adv_lambda, terms=terms)))
            loss = sum(weights[k] * v for k, v in losses.items() if v is not None)
        else:
            pred = fit_tokens(adapter(h), n)  # (B, n, D_native)
            m = ymask & fit_tokens(smask, n)
            loss = alignment_loss(pred, y, m, kind=args.align_loss)
            losses = {args.align_loss: loss}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        parts_log.append(torch.stack([loss.detach()] + [v.detach() for v in losses.values() if v is not None]))
        done = step + 1
        if done % args.log_every == 0 or done % args.save_every == 0 or done == args.steps:
            mean = torch.stack(parts_log).mean(0).tolist()
            parts_log = []
            if not all(math.isfinite(v) for v in mean):
                raise SystemExit(f"non-finite loss by step {done}: stopping; the last checkpoint ({ckpt_path}) is intact")
            history.append((done, mean[0]))
            names = [k for k, v in losses.items() if v is not None]
            pbar.set_postfix(loss=f"{mean[0]:.4g}", **{k: f"{v:.4g}" for k, v in zip(names, mean[1:])})
        if done % args.save_every == 0 or done == args.steps:
            save_checkpoint(ckpt_path, bridge, done, train_args=vars(args), optimizer=optimizer)
    pbar.close()
    bridge.eval()
    if args.eval and is_shapes(args.vision):
        import sample
        sample.print_shapes_eval(bridge, n=args.eval_n, device=device, sets=eval_sets(args))
    return SimpleNamespace(bridge=bridge, history=history)


if __name__ == "__main__":
    main(get_parser().parse_args())
