"""Shared plumbing for rewards backed by model weights: local paths, lazy loading, frame batching.

A model reward is built cheaply (options are checked, paths must exist) and loads its weights on
the first call, once, under a lock (the reward server calls it from several threads). Every
forward pass runs on the configured device, in eval mode, under ``torch.no_grad``. Nothing here
downloads anything: every ``from_pretrained`` is given ``local_files_only=True``.

Image reward models score frames: ``FrameModelReward`` keeps every ``frame_stride``-th frame,
scores the B * F' frames in chunks of ``batch_size``, and reduces the per-frame scores [B, F'] to
[B] with ``aggregate_frames`` (mean, min, or top_mean over the best ``top_fraction`` of frames,
which is how the Flash-GRPO authors used HPSv3: every frame, top 30%).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from flash_grpo_core.rewards.base import (
    AGGREGATIONS,
    RewardError,
    RewardOutput,
    aggregate_frames,
    check_videos,
    select_frames,
    validate_output,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require_path(reward: str, value: Any, key: str = "path", kind: str = "any") -> Path:
    """The local path given as ``reward.options.<reward>.<key>``, or a RewardError saying what is wrong.

    kind: "file", "dir" or "any" (either).
    """
    param = f"reward.options.{reward}.{key}"
    if value is None or value == "":
        raise RewardError(
            f"reward {reward!r} needs local weights: set {param} in params.yaml "
            f"(nothing is downloaded at run time)"
        )
    path = Path(value).expanduser()
    if not path.exists():
        raise RewardError(f"reward {reward!r}: {param} = {str(path)!r} does not exist")
    if kind == "file" and not path.is_file():
        raise RewardError(f"reward {reward!r}: {param} = {str(path)!r} is not a file")
    if kind == "dir" and not path.is_dir():
        raise RewardError(f"reward {reward!r}: {param} = {str(path)!r} is not a directory")
    return path


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: this process's GPU when there is one (under torchrun, the rank's), else the CPU."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def resolve_dtype(reward: str, dtype: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """torch dtype from a params.yaml string ("float32", "bfloat16", "float16"; "auto": bfloat16 on a
    GPU, float32 on the CPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise RewardError(f"reward {reward!r}: dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def import_optional(module: str, reward: str, install: str):
    """Import ``module`` or raise ImportError naming the reward and the pip package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"the {reward} reward needs {install}: pip install {install}") from exc


class ModelReward:
    """Base for rewards that load weights: option checks, lazy thread-safe loading, no_grad calls.

    Subclasses set ``name``, implement ``load(self)`` (set attributes, no return) and
    ``score(self, videos uint8 [B, F', H, W, 3], prompts, metadata) -> RewardOutput``.
    """

    name = "model_reward"

    def __init__(
        self, *, device: str = "auto", dtype: str = "float32", frame_stride: int = 1
    ) -> None:
        if not isinstance(frame_stride, int) or frame_stride < 1:
            raise RewardError(
                f"reward {self.name!r}: frame_stride must be a positive integer, got {frame_stride!r}"
            )
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(self.name, dtype, self.device)
        self.frame_stride = frame_stride
        self.loaded = False
        self._lock = threading.Lock()

    def load(self) -> None:
        raise NotImplementedError

    def ensure_loaded(self) -> None:
        """Load the weights once; later calls return at once."""
        if self.loaded:
            return
        with self._lock:
            if not self.loaded:
                self.load()
                self.loaded = True

    def __call__(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> RewardOutput:
        check_videos(videos, prompts)
        if metadata is not None and len(metadata) != len(prompts):
            raise RewardError(f"got {len(prompts)} prompts but {len(metadata)} metadata entries")
        self.ensure_loaded()
        videos = select_frames(videos, self.frame_stride)  # [B, F', H, W, 3]
        with torch.no_grad():
            output = self.score(videos, list(prompts), metadata)
        return validate_output(self.name, output, videos.shape[0])

    def score(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict] | None
    ) -> RewardOutput:
        raise NotImplementedError


class FrameModelReward(ModelReward):
    """An image reward model applied to every kept frame, then aggregated over frames.

    Subclasses implement ``score_frames(frames uint8 [N, H, W, 3], prompts list[str] (len N))
    -> float32 [N]``; it is called on chunks of at most ``batch_size`` frames.
    """

    def __init__(
        self,
        *,
        aggregate: str = "mean",
        top_fraction: float = 0.3,
        batch_size: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if aggregate not in AGGREGATIONS:
            raise RewardError(
                f"reward {self.name!r}: aggregate must be one of {AGGREGATIONS}, got {aggregate!r}"
            )
        if not 0.0 < top_fraction <= 1.0:
            raise RewardError(f"reward {self.name!r}: top_fraction must be in (0, 1], got {top_fraction}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise RewardError(f"reward {self.name!r}: batch_size must be a positive integer")
        self.aggregate = aggregate
        self.top_fraction = top_fraction
        self.batch_size = batch_size

    def score(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict] | None
    ) -> RewardOutput:
        batch, frames = videos.shape[:2]
        flat = videos.reshape(batch * frames, *videos.shape[2:])  # [B*F', H, W, 3]
        frame_prompts = [prompt for prompt in prompts for _ in range(frames)]  # len B*F'
        chunks = [
            self.score_frames(flat[start : start + self.batch_size], frame_prompts[start : start + self.batch_size])
            for start in range(0, flat.shape[0], self.batch_size)
        ]
        frame_scores = torch.cat([chunk.detach().float().cpu() for chunk in chunks])  # [B*F']
        if frame_scores.shape != (batch * frames,):
            raise RewardError(
                f"reward {self.name!r} scored {tuple(frame_scores.shape)} frames, "
                f"expected ({batch * frames},)"
            )
        frame_scores = frame_scores.view(batch, frames)  # [B, F']
        scores = aggregate_frames(frame_scores, self.aggregate, self.top_fraction)  # [B]
        info = {"frame_min": frame_scores.min(dim=1).values, "frame_max": frame_scores.max(dim=1).values}
        return RewardOutput(scores=scores, info=info)

    def score_frames(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


def empty_model(factory):
    """Build ``factory()`` with parameters on the meta device and real buffers (no random init cost).

    The caller must then ``load_state_dict(..., assign=True)`` every parameter.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict, assign) with an error that lists a few missing / unexpected keys."""
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise RewardError(
            f"{what}: {len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]})"
        )
    meta = [name for name, param in module.named_parameters() if param.is_meta]
    if meta:
        raise RewardError(f"{what}: parameters left without weights: {meta[:3]}")
