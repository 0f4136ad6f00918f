"""
Train a bridge between a language model and a pretrained text-to-image model, or the shapes world's base
model. One script for one process or many (torchrun sets RANK):

python train.py                                  # the shapes world on 2 CPU cores, ~6 min
python train.py --preset shapes-base             # the shapes base model itself (~45 min)
torchrun --nproc_per_node 8 train.py --lm llama2 --vision sd14 --data train.tsv --dtype bf16 --compile true

Methods: lavi (LaVi-Bridge: LoRA in both models + a TextAdapter, on image-text pairs), gluenet and align
(text only, no images: GlueGen's GlueNet, and stage 1 of the staged recipe), base (the shapes base model
from scratch). They share one set-up, one restore and one training loop, and differ in their step.
"""
import argparse
import glob
import json
import math
import os
import signal
import socket
import time
from contextlib import contextmanager, nullcontext
from dataclasses import fields, replace
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cpu
import data
import shapes
from adapter import (GLUEGEN_CLIP_NORMS, GLUEGEN_LOSS_WEIGHTS, TSC, Resampler, alignment_loss,
                     gluegen_targets, gluenet_losses)
from lora import lora_parameters
from encoders import is_audio
from model import (DTYPES, BridgeConfig, build_bridge, device_and_dtype, export_release, fit_tokens,
                   init_trainable, is_shapes, load_native_encoder, load_trainable, native_bridge,
                   read_checkpoint, read_log, save_checkpoint, trainable_tensors)
from model_io import BadInput, parse_bool, read_safetensors_metadata, run_cli, writable
from unet import set_grad_checkpointing

# -----------------------------------------------------------------------------
# presets: the release's recipes and the shapes world. Explicit flags override a preset.

DEFAULTS = dict(
    method="lavi", lm="t5-large", vision="sd14", adapter="text", adapter_mid=0, adapter_dropout=0.1,
    lora_rank=32, lora_lm=True, lora_vision=True, lora_dropout=0.1, max_length=0,
    data="shapes", size=512, flip=True, latent_cache="", num_workers=2, buckets=False, bucket_step=64,
    pooled="attn", loss_pooled=1.0, queries=0, adapter_layers=0, adapter_width=0, train_vision="lora",
    input_perturbation=0.0, lr_schedule="constant",
    steps=1000, epochs=0, batch_size=1, grad_accum=1, lr_vision=1e-4, lr_lm=5e-6, lr_adapter=1e-4,
    optimizer="adamw", weight_decay=1e-2, warmup=0, lr_decay=1.0, lr_decay_every=1, grad_clip=1.0,
    caption_dropout=0.0, ema=0.0, shuffle="epoch", drop_last=False,
    dtype="fp32", lm_dtype="", compile=False, grad_checkpointing=False, cpu_layout=False, device="", seed=0,
    fsdp=False,
    out="out/bridge", resume=False, overwrite=False, init_from="", export_release="", log_every=10,
    save_every=500, sample_every=0, sample_prompts="a photo of a cat|a red car in the snow", eval=False,
    eval_n=48,
    eval_sets="seen,unseen,paraphrase",
    # text-only methods (gluenet, align): GlueGen's loss weights and scales, the staged recipe's stage-1 loss
    native="", loss_align=GLUEGEN_LOSS_WEIGHTS["align"], loss_rec=GLUEGEN_LOSS_WEIGHTS["rec"],
    loss_adv=GLUEGEN_LOSS_WEIGHTS["adv"], token_weights="raw", disc_real="raw", target_norms="auto",
    adv_lambda=0.1, src_div=3.0, glue_depth=5, glue_mult=2, align_loss="cosine",
    # a speech encoder as --lm: the seconds it hears, the tokens it averages
    audio_window=30.0, audio_pool=1, audio_stretch=False,
)
# --method gluenet's own defaults, under a preset and the flags: GlueGen's multilingual recipe
# (train_gluenet_multi.py): Adam 1e-4, no weight decay, no warm-up, no clipping, StepLR x0.5 every epoch,
# 4 epochs of batches of 32 (drop_last) in one order shuffled once, token weights from the raw CLIP features,
# the raw CLIP features as the discriminator's real input
GLUEGEN = dict(optimizer="adam", lr_adapter=1e-4, weight_decay=0.0, warmup=0, grad_clip=0.0, batch_size=32,
               epochs=4, lr_decay=0.5, lr_decay_every=1, drop_last=True, shuffle="once", caption_dropout=0.0,
               token_weights="raw", disc_real="raw")
# ... and its sound recipe (train_gluenet_sound_text.py), for a speech encoder as --lm: Adam 5e-5, StepLR
# x0.5 every 5 epochs, 10 epochs, batch 8, the normalised target as the discriminator's real input, the
# source unscaled (GlueGen's AudioCLIP embedding is L2-normalised)
GLUEGEN_SOUND = dict(GLUEGEN, lr_adapter=5e-5, lr_decay_every=5, epochs=10, batch_size=8,
                     disc_real="normalised", src_div=1.0)
METHOD_DEFAULTS = {"gluenet": GLUEGEN}
SHAPES_DATA = dict(vision="shapes", data="shapes", size=32, batch_size=32, caption_dropout=0.1, log_every=10,
                   eval=True)
PRESETS = {
    # the LaVi-Bridge releases: AdamW wd 1e-2, clip 1.0, 512 px, their learning rates, flat from step 0 (their
    # scripts pass 500 warm-up steps to diffusers' "constant" schedule, which ignores them)
    "t5-sd14": dict(lm="t5-large", vision="sd14"),
    "llama2-sd14": dict(lm="llama2", vision="sd14"),
    "t5-pixart": dict(lm="t5-large", vision="pixart-512", lr_vision=2e-5, lr_adapter=2e-5),
    # the same recipe into SDXL (no release exists): 1024 px in aspect-ratio buckets, activations recomputed
    "t5-sdxl": dict(lm="t5-large", vision="sdxl", size=1024, buckets=True, grad_checkpointing=True),
    "llama2-sdxl": dict(lm="llama2", vision="sdxl", size=1024, buckets=True, grad_checkpointing=True),
    # the shapes world (shapes.py): MiniLM bridged into the shipped base model, on a CPU
    "shapes": dict(SHAPES_DATA, lm="minilm", steps=300, max_length=16, lora_rank=8, lora_dropout=0.0,
                   lr_vision=5e-4, lr_lm=5e-5, lr_adapter=1e-3, warmup=50, out="out/shapes", save_every=100,
                   sample_prompts="a small red circle on the left|a large blue square at the top"),
    "shapes-base": dict(SHAPES_DATA, method="base", lm="native", adapter="none", steps=3000, lora_rank=0,
                        lr_vision=1e-3, lr_adapter=1e-3, warmup=100, weight_decay=0.0, out="out/shapes-base",
                        save_every=250),
    # text-only bridges into the shapes base model: captions of the training grammar, no images;
    # GlueGen's losses without its token weights (the README has the measurement)
    "shapes-gluenet": dict(SHAPES_DATA, method="gluenet", lm="minilm", steps=2000, epochs=0, max_length=16,
                           glue_depth=2, lora_rank=0, optimizer="adamw", lr_adapter=1e-3, weight_decay=1e-2,
                           warmup=50, lr_decay=1.0, grad_clip=1.0, shuffle="epoch", drop_last=False,
                           token_weights="off", disc_real="normalised", out="out/shapes-gluenet",
                           save_every=500),
    # ... and from speech: the training captions spoken by espeak-ng voices, heard by Whisper tiny.en. Its
    # tokens (norm ~22) divided by 20, near AudioCLIP's unit norm: unscaled, the reconstruction loss
    # outweighs the alignment ~20 to 1 and the bridge does not learn (the README has the measurement)
    "shapes-sound": dict(SHAPES_DATA, method="gluenet", lm="whisper-tiny.en", data="shapes:speech",
                         audio_window=shapes.SPEECH_WINDOW, audio_pool=shapes.SPEECH_POOL, steps=1500,
                         epochs=0, batch_size=16, max_length=16, glue_depth=4, lora_rank=0, optimizer="adamw",
                         lr_adapter=1e-3, weight_decay=1e-2, warmup=50, lr_decay=1.0, grad_clip=1.0,
                         shuffle="epoch", drop_last=False, token_weights="off", disc_real="normalised",
                         src_div=20.0, caption_dropout=0.0, eval_sets="spoken,spoken-unseen,mixed",
                         out="out/shapes-sound",
                         save_every=250),
    "shapes-align": dict(SHAPES_DATA, method="align", lm="minilm", steps=500, max_length=16, lora_rank=0,
                         lr_adapter=1e-3, warmup=50, out="out/shapes-align", save_every=100),
}
TEXT_ONLY = ("gluenet", "align")


