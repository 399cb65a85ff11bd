"""The toy task's reward `toy_following`: rule-based and dense, three components in [0, 1], each
reported alone: `color` (the object's colour vs the prompt's), `single` (one compact object of the
right size), `motion` (the object's centroid moving in the prompted direction at the prompted speed).
"""

from __future__ import annotations

import math

import torch

from flash_grpo_core.rewards.base import RewardOutput, check_videos, register
from flash_grpo_core.tasks.toy.data import DIRECTIONS, PALETTE, parse_prompt


@register("toy_following")
class ToyFollowingReward:
    """Rule-based prompt following for the toy task; components in [0, 1], total their weighted mean.

    - `color`: per frame, 1 - distance between the object pixels' mean colour and the prompt's
      colour (normalised by the largest possible distance); 0 for a frame with no object.
    - `single`: per frame, exp(-|pixels - square^2| / square^2) x the fraction of object pixels
      within a box of side square + 2 around their centroid: one compact square of the right size.
    - `motion`: exp(-|v - speed d|^2 / speed^2) for the centroid's mean velocity v between the first
      and last frames with an object and the prompted direction d (0.37 for a static object).
    Hacking it: a bigger or brighter blob keeps `color` while losing `single`; the benchmark reports
    each component so such a trade is visible.
    """

    name = "toy_following"

    def __init__(self, square: int = 4, speed: int = 1, threshold: int = 100,
                 weights: dict[str, float] | None = None, frame_stride: int = 1):
        self.square, self.speed, self.threshold = square, speed, threshold
        self.weights = weights or {"color": 1.0, "single": 1.0, "motion": 1.0}

    def __call__(self, videos: torch.Tensor, prompts: list[str], metadata=None) -> RewardOutput:
        check_videos(videos)
        frames = videos.float()  # [B, F, H, W, 3]
        mask = frames.amax(dim=-1) > self.threshold  # [B, F, H, W] object pixels
        count = mask.sum(dim=(2, 3)).float()  # [B, F]
        present = count > 0
        targets = torch.tensor([PALETTE[parse_prompt(p)[0]] for p in prompts], dtype=torch.float32)  # [B, 3]
        directions = torch.tensor([DIRECTIONS[parse_prompt(p)[1]] for p in prompts], dtype=torch.float32)
        mean_rgb = (frames * mask.unsqueeze(-1)).sum(dim=(2, 3)) / count.clamp(min=1).unsqueeze(-1)  # [B, F, 3]
        distance = (mean_rgb - targets.unsqueeze(1)).norm(dim=-1) / (255 * math.sqrt(3))
        color = ((1 - distance) * present).mean(dim=1)
        centroid = self._centroids(mask, count)  # [B, F, 2] (y, x)
        single = (self._compactness(mask, centroid, count) * present).mean(dim=1)
        motion = self._motion(centroid, present, directions)
        components = {"color": color, "single": single, "motion": motion}
        total = sum(self.weights[k] * components[k] for k in self.weights) / sum(self.weights.values())
        return RewardOutput(scores=total.float(), info={k: v.float() for k, v in components.items()})

    @staticmethod
    def _centroids(mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        height, width = mask.shape[-2:]
        ys = torch.arange(height, dtype=torch.float32).view(1, 1, -1, 1)
        xs = torch.arange(width, dtype=torch.float32).view(1, 1, 1, -1)
        denominator = count.clamp(min=1)
        return torch.stack([(mask * ys).sum(dim=(2, 3)) / denominator, (mask * xs).sum(dim=(2, 3)) / denominator], -1)

    def _compactness(self, mask: torch.Tensor, centroid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        height, width = mask.shape[-2:]
        ys = torch.arange(height, dtype=torch.float32).view(1, 1, -1, 1)
        xs = torch.arange(width, dtype=torch.float32).view(1, 1, 1, -1)
        half = self.square / 2 + 1
        inside = ((ys - centroid[..., 0, None, None]).abs() <= half) & ((xs - centroid[..., 1, None, None]).abs() <= half)
        fraction = (mask & inside).sum(dim=(2, 3)) / count.clamp(min=1)  # [B, F]
        area = self.square**2
        return torch.exp(-(count - area).abs() / area) * fraction

    def _motion(self, centroid: torch.Tensor, present: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(centroid.shape[0])
        for b in range(centroid.shape[0]):
            frames = torch.nonzero(present[b]).flatten()
            if len(frames) < 2:
                continue
            first, last = frames[0], frames[-1]
            velocity = (centroid[b, last] - centroid[b, first]) / (last - first).float()  # (vy, vx) per frame
            error = (velocity - self.speed * directions[b]).pow(2).sum() / max(self.speed, 1) ** 2
            scores[b] = torch.exp(-error)
        return scores
