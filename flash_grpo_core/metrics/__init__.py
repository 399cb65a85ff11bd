"""Evaluation metrics: VBench-style dimensions on generated videos, by name, with one result shape.

    evaluate_videos(videos uint8 [B, F, H, W, 3], prompts (len B), config {name: {option: value}})
        -> {name: {"status": "ok", "per_video": [B values], "mean": float}
                | {"status": "not configured", "reason": str}}

Every registered dimension runs unless its options say ``enabled: false``. Weight-free ones
(``temporal_flickering``, ``motion_smoothness_flow``, ``dynamic_degree_flow``) always run; ``brisque``
runs where its package is installed; the model-based ones (``subject_consistency``,
``background_consistency``, ``aesthetic_quality``, ``imaging_quality``) run when their local weight
paths are set, and otherwise report "not configured" with the key to set, never a made-up number.
A path that is set but does not exist raises an error naming it. Definitions and departures from
VBench: ``video.py``, ``features.py`` and docs/evaluation.md.

``reward_entries`` turns a training reward's output into entries of the same shape, and
``summary`` flattens results to {name: mean} for ``metrics.json`` / ``dvc metrics diff``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from flash_grpo_core.metrics import features, video
from flash_grpo_core.metrics.features import MetricUnavailable, clear_model_cache


@dataclass(frozen=True)
class Dimension:
    """One metric: how to compute it per video, which options must be set, and how to read it."""

    name: str
    compute: Callable[..., list]  # (videos uint8 [B, F, H, W, 3], **options) -> B values
    required: tuple[str, ...] = ()  # option keys (local weight paths) without which it is skipped
    higher_is_better: bool = True
    vbench: str | None = None  # the VBench dimension it implements, None if not VBench's
    takes_prompts: bool = False


DIMENSIONS: dict[str, Dimension] = {
    dimension.name: dimension
    for dimension in (
        Dimension("subject_consistency", features.subject_consistency, ("path",), vbench="subject_consistency"),
        Dimension("background_consistency", features.background_consistency, ("path",),
                  vbench="background_consistency"),
        Dimension("temporal_flickering", video.temporal_flickering, vbench="temporal_flickering"),
        Dimension("motion_smoothness_flow", video.motion_smoothness_flow,
                  vbench="motion_smoothness (Farneback interpolation instead of AMT)"),
        Dimension("dynamic_degree_flow", video.dynamic_degree_flow,
                  vbench="dynamic_degree (Farneback instead of RAFT)"),
        Dimension("aesthetic_quality", features.aesthetic_quality, ("path", "head_path"), vbench="aesthetic_quality"),
        Dimension("imaging_quality", features.imaging_quality, ("path",), vbench="imaging_quality"),
        Dimension("brisque", features.brisque, higher_is_better=False, takes_prompts=True),
    )
}


def available_metrics() -> list[str]:
    """Registered dimension names, in evaluation order."""
    return list(DIMENSIONS)


def not_configured(reason: str) -> dict:
    return {"status": "not configured", "reason": reason}


def entry(per_video: list) -> dict:
    """An "ok" result from per-video values (bools count as 0 / 1 in the mean)."""
    values = [bool(value) if isinstance(value, bool) else float(value) for value in per_video]
    mean = sum(float(value) for value in values) / len(values) if values else float("nan")
    return {"status": "ok", "per_video": values, "mean": mean}


def check_options(dimension: Dimension, options: dict) -> None:
    """ValueError naming ``eval.metrics.<name>.<key>`` for an option the dimension does not take."""
    accepted = set(inspect.signature(dimension.compute).parameters) - {"videos", "prompts"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"eval.metrics.{dimension.name}: unknown option(s) {unknown}; "
                         f"accepted: {sorted(accepted)}")


def run_dimension(dimension: Dimension, videos, prompts: list[str], options: dict) -> dict:
    """One dimension's result entry (see the module docstring)."""
    missing = [key for key in dimension.required if options.get(key) in (None, "")]
    if missing:
        keys = " and ".join(f"eval.metrics.{dimension.name}.{key}" for key in missing)
        return not_configured(f"set {keys} (local weights; nothing is downloaded)")
    check_options(dimension, options)
    extra = {"prompts": prompts} if dimension.takes_prompts else {}
    try:
        return entry(dimension.compute(videos, **extra, **options))
    except MetricUnavailable as exc:
        return not_configured(str(exc))


def evaluate_videos(videos, prompts: list[str], config: dict[str, dict] | None = None) -> dict[str, dict]:
    """Every registered dimension on uint8 videos [B, F, H, W, 3]; see the module docstring."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(DIMENSIONS))
    if unknown:
        raise KeyError(f"unknown eval.metrics {unknown}; available: {available_metrics()}")
    array = video.as_numpy_videos(videos)  # [B, F, H, W, 3]
    if len(prompts) != array.shape[0]:
        raise ValueError(f"got {array.shape[0]} videos but {len(prompts)} prompts")
    results = {}
    for name, dimension in DIMENSIONS.items():
        options = dict(config.get(name) or {})
        if not options.pop("enabled", True):
            continue
        results[name] = run_dimension(dimension, array, list(prompts), options)
    return results


def reward_entries(output, name: str = "reward") -> dict[str, dict]:
    """A RewardOutput as entries: ``name`` for the scores [B], ``name/<key>`` for each info tensor [B]."""
    results = {name: entry(output.scores.float().tolist())}
    for key, values in output.info.items():
        results[f"{name}/{key}"] = entry(values.float().flatten().tolist())
    return results


def merge_results(parts: list[dict[str, dict]]) -> dict[str, dict]:
    """Results of consecutive slices of the videos (e.g. one per rank's prompts) as one result:
    "ok" entries join their per-video values in order; other entries are the same in every part."""
    merged = {}
    for name, first in parts[0].items():
        if first.get("status") == "ok":
            merged[name] = entry([value for part in parts for value in part[name]["per_video"]])
        else:
            merged[name] = first
    return merged


def summary(results: dict[str, dict]) -> dict[str, float]:
    """{name: mean} of the "ok" entries, for metrics.json and ``dvc metrics diff``."""
    return {name: result["mean"] for name, result in results.items() if result.get("status") == "ok"}


def higher_is_better(name: str) -> bool:
    """Direction of a metric for the report's deltas (rewards and unknown names: higher is better)."""
    dimension = DIMENSIONS.get(name)
    return dimension.higher_is_better if dimension else True


__all__ = ["DIMENSIONS", "Dimension", "MetricUnavailable", "available_metrics", "clear_model_cache",
           "entry", "evaluate_videos", "higher_is_better", "merge_results", "not_configured", "reward_entries",
           "summary"]
