"""Rewards: one protocol (videos uint8 [B, F, H, W, 3], prompts, metadata -> scores [B] + info),
a name -> factory registry, offline rewards that need no weights, and weighted combinations.

Importing this package registers the offline rewards (see ``offline.py``).
"""

from flash_grpo_core.rewards import offline
from flash_grpo_core.rewards.base import (
    Reward,
    RewardError,
    RewardOutput,
    ScaleGuard,
    aggregate_frames,
    available_rewards,
    build_reward,
    check_videos,
    register,
    select_frames,
    validate_output,
)
from flash_grpo_core.rewards.combined import WeightedReward, build_weighted_reward
from flash_grpo_core.rewards.offline import (
    Brightness,
    Colorfulness,
    ColorMatch,
    MotionMagnitude,
    Sharpness,
    TemporalConsistency,
    luminance,
)

__all__ = [
    "Brightness",
    "ColorMatch",
    "Colorfulness",
    "MotionMagnitude",
    "Reward",
    "RewardError",
    "RewardOutput",
    "ScaleGuard",
    "Sharpness",
    "TemporalConsistency",
    "WeightedReward",
    "aggregate_frames",
    "available_rewards",
    "build_reward",
    "build_weighted_reward",
    "check_videos",
    "luminance",
    "offline",
    "register",
    "select_frames",
    "validate_output",
]
