"""The one reward protocol, its registry, and the checks every reward goes through.

A reward is any callable

    reward(videos uint8 [B, F, H, W, 3], prompts list[str] (len B), metadata list[dict] | None)
        -> RewardOutput(scores float32 [B], info dict[str, tensor])

with a ``name`` attribute. Rewards are built by name from a registry of factories
(``register`` / ``build_reward``), so a stage only needs a name and keyword options from
``params.yaml``; factories that need weights take local paths and load them lazily, never a
hard-coded server (ddpo's ``rewards.py`` is the model; flow_grpo's differently-shaped scorers the
warning).

Also here:

- ``validate_output`` / ``check_videos``: the shape / dtype / finiteness checks, raising
  ``RewardError`` that names the reward, so a NaN reward never reaches the advantages silently;
- ``aggregate_frames``: per-frame scores [B, F] -> [B] by mean, min, or the mean of the top
  fraction of frames (the paper aggregates HPSv3 frame scores this way; 0.3 is our default, the
  paper does not state the fraction in the abstract);
- ``select_frames``: temporal subsampling before scoring, to bound the cost of frame-wise rewards;
- ``ScaleGuard``: a small, deterministic detector for a reward whose batch mean jumps by many
  standard deviations (a reward model loaded with wrong weights, a broken normalisation).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from flash_grpo_core.config.choices import MODEL_PATH_HINT

AGGREGATIONS = ("mean", "min", "top_mean")


class RewardError(ValueError):
    """A reward received bad input or produced an unusable output."""


class RewardUnavailable(RewardError):
    """A reward that could not be reached (a server that timed out or refused, after its retries):
    transient, unlike a reward that answered wrongly. Stages exit with 75 (EX_TEMPFAIL) for it."""


@dataclass(frozen=True)
class RewardOutput:
    """What every reward returns.

    scores: float32 [B], one scalar per video.
    info: small per-video diagnostics, e.g. component scores float32 [B]; logged, not trained on.
    """

    scores: torch.Tensor
    info: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Reward(Protocol):
    """The reward protocol; see the module docstring."""

    name: str

    def __call__(
        self,
        videos: torch.Tensor,
        prompts: list[str],
        metadata: list[dict] | None = None,
    ) -> RewardOutput: ...


# ---------------------------------------------------------------------------------------------
# Checks


def check_videos(videos: torch.Tensor, prompts: list[str] | None = None) -> None:
    """Raise RewardError unless videos is uint8 [B, F, H, W, 3] (and B == len(prompts) if given)."""
    if not isinstance(videos, torch.Tensor):
        raise RewardError(f"videos must be a torch.Tensor, got {type(videos).__name__}")
    if videos.dtype != torch.uint8:
        raise RewardError(f"videos must be uint8 [B, F, H, W, 3], got dtype {videos.dtype}")
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise RewardError(f"videos must be uint8 [B, F, H, W, 3], got shape {tuple(videos.shape)}")
    if videos.shape[1] == 0:
        raise RewardError("videos have no frames (F == 0)")
    if prompts is not None and len(prompts) != videos.shape[0]:
        raise RewardError(f"got {videos.shape[0]} videos but {len(prompts)} prompts")


def validate_output(name: str, output: RewardOutput, batch_size: int) -> RewardOutput:
    """Check a reward's output; return it with scores as float32 [B].

    Raises RewardError naming the reward when the scores are not a tensor of shape [batch_size]
    or contain NaN / inf.
    """
    if not isinstance(output, RewardOutput):
        raise RewardError(
            f"reward {name!r} returned {type(output).__name__}, expected RewardOutput"
        )
    scores = output.scores
    if not isinstance(scores, torch.Tensor):
        raise RewardError(f"reward {name!r} scores must be a tensor, got {type(scores).__name__}")
    if tuple(scores.shape) != (batch_size,):
        raise RewardError(
            f"reward {name!r} scores have shape {tuple(scores.shape)}, expected ({batch_size},)"
        )
    scores = scores.detach().float()  # [B]
    bad = ~torch.isfinite(scores)
    if bad.any():
        indices = bad.nonzero().flatten().tolist()
        n_nan = int(torch.isnan(scores).sum())
        raise RewardError(
            f"reward {name!r} produced {len(indices)} non-finite score(s) "
            f"({n_nan} NaN, {len(indices) - n_nan} inf) at batch indices {indices}"
        )
    return RewardOutput(scores=scores, info=dict(output.info))


# ---------------------------------------------------------------------------------------------
# Registry

_FACTORIES: dict[str, Callable[..., Reward]] = {}
# Options a reward cannot run without, per reward: checked with the params (check_reward_params),
# before any stage loads a model; `hint` says where the value comes from.
_REQUIRED: dict[str, tuple[tuple[str, ...], str]] = {}


def register(name: str, required: tuple[str, ...] = (), hint: str = MODEL_PATH_HINT
             ) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator registering a reward factory (a class or function) under ``name``; ``required``:
    the options `reward.options.<name>` must set."""

    def decorator(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"a reward named {name!r} is already registered")
        _FACTORIES[name] = factory
        _REQUIRED[name] = (tuple(required), hint)
        return factory

    return decorator


