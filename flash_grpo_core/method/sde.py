"""The SDE sampling step of the policy, its log-probability, and the rectification coefficients.

Implements SPEC sections 2 and 3 as pure functions on tensors. With sigma = sigma_i,
sigma' = sigma_{i+1}, dt = sigma' - sigma (< 0) and noise scale s_i:

    mean = x * (1 + s^2 dt / (2 sigma)) + v * (1 + s^2 (1 - sigma) / (2 sigma)) * dt
    x'   = mean + s * sqrt(-dt) * eps
    log p = mean over latent elements of the Gaussian log-density of x' around mean.

The noise scale is pluggable (`noise_scales`):
- `wan` (default): s_i = level * sigma_i with level = sigma_1, the Wan variant of Flow-GRPO's SDE
  that the authors' code uses;
- `flow_grpo`: s_i = level * sqrt(sigma_i / (1 - sigma_i)), level 0.7. As in Flow-GRPO, the first
  step's 1 - sigma_0 (zero, or nearly so) is replaced by 1 - sigma_1 to keep it finite;
- `dance`: a constant s_i = level (DanceGRPO's eta), level 0.3.

Everything is computed in float32 whatever the input dtype (bf16 log-densities are too coarse
for importance ratios near 1); the drawn sample is returned in the input dtype and its
log-probability is computed from that rounded sample, so recomputing it later gives the same value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flash_grpo_core.method.choices import NOISE_KINDS

_DEFAULT_LEVEL = {"flow_grpo": 0.7, "dance": 0.3}
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class SDEStep:
    """One SDE step: the sample x', its Gaussian mean and std, and log p(x' | x) per batch element."""

    prev_sample: torch.Tensor  # [B, C, F, H, W], input dtype
    mean: torch.Tensor  # [B, C, F, H, W], float32
    std: torch.Tensor  # [B, 1, 1, 1, 1], float32
    log_prob: torch.Tensor  # [B], float32


def _per_batch(value, like: torch.Tensor) -> torch.Tensor:
    """A float32 scalar or [B] value shaped [B, 1, ..., 1] (or [1, ...]) to broadcast against `like`."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    noise_scale,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStep:
    """Take (or, given `prev_sample`, score) one SDE step from x with velocity v.

    `sigma`, `sigma_next` and `noise_scale` are scalars or one value per batch element. Without
    `prev_sample`, x' = mean + std * noise with `noise` given or drawn from N(0, I).
    """
    x32, v32 = x.float(), v.float()  # [B, C, F, H, W]
    sigma, sigma_next = _per_batch(sigma, x32), _per_batch(sigma_next, x32)
    scale = _per_batch(noise_scale, x32)
    dt = sigma_next - sigma
    mean = x32 * (1 + scale**2 * dt / (2 * sigma)) + v32 * (1 + scale**2 * (1 - sigma) / (2 * sigma)) * dt
    std = scale * torch.sqrt(-dt)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        prev_sample = (mean + std * noise.to(mean)).to(x.dtype)
    log_prob = gaussian_log_prob(prev_sample.float(), mean, std)
    return SDEStep(prev_sample=prev_sample, mean=mean, std=std, log_prob=log_prob)


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dims of log N(sample; mean, std^2), float32 [B]."""
    density = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return density.mean(dim=tuple(range(1, density.dim())))


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Deterministic Euler step x + (sigma' - sigma) * v, computed in float32, returned in x's dtype."""
    x32 = x.float()
    dt = _per_batch(sigma_next, x32) - _per_batch(sigma, x32)
    return (x32 + dt * v.float()).to(x.dtype)


def noise_scales(sigmas: torch.Tensor, kind: str = "wan", level: float | None = None) -> torch.Tensor:
    """The noise scale s_i of each of the N steps, given the N+1 sigmas; float64 [N]."""
    sigmas = sigmas.double()
    current = sigmas[:-1]  # [N]
    if kind == "wan":
        return (sigmas[1] if level is None else level) * current
    if kind == "flow_grpo":
        level = _DEFAULT_LEVEL[kind] if level is None else level
        # Flow-GRPO replaces sigma == 1 by sigma_1 in the denominator; generalised to any step whose
        # sigma exceeds sigma_1 (only the first) so that the `authors` schedule is covered too.
        return level * torch.sqrt(current / (1 - torch.clamp(current, max=float(sigmas[1]))))
    if kind == "dance":
        return torch.full_like(current, _DEFAULT_LEVEL[kind] if level is None else level)
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")


def gradient_factors(sigmas: torch.Tensor, kind: str = "wan", level: float | None = None) -> torch.Tensor:
    """g(t_i) = sqrt(dt)/s_i + s_i sqrt(dt) (1 - sigma_i) / (2 sigma_i), float64 [N].

    On-policy, d log p / d v = -g(t_i) * eps / D (D latent elements), so g is the time-dependent
    size of the policy gradient that rectification cancels.
    """
    sigmas = sigmas.double()
    scale = noise_scales(sigmas, kind, level)
    current, delta = sigmas[:-1], sigmas[:-1] - sigmas[1:]  # [N], delta = -dt > 0
    root = torch.sqrt(delta)
    return root / scale + scale * root * (1 - current) / (2 * current)


def rectification_coefficients(sigmas: torch.Tensor, kind: str = "wan", level: float | None = None) -> torch.Tensor:
    """c(t_i) = 1 / g(t_i) for each of the N steps, float64 [N]."""
    return 1.0 / gradient_factors(sigmas, kind, level)
