"""
The bridge: a language model (or any text encoder) -> an adapter -> a pretrained text-to-image model (U-Net
or DiT, with its VAE and scheduler), wired into one module, as LaVi-Bridge (Zhao et al. 2024) builds it.
Read top to bottom: the vision models, the Bridge, how a bridge is built from a BridgeConfig, its checkpoint
(what it trains, and how it is rebuilt from that), the releases. The text sources are encoders.py's.
"""
import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import shapes
from adapter import (TSC, GlueNet, GlueNetConfig, PooledHead, Resampler, ResamplerConfig, TextAdapter,
                     TSCConfig, gluegen_mix)
from audio import AudioEncoder
from dit import DiT
from ldmbert import LDMBert
from lora import (LORA_TARGETS, export_release_list, import_release_list, inject, load_lora,
                  load_release_file, lora_state_dict, merge_lora, unwrap_lora)
from model_io import (BadInput, MissingInput, check_finite, hub_folder, load_strict, load_weights,
                      optimizer_state, optimizer_tensors, read_config, read_safetensors,
                      read_safetensors_metadata, save_safetensors, tensor_names)
from schedulers import DDPM, PIXART_SCHEDULER, SD_SCHEDULER, SDXL_SCHEDULER, make
from encoders import (SDXL_CONDITIONER, LDMBertEncoder, SDXLTextEncoder, TextEncoder, TextRecipe,
                      family_recipe, is_audio, lm_source, recipe_for)
from unet import UNet, VAE

# -----------------------------------------------------------------------------
# vision models: names, downloads, loading

VISION_PRESETS = {  # --vision names: hub repo of the diffusers pipeline
    "sd14": "CompVis/stable-diffusion-v1-4",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "ldm": "CompVis/ldm-text2im-large-256",
    "pixart-512": "PixArt-alpha/PixArt-XL-2-512x512",
    "pixart-1024": "PixArt-alpha/PixArt-XL-2-1024-MS",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}  # and "shapes" / "shapes:PATH", the shapes world's base model (shapes.py)
# the parts of a pipeline a bridge needs (never the text encoder: the LM replaces it), and the native encoder
VISION_FILES = ["unet/*", "transformer/*", "vae/*", "vqvae/*", "scheduler/*", "model_index.json"]
NATIVE_FILES = ["text_encoder/*", "tokenizer/*", "text_encoder_2/*", "tokenizer_2/*", "bert/*",
                "model_index.json"]


def is_shapes(vision):
    return vision == "shapes" or vision.startswith("shapes:")


def vision_folder(name, patterns, download=True):
    """A local pipeline folder (or single file) for a VISION_PRESETS name or a path."""
    if name in VISION_PRESETS:
        return hub_folder(VISION_PRESETS[name], patterns, "vision model", download)
    if os.path.exists(name):
        return name
    raise BadInput(f"unknown --vision {name!r}: use one of {', '.join(VISION_PRESETS)}, shapes, "
                   f"a diffusers pipeline folder or a single checkpoint file")


def vision_signature(vision):
    """("unet" | "dit", the width of the text features it takes) of --vision from the config files here
    alone (nothing is downloaded), or None where they are not here (or it is a single checkpoint file): what
    a bridge's adapter and vision LoRA must fit."""
    try:
        if is_shapes(vision):
            meta = read_safetensors(shapes.base_path(vision), "shapes base model", tensors=False)[1]
            return "unet", json.loads(meta["unet"])["cross_attention_dim"]
        folder = vision_folder(vision, VISION_FILES, download=False)
    except (BadInput, OSError, KeyError, ValueError):
        return None
    for kind, sub, key in (("dit", "transformer", "caption_channels"),
                           ("unet", "unet", "cross_attention_dim")):
        cfg = read_config(os.path.join(folder, sub)) if os.path.isdir(os.path.join(folder, sub)) else None
        if cfg is not None:
            return kind, cfg.get(key)
    return None


def load_vision(name, dtype=torch.float32, device="cpu", pretrained=True):
    """(denoiser, vae, scheduler config, kind "unet" | "dit") of a preset name, a pipeline folder or a single
    file. pretrained=False: a freshly initialised model, for the shapes world's base model only."""
    if is_shapes(name):
        unet, _, sched = shapes.load_base(shapes.base_path(name)) if pretrained else shapes.new_unet()
        return unet.to(device, dtype), shapes.PixelCodec(), sched, "unet"
    if not pretrained:
        raise BadInput("only the shapes world's base model trains from scratch (method base)")
    path = vision_folder(name, VISION_FILES)
    if os.path.isfile(path):  # original single file: PixArt .pth or SD/LDM .ckpt/.safetensors
        kind = "dit" if path.endswith(".pth") else "unet"
    else:
        kind = "dit" if os.path.isdir(os.path.join(path, "transformer")) else "unet"
    denoiser = (DiT if kind == "dit" else UNet).from_pretrained(path, dtype=dtype, device=device)
    vae = VAE.from_pretrained(path, dtype=dtype, device=device)
    sched_json = os.path.join(path, "scheduler", "scheduler_config.json") if os.path.isdir(path) else ""
    if os.path.isfile(sched_json):
        with open(sched_json) as f:
            sched = json.load(f)
    else:  # a single file: the scheduler of its family (SDXL's file names Euler's "leading" spacing)
        sdxl = kind == "unet" and denoiser.cfg.addition_embed_type == "text_time"
        sched = dict(PIXART_SCHEDULER if kind == "dit" else SDXL_SCHEDULER if sdxl else SD_SCHEDULER)
    return denoiser, vae, sched, kind


def is_sdxl_single_file(path):
    """An original SDXL checkpoint file: it has the conditioner's OpenCLIP bigG."""
    return any(k.startswith(SDXL_CONDITIONER[1]) for k in tensor_names(path))


