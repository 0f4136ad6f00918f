"""
Sample images from a bridge: a checkpoint that train.py wrote, or a LaVi-Bridge release folder.

python sample.py                                   # the shapes world: out/shapes/ckpt.safetensors -> out/shapes/grid.png
python sample.py --eval                            # ... and its attribute accuracy on held-out captions
python sample.py --bridge lavi/t5_unet --lm t5-large --vision sd14 --prompt "a cat on a sofa" --out cat.png
"""
import argparse
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import data
from model import SCHEDULERS, Bridge, BridgeConfig, is_shapes, load_bridge, load_shapes_base, shapes_base_path
from unet import cpu_layout

SHAPES_STEPS, SHAPES_GUIDANCE = 20, 1.5  # DDIM steps and CFG scale of the shapes world (measured: README)
SHAPES_PROMPTS = ["a small red circle on the left", "a large blue square at the top",
                  "a small green triangle on the right", "a large yellow circle in the center",
                  "a small purple square at the bottom", "a large orange triangle on the left",
                  "a large red triangle at the bottom", "a small blue circle at the top"]


def save_grid(images, path, cols=None):
    """images (N, H, W, 3) uint8 -> one PNG grid."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)


def base_bridge(vision="shapes", device="cpu"):
    """The shapes base model with its own word encoder, as a Bridge (no adapter, no LoRA)."""
    unet, codec, sched, kind, words = load_shapes_base(shapes_base_path(vision), device=device)
    cfg = BridgeConfig(lm="words", vision=vision, adapter="none", lora_rank=0)
    return Bridge(cfg, words, None, unet, codec, sched, kind).eval()


def shapes_eval(bridge, n=48, steps=SHAPES_STEPS, guidance=SHAPES_GUIDANCE, seed=0, sets=("seen", "unseen", "paraphrase"),
                scheduler="ddim"):
    """{set: {attribute: accuracy}}: images for held-out captions, read back by data.analyze."""
    res = {}
    for name in tqdm(sets, desc="evaluating", leave=False):
        items = data.eval_set(name, n=n, seed=seed)
        imgs = bridge.sample([c for c, _ in items], steps=steps, guidance=guidance, seed=seed, progress=False,
                             scheduler=scheduler)
        res[name] = data.evaluate(imgs.numpy(), [a for _, a in items])
    return res


def format_eval(rows):
    """A markdown table: one row per (model, set), one column per attribute."""
    attrs = list(next(iter(next(iter(rows.values())).values())))
    lines = ["| model | set | " + " | ".join(attrs) + " |", "|---|---|" + "---|" * len(attrs)]
    for model, res in rows.items():
        for s, acc in res.items():
            lines.append(f"| {model} | {s} | " + " | ".join(f"{100 * acc[a]:.0f}%" for a in attrs) + " |")
    return "\n".join(lines)


def print_shapes_eval(bridge, n=48, before=None, device="cpu", sets=("seen", "unseen", "paraphrase"), **sampling):
    """The table of issue-5: base model with its own encoder, the bridge before and after training.
    sampling: steps, guidance, scheduler of shapes_eval, for both."""
    rows = {"base model + own encoder": shapes_eval(base_bridge(bridge.cfg.vision, device), n=n, sets=sets, **sampling)}
    if before is not None:
        rows["bridge before training"] = before
    rows["bridge after training"] = shapes_eval(bridge, n=n, sets=sets, **sampling)
    print(format_eval(rows))
    return rows


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to load
    p.add_argument("--bridge", default="out/shapes/ckpt.safetensors",
                   help="a train.py checkpoint (.safetensors) or a LaVi-Bridge release folder (adapter/, lora_vis.pt, lora_text.pt)")
    p.add_argument("--lm", default=None, help="language model (a release folder needs it; overrides a checkpoint's)")
    p.add_argument("--vision", default=None, help="vision model (a release folder needs it; overrides a checkpoint's)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="LoRA rank of a release folder (default 32, the release's); a checkpoint knows its own")
    # what to draw
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; default: the shapes demo prompts)")
    p.add_argument("--negative-prompt", default="", help="negative prompt, encoded with the same recipe")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; shapes 20)")
    p.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS),
                   help="sampler (dpmsolver: DPM-Solver++ 2M, fewer steps)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance (default 7.5; shapes {SHAPES_GUIDANCE})")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's native size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (a CPU generator, as diffusers)")
    # where and how
    p.add_argument("--out", default=None, help="a .png for one image, else a folder (one PNG each + grid.png)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype (bf16/fp16: CUDA only)")
    p.add_argument("--eval", action="store_true", help="shapes world: also print attribute accuracy on held-out captions")
    p.add_argument("--eval-n", type=int, default=48, help="images per evaluation set")
    p.add_argument("--eval-sets", default="seen,unseen,paraphrase",
                   help="comma-separated evaluation sets (seen, unseen, paraphrase, spanish)")
    return p


def main(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype != "fp32" and device.type != "cuda":
        raise SystemExit(f"--dtype {args.dtype} is for CUDA; on {device.type} use fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if os.path.isdir(args.bridge) and not (args.lm and args.vision):
        raise SystemExit("a release folder does not say which models it bridges: pass --lm and --vision")
    if not os.path.exists(args.bridge):
        hint = " (train one first: python train.py)" if args.bridge.startswith("out/shapes") else ""
        raise SystemExit(f"no bridge at {args.bridge}{hint}")
    bridge = load_bridge(args.bridge, dtype=dtype, device=device, lm=args.lm, vision=args.vision,
                         lora_rank=args.lora_rank)
    shapes = is_shapes(bridge.cfg.vision)
    steps = args.steps or (SHAPES_STEPS if shapes else 50)
    guidance = args.guidance if args.guidance is not None else (SHAPES_GUIDANCE if shapes else 7.5)
    prompts = [p for p in (args.prompt or (SHAPES_PROMPTS if shapes else ["a photograph of an astronaut riding a horse"]))
               for _ in range(args.n)]
    bridge.merge_lora(unwrap=True)  # sampling only: the plain layers, LoRA folded in
    if device.type == "cpu":  # channels-last, conv weights laid out for oneDNN once, not at every step
        cpu_layout(bridge.denoiser)
    imgs = bridge.sample(prompts, negative_prompt=args.negative_prompt, steps=steps, guidance=guidance,
                         height=args.height, width=args.width, seed=args.seed, scheduler=args.scheduler).numpy()
    out = args.out or (os.path.join(os.path.dirname(args.bridge), "grid.png") if shapes else "samples")
    if len(imgs) == 1 and out.endswith(".png"):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        Image.fromarray(imgs[0]).save(out)
    elif out.endswith(".png"):
        save_grid(imgs, out)
    else:
        os.makedirs(out, exist_ok=True)
        for i, im in enumerate(imgs):
            Image.fromarray(im).save(os.path.join(out, f"{i:03d}.png"))
        save_grid(imgs, os.path.join(out, "grid.png"))
    print(f"wrote {len(imgs)} image(s) to {out}")
    if args.eval:
        if not shapes:
            raise SystemExit("--eval measures the shapes world; this bridge is not one")
        print_shapes_eval(bridge, n=args.eval_n, device=device, sets=tuple(args.eval_sets.split(",")), steps=steps,
                          guidance=guidance, scheduler=args.scheduler)


if __name__ == "__main__":
    main(get_parser().parse_args())
