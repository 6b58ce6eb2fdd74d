"""The DiffLoss head of MaskGen-KL: a per-token MLP denoiser with adaLN residual blocks,
trained and sampled with the Gaussian diffusion of `tatitok_fast.models.generators.diffusion`.

Parameter names are those of the official checkpoints under `diffloss.` (`net.time_embed.mlp.0`,
`net.res_blocks.{i}.adaLN_modulation.1`, `net.final_layer.linear`, ...). Every projection comes
from the `layers.Linear` factory; the adaLN LayerNorm + modulation and the gated residuals run
through the fused ops (Triton on CUDA, their PyTorch twins elsewhere) with T = 1 token per row.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tatitok_fast.models.generators.diffusion import GaussianDiffusion
from tatitok_fast.models.nn.layers import Linear
from tatitok_fast.ops import gated_residual, layernorm_modulate

__all__ = ["TimestepEmbedder", "ResBlock", "FinalLayer", "SimpleMLPAdaLN", "DiffLoss"]


# ---------------------------------------------------------------------------------------
# Building blocks

class TimestepEmbedder(nn.Module):
    """Timesteps (N,) -> (N, hidden): a [cos, sin] sinusoidal code then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal code (N, dim) of t (N,): cos of t * f_i then sin, f_i = max_period^(-i/half)
        in float32 (zero-padded when dim is odd). Built on t's device: no host data."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)  # fp32
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """x + gate * MLP(modulate(LayerNorm_affine(x), shift, scale)), (N, C) rows.

    The LayerNorm's affine is folded into the per-row modulation so that the fused
    layernorm_modulate kernel applies:
        (LN(x) * w + b) * (1 + s) + sh = LN(x) * (1 + (w * (1 + s) - 1)) + (b * (1 + s) + sh).
    `adaLN_modulation` is [SiLU, Linear] as in the checkpoints; the parent applies the SiLU once
    for all blocks, so `forward` takes the activated condition.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(Linear(channels, channels), nn.SiLU(), Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y_act: torch.Tensor) -> torch.Tensor:
        """x (N, C); y_act = SiLU(condition) (N, C) -> (N, C)."""
        shift, scale, gate = self.adaLN_modulation[1](y_act).chunk(3, dim=-1)  # (N, C) each
        one_plus = 1 + scale.float()
        fold_scale = self.in_ln.weight.float() * one_plus - 1  # (N, C) fp32
        fold_shift = self.in_ln.bias.float() * one_plus + shift.float()
        x3 = x.unsqueeze(1)  # (N, 1, C): one token per row
        h = self.mlp(layernorm_modulate(x3, fold_shift, fold_scale, self.in_ln.eps))
        return gated_residual(x3, gate, h).squeeze(1)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) + adaLN modulation, then Linear to the output channels."""

    def __init__(self, model_channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(model_channels, 2 * model_channels))

    def forward(self, x: torch.Tensor, y_act: torch.Tensor) -> torch.Tensor:
        """x (N, C); y_act = SiLU(condition) (N, C) -> (N, out_channels)."""
        shift, scale = self.adaLN_modulation[1](y_act).chunk(2, dim=-1)  # (N, C) each
        h = layernorm_modulate(x.unsqueeze(1), shift, scale, self.norm_final.eps)  # (N, 1, C)
        return self.linear(h).squeeze(1)


# ---------------------------------------------------------------------------------------
# Denoiser

