"""Rewards that need no model weights: image statistics, motion, and a toy prompt-following score.

They exist for laptops, CI and smoke runs (a tiny model on CPU can be trained to make brighter or
redder videos in minutes) and as regularisers next to a learned reward. None of them is in the
paper, which trains on HPSv3 and evaluates with VBench; they are deliberately simple and each
class says how it can be hacked, because a policy trained on one alone will find the hack.

Every reward takes uint8 videos [B, F, H, W, 3] on CPU, optionally keeps every
``frame_stride``-th frame first, and returns float32 scores [B]. Pixel maths is done in float32
on the whole batch at once, which costs 12 bytes per input pixel; raise ``frame_stride`` for
long, large videos.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F_nn

from flash_grpo_core.rewards.base import (
    RewardError,
    RewardOutput,
    aggregate_frames,
    check_videos,
    register,
    select_frames,
    validate_output,
)

# ITU-R BT.601 luma weights for R, G, B
BT601 = (0.299, 0.587, 0.114)

# log1p of the largest possible Laplacian variance on a 0..255 grey frame: the 3x3 Laplacian of
# such a frame lies in [-1020, 1020], and a variable in [a, b] has variance <= (b - a)^2 / 4
MAX_LOG_LAPLACIAN_VAR = math.log1p(1020.0**2)


def luminance(frames: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of float RGB [..., 3] -> [...], in the input's units."""
    weights = torch.tensor(BT601, dtype=frames.dtype)
    return (frames * weights).sum(dim=-1)


class FrameReward:
    """Shared call path: check input, subsample frames, score, validate output."""

    name = "frame_reward"

    def __init__(self, frame_stride: int = 1) -> None:
        if not isinstance(frame_stride, int) or frame_stride < 1:
            raise ValueError(
                f"{self.name}: frame_stride must be a positive integer, got {frame_stride!r}"
            )
        self.frame_stride = frame_stride

    def __call__(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> RewardOutput:
        check_videos(videos, prompts)
        videos = select_frames(videos, self.frame_stride)  # [B, F', H, W, 3]
        output = self.score(videos, prompts)
        return validate_output(self.name, output, videos.shape[0])

    def score(self, videos: torch.Tensor, prompts: list[str]) -> RewardOutput:
        raise NotImplementedError


@register("brightness")
class Brightness(FrameReward):
    """Mean BT.601 luminance over all pixels and frames, in [0, 1].

    Hack: a white (or blown-out) video scores 1 whatever the prompt.
    """

    name = "brightness"

    def score(self, videos: torch.Tensor, prompts: list[str]) -> RewardOutput:
        luma = luminance(videos.float() / 255.0)  # [B, F, H, W]
        return RewardOutput(scores=luma.mean(dim=(1, 2, 3)))


@register("colorfulness")
class Colorfulness(FrameReward):
    """Hasler & Süsstrunk (2003) colourfulness per frame, averaged over frames, divided by 100.

    On 0..255 RGB: rg = R - G, yb = (R + G) / 2 - B,
    M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)  (population std).
    The paper calls M > 109 "extremely colourful", so M / 100 is roughly in [0, 1] for natural
    video; it is not clipped and reaches about 1.5-2 for saturated synthetic patterns. Grey
    videos score exactly 0. ``info["colorfulness_raw"]`` holds M (not divided).

    Hack: saturated colour noise or stripes of complementary colours.
    """

    name = "colorfulness"

    def score(self, videos: torch.Tensor, prompts: list[str]) -> RewardOutput:
        rgb = videos.float()  # [B, F, H, W, 3], 0..255
        red, green, blue = rgb.unbind(dim=-1)  # each [B, F, H, W]
        rg = (red - green).flatten(2)  # [B, F, H*W]
        yb = (0.5 * (red + green) - blue).flatten(2)  # [B, F, H*W]
        spread = torch.sqrt(rg.var(dim=2, correction=0) + yb.var(dim=2, correction=0))  # [B, F]
        offset = torch.sqrt(rg.mean(dim=2) ** 2 + yb.mean(dim=2) ** 2)  # [B, F]
        raw = aggregate_frames(spread + 0.3 * offset, "mean")  # [B]
        return RewardOutput(scores=raw / 100.0, info={"colorfulness_raw": raw})


@register("sharpness")
class Sharpness(FrameReward):
    """Variance of the 3x3 Laplacian of the grey frame, log1p-scaled and normalised to [0, 1].

    Per frame: grey = BT.601 luma on 0..255; lap = conv2d(grey, [[0,1,0],[1,-4,1],[0,1,0]]) over
    the valid interior (no padding, so frame borders add no false edges); score =
    log1p(var(lap)) / log1p(1020^2), 1020^2 being the largest possible variance. Averaged over
    frames. ``info["laplacian_var"]`` holds the frame-averaged raw variance.

    Hack: high-frequency noise or fine checkerboards are maximally "sharp".
    """

    name = "sharpness"

    def score(self, videos: torch.Tensor, prompts: list[str]) -> RewardOutput:
        batch, frames, height, width, _ = videos.shape
        if height < 3 or width < 3:
            raise RewardError(
                f"sharpness needs frames of at least 3x3 pixels, got {height}x{width}"
            )
        grey = luminance(videos.float()).reshape(batch * frames, 1, height, width)  # [B*F, 1, H, W]
        kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
        laplacian = F_nn.conv2d(grey, kernel)  # [B*F, 1, H-2, W-2]
        variance = laplacian.flatten(1).var(dim=1, correction=0).view(batch, frames)  # [B, F]
        scores = aggregate_frames(torch.log1p(variance) / MAX_LOG_LAPLACIAN_VAR, "mean")  # [B]
        return RewardOutput(scores=scores, info={"laplacian_var": variance.mean(dim=1)})


@register("temporal_consistency")
class TemporalConsistency(FrameReward):
    """1 - mean absolute difference of consecutive frames on a 0..1 scale, in [0, 1].

    1.0 for a static or single-frame video, 0.0 for frames alternating black and white.
    Hack: a frozen video is perfectly consistent; pair it with a motion reward.
    """

    name = "temporal_consistency"

    def score(self, videos: torch.Tensor, prompts: list[str]) -> RewardOutput:
        if videos.shape[1] < 2:
            return RewardOutput(scores=torch.ones(videos.shape[0]))
        rgb = videos.float() / 255.0  # [B, F, H, W, 3]
        change = (rgb[:, 1:] - rgb[:, :-1]).abs().mean(dim=(2, 3, 4))  # [B, F-1]
        return RewardOutput(scores=1.0 - change.mean(dim=1))


def import_cv2():
    """OpenCV, or an ImportError saying which package to install."""
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(
            "the motion_magnitude reward needs OpenCV: pip install opencv-python-headless"
        ) from exc
    return cv2


@register("motion_magnitude")
class MotionMagnitude(FrameReward):
    """Mean Farneback optical-flow magnitude between consecutive grey frames, in pixels per frame.

    The magnitude is averaged over every pixel of every consecutive pair, so an object moving
    2 px/frame over a still, flat background scores 2 times the fraction of the frame it (and
    its blurred flow field) covers. 0.0 for a single frame. With ``frame_stride`` s, the flow is
    between frames s apart and so grows about s-fold. OpenCV (``opencv-python-headless``) is
    required; it runs frame pair by frame pair on CPU.

    Hack: flicker, noise or camera shake; pair it with temporal_consistency.
    """

    name = "motion_magnitude"
    # pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags: OpenCV's documented example
    FARNEBACK_ARGS = (0.5, 3, 15, 3, 5, 1.2, 0)

    def __init__(self, frame_stride: int = 1) -> None:
        super().__init__(frame_stride)
        self.cv2 = import_cv2()

    def score(self, videos: torch.Tensor, prompts: list[str]) -> RewardOutput:
        batch, frames = videos.shape[:2]
        if frames < 2:
            return RewardOutput(scores=torch.zeros(batch))
        grey = luminance(videos.float()).round().clamp(0, 255)  # [B, F, H, W], BT.601 like OpenCV
        grey = grey.to(torch.uint8).numpy()
        pair_means = torch.zeros(batch, frames - 1)  # [B, F-1]
        for b in range(batch):
            for t in range(frames - 1):
                flow = self.cv2.calcOpticalFlowFarneback(
                    grey[b, t], grey[b, t + 1], None, *self.FARNEBACK_ARGS
                )  # [H, W, 2], (dx, dy) in pixels
                pair_means[b, t] = float(torch.from_numpy(flow).norm(dim=-1).mean())
        return RewardOutput(scores=pair_means.mean(dim=1))


# Target colours, RGB on 0..1. Achromatic ones are compared with the whole video's mean colour.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "pink": (1.0, 0.75, 0.8),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "grey": (0.5, 0.5, 0.5),
    "gray": (0.5, 0.5, 0.5),
}
ACHROMATIC = frozenset({"white", "black", "grey", "gray"})
COLOR_PATTERN = re.compile(r"\b(" + "|".join(COLORS) + r")\b")


