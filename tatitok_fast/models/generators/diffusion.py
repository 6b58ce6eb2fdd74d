"""Gaussian diffusion of the MaskGen-KL DiffLoss head (DDPM with a learned variance range).

What the official checkpoints were trained and sampled with:
- cosine noise schedule over 1000 steps, alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2,
  betas clipped at 0.999;
- optional respacing ("100" = 100 evenly spread steps, "10,20,30" = per-section counts,
  "ddimN" = the fixed integer stride giving N steps), the model always seeing the
  original timestep ids;
- the model predicts epsilon and, on C more channels, v in [-1, 1] that interpolates the
  log-variance between the clipped posterior variance and beta (LEARNED_RANGE);
- training loss = MSE on epsilon + the variational-bound term (in bits) that trains only
  the variance channels.

Coefficient tables are computed in float64 and kept as float32 non-persistent buffers, so the
state dict of a parent module is unchanged; they are rebuilt from float64 whenever the module
is moved, cast or `to_empty`-ed (see `_apply`), so they stay exact float32 on any device.

The sampling loop is CUDA-graph friendly: a fixed number of steps known on the host, per-step
coefficients read as 0-d views of device tables, all noise drawn before the loop (or given),
no host syncs and no tensors built from Python lists inside it.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn

__all__ = ["cosine_betas", "space_timesteps", "GaussianDiffusion", "normal_kl",
           "discretized_gaussian_log_likelihood"]

# A model maps x_t (N, C) and original timestep ids (N,) int64 to (N, 2C): epsilon, then v.
DiffusionModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------
# Schedules

def _cosine_alpha_bar(s: float) -> float:
    """alpha_bar(s) of the cosine schedule, s in [0, 1]."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """Betas (num_steps,) float64 discretising the cosine alpha_bar, each clipped at max_beta."""
    if int(num_steps) < 1:
        raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
    betas = [min(1.0 - _cosine_alpha_bar((i + 1) / num_steps) / _cosine_alpha_bar(i / num_steps), max_beta)
             for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64, device="cpu")


def space_timesteps(num_steps: int, spacing: str | int | Sequence[int] | None) -> list[int]:
    """The original timesteps kept by a respacing, sorted.

    spacing: "" or None (all steps); an int or "N" (N steps spread evenly); "a,b,c" or a list
    (the steps are cut into equal sections, the i-th section keeps spacing[i] evenly spread
    steps, positions rounded half-to-even after accumulating the fractional stride); or
    "ddimN" (range(0, num_steps, k) for the smallest k giving exactly N steps).
    """
    if spacing is None or spacing == "":
        return list(range(num_steps))
    if isinstance(spacing, str):
        if spacing.startswith("ddim"):
            if not spacing[4:].isdigit():
                raise ValueError(f"spacing: expected 'ddimN' with an integer N, got {spacing!r}")
            want = int(spacing[4:])
            for stride in range(1, num_steps):
                kept = range(0, num_steps, stride)
                if len(kept) == want:
                    return list(kept)
            raise ValueError(f"spacing: no integer stride gives exactly {want} of {num_steps} steps ({spacing!r})")
        try:
            counts = [int(part) for part in spacing.split(",")]
        except ValueError:
            raise ValueError(f"spacing: expected 'N', 'a,b,c' or 'ddimN', got {spacing!r}") from None
    elif isinstance(spacing, int):
        counts = [spacing]
    else:
        counts = [int(c) for c in spacing]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"spacing: expected positive step counts, got {spacing!r}")
    base, extra = divmod(num_steps, len(counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"spacing: a section of {size} steps cannot keep {count} ({spacing!r})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.add(start + round(pos))  # round(): half to even, as the reference
            pos += stride
        start += size
    return sorted(kept)


# ---------------------------------------------------------------------------------------
# Gaussian helpers (elementwise, any matching shapes)

def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats, elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # the tanh approximation of Phi(x)
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) in nats of a Gaussian discretised into bins of width 2/255 on [-1, 1] (the edge
    bins open to +-inf), elementwise. Applied, as the reference does, to token latents."""
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"x, means, log_scales: expected one shape, got {tuple(x.shape)}, "
                         f"{tuple(means.shape)}, {tuple(log_scales.shape)}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ---------------------------------------------------------------------------------------
# Diffusion process

_TABLES = (
    "betas", "log_betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "nonzero_mask",
)


