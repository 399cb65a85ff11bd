"""Which sampling steps are stochastic and which are trained, per mode (SPEC sections 4 and 6).

Every mode returns the trained step indices as a LongTensor [B, G, T] (B prompts, G samples per
prompt, T trained steps per sample). The rollout takes the SDE step at every trained step, and in
`full` mode at every other step too (`stochastic_steps`); deterministic Euler steps elsewhere.

- `flash`: T = 1. One step k per prompt, uniform over the first K candidate steps, shared by the
  whole group (iso-temporal); with `iso_temporal=False`, one k per sample (ablation). Draws come
  from a generator seeded identically on every rank, so all ranks agree without a broadcast.
- `window`: MixGRPO's sliding window (Tencent-Hunyuan/MixGRPO, `fastvideo/utils/grpo_states.py`,
  progressive strategy with overlap and roll-back): W consecutive steps shared by the iteration,
  clipped to steps 0..N-2; the start moves by `stride` every `every` iterations and rolls back to 0
  once it passes N-2. SDE inside the window, ODE elsewhere. MixGRPO clips the window one step
  earlier (before N-2), which leaves an empty window while its start sits at N-2; here the window
  always holds at least step N-2 (docs/decisions.md, "Baselines as published").
- `window_k`: the earlier variant: W steps inside the first K candidate steps, start cycling over
  [0, K - W] (moving by `stride` every `every` iterations), so it spans the same steps as `flash`.
- `full`: Flow-GRPO: the first int(timestep_fraction * N) steps are trained (truncated: 0.99 of 20
  trains 19), and the rollout takes the SDE step at all N steps.
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
    """`window_k` mode: first step of the window at `iteration` (0-based), cycling over [0, K - W]."""
    positions = num_candidates - window_size + 1
    return ((iteration // every) * stride) % positions


def mixgrpo_window(iteration: int, num_steps: int, window_size: int, stride: int = 1, every: int = 25) -> list[int]:
    """`window` mode: the steps of MixGRPO's sliding window at `iteration` (0-based).

    The start advances by `stride` after every `every` iterations while it stays <= N - 2 and then
    rolls back to 0, so it visits 0, stride, 2 * stride, ... <= N - 2; the window is clipped to N - 2.
    """
    last = num_steps - 2  # MixGRPO's `max_timesteps`: the last step is never stochastic
    moves = last // stride + 1  # starts before the roll-back
    start = (iteration // every) % moves * stride
    return list(range(start, min(start + window_size, last + 1)))


def window_steps(num_prompts: int, group_size: int, start: int, window_size: int) -> torch.Tensor:
    """Window modes: LongTensor [B, G, W] of steps start .. start + W - 1 for every sample."""
    steps = torch.arange(start, start + window_size)
    return steps.expand(num_prompts, group_size, window_size).clone()


def full_step_count(num_steps: int, timestep_fraction: float) -> int:
    """Flow-GRPO's `num_train_timesteps = int(num_steps * timestep_fraction)` (truncation)."""
    return int(num_steps * timestep_fraction)


def full_steps(num_prompts: int, group_size: int, num_steps: int, timestep_fraction: float = 1.0) -> torch.Tensor:
    """Full mode: LongTensor [B, G, M] of the first M = int(N * fraction) steps for every sample."""
    count = full_step_count(num_steps, timestep_fraction)
    if count < 1:
        raise ValueError(f"timestep_fraction {timestep_fraction} of {num_steps} steps trains no step")
    return torch.arange(count).expand(num_prompts, group_size, count).clone()


def sde_mask(train_steps: torch.Tensor, num_steps: int) -> torch.Tensor:
    """BoolTensor [B*G, N]: True at each sample's trained steps."""
    prompts, group, trained = train_steps.shape
    flat = train_steps.reshape(prompts * group, trained)  # [B*G, T]; T may be 0 (pure ODE sampling)
    mask = torch.zeros(flat.shape[0], num_steps, dtype=torch.bool)
    mask.scatter_(1, flat.cpu(), True)
    return mask


def stochastic_steps(train_steps: torch.Tensor, num_steps: int, every_step: bool = False) -> torch.Tensor:
    """BoolTensor [B, G, N]: where each sample takes the SDE step in the rollout.

    Its trained steps, or with `every_step` (Flow-GRPO's `full`) all N steps.
    """
    prompts, group, _ = train_steps.shape
    if every_step:
        return torch.ones(prompts, group, num_steps, dtype=torch.bool)
    return sde_mask(train_steps, num_steps).reshape(prompts, group, num_steps)
