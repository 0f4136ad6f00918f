"""
Speed of this repo's models against the reference implementations (diffusers, peft), measured in one run on
this machine: same weights (the reference's state dict loaded into ours, whose module names are diffusers'
keys), same inputs, ours and the reference timed alternately, median of the repeats. Prints a markdown table.

pip install -r requirements-test.txt peft     # the references: diffusers (tests) and peft (bench only)
python bench.py --quick                      # no 64x64 U-Net or sd14 sampling rows, fewer repeats (~7 min)
python bench.py --out bench.md               # every row (--threads 2 on free cores: faster)
python bench.py --rows unet,merge            # some rows: unet, sample, lora, merge, shapes, compile
python bench.py --memory                     # SDXL bridge training memory: estimate + CPU peaks (~15 GB RSS)

On a CUDA machine every row runs a second time in bf16 autocast. bench.py and the tests are the only files
that import diffusers and peft (the reference implementations).
"""
import argparse
import copy
import datetime
import io
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext, redirect_stderr, redirect_stdout
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import cpu
import shapes
from adapter import PooledHead, TextAdapter
from lora import LORA_TARGETS, inject, lora_parameters, merge_lora, unwrap_lora
from model import Bridge, BridgeConfig
from model_io import load_strict
from schedulers import DDPM, SD_SCHEDULER
from shapes import PixelCodec, WordEncoder, WordEncoderConfig
from unet import UNET_PRESETS, VAE, VAE_PRESETS, UNet, UNetConfig, set_grad_checkpointing

ROWS = ("unet", "sample", "lora", "merge", "shapes", "compile")
PROMPT, NEGATIVE = "a small red circle on the left", ""  # "": the CFG null caption, as Bridge.sample defaults
# t5-small sizes
T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8)
RANK = 32
# a 4.1M-parameter latent U-Net, no attention at the top level: the "tiny" rows
TINY = UNetConfig(sample_size=32, block_out_channels=(32, 64, 128), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(2, 4, 8), cross_attention_dim=64, norm_num_groups=8)
CONFIGS = {"sd14": UNET_PRESETS["sd14"], "tiny": TINY}
LONG = 10.0  # seconds: a call at least this long is its own warm-up (its first run counts as a repeat)

# -----------------------------------------------------------------------------
# timing


def make_env(kind):
    """Where a row runs: CPU in fp32, or CUDA in bf16 autocast (never bf16/fp16 on a CPU: emulated there,
    hundreds of times slower)."""
    if kind == "cuda":
        return SimpleNamespace(device=torch.device("cuda"), name="cuda bf16", sync=torch.cuda.synchronize,
                               amp=lambda: torch.autocast("cuda", torch.bfloat16))
    return SimpleNamespace(device=torch.device("cpu"), name="cpu fp32", sync=lambda: None, amp=nullcontext)


def timed(env, fn):
    """(wall seconds, CPU seconds of this process, output) of one call of fn."""
    env.sync()
    t0, c0 = time.perf_counter(), time.process_time()
    with env.amp():
        out = fn()
    env.sync()
    return time.perf_counter() - t0, time.process_time() - c0, out


def compare(env, ours, ref, n, budget=8.0, warmup=False):
    """Time ours() and ref(): one warm-up call each (counted as the first round when it took >= LONG s, unless
    warmup: calls whose first run does one-time work, such as packing conv weights), then
    rounds that alternate which side goes first; cheap calls get more rounds, up to `budget` s a side (at
    most 50). Returns SimpleNamespace(wall=(ours, ref) medians, cpu=(ours, ref) medians of CPU time,
    out=(ours, ref) last outputs, rounds). CPU time is steadier than wall time on a machine whose cores other
    processes share."""
    first = [timed(env, ours), timed(env, ref)]
    rounds = max(n, min(50, int(budget / max(first[0][0], first[1][0], 1e-6))))
    runs = ([first[0]], [first[1]]) if max(first[0][0], first[1][0]) >= LONG and not warmup else ([], [])
    out = [first[0][2], first[1][2]]
    for i in range(len(runs[0]), rounds):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            runs[side].append(timed(env, (ours, ref)[side]))
            out[side] = runs[side][-1][2]
    med = lambda k: tuple(statistics.median(r[k] for r in runs[side]) for side in (0, 1))  # noqa: E731
    return SimpleNamespace(wall=med(0), cpu=med(1), out=out, rounds=rounds)


