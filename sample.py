"""
Sample images from a bridge: a checkpoint that train.py wrote, or a LaVi-Bridge release folder.

python sample.py            # the shapes world: out/shapes/ckpt.safetensors -> out/shapes/grid.png
python sample.py --eval     # ... and its attribute accuracy on held-out captions
python sample.py --bridge lavi/t5_unet --lm t5-large --vision sd14 --prompt "a cat on a sofa" --out cat.png
"""
import argparse
import os

from PIL import Image

import cpu
import shapes
from model import device_and_dtype, is_shapes, load_bridge, native_bridge
from schedulers import SCHEDULERS


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to load
    p.add_argument("--bridge", default="out/shapes/ckpt.safetensors",
                   help="a train.py checkpoint (.safetensors) or a LaVi-Bridge release folder (adapter/, "
                        "lora_vis.pt, lora_text.pt)")
    p.add_argument("--lm", default=None,
                   help="language model (a release folder needs it; overrides a checkpoint's)")
    p.add_argument("--vision", default=None,
                   help="vision model (a release folder needs it; overrides a checkpoint's)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="LoRA rank of a release folder (default 32, the release's); "
                        "a checkpoint knows its own")
    # what to draw
    p.add_argument("--prompt", action="append",
                   help="a prompt (repeatable; default: the shapes demo prompts)")
    p.add_argument("--negative-prompt", default="", help="negative prompt, encoded with the same recipe")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (default 50; shapes {shapes.STEPS})")
    p.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS),
                   help="sampler (dpmsolver: DPM-Solver++ 2M, fewer steps)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance (default 7.5; shapes {shapes.GUIDANCE})")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's native size)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial noise (a CPU generator, as diffusers)")
    # where and how
    p.add_argument("--out", default=None,
                   help="a .png for one image, else a folder (one PNG each + grid.png)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weights dtype (bf16/fp16: CUDA only)")
    p.add_argument("--eval", action="store_true",
                   help="shapes world: also print attribute accuracy on held-out captions")
    p.add_argument("--eval-n", type=int, default=48, help="images per evaluation set")
    p.add_argument("--eval-sets", default="seen,unseen,paraphrase",
                   help="comma-separated evaluation sets (seen, unseen, paraphrase, spanish)")
    return p


def main(args):
    device, dtype = device_and_dtype(args.device, args.dtype)
    if os.path.isdir(args.bridge) and not (args.lm and args.vision):
        raise SystemExit("a release folder does not say which models it bridges: pass --lm and --vision")
    if not os.path.exists(args.bridge):
        hint = " (train one first: python train.py)" if args.bridge.startswith("out/shapes") else ""
        raise SystemExit(f"no bridge at {args.bridge}{hint}")
    bridge = load_bridge(args.bridge, dtype=dtype, device=device, merge=True, lm=args.lm, vision=args.vision,
                         lora_rank=args.lora_rank)
    if device.type == "cpu":
        cpu.layout(bridge.denoiser)
    world = is_shapes(bridge.cfg.vision)
    steps = args.steps or (shapes.STEPS if world else 50)
    guidance = args.guidance if args.guidance is not None else (shapes.GUIDANCE if world else 7.5)
    default = shapes.PROMPTS if world else ["a photograph of an astronaut riding a horse"]
    prompts = [p for p in (args.prompt or default) for _ in range(args.n)]
    imgs = bridge.sample(prompts, negative_prompt=args.negative_prompt, steps=steps, guidance=guidance,
                         height=args.height, width=args.width, seed=args.seed, scheduler=args.scheduler)
    imgs = imgs.numpy()
    out = args.out or (os.path.join(os.path.dirname(args.bridge), "grid.png") if world else "samples")
    if len(imgs) == 1 and out.endswith(".png"):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        Image.fromarray(imgs[0]).save(out)
    elif out.endswith(".png"):
        shapes.save_grid(imgs, out, captions=prompts)
    else:
        os.makedirs(out, exist_ok=True)
        for i, im in enumerate(imgs):
            Image.fromarray(im).save(os.path.join(out, f"{i:03d}.png"))
        shapes.save_grid(imgs, os.path.join(out, "grid.png"), captions=prompts)
    print(f"wrote {len(imgs)} image(s) to {out}")
    if args.eval:
        if not world:
            raise SystemExit("--eval measures the shapes world; this bridge is not one")
        sampling = dict(n=args.eval_n, sets=tuple(args.eval_sets.split(",")), steps=steps, guidance=guidance,
                        scheduler=args.scheduler)
        base = native_bridge(bridge.cfg.vision, device=device)
        rows = {"base model + own encoder": shapes.evaluate_bridge(base, **sampling),
                "bridge after training": shapes.evaluate_bridge(bridge, **sampling)}
        print(shapes.eval_table(rows))


if __name__ == "__main__":
    main(get_parser().parse_args())
