"""Flow-matching sampling schedules (SPEC section 1).

Two variants of the shifted sigma schedule for N steps:

- `authors`: what the authors' released code trained with (an older diffusers formula):
  `s = 1 - linspace(1, 1/1000, N+1)`, shifted with `shift*s / (1 + (shift-1)*s)`, reversed.
  Its first sigma is slightly below 1 (0.99967 for shift 3).
- `diffusers`: what `UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)` builds today:
  `linspace(1, 1/1000, N+1)[:-1]`, shifted, a first sigma of exactly 1 nudged down by 1e-6 (as
  the scheduler does, to keep logs finite), then a final 0.

Both return N+1 values, decreasing, the last one 0. Timesteps given to the transformer are the
integers `1000 * sigma` truncated, for the first N, as the Wan pipeline passes them.

`interval_sigmas` places M solver steps between two sigmas the way a shifted schedule does (the
cheaper rollouts' ODE parts, `engine/fast_rollout.py`).
"""

from __future__ import annotations

import numpy as np
import torch

from flash_grpo_core.method.choices import SCHEDULE_KINDS

NUM_TRAIN_TIMESTEPS = 1000


def _shift(s: np.ndarray, shift: float) -> np.ndarray:
    return shift * s / (1.0 + (shift - 1.0) * s)


def flow_sigmas(num_steps: int, shift: float, kind: str = "authors") -> torch.Tensor:
    """The N+1 sigmas sigma_0 ~ 1 > ... > sigma_{N-1} > sigma_N = 0, float64 [N+1]."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    ramp = np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, num_steps + 1)
    if kind == "authors":
        sigmas = _shift(1.0 - ramp, shift)[::-1][:num_steps]
    elif kind == "diffusers":
        sigmas = _shift(ramp[:-1], shift)
        if abs(sigmas[0] - 1.0) < 1e-6:
            sigmas[0] -= 1e-6
    else:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")
    return torch.from_numpy(np.append(sigmas, 0.0).copy())


def interval_sigmas(start: float, end: float, num_steps: int, shift: float) -> torch.Tensor:
    """M + 1 sigmas from `start` down to `end` for M solver steps, spaced as the shifted schedule is.

    The shift maps a linear ramp u to sigma = shift u / (1 + (shift - 1) u); its inverse is
    u = sigma / (shift - (shift - 1) sigma). The steps are linear in u between u(start) and u(end),
    mapped back: with shift > 1 they crowd towards high noise as the training schedule's do (and M
    steps over an interval of M steps of the `authors` schedule, linear in u by construction, are
    its own sigmas), with shift < 1 towards sigma 0. The ends are returned exactly as given.
    float64 [M + 1].
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not start > end >= 0:
        raise ValueError(f"an interval runs from a higher sigma to a lower one, got {start} -> {end}")
    ends = np.array([start, end], dtype=np.float64)
    ramp = np.linspace(*(ends / (shift - (shift - 1.0) * ends)), num_steps + 1)
    sigmas = _shift(ramp, shift)
    sigmas[0], sigmas[-1] = start, end
    return torch.from_numpy(sigmas)


def transformer_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """The timesteps the transformer is given at `sigmas` (any shape): int64 `1000 * sigma`, truncated.

    As the Wan pipeline passes them: `UniPCMultistepScheduler(use_flow_sigmas=True)` computes
    `sigma * 1000` in float64 and casts to int64 (the authors' rollouts and training use those).
    The sigmas must be float64: a float32 sigma can truncate to the integer below (0.95 is
    0.9499999881 in float32), and the rollout and the trainer must give the model the same time.
    """
    if sigmas.dtype != torch.float64:
        raise TypeError(f"transformer timesteps need float64 sigmas (as diffusers computes them), got {sigmas.dtype}")
    return (sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)


def timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """Transformer timesteps for the N steps of a float64 schedule (the final sigma 0 has none), int64 [N]."""
    return transformer_timesteps(sigmas[:-1])
