"""``brisque``: BRISQUE no-reference image quality (Mittal et al. 2012; an SVR on natural scene
statistics), through the ``brisque`` package, whose SVR model ships in its wheel. Reward per
frame = -BRISQUE / 100 (BRISQUE is about 0 for pristine and 100+ for badly distorted images,
so the reward is about 0 to -1, higher is better). The package's ``score`` breaks on numpy 2
(its features are 1-element arrays), so we call its feature and SVR steps and flatten the
features in between, without patching it. A flat frame has no defined statistics (0 / 0):
it gets ``undefined_score`` (default 100, i.e. reward -1), counted in
``info["undefined_frames"]``. Hack: BRISQUE rewards natural-image statistics, not content;
a policy can learn photographic-looking texture unrelated to the prompt.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from flash_grpo_core.rewards.base import RewardOutput, aggregate_frames, register
from flash_grpo_core.rewards.model_base import FrameModelReward, import_optional


@register("brisque")
class BRISQUEReward(FrameModelReward):
    """-BRISQUE / 100 per frame, aggregated over frames (see the module docstring)."""

    name = "brisque"

    def __init__(self, undefined_score: float = 100.0, **kwargs: Any) -> None:
        kwargs.setdefault("device", "cpu")
        super().__init__(**kwargs)
        self.undefined_score = float(undefined_score)

    def load(self) -> None:
        self.cv2 = import_optional("cv2", self.name, "opencv-python-headless")
        self.color = import_optional("skimage.color", self.name, "scikit-image")
        brisque = import_optional("brisque", self.name, "brisque")
        self.model = brisque.BRISQUE(url=False)

    def brisque(self, frame: np.ndarray) -> float | None:
        """BRISQUE of one RGB frame [H, W, 3] as the package computes it; None when undefined."""
        grey = self.color.rgb2gray(frame)  # [H, W] float64 in [0, 1]
        half = self.cv2.resize(grey, None, fx=0.5, fy=0.5, interpolation=self.cv2.INTER_CUBIC)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            parts = [*self.model.calculate_brisque_features(grey, 7, 7 / 6),
                     *self.model.calculate_brisque_features(half, 7, 7 / 6)]
            features = np.concatenate([np.ravel(np.asarray(part, dtype=np.float64)) for part in parts])  # [36]
            if not np.isfinite(features).all():
                return None
            value = float(self.model.calculate_image_quality_score(features))
        return value if np.isfinite(value) else None

    def score(self, videos: torch.Tensor, prompts: list[str], metadata: list[dict] | None) -> RewardOutput:
        batch, frames = videos.shape[:2]
        values = [self.brisque(frame) for frame in videos.reshape(-1, *videos.shape[2:]).numpy()]
        undefined = torch.tensor([value is None for value in values], dtype=torch.float32)
        raw = torch.tensor([self.undefined_score if value is None else value for value in values])
        raw = raw.float().view(batch, frames)  # [B, F'], BRISQUE
        scores = aggregate_frames(-raw / 100.0, self.aggregate, self.top_fraction)  # [B]
        info = {"brisque_raw": raw.mean(dim=1), "undefined_frames": undefined.view(batch, frames).sum(dim=1)}
        return RewardOutput(scores=scores, info=info)
