"""
Sample images from a bridge: a checkpoint that train.py wrote, or a LaVi-Bridge release folder. A release
folder samples with the release's recipe (UniPC as diffusers 0.24 runs it, 50 steps, CFG 7.5, the release's
prompt suffix), a checkpoint with its own (DDIM, 50 steps, CFG 7.5; the shapes world 20 steps, CFG 1.5);
every flag overrides its part, and the recipe used is printed.

python sample.py            # the shapes world: out/shapes/ckpt.safetensors -> out/shapes/grid.png
python sample.py --eval     # ... and its attribute accuracy on held-out captions
python sample.py --bridge lavi/t5_unet --lm t5-large --vision sd14 --prompt "a cat on a sofa" --out cat.png
python sample.py --bridge native --vision sdxl --prompt "a cat on a sofa"   # a vision model's own encoder
python sample.py --bridge ella-sd1.5-tsc-t5xl.safetensors --prompt "a cat on a sofa"  # ELLA: flan-t5-xl, sd15
python sample.py --bridge out/shapes-sound/ckpt.safetensors --audio said.wav            # speech to image
python sample.py --bridge out/shapes-sound/ckpt.safetensors --audio said.wav --prompt red  # speech + text
"""
import argparse
import math
import os

from PIL import Image

import cpu
import shapes
from adapter import GlueNet
from audio import read_wav
from encoders import is_audio, lm_signature
from model import (DTYPES, AudioCLIPEmbedding, check_release_files, checkpoint_config, device_and_dtype,
                   is_ella_release, is_gluegen_release, is_shapes, load_bridge, native_bridge,
                   vision_signature)
