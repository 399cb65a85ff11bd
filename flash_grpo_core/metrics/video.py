"""Weight-free VBench-style video dimensions: temporal flickering, motion smoothness, dynamic degree
(the last two on Farneback flow, hence the `_flow` names).

All take uint8 videos [B, F, H, W, 3] (a torch tensor or numpy array) and return one float per
video. Definitions follow VBench (Huang et al. 2024, ``vbench/<dimension>.py``); departures:

- ``temporal_flickering``: VBench's formula exactly, (255 - mean |f_{i+1} - f_i|) / 255 with the
  mean over consecutive-frame pairs, pixels and channels. VBench reads the frames back from a
  compressed mp4 and scores only videos its static filter keeps; we score the decoded frames of
  every video (no codec noise, no static filter), so a moving video scores lower here than it
  would ever be scored in VBench.
- ``motion_smoothness_flow``: VBench's ``motion_smoothness`` drops the odd frames, re-creates
  each one with the AMT-S frame-interpolation network from its two even neighbours, and scores
  (255 - mean |interpolated - real|) / 255. AMT needs weights, so we interpolate with OpenCV's
  Farneback optical flow instead (backward warps of both neighbours to the midpoint, Super
  SloMo's t = 1/2 flow approximation, averaged). Same frame selection and scaling, different
  interpolator: the values are not comparable with VBench's numbers, hence the different name.
- ``dynamic_degree_flow``: VBench's ``dynamic_degree`` decision rule (Vchitect/VBench
  ``vbench/dynamic_degree.py``, commit 4692f32) on Farneback flow instead of RAFT, so its values
  are not VBench's and carry another name. Frames are subsampled to about 8 fps
  (``interval = max(1, round(fps / 8))``); per consecutive pair the score is the mean of the top
  5% flow magnitudes; a video is dynamic when at least ``round(4 * count / 16)`` pairs
  (count = kept frames) exceed ``6 * min(H, W) / 256`` pixels (VBench's ``set_params``; it has no
  frame-rate factor). We floor the pair count and the top-5% size at 1 (VBench's rule says every
  2-frame video is dynamic, and a tiny frame has no top 5%). Farneback underestimates very large
  displacements where RAFT does not.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def as_numpy_videos(videos) -> np.ndarray:
    """uint8 videos [B, F, H, W, 3] as a numpy array; ValueError for anything else."""
    array = videos.detach().cpu().numpy() if hasattr(videos, "detach") else np.asarray(videos)
    if array.dtype != np.uint8 or array.ndim != 5 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 videos [B, F, H, W, 3], got {array.dtype} {tuple(array.shape)}")
    if array.shape[1] < 2:
        raise ValueError(f"video metrics need at least 2 frames per video, got {array.shape[1]}")
    return array


# ---------------------------------------------------------------------------------------------
# Temporal flickering


def temporal_flickering(videos) -> list[float]:
    """VBench temporal flickering per video: (255 - mean abs diff of consecutive frames) / 255."""
    array = as_numpy_videos(videos)
    scores = []
    for video in array:
        frames = video.astype(np.int16)  # [F, H, W, 3]; int16 holds -255..255 exactly
        mean_abs_diff = float(np.abs(frames[1:] - frames[:-1]).mean(axis=(1, 2, 3)).mean())
        scores.append((255.0 - mean_abs_diff) / 255.0)
    return scores


# ---------------------------------------------------------------------------------------------
# Optical flow


def grey(frame: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 grey [H, W]."""
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def farneback(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Dense flow [H, W, 2] (x, y) from grey frame ``first`` to ``second``: first(p) ~ second(p + flow(p)).

    Pyramid levels and window grow with resolution so that tiny test videos and 480p videos both
    get a usable search range (Farneback's defaults are tuned for about 640x480).
    """
    import cv2

    short_side = min(first.shape)
    levels = max(1, min(5, int(math.log2(max(short_side, 16) / 16)) + 1))
    window = max(5, min(21, short_side // 16 * 2 + 1))
    return cv2.calcOpticalFlowFarneback(first, second, None, pyr_scale=0.5, levels=levels, winsize=window,
                                        iterations=3, poly_n=5, poly_sigma=1.1, flags=0)


def backward_warp(frame: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """frame sampled at p + flow(p): [H, W, 3] uint8, flow [H, W, 2] -> [H, W, 3] float32."""
    import cv2

    height, width = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return cv2.remap(frame.astype(np.float32), grid_x + flow[..., 0], grid_y + flow[..., 1],
                     interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def interpolate_midpoint(frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
    """The frame halfway between two uint8 RGB frames [H, W, 3], by flow warping -> uint8 [H, W, 3].

    With F01, F10 the flows between the frames, Super SloMo's approximation at t = 1/2 gives the
    flows from the midpoint F_t0 = (F10 - F01) / 4 and F_t1 = (F01 - F10) / 4; the midpoint is the
    mean of both frames warped along them. Linear motion by d gives F_t0 = -d/2, F_t1 = d/2.
    """
    grey0, grey1 = grey(frame0), grey(frame1)
    flow01 = farneback(grey0, grey1)  # [H, W, 2]
    flow10 = farneback(grey1, grey0)  # [H, W, 2]
    flow_t0 = (flow10 - flow01) / 4.0
    flow_t1 = (flow01 - flow10) / 4.0
    midpoint = 0.5 * backward_warp(frame0, flow_t0) + 0.5 * backward_warp(frame1, flow_t1)
    return np.clip(np.rint(midpoint), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Motion smoothness (flow stand-in for VBench's AMT interpolation)


def motion_smoothness_flow(videos) -> list[float]:
    """Per video: (255 - mean |interpolated odd frame - real odd frame|) / 255, VBench's frame selection.

    Even frames 0, 2, 4, ... are kept; the midpoint of each consecutive pair of them is compared
    with the real odd frame between them. Needs at least 3 frames.
    """
    array = as_numpy_videos(videos)
    if array.shape[1] < 3:
        raise ValueError(f"motion_smoothness_flow needs at least 3 frames per video, got {array.shape[1]}")
    scores = []
    for video in array:
        differences = []
        for index in range(1, video.shape[0] - 1, 2):
            predicted = interpolate_midpoint(video[index - 1], video[index + 1])  # [H, W, 3]
            real = video[index]
            differences.append(float(np.abs(predicted.astype(np.float32) - real.astype(np.float32)).mean()))
        scores.append((255.0 - float(np.mean(differences))) / 255.0)
    return scores


# ---------------------------------------------------------------------------------------------
# Dynamic degree


def dynamic_thresholds(num_frames: int, height: int, width: int) -> tuple[float, int]:
    """VBench's (flow threshold in pixels, number of pairs that must exceed it) for kept frames."""
    threshold = 6.0 * (min(height, width) / 256.0)
    count_needed = max(1, round(4 * (num_frames / 16.0)))
    return threshold, count_needed


def top_flow_magnitude(flow: np.ndarray, fraction: float = 0.05) -> float:
    """Mean of the largest ``fraction`` of flow magnitudes (VBench's per-pair motion score)."""
    magnitude = np.sqrt((flow.astype(np.float64) ** 2).sum(axis=-1)).ravel()  # [H * W]
    keep = max(1, int(magnitude.size * fraction))
    return float(np.sort(magnitude)[-keep:].mean())


def dynamic_degree_flow(videos, fps: float = 16.0) -> list[bool]:
    """Per video: True when enough frame pairs move more than VBench's resolution-scaled threshold.

    fps: the videos' frame rate (Wan 2.1 generates 16 fps); frames are subsampled to ~8 fps as
    VBench does before the flow is computed.
    """
    if fps <= 0:
        raise ValueError(f"dynamic_degree_flow: fps must be positive, got {fps}")
    array = as_numpy_videos(videos)
    interval = max(1, round(fps / 8.0))
    results = []
    for video in array:
        frames = [grey(frame) for frame in video[::interval]]
        threshold, count_needed = dynamic_thresholds(len(frames), *frames[0].shape)
        moving = sum(top_flow_magnitude(farneback(a, b)) > threshold for a, b in itertools.pairwise(frames))
        results.append(bool(moving >= count_needed))
    return results