class GaussianDiffusion(nn.Module):
    """DDPM with epsilon prediction and LEARNED_RANGE variance, optionally respaced.

    Indices `t` taken by the methods count the (respaced) steps of this process, 0 = least
    noise; the model is called with `timestep_map[t]`, the original timestep ids.

    Args:
        timestep_respacing: see `space_timesteps` ("" keeps all `num_diffusion_steps`).
        num_diffusion_steps: steps of the base cosine schedule.
    """

    def __init__(self, timestep_respacing: str | int | Sequence[int] | None = "", num_diffusion_steps: int = 1000):
        super().__init__()
        kept = space_timesteps(num_diffusion_steps, timestep_respacing)
        self.num_diffusion_steps = int(num_diffusion_steps)
        self.num_timesteps = len(kept)
        self._kept = kept
        self._float64 = self._compute_tables(kept, cosine_betas(num_diffusion_steps))
        # float64 masters live on the CPU; the buffers go where the module is built (a meta
        # build gets real values back from `_apply` on `to_empty`)
        device = torch.get_default_device()
        for name, table in self._float64.items():
            self.register_buffer(name, table.float().to(device), persistent=False)
        self.register_buffer("timestep_map", torch.tensor(kept, dtype=torch.int64, device="cpu").to(device),
                             persistent=False)

    @staticmethod
    def _compute_tables(kept: list[int], base_betas: torch.Tensor) -> dict[str, torch.Tensor]:
        """All coefficient tables (S,) in float64 on the CPU."""
        # respaced betas from the base alpha_bar at the kept steps (also when all are kept)
        ac_base = torch.cumprod(1.0 - base_betas, dim=0)
        ac_kept = ac_base[torch.tensor(kept, dtype=torch.int64, device="cpu")]
        ac_before = torch.cat([ac_base.new_ones(1), ac_kept[:-1]])
        betas = 1.0 - ac_kept / ac_before
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # posterior variance is 0 at t = 0: its log is clipped to the value at t = 1
        post_log_var = (torch.log(torch.cat([post_var[1:2], post_var[1:]])) if len(kept) > 1
                        else torch.full_like(post_var, float("nan")))
        nonzero = torch.ones_like(betas)
        nonzero[0] = 0.0  # no noise is added on the last sampling step
        return {
            "betas": betas,
            "log_betas": torch.log(betas),
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": torch.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": torch.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_log_var,
            "posterior_mean_coef1": betas * torch.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac),
            "nonzero_mask": nonzero,
        }

    def reset_tables(self) -> None:
        """Rewrite every table from its float64 values (float32, on the tables' device)."""
        device = self.timestep_map.device
        for name in _TABLES:
            setattr(self, name, self._float64[name].to(device=device, dtype=torch.float32))
        self.timestep_map = torch.tensor(self._kept, dtype=torch.int64, device="cpu").to(device)

    def _apply(self, fn, recurse=True):
        # .to(device/dtype), .half(), to_empty(...) would leave the tables cast to low
        # precision or uninitialised: rebuild them (float32) wherever they moved.
        super()._apply(fn, recurse)
        self.reset_tables()
        return self

    def extra_repr(self) -> str:
        return f"num_timesteps={self.num_timesteps}, num_diffusion_steps={self.num_diffusion_steps}"

    # -- lookups --------------------------------------------------------------------------

    def _check_t(self, t: torch.Tensor | int, n: int) -> None:
        if isinstance(t, int):
            if not 0 <= t < self.num_timesteps:
                raise ValueError(f"t: expected an int in [0, {self.num_timesteps}), got {t}")
            return
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (n,):
            desc = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t: expected an int64 tensor of shape ({n},) (step indices), got a {desc}")

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor | int, ndim: int) -> torch.Tensor:
        """table[t] shaped to broadcast against an (N, ...) tensor of `ndim` dims."""
        if isinstance(t, int):
            return table[t]  # 0-d view: no host data, graph friendly
        return table[t].view(-1, *([1] * (ndim - 1)))

    def model_timesteps(self, t: torch.Tensor | int, n: int) -> torch.Tensor:
        """Original timestep ids (n,) int64 the model sees for step indices t."""
        ts = self.timestep_map[t]
        return ts.expand(n) if ts.dim() == 0 else ts

    # -- forward process -----------------------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) for given noise. x_start, noise (N, C); t (N,) int64."""
        if noise.shape != x_start.shape:
            raise ValueError(f"noise: expected the shape of x_start {tuple(x_start.shape)}, got {tuple(noise.shape)}")
        self._check_t(t, x_start.shape[0])
        d = x_start.dim()
        return (self._at(self.sqrt_alphas_cumprod, t, d) * x_start
                + self._at(self.sqrt_one_minus_alphas_cumprod, t, d) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor,
                                  t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (N, C) and clipped log-variance (broadcastable) of q(x_{t-1} | x_t, x_0)."""
        d = x_t.dim()
        mean = self._at(self.posterior_mean_coef1, t, d) * x_start + self._at(self.posterior_mean_coef2, t, d) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t, d)

    # -- reverse process -----------------------------------------------------------------

    def p_mean_variance(self, model_output: torch.Tensor, x: torch.Tensor,
                        t: torch.Tensor | int) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from the model output (N, 2C) = [epsilon, v] at x_t = x (N, C).

        Returns "mean", "log_variance", "pred_xstart", each (N, C).
        """
        c = x.shape[1]
        if model_output.shape[0] != x.shape[0] or model_output.shape[1] != 2 * c:
            raise ValueError(f"model_output: expected shape ({x.shape[0]}, {2 * c}) (epsilon and v), "
                             f"got {tuple(model_output.shape)}")
        eps, v = model_output[:, :c], model_output[:, c:]
        d = x.dim()
        min_log = self._at(self.posterior_log_variance_clipped, t, d)
        max_log = self._at(self.log_betas, t, d)
        frac = (v + 1) / 2  # v in [-1, 1] spans [posterior variance, beta]
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = (self._at(self.sqrt_recip_alphas_cumprod, t, d) * x
                       - self._at(self.sqrt_recipm1_alphas_cumprod, t, d) * eps)  # (N, C)
        mean, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_sample(self, model: DiffusionModel, x: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor,
                 temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} (N, C); `noise` (N, C) is scaled by `temperature`
        (and dropped at t = 0)."""
        out = self.p_mean_variance(model(x, self.model_timesteps(t, x.shape[0])), x, t)
        std = self._at(self.nonzero_mask, t, x.dim()) * torch.exp(0.5 * out["log_variance"])
        return out["mean"] + std * noise * temperature

    @torch.no_grad()
    def p_sample_loop(self, model: DiffusionModel, noise: torch.Tensor, temperature: float | torch.Tensor = 1.0,
                      step_noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling from x_T = noise (N, C) down to x_0 (N, C).

        step_noise: (S, N, C) noise of each step in loop order (step k at t = S - 1 - k; the last
            one is unused, as the reference draws it too); drawn from `generator` in one call
            when omitted (on CPU this is the reference's stream of per-step draws).
        """
        if noise.dim() != 2:
            raise ValueError(f"noise: expected (N, C), got shape {tuple(noise.shape)}")
        steps = self.num_timesteps
        if step_noise is None:
            step_noise = torch.randn((steps, *noise.shape), generator=generator, device=noise.device, dtype=noise.dtype)
        elif tuple(step_noise.shape) != (steps, *noise.shape):
            raise ValueError(f"step_noise: expected shape {(steps, *noise.shape)} (steps, N, C), "
                             f"got {tuple(step_noise.shape)}")
        x = noise
        for k in range(steps):
            x = self.p_sample(model, x, steps - 1 - k, step_noise[k], temperature)
        return x

    # -- training ------------------------------------------------------------------------

    def vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """Variational-bound term (N,) in bits: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) averaged
        over channels, or the discretised decoder NLL where t == 0."""
        true_mean, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        kl = kl.mean(dim=tuple(range(1, kl.dim()))) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = nll.mean(dim=tuple(range(1, nll.dim()))) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model: DiffusionModel, x_start: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-row losses for x_start (N, C) at step indices t (N,) int64.

        Returns "mse" (epsilon MSE), "vb" (variational bound with the epsilon half detached,
        so it trains the variance channels only) and "loss" = mse + vb, each (N,).
        """
        if x_start.dim() != 2:
            raise ValueError(f"x_start: expected (N, C), got shape {tuple(x_start.shape)}")
        self._check_t(t, x_start.shape[0])
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.model_timesteps(t, x_t.shape[0]))
        c = x_start.shape[1]
        if tuple(model_output.shape) != (x_start.shape[0], 2 * c):
            raise ValueError(f"model: expected an output of shape ({x_start.shape[0]}, {2 * c}), "
                             f"got {tuple(model_output.shape)}")
        eps = model_output[:, :c]
        frozen = torch.cat([eps.detach(), model_output[:, c:]], dim=1)
        vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
        mse = ((noise - eps) ** 2).mean(dim=1)
        return {"mse": mse, "vb": vb, "loss": mse + vb}