def release_preset(lm, vision):
    """The release preset whose (lm, vision) pair this is, for its learning rates (the shapes presets are
    recipes of their own: only --preset gives them)."""
    for name, p in PRESETS.items():
        if not name.startswith("shapes") and p.get("lm") == lm and p.get("vision") == vision:
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
    method = given.get("method", p.get("method", DEFAULTS["method"]))
    speech = method == "gluenet" and is_audio(given.get("lm", p.get("lm", DEFAULTS["lm"])))
    method = dict(GLUEGEN_SOUND if speech else METHOD_DEFAULTS.get(method, {}))
    if "steps" in {**p, **given} and "epochs" not in {**p, **given}:
        method.pop("epochs", None)  # --steps counts, not the recipe's epochs
    return argparse.Namespace(**{**DEFAULTS, **method, **p, **given, "preset": preset})


def resume_mode(s):
    """--resume: a boolean, or "force"."""
    return "force" if str(s).strip().lower() == "force" else parse_bool(s)


# the ranges check_args enforces: flag -> (lowest, highest or None)
INT_RANGES = dict(steps=(1, None), batch_size=(1, None), grad_accum=(1, None), log_every=(1, None),
                  save_every=(1, None), sample_every=(0, None), eval_n=(1, None), num_workers=(0, None),
                  epochs=(0, None), lr_decay_every=(1, None), audio_pool=(1, None),
                  warmup=(0, None), lora_rank=(0, None), max_length=(0, None), adapter_mid=(0, None),
                  queries=(0, 4096), adapter_layers=(0, 64), adapter_width=(0, 16384),
                  glue_depth=(1, None), glue_mult=(1, None), size=(8, 4096), bucket_step=(8, 4096))
FLOAT_RANGES = dict(lr_vision=(0, None), lr_lm=(0, None), lr_adapter=(0, None), weight_decay=(0, None),
                    grad_clip=(0, None), loss_align=(0, None), loss_rec=(0, None), loss_adv=(0, None),
                    adv_lambda=(0, None), src_div=(1e-12, None), ema=(0, 0.9999), adapter_dropout=(0, 0.99),
                    lora_dropout=(0, 0.99), caption_dropout=(0, 1), lr_decay=(1e-12, 1),
                    audio_window=(0.02, 30), loss_pooled=(0, None), input_perturbation=(0, 1))
# what a resumed run must share with its checkpoint (else --resume force)
SAME_ON_RESUME = ("method", "lm", "vision", "adapter", "adapter_mid", "lora_rank", "lora_lm", "lora_vision",
                  "max_length", "glue_depth", "glue_mult", "native", "audio_window", "audio_pool",
                  "audio_stretch", "pooled", "queries", "adapter_layers", "adapter_width", "train_vision")


def check_args(args):
    """Every flag's range and every path a run reads or writes, before anything loads: one BadInput."""
    for k, (lo, hi) in {**INT_RANGES, **FLOAT_RANGES}.items():
        v = getattr(args, k)
        if not (math.isfinite(v) and v >= lo and (hi is None or v <= hi)):
            bound = f"from {lo:g} to {hi:g}" if hi is not None else f">= {lo:g}"
            raise BadInput(f"--{k.replace('_', '-')} {v}: must be {bound}")
    if args.size % 8:
        raise BadInput(f"--size {args.size}: must be a multiple of 8 (the VAE's factor)")
    if args.buckets:
        if args.data == "shapes" or args.method in TEXT_ONLY or args.latent_cache:
            raise BadInput("--buckets sorts real images by aspect ratio: give --data images (a TSV, folder "
                           "or shards), and no --latent-cache (it holds one square size)")
        if args.size % args.bucket_step or args.bucket_step % 8:
            raise BadInput(f"--buckets: --size {args.size} must be a multiple of --bucket-step "
                           f"{args.bucket_step}, and that of 8")
    per_epoch = ("epochs", "lr_decay", "shuffle", "drop_last")
    if args.method not in TEXT_ONLY and [k for k in per_epoch if getattr(args, k) != DEFAULTS[k]]:
        raise BadInput("--epochs, --lr-decay, --shuffle and --drop-last count epochs of caption pairs: "
                       "the text-only methods (gluenet, align) only")
    if args.eval:
        unknown = [s for s in eval_sets(args) if s not in shapes.EVAL_SETS]
        if unknown or not eval_sets(args):
            raise BadInput(f"--eval-sets {args.eval_sets!r}: choose from {', '.join(shapes.EVAL_SETS)}")
        if is_shapes(args.vision):
            shapes.check_sets(eval_sets(args), is_audio(args.lm))
    if not [p for p in args.sample_prompts.split("|") if p.strip()]:
        raise BadInput("--sample-prompts: give at least one prompt (|-separated)")
    if args.init_from:
        read_safetensors_metadata(args.init_from, "--init-from checkpoint")
    for flag, path in (("--out", args.out), ("--export-release", args.export_release),
                       ("--latent-cache", args.latent_cache)):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise BadInput(f"{flag} {path} is a file: give a folder")
        if path and not writable(path):
            raise BadInput(f"{flag} {path}: cannot write there")


def check_checkpoint(args):
    """OUT/ckpt.safetensors is continued only with --resume (and a run that matches it, unless --resume
    force) and replaced only with --overwrite; --resume needs one."""
    ckpt = os.path.join(args.out, "ckpt.safetensors")
    if not os.path.exists(ckpt):
        if args.resume:
            raise BadInput(f"--resume: no checkpoint to continue in {args.out} (leave --resume out to start)")
        return
    if args.overwrite and not args.resume:
        return
    meta = read_safetensors_metadata(ckpt, "checkpoint")
    if not args.resume:
        raise BadInput(f"{ckpt} holds a run (step {meta.get('step', '?')}): --resume true continues it, "
                       f"--overwrite true starts over, or choose another --out")
    saved = json.loads(meta.get("train_args", "{}"))
    differ = [f"--{k.replace('_', '-')} {saved[k]!r} in the checkpoint, {getattr(args, k)!r} now"
              for k in SAME_ON_RESUME if k in saved and saved[k] != getattr(args, k)]
    if differ and args.resume != "force":
        raise BadInput(f"--resume: this run differs from {ckpt}: {'; '.join(differ)} (--resume force to go "
                       f"on)")


