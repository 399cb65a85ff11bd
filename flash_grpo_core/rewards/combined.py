"""A weighted sum of registered rewards, each validated (and optionally scale-guarded) on its own.

    scores = sum_i weight_i * component_i(videos, prompts, metadata).scores      # [B]

``info`` keeps every component's scores under its name and each component's own info under
``"<name>/<key>"``, so the components can be logged and plotted separately. A component that
raises, returns the wrong shape, or returns NaN / inf fails the whole call with a RewardError
naming that component: a broken reward must stop the run, not be averaged away. A weight of 0
computes and logs a reward without training on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from flash_grpo_core.rewards.base import (
    Reward,
    RewardError,
    RewardOutput,
    ScaleGuard,
    build_reward,
    check_videos,
    validate_output,
)


class WeightedReward:
    """Weighted sum of rewards.

    weights: {reward name: weight}. options: {reward name: factory kwargs} for the registry.
    components: already built rewards by name, used instead of the registry (e.g. a reward
    model loaded elsewhere, or a stub in a test). scale_guard: check every component's batch
    mean with a ScaleGuard built with ``guard_kwargs``.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        options: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        components: Mapping[str, Reward] | None = None,
        scale_guard: bool = False,
        guard_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        options = dict(options or {})
        components = dict(components or {})
        if not weights:
            raise ValueError("a weighted reward needs at least one component weight")
        for name, weight in weights.items():
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"reward {name!r} weight must be a finite number, got {weight!r}")
        stray = sorted((set(options) | set(components)) - set(weights))
        if stray:
            raise ValueError(f"options or components given for rewards without a weight: {stray}")
        self.weights = {name: float(weight) for name, weight in weights.items()}
        self.components: dict[str, Reward] = {
            name: components[name]
            if name in components
            else build_reward(name, **options.get(name, {}))
            for name in self.weights
        }
        self.guards: dict[str, ScaleGuard] = (
            {name: ScaleGuard(name, **dict(guard_kwargs or {})) for name in self.weights}
            if scale_guard
            else {}
        )
        self.name = "+".join(f"{weight:g}*{name}" for name, weight in self.weights.items())

    def __call__(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> RewardOutput:
        return self.combine(self.components_of(videos, prompts, metadata))

    def components_of(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> dict[str, RewardOutput]:
        """Every component's validated output on these videos, by name (no weighting, no guard):
        the part that may run on a slice of the batch, e.g. one rank's videos."""
        check_videos(videos, prompts)
        return {name: self._run_component(name, component, videos, prompts, metadata)
                for name, component in self.components.items()}

    def combine(self, outputs: Mapping[str, RewardOutput]) -> RewardOutput:
        """The weighted sum of the components' outputs over the whole batch, each component's batch
        mean checked by its scale guard first."""
        batch = len(next(iter(outputs.values())).scores)
        total = torch.zeros(batch)  # [B]
        info: dict[str, torch.Tensor] = {}
        for name in self.components:
            output = outputs[name]
            if name in self.guards:
                self.guards[name].check(output.scores)
            total = total + self.weights[name] * output.scores  # [B]
            info[name] = output.scores
            info.update({f"{name}/{key}": value for key, value in output.info.items()})
        return validate_output(self.name, RewardOutput(scores=total, info=info), batch)

    @staticmethod
    def _run_component(
        name: str,
        component: Reward,
        videos: torch.Tensor,
        prompts: list[str],
        metadata: list[dict] | None,
    ) -> RewardOutput:
        try:
            output = component(videos, prompts, metadata)
        except Exception as exc:
            raise RewardError(f"reward component {name!r} failed: {exc}") from exc
        return validate_output(name, output, videos.shape[0])

    def state_dict(self) -> dict[str, Any]:
        """Scale-guard histories by component name, for resuming a run."""
        return {"guards": {name: guard.state_dict() for name, guard in self.guards.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, guard_state in state.get("guards", {}).items():
            if name in self.guards:
                self.guards[name].load_state_dict(guard_state)


def concat_outputs(parts: list[Mapping[str, RewardOutput]]) -> dict[str, RewardOutput]:
    """Components' outputs on consecutive slices of a batch (e.g. shards), joined into the batch's."""
    names = list(parts[0])
    return {name: RewardOutput(scores=torch.cat([part[name].scores for part in parts]),
                               info={key: torch.cat([part[name].info[key] for part in parts])
                                     for key in parts[0][name].info})
            for name in names}


def build_weighted_reward(
    weights: Mapping[str, float],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> WeightedReward:
    """WeightedReward from {name: weight} and {name: factory kwargs}; kwargs as WeightedReward's."""
    return WeightedReward(weights, options, **kwargs)