def matmul_rate(env):
    """FLOP/s of one (N, N) @ (N, N) matmul in the env's dtype (N = 2048 on a CPU, 8192 in bf16 on a GPU)."""
    n, dtype = (2048, torch.float32) if env.device.type == "cpu" else (8192, torch.bfloat16)
    a, b = (torch.randn(n, n, device=env.device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / compare(env, lambda: a @ b, lambda: a @ b, 5, budget=2.0).wall[0]


def unet_flops(cfg, batch, side, tokens=77):
    """FLOPs of one forward of our U-Net, counted on the meta device (where attention runs as bmm and is
    counted)."""
    with torch.device("meta"):
        m = UNet(cfg)
        x, ctx = torch.empty(batch, cfg.in_channels, side, side), torch.empty(batch, tokens,
                                                                              cfg.cross_attention_dim)
        t = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x, t, ctx)
    return fc.get_total_flops()


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def fmt_s(t):
    return f"{t * 1e3:.0f} ms" if t < 1 else f"{t:.2f} s"


# -----------------------------------------------------------------------------
# models: the reference with random weights, ours holding the very same tensors

_PAIRS = {}


def unet_pair(name, env):
    """(diffusers UNet2DConditionModel of config `name`, random weights seeded 0; our UNet sharing its
    tensors)."""
    key = (name, env.device.type)
    if key not in _PAIRS:
        from diffusers import UNet2DConditionModel
        torch.manual_seed(0)
        ref = UNet2DConditionModel(**asdict(CONFIGS[name])).to(env.device).eval()  # our config = its kwargs
        with torch.device("meta"):
            ours = UNet(CONFIGS[name])
        load_strict(ours, ref.state_dict(), f"U-Net {name}")  # built on meta: assign=True, no copy
        if env.device.type == "cpu":  # as sample.py runs it: channels-last, weights packed once
            cpu.layout(ours)
        _PAIRS[key] = ref, ours.eval()
    return _PAIRS[key]


def words_bridge(unet, env):
    """A Bridge around `unet` with the shapes world's word encoder (+ a TextAdapter up to the U-Net's context
    width) and the pixel codec: Bridge.sample's whole loop, with text encoding and decoding that cost next to
    nothing."""
    torch.manual_seed(0)
    words = WordEncoder(WordEncoderConfig())
    d = unet.cfg.cross_attention_dim
    adapter = None if d == words.width else TextAdapter(words.width, (words.width + d) // 2, d)
    cfg = BridgeConfig(lm="words", vision="bench", adapter="text" if adapter else "none", lora_rank=0)
    return Bridge(cfg, words, adapter, unet, PixelCodec(), dict(SD_SCHEDULER), "unet").to(env.device).eval()


def sample_ours(bridge):
    """Bridge.sample: DDIM 10 steps, CFG 7.5, batch 1, 32x32 latents (64x64 'pixels' through the pixel
    codec)."""
    return bridge.sample([PROMPT], NEGATIVE, steps=10, guidance=7.5, height=64, width=64, seed=0,
                         progress=False)


# -----------------------------------------------------------------------------
# the rows: each appends entry(case, compare() result, notes) tuples to `table`, one per case


def row_unet(env, args, table):
    """U-Net forward, sd14 size with random weights: batch 1 and 2, 32x32 (and 64x64) latents, GFLOP/s."""
    ref, ours = unet_pair("sd14", env)
    for side in (32,) if args.quick else (32, 64):
        for batch in (1, 2):
            g = torch.Generator().manual_seed(batch * side)
            x = torch.randn(batch, 4, side, side, generator=g).to(env.device)
            ctx = torch.randn(batch, 77, 768, generator=g).to(env.device)
            t = torch.full((batch,), 500, device=env.device)
            with torch.inference_mode():
                n = args.repeats if side == 32 else max(1, args.repeats - 1)
                r = compare(env, lambda: ours(x, t, ctx), lambda: ref(x, t, ctx).sample, n, warmup=True)
            flops, peak, (ta, tb) = unet_flops(ours.cfg, batch, side), env.matmul, r.wall
            table.append(entry(f"U-Net forward sd14, batch {batch}, {side}x{side}", r,
                               f"{flops / 1e9:.0f} GFLOP: ours {flops / ta / 1e9:.1f} GFLOP/s "
                               f"({flops / ta / peak:.0%} of matmul), ref {flops / tb / 1e9:.1f} "
                               f"({flops / tb / peak:.0%}); max rel diff {rel_err(*r.out):.1e}"))


def row_sample(env, args, table):
    """Sampling, DDIM 10 steps + CFG, batch 1: Bridge.sample vs a diffusers-pipeline loop (UNet +
    DDIMScheduler)."""
    from diffusers import DDIMScheduler
    for name in ("tiny",) if args.quick else ("tiny", "sd14"):  # sd14: ~100 s a call on one CPU core
        ref, ours = unet_pair(name, env)
        bridge = words_bridge(ours, env)
        with torch.no_grad():  # the reference gets the same context, computed once outside the timing
            (nctx, nmask), (ctx, mask) = bridge.encode_text([NEGATIVE]), bridge.encode_text([PROMPT])
        ctx2, mask2 = torch.cat([nctx, ctx]), torch.cat([nmask, mask])
        # what the SD pipeline loads (its PRK keys are ignored)
        sched = DDIMScheduler.from_config(SD_SCHEDULER)

        @torch.no_grad()
        def sample_ref():
            sched.set_timesteps(10)
            x = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0)).to(env.device)
            for t in sched.timesteps:
                out = ref(torch.cat([x, x]), t, ctx2, encoder_attention_mask=mask2).sample
                uncond, cond = out.chunk(2)
                x = sched.step(uncond + 7.5 * (cond - uncond), t, x).prev_sample
            img = (F.pixel_shuffle(x, 2) / 2 + 0.5).clamp(0, 1)  # the pixel codec's decode, as Bridge.sample
            return (img.permute(0, 2, 3, 1) * 255).to(torch.uint8).cpu()

        r = compare(env, lambda: sample_ours(bridge), sample_ref, 1 if name == "sd14" else args.repeats)
        diff = (r.out[0].int() - r.out[1].int()).abs().max().item()
        once = "; one round, so ours includes packing its conv weights" if r.rounds == 1 else ""
        table.append(entry(f"sampling {name} U-Net, DDIM 10 steps + CFG, batch 1, 32x32", r,
                           f"Bridge.sample vs diffusers UNet + DDIMScheduler loop; "
                           f"max |diff| {diff} of 255{once}"))


