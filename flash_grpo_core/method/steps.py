"""Which sampling steps are stochastic and trained, per mode (SPEC sections 4 and 6).

Every mode returns the trained step indices as a LongTensor [B, G, T] (B prompts, G samples per
prompt, T trained steps per sample); the sampler takes the SDE step at exactly those steps and the
deterministic Euler step everywhere else.

- `flash`: T = 1. One step k per prompt, uniform over the first K candidate steps, shared by the
  whole group (iso-temporal); with `iso_temporal=False`, one k per sample (ablation). Draws come
  from a generator seeded identically on every rank, so all ranks agree without a broadcast.
- `window`: T = W consecutive steps shared by the whole iteration; the window start moves by
  `stride` every `every` iterations, cycling over [0, K - W] (MixGRPO / Flow-GRPO-Fast style,
  kept inside the same K candidate steps as `flash` so the two are compared on the same span).
- `full`: the first round(timestep_fraction * N) steps, for every sample (Flow-GRPO).
"""

from __future__ import annotations

import torch


def iso_temporal_steps(
    num_prompts: int, group_size: int, num_candidates: int, generator: torch.Generator, iso_temporal: bool = True
) -> torch.Tensor:
    """Flash mode: LongTensor [B, G, 1] of steps drawn uniformly from [0, K)."""
    if iso_temporal:
        per_prompt = torch.randint(num_candidates, (num_prompts, 1, 1), generator=generator)
        return per_prompt.expand(num_prompts, group_size, 1).clone()
    return torch.randint(num_candidates, (num_prompts, group_size, 1), generator=generator)


def window_start(iteration: int, num_candidates: int, window_size: int, stride: int = 1, every: int = 1) -> int:
    """First step of the sliding window at `iteration` (0-based), cycling over [0, K - W]."""
    positions = num_candidates - window_size + 1
    return ((iteration // every) * stride) % positions


def window_steps(num_prompts: int, group_size: int, start: int, window_size: int) -> torch.Tensor:
    """Window mode: LongTensor [B, G, W] of steps start .. start + W - 1 for every sample."""
    steps = torch.arange(start, start + window_size)
    return steps.expand(num_prompts, group_size, window_size).clone()


def full_steps(num_prompts: int, group_size: int, num_steps: int, timestep_fraction: float = 1.0) -> torch.Tensor:
    """Full mode: LongTensor [B, G, M] of the first M = round(fraction * N) steps for every sample."""
    count = max(1, round(timestep_fraction * num_steps))
    return torch.arange(count).expand(num_prompts, group_size, count).clone()


def sde_mask(train_steps: torch.Tensor, num_steps: int) -> torch.Tensor:
    """BoolTensor [B*G, N]: True where a sample takes the SDE step."""
    prompts, group, trained = train_steps.shape
    flat = train_steps.reshape(prompts * group, trained)  # [B*G, T]; T may be 0 (pure ODE sampling)
    mask = torch.zeros(flat.shape[0], num_steps, dtype=torch.bool)
    mask.scatter_(1, flat.cpu(), True)
    return mask
