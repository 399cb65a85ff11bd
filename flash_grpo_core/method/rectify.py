"""Temporal gradient rectification (TGR, SPEC section 3): per-item weights of the policy loss.

Each trained item (one sample at one step i) gets a factor from the schedule:
- `exact`: c(t_i) = 1/g(t_i), normalised by its mean over the items of one optimizer step, on all
  ranks together, so each step's average weight is 1 and the learning rate keeps its meaning
  (Flash-GRPO; SPEC 3, the authors' `w = 1 / reduce(value.mean())`). The items are those the step
  actually trains: after zero-advantage items are skipped (`train.skip_zero_advantage`), without
  the masked copies that pad a rank's share (engine/trainer.py). Every rank holds the whole batch
  and draws the same minibatches, so the caller passes the step's items and no collective is needed;
- `none`: 1 (plain GRPO, for ablations);
- `flow_grpo`: s_i / sqrt(-dt), without normalisation: a partial rectification that cancels the
  first term of g(t_i) = sqrt(-dt)/s_i + s_i sqrt(-dt) (1 - sigma_i) / (2 sigma_i) and keeps the
  second. Despite its name it is not in Flow-GRPO's code: its Wan trainer
  (yifan123/flow_grpo `scripts/train_wan2_1.py`, commit 74db691) weights neither the loss nor the
  log-probability by step; it is an ablation of this project (docs/decisions.md, "Baselines as
  published"). Flow-GRPO as published is `rectify: none`.
The factors are always computed from the actual schedule, never from a table.
"""

from __future__ import annotations

import torch

from flash_grpo_core.method.choices import RECTIFY_MODES
from flash_grpo_core.method.sde import noise_scales, rectification_coefficients


def rectification_factors(
    sigmas: torch.Tensor, mode: str, noise_kind: str = "wan", noise_level: float | None = None
) -> torch.Tensor:
    """The unnormalised loss factor of each of the N steps, float64 [N]."""
    if mode == "exact":
        return rectification_coefficients(sigmas, noise_kind, noise_level)
    if mode == "none":
        return torch.ones(len(sigmas) - 1, dtype=torch.float64)
    if mode == "flow_grpo":
        delta = (sigmas[:-1] - sigmas[1:]).double()  # -dt > 0, [N]
        return noise_scales(sigmas, noise_kind, noise_level) / torch.sqrt(delta)
    raise ValueError(f"unknown rectify mode {mode!r}; expected one of {RECTIFY_MODES}")


def rectification_weights(step_factors: torch.Tensor, steps: torch.Tensor, mode: str) -> torch.Tensor:
    """Weights of the items one optimizer step trains, float32 shaped like `steps`.

    `step_factors` is `rectification_factors(...)` [N]; `steps` holds the step index of each item
    the optimizer step trains (all ranks' items, any shape). In `exact` mode the weights are divided
    by their mean over `steps`, so they average 1 over the optimizer step.
    """
    weights = step_factors.to(steps.device)[steps]
    if mode == "exact" and weights.numel():
        weights = weights / weights.mean()
    return weights.float()