@contextmanager
def out_lock(folder, master):
    """OUT/.lock while this run trains into OUT (the master process holds it): a second run on the same
    folder is refused; a lock whose process is gone is taken over, and the temp files of that run's
    interrupted saves removed."""
    if not master:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    path, me = os.path.join(folder, ".lock"), f"{os.getpid()} {socket.gethostname()}"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            with open(path) as f:
                owner = f.read().split()
            if len(owner) == 2 and owner[0].isdigit() and owner[1] == socket.gethostname() \
                    and not alive(int(owner[0])):
                os.remove(path)  # its run is gone
                continue
            raise BadInput(f"another run ({' on '.join(owner) or 'unknown'}) holds {path}: wait for it, pick "
                           f"another --out, or delete the lock if that run is gone") from None
    os.write(fd, me.encode())
    os.close(fd)
    for tmp in glob.glob(os.path.join(glob.escape(folder), "*.tmp*")):  # of saves a kill interrupted
        os.remove(tmp)
    try:
        yield
    finally:
        os.remove(path)


def alive(pid):
    """Whether process pid exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b = parse_bool
    p.add_argument("--preset", choices=list(PRESETS),
                   help="a named recipe; explicit flags override it (default: shapes)")
    # model
    p.add_argument("--method", choices=["lavi", "base", *TEXT_ONLY],
                   help="lavi: LoRA + adapter bridge; base: train the shapes base model; text only (no "
                        "images): gluenet: GlueGen's GlueNet, align: stage 1 of the staged recipe (the "
                        "adapter regressed onto the native encoder)")
    p.add_argument("--lm", help="language model: a preset (t5-large, llama2, minilm, ...), hub id, local "
                                "folder, or native (the vision model's own text encoder)")
    p.add_argument("--vision",
                   help="vision model: sd14, sd15, ldm, pixart-512, pixart-1024, shapes, or a local path")
    p.add_argument("--adapter", choices=["text", "gluenet", "resampler", "tsc", "none"],
                   help="TextAdapter (LaVi-Bridge), GlueNet (GlueGen), resampler (OmniDiffusion's query "
                        "tokens), tsc (ELLA's timestep-aware connector), or none when the widths match")
    p.add_argument("--queries", type=int, help="resampler / tsc: output tokens (0: the preset's)")
    p.add_argument("--adapter-layers", type=int,
                   help="resampler: encoder and decoder layers each; tsc: blocks (0: the preset's)")
    p.add_argument("--adapter-width", type=int, help="resampler / tsc: transformer width (0: the preset's)")
    p.add_argument("--adapter-mid", type=int, help="adapter middle width (0: (in + out) / 2)")
    p.add_argument("--adapter-dropout", type=float, help="dropout inside the adapter (release: 0.1)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (0: no LoRA)")
    p.add_argument("--lora-lm", type=b, help="LoRA in the language model (true/false)")
    p.add_argument("--lora-vision", type=b, help="LoRA in the vision model (true/false)")
    p.add_argument("--train-vision", choices=["lora", "full", "none"],
                   help="the vision model: LoRA (--lora-vision, the release), every weight (the staged "
                        "recipe's stages 2 and 3; with --ema its EMA), or frozen")
    p.add_argument("--input-perturbation", type=float,
                   help="noise the input with noise + p x fresh noise, the target staying the noise "
                        "(the staged recipe: 0.1)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"],
                   help="after the warm-up: constant (the release), or cosine (the staged recipe's stages 2 "
                        "and 3) or linear (its stage 1) to 0 at --steps")
    p.add_argument("--lora-dropout", type=float, help="dropout on the LoRA branch")
    p.add_argument("--max-length", type=int, help="text tokens (0: the recipe's)")
    # data
    p.add_argument("--data", help="shapes, a TSV (path<TAB>caption), a folder of image+.txt, or .tar shards "
                                  "(comma-separated); text-only methods: shapes, shapes:spanish, a .txt of "
                                  "captions or a TSV source<TAB>target")
    p.add_argument("--size", type=int, help="image size in pixels")
    p.add_argument("--flip", type=b, help="random horizontal flips")
    p.add_argument("--latent-cache", help="folder of precomputed VAE latents (made once if missing)")
    p.add_argument("--num-workers", type=int, help="data-loader workers per rank")
    p.add_argument("--buckets", type=b, help="aspect-ratio buckets of about --size^2 pixels: each image is "
                                             "cropped to the bucket nearest its shape, not to a square")
    p.add_argument("--bucket-step", type=int, help="--buckets: bucket sides are multiples of this (64)")
    p.add_argument("--pooled", choices=["attn", "mean"],
                   help="SDXL: the pooled head over the context (attention pooling, or the mean)")
    p.add_argument("--loss-pooled", type=float,
                   help="text-only methods on SDXL: the weight of the pooled vector's alignment loss")
    # optimisation
    p.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--epochs", type=int,
                   help="text-only methods: train this many epochs of the pairs instead (0: --steps)")
    p.add_argument("--batch-size", type=int, help="images (or captions) per rank per micro-step")
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimiser step")
    p.add_argument("--lr-vision", type=float, help="LR of the vision LoRA (base: of the whole base model)")
    p.add_argument("--lr-lm", type=float, help="LR of the LM LoRA")
    p.add_argument("--lr-adapter", type=float, help="LR of the adapter (base: of the word encoder)")
    p.add_argument("--optimizer", choices=["adamw", "adam"],
                   help="AdamW (decoupled weight decay; the LaVi-Bridge releases) or Adam (GlueGen)")
    p.add_argument("--weight-decay", type=float, help="weight decay (Adam: L2 in the gradient)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps, then constant (0: flat, the release's)")
    p.add_argument("--lr-decay", type=float,
                   help="text-only methods: the LR times this every --lr-decay-every epochs (StepLR; 1: off)")
    p.add_argument("--lr-decay-every", type=int, help="epochs between LR decays")
    p.add_argument("--shuffle", choices=["epoch", "once"],
                   help="text-only methods: a new order of the pairs each epoch, or one order for all "
                        "(GlueGen)")
    p.add_argument("--drop-last", type=b,
                   help="text-only methods: epochs of whole batches, the remainder dropped (GlueGen)")
    p.add_argument("--grad-clip", type=float, help="gradient-norm clip (0: off)")
    p.add_argument("--caption-dropout", type=float, help="probability of an empty caption (for CFG)")
    p.add_argument("--ema", type=float, help="EMA decay of the trainable weights (0: off)")
    # system
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "fp64"],
                   help="AMP compute dtype (bf16/fp16: CUDA only); fp64 for exact numerical checks")
    p.add_argument("--lm-dtype", choices=["fp32", "bf16", "fp16"],
                   help="the frozen language model's weights (default: the compute dtype; its LoRA trains in "
                        "fp32)")
    p.add_argument("--compile", type=b, help="torch.compile the bridge")
    p.add_argument("--grad-checkpointing", type=b, help="recompute vision activations in backward")
    p.add_argument("--fsdp", type=b, help="torchrun: shard the vision model, the adapter and their optimizer "
                                          "state across ranks (FSDP2) instead of replicating them (DDP)")
    p.add_argument("--cpu-layout", type=b,
                   help="CPU: channels-last activations, frozen conv weights laid out once for oneDNN "
                        "(faster; the big ones take up to twice their memory again: off by default)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--seed", type=int, help="seed of data order, noise and init")
    # output
    p.add_argument("--out", help="output folder (checkpoint ckpt.safetensors, samples/)")
    p.add_argument("--resume", type=resume_mode,
                   help="continue from OUT/ckpt.safetensors (true/false; force: even if the bridge's models "
                        "or shape flags differ from the checkpoint's)")
    p.add_argument("--overwrite", type=b,
                   help="start over in an --out that holds a checkpoint (replacing it)")
    p.add_argument("--init-from", help="initialise the trainable weights from a checkpoint (a new run)")
    p.add_argument("--export-release",
                   help="at the end, also write the bridge as a LaVi-Bridge release folder (adapter/, "
                        "lora_vis.pt, lora_text.pt) here; with --resume true on a finished run: export only")
    p.add_argument("--log-every", type=int, help="steps between log lines and NaN checks")
    p.add_argument("--save-every", type=int, help="steps between checkpoints")
    p.add_argument("--sample-every", type=int, help="steps between sample grids (0: off)")
    p.add_argument("--sample-prompts", help="|-separated prompts for the sample grids")
    p.add_argument("--eval", type=b, help="shapes world: evaluate attribute accuracy at the end")
    p.add_argument("--eval-n", type=int, help="images per evaluation set")
    p.add_argument("--eval-sets", help="comma-separated evaluation sets (seen, unseen, paraphrase, spanish)")
    # text-only methods
    p.add_argument("--native", help="target text encoder (default: --vision's own; or an LM, e.g. clip)")
    p.add_argument("--loss-align", type=float,
                   help="gluenet: weight of the token-weighted MSE (0: off; GlueGen 1e4)")
    p.add_argument("--loss-rec", type=float,
                   help="gluenet: weight of the reconstruction MSE (0: off; GlueGen 1e4)")
    p.add_argument("--loss-adv", type=float,
                   help="gluenet: weight of the adversarial NLL (0: off; GlueGen 0.1)")
    p.add_argument("--token-weights", choices=["raw", "normalised", "off"],
                   help="gluenet: GlueGen's per-token weights of the MSE, from the raw target features "
                        "(GlueGen), from the normalised ones, or off (uniform)")
    p.add_argument("--disc-real", choices=["raw", "normalised"],
                   help="gluenet: the discriminator's real tokens: the raw target features (GlueGen's "
                        "multilingual script) or the normalised ones (its sound script)")
    p.add_argument("--target-norms", choices=["auto", "gluegen", "estimate"],
                   help="gluenet: the per-token target divisor is half of GlueGen's 77 CLIP norms, or half "
                        "the mean norms of 512 target captions (auto: GlueGen's for SD 1.x's CLIP ViT-L)")
    p.add_argument("--adv-lambda", type=float, help="gluenet: gradient-reversal factor (GlueGen 0.1)")
    p.add_argument("--src-div", type=float, help="gluenet: the LM's features are divided by this (GlueGen 3)")
    p.add_argument("--glue-depth", type=int, help="gluenet: mixer blocks (GlueGen 5)")
    p.add_argument("--glue-mult", type=int, help="gluenet: hidden width multiplier (GlueGen 2)")
    p.add_argument("--audio-window", type=float,
                   help="a speech encoder as --lm: the seconds of each clip it hears (Whisper's own: 30)")
    p.add_argument("--audio-pool", type=int,
                   help="a speech encoder: its hidden states averaged over this many tokens")
    p.add_argument("--audio-stretch", type=b,
                   help="a speech encoder: each clip's own tokens resampled over the window first (a word "
                        "lands at about the same token at any speed)")
    p.add_argument("--align-loss", choices=["cosine", "mse"],
                   help="align: 1 - cosine + 2e-5 * (norm difference)^2 per token (the staged recipe), "
                        "or MSE")
    return p


# -----------------------------------------------------------------------------
# set-up: device, dtypes, autocast, process group


def setup(args):
    """Where and how this process trains: one process, or one of torchrun's (RANK, WORLD_SIZE, LOCAL_RANK)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world, device = 0, 1, args.device or None
    if ddp:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        use_cuda = torch.cuda.is_available() and args.device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = f"cuda:{local}" if use_cuda else "cpu"
        if use_cuda:
            torch.cuda.set_device(device)
    device, ptdtype = device_and_dtype(device, args.dtype)
    amp = args.dtype in ("bf16", "fp16")
    return SimpleNamespace(
        ddp=ddp, rank=rank, world=world, master=rank == 0, device=device, amp=amp,
        ptdtype=ptdtype,  # the frozen parts and the compute
        wdtype=torch.float64 if args.dtype == "fp64" else torch.float32,  # trainable weights, latents, loss
        autocast=torch.autocast(device.type, dtype=ptdtype) if amp else nullcontext())