def _known(name: str) -> bool:
    """Whether ``name`` is registered; a reward a task declares (config/tasks.py: the installed
    plugins' tasks) is imported, and so registered, on first use."""
    if name not in _FACTORIES:
        from flash_grpo_core.config.tasks import all_tasks, load_target

        for task in all_tasks():
            if name in task.rewards:
                load_target(task.rewards[name])
    return name in _FACTORIES


def available_rewards() -> list[str]:
    """Sorted names of all registered rewards and of those the registered tasks declare."""
    from flash_grpo_core.config.tasks import all_tasks

    return sorted({*_FACTORIES, *(name for task in all_tasks() for name in task.rewards)})


def build_reward(name: str, /, **kwargs: Any) -> Reward:
    """Build the reward registered under ``name`` with keyword options ``kwargs``.

    ``name`` is positional-only so that a factory may itself take a ``name`` option (``remote``).
    """
    if not _known(name):
        raise KeyError(
            f"unknown reward {name!r}; available rewards: {', '.join(available_rewards())}"
        )
    return _FACTORIES[name](**kwargs)


def check_reward_params(reward) -> None:
    """ConfigError unless every reward `reward.weights` (a RewardConfig) names is registered and its
    required options are set; the first check of the params that needs the registry."""
    for name in reward.weights:
        _known(name)  # a task's reward registers on first use
    reward.check_known({**{name: ((), "") for name in available_rewards()}, **_REQUIRED})


# ---------------------------------------------------------------------------------------------
# Frames


def aggregate_frames(
    frame_scores: torch.Tensor, how: str = "mean", top_fraction: float = 0.3
) -> torch.Tensor:
    """Reduce per-frame scores [B, F] to per-video scores [B].

    how: "mean" over frames, "min" over frames, or "top_mean" = mean of the
    int(F * top_fraction) highest frame scores (at least 1), the authors' count
    (Shredded-Pork/Flash-GRPO `flow_grpo/rewards.py`:143, `int(l*0.3)`: 24 of 81 frames).
    """
    if frame_scores.ndim != 2:
        raise RewardError(f"frame_scores must be [B, F], got shape {tuple(frame_scores.shape)}")
    if how == "mean":
        return frame_scores.mean(dim=1)  # [B]
    if how == "min":
        return frame_scores.min(dim=1).values  # [B]
    if how == "top_mean":
        if not 0.0 < top_fraction <= 1.0:
            raise RewardError(f"top_fraction must be in (0, 1], got {top_fraction}")
        num_frames = frame_scores.shape[1]
        k = max(1, int(num_frames * top_fraction))  # truncated, as the authors' int(l * 0.3)
        return frame_scores.topk(k, dim=1).values.mean(dim=1)  # [B]
    raise RewardError(f"unknown frame aggregation {how!r}; choose one of {AGGREGATIONS}")


def select_frames(videos: torch.Tensor, stride: int) -> torch.Tensor:
    """Every ``stride``-th frame, starting at the first: [B, F, H, W, 3] -> [B, ceil(F/stride), H, W, 3]."""
    if not isinstance(stride, int) or stride < 1:
        raise RewardError(f"frame stride must be a positive integer, got {stride!r}")
    return videos[:, ::stride]


# ---------------------------------------------------------------------------------------------
# Scale guard


class ScaleGuard:
    """Raise when a reward's batch mean jumps far outside its recent history.

    Keeps the batch means of the last ``window`` batches. Once at least ``min_history`` are
    stored, a new batch whose mean is more than ``max_sigma`` standard deviations from the
    history mean raises RewardError naming the reward; the std is floored at ``std_floor`` so a
    constant reward does not make every later change look infinite. A batch that raises is not
    added to the history. Rewards drifting up during training are fine: the window follows them.
    """

    def __init__(
        self,
        name: str,
        max_sigma: float = 20.0,
        min_history: int = 5,
        std_floor: float = 1e-2,
        window: int = 100,
    ) -> None:
        if min_history < 2 or window < min_history:
            raise ValueError(f"need 2 <= min_history <= window, got {min_history} and {window}")
        if max_sigma <= 0 or std_floor <= 0:
            raise ValueError("max_sigma and std_floor must be positive")
        self.name = name
        self.max_sigma = max_sigma
        self.min_history = min_history
        self.std_floor = std_floor
        self.window = window
        self.history: list[float] = []

    def check(self, scores: torch.Tensor) -> float:
        """Check one batch's scores [B]; record and return its mean, or raise RewardError."""
        batch_mean = float(scores.detach().double().mean())
        if not math.isfinite(batch_mean):
            raise RewardError(f"reward {self.name!r} batch mean is {batch_mean}")
        if len(self.history) >= self.min_history:
            history_mean = statistics.fmean(self.history)
            history_std = max(statistics.stdev(self.history), self.std_floor)
            sigmas = abs(batch_mean - history_mean) / history_std
            if sigmas > self.max_sigma:
                raise RewardError(
                    f"reward {self.name!r} batch mean {batch_mean:.6g} is {sigmas:.1f} std from "
                    f"its history (mean {history_mean:.6g}, std {history_std:.3g} over "
                    f"{len(self.history)} batches; limit {self.max_sigma}): wrong weights or scale?"
                )
        self.history = (self.history + [batch_mean])[-self.window :]
        return batch_mean

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = [float(value) for value in state["history"]]
        if not all(math.isfinite(value) for value in history):
            raise ValueError(f"scale guard state for {self.name!r} has non-finite history")
        self.history = history[-self.window :]