def prompt_color(prompt: str) -> str | None:
    """The first colour word in the prompt (case-insensitive), or None."""
    match = COLOR_PATTERN.search(prompt.lower())
    return match.group(1) if match else None


@register("color_match")
class ColorMatch(FrameReward):
    """Toy prompt-following reward: does the video's salient colour match the prompt's colour word?

    The first word of ``COLORS`` in the prompt is the target. The observed colour is the mean RGB
    of the ``top_fraction`` most saturated pixels (chroma = max(R,G,B) - min(R,G,B)) over all
    frames; for white / black / grey targets, the whole video's mean RGB. Score =
    1 - |observed - target| / sqrt(3), in [0, 1]. Prompts with no colour word score 0 with
    ``info["matched"] = 0``. ``info["observed_rgb"]`` is [B, 3].

    Hack: paint a small patch in the target colour; nothing checks the object or its shape.
    """

    name = "color_match"

    def __init__(self, frame_stride: int = 1, top_fraction: float = 0.1) -> None:
        super().__init__(frame_stride)
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"color_match: top_fraction must be in (0, 1], got {top_fraction}")
        self.top_fraction = top_fraction

    def score(self, videos: torch.Tensor, prompts: list[str]) -> RewardOutput:
        colors = [prompt_color(prompt) for prompt in prompts]
        rgb = videos.float().flatten(1, 3) / 255.0  # [B, P = F*H*W, 3]
        chroma = rgb.max(dim=-1).values - rgb.min(dim=-1).values  # [B, P]
        k = max(1, math.ceil(self.top_fraction * rgb.shape[1]))
        top = chroma.topk(k, dim=1).indices  # [B, k]
        salient = rgb.gather(1, top.unsqueeze(-1).expand(-1, -1, 3)).mean(dim=1)  # [B, 3]
        achromatic = torch.tensor([color in ACHROMATIC for color in colors])  # [B]
        observed = torch.where(achromatic[:, None], rgb.mean(dim=1), salient)  # [B, 3]
        target = torch.tensor([COLORS.get(color, (0.0, 0.0, 0.0)) for color in colors])  # [B, 3]
        distance = (observed - target).norm(dim=-1) / math.sqrt(3.0)  # [B]
        matched = torch.tensor([color is not None for color in colors], dtype=torch.float32)  # [B]
        scores = matched * (1.0 - distance)  # [B]
        return RewardOutput(scores=scores, info={"matched": matched, "observed_rgb": observed})
