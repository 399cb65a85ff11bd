"""The PPO-clip policy loss with rectification weights, and the optional KL term (SPEC section 5).

    L = mean_i max(-w_i A_i ratio_i, -w_i A_i clip(ratio_i, 1 - eps, 1 + eps)),
    ratio_i = exp(log p_new - log p_old).

Losses take tensors and scalars only; wiring them to a model is the trainer's job.
"""

from __future__ import annotations

import torch


def ppo_clip_loss(
    log_prob_new: torch.Tensor,
    log_prob_old: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    clip_range: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-item terms [M] (`reduction="none"`) or their mean."""
    ratio = torch.exp(log_prob_new.float() - log_prob_old.float())
    scaled = -weights * advantages  # [M]
    terms = torch.maximum(scaled * ratio, scaled * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))
    if reduction == "none":
        return terms
    if reduction == "mean":
        return terms.mean()
    raise ValueError(f"unknown reduction {reduction!r}")


def kl_penalty(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-item KL between the policy's and reference's step Gaussians, float32 [M].

    Both share the std, so KL = ||mu - mu_ref||^2 / (2 std^2), here the mean over latent elements.
    """
    squared = ((mean.float() - ref_mean.float()) ** 2).mean(dim=tuple(range(1, mean.dim())))
    return squared / (2 * std.float().reshape(-1) ** 2)


@torch.no_grad()
def policy_stats(log_prob_new: torch.Tensor, log_prob_old: torch.Tensor, clip_range: float) -> dict[str, float]:
    """Clip fraction, approximate KL (0.5 E[(log ratio)^2]), the ratio's mean, min and max, and the
    mean and max |ratio - 1| of a batch of items."""
    log_ratio = log_prob_new.float() - log_prob_old.float()
    ratio = torch.exp(log_ratio)
    return {
        "clip_fraction": float(((ratio - 1).abs() > clip_range).float().mean()),
        "approx_kl": float(0.5 * (log_ratio**2).mean()),
        "ratio_mean": float(ratio.mean()),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
        "ratio_deviation_mean": float((ratio - 1).abs().mean()),
        "ratio_deviation_max": float((ratio - 1).abs().max()),
    }