class SimpleMLPAdaLN(nn.Module):
    """Per-token denoiser: (x_t (N, in), t (N,), z (N, z_channels)) -> (N, out).

    y = time_embed(t) + cond_embed(z) conditions every block through adaLN.
    """

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, grad_checkpointing: bool = False):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("model_channels", model_channels),
                        ("out_channels", out_channels), ("z_channels", z_channels)):
            if int(v) < 1:
                raise ValueError(f"{name}: expected a positive int, got {v}")
        if int(num_res_blocks) < 0:
            raise ValueError(f"num_res_blocks: expected >= 0, got {num_res_blocks}")
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.z_channels = z_channels
        self.num_res_blocks = num_res_blocks
        self.grad_checkpointing = grad_checkpointing

        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = Linear(z_channels, model_channels)
        self.input_proj = Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform projections with zero biases, N(0, 0.02) time MLP, and zeros for every
        adaLN projection and the output layer (the block starts as the identity, output 0)."""
        for m in self.modules():  # same order as the reference's Module.apply (post-order)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        zeroed = [b.adaLN_modulation[1] for b in self.res_blocks]
        zeroed += [self.final_layer.adaLN_modulation[1], self.final_layer.linear]
        for m in zeroed:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_embedded(self, x: torch.Tensor, t_emb: torch.Tensor, c_emb: torch.Tensor) -> torch.Tensor:
        """x (N, in); t_emb (N or 1, W) = time_embed(t); c_emb (N, W) = cond_embed(z) -> (N, out).

        Lets a sampler embed the condition once and the (shared) timestep on one row.
        """
        h = self.input_proj(x)  # (N, W)
        y_act = F.silu(t_emb + c_emb)  # (N, W), the SiLU of every adaLN_modulation, done once
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, y_act, use_reentrant=False)
            else:
                h = block(h, y_act)
        return self.final_layer(h, y_act)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (N, in_channels), t (N,) timestep ids, c (N, z_channels) -> (N, out_channels)."""
        dtype = self.input_proj.weight.dtype  # fp32 diffusion state into a low-precision net
        return self.forward_embedded(x.to(dtype), self.time_embed(t), self.cond_embed(c.to(dtype)))

    def guide(self, model_out: torch.Tensor, cfg_scale: float | torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance on an output (N, out) of rows [cond; uncond]: both halves get
        eps = uncond + cfg * (cond - uncond); the variance channels stay per row."""
        c = self.in_channels
        eps, rest = model_out[:, :c], model_out[:, c:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                         cfg_scale: float | torch.Tensor) -> torch.Tensor:
        """Guided output (N, out) for rows [cond; uncond] (N even): the cond half of x is fed to
        both halves (the uncond half of x is ignored), c holds [cond; uncond] conditions."""
        half = x[: x.shape[0] // 2]
        return self.guide(self.forward(torch.cat([half, half], dim=0), t, c), cfg_scale)


# ---------------------------------------------------------------------------------------
# DiffLoss

class DiffLoss(nn.Module):
    """Diffusion loss and sampler over token latents (N, token_size) given conditions
    (N, z_channels): 1000 cosine steps for training, `num_sampling_steps` for sampling.

    Args:
        token_size: channels C of a token; the net outputs 2C (epsilon and variance).
        width, depth: the MLP's channels and residual blocks (1024/8 for L, 1280/8 for XL).
        z_channels: channels of the condition (the MaskGen decoder width).
        num_sampling_steps: respacing of the sampling process ("100", "ddim50", ...).
    """

    def __init__(self, token_size: int, width: int, depth: int, z_channels: int,
                 num_sampling_steps: str | int = "100", grad_checkpointing: bool = False):
        super().__init__()
        for name, v in (("token_size", token_size), ("width", width), ("z_channels", z_channels)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth: expected an int >= 0, got {depth!r}")
        self.in_channels = token_size
        self.z_channels = z_channels
        self.net = SimpleMLPAdaLN(token_size, width, token_size * 2, z_channels, depth, grad_checkpointing)
        self.train_diffusion = GaussianDiffusion("")
        self.gen_diffusion = GaussianDiffusion(num_sampling_steps)

    def initialize_weights(self) -> None:
        self.net.initialize_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.net.grad_checkpointing = bool(enable)

    def reset_tables(self) -> None:
        """Rebuild the diffusion tables (done automatically on .to() / to_empty())."""
        self.train_diffusion.reset_tables()
        self.gen_diffusion.reset_tables()

    @staticmethod
    def _check_rows(name: str, v: torch.Tensor, n: int | None, channels: int) -> None:
        ok = isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == channels
        if not ok or (n is not None and v.shape[0] != n):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            rows = "N" if n is None else n
            raise ValueError(f"{name}: expected a tensor of shape ({rows}, {channels}), got {got}")

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None, *,
                t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss.

        Args:
            target: (N, C) clean token latents; z: (N, z_channels) their conditions.
            mask: optional (N,) weights (1 = counts); the loss is the mask-weighted mean.
            t, noise: optional timesteps (N,) int64 in [0, 1000) and noise (N, C); drawn (t with
                torch.randint, then noise, as the reference) from `generator` when omitted.
        Returns: (scalar loss, {"diff_loss": detached copy}).
        """
        self._check_rows("target", target, None, self.in_channels)
        n = target.shape[0]
        self._check_rows("z", z, n, self.z_channels)
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (n,)):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask: expected a tensor of shape ({n},), got {got}")
        if t is None:
            t = torch.randint(0, self.train_diffusion.num_timesteps, (n,), generator=generator, device=target.device)
        if noise is not None:
            self._check_rows("noise", noise, n, self.in_channels)
        terms = self.train_diffusion.training_losses(lambda x, ts: self.net(x, ts, z), target, t, noise, generator)
        loss = terms["loss"]  # (N,)
        if mask is not None:
            loss = (loss * mask).sum() / mask.sum()
        loss = loss.mean()
        return loss, {"diff_loss": loss.detach().clone()}

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float | torch.Tensor = 1.0, cfg: float | torch.Tensor = 1.0,
               noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
               step_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Token latents (N, C) for conditions z (N, z_channels).

        With cfg != 1 (a tensor cfg, e.g. the sampler's per-iteration scale, always counts as
        guided) z holds [cond; uncond] halves; both halves start from one shared noise and use
        the guided epsilon, each keeping its own variance channels and step noise (the second
        half is the reference's discarded uncond sample).

        Args:
            temperature: scales the noise of each step.
            cfg: guidance scale, a number or a one-element tensor (no host sync).
            noise: initial noise, (N, C), or (N // 2, C) when guided (shared by both halves).
            step_noise: (S, N, C) per-step noise, S = the sampling steps (loop order).
            generator: draws what is not given: noise first, then all step noise.
        """
        self._check_rows("z", z, None, self.z_channels)
        n = z.shape[0]
        guided = isinstance(cfg, torch.Tensor) or float(cfg) != 1.0
        if isinstance(cfg, torch.Tensor) and cfg.numel() != 1:
            raise ValueError(f"cfg: expected a number or a one-element tensor, got shape {tuple(cfg.shape)}")
        if guided and n % 2:
            raise ValueError(f"z: expected an even number of rows [cond; uncond] with cfg != 1, got {n}")
        rows = n // 2 if guided else n
        if noise is None:
            noise = torch.randn((rows, self.in_channels), generator=generator, device=z.device, dtype=torch.float32)
        else:
            self._check_rows("noise", noise, rows, self.in_channels)
        x_T = torch.cat([noise, noise], dim=0) if guided else noise  # (N, C)

        net = self.net
        c_emb = net.cond_embed(z)  # (N, W), the same for every step
        if isinstance(cfg, torch.Tensor):
            cfg = cfg.reshape(())

        def model(x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
            t_emb = net.time_embed(ts[:1])  # (1, W): every row is at the same step
            x = x.to(c_emb.dtype)  # the chain stays float32; the net may run in half precision
            if not guided:
                return net.forward_embedded(x, t_emb, c_emb)
            half = x[:rows]
            return net.guide(net.forward_embedded(torch.cat([half, half], dim=0), t_emb, c_emb), cfg)

        return self.gen_diffusion.p_sample_loop(model, x_T, temperature, step_noise, generator)