def reference_adapter(d_in, d_mid, d_out):
    """LaVi-Bridge's TextAdapter as the release builds it, from diffusers' GEGLU FeedForward."""
    from diffusers.models.attention import FeedForward
    return nn.Sequential(nn.LayerNorm(d_in), FeedForward(d_in, d_mid, dropout=0.1), nn.LayerNorm(d_mid),
                         FeedForward(d_mid, d_out, dropout=0.1))


def lora_step(side, env):
    """A closure that runs one LoRA training step (AdamW) of T5-small-size LM -> adapter -> sd14 U-Net at
    32x32, rank 32, batch 1: side "ours" (lora.inject, TextAdapter, in cpu.layout on a CPU as train.py
    --cpu-layout true), "ours-plain" (the same in the standard layout, train.py's default) or "ref"
    (diffusers + peft on the same modules)."""
    from transformers import T5Config, T5EncoderModel
    ref_unet, our_unet = unet_pair("sd14", env)  # ours first: its tensors are taken before peft renames ref's
    torch.manual_seed(1)
    t5 = T5EncoderModel(T5Config(**T5_SMALL)).to(env.device).requires_grad_(False).train()
    if side == "ours-plain":
        cpu.layout(our_unet, on=False)
    if side.startswith("ours"):
        unet = our_unet.requires_grad_(False).train()
        inject(unet, LORA_TARGETS["unet"], RANK, dropout=0.1)
        inject(t5, LORA_TARGETS["t5"], RANK, dropout=0.1)
        adapter = TextAdapter(512, 640, 768).to(env.device).train()
        params = lora_parameters(unet) + lora_parameters(t5) + list(adapter.parameters())
    else:
        from peft import LoraConfig, inject_adapter_in_model

        def config(model, key):  # exactly the modules our injection wraps (the names are equal)
            names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                     and any(re.search(p, n) for p in LORA_TARGETS[key])]
            return LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.1, target_modules=names)
        unet = ref_unet.requires_grad_(False).train()
        unet.add_adapter(config(unet, "unet"))
        inject_adapter_in_model(config(t5, "t5"), t5)
        adapter = reference_adapter(512, 640, 768).to(env.device).train()
        params = [p for m in (unet, t5, adapter) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, T5_SMALL["vocab_size"], (1, 77), generator=g).to(env.device)
    latents, noise = (torch.randn(1, 4, 32, 32, generator=g).to(env.device) for _ in range(2))
    t = torch.tensor([500], device=env.device)
    noisy = DDPM(SD_SCHEDULER).add_noise(latents, noise, t)

    def step():
        pred = unet(noisy, t, adapter(t5(input_ids=ids).last_hidden_state))
        loss = F.mse_loss((pred if side.startswith("ours") else pred.sample).float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step, sum(p.numel() for p in params)


def lora_memory(side, env):
    """Child process: peak memory of two training steps above the built model (RSS on a CPU, allocator on
    CUDA)."""
    step, _ = lora_step(side, env)
    if env.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/clear_refs", "w") as f:  # resets the peak RSS (VmHWM) to the current RSS
            f.write("5")
    for _ in range(2):
        with env.amp():
            step()
    if env.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # VmHWM, not ru_maxrss: that one keeps the peak of exited threads, which clear_refs misses
        with open("/proc/self/status") as f:
            peak = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    print("MEM " + json.dumps({"base": base, "delta": peak - base}))


def row_lora(env, args, table):
    """LoRA training step: ours (in the CPU layout, and in the standard one) vs diffusers + peft, each pair
    timed alternately here; peak memory in a subprocess per side."""
    mem = {}
    for side in ("ours", "ours-plain", "ref"):
        cmd = [sys.executable, os.path.abspath(__file__), "--lora-mem", side, "--threads", str(args.threads),
               "--device", env.device.type]
        out = subprocess.run(cmd, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("MEM ")]
        if not line:
            raise RuntimeError(f"memory subprocess for {side} failed:\n{out.stderr[-3000:]}")
        mem[side] = json.loads(line[-1][4:])
    mb = {s: m["delta"] / 2 ** 20 for s, m in mem.items()}
    sides = ("ours", "ours-plain") if env.device.type == "cpu" else ("ours",)
    for side in sides:
        _PAIRS.clear()
        # shared base weights: ours takes them before peft wraps the reference
        ours, n_ours = lora_step(side, env)
        ref, n_ref = lora_step("ref", env)
        r = compare(env, ours, ref, args.repeats, warmup=True)
        what = {"ours": ", ours in cpu.layout (train.py --cpu-layout true)",
                "ours-plain": ", ours in the standard layout (train.py's default)"}[side]
        what = what if env.device.type == "cpu" else ""
        gb = [mem[s]["base"] / 2 ** 30 for s in (side, "ref")]
        table.append(entry(f"LoRA training step: T5-small-size LM + adapter + sd14 U-Net, 32x32, rank 32, "
                           f"batch 1{what}", r,
                           f"trainable {n_ours / 1e6:.1f}M / {n_ref / 1e6:.1f}M params; peak memory above "
                           f"the model {mb[side]:.0f} MB vs {mb['ref']:.0f} MB (ours/ref "
                           f"{mb[side] / mb['ref']:.2f}); "
                           f"model {gb[0]:.1f} / {gb[1]:.1f} GB"))
    _PAIRS.clear()


def row_merge(env, args, table):
    """Sampling (ours, tiny U-Net, DDIM 10 steps + CFG) with a rank-32 LoRA merged (Bridge.merge_lora's way),
    merged and unwrapped (lora.unwrap_lora), and unmerged, each vs no LoRA. Every U-Net is a copy of one
    model, so that their weights were allocated alike."""
    torch.manual_seed(0)
    base = UNet(TINY).to(env.device).eval()
    nets = {}
    for what in ("none", "merged", "merged + unwrap_lora", "unmerged"):
        nets[what] = m = copy.deepcopy(base)
        if what != "none":
            inject(m, LORA_TARGETS["unet"], RANK)
            for p in lora_parameters(m):
                nn.init.normal_(p, std=0.02)  # a trained-looking LoRA (up is zero at init)
            if what != "unmerged":
                merge_lora(m)
            if what == "merged + unwrap_lora":
                unwrap_lora(m)
    bridges = {what: words_bridge(m, env) for what, m in nets.items()}
    notes = {"merged": "target <= 1.02x; the LoRA wrappers stay (one extra module call per wrapped layer)",
             "merged + unwrap_lora": "plain layers again", "unmerged": "LoRA branches computed at every step"}
    for what, note in notes.items():
        r = compare(env, lambda: sample_ours(bridges[what]), lambda: sample_ours(bridges["none"]),
                    args.repeats, budget=20.0)
        table.append(entry(f"sampling tiny U-Net with LoRA {what} vs none (ours both)", r, note))


def row_shapes(env, args, table):
    """train.py's default run (shapes preset): images/s over 10 steps, from a 2- and a 12-step run (set-up
    cancels), in the standard layout (the default) and, on a CPU, with --cpu-layout true."""
    import train
    bs = train.PRESETS["shapes"]["batch_size"]
    # train.main installs its own
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with tempfile.TemporaryDirectory() as tmp:
        vision = "shapes"
        if not os.path.isfile(shapes.BASE):  # not trained yet: a random base model file
            path = os.path.join(tmp, "base.safetensors")
            torch.manual_seed(0)
            shapes.save_base(path, shapes.new_unet()[0], shapes.new_words(), 0)
            vision = f"shapes:{path}"
        for layout in ("false", "true") if env.device.type == "cpu" else ("false",):
            secs = {}
            for steps in (2, 12):
                a = train.get_parser().parse_args([
                    "--preset", "shapes", "--vision", vision, "--steps", str(steps), "--out",
                    os.path.join(tmp, f"{layout}{steps}"), "--eval", "false", "--log-every", "1000",
                    "--save-every", "100000", "--device", env.device.type, "--cpu-layout", layout,
                    "--dtype", "fp32" if env.device.type == "cpu" else "bf16"])
                t0 = time.perf_counter()
                with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                    train.main(a)
                secs[steps] = time.perf_counter() - t0
            per_step = (secs[12] - secs[2]) / 10
            table.append((f"train.py --preset shapes --cpu-layout {layout}, batch {bs}: one step", per_step,
                          None, None, None, 1, f"**{bs / per_step:.1f} images/s** (vision "
                          f"{'shipped base' if vision == 'shapes' else 'random base'}; 12-step run "
                          f"{secs[12]:.1f} s incl. set-up)"))
    for s, h in handlers.items():
        signal.signal(s, h)


def row_compile(env, args, table):
    """Graph breaks of the training loss (Bridge.forward with LoRA in both models) under torch.compile,
    counted by torch._dynamo.explain: the shapes bridge (MiniLM, mask to the LM and the U-Net), T5 and Llama
    + U-Net as LaVi-Bridge trains SD (no mask), and T5 + DiT with the PixArt recipe (mask to T5 and the DiT);
    tiny sizes."""
    import torch._dynamo
    from transformers import T5Config, T5EncoderModel
    import dit
    import encoders
    import model
    torch.manual_seed(0)

    def lavi(denoiser, kind, recipe, side, llama=False):
        if llama:
            from transformers import LlamaConfig, LlamaModel
            lm = LlamaModel(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4))
        else:
            lm = T5EncoderModel(T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                         num_heads=4))
        # ids are given: no tokenizer
        text = encoders.TextEncoder(SimpleNamespace(pad_token="<pad>"), lm, recipe)
        width = denoiser.cfg.cross_attention_dim if kind == "unet" else denoiser.cfg.caption_channels
        cfg = BridgeConfig(lm="lm", vision=kind, adapter="text", lora_rank=4)
        adapter = TextAdapter(64, 64, width)
        bridge = Bridge(cfg, text, adapter, denoiser, PixelCodec(), dict(SD_SCHEDULER), kind)
        bridge.requires_grad_(False)
        for m, key in ((denoiser, kind), (lm, "llama" if llama else "t5")):
            inject(m, LORA_TARGETS[key], 4)
        bridge.adapter.requires_grad_(True)
        return bridge, torch.randint(0, 100, (2, recipe.max_length)), side

    tiny_dit = dit.DiTConfig(num_layers=2, num_attention_heads=2, attention_head_dim=24, caption_channels=32,
                             sample_size=8)
    cases = {"T5 + U-Net (LaVi-Bridge SD recipe)": lavi(UNet(TINY), "unet", encoders.T5, 32),
             "Llama + U-Net (LaVi-Bridge recipe)": lavi(UNet(TINY), "unet", encoders.LLAMA2, 32, True),
             "T5 + DiT (PixArt recipe, masks)": lavi(dit.DiT(tiny_dit), "dit", encoders.PIXART_T5, 8)}
    if os.path.isfile(shapes.BASE):  # the shipped base model and the real MiniLM (tokenized prompts)
        world = model.build_bridge(BridgeConfig(lm="minilm", vision="shapes", lora_rank=8, max_length=16))
        cases = {"shapes: MiniLM + shapes U-Net": (world, None, 16), **cases}
    for name, (bridge, ids, side) in cases.items():
        bridge = bridge.to(env.device).train()
        if ids is None:
            ids, mask = bridge.text.tokenize(["a small red circle on the left", ""])
        else:
            mask = torch.ones_like(ids)
            mask[1, 5:] = 0
        c = bridge.latent_channels
        lat, noise = torch.randn(2, c, side, side), torch.randn(2, c, side, side)
        args_ = [a.to(env.device) for a in (lat, ids, mask, torch.tensor([10, 500]), noise)]
        torch._dynamo.reset()
        t0 = time.perf_counter()
        ex = torch._dynamo.explain(bridge)(*args_)
        secs = time.perf_counter() - t0
        reasons = "; ".join(sorted({str(r.reason).splitlines()[0][:80] for r in ex.break_reasons}))
        reasons = f": {reasons}" if reasons else ""
        table.append((f"torch.compile graph breaks, training loss: {name}", secs, None, None, None, 1,
                      f"**{ex.graph_break_count} graph breaks**, {ex.graph_count} graph(s){reasons} "
                      f"(time: torch._dynamo.explain)"))


