"""``ocr``: Flow-GRPO's text-rendering reward applied to frames. The target is the text between
the first pair of double quotes in the prompt; per frame, with OCR text r and target t (both
lower-cased, spaces removed): d = 0 if t is a substring of r, else min(Levenshtein(r, t),
len(t)); frame score = 1 - d / len(t), in [0, 1]. Frames are aggregated (default: mean over
the kept frames). A prompt without quoted text scores 0 (``info["has_target"] = 0``).
OCR runs ``rapidocr`` (3.x) on ONNX Runtime with the PP-OCR detection / recognition models
shipped in its wheel. We chose ``rapidocr`` over ``rapidocr-onnxruntime`` (1.4) because the
latter requires the GUI build ``opencv-python``, which clashes with the
``opencv-python-headless`` this project uses; and over Flow-GRPO's ``paddleocr``, which
downloads its models at run time. Hack: text pasted anywhere (a caption bar) scores fully.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from flash_grpo_core.rewards.base import RewardOutput, register
from flash_grpo_core.rewards.model_base import FrameModelReward, import_optional

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