# -----------------------------------------------------------------------------
# the model: the bridge of args.method, its trainable groups


def bridge_config(args, native=None):
    """The BridgeConfig of a run; text-only methods train the adapter alone, padded to the native token
    count."""
    cfg = BridgeConfig(**{f.name: getattr(args, f.name) for f in fields(BridgeConfig)})
    if args.method == "base":
        return BridgeConfig(lm="native", vision=args.vision, adapter="none", lora_rank=0)
    if args.method in TEXT_ONLY:
        adapter = "gluenet" if args.method == "gluenet" else args.adapter
        if adapter == "none":
            raise BadInput("--adapter none has nothing to train")
        cfg = replace(cfg, adapter=adapter, lora_rank=0, max_length=args.max_length or native.token_count)
    if args.train_vision != "lora":  # full: every vision weight trains, no LoRA in it; none: frozen
        cfg = replace(cfg, lora_vision=False)
    return cfg


def build(args, env, native=None):
    """The bridge, its frozen parts in the compute dtype (the LM's in --lm-dtype) and its trainable parts in
    fp32 (fp64 with --dtype fp64); the LM's weights as its checkpoint has them (the release trains Llama-2 in
    fp32). Method base trains every weight of a freshly initialised shapes base model."""
    whole = args.method == "base"
    bridge = build_bridge(bridge_config(args, native), env.wdtype, env.device, pretrained=not whole,
                          lm_dtype=env.wdtype)
    if whole:
        bridge.denoiser.requires_grad_(True)
        bridge.text.requires_grad_(True)
    if args.train_vision == "full" and not whole and args.method not in TEXT_ONLY:
        bridge.full_vision = True  # its checkpoints, EMA and optimizer hold every vision weight
        bridge.denoiser.requires_grad_(True)
    lm = {id(p) for p in bridge.text.parameters()}
    lm_dtype = DTYPES[args.lm_dtype] if args.lm_dtype else env.ptdtype
    for p in bridge.parameters():
        if not p.requires_grad:
            p.data = p.data.to(lm_dtype if id(p) in lm else env.ptdtype)
    # recompute the vision model's blocks in backward instead of keeping activations
    if args.grad_checkpointing:
        set_grad_checkpointing(bridge.denoiser)
    if env.device.type == "cpu" and args.cpu_layout and not args.compile:
        cpu.layout(bridge.denoiser)
    return bridge


def param_groups(bridge, args):
    """AdamW groups: vision LoRA, LM LoRA, adapter (base: the whole U-Net and word encoder)."""
    if args.method == "base":
        groups = [("vision", list(bridge.denoiser.parameters()), args.lr_vision),
                  ("text", list(bridge.text.parameters()), args.lr_adapter)]
    else:
        vision = (list(bridge.denoiser.parameters()) if bridge.full_vision else
                  lora_parameters(bridge.denoiser))
        groups = [("vision", vision, args.lr_vision),
                  ("lm", lora_parameters(bridge.text.model), args.lr_lm),
                  ("adapter", [p for m in (bridge.adapter, bridge.pooled) if m is not None
                               for p in m.parameters()], args.lr_adapter)]
    return [dict(params=ps, lr=lr, base_lr=lr, name=n) for n, ps, lr in groups if ps]