# -----------------------------------------------------------------------------


def entry(case, r, notes):
    """A table row from a compare() result."""
    return (case, *r.wall, *r.cpu, r.rounds, notes)


def format_row(dev, case, ta, tb, ca, cb, n, notes):
    cpu = f"{ca / cb:.2f}" if cb and dev.startswith("cpu") else "-"
    ratio = f"**{ta / tb:.2f}**" if tb else "-"
    ours, ref = fmt_s(ta) if n else "-", fmt_s(tb) if tb else "-"
    return f"| {dev} | {case} | {ours} | {ref} | {ratio} | {cpu} | {n} | {notes} |"


def machine():
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu} ({os.cpu_count()} cores){gpu}, {platform.system()} {platform.release()}"


def main(args):
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the memory subprocesses
    if args.lora_mem:
        return lora_memory(args.lora_mem, make_env(args.device))
    if args.sdxl_mem:
        return sdxl_step_memory(args.sdxl_mem, args.checkpointing)
    if args.memory:
        return memory_report(args)
    rows = args.rows.split(",")
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise SystemExit(f"unknown rows {bad}; choose from {','.join(ROWS)}")
    args.repeats = args.repeats or (2 if args.quick else 3)
    import diffusers
    import peft
    import transformers
    load0 = os.getloadavg()
    now = datetime.datetime.now().astimezone()
    lines = [f"# bench.py: ours vs diffusers / peft, {now:%Y-%m-%d %H:%M %Z}", "",
             f"- command: `python bench.py {' '.join(sys.argv[1:])}`",
             f"- machine: {machine()}",
             f"- torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
             f"transformers {transformers.__version__}; torch threads {torch.get_num_threads()}"]
    envs = [make_env("cpu")] + ([make_env("cuda")] if torch.cuda.is_available() else [])
    table = []
    for env in envs:
        env.matmul = matmul_rate(env)
        lines.append(f"- {env.name} matmul rate ({'2048' if env.device.type == 'cpu' else '8192'}^2): "
                     f"{env.matmul / 1e9:.1f} GFLOP/s")
        for r in rows:
            t0, before = time.time(), len(table)
            try:
                globals()[f"row_{r}"](env, args, table)
            except Exception as e:  # one broken row must not cost the others' results
                first = str(e).splitlines()[0] if str(e) else ""
                table.append((f"row {r} FAILED: {type(e).__name__}: {first}", 0.0, None, None, None, 0, ""))
            table[before:] = [(env.name,) + row for row in table[before:]]
            for row in table[before:]:
                print(f"[{time.time() - t0:.0f} s] " + format_row(*row), file=sys.stderr)
        _PAIRS.clear()
    if len(envs) == 1:
        lines.append("- GPU rows skipped: no CUDA device on this machine")
    lines.append(f"- load average (1 min) at start {load0[0]:.1f}, at end {os.getloadavg()[0]:.1f} "
                 f"(other processes share the cores: ratios are fairer than absolute times)")
    lines += ["", "| device | case | ours | reference | ours/ref | ours/ref CPU time | rounds | notes |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [format_row(*row) for row in table]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


# -----------------------------------------------------------------------------
# memory of a bridge into SDXL: estimated from parameter counts, and the U-Net's training step measured

# hub configs of the LMs (google-t5/t5-large, meta-llama/Llama-2-7b-hf), built on the meta device to count
LMS = {"t5-large": ("T5", dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24,
                               num_heads=16)),
       "Llama-2-7B": ("Llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32))}
MEM_SIDES = (16, 32, 48)  # latent sides of the measured steps (128, 256, 384 px); 1024 px is 128


def count(module):
    return sum(p.numel() for p in module.parameters())


def memory_parts(lm):
    """{part: (parameters, frozen?)} of a rank-32 LaVi-Bridge bridge of `lm` into SDXL (meta device)."""
    import transformers as tr
    family, kw = LMS[lm]
    with torch.device("meta"):
        unet = UNet(UNET_PRESETS["sdxl"]).requires_grad_(False)
        text = (tr.T5EncoderModel(tr.T5Config(**kw)) if family == "T5" else
                tr.LlamaForCausalLM(tr.LlamaConfig(**kw))).requires_grad_(False)
        width = text.config.d_model if family == "T5" else text.config.hidden_size
        n_unet, n_text, n_vae = count(unet), count(text), count(VAE(VAE_PRESETS["sd"]))  # SDXL's VAE = SD's
        inject(unet, LORA_TARGETS["unet"], RANK)
        inject(text, LORA_TARGETS["t5" if family == "T5" else "llama"], RANK)
        adapter = TextAdapter(width, (width + 2048) // 2, 2048)
        pooled = PooledHead(2048, 1280)
    return {"SDXL U-Net": (n_unet, True), f"{lm}": (n_text, True), "SDXL VAE": (n_vae, True),
            "LoRA (U-Net, rank 32)": (sum(p.numel() for p in lora_parameters(unet)), False),
            "LoRA (LM, rank 32)": (sum(p.numel() for p in lora_parameters(text)), False),
            "adapter + pooled head": (count(adapter) + count(pooled), False)}


def sdxl_step_memory(side, checkpointing):
    """Child process: the full-size SDXL U-Net (random fp32 weights), rank-32 LoRA, AdamW, batch 1 at a
    side x side latent with a 77 x 2048 context and the pooled vector / size ids: peak RSS of two training
    steps above the built model."""
    torch.manual_seed(0)
    with torch.device("meta"):
        unet = UNet(UNET_PRESETS["sdxl"])
    unet = unet.to_empty(device="cpu").requires_grad_(False)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    inject(unet, LORA_TARGETS["unet"], RANK)
    set_grad_checkpointing(unet, checkpointing)
    unet.train()
    opt = torch.optim.AdamW(lora_parameters(unet), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x, noise = (torch.randn(1, 4, side, side, generator=g) for _ in range(2))
    ctx = torch.randn(1, 77, 2048, generator=g).requires_grad_(True)  # as the adapter's output: it trains
    pooled = torch.randn(1, 1280, generator=g).requires_grad_(True)
    ids = torch.tensor([[8.0 * side, 8.0 * side, 0, 0, 8.0 * side, 8.0 * side]])
    base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
    t0 = time.perf_counter()
    for _ in range(2):
        loss = F.mse_loss(unet(x, torch.tensor([500]), ctx, text_embeds=pooled, time_ids=ids), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with open("/proc/self/status") as f:
        peak = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    n_lora = sum(p.numel() for p in lora_parameters(unet))
    print("MEM " + json.dumps({"base": base, "delta": peak - base, "lora": n_lora,
                               "step_s": (time.perf_counter() - t0) / 2}))


def memory_report(args):
    """The markdown memory report: the estimate of each part from its parameter count (frozen in bf16, the
    trainable in fp32 with its gradient and AdamW's two moments: 16 bytes), and the U-Net's measured peaks
    above its weights at small latents, with and without gradient checkpointing."""
    GB = 2 ** 30
    lines = ["# SDXL bridge training memory (`python bench.py --memory`)", "",
             f"- machine: {machine()}; torch {torch.__version__}", "",
             "## Estimate from parameter counts (frozen parts bf16, trainable fp32 + grad + AdamW)", "",
             "| LM | part | parameters | bytes / param | GiB |", "|---|---|---|---|---|"]
    for lm in LMS:
        total = 0.0
        for part, (n, frozen) in memory_parts(lm).items():
            gib = n * (2 if frozen else 16) / GB
            total += gib
            lines.append(f"| {lm} | {part} | {n:,} | {2 if frozen else 16} | {gib:.2f} |")
        lines.append(f"| {lm} | **weights and optimiser state** | | | **{total:.2f}** |")
    lines += ["", "## Measured: the full-size SDXL U-Net's training step on this CPU (fp32, batch 1, rank-32 "
              "LoRA, AdamW)", "",
              "Peak RSS of two steps above the built model (10.3 GB of fp32 weights): the activations, "
              "LoRA gradients and AdamW state.", "",
              "| latent | pixels | gradient checkpointing | peak above the model | of which LoRA grad + "
              "AdamW | step |", "|---|---|---|---|---|---|"]
    for side in MEM_SIDES:
        for ck in (False, True):
            cmd = [sys.executable, os.path.abspath(__file__), "--sdxl-mem", str(side), "--threads",
                   str(args.threads)] + (["--checkpointing"] if ck else [])
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__)))
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("MEM ")]
            if not line:
                raise RuntimeError(f"SDXL memory subprocess failed:\n{out.stderr[-3000:]}")
            m = json.loads(line[-1][4:])
            states = m["lora"] * 12 / GB  # fp32 grad + two moments
            lines.append(f"| {side}x{side} | {8 * side} px | {'on' if ck else 'off'} | "
                         f"{m['delta'] / GB:.2f} GiB | {states:.2f} GiB | {m['step_s']:.0f} s |")
            print(lines[-1], file=sys.stderr)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows to run, of {','.join(ROWS)}")
    p.add_argument("--quick", action="store_true",
                   help="skip the 64x64 U-Net rows and the sd14 sampling row; 2 repeats, not 3")
    p.add_argument("--repeats", type=int, default=0,
                   help="timed rounds of an expensive case (0: 3, --quick 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (the cores are shared: default 1)")
    p.add_argument("--out", default="", help="also write the markdown table to this file")
    p.add_argument("--memory", action="store_true",
                   help="instead of the rows: SDXL bridge training memory, estimated and measured")
    # memory subprocesses
    p.add_argument("--lora-mem", choices=["ours", "ours-plain", "ref"], help=argparse.SUPPRESS)
    p.add_argument("--sdxl-mem", type=int, help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    main(get_parser().parse_args())