def load_native_encoder(vision, dtype=torch.float32, device="cpu", pretrained=True):
    """The frozen text encoder a vision model was trained with (tokenize, forward(ids, mask) -> (hidden,
    vision mask or None), width, token_count): the native half of --lm native, and the target of the
    text-only methods (gluenet, align).
    - shapes / shapes:PATH: the base model's own WordEncoder (16 words, the mask to the U-Net);
    - a pipeline (VISION_PRESETS name or folder): text_encoder/ + tokenizer/ under the pipeline's recipe:
      CLIP (SD) 77 tokens padded, no mask; T5 (PixArt) 120 tokens, the mask to T5 and to the DiT;
      LDM: LDMBert (bert/ + tokenizer/), 77 tokens padded, no mask; SDXL: CLIP-L + bigG (SDXLTextEncoder);
    - an original SDXL single file: its conditioner's two encoders (SDXLTextEncoder.from_single_file);
    - anything else: a language model (LM_PRESETS name, hub id or folder) under its own recipe,
      e.g. "clip" = openai/clip-vit-large-patch14, the text encoder of SD 1.x."""
    if is_shapes(vision):
        words = shapes.load_base(shapes.base_path(vision))[1] if pretrained else shapes.new_words()
        return words.to(device, dtype).requires_grad_(False).eval()
    if os.path.isfile(vision) and is_sdxl_single_file(vision):  # its conditioner's two encoders
        enc = SDXLTextEncoder.from_single_file(vision, dtype=dtype, device=device)
        return enc.requires_grad_(False).eval()
    pipeline = vision in VISION_PRESETS or os.path.isdir(vision) and any(
        os.path.exists(os.path.join(vision, n)) for n in ("model_index.json", "text_encoder", "bert", "unet",
                                                          "transformer"))
    if not pipeline:
        return TextEncoder.load(vision, dtype=dtype, device=device).requires_grad_(False).eval()
    folder = vision_folder(vision, NATIVE_FILES)
    from transformers import AutoTokenizer
    tok_dir = os.path.join(folder, "tokenizer")
    if os.path.isdir(os.path.join(folder, "bert")):  # LDM: LDMBert + a BERT tokenizer
        if not os.path.isdir(tok_dir):
            raise MissingInput(f"{vision} has bert/ but no tokenizer/ for it")
        model = LDMBert.from_pretrained(os.path.join(folder, "bert"), dtype=dtype, device=device)
        return LDMBertEncoder(AutoTokenizer.from_pretrained(tok_dir), model).requires_grad_(False).eval()
    if os.path.isdir(os.path.join(folder, "text_encoder_2")):  # SDXL: CLIP-L + OpenCLIP bigG
        return SDXLTextEncoder.load(folder, dtype=dtype, device=device).requires_grad_(False).eval()
    enc_dir = os.path.join(folder, "text_encoder")
    missing = [d for d in (enc_dir, tok_dir) if not os.path.isdir(d)]
    if missing:
        raise MissingInput(f"{vision} has no native text encoder: missing {', '.join(missing)}")
    _, family = lm_source(enc_dir)
    kind = "dit" if os.path.isdir(os.path.join(folder, "transformer")) else "unet"
    enc = TextEncoder.load(enc_dir, recipe=family_recipe(family, kind), dtype=dtype, device=device,
                           tokenizer_path=tok_dir)
    return enc.requires_grad_(False).eval()


# -----------------------------------------------------------------------------
# the bridge: text encoder -> adapter -> vision model, with VAE and scheduler

@dataclass
class BridgeConfig:
    lm: str = "t5-large"        # LM_PRESETS name, hub id, local transformers folder, or "native"
    vision: str = "sd14"        # VISION_PRESETS name, pipeline folder, single file, shapes / shapes:PATH
    adapter: str = "text"       # text (LaVi-Bridge TextAdapter) | gluenet (GlueGen) | resampler
    # (OmniDiffusion) | tsc (ELLA) | none (equal widths)
    adapter_mid: int = 0        # 0: (in + out) // 2 as in every release
    adapter_dropout: float = 0.1
    lora_rank: int = 32         # 0: no LoRA at all
    lora_vision: bool = True    # LoRA in the vision model
    lora_lm: bool = True        # LoRA in the LM (forbids caching LM outputs)
    lora_dropout: float = 0.1
    max_length: int = 0         # 0: the recipe's token count
    glue_depth: int = 5         # GlueNet mixer blocks (GlueGen: 5); its token count is the LM's max_length
    glue_mult: int = 2          # GlueNet hidden width = mult * width (GlueGen: 2)
    audio_window: float = 30.0  # a speech encoder's input in seconds (Whisper's own: 30; the shapes world: 4)
    audio_pool: int = 1         # a speech encoder's hidden states averaged over this many tokens
    audio_stretch: bool = False  # ... and first each clip's own tokens resampled over the window
    pooled: str = "attn"        # SDXL's pooled text vector from the context: attn | mean (adapter.PooledHead)
    queries: int = 0            # resampler / tsc: output tokens (0: query_adapter_config's)
    adapter_layers: int = 0     # resampler: encoder = decoder layers; tsc: perceiver blocks (0: preset)
    adapter_width: int = 0      # resampler / tsc: the transformer's width (0: preset)


@dataclass(frozen=True)
class Sampling:
    """How a bridge samples unless told otherwise (sample.py's flags override each field)."""
    scheduler: str = "ddim"
    steps: int = 50
    guidance: float = 7.5
    prompt_suffix: str = ""     # appended to every positive prompt (never to the negative one)
    scheduler_overrides: tuple = ()  # (key, value) over the pipeline's scheduler config, for `scheduler`

    def but(self, scheduler=None, steps=None, guidance=None, prompt_suffix=None):
        """This recipe with the fields given (not None) replaced; another scheduler drops the overrides."""
        same = scheduler in (None, self.scheduler)
        return Sampling(self.scheduler if same else scheduler, steps or self.steps,
                        self.guidance if guidance is None else guidance,
                        self.prompt_suffix if prompt_suffix is None else prompt_suffix,
                        self.scheduler_overrides if same else ())


# LaVi-Bridge's test/*.py: diffusers 0.24's UniPC from the pipeline's scheduler folder (its last sigma is
# sigma(t=0), "sigma_min" in later diffusers), 50 steps, CFG 7.5, the suffix on the positive prompt
RELEASE_SAMPLING = Sampling("unipc", 50, 7.5, ", best quality, extremely detailed, 4k resolution",
                            (("final_sigmas_type", "sigma_min"),))
SHAPES_SAMPLING = Sampling("ddim", shapes.STEPS, shapes.GUIDANCE)
SDXL_SAMPLING = Sampling("euler", 50, 5.0)  # StableDiffusionXLPipeline's defaults (its Euler scheduler file)
# GlueGen's demos on SD v1.5 (CompVis samplers): the multilingual one PLMS (= PNDM without its Runge-Kutta
# start, as SD's scheduler config has it), the sound one DDIM (eta 0; its script forces it); 50 steps, CFG 7.5
GLUEGEN_SAMPLING = Sampling("pndm", 50, 7.5, "", (("skip_prk_steps", True),))
GLUEGEN_SOUND_SAMPLING = Sampling("ddim", 50, 7.5)


def fit_tokens(x, n):
    """Pad with zeros or truncate dim 1 of x (B, T, ...) to n tokens."""
    if x.shape[1] >= n:
        return x[:, :n]
    return torch.cat([x, x.new_zeros((x.shape[0], n - x.shape[1], *x.shape[2:]))], dim=1)  # (B, n, ...)