# -----------------------------------------------------------------------------
# restore: resume, init-from, EMA


def restore(args, env, bridge):
    """Resume from OUT/ckpt.safetensors (weights, optimizer, EMA, log), or initialise the trainable weights
    from --init-from (across methods: e.g. an align adapter into a lavi run). The weights load here, into
    the whole (not yet sharded) bridge. Returns (start step, the checkpoint's tensors (its EMA), its
    optimizer state or None, log so far, whether anything was loaded)."""
    whole = args.method == "base"
    ckpt = os.path.join(args.out, "ckpt.safetensors")
    start, log, weights, loaded, opt_state = 0, [], {}, False, None
    if args.resume and os.path.isfile(ckpt):
        weights, opt_state, _, start, _ = read_checkpoint(ckpt)
        load_trainable(bridge, {k: v for k, v in weights.items() if not k.startswith("ema.")})
        log, loaded = read_log(ckpt), True
        say(env, f"resumed from {ckpt} at step {start}")
    elif args.init_from:
        w, _, _, step0, _ = read_checkpoint(args.init_from)
        if whole:
            load_trainable(bridge, {k: v for k, v in w.items() if not k.startswith("ema.")})
            parts = ["unet", "text"]
        else:
            parts = init_trainable(bridge, w)
        loaded = bool(parts)
        say(env, f"initialised {', '.join(parts) or 'nothing'} from {args.init_from} (step {step0})")
    return start, weights, opt_state, log, loaded


def make_ema(args, bridge, weights):
    """The EMA copy of the trainable tensors (the checkpoint's where it has one), each laid out as its
    tensor (a shard of it under --fsdp), or None without --ema."""
    if args.ema <= 0:
        return None
    return {k: like(weights.get(f"ema.{k}", v), v).clone()
            for k, v in trainable_tensors(bridge, args.method == "base").items()}


# -----------------------------------------------------------------------------
# FSDP: the vision model and the adapter sharded across ranks, the frozen LM replicated


def is_dtensor(t):
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def like(full, ref):
    """A whole tensor (every rank holds it, read from one checkpoint file) laid out as ref: ref's device and
    dtype, and sharded as ref is when ref is a DTensor (--fsdp)."""
    full = full.to(ref.device, ref.dtype)
    if not is_dtensor(ref):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full, ref.device_mesh, ref.placements)


def gather(t):
    """The whole tensor of a shard (a collective: every rank calls it in the same order), else t."""
    return t.full_tensor() if is_dtensor(t) else t


def shard(args, env, bridge):
    """fully_shard (FSDP2) each block of the vision model, then the rest of it, the adapter and the pooled
    head: every parameter in them (trainable or frozen) and its gradient and AdamW state live as 1/world
    shards, gathered for each block's forward and backward. The frozen LM stays whole on every rank: it runs
    once a step without gradients, and sharding it would gather its weights every step to save memory only
    where it does not fit one GPU (Llama-2-7B bf16 is 13.5 GB). bf16 on CUDA: the mixed-precision policy
    computes in bf16 and reduces gradients in fp32. Returns the sharded modules."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kw = {}
    if env.device.type == "cuda" and args.dtype == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    d = bridge.denoiser
    blocks = ([*d.down_blocks, d.mid_block, *d.up_blocks] if bridge.kind == "unet" else
              list(d.transformer_blocks))
    units = []
    for m in [*blocks, d, bridge.adapter, bridge.pooled]:
        if m is not None and any(True for _ in m.parameters()):
            fully_shard(m, **kw)
            units.append(m)
    return units


def shard_optimizer_state(state, optimizer):
    """A whole optimizer state dict (from one checkpoint file) laid out as the optimizer's parameters: each
    parameter-shaped state tensor sharded as its parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {"param_groups": state["param_groups"], "state": {}}
    for i, s in state["state"].items():
        p = params[int(i)]
        out["state"][i] = {k: like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                           for k, v in s.items()}
    return out


def say(env, msg):
    if env.master:
        print(msg)


# -----------------------------------------------------------------------------
# the steps: what each method computes from its data. step(step, micro) -> (loss, {name: loss term})


