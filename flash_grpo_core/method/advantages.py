"""Group-relative advantages (SPEC section 5).

A_i = (r_i - mean over the prompt's group) / (std + 1e-4), clipped to +-adv_clip. The std is the
population std over the whole global batch (all prompts, all ranks) by default, or over the
prompt's own group (`std_scope="group"`).
"""

from __future__ import annotations

import torch

from flash_grpo_core.method.choices import STD_SCOPES
from flash_grpo_core.method.reductions import global_std


class NonFiniteError(ValueError):
    """A reward, advantage or loss that is NaN or infinite."""


def check_finite(name: str, values: torch.Tensor) -> None:
    """Raise NonFiniteError naming `name` and the offending flat indices."""
    bad = ~torch.isfinite(values)
    if bad.any():
        where = torch.nonzero(bad.reshape(-1)).flatten().tolist()
        raise NonFiniteError(f"{name} contains {len(where)} non-finite value(s) (NaN or inf) at flat indices {where[:10]}")


def group_advantages(
    rewards: torch.Tensor, std_scope: str = "batch", clip: float = 5.0, eps: float = 1e-4
) -> torch.Tensor:
    """Advantages float32 [B, G] from rewards [B, G]."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group], got shape {tuple(rewards.shape)}")
    check_finite("rewards", rewards)
    rewards = rewards.double()
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [B, G]
    if std_scope == "batch":
        std = global_std(rewards)
    elif std_scope == "group":
        std = rewards.std(dim=1, unbiased=False, keepdim=True)  # [B, 1]
    else:
        raise ValueError(f"unknown std_scope {std_scope!r}; expected one of {STD_SCOPES}")
    return (centred / (std + eps)).clamp(-clip, clip).float()
