"""Rewards: one protocol (videos uint8 [B, F, H, W, 3], prompts, metadata -> scores [B] + info),
a name -> factory registry, offline rewards that need no weights, and weighted combinations.

Importing this package registers every reward: the offline ones (``offline.py``), the model
rewards loaded lazily from local paths (``clip.py``: clip_score, pickscore, hpsv2; ``hpsv3.py``:
hpsv3; ``videoalign.py``: videoalign; ``ocr.py``: ocr; ``brisque.py``: brisque) and ``remote`` (``client.py``,
a reward served by ``python -m flash_grpo_core.rewards.server``). Heavy libraries are imported
only when a reward first loads its model.
"""

from flash_grpo_core.rewards import brisque, client, clip, hpsv3, ocr, offline, videoalign
from flash_grpo_core.rewards.base import (
    Reward,
    RewardError,
    RewardOutput,
    ScaleGuard,
    aggregate_frames,
    available_rewards,
    build_reward,
    check_reward_params,
    check_videos,
    register,
    select_frames,
    validate_output,
)
from flash_grpo_core.rewards.client import RemoteReward
from flash_grpo_core.rewards.clip import CLIPReward, HPSv2Reward, PickScoreReward
from flash_grpo_core.rewards.combined import WeightedReward, build_weighted_reward
from flash_grpo_core.rewards.brisque import BRISQUEReward
from flash_grpo_core.rewards.ocr import OCRReward
from flash_grpo_core.rewards.offline import (
    Brightness,
    Colorfulness,
    ColorMatch,
    MotionMagnitude,
    Sharpness,
    TemporalConsistency,
    luminance,
)
from flash_grpo_core.rewards.videoalign import VideoAlignReward
from flash_grpo_core.rewards.hpsv3 import HPSv3Reward

__all__ = [
    "BRISQUEReward",
    "Brightness",
    "CLIPReward",
    "ColorMatch",
    "Colorfulness",
    "HPSv2Reward",
    "HPSv3Reward",
    "MotionMagnitude",
    "OCRReward",
    "PickScoreReward",
    "RemoteReward",
    "Reward",
    "RewardError",
    "RewardOutput",
    "ScaleGuard",
    "Sharpness",
    "TemporalConsistency",
    "VideoAlignReward",
    "WeightedReward",
    "aggregate_frames",
    "available_rewards",
    "build_reward",
    "build_weighted_reward",
    "check_reward_params",
    "check_videos",
    "brisque",
    "client",
    "clip",
    "luminance",
    "hpsv3",
    "ocr",
    "offline",
    "register",
    "select_frames",
    "validate_output",
    "videoalign",
]
