"""
Train a bridge between a language model and a pretrained text-to-image model (LaVi-Bridge: LoRA in
both + a TextAdapter), or the shapes world's base model. One script for one process or many:

python train.py                                            # the shapes world on a CPU, ~6 min
python train.py --preset shapes-base                       # the shapes base model itself
torchrun --nproc_per_node 8 train.py --lm llama2 --vision sd14 --data train.tsv --dtype bf16 --compile
"""
import argparse
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from model import (Bridge, BridgeConfig, PixelCodec, SHAPES_SCHEDULER, UNet, WordEncoder, WordEncoderConfig,
                   build_bridge, load_trainable, read_checkpoint, save_checkpoint, save_shapes_base,
                   shapes_unet_config, trainable_state_dict)
from lora import lora_parameters

# -----------------------------------------------------------------------------
# presets: the release's recipes and the shapes world. Explicit flags override a preset.

DEFAULTS = dict(
    method="lavi", lm="t5-large", vision="sd14", adapter="text", adapter_mid=0, lora_rank=32, lora_lm=True,
    lora_vision=True, lora_dropout=0.1, max_length=0,
    data="shapes", size=512, flip=True, latent_cache="", num_workers=2,
    steps=1000, batch_size=1, grad_accum=1, lr_vision=1e-4, lr_lm=5e-6, lr_adapter=1e-4, weight_decay=1e-2,
    warmup=500, grad_clip=1.0, caption_dropout=0.0, ema=0.0,
    dtype="fp32", compile=False, grad_checkpointing=False, device="", seed=0,
    out="out/bridge", resume=False, init_from="", log_every=10, save_every=500, sample_every=0,
    sample_prompts="a photo of a cat|a red car in the snow", eval=False, eval_n=48,
)
PRESETS = {
    # LaVi-Bridge releases (REFERENCE.md): AdamW wd 1e-2, warm-up 500, clip 1.0, 512 px
    "t5-sd14": dict(lm="t5-large", vision="sd14"),
    "llama2-sd14": dict(lm="llama2", vision="sd14"),
    "t5-pixart": dict(lm="t5-large", vision="pixart-512", lr_vision=2e-5, lr_adapter=2e-5),
    # the shapes world (data.py): MiniLM bridged into the shipped base model, on a CPU
    "shapes": dict(lm="minilm", vision="shapes", data="shapes", size=32, steps=500, batch_size=32,
                   lora_rank=8, lora_dropout=0.0, lr_vision=5e-4, lr_lm=5e-5, lr_adapter=1e-3, warmup=50,
                   caption_dropout=0.1, out="out/shapes", save_every=100, log_every=10, eval=True,
                   sample_prompts="a small red circle on the left|a large blue square at the top"),
    "shapes-base": dict(method="base", lm="words", vision="shapes", data="shapes", size=32, steps=3000,
                        batch_size=32, lora_rank=0, lr_vision=1e-3, lr_adapter=1e-3, warmup=100, ema=0.999,
                        caption_dropout=0.1, weight_decay=0.0, out="out/shapes-base", save_every=250, eval=True),
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
    preset = args.preset or ("" if given.get("lm") or given.get("vision") else "shapes")
    p = dict(PRESETS[preset]) if preset else release_preset(given.get("lm", DEFAULTS["lm"]),
                                                            given.get("vision", DEFAULTS["vision"]))
    cfg = {**DEFAULTS, **p, **given, "preset": preset}
    return argparse.Namespace(**cfg)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b = lambda s: s.lower() in ("1", "true", "yes", "on")  # noqa: E731
    p.add_argument("--preset", choices=list(PRESETS), help="a named recipe; explicit flags override it (default: shapes)")
    # model
    p.add_argument("--method", choices=["lavi", "base"], help="lavi: LoRA + adapter bridge; base: train the shapes base model")
    p.add_argument("--lm", help="language model: a preset (t5-large, llama2, minilm, ...), hub id or local folder")
    p.add_argument("--vision", help="vision model: sd14, sd15, ldm, pixart-512, pixart-1024, shapes, or a local path")
    p.add_argument("--adapter", choices=["text", "none"], help="TextAdapter, or none when the widths already match")
    p.add_argument("--adapter-mid", type=int, help="adapter middle width (0: (in + out) / 2)")
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
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="AMP compute dtype (bf16/fp16: CUDA only)")
    p.add_argument("--compile", type=b, help="torch.compile the bridge")
    p.add_argument("--grad-checkpointing", type=b, help="recompute vision activations in backward")
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
    return p


# -----------------------------------------------------------------------------
# helpers

def lr_at(step, base_lr, warmup):
    """Linear warm-up then constant."""
    return base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr


def step_generator(seed, step, device="cpu"):
    """The RNG of one optimiser step: the same on every rank, so a resumed or sharded run draws what
    a straight single-process run draws."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def build_base(args, device):
    """A fresh shapes base model: U-Net + word encoder, all trainable, in a Bridge."""
    cfg = BridgeConfig(lm="words", vision="shapes", adapter="none", lora_rank=0)
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


class Batches:
    """Global batches by step index: the same for any world size, resumable at any step.
    Each rank takes its slice of the global batch; images come as tensors (B, 3, H, W) in [-1, 1]."""

    def __init__(self, args, rank, world):
        self.args, self.rank, self.world = args, rank, world
        self.global_batch = args.batch_size * world
        if args.data != "shapes":
            self.ds = data.ImageTextDataset(args.data, size=args.size, flip=args.flip)

    def get(self, step, micro):
        a, n, lo = self.args, self.global_batch, self.rank * self.args.batch_size
        idx = (step * a.grad_accum + micro) * n
        if a.data == "shapes":
            rng = np.random.default_rng([a.seed, idx])
            images, captions, _ = data.sample_batch(rng, n, a.size)
            return images[lo:lo + a.batch_size], captions[lo:lo + a.batch_size]
        items = [self.ds.item(idx + lo + i, seed=a.seed) for i in range(a.batch_size)]
        return torch.stack([x for x, _ in items]), [c for _, c in items]


# -----------------------------------------------------------------------------

def main(args):
    args = resolve_args(args)
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
    if args.dtype != "fp32" and device.type != "cuda":
        raise SystemExit(f"--dtype {args.dtype} is AMP for CUDA; on {device.type} use --dtype fp32")
    ptdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    autocast = nullcontext() if args.dtype == "fp32" else torch.autocast(device.type, dtype=ptdtype)
    torch.manual_seed(args.seed)

    # model: frozen parts in the compute dtype, trainable parts in fp32
    if args.method == "base":
        bridge = build_base(args, device)
    else:
        cfg = BridgeConfig(**{f.name: getattr(args, f.name) for f in fields(BridgeConfig)})
        bridge = build_bridge(cfg, device=device)
        for p in bridge.parameters():
            if not p.requires_grad:
                p.data = p.data.to(ptdtype)
    if args.grad_checkpointing:
        bridge.denoiser.gradient_checkpointing = True
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
        load_trainable(bridge, {k: v for k, v in weights.items() if not k.startswith("ema.")})
        if ema is not None:
            ema = {k: v.clone() for k, v in trainable_state_dict(bridge, whole).items()}
        if master:
            print(f"initialised from {args.init_from} (step {step0})")
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

    shapes_eval = master and args.eval and args.vision == "shapes"
    before = None
    if shapes_eval and args.method == "lavi" and start == 0:
        import sample
        before = sample.shapes_eval(raw, n=args.eval_n)  # the bridge as initialised, for the table
    batches = Batches(args, rank, world)
    losses = []  # device tensors since the last check: no host sync inside the step
    pbar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not master, desc="train")
    t0, seen = time.time(), 0
    step = start
    for step in pbar:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, g["base_lr"], args.warmup)
        gen = step_generator(args.seed, step)
        for micro in range(args.grad_accum):
            images, captions = batches.get(step, micro)
            # one draw for the whole global batch, each rank keeps its slice
            n, lo = batches.global_batch, rank * args.batch_size
            drop = (torch.rand(n, generator=gen) < args.caption_dropout)[lo:lo + args.batch_size]
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            ids, mask = raw.text.tokenize(captions)
            ids, mask = ids.to(device), mask.to(device)
            with torch.no_grad(), autocast:
                latents = raw.encode_images(images.to(device, ptdtype), generator=None).float()
            t = torch.randint(0, 1000, (n,), generator=gen)[lo:lo + args.batch_size].to(device)
            noise = torch.randn((n,) + latents.shape[1:], generator=gen)[lo:lo + args.batch_size].to(device)
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
                torch._foreach_lerp_(list(ema.values()), live, 1 - args.ema)
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
    if shapes_eval and not stop["signal"]:
        import sample
        raw.eval()
        if whole:
            print(sample.format_eval({"base model + own encoder": with_ema(lambda: sample.shapes_eval(raw, n=args.eval_n))}))
        else:
            with_ema(lambda: sample.print_shapes_eval(raw, n=args.eval_n, before=before, device=device))
    if ddp:
        dist.destroy_process_group()
    return raw


def write_samples(bridge, args, step):
    """A grid of the fixed sample prompts, OUT/samples/step_NNNNNN.png."""
    from sample import save_grid
    bridge.eval()
    imgs = bridge.sample(args.sample_prompts.split("|"), steps=20, guidance=4.0, seed=0, progress=False)
    bridge.train()
    save_grid(imgs, os.path.join(args.out, "samples", f"step_{step:06d}.png"))


if __name__ == "__main__":
    main(get_parser().parse_args())
