"""
Noise schedulers: the discrete forward process of DDPM and the DDIM, DDPM and DPM-Solver++(2M) samplers,
each built from a pipeline's scheduler_config.json exactly as diffusers' DDIMScheduler / DDPMScheduler /
DPMSolverMultistepScheduler `.from_config` reads it (a key missing from the file takes the class default,
keys of other classes are ignored). The schedule is computed once as tensors; every sampler has
timesteps(n), prev_timesteps(n) and step(model_output, x, t, t_prev, generator).
"""
import json
import os

import numpy as np
import torch


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
                raise ValueError(f"{type(self).__name__}: scheduler option {k}={config[k]!r} is not "
                                 f"supported (only {default!r})")
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
    DEFAULTS = dict(NoiseSchedule.DEFAULTS, clip_sample=True, clip_sample_range=1.0,
                    variance_type="fixed_small")

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

# -----------------------------------------------------------------------------
# the scheduler configs of the official pipelines, for checkpoints that come without one

# CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json (a PNDMScheduler file)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                    skip_prk_steps=True, prediction_type="epsilon")
# PixArt-alpha/PixArt-XL-2-512x512 scheduler/scheduler_config.json (DPMSolverMultistepScheduler defaults)
PIXART_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        timestep_spacing="linspace", steps_offset=0, prediction_type="epsilon",
                        solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                        lower_order_final=True)
# CompVis/ldm-text2im-large-256 scheduler/scheduler_config.json (a DDIMScheduler file): the SD betas and
# clip_sample false; the keys it does not name (set_alpha_to_one, steps_offset, timestep_spacing) take
# DDIMScheduler's defaults (True, 0, leading)
LDM_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", clip_sample=False)