def upcast(x):
    """fp16/bf16 -> fp32 for losses and outputs; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class Bridge(nn.Module):
    """A language model bridged into a text-to-image diffusion model (LaVi-Bridge, arXiv 2403.07860)."""

    def __init__(self, cfg, text, adapter, denoiser, vae, scheduler_config, kind):
        super().__init__()
        self.cfg, self.kind, self.scheduler_config = cfg, kind, scheduler_config
        self.text, self.adapter, self.denoiser, self.vae = text, adapter, denoiser, vae
        self.lora_vis_paths, self.lora_text_paths = [], []
        self.native = None  # a speech bridge: the vision model's own text encoder (negative, mixed prompts)
        self.pooled = None  # a bridge into SDXL: its pooled text vector from the context (PooledHead)
        self.full_vision = False  # train.py --train-vision full: every vision weight trains (part "vision")
        self.train_sched = DDPM(scheduler_config)
        self.sampling = (SHAPES_SAMPLING if is_shapes(cfg.vision) else SDXL_SAMPLING if self.sdxl
                         else Sampling())

    @property
    def size_factor(self):
        """Image sizes must be multiples of this: the VAE's factor, times the DiT's patch."""
        return self.vae.downscale * (self.denoiser.cfg.patch_size if self.kind == "dit" else 1)

    @property
    def latent_channels(self):
        return self.denoiser.cfg.in_channels

    @property
    def context_width(self):
        cfg = self.denoiser.cfg
        return cfg.cross_attention_dim if self.kind == "unet" else cfg.caption_channels

    def merge_lora(self, unwrap=False):
        """Fold every LoRA into its base weight, for sampling at the speed of the plain model; unwrap=True
        also puts the plain layers back (no wrapper call per layer; no unmerge afterwards)."""
        for m in (self.denoiser, self.text.model):
            unwrap_lora(m) if unwrap else merge_lora(m)

    @property
    def timestep_aware(self):
        """The adapter reads the diffusion timestep (ELLA's TSC): it runs at every denoising step."""
        return isinstance(self.adapter, TSC)

    def lm_features(self, ids, mask):
        """The text encoder's part: ids, mask (B, T) -> (hidden (B, T, D_lm), the mask the vision model
        sees or None, SDXL's own pooled vector or None, the token mask (B, T))."""
        lm_trains = any(p.requires_grad for p in self.text.parameters())
        native_pooled = None
        with nullcontext() if lm_trains else torch.no_grad():
            if isinstance(self.text, SDXLTextEncoder):
                hidden, native_pooled = self.text.encode_pooled(ids)  # (B, 77, 2048), (B, 1280)
                vmask = None
            else:
                hidden, vmask = self.text(ids, mask)   # (B, T, D_lm)
        return hidden, vmask, native_pooled, mask

    def condition(self, feats, t=None, pooled=False):
        """The adapter's part: lm_features -> context (B, T', D_vision) and the vision mask or None;
        pooled=True (SDXL) also the pooled vector (B, P): the resampler's own head, the pooled head's, or
        with SDXL's own text path and no adapter, bigG's. t (B,): the timestep a TSC reads."""
        hidden, vmask, native_pooled, mask = feats
        own_pooled = None
        if isinstance(self.adapter, Resampler):  # queries: every output token is real
            (ctx, own_pooled), vmask = self.adapter(hidden, mask), None
        elif isinstance(self.adapter, TSC):
            if t is None:
                raise BadInput("this bridge's adapter (TSC) reads the diffusion timestep: give t")
            ctx, vmask = self.adapter(hidden, t, mask), None
        else:
            ctx = hidden if self.adapter is None else self.adapter(hidden)  # (B, T, D_vision)
        if isinstance(self.adapter, GlueNet):  # its token MLP mixes positions: no token mask survives it
            vmask = None
        if not pooled:
            return ctx, vmask
        if own_pooled is not None:
            return ctx, vmask, own_pooled
        if self.pooled is not None:
            return ctx, vmask, self.pooled(ctx, vmask)
        if native_pooled is None or self.adapter is not None:
            raise BadInput("SDXL takes a pooled text vector beside the context: this bridge has no pooled "
                           "head (build it with build_bridge on an SDXL vision model)")
        return ctx, vmask, native_pooled

    def encode_ids(self, ids, mask, pooled=False, t=None):
        """ids, mask (B, T) -> context (B, T', D_vision) and the mask the vision model sees (or None);
        pooled=True (SDXL) also the pooled text vector (B, P) (condition)."""
        return self.condition(self.lm_features(ids, mask), t, pooled)

    def features(self, prompts):
        """Prompts (a speech bridge: clips) -> lm_features, on the vision model's device."""
        ids, mask = self.text.tokenize(list(prompts))
        dev = next(self.denoiser.parameters()).device
        return self.lm_features(ids.to(dev), mask.to(dev))

    def encode_text(self, prompts, t=None):
        """Prompts (a speech bridge: clips) -> context (B, T', D_vision), vision mask or None."""
        return self.condition(self.features(prompts), t)

    def encode_native(self, prompts):
        """Prompts through the vision model's own text encoder (a speech bridge's negative prompt and the
        text it mixes in, as GlueGen takes both from CLIP), at the adapter's token count: (B, T, D), None."""
        dev = next(self.denoiser.parameters()).device
        ids, mask = self.native.tokenize(list(prompts))
        h, vmask = self.native(ids.to(dev), mask.to(dev))
        n = self.adapter.cfg.num_tokens if isinstance(self.adapter, GlueNet) else h.shape[1]
        return fit_tokens(h, n), None

    @torch.no_grad()
    def posterior(self, images):
        """images (B, 3, H, W) in [-1, 1] -> (mean, std) of the VAE posterior, unscaled (B, C, h, w):
        training samples latents = (mean + std * eps) * vae.cfg.scaling_factor from it, as the release."""
        mean, logvar = self.vae.encode(images)
        return mean, torch.exp(0.5 * logvar)

    @property
    def sdxl(self):
        """The vision model takes SDXL's added conditions (pooled text, size and crop ids)."""
        return self.kind == "unet" and self.denoiser.cfg.addition_embed_type == "text_time"

    @property
    def pooled_width(self):
        """The width of the pooled text vector an SDXL U-Net takes (1280)."""
        c = self.denoiser.cfg
        return c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim

    def decode(self, x):
        """Scaled latents -> images in [-1, 1]. SDXL's VAE overflows in fp16: as its pipeline does
        (force_upcast), an fp16 VAE decodes SDXL's latents in fp32 and goes back to fp16 after."""
        if not (self.sdxl and next(self.vae.parameters()).dtype == torch.float16):
            return self.vae.decode(x / self.vae.cfg.scaling_factor)
        try:
            return self.vae.float().decode(x.float() / self.vae.cfg.scaling_factor)
        finally:
            self.vae.half()

    def denoise(self, x, t, ctx, mask=None, added=None):
        """x (B, C, h, w), t (B,) -> the model output the scheduler expects (learned sigma dropped).
        added: SDXL's (pooled (B, P), time_ids (B, 6))."""
        if added is not None:
            out = self.denoiser(x, t, ctx, mask, text_embeds=added[0], time_ids=added[1])
        elif self.kind == "dit" and self.denoiser.cfg.micro_conditions:  # PixArt 1024-MS: size in pixels
            f = self.vae.downscale
            h, w = x.shape[-2] * f, x.shape[-1] * f
            res = torch.tensor([[h, w]], device=x.device, dtype=x.dtype).expand(x.shape[0], 2)  # (B, 2)
            ar = torch.tensor([[h / w]], device=x.device, dtype=x.dtype).expand(x.shape[0], 1)  # (B, 1)
            out = self.denoiser(x, t, ctx, mask, resolution=res, aspect_ratio=ar)
        else:
            out = self.denoiser(x, t, ctx, mask)
        return out[:, :x.shape[1]]  # PixArt: 8 channels, the last 4 are the learned variance

    def forward(self, latents, ids, mask, t, noise, time_ids=None, perturb=None):
        """The training loss, eps-MSE (v-MSE for v-prediction). latents, noise (B, C, h, w) (scaled
        latents), ids/mask (B, T), t (B,): drawn by the caller so that the step stays graph-only.
        SDXL: time_ids (B, 6), each image's original size, crop top-left and target size in pixels.
        perturb: input perturbation (the staged recipe's), added to the noise of the input only."""
        added = None
        if self.sdxl:
            if time_ids is None:
                raise BadInput("SDXL trains with each image's size and crop: pass time_ids (B, 6)")
            ctx, vmask, pooled = self.encode_ids(ids, mask, pooled=True, t=t)
            added = (pooled, time_ids.to(pooled.dtype))
        else:
            ctx, vmask = self.encode_ids(ids, mask, t=t)
        noised = self.train_sched.add_noise(latents, noise if perturb is None else noise + perturb, t)
        pred = self.denoise(noised, t, ctx, vmask, added)
        target = self.train_sched.target(latents, noise, t)
        return F.mse_loss(upcast(pred), upcast(target))

    @torch.no_grad()
    def sample(self, prompts, negative_prompt="", steps=None, guidance=None, height=None, width=None, seed=0,
               scheduler=None, prompt_suffix=None, progress=True, mix=None, mix_split=3, original_size=None,
               crop=(0, 0), target_size=None):
        """Images (B, H, W, 3) uint8 for a list of prompts, with classifier-free guidance. The sampler
        (a schedulers.SCHEDULERS name, built from the pipeline's scheduler config), steps, guidance and the
        suffix of the positive prompts are self.sampling's where not given. A speech bridge takes clips (WAV
        paths or 16 kHz arrays) as prompts and its negative prompt, text, through the vision model's own
        encoder (GlueGen: CLIP's ""); mix: one text per clip, mixed in by GlueGen's rule (gluegen_mix).
        SDXL: its micro-conditions original_size (h, w), crop (top, left) and target_size (h, w) in pixels,
        the sizes by default the image's, as its pipeline sets them."""
        recipe = self.sampling.but(scheduler, steps, guidance, prompt_suffix)
        steps, guidance = recipe.steps, recipe.guidance
        speech = self.native is not None
        prompts = list(prompts) if speech else [p + recipe.prompt_suffix for p in prompts]
        if not prompts:
            raise BadInput("no prompt to sample")
        if mix is not None and (not speech or len(mix) != len(prompts)):
            raise BadInput("mixing takes a speech bridge and one text for each clip")
        if not math.isfinite(guidance):
            raise BadInput(f"guidance {guidance}: must be a finite number")
        B = len(prompts)
        dev = next(self.denoiser.parameters()).device
        dtype = next(self.denoiser.parameters()).dtype
        f = self.vae.downscale
        height = height or self.denoiser.cfg.sample_size * f
        width = width or self.denoiser.cfg.sample_size * f
        if height % self.size_factor or width % self.size_factor or min(height, width) <= 0:
            raise BadInput(f"image size {height}x{width}: height and width must be positive multiples of "
                           f"{self.size_factor} for this model")
        # SDXL's own text path: an empty negative prompt is zeros, as its pipeline has it
        # (force_zeros_for_empty_prompt); a bridge encodes it, as it was trained (caption dropout)
        zero_negative = self.sdxl and negative_prompt == "" and isinstance(self.text, SDXLTextEncoder) \
            and self.adapter is None
        feats = self.features(prompts)  # the LM runs once; the adapter too, unless it reads t
        nfeats = None if speech or zero_negative else self.features([negative_prompt] * B)
        if self.sdxl:
            ids = [*(original_size or (height, width)), *crop, *(target_size or (height, width))]
            time_ids = torch.tensor([ids], device=dev, dtype=dtype).expand(2 * B, 6)

        def conditions(t=None):
            """(context (2B, T, D) [uncond, cond] as the official code, its mask or None, SDXL's added
            conditions or None) at timestep t (a TSC's; None for every other adapter)."""
            tb = None if t is None else torch.full((B,), t, device=dev)
            ctx, mask, *pooled = self.condition(feats, tb, pooled=self.sdxl)
            if mix is not None:
                ctx = gluegen_mix(ctx, self.encode_native(mix)[0].to(ctx.dtype), mix_split)
            if speech:
                (nctx, nmask), npooled = self.encode_native([negative_prompt] * B), []
            elif zero_negative:
                nctx, nmask, npooled = torch.zeros_like(ctx), None, [torch.zeros_like(pooled[0])]
            else:
                nctx, nmask, *npooled = self.condition(nfeats, tb, pooled=self.sdxl)
            if not (torch.isfinite(ctx).all() and torch.isfinite(nctx).all()):
                raise BadInput("the text features are not finite (NaN or inf): the language model or the "
                               "adapter gives them")
            added = (torch.cat([*npooled, *pooled]).to(dtype), time_ids) if self.sdxl else None
            return (torch.cat([nctx, ctx]).to(dtype), None if mask is None else torch.cat([nmask, mask]),
                    added)
        fixed = None if self.timestep_aware else conditions()
        # the initial noise exactly as diffusers draws it: float32 on a seeded CPU generator, then moved
        g = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn((B, self.latent_channels, height // f, width // f), generator=g, dtype=torch.float32)
        sched = make(recipe.scheduler, {**self.scheduler_config, **dict(recipe.scheduler_overrides)})
        ts, prev = sched.timesteps(steps).tolist(), sched.prev_timesteps(steps).tolist()
        x = (x * sched.init_noise_sigma).to(dev, dtype)  # 1 but for the sigma-space samplers (Euler)
        bar = tqdm(ts, desc="sampling", disable=not progress, leave=False)
        for i, (t, t_prev) in enumerate(zip(bar, prev)):
            tt = torch.full((2 * B,), t, device=dev)  # long, or float for Euler's (fractional) timesteps
            inp = sched.scale_input(torch.cat([x, x]), t)
            ctx2, mask2, added = fixed or conditions(t)
            out = self.denoise(inp, tt, ctx2, mask2, added)  # (2B, C, h, w)
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
            x = sched.step(out, x, t, t_prev, generator=g)
            if not torch.isfinite(x).all():  # one host sync a step: far below the cost of the step
                raise BadInput(f"the latents became non-finite (NaN or inf) at step {i + 1} (t={t}) of "
                               f"{len(ts)}: the vision model's weights, its dtype or the guidance")
        img = self.decode(x).float()
        img = (img / 2 + 0.5).clamp(0, 1)
        return (img.permute(0, 2, 3, 1) * 255).to(torch.uint8).cpu()  # truncation, as the official code


# -----------------------------------------------------------------------------
# building a bridge from its config


def build_bridge(cfg, dtype=torch.float32, device="cpu", pretrained=True, lm_dtype=None, adapter=None,
                 source=None, recipe=None):
    """Load the frozen text encoder and vision model, add the adapter and LoRA as cfg says. cfg.lm "native" is
    the vision model's own text encoder (CLIP for SD, T5 for PixArt, LDMBert for LDM, the word encoder of
    the shapes world). pretrained=False: the shapes base model freshly initialised (method base).
    lm_dtype: the LM's weights, LoRA and activations in that dtype (its hidden states leave it in fp32). None:
    the release's sampling recipe: where it ran the LM in fp16 (Llama-2), in fp16 on CUDA, and elsewhere in
    `dtype` on weights rounded through fp16; any other LM in `dtype`. adapter: a module already built (a
    released GlueNet) in place of cfg.adapter's fresh one; source: a source module in place of cfg.lm's
    (one that hears, as a speech encoder: its negative prompt goes through the native encoder); recipe: the
    LM's TextRecipe in place of its family's (a release's own, e.g. ELLA's)."""
    denoiser, vae, sched, kind = load_vision(cfg.vision, dtype, device, pretrained)
    speech = source is not None or is_audio(cfg.lm)
    if source is not None:
        text = source
    elif cfg.lm == "native":
        text = load_native_encoder(cfg.vision, dtype, device, pretrained)
    elif speech:
        text = AudioEncoder.load(cfg.lm, window=cfg.audio_window, dtype=dtype, device=device,
                                 pool=cfg.audio_pool, stretch=cfg.audio_stretch)
    else:
        recipe = recipe or recipe_for(cfg.lm, kind)
        if cfg.max_length:
            recipe = replace(recipe, max_length=cfg.max_length)
        if lm_dtype is None and recipe.round_weights_fp16 and torch.device(device).type == "cuda":
            lm_dtype = torch.float16
        if lm_dtype is not None:  # the LM really in that dtype: nothing to emulate
            recipe = replace(recipe, round_weights_fp16=False)
        text = TextEncoder.load(cfg.lm, recipe=recipe, dtype=lm_dtype or dtype, device=device)
    for m in (denoiser, vae, text):
        m.requires_grad_(False).eval()
    bridge = Bridge(cfg, text, None, denoiser, vae, sched, kind)
    if speech:
        if bridge.sdxl:
            raise BadInput("a speech encoder into SDXL is not supported: GlueGen's sound recipe is SD 1.x's")
        bridge.native = load_native_encoder(cfg.vision, dtype, device).requires_grad_(False).eval()
    d_in, d_out = text.width, bridge.context_width
    if adapter is not None:
        bridge.adapter = adapter
    elif cfg.adapter == "text":
        mid = cfg.adapter_mid or (d_in + d_out) // 2
        bridge.adapter = TextAdapter(d_in, mid, d_out, dropout=cfg.adapter_dropout)
    elif cfg.adapter == "gluenet":
        if text.token_count is None:
            raise BadInput("--adapter gluenet mixes a fixed number of tokens: "
                           "the LM recipe must pad to max_length")
        if speech and not cfg.max_length:
            raise BadInput("a speech GlueNet maps the encoder's tokens to the target's: set max_length")
        n, n_in = (cfg.max_length, text.token_count) if speech else (text.token_count, 0)
        bridge.adapter = GlueNet(GlueNetConfig(n, d_in, d_out, cfg.glue_mult, cfg.glue_depth, in_tokens=n_in))
    elif cfg.adapter in ("resampler", "tsc"):
        bridge.adapter = query_adapter(cfg, d_in, d_out, bridge.pooled_width if bridge.sdxl else 0,
                                       is_shapes(cfg.vision), kind)
    elif cfg.adapter != "none":
        raise BadInput(f"unknown adapter {cfg.adapter!r} (text, gluenet, resampler, tsc, none)")
    elif d_in != d_out:
        raise BadInput(f"--adapter none needs equal widths, but the LM gives {d_in} "
                       f"and the vision model takes {d_out}")
    if bridge.adapter is not None:
        bridge.adapter.to(device, dtype)
    if bridge.sdxl and not isinstance(text, SDXLTextEncoder) and not isinstance(bridge.adapter, Resampler):
        # a new text source: SDXL's pooled vector too (the resampler has its own head, as OmniDiffusion's)
        bridge.pooled = PooledHead(d_out, bridge.pooled_width, cfg.pooled).to(device, dtype)
    if cfg.lora_rank and cfg.lora_vision:
        bridge.lora_vis_paths = inject(denoiser, LORA_TARGETS[kind], cfg.lora_rank, dropout=cfg.lora_dropout)
    if cfg.lora_rank and cfg.lora_lm:
        if text.lora_targets is None:
            raise BadInput(f"no LoRA targets are known for the text encoder {cfg.lm!r}: pass "
                           f"--lora-lm false, or add its attention projections to lora.LORA_TARGETS "
                           f"and encoders.FAMILIES")
        bridge.lora_text_paths = inject(text.model, LORA_TARGETS[text.lora_targets], cfg.lora_rank,
                                        dropout=cfg.lora_dropout)
    return bridge


def query_adapter(cfg, d_in, d_out, pooled, shapes_world, kind):
    """A Resampler or TSC from d_in LM features to d_out context channels, sized:
    - resampler into SDXL: OmniDiffusion's published sizes (width 2048, 4 + 4 layers of 8 heads, feed-forward
      8192, the pooled head to 1280), but 77 queries, SDXL's native token count, where OmniDiffusion has 227
      (3 x 75 + 2: its stage-1 targets are three 77-token CLIP passes of long prompts, not here);
    - tsc into a 768-wide context (SD 1.x): ELLA's released sizes (width 768, 6 blocks of 8 heads, 64
      latents, timestep 320 -> 768);
    - elsewhere scaled: the context's width (at most 2048; wider contexts get 1024 and a projection out),
      2 layers (resampler: 2 + 2), the native token count as queries (77 U-Net, 120 DiT; the shapes world
      16 tokens of width 64: 4 heads);
    cfg.queries / adapter_layers / adapter_width override each."""
    width = cfg.adapter_width or (d_out if d_out <= 2048 else 1024)
    heads = 4 if shapes_world else 8
    out_dim = d_out if width != d_out else 0
    if cfg.adapter == "resampler":
        published = pooled == 1280 and d_out == 2048
        layers = cfg.adapter_layers or (4 if published else 2)
        rc = ResamplerConfig(in_dim=d_in, width=width, queries=cfg.queries or (16 if shapes_world else 120 if
                             kind == "dit" else 77), heads=heads, ff=4 * width, enc_layers=layers,
                             dec_layers=layers, pooled=pooled, out_dim=out_dim)
        return Resampler(rc)
    ella = d_out == 768 and not pooled
    tc = TSCConfig(in_dim=d_in, width=width, layers=cfg.adapter_layers or (6 if ella else 2), heads=heads,
                   latents=cfg.queries or (64 if ella else 16 if shapes_world else
                                           120 if kind == "dit" else 77),
                   time_channel=320, time_dim=768 if ella else width, out_dim=out_dim)
    return TSC(tc)


def native_bridge(vision, dtype=torch.float32, device="cpu"):
    """The vision model with its own text encoder, no adapter, no LoRA: the baseline a bridge is measured
    by."""
    cfg = BridgeConfig(lm="native", vision=vision, adapter="none", lora_rank=0)
    return build_bridge(cfg, dtype, device).eval()


# -----------------------------------------------------------------------------
# checkpoints: what a bridge trains, in one self-describing safetensors file

PARTS = ("adapter", "pooled", "vision", "lora_vis", "lora_text")  # of a bridge ("vision": --train-vision
# full); a whole base model: "unet", "text"


def trainable_tensors(bridge, whole=False):
    """{name: tensor} of what a bridge trains, the live tensors themselves: adapter.*, pooled.* (SDXL),
    lora_vis.*, lora_text.*; whole=True (the shapes base model trained from scratch): unet.* and text.*,
    every weight."""
    if whole:
        parts = {"unet": bridge.denoiser.state_dict(), "text": bridge.text.state_dict()}
    else:
        parts = {"adapter": bridge.adapter.state_dict() if bridge.adapter is not None else {},
                 "pooled": bridge.pooled.state_dict() if bridge.pooled is not None else {},
                 "vision": bridge.denoiser.state_dict() if bridge.full_vision else {},
                 "lora_vis": lora_state_dict(bridge.denoiser),
                 "lora_text": lora_state_dict(bridge.text.model)}
    return {f"{head}.{k}": v.detach() for head, sd in parts.items() for k, v in sd.items()}


def trainable_state_dict(bridge, whole=False):
    """What a checkpoint holds: trainable_tensors in float32."""
    return {k: v.float() for k, v in trainable_tensors(bridge, whole).items()}


def _split_parts(sd):
    """{head: {rest: tensor}} of a checkpoint's weights (ema.* and optim.* set aside by the caller)."""
    parts = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head not in PARTS + ("unet", "text"):
            raise BadInput(f"unexpected key {k!r} in a bridge checkpoint")
        parts.setdefault(head, {})[rest] = v
    return parts


def load_trainable(bridge, sd):
    """Strictly load what trainable_state_dict wrote into a built bridge: every part it has, no other."""
    parts = _split_parts(sd)
    if "unet" in parts or "text" in parts:  # a whole model
        load_strict(bridge.denoiser, parts.get("unet", {}), "U-Net")
        load_strict(bridge.text, parts.get("text", {}), "text encoder")
        return
    if bridge.adapter is not None:
        load_strict(bridge.adapter, parts.get("adapter", {}), "adapter")
    elif parts.get("adapter"):
        raise BadInput("the checkpoint has adapter weights but this bridge has no adapter")
    if parts.get("vision"):  # every vision weight, fine-tuned (--train-vision full)
        load_strict(bridge.denoiser, parts["vision"], "vision model")
    if bridge.pooled is not None:
        load_strict(bridge.pooled, parts.get("pooled", {}), "pooled head")
    elif parts.get("pooled"):
        raise BadInput("the checkpoint has a pooled head (SDXL's) but this bridge's vision model takes none")
    load_lora(bridge.denoiser, parts.get("lora_vis", {}))
    load_lora(bridge.text.model, parts.get("lora_text", {}))


def init_trainable(bridge, sd):
    """--init-from across methods: load each part of a checkpoint (adapter, lora_vis, lora_text) that this
    bridge also has, strictly; a part only one side has is left as built (an align or gluenet run has no
    LoRA; a lavi run may add it). Returns the names of the parts loaded."""
    parts = _split_parts({k: v for k, v in sd.items() if not k.startswith(("ema.", "optim."))})
    if "unet" in parts or "text" in parts:
        raise BadInput("this checkpoint is a whole shapes base model, not a bridge: pass it as "
                       "--vision shapes:PATH")
    loaded = []
    if "adapter" in parts and bridge.adapter is not None:
        try:
            load_strict(bridge.adapter, parts["adapter"], "adapter")
        except ValueError as e:
            kind = type(bridge.adapter).__name__
            raise BadInput(f"the checkpoint's adapter does not fit this bridge's {kind} (another "
                           f"--adapter, --lm or --vision?): {e}") from None
        loaded.append("adapter")
    if "pooled" in parts and bridge.pooled is not None:
        load_strict(bridge.pooled, parts["pooled"], "pooled head")
        loaded.append("pooled")
    if "vision" in parts and not bridge.lora_vis_paths:  # stage 3 from a full stage 2
        load_strict(bridge.denoiser, parts["vision"], "vision model")
        loaded.append("vision")
    for head, net, paths in (("lora_vis", bridge.denoiser, bridge.lora_vis_paths),
                             ("lora_text", bridge.text.model, bridge.lora_text_paths)):
        if head in parts and paths:
            load_lora(net, parts[head])
            loaded.append(head)
    return loaded


RELEASE_FILES = ("adapter", "lora_vis.pt", "lora_text.pt")
POOLED_FILE = "pooled_head.safetensors"  # beside them, in a release folder of a bridge into SDXL


def check_release_files(folder):
    """A LaVi-Bridge release folder has adapter/, lora_vis.pt and lora_text.pt."""
    missing = [n for n in RELEASE_FILES if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise MissingInput(f"{folder} is not a LaVi-Bridge release folder: missing {', '.join(missing)}")


def read_release(folder):
    """(vision LoRA list, LM LoRA list, their rank) of a LaVi-Bridge release folder (adapter/, lora_vis.pt,
    lora_text.pt: flat lists [up_0, down_0, ...] in the release's module-walk order), checked before any model
    is loaded: the files are there, and every LoRA pair has the one rank."""
    check_release_files(folder)
    lists = [load_release_file(os.path.join(folder, n)) for n in RELEASE_FILES[1:]]
    for name, lst in zip(RELEASE_FILES[1:], lists):
        check_finite({f"item {i}": t for i, t in enumerate(lst)}, os.path.join(folder, name))
    ranks = {up.shape[1] for lst in lists for up in lst[::2] if up.dim() >= 2}
    if len(ranks) > 1:
        raise BadInput(f"{folder}: its LoRA lists mix ranks {sorted(ranks)}")
    return lists[0], lists[1], ranks.pop() if ranks else 0


def load_release(bridge, folder, lists=None):
    """Load a release folder's adapter and LoRA lists (read_release's, or read here) into a built bridge."""
    vis_list, text_list, _ = lists or read_release(folder)
    adapter = TextAdapter.from_pretrained(os.path.join(folder, "adapter"))
    check_finite(adapter.state_dict(), os.path.join(folder, "adapter"))
    mine = bridge.adapter
    if mine is None or (adapter.in_dim, adapter.out_dim) != (mine.in_dim, mine.out_dim):
        raise BadInput(f"the release adapter maps {adapter.in_dim} -> {adapter.out_dim}, but this LM gives "
                       f"{bridge.text.width} and the vision model takes "
                       f"{mine.out_dim if mine is not None else '(no adapter)'}: wrong --lm or --vision?")
    if adapter.mid_dim != mine.mid_dim:  # the release's own middle width wins
        p = next(mine.parameters())
        bridge.adapter = mine = TextAdapter(adapter.in_dim, adapter.mid_dim, adapter.out_dim,
                                            dropout=bridge.cfg.adapter_dropout).to(p.device, p.dtype)
    load_strict(mine, adapter.state_dict(), "adapter")
    import_release_list(bridge.denoiser, vis_list, bridge.lora_vis_paths)
    import_release_list(bridge.text.model, text_list, bridge.lora_text_paths)
    pooled = os.path.join(folder, POOLED_FILE)
    if bridge.pooled is not None:  # ours on SDXL: the release format has no pooled vector of its own
        if not os.path.isfile(pooled):
            raise MissingInput(f"{folder} has no {POOLED_FILE}: SDXL takes a pooled text vector, and this "
                               f"release was made for a vision model without one")
        load_strict(bridge.pooled, read_safetensors(pooled, "pooled head")[0], "pooled head")
    elif os.path.exists(pooled):
        raise BadInput(f"{folder} has a {POOLED_FILE} (an SDXL bridge) but this vision model takes no "
                       f"pooled vector: wrong --vision?")


def export_release(bridge, folder):
    """Write a bridge in the release's format, for the official scripts and anything else that reads it:
    adapter/ (config.json with the release's field names + diffusion_pytorch_model.safetensors) and
    lora_vis.pt / lora_text.pt, fp16 lists [up_0, down_0, ...] in the release's module-walk order; a bridge
    into SDXL adds its pooled head as pooled_head.safetensors (the release format has none)."""
    if not isinstance(bridge.adapter, TextAdapter):
        raise BadInput("the release format holds a TextAdapter bridge (adapter text), not "
                       f"{type(bridge.adapter).__name__ if bridge.adapter is not None else 'no adapter'}")
    bridge.adapter.save_pretrained(os.path.join(folder, "adapter"))
    for name, net, paths in (("lora_vis.pt", bridge.denoiser, bridge.lora_vis_paths),
                             ("lora_text.pt", bridge.text.model, bridge.lora_text_paths)):
        path = os.path.join(folder, name)
        torch.save(export_release_list(net, paths), path + ".tmp")  # the release's own format: a tensor list
        os.replace(path + ".tmp", path)
    if bridge.pooled is not None:
        save_safetensors(bridge.pooled.state_dict(), os.path.join(folder, POOLED_FILE))


def save_checkpoint(path, bridge, step, train_args=None, optimizer=None, extra=None, whole=False, log=None,
                    gather=None, write=True):
    """{trainable weights, optimizer state, config, step} in one safetensors file, written atomically.
    extra: more tensors to keep (train.py's EMA weights, as ema.<name>); log: train.py's [(step, loss,
    grad norm)] so far. gather: each tensor (weights, optimizer state) through it first (train.py --fsdp:
    the whole tensor of a shard, a collective every rank runs); write=False: gather only (the other ranks)."""
    g = gather or (lambda t: t)
    tensors = {k: g(v).float() for k, v in trainable_tensors(bridge, whole).items()}
    tensors.update(extra or {})
    meta = {"bridge": json.dumps(asdict(bridge.cfg)), "step": str(step),
            "train_args": json.dumps(train_args or {}), "log": json.dumps(log or [])}
    if optimizer is not None:
        state = optimizer.state_dict()
        state = {**state, "state": {i: {k: g(v) if torch.is_tensor(v) else v for k, v in s.items()}
                                    for i, s in state["state"].items()}}
        opt, groups = optimizer_tensors(state)
        tensors.update(opt)
        meta["optim_groups"] = json.dumps(groups)
    if write:
        save_safetensors(tensors, path, meta)


def read_checkpoint(path):
    """(trainable weights, optimizer state or None, BridgeConfig, step, train_args) of a checkpoint file;
    its training log is read_log(path)."""
    tensors, meta = read_safetensors(path, "checkpoint")
    if "bridge" not in meta:
        raise BadInput(f"{path} is not a bridge checkpoint written by train.py (no 'bridge' metadata)")
    weights = {k: v for k, v in tensors.items() if not k.startswith("optim.")}  # ema.* included
    check_finite(weights, path)
    try:
        optim = None
        if "optim_groups" in meta:
            optim = optimizer_state({k: v for k, v in tensors.items() if k.startswith("optim.")},
                                    json.loads(meta["optim_groups"]))
        cfg = BridgeConfig(**json.loads(meta["bridge"]))
        return weights, optim, cfg, int(meta["step"]), json.loads(meta["train_args"])
    except (KeyError, TypeError, ValueError) as e:
        raise BadInput(f"{path}: its train.py metadata does not read ({e!r})") from None


def checkpoint_config(path):
    """(BridgeConfig, step) of a checkpoint from its header alone: the check before anything loads."""
    meta = read_safetensors_metadata(path, "checkpoint")
    try:
        return BridgeConfig(**json.loads(meta["bridge"])), int(meta["step"])
    except (KeyError, TypeError, ValueError) as e:
        raise BadInput(f"{path} is not a bridge checkpoint written by train.py (metadata: {e!r})") from None


def read_log(path):
    """The [(step, loss, grad norm)] train.py logged up to a checkpoint."""
    return [tuple(r) for r in json.loads(read_safetensors(path, "checkpoint")[1].get("log", "[]"))]


def load_bridge(path, dtype=torch.float32, device="cpu", use_ema=True, merge=False, lm_dtype=None,
                **overrides):
    """A bridge from a train.py checkpoint file (its EMA weights when it has them and use_ema), or from a
    LaVi-Bridge release folder plus overrides (lm, vision; the LoRA rank is its files', lora_rank may only
    repeat it), which then samples with the release's recipe (bridge.sampling). merge=True folds the LoRA into
    the plain layers (sampling); else the LoRA wrappers stay, unmerged."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if is_ella_release(path):
        return load_ella(path, dtype=dtype, device=device, lm_dtype=lm_dtype, **overrides)
    if is_gluegen_release(path):
        return load_gluegen(path, dtype=dtype, device=device, lm_dtype=lm_dtype, **overrides)
    if os.path.isdir(path):
        lists = read_release(path)
        rank = overrides.pop("lora_rank", lists[2])
        if rank != lists[2]:
            raise BadInput(f"--lora-rank {rank} does not match the release's LoRA lists (file rank "
                           f"{lists[2]}, injected rank {rank}): leave --lora-rank out")
        bridge = build_bridge(BridgeConfig(**overrides, lora_rank=rank), dtype, device, lm_dtype=lm_dtype)
        load_release(bridge, path, lists)
        if not bridge.sdxl:  # SDXL keeps its pipeline's (the release's are SD's)
            bridge.sampling = RELEASE_SAMPLING
    else:
        weights, _, cfg, _, _ = read_checkpoint(path)
        bridge = build_bridge(replace(cfg, **overrides), dtype, device, lm_dtype=lm_dtype)
        ema = {k[4:]: v for k, v in weights.items() if k.startswith("ema.")}
        plain = {k: v for k, v in weights.items() if not k.startswith("ema.")}
        load_trainable(bridge, ema if ema and use_ema else plain)
    if merge:
        bridge.merge_lora(unwrap=True)
    return bridge.eval()


# ELLA's released SD 1.5 connector (TencentQQGYLab/ELLA inference.py, fixed mode): flan-t5-xl on 128 padded
# tokens with the mask to T5 but not to the connector, T5 in fp16 (its README: it must be); DPM-Solver++ from
# the SD 1.5 scheduler file, 50 steps, CFG 12
ELLA_T5 = TextRecipe(128, mask_to_lm=True, round_weights_fp16=True)
ELLA_SAMPLING = Sampling("dpmsolver", 50, 12.0)


def is_ella_release(path):
    """ELLA's released connector: a safetensors file of its names (connector.latents, time_embedding.*)."""
    if not (os.path.isfile(path) and path.endswith(".safetensors")):
        return False
    names = set(tensor_names(path, "ELLA connector"))
    return "connector.latents" in names and "time_embedding.linear_1.weight" in names


def tsc_from_ella(path):
    """A TSC of an ELLA file's sizes (from its shapes; 8 heads, ELLA's, are not in them), its tensors loaded
    strictly, attending to every token as ELLA's fixed mode does."""
    sd = read_safetensors(path, "ELLA connector")[0]
    check_finite(sd, path)
    try:
        lat, t1 = sd["connector.latents"], sd["time_embedding.linear_1.weight"]
        blocks = [int(k.split(".")[2]) for k in sd if k.startswith("connector.perceiver_blocks.")]
        proj_out = sd.get("connector.proj_out.0.weight")
        cfg = TSCConfig(in_dim=sd["connector.proj_in.weight"].shape[1], width=lat.shape[1],
                        layers=1 + max(blocks), heads=8, latents=lat.shape[0], time_channel=t1.shape[1],
                        time_dim=t1.shape[0], out_dim=0 if proj_out is None else proj_out.shape[0],
                        masked=False)
    except (KeyError, ValueError, IndexError) as e:
        raise BadInput(f"{path}: not a complete ELLA connector (lacks {e})") from None
    with torch.device("meta"):
        tsc = TSC(cfg)
    return load_strict(tsc, sd, f"ELLA connector {path}")


def load_ella(path, lm="google/flan-t5-xl", vision="sd15", dtype=torch.float32, device="cpu", lm_dtype=None,
              **unused):
    """ELLA's released connector (ella-sd1.5-tsc-t5xl.safetensors) between flan-t5-xl and SD 1.5, sampling
    as its inference script does (ELLA_T5, ELLA_SAMPLING; the negative prompt through T5 and the connector at
    every step); the widths are checked against both models."""
    if unused.get("lora_rank"):
        raise BadInput("an ELLA release has no LoRA: leave --lora-rank out")
    tsc = tsc_from_ella(path)
    cfg = BridgeConfig(lm=lm or "google/flan-t5-xl", vision=vision or "sd15", adapter="tsc", lora_rank=0)
    bridge = build_bridge(cfg, dtype, device, lm_dtype=lm_dtype, adapter=tsc.to(device, dtype),
                          recipe=ELLA_T5)
    out = tsc.cfg.out_dim or tsc.cfg.width
    if (bridge.text.width, bridge.context_width) != (tsc.cfg.in_dim, out):
        raise BadInput(f"{path} maps width {tsc.cfg.in_dim} to {out}; {cfg.lm} gives {bridge.text.width} and "
                       f"{cfg.vision} takes {bridge.context_width}")
    bridge.sampling = ELLA_SAMPLING
    return bridge.eval()


def is_gluegen_release(path):
    """A released GlueGen GlueNet is a torch file (.ckpt), where a train.py checkpoint is a .safetensors."""
    return os.path.isfile(path) and not path.endswith(".safetensors")


def load_gluegen(path, lm=None, vision="sd15", dtype=torch.float32, device="cpu", lm_dtype=None, **unused):
    """A released multilingual GlueNet (gluenet_<Language>_clip_overnorm_over3_noln.ckpt) between its source
    LM (xlm-roberta-large: 77 tokens, the mask to XLM-R, features / 3) and the SD v1.5 pipeline it targets,
    sampling as GlueGen's demo does (GLUEGEN_SAMPLING; the negative prompt through the same GlueNet): the
    file's shapes are checked against both models before they are used."""
    if unused.get("lora_rank"):
        raise BadInput("a GlueGen release has no LoRA: leave --lora-rank out")
    glue = GlueNet.from_gluegen(path)
    c = glue.cfg
    sound = bool(c.in_tokens)  # the sound GlueNet: AudioCLIP embeddings in, computed elsewhere
    if not lm and not sound:
        raise BadInput(f"{path} is a GlueGen release: pass --lm (its source LM, e.g. xlm-roberta-large)")
    cfg = BridgeConfig(lm=AUDIOCLIP if sound else lm, vision=vision, adapter="gluenet", lora_rank=0,
                       max_length=c.num_tokens, glue_depth=c.depth, glue_mult=c.mult)
    source = AudioCLIPEmbedding(c.in_tokens, c.in_dim) if sound else None
    bridge = build_bridge(cfg, dtype, device, lm_dtype=lm_dtype, adapter=glue.to(device, dtype),
                          source=source)
    text, n_in = bridge.text, glue.in_tokens
    if (text.width, bridge.context_width, text.token_count) != (c.in_dim, c.out_dim, n_in):
        raise BadInput(f"{path} maps {n_in} tokens of width {c.in_dim} to width {c.out_dim}; {cfg.lm} gives "
                       f"{text.token_count} tokens of width {text.width} and {vision} takes width "
                       f"{bridge.context_width}")
    bridge.sampling = GLUEGEN_SOUND_SAMPLING if sound else GLUEGEN_SAMPLING
    return bridge.eval()


AUDIOCLIP = "audioclip-embedding"  # the source name of a GlueGen sound bridge


class AudioCLIPEmbedding(nn.Module):
    """The source of GlueGen's sound GlueNet, whose encoder is not here (AudioCLIP's ESResNeXt-fbsp audio
    head is in no package this repository uses): each prompt is a file of one clip's AudioCLIP audio
    embedding, computed elsewhere: 1024 values, L2-normalised as AudioCLIP returns them, in a .npy or a
    one-tensor .safetensors / .pt; reshaped to (16, 64) tokens as GlueGen's FrozenAudioCLIPEmbedder does.
    encoders.TextEncoder's interface; nothing trains."""
    lora_targets, causal = None, False

    def __init__(self, tokens=16, dim=64):
        super().__init__()
        self.model, self.tokens, self.width = nn.Identity(), tokens, dim

    @property
    def token_count(self):
        return self.tokens

    def read(self, path):
        """One embedding file -> (tokens, width) float32, or a clear error."""
        import numpy as np
        if not os.path.isfile(path):
            raise MissingInput(f"AudioCLIP embedding not found: {path}")
        try:
            x = torch.from_numpy(np.load(path, allow_pickle=False)) if path.endswith(".npy") else None
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read {path} as a .npy array: {e}") from None
        if x is None:
            tensors = list(load_weights(path).values())
            if len(tensors) != 1:
                raise BadInput(f"{path}: {len(tensors)} tensors, one AudioCLIP embedding expected")
            x = tensors[0]
        x = x.float().flatten()
        n = self.tokens * self.width
        if x.numel() != n or not torch.isfinite(x).all() or abs(x.norm().item() - 1) > 1e-3:
            raise BadInput(f"{path}: an AudioCLIP audio embedding is {n} finite values of L2 norm 1; this "
                           f"has {x.numel()} values of norm {x.norm().item():.4g}")
        return x.reshape(self.tokens, self.width)

    def tokenize(self, paths):
        paths = [paths] if isinstance(paths, str) else list(paths)
        x = torch.stack([self.read(p) for p in paths])  # (B, tokens, width)
        return x, torch.ones(len(paths), self.tokens, dtype=torch.long)

    def forward(self, x, mask):
        return x.float(), None


# -----------------------------------------------------------------------------
# where a bridge runs: the command lines' device and dtype

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_and_dtype(device=None, dtype="fp32"):
    """(torch.device, torch.dtype) of the --device / --dtype flags: CUDA when there is one, and bf16/fp16
    only there (a CPU emulates them, hundreds of times slower)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype in ("bf16", "fp16") and device.type != "cuda":
        raise BadInput(f"--dtype {dtype} is for CUDA; on {device.type} use --dtype fp32")
    return device, DTYPES[dtype]
