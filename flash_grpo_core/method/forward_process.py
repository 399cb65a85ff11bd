"""Losses on the forward process: train on a rollout's clean samples re-noised at a chosen level,
not on its sampling steps (DiffusionNFT and Advantage Weighted Matching, the `nft` and `awm` modes).

Both noise a final sample x0 at level t with fresh noise e along the rectified-flow path,
x_t = (1 - t) x0 + t e, whose velocity target is e - x0, and ask the policy for v(x_t, t) without
classifier-free guidance. They differ in what they do with it:

- DiffusionNFT (Zheng et al., 2025, arXiv:2509.16117, eq. 8-10; NVlabs/DiffusionNFT
  scripts/train_nft_sd3.py): the advantage mapped to an optimality probability
  r = clip(clip(A, -c, c) / c / 2 + 1/2, 0, 1) weights an implicit positive policy
  v+ = b v + (1 - b) v_old against an implicit negative one v- = (1 + b) v_old - b v; each predicts
  x0 as x_t - t v+- and is scored by its squared error divided by its own (detached) mean absolute
  error (the official "adaptive weighting"); the loss is c (r L+ + (1 - r) L-) / b.
- AWM (Xue et al., 2025, arXiv:2509.25050): the flow-matching log-likelihood surrogate
  log p = -mean((v - (e - x0))^2), optionally weighted by t, in the PPO ratio against the sampling
  policy's value at the same (x_t, t, e) (Flow-Factory trainers/awm.py `compute_weighted_log_prob`).

Every function returns one value per item [M] in float32; reductions are the caller's.
"""

from __future__ import annotations

import torch

from flash_grpo_core.method.choices import AWM_WEIGHTINGS


def _per_item(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t [M] shaped [M, 1, ...] to broadcast over `like` [M, ...]."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t e, with t [M] in [0, 1] (1: pure noise), in float32."""
    x0, noise = x0.float(), noise.float()
    level = _per_item(t, x0)
    return (1 - level) * x0 + level * noise


def optimality(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """DiffusionNFT's r in [0, 1]: the clipped advantage rescaled, 1/2 for an average sample."""
    clipped = advantages.float().clamp(-adv_clip, adv_clip)
    return (clipped / adv_clip / 2 + 0.5).clamp(0, 1)


def nft_terms(v: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
              advantages: torch.Tensor, beta: float, adv_clip: float) -> torch.Tensor:
    """DiffusionNFT's per-item loss [M]: `v` (with grad) the trained policy's velocity, `v_old`
    the sampling policy's at the same (x_t, t), `beta` the implicit policies' step b."""
    v, v_old, x0, x_t = v.float(), v_old.detach().float(), x0.float(), x_t.float()
    level = _per_item(t, x0)
    r = optimality(advantages, adv_clip)
    positive = x_t - level * (beta * v + (1 - beta) * v_old)  # x0 predicted by v+
    negative = x_t - level * ((1 + beta) * v_old - beta * v)  # x0 predicted by v-
    return adv_clip * (r * _adaptive_error(positive, x0) + (1 - r) * _adaptive_error(negative, x0)) / beta


def _adaptive_error(prediction: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Mean squared error [M] over the mean absolute error (detached, at least 1e-5)."""
    dims = tuple(range(1, x0.dim()))
    with torch.no_grad():
        scale = (prediction.double() - x0.double()).abs().mean(dim=dims).clamp(min=1e-5).float()
    return ((prediction - x0) ** 2).mean(dim=dims) / scale


def awm_log_prob(v: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                 weighting: str = "uniform") -> torch.Tensor:
    """AWM's log-likelihood surrogate [M]: -mean((v - (e - x0))^2), times t or t^2 if weighted."""
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"AWM weighting must be one of {AWM_WEIGHTINGS}, got {weighting!r}")
    error = (v.double() - (noise.double() - x0.double())) ** 2
    log_prob = -error.mean(dim=tuple(range(1, error.dim())))
    if weighting == "t":
        log_prob = log_prob * t.double()
    elif weighting == "t**2":
        log_prob = log_prob * t.double() ** 2
    return log_prob.float()


def velocity_distance(v: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """The velocity-space KL surrogate [M] both methods use: mean((v - v_ref)^2)."""
    difference = (v.float() - v_ref.detach().float()) ** 2
    return difference.mean(dim=tuple(range(1, difference.dim())))