def lr_at(step, base_lr, warmup, decay=1.0, epoch=0, every=1, schedule="constant", steps=0):
    """Linear warm-up then constant, times decay every `every` epochs (StepLR); schedule "cosine": after the
    warm-up 0.5 (1 + cos(pi p)), p the fraction of the steps after it done (diffusers'
    get_cosine_schedule_with_warmup, half a cycle), 0 at the last; "linear": 1 - p (its
    get_linear_schedule_with_warmup, the staged recipe's stage 1)."""
    lr = base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr
    if schedule != "constant" and step >= warmup:
        p = (step - warmup) / max(1, steps - warmup)
        lr *= 0.5 * (1 + math.cos(math.pi * p)) if schedule == "cosine" else 1 - p
    return lr * decay ** (epoch // every)


def epoch_at(step, args):
    """The epoch of the pairs that optimiser step `step` is in (text-only methods; 0 for the others)."""
    n = getattr(args, "epoch_size", 0)
    if not n:
        return 0
    micro = step * args.grad_accum  # the first micro-batch of the step
    return micro // (n // args.batch_size) if args.drop_last else micro * args.batch_size // n


def sample_draws(seed, g, caption_dropout, num_train_timesteps=1000):
    """(drop caption?, timestep, normal(shape) drawer) of global sample g: keyed by (seed, g) alone, so
    a run draws the same whatever its world size, batch split or resume point."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + g)
    drop = bool(torch.rand((), generator=gen) < caption_dropout)
    t = int(torch.randint(0, num_train_timesteps, (), generator=gen))
    return drop, t, lambda shape: torch.randn(shape, generator=gen)


def image_text_step(args, env, bridge, model, batches):
    """lavi and base: images (or cached posteriors) and captions -> the diffusion loss of model(bridge)."""
    T = bridge.train_sched.num_train_timesteps

    def step(step, micro):
        images, post, captions, gs, cond = batches.next(step, micro)
        # every random draw is keyed by the global sample index: any world size, any resume, same draws
        draws = [sample_draws(args.seed, g, args.caption_dropout, T) for g in gs]
        ids, mask = bridge.text.tokenize(["" if d[0] else c for c, d in zip(captions, draws)])
        ids, mask = ids.to(env.device), mask.to(env.device)
        t = torch.tensor([d[1] for d in draws], device=env.device)
        with torch.no_grad():
            if post is None:
                with env.autocast:
                    post = bridge.posterior(images.to(env.device, env.ptdtype))
            shape = post[0].shape[1:]
            eps = torch.stack([d[2](shape) for d in draws]).to(env.device, env.wdtype)  # posterior sample
            noise = torch.stack([d[2](shape) for d in draws]).to(env.device, env.wdtype)  # diffusion noise
            mean, std = post[0].to(env.device, env.wdtype), post[1].to(env.device, env.wdtype)
            latents = (mean + std * eps) * bridge.vae.cfg.scaling_factor
            if args.input_perturbation:  # the staged recipe: the input's noise perturbed, not the target's
                kw = {"perturb": args.input_perturbation *
                      torch.stack([d[2](shape) for d in draws]).to(env.device, env.wdtype)}
            else:
                kw = {}
        if bridge.sdxl:  # its micro-conditions: each image's original size and crop, the target size
            if cond is None:
                raise BadInput("SDXL trains on each image's recorded size and crop: this latent cache was "
                               "made before they were recorded, delete it")
            f = bridge.vae.downscale
            target = torch.tensor([latents.shape[-2] * f, latents.shape[-1] * f]).expand(len(cond), 2)
            kw["time_ids"] = torch.cat([cond, target], 1).to(env.device, env.wdtype)  # (B, 6)
        with env.autocast:
            return model(latents, ids, mask, t, noise, **kw), {}
    return step


@torch.no_grad()
def native_targets(native, captions, n, device, dtype):
    """The native encoder's (features (B, n, D), mask (B, n) bool) for captions, padded with zeros or
    truncated to n tokens. mask: the tokens the vision model attends to (every token when the encoder passes
    it no mask; for a caption with no real token, e.g. the empty one, every token too: the -10000 bias of an
    all-pad mask makes the attention uniform)."""
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
        n = len(self.store[captions[0]])
        return tuple(torch.stack([self.store[c][j] for c in captions]) for j in range(n))


def target_scale(native, pairs, n, device, dtype, count=512, batch=64):
    """GlueGen's per-position target divisor: the mean L2 norm of the native features at each of the n
    positions over (up to) count target captions, halved, (n,); positions that are only zero padding get 1."""
    caps = [pairs[i][1] for i in np.random.default_rng(0).permutation(len(pairs))[:count]]
    norms = torch.cat([native_targets(native, caps[i:i + batch], n, device, dtype)[0].norm(dim=-1)
                       for i in range(0, len(caps), batch)])  # (N, n)
    scale = norms.mean(0) / 2
    return torch.where(scale > 1e-6, scale, torch.ones_like(scale))


def target_norms(args, native, n):
    """--target-norms resolved: "gluegen" (its 77 constants) or "estimate"; auto is GlueGen's for the target
    it measured them on, CLIP ViT-L's 77 x 768 last hidden state (SD 1.x's text encoder)."""
    if args.target_norms != "auto":
        if args.target_norms == "gluegen" and n != len(GLUEGEN_CLIP_NORMS):
            raise BadInput(f"--target-norms gluegen: GlueGen's norms are for {len(GLUEGEN_CLIP_NORMS)} CLIP "
                           f"tokens; the target gives {n}")
        return args.target_norms
    model_type = getattr(getattr(getattr(native, "model", None), "config", None), "model_type", None)
    clip_l = model_type in ("clip", "clip_text_model") and native.width == 768
    return "gluegen" if clip_l and n == len(GLUEGEN_CLIP_NORMS) else "estimate"


def text_only_step(args, env, bridge, native, pairs, fresh):
    """gluenet | align: the LM's features of a caption -> the native encoder's features of the same caption
    (or of its translation), no images, the vision model untouched. gluenet: GlueGen's GlueNet, losses
    token-weighted MSE + reconstruction + adversarial, each weighted by a flag (0: off); its fixed
    normalisations are set here when the run starts fresh. align: the TextAdapter regressed token by token
    onto the native features (positions padded or truncated to the native length, masked by the native mask
    and the LM's)."""
    glue, adapter, dev, wdtype = args.method == "gluenet", bridge.adapter, env.device, env.wdtype
    n = adapter.cfg.num_tokens if glue else native.token_count  # tokens the loss compares
    terms = [k for k in ("align", "rec", "adv") if getattr(args, f"loss_{k}") > 0]
    if glue and not terms:
        raise BadInput("every GlueNet loss is off (--loss-align/--loss-rec/--loss-adv all 0)")
    if glue and fresh:  # GlueGen's fixed normalisations, kept in the adapter's buffers
        with torch.no_grad():
            adapter.src_scale.fill_(1.0 / args.src_div)
            if target_norms(args, native, n) == "gluegen":
                adapter.tgt_scale.copy_(torch.tensor(GLUEGEN_CLIP_NORMS) / 2)
            else:
                adapter.tgt_scale.copy_(target_scale(native, pairs, n, dev, wdtype))

    @torch.no_grad()
    def encode_source(captions):
        ids, mask = bridge.text.tokenize(captions)
        h, smask = bridge.text(ids.to(dev), mask.to(dev))  # (B, T_lm, D_lm)
        smask = torch.ones(h.shape[:2], dtype=torch.bool, device=dev) if smask is None else smask.bool()
        return h.to(wdtype), smask
    source = FeatureCache(encode_source, limit=20000 if bridge.text.token_count is not None else 0)
    target = FeatureCache(lambda caps: native_targets(native, caps, n, dev, wdtype))
    head = bridge.pooled  # SDXL: the pooled head, onto the native pooled vector (bigG's)

    @torch.no_grad()
    def encode_pooled(captions):
        return native.encode_pooled(native.tokenize(captions)[0].to(dev))[1].to(wdtype),
    pooled_target = FeatureCache(encode_pooled) if head is not None else None

    def pooled_loss(pred, targets):
        """A pooled prediction (B, P) against the native pooled vector, by --align-loss, weighted by
        --loss-pooled."""
        loss = alignment_loss(pred[:, None], pooled_target(targets)[0][:, None], kind=args.align_loss)
        return args.loss_pooled * loss, loss

    streams = getattr(native, "stream_widths", (native.width,))  # SDXL: CLIP-L's 768 | bigG's 1280
    bounds = list(zip(np.cumsum((0,) + tuple(streams[:-1])), np.cumsum(streams)))

    def adapt(h, smask, step, micro):
        """The adapter on the LM's features -> (context (B, T', D), its token mask for the loss or None,
        the pooled prediction or None). The pooled head learns on the detached context (it does not pull
        the adapter); the resampler's own head trains with it, as OmniDiffusion's; a TSC sees a timestep
        drawn per caption (it must match the native features at every t)."""
        if isinstance(adapter, Resampler):
            ctx, pooled = adapter(h, smask)
            return ctx, None, pooled
        if isinstance(adapter, TSC):
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * args.grad_accum + micro)
            t = torch.randint(0, bridge.train_sched.num_train_timesteps, (h.shape[0],), generator=gen)
            ctx, tmask = adapter(h, t.to(dev), smask), None
        else:
            ctx, tmask = adapter(h), smask
        return ctx, tmask, head(ctx.detach(), tmask) if head is not None else None

    def stream_loss(pred, y, mask):
        """OmniDiffusion's stage-1 loss: --align-loss per target stream (each native encoder's channels:
        SDXL's CLIP-L and bigG parts), summed."""
        return sum(alignment_loss(pred[..., a:b], y[..., a:b], mask, kind=args.align_loss) for a, b in bounds)

    def step(step, micro):
        sources, targets = data.text_batch(pairs, step * args.grad_accum + micro, args.batch_size, args.seed,
                                           args.caption_dropout, args.drop_last, args.shuffle)
        h, smask = source(sources)  # (B, T_lm, D_lm), (B, T_lm): the tokens the vision model would see
        y, ymask = target(targets)  # (B, n, D_native), (B, n)
        with env.autocast:
            if glue:
                normed, tw, real = gluegen_targets(y, adapter.tgt_scale, args.token_weights, args.disc_real)
                parts = dict(zip(("align", "rec", "adv"), gluenet_losses(
                    adapter, adapter.disc, h * adapter.src_scale, normed, tw, lam=args.adv_lambda,
                    terms=terms, real=real)))
                parts = {k: v for k, v in parts.items() if v is not None}
                loss = sum(getattr(args, f"loss_{k}") * v for k, v in parts.items())
                if head is not None:  # GlueNet keeps no token mask
                    weighted, parts["pooled"] = pooled_loss(head(adapter(h).detach(), None), targets)
                    loss = loss + weighted
                return loss, parts
            ctx, tmask, pooled = adapt(h, smask, step, micro)  # (B, T', D_native)
            mask = ymask if tmask is None else ymask & fit_tokens(tmask, n)
            loss = stream_loss(fit_tokens(ctx, n), y, mask)
            parts = {args.align_loss: loss}
            if pooled is not None:
                weighted, parts["pooled"] = pooled_loss(pooled, targets)
                loss = loss + weighted
            return loss, parts
    return step


