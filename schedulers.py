"""
Noise schedulers: the discrete forward process of DDPM and the DDIM, DDPM, DPM-Solver++(2M), UniPC,
PNDM and EulerDiscrete samplers, each built by make(name, config) from a pipeline's scheduler_config.json
exactly as diffusers' `.from_config` of the matching class reads it (a key missing from the file takes the
class default, keys of other classes are ignored, some values are remapped). The schedule is computed once
as tensors; every sampler has timesteps(n), prev_timesteps(n) and step(model_output, x, t, t_prev,
generator), and the loop's hooks init_noise_sigma and scale_input(x, t) (identities but for Euler's).
"""
import json
import os

import numpy as np
import torch

from model_io import BadInput, MissingInput


class NoiseSchedule:
    """The discrete forward process of DDPM (Ho et al. 2020) as diffusers builds it from a
    scheduler_config.json: betas, alphas_cumprod, add_noise, the v / eps training targets.
    DDIM, DDPM and DPMSolver below add timesteps() and step(); their DEFAULTS are the diffusers
    class defaults for the keys they read (a key missing from the file takes the class default)."""
    DEFAULTS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                    prediction_type="epsilon", timestep_spacing="leading", steps_offset=0)
    # options we do not implement: accepted only at their default value, else a clear error
    UNSUPPORTED = dict(trained_betas=None, thresholding=False, rescale_betas_zero_snr=False)

    REMAP = {}  # key -> {value: value}: diffusers' own re-registration of another class's values

    def __init__(self, config=None):
        config = dict(config or {})
        for k in config.pop("_use_default_values", None) or []:  # an in-memory config's class defaults
            config.pop(k, None)
        for k, table in self.REMAP.items():
            if config.get(k) in table:
                config[k] = table[config[k]]
        for k, default in self.UNSUPPORTED.items():
            if config.get(k, default) != default:
                raise BadInput(f"{type(self).__name__}: scheduler option {k}={config[k]!r} is not "
                               f"supported (only {default!r})")
        c = {k: config.get(k, v) for k, v in self.DEFAULTS.items()}  # unknown keys are ignored
        self.config = c
        n, b0, b1 = c["num_train_timesteps"], c["beta_start"], c["beta_end"]
        if c["beta_schedule"] == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float32)
        elif c["beta_schedule"] == "scaled_linear":  # the LDM / SD schedule
            betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float32) ** 2
        else:
            raise BadInput(f"beta_schedule {c['beta_schedule']!r} is not supported (linear, scaled_linear)")
        if c["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
            raise BadInput(f"prediction_type {c['prediction_type']!r} is not supported "
                           f"(epsilon, v_prediction, sample)")
        if c["timestep_spacing"] not in ("leading", "linspace", "trailing"):
            raise BadInput(f"timestep_spacing {c['timestep_spacing']!r} is not supported "
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
            raise MissingInput(f"scheduler config not found: {path}")
        with open(path) as f:
            return cls(json.load(f))

    def reset(self):
        """Forget per-trajectory state (only multistep solvers keep any)."""

    # the sampling loop's two hooks, identities but for the sigma-space samplers (EulerDiscrete):
    init_noise_sigma = 1.0  # the initial noise is drawn N(0, 1) and multiplied by this

    def scale_input(self, x, t):
        """The model's input at timestep t (diffusers' scale_model_input)."""
        return x

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
            raise BadInput(f"number of sampling steps must be in 1..{N}, got {n}")
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
            raise BadInput(f"DDPM: variance_type {vt!r} is not supported (fixed_small, fixed_large)")

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
    Multistep: it keeps the previous step's x0 prediction; timesteps(n) or reset() starts a trajectory."""
    REMAP = {"solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"},
             "algorithm_type": {"deis": "dpmsolver++"}}
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
        self.reset()
        N, c = self.num_train_timesteps, self.config
        if not 0 < n <= N:
            raise BadInput(f"number of sampling steps must be in 1..{N}, got {n}")
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


def _alpha_sigma(sigma):
    """(sqrt(a), sqrt(1 - a)) of a VE sigma = sqrt((1 - a) / a), as diffusers computes them."""
    alpha = 1 / ((sigma ** 2 + 1) ** 0.5)
    return alpha, sigma * alpha


class UniPC(DPMSolver):
    """UniPC multistep (Zhao et al. 2023): a predictor, and a corrector on every step but the first, of
    orders 1-3 with the B(h) of bh1 or bh2, on x0 predictions; as diffusers' UniPCMultistepScheduler
    (lower_order_final, disable_corrector, final_sigmas_type). final_sigmas_type "zero" ends on the x0
    prediction; "sigma_min" ends at sigma(t=0), as every diffusers before 0.28 did (the LaVi-Bridge
    release's 0.24 among them).
    Multistep: timesteps(n) starts a trajectory; the steps then follow its timesteps in order."""
    DEFAULTS = dict(NoiseSchedule.DEFAULTS, timestep_spacing="linspace", solver_order=2, solver_type="bh2",
                    lower_order_final=True, disable_corrector=(), final_sigmas_type="zero")
    UNSUPPORTED = dict(NoiseSchedule.UNSUPPORTED, predict_x0=True, solver_p=None, use_karras_sigmas=False,
                       use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False,
                       use_dynamic_shifting=False)
    REMAP = {"solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}}

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        if c["solver_order"] not in (1, 2, 3) or c["solver_type"] not in ("bh1", "bh2"):
            raise BadInput(f"UniPC: solver_order {c['solver_order']!r} / solver_type "
                           f"{c['solver_type']!r} are not supported (1, 2, 3 / bh1, bh2)")
        if c["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise BadInput(f"UniPC: final_sigmas_type {c['final_sigmas_type']!r} (zero or sigma_min)")
        a0 = self.alphas_cumprod[0]
        sigma_min = c["final_sigmas_type"] == "sigma_min"
        self.sigma_last = ((1 - a0) / a0) ** 0.5 if sigma_min else torch.tensor(0.0)
        self._n = None

    def reset(self):
        self._hist, self._last_sample, self._order, self._warm, self._i = [], None, 1, 0, 0

    def timesteps(self, n):
        ts = super().timesteps(n)
        self._n = len(ts)
        return ts

    def _x0(self, out, x, sigma):
        alpha, s = _alpha_sigma(sigma)
        if self.prediction_type == "epsilon":
            return (x - s * out) / alpha
        if self.prediction_type == "v_prediction":
            return alpha * x - s * out
        return out

    def _update(self, x, sigma_to, order, m_new=None):
        """From the newest history entry (sigma_s0, m0) to sigma_to, with the order - 1 entries before it:
        the predictor, or with m_new (the model's x0 at sigma_to) the corrector."""
        dev = x.device
        sigma_s0, m0 = self._hist[-1]
        alpha_t, sigma_t = _alpha_sigma(sigma_to.to(dev))
        alpha_s0, sigma_s0 = _alpha_sigma(sigma_s0.to(dev))
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = torch.log(alpha_t) - torch.log(sigma_t) - lambda_s0
        rks, d1s = [], []
        for k in range(1, order):
            sigma_k, m_k = self._hist[-(k + 1)]
            alpha_k, s_k = _alpha_sigma(sigma_k.to(dev))
            rk = (torch.log(alpha_k) - torch.log(s_k) - lambda_s0) / h
            rks.append(rk)
            d1s.append((m_k - m0) / rk)
        rks = torch.stack(rks + [torch.ones((), device=dev)])
        hh = -h  # x0 prediction
        h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
        h_phi_k, factorial = h_phi_1 / hh - 1, 1
        b_h = hh if self.config["solver_type"] == "bh1" else torch.expm1(hh)
        rows, b = [], []
        for j in range(1, order + 1):
            rows.append(torch.pow(rks, j - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= j + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        rows, b = torch.stack(rows), torch.stack(b)  # (order, order), (order,)
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        d1s = torch.stack(d1s, dim=1) if d1s else None  # (B, order - 1, C, H, W)
        if m_new is None:  # predictor
            if d1s is None:
                return x_t.to(x.dtype)
            rhos = torch.ones(1, dtype=x.dtype, device=dev) * 0.5 if order == 2 else \
                torch.linalg.solve(rows[:-1, :-1], b[:-1]).to(dev).to(x.dtype)
            return (x_t - alpha_t * b_h * torch.einsum("k,bkc...->bc...", rhos, d1s)).to(x.dtype)
        rhos = torch.ones(1, dtype=x.dtype, device=dev) * 0.5 if order == 1 else \
            torch.linalg.solve(rows, b).to(dev).to(x.dtype)
        res = torch.einsum("k,bkc...->bc...", rhos[:-1], d1s) if d1s is not None else 0
        return (x_t - alpha_t * b_h * (res + rhos[-1] * (m_new - m0))).to(x.dtype)

    def step(self, model_output, x, t, t_prev, generator=None):
        """One UniPC step at timestep t of the trajectory timesteps(n) started, to t_prev (< 0: the end):
        the corrector for the previous step with this model output, then the predictor."""
        c, t, t_prev = self.config, int(t), int(t_prev)
        sigma = self.sigmas[t]
        m = self._x0(model_output, x, sigma.to(x.device))
        if self._i > 0 and self._i - 1 not in c["disable_corrector"] and self._last_sample is not None:
            x = self._update(self._last_sample, sigma, self._order, m_new=m)
        self._hist = (self._hist + [(sigma, m)])[-c["solver_order"]:]
        order = c["solver_order"]
        if c["lower_order_final"] and self._n is not None:
            order = min(order, self._n - self._i)
        self._order = min(order, self._warm + 1)  # warm-up: order k needs k - 1 earlier steps
        self._last_sample = x
        out = self._update(x, self.sigmas[t_prev] if t_prev >= 0 else self.sigma_last, self._order)
        self._warm = min(self._warm + 1, c["solver_order"])
        self._i += 1
        return out


class PNDM(NoiseSchedule):
    """PNDM (Liu et al. 2022), as diffusers' PNDMScheduler: with skip_prk_steps (SD1.4's file) PLMS, a
    Heun-like start then linear multistep of orders 2-4 on the noise predictions (CompVis' PLMS, which
    GlueGen's demos run, takes the same steps); without, 3 pseudo Runge-Kutta steps (4 calls each) first.
    The transfer is PNDM's eq. 9 (= a DDIM step). Multistep: timesteps(n) starts a trajectory, whose n + 1
    (PLMS) or n + 9 (PRK) entries the steps follow in order; step() takes t_prev from its own counter."""
    DEFAULTS = dict(NoiseSchedule.DEFAULTS, skip_prk_steps=False, set_alpha_to_one=False)

    def __init__(self, config=None):
        super().__init__(config)
        if self.prediction_type == "sample":
            raise BadInput("PNDM: prediction_type 'sample' is not supported (epsilon, v_prediction)")
        one = self.config["set_alpha_to_one"]
        self.final_alpha_cumprod = torch.tensor(1.0) if one else self.alphas_cumprod[0]
        self._n, self._prk = None, 0

    def reset(self):
        self._counter, self._ets, self._cur_out, self._cur_sample = 0, [], 0, None

    def _base(self, n):
        """The n timesteps, ascending, of PNDMScheduler.set_timesteps(n) before PRK / PLMS arrange them."""
        N, c = self.num_train_timesteps, self.config
        if not 0 < n <= N:
            raise BadInput(f"number of sampling steps must be in 1..{N}, got {n}")
        if c["timestep_spacing"] == "linspace":
            return np.linspace(0, N - 1, n).round().astype(np.int64)
        if c["timestep_spacing"] == "leading":
            return (np.arange(n) * (N // n)).round() + c["steps_offset"]
        return np.round(np.arange(N, 0, -N / n))[::-1].astype(np.int64) - 1

    def timesteps(self, n):
        self.reset()
        base, self._n = self._base(n), n
        if self.config["skip_prk_steps"]:
            prk, plms = np.array([]), np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            half = self.num_train_timesteps // n // 2
            prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, half]), 4)
            prk, plms = prk[:-1].repeat(2)[1:-1][::-1], base[:-3][::-1]
        self._prk_ts, self._prk = prk, len(prk)
        return torch.from_numpy(np.concatenate([prk, plms]).astype(np.int64))

    def prev_timesteps(self, n):
        """The timestep each entry of timesteps(n) steps to (PRK half steps; PLMS t - 1000 // n, the repeated
        second entry restarting from the first), -1 or below at the clean end."""
        ts, d = self.timesteps(n).tolist(), self.num_train_timesteps // n
        prev = []
        for i, t in enumerate(ts):
            if i < self._prk:
                prev.append(t - (0 if i % 2 else d // 2))
            else:
                prev.append(t if i - self._prk == 1 and self.config["skip_prk_steps"] else t - d)
        self.reset()
        return torch.tensor(prev)

    def _transfer(self, x, t, t_prev, e):
        """PNDM eq. 9: x_t -> x_{t_prev} with the noise estimate e (v converted at t)."""
        ac = self._ac(x.device)
        a_t = ac[t]
        a_prev = ac[t_prev] if t_prev >= 0 else self.final_alpha_cumprod.to(x.device)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.prediction_type == "v_prediction":
            e = a_t ** 0.5 * e + b_t ** 0.5 * x
        denom = a_t * b_prev ** 0.5 + (a_t * b_t * a_prev) ** 0.5
        return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * e / denom

    def step(self, model_output, x, t, t_prev=None, generator=None):
        """The next step of the trajectory timesteps(n) started (t is its current entry; t_prev follows from
        the counter, as in diffusers)."""
        t, d = int(t), self.num_train_timesteps // self._n
        if self._counter < self._prk and not self.config["skip_prk_steps"]:
            prev = t - (0 if self._counter % 2 else d // 2)
            t = int(self._prk_ts[self._counter // 4 * 4])
            k = self._counter % 4
            if k == 0:
                self._cur_out += 1 / 6 * model_output
                self._ets.append(model_output)
                self._cur_sample = x
            elif k in (1, 2):
                self._cur_out += 1 / 3 * model_output
            else:
                model_output = self._cur_out + 1 / 6 * model_output
                self._cur_out = 0
            start = self._cur_sample if self._cur_sample is not None else x
            out = self._transfer(start, t, prev, model_output)
            self._counter += 1
            return out
        prev = t - d
        if self._counter != 1:
            self._ets = self._ets[-3:] + [model_output]
        else:  # the repeated entry: average with the first output and redo the first step
            prev, t = t, t + d
        e = self._ets
        if len(e) == 1 and self._counter == 0:
            self._cur_sample = x
        elif len(e) == 1 and self._counter == 1:
            model_output = (model_output + e[-1]) / 2
            x, self._cur_sample = self._cur_sample, None
        elif len(e) == 2:
            model_output = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            model_output = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            model_output = 1 / 24 * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        self._counter += 1
        return self._transfer(x, t, prev, model_output)


class EulerDiscrete(NoiseSchedule):
    """Euler's method in sigma space (Karras et al. 2022, Algorithm 2 without churn), as diffusers'
    EulerDiscreteScheduler (SDXL's default): sigma_i = sqrt((1 - a) / a) interpolated at the timesteps,
    the input scaled by 1 / sqrt(sigma^2 + 1), x_next = x + (x - x0) / sigma * (sigma_next - sigma).
    Its timesteps are floats (fractional under "linspace", its default spacing)."""
    DEFAULTS = dict(NoiseSchedule.DEFAULTS, timestep_spacing="linspace", interpolation_type="linear",
                    final_sigmas_type="zero", timestep_type="discrete")
    UNSUPPORTED = dict(NoiseSchedule.UNSUPPORTED, use_karras_sigmas=False, use_exponential_sigmas=False,
                       use_beta_sigmas=False, sigma_min=None, sigma_max=None)

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        for k, ok in (("interpolation_type", ("linear",)), ("final_sigmas_type", ("zero", "sigma_min")),
                      ("timestep_type", ("discrete",))):
            if c[k] not in ok:
                raise BadInput(f"EulerDiscrete: {k}={c[k]!r} is not supported ({', '.join(ok)})")
        self._sigma = {}  # timestep -> (sigma, next sigma) of the last timesteps(n)

    def timesteps(self, n):
        """float32, descending, as diffusers' set_timesteps(n); also fixes the sigmas of this n."""
        N, c = self.num_train_timesteps, self.config
        if not 0 < n <= N:
            raise BadInput(f"number of sampling steps must be in 1..{N}, got {n}")
        if c["timestep_spacing"] == "linspace":
            ts = np.linspace(0, N - 1, n, dtype=np.float32)[::-1].copy()
        elif c["timestep_spacing"] == "leading":
            ts = (np.arange(0, n) * (N // n)).round()[::-1].copy().astype(np.float32) + c["steps_offset"]
        else:  # trailing
            ts = np.arange(N, 0, -N / n).round().astype(np.float32) - 1
        ac = self.alphas_cumprod
        table = (((1 - ac) / ac) ** 0.5).numpy()  # float32, computed in torch as diffusers does
        last = table[0] if c["final_sigmas_type"] == "sigma_min" else 0
        sigmas = torch.from_numpy(np.concatenate([np.interp(ts, np.arange(len(table)), table), [last]])
                                  .astype(np.float32))  # (n + 1,)
        self._sigma = {float(t): (sigmas[i], sigmas[i + 1]) for i, t in enumerate(ts)}
        top = sigmas.max()
        spread = c["timestep_spacing"] in ("linspace", "trailing")
        self.init_noise_sigma = top if spread else (top ** 2 + 1) ** 0.5
        return torch.from_numpy(ts)

    def _sigmas_at(self, t):
        if float(t) not in self._sigma:
            raise BadInput(f"EulerDiscrete: timestep {t} is not one of the last timesteps(n)")
        return self._sigma[float(t)]

    def scale_input(self, x, t):
        sigma = self._sigmas_at(t)[0]
        return x / ((sigma ** 2 + 1) ** 0.5)

    def step(self, model_output, x, t, t_prev=None, generator=None):
        """x at timestep t -> x at the next of the timesteps (sigma 0 or sigma_min after the last)."""
        sigma, nxt = self._sigmas_at(t)
        sample = x.to(torch.float32)
        if self.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        elif self.prediction_type == "v_prediction":
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + (sample / (sigma ** 2 + 1))
        else:
            x0 = model_output
        return (sample + (sample - x0) / sigma * (nxt - sigma)).to(model_output.dtype)


SCHEDULERS = {"ddim": DDIM, "ddpm": DDPM, "dpmsolver": DPMSolver, "unipc": UniPC, "pndm": PNDM,
              "euler": EulerDiscrete}


def make(name, config):
    """Our scheduler `name` from any saved diffusers scheduler config, as diffusers' from_config builds the
    class of that name from it: class defaults for the keys it lacks (and for an in-memory config's
    _use_default_values), the keys of other classes ignored, diffusers' remapping of values (DPM-Solver's
    solver_type "midpoint" is UniPC's "bh2"), and a clear error for options not implemented here."""
    if name not in SCHEDULERS:
        raise BadInput(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](config)

# -----------------------------------------------------------------------------
# the scheduler configs of the official pipelines, for checkpoints that come without one

# CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json (a PNDMScheduler file)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                    skip_prk_steps=True, prediction_type="epsilon")
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (EulerDiscreteScheduler): SD's
# betas, "leading" spacing, linear interpolation, no Karras sigmas (what a single SDXL file samples with)
SDXL_SCHEDULER = dict(SD_SCHEDULER, timestep_spacing="leading", interpolation_type="linear",
                      use_karras_sigmas=False, sample_max_value=1.0)
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