from model_io import BadInput, MissingInput, run_cli, writable
from schedulers import SCHEDULERS


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to load
    p.add_argument("--bridge", default="out/shapes/ckpt.safetensors",
                   help="a train.py checkpoint (.safetensors), a LaVi-Bridge release folder (adapter/, "
                        "lora_vis.pt, lora_text.pt), a GlueGen release (.ckpt), ELLA's connector "
                        "(.safetensors), or native: the --vision model with its own text encoder")
    p.add_argument("--lm", default=None,
                   help="language model (a release folder needs it; overrides a checkpoint's)")
    p.add_argument("--vision", default=None,
                   help="vision model (a release folder needs it; overrides a checkpoint's)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="only to insist on a rank: a release folder's LoRA lists and a checkpoint say theirs")
    # what to draw
    p.add_argument("--prompt", action="append",
                   help="a prompt (repeatable; default: the shapes demo prompts)")
    p.add_argument("--audio", action="append",
                   help="a speech bridge: a 16 kHz mono WAV in place of a prompt (repeatable); with --prompt "
                        "too, each clip is mixed with the prompt of the same index by GlueGen's rule")
    p.add_argument("--mix-split", type=int, default=None,
                   help="mixing: the clip's first N tokens, the prompt's first N, then both averaged from "
                        "token 2N (GlueGen: 3-7 of 77; default: 1 in the shapes world's 16, else 3)")
    p.add_argument("--negative-prompt", default="", help="negative prompt, encoded with the same recipe")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the bridge's recipe)")
    p.add_argument("--scheduler", default=None, choices=list(SCHEDULERS),
                   help="sampler (default: the bridge's recipe; dpmsolver: DPM-Solver++ 2M, fewer steps)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance (default: the bridge's recipe)")
    p.add_argument("--prompt-suffix", default=None,
                   help="appended to every prompt, not the negative one (default: the recipe's; '' for none)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's native size)")
    p.add_argument("--original-size", type=pair, default=None,
                   help="SDXL's micro-condition H,W in pixels (default: the image's size)")
    p.add_argument("--crop", type=pair, default=(0, 0), help="SDXL's micro-condition crop top,left in pixels")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial noise (a CPU generator, as diffusers)")
    # where and how
    p.add_argument("--out", default=None,
                   help="a .png for one image, else a folder (one PNG each + grid.png)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weights dtype (bf16/fp16: CUDA only)")
    p.add_argument("--lm-dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="the language model's weights, LoRA and activations (default: the release's, fp16 on "
                        "CUDA for Llama-2; on a CPU fp32 on weights rounded through fp16)")
    p.add_argument("--eval", action="store_true",
                   help="shapes world: also print attribute accuracy on held-out captions")
    p.add_argument("--eval-n", type=int, default=48, help="images per evaluation set")
    p.add_argument("--eval-sets", default=None,
                   help="comma-separated evaluation sets (seen, unseen, paraphrase, spanish; a speech "
                        "bridge: spoken, spoken-unseen, mixed; default: seen,unseen,paraphrase or the spoken "
                        "ones)")
    return p


def pair(s):
    """'H,W' -> (H, W) non-negative ints."""
    try:
        a, b = (int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: give two integers as H,W") from None
    if a < 0 or b < 0:
        raise argparse.ArgumentTypeError(f"{s!r}: must not be negative")
    return a, b


IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp")  # --out with one of these is an image file, else a folder


def eval_sets(args):
    """--eval-sets as a tuple; a speech bridge's default: the spoken sets."""
    given = args.eval_sets or (",".join(shapes.SPOKEN_SETS) if args.speech else "seen,unseen,paraphrase")
    return tuple(s.strip() for s in given.split(",") if s.strip())


def check_args(args):
    """Every flag and path, before anything loads (one BadInput); returns where the images go. Sets
    args.speech: whether the bridge hears clips."""
    args.speech = False
    for flag, v in (("--steps", args.steps), ("--n", args.n), ("--eval-n", args.eval_n)):
        if v is not None and v < 1:
            raise BadInput(f"{flag} {v}: must be >= 1")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise BadInput(f"--guidance {args.guidance}: must be a finite number")
    for flag, v in (("--height", args.height), ("--width", args.width)):
        if v is not None and not (8 <= v <= 4096 and v % 8 == 0):
            raise BadInput(f"{flag} {v}: must be a multiple of 8 from 8 to 4096")
    if args.prompt is not None and not [p for p in args.prompt if p.strip()]:
        raise BadInput("--prompt: an empty prompt (leave --prompt out for the default ones)")
    if args.audio and args.prompt and len(args.prompt) not in (1, len(args.audio)):
        raise BadInput(f"mixing {len(args.audio)} clip(s) with {len(args.prompt)} prompts: give one prompt, "
                       f"or one per clip")
    if args.bridge == "native":
        if not args.vision or args.lm:
            raise BadInput("--bridge native samples the --vision model with its own text encoder: pass "
                           "--vision, and no --lm")
        vision = args.vision
    elif os.path.isdir(args.bridge):
        if not (args.lm and args.vision):
            raise BadInput("a release folder does not say which models it bridges: pass --lm and --vision")
        check_release_files(args.bridge)
        vision = args.vision
    elif is_ella_release(args.bridge):  # its connector's widths are checked against the models when loaded
        if args.audio:
            raise BadInput(f"{args.bridge} is ELLA's connector: it reads text, not --audio")
        vision = args.vision or "sd15"
    elif is_gluegen_release(args.bridge):
        c = GlueNet.from_gluegen(args.bridge).cfg  # its keys and sizes, before any model loads
        args.speech = bool(c.in_tokens)  # the sound GlueNet: AudioCLIP embeddings as --audio
        need = [f for f, missing in (("--lm (e.g. xlm-roberta-large)", not (args.lm or args.speech)),
                                     ("--vision (e.g. sd15)", not args.vision)) if missing]
        if need:
            raise BadInput(f"{args.bridge} is a GlueGen release (a torch file), which does not say which "
                           f"models it bridges: pass {' and '.join(need)}")
        if args.speech and not args.audio:
            raise BadInput(f"{args.bridge} is GlueGen's sound GlueNet: give --audio files of AudioCLIP audio "
                           f"embeddings (.npy, 1024 values; AudioCLIP itself is not in this repository)")
        for path in args.audio or []:
            AudioCLIPEmbedding(c.in_tokens, c.in_dim).read(path)
        lm, vis = lm_signature(args.lm), vision_signature(args.vision)
        if not c.in_tokens and (lm and lm[1] != c.in_dim or vis and vis[1] != c.out_dim):
            raise BadInput(f"{args.bridge} maps width {c.in_dim} to width {c.out_dim}; --lm {args.lm} gives "
                           f"{lm[1] if lm else '?'} and --vision {args.vision} takes "
                           f"{vis[1] if vis else '?'}")
        vision = args.vision
    elif os.path.exists(args.bridge):
        cfg = checkpoint_config(args.bridge)[0]
        vision = args.vision or cfg.vision
        args.speech = is_audio(cfg.lm)
        if args.speech and args.prompt and not args.audio:
            raise BadInput(f"{args.bridge} hears speech: give --audio clips (a --prompt is mixed into them)")
        if args.speech and not args.audio and not is_shapes(vision) or args.audio and not args.speech:
            raise BadInput(f"{args.bridge} bridges {cfg.lm}, " + (
                "a speech encoder: give --audio clips (and --prompt to mix text in)" if args.speech
                else "which reads text: --audio is for a speech bridge"))
        for path in args.audio or []:
            read_wav(path)  # a missing, corrupt, stereo or other-rate file stops here
        for flag, given, own, signature in (("--lm", args.lm, cfg.lm, lm_signature),
                                            ("--vision", args.vision, cfg.vision, vision_signature)):
            mine, theirs = (signature(given), signature(own)) if given and given != own else (None, None)
            if mine and theirs and mine != theirs:
                raise BadInput(f"{flag} {given} is a {mine[0]} of width {mine[1]}; this bridge was trained "
                               f"on {own}, a {theirs[0]} of width {theirs[1]}: its LoRA and adapter do not "
                               f"fit")
    else:
        hint = " (train one first: python train.py)" if args.bridge.startswith("out/shapes") else ""
        raise MissingInput(f"no bridge at {args.bridge}{hint}")
    if args.audio and not args.speech:
        raise BadInput(f"{args.bridge} reads text: --audio is for a speech bridge")
    if args.eval:
        if not is_shapes(vision):
            raise BadInput("--eval measures the shapes world; this bridge is not one")
        unknown = [s for s in eval_sets(args) if s not in shapes.EVAL_SETS]
        if unknown:
            raise BadInput(f"--eval-sets: unknown {', '.join(unknown)} (choose from "
                           f"{', '.join(shapes.EVAL_SETS)})")
        shapes.check_sets(eval_sets(args), args.speech)
    out = args.out or "samples"
    if not args.out and is_shapes(vision):
        out = os.path.join(os.path.dirname(args.bridge), "grid.png")
    ext = os.path.splitext(out)[1].lower()
    if ext and ext not in IMAGE_TYPES:
        raise BadInput(f"--out {out}: an image file ({', '.join(IMAGE_TYPES)}) or a folder (no extension)")
    if os.path.exists(out) and os.path.isdir(out) == bool(ext):
        raise BadInput(f"--out {out} exists and is a {'folder' if ext else 'file'}")
    if not writable(os.path.dirname(os.path.abspath(out)) if ext else out):
        raise BadInput(f"--out {out}: cannot write there")
    return out


def main(args):
    out = check_args(args)
    device, dtype = device_and_dtype(args.device, args.dtype)
    if args.lm_dtype in ("bf16", "fp16") and device.type != "cuda":
        raise BadInput(f"--lm-dtype {args.lm_dtype} is for CUDA; on {device.type} the LM computes in fp32")
    if args.bridge == "native":
        bridge = native_bridge(args.vision, dtype=dtype, device=device)
    else:
        bridge = load_bridge(args.bridge, dtype=dtype, device=device, merge=True, lm=args.lm,
                             vision=args.vision, lora_rank=args.lora_rank,
                             lm_dtype=DTYPES[args.lm_dtype] if args.lm_dtype else None)
    if device.type == "cpu":
        cpu.layout(bridge.denoiser)
    world = is_shapes(bridge.cfg.vision)
    bridge.sampling = r = bridge.sampling.but(args.scheduler, args.steps, args.guidance, args.prompt_suffix)
    how = "".join(f" ({k} {v})" for k, v in r.scheduler_overrides)
    release = os.path.isdir(args.bridge) or is_gluegen_release(args.bridge) or is_ella_release(args.bridge)
    whose = "the release's recipe, flags override it" if release else "flags override it"
    print(f"sampling: {r.scheduler}{how}, {r.steps} steps, CFG {r.guidance:g}, prompt suffix "
          f"{r.prompt_suffix!r} ({whose})")
    default = shapes.PROMPTS if world else ["a photograph of an astronaut riding a horse"]
    split = args.mix_split or (1 if world else 3)
    if args.speech:  # the clips are the prompts (the shapes world's default: its demo prompts, spoken)
        clips = args.audio or shapes.spoken(shapes.PROMPTS, shapes.HELDOUT_VOICES)
        texts = args.prompt and (args.prompt * len(clips) if len(args.prompt) == 1 else args.prompt)
        prompts = [a for a in clips for _ in range(args.n)]
        mix = [t for t in texts for _ in range(args.n)] if texts else None
        said = dict(zip(clips, shapes.PROMPTS)) if not args.audio else {}
        captions = [f"said: {said.get(a, os.path.basename(a))}" + (f" + {t!r}" if texts else "")
                    for a, t in zip(prompts, mix or [None] * len(prompts))]
    else:
        prompts = captions = [p for p in (args.prompt or default) for _ in range(args.n)]
        mix = None
    if not bridge.sdxl and (args.original_size or tuple(args.crop) != (0, 0)):
        raise BadInput("--original-size and --crop are SDXL's micro-conditions; this vision model has none")
    sdxl = dict(original_size=args.original_size, crop=args.crop) if bridge.sdxl else {}
    imgs = bridge.sample(prompts, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                         seed=args.seed, mix=mix, mix_split=split, **sdxl)
    imgs = imgs.numpy()
    if out.lower().endswith(IMAGE_TYPES):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if len(imgs) == 1:
            Image.fromarray(imgs[0]).save(out)
        else:
            shapes.save_grid(imgs, out, captions=captions)
    else:
        os.makedirs(out, exist_ok=True)
        for i, im in enumerate(imgs):
            Image.fromarray(im).save(os.path.join(out, f"{i:03d}.png"))
        shapes.save_grid(imgs, os.path.join(out, "grid.png"), captions=captions)
    print(f"wrote {len(imgs)} image(s) to {out}")
    if args.eval:
        sampling = dict(n=args.eval_n, steps=r.steps, guidance=r.guidance, scheduler=r.scheduler)
        base = native_bridge(bridge.cfg.vision, device=device)
        sets = eval_sets(args)
        typed = shapes.typed_sets(sets)  # a speech bridge's sets as the base model reads them (mixed: none)
        rows = {}
        if typed:
            rows["base model + own encoder"] = shapes.evaluate_bridge(base, sets=typed, **sampling)
        rows["bridge after training"] = shapes.evaluate_bridge(bridge, sets=sets, mix_split=split, **sampling)
        print(shapes.eval_table(rows))


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args())