# -----------------------------------------------------------------------------
# the training loop, shared by every method


@contextmanager
def caught_signals():
    """{"signal": None}, set to the number of a SIGINT / SIGTERM when one arrives; the handlers before are
    restored after, so that Ctrl-C interrupts what follows (the evaluation) as usual."""
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
    before = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def train_loop(args, env, raw, model, optimizer, step_fn, start, ema, log, save, stop):
    """Optimiser steps start..args.steps of step_fn: LR schedule, gradient accumulation (DDP syncs on the
    last micro-step only), AMP scaling, clipping, EMA, and every log_every steps a NaN check, a log line
    (step, mean loss, mean gradient norm) and, at save_every, a checkpoint. A signal caught in stop (see
    caught_signals) saves and stops. Returns the log."""
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    def local(ts):  # FSDP: each rank's shard, updated in place
        return [t.to_local() if is_dtensor(t) else t for t in ts]
    live = local(trainable_tensors(raw, args.method == "base").values()) if ema is not None else []
    ema_local = local(ema.values()) if ema is not None else []
    scaler = torch.amp.GradScaler(env.device.type, enabled=args.dtype == "fp16")
    ckpt = os.path.join(args.out, "ckpt.safetensors")
    raw.train()  # dropout on, as the release trains (LoRA dropout, the LM's own dropout)
    # per step [loss, loss terms..., grad norm] on the device: no host sync in the step
    pending, names = [], []
    pbar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not env.master,
                desc=args.method)
    t0, seen = time.time(), 0
    for step in pbar:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, g["base_lr"], args.warmup, args.lr_decay, epoch_at(step, args),
                            args.lr_decay_every, args.lr_schedule, args.steps)
        # dropout masks: a function of the step (and rank), so that a resumed run equals a straight one
        torch.manual_seed(args.seed + 7919 * (step * env.world + env.rank))
        micro_losses = []
        for micro in range(args.grad_accum):
            last = micro == args.grad_accum - 1
            for unit in env.units:  # FSDP: reduce-scatter the gradients on the last micro-step only
                unit.set_requires_gradient_sync(last)
            with nullcontext() if not env.ddp or last or args.fsdp else model.no_sync():
                loss, parts = step_fn(step, micro)
                scaler.scale(loss / args.grad_accum).backward()
            micro_losses.append(torch.stack([loss.detach(), *(v.detach() for v in parts.values())]))
            names = list(parts)
        scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else math.inf)
        gnorm = gather(gnorm)  # FSDP: the norm over every rank's shards
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                decay = min(args.ema, (2 + step) / (11 + step))  # warm-up: the random init fades out fast
                torch._foreach_lerp_(ema_local, live, 1 - decay)
        pending.append(torch.cat([torch.stack(micro_losses).mean(0), gnorm.reshape(1).to(micro_losses[0])]))
        seen += args.batch_size * args.grad_accum * env.world
        done = step + 1
        if done % args.log_every == 0 or done % args.save_every == 0 or done == args.steps or stop["signal"]:
            rows = torch.stack(pending).double()  # (steps since the last check, 2 + terms)
            bad = (~torch.isfinite(rows[:, 0])).nonzero()
            if len(bad):
                raise SystemExit(f"non-finite loss at step {done - len(rows) + int(bad[0]) + 1}: stopping; "
                                 f"the last checkpoint ({ckpt}) is intact")
            mean = rows.mean(0)
            if env.ddp:  # the loss of the global batch, for the log only
                dist.all_reduce(mean, op=dist.ReduceOp.AVG)
            pending = []
            loss, *terms, gn = mean.tolist()
            log.append((done, loss, gn))
            pbar.set_postfix(loss=f"{loss:.4g}", **{k: f"{v:.4g}" for k, v in zip(names, terms)},
                             grad=f"{gn:.3g}", items_s=f"{seen / (time.time() - t0):.1f}",
                             lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        if done % args.save_every == 0 or done == args.steps or stop["signal"]:
            save(done, log)
        if env.master and args.sample_every and done % args.sample_every == 0:
            write_samples(raw, args, done)
        if stop["signal"]:
            say(env, f"signal {stop['signal']}: checkpoint written at step {done}, exiting")
            break
    pbar.close()
    return log


# -----------------------------------------------------------------------------
# what a run shows: sample grids, the shapes world's evaluation, the agreement of DDP replicas


def write_samples(bridge, args, step):
    """A grid of the fixed sample prompts, OUT/samples/step_NNNNNN.png."""
    bridge.eval()
    prompts = args.sample_prompts.split("|")
    imgs = bridge.sample(prompts, steps=20, seed=0, progress=False)  # the CFG sample.py uses for this model
    bridge.train()
    shapes.save_grid(imgs, os.path.join(args.out, "samples", f"step_{step:06d}.png"), captions=prompts)


def eval_sets(args):
    return tuple(s.strip() for s in args.eval_sets.split(",") if s.strip())


def with_weights(bridge, tensors, whole, fn):
    """fn() with `tensors` (e.g. the EMA weights) in the bridge's trainable weights, put back after."""
    if tensors is None:
        return fn()
    backup = {k: v.clone() for k, v in trainable_tensors(bridge, whole).items()}
    load_trainable(bridge, tensors)
    try:
        return fn()
    finally:
        load_trainable(bridge, backup)


def shapes_report(args, env, raw, ema, before):
    """The shapes world's attribute accuracy: the base model with its own encoder, the bridge before training
    (lavi runs from step 0) and after (with its EMA weights, if any)."""
    whole, sets = args.method == "base", eval_sets(args)
    raw.eval()
    after = with_weights(raw, ema, whole, lambda: shapes.evaluate_bridge(raw, n=args.eval_n, sets=sets))
    if whole:
        rows = {"base model + own encoder": after}
    else:
        base = native_bridge(args.vision, device=env.device)
        typed = shapes.typed_sets(sets)  # a speech bridge's sets as the base model reads them (mixed: none)
        rows = {}
        if typed:
            rows["base model + own encoder"] = shapes.evaluate_bridge(base, n=args.eval_n, sets=typed)
        rows.update({"bridge before training": before} if before is not None else {})
        rows["bridge after training"] = after
    print(shapes.eval_table(rows))


def replicas_agree(env, raw, whole):
    """DDP keeps the replicas equal: say so, or say how far they drifted."""
    flat = torch.cat([v.flatten().double() for v in trainable_tensors(raw, whole).values()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    say(env, f"ranks agree: max |difference| of trainable weights across {env.world} ranks = "
             f"{(hi - lo).abs().max().item():.3g}")


# -----------------------------------------------------------------------------


def main(args):
    """Check everything a run needs before any model loads, then train into --out under its lock. An
    interrupted run (SIGINT / SIGTERM) ends, after its checkpoint, with SystemExit(128 + the signal)."""
    args = resolve_args(args)
    check_args(args)
    text_only = args.method in TEXT_ONLY
    if text_only and int(os.environ.get("RANK", -1)) != -1:
        raise BadInput(f"--method {args.method} trains on one process (it is cheap: no vision model runs)")
    if args.fsdp:
        if int(os.environ.get("RANK", -1)) == -1:
            raise BadInput("--fsdp shards across the processes of torchrun: run it under torchrun")
        if args.method == "base" or args.lora_rank and args.lora_lm:
            raise BadInput("--fsdp shards the vision model and the adapter; LoRA in the LM (and method "
                           "base's word encoder) would stay whole: pass --lora-lm false")
        if args.cpu_layout:
            raise BadInput("--fsdp and --cpu-layout: the CPU layout repacks the weights FSDP shards")
    if args.export_release and (args.method not in ("lavi", "align") or args.adapter != "text"):
        raise BadInput("--export-release writes LaVi-Bridge's format: a TextAdapter bridge "
                       "(--adapter text, --method lavi or align)")
    check_checkpoint(args)
    # the data, indexed before any model loads (a missing file or no usable line stops here)
    if text_only and is_audio(args.lm):
        if args.caption_dropout:
            raise BadInput("--caption-dropout: a speech bridge takes its negative prompt from the vision "
                           "model's own text encoder, not from silence: set it to 0")
        pairs = data.audio_pairs(args.data, args.audio_window)
    else:
        pairs = data.text_pairs(args.data) if text_only else None
    if text_only:
        args.epoch_size, per_step = len(pairs), args.batch_size * args.grad_accum
        if args.drop_last and len(pairs) < per_step:
            raise BadInput(f"{args.data}: {len(pairs)} pairs, fewer than one step's {per_step} "
                           f"(--batch-size x --grad-accum) with --drop-last")
        if args.epochs:  # whole batches (drop_last), else the last batch runs into the next epoch
            b = args.batch_size
            batches = len(pairs) // b if args.drop_last else math.ceil(len(pairs) / b)
            args.steps = max(1, args.epochs * batches // args.grad_accum)
    dataset = (data.open_dataset(args.data, args.size, args.flip, args.buckets, args.bucket_step)
               if not text_only and args.data != "shapes" else None)
    with out_lock(args.out, int(os.environ.get("RANK", 0)) == 0):
        result = train(args, pairs, dataset)
    if result.stopped:
        raise SystemExit(128 + result.stopped)
    return result


def train(args, pairs, dataset):
    """The run main checked: set-up, the bridge and its optimizer, restore, the loop, what it shows."""
    text_only, whole = args.method in TEXT_ONLY, args.method == "base"
    env = setup(args)
    torch.manual_seed(args.seed)

    # the model, what it restores from, its optimizer
    native = load_native_encoder(args.native or args.vision, env.ptdtype, env.device) if text_only else None
    raw = build(args, env, native)  # the uncompiled module: saved and sampled
    if text_only:
        check_native(native, raw)
    start, weights, opt_state, log, loaded = restore(args, env, raw)
    env.units = shard(args, env, raw) if args.fsdp else []
    groups = param_groups(raw, args)
    opt = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    optimizer = opt([{k: v for k, v in g.items() if k != "name"} for g in groups], betas=(0.9, 0.999),
                    eps=1e-8, weight_decay=args.weight_decay)
    if opt_state is not None:
        optimizer.load_state_dict(shard_optimizer_state(opt_state, optimizer) if args.fsdp else opt_state)
    ema = make_ema(args, raw, weights)
    n_train = sum(p.numel() for g in groups for p in g["params"])
    n_all = sum(p.numel() for p in raw.parameters())
    say(env, f"{args.preset or 'custom'}: lm={args.lm} vision={args.vision} method={args.method} trainable "
             f"{n_train / 1e6:.2f}M of {n_all / 1e6:.1f}M params, {env.world} process(es) on {env.device}")
    model = torch.compile(raw) if args.compile else raw
    if env.ddp and not args.fsdp:
        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    # the data, and the step of this method
    if text_only:
        step_fn = text_only_step(args, env, raw, native, pairs, fresh=not loaded)
    else:
        batches = data.Batches(args.data, args.size, args.flip, args.seed, args.batch_size, args.grad_accum,
                               env.rank, env.world, start, args.num_workers, args.latent_cache,
                               posterior=lambda x: raw.posterior(x.to(env.device, env.ptdtype)),
                               barrier=dist.barrier if env.ddp else None, dataset=dataset)
        step_fn = image_text_step(args, env, raw, model, batches)

    def save(step, log):
        if not env.master and not args.fsdp:
            return
        # --fsdp: every rank gathers the shards (collectives, in the same order), rank 0 writes one file
        extra = {f"ema.{k}": gather(v).float() for k, v in ema.items()} if ema is not None else None
        save_checkpoint(os.path.join(args.out, "ckpt.safetensors"), raw, step, train_args=vars(args),
                        optimizer=optimizer, extra=extra, whole=whole, log=log, gather=gather,
                        write=env.master)
        if not env.master:
            return
        if whole:
            path = os.path.join(args.out, "base.safetensors")
            with_weights(raw, ema, whole, lambda: shapes.save_base(path, raw.denoiser, raw.text, step))

    # training, and what it shows
    shapes_eval = env.master and args.eval and is_shapes(args.vision)
    before = None
    if shapes_eval and args.method == "lavi" and start == 0:  # the bridge as initialised
        before = shapes.evaluate_bridge(raw.eval(), n=args.eval_n, sets=eval_sets(args))
    restored = len(log)
    with caught_signals() as stop:
        log = train_loop(args, env, raw, model, optimizer, step_fn, start, ema, log, save, stop)
    stopped = stop["signal"]
    if env.master and not text_only and args.data != "shapes":
        print(batches.report())
    if shapes_eval and not stopped:
        shapes_report(args, env, raw, ema, before)
    if args.export_release and env.master and not stopped:
        with_weights(raw, ema, whole, lambda: export_release(raw, args.export_release))
        print(f"the bridge at step {max(start, args.steps)} written as a release folder to "
              f"{args.export_release}")
    if env.ddp:
        if not args.fsdp:
            replicas_agree(env, raw, whole)
        with open("/proc/self/status") as f:  # this rank's peak RSS (VmHWM), for the DDP / FSDP comparison
            peak = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
        print(f"rank {env.rank}: peak RSS {peak / 2 ** 30:.3f} GiB ({'FSDP' if args.fsdp else 'DDP'})")
        # every rank past its last collective before any tears the group down: a rank leaving while gloo's
        # threads still serve another's last message aborts ("terminate called without an active exception")
        dist.barrier()
        del model
        dist.destroy_process_group()
    return SimpleNamespace(bridge=raw, history=[(s, l) for s, l, _ in log[restored:]], log=log,
                           stopped=stopped)


def check_native(native, bridge):
    """The text-only methods need a native encoder of a fixed token count and of the vision model's width."""
    if native.token_count is None:
        raise BadInput("the native encoder pads to the batch's longest prompt: give it a fixed max_length")
    if native.width != bridge.context_width:
        raise BadInput(f"the native encoder gives {native.width}-d features but the vision model takes "
                       f"{bridge.context_width}: wrong --native?")
    if bridge.pooled is not None and not hasattr(native, "encode_pooled"):
        raise BadInput("SDXL takes a pooled text vector: the native encoder must give one (SDXL's own "
                       "two encoders); this one gives none: wrong --native?")


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args())
