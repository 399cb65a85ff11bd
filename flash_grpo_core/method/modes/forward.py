"""`nft` (DiffusionNFT) and `awm` (Advantage Weighted Matching): the forward-process successors.

Their rollouts sample with the deterministic ODE (no SDE step, no log-probability stored) and keep
each sample's final latent; the update re-noises it at the noise levels the plan gives, with fresh
noise, and trains without classifier-free guidance (method/forward_process.py, docs/decisions.md).
The plan's levels are the sampler's own grid, the first int(N x train.timestep_fraction) of its N
steps for every sample, as DiffusionNFT trains on its sampler's timesteps (`timestep_fraction` 0.99).
"""

from __future__ import annotations

from flash_grpo_core.method.modes import TrainingMode, register_mode


class ForwardProcess(TrainingMode):
    """What both forward-process modes share: the plan, the ODE rollout, the config checks."""

    def problems(self, rollout, train) -> list[str]:
        import math

        from flash_grpo_core.method.choices import AWM_WEIGHTINGS

        found = []
        if int(rollout.num_steps * train.timestep_fraction) < 1:
            found.append(f"train.timestep_fraction ({train.timestep_fraction}) trains int({rollout.num_steps} x "
                         f"{train.timestep_fraction}) = 0 noise levels; raise it")
        if rollout.same_initial_noise:
            found.append(f"rollout.same_initial_noise: true gives a group's samples one initial noise, and train.mode "
                         f"{self.name} samples with the ODE: the group's videos would be identical, with no signal; "
                         f"set it to false")
        if not (math.isfinite(train.nft_beta) and train.nft_beta > 0):
            found.append(f"train.nft_beta must be > 0, got {train.nft_beta}")
        if train.awm_weighting not in AWM_WEIGHTINGS:
            found.append(f"train.awm_weighting must be one of {AWM_WEIGHTINGS}, got {train.awm_weighting!r}")
        return found

    def trained_steps(self, rollout, train) -> int:
        return int(rollout.num_steps * train.timestep_fraction)

    def plan(self, rollout, train, num_prompts, iteration, generator):
        from flash_grpo_core.method.steps import full_steps

        return full_steps(num_prompts, rollout.group_size, rollout.num_steps, train.timestep_fraction)

    def stochastic(self, train_steps, num_steps: int):
        import torch

        return torch.zeros(*train_steps.shape[:2], num_steps, dtype=torch.bool)  # the ODE throughout


@register_mode
class Nft(ForwardProcess):
    """DiffusionNFT: implicit positive and negative policies around the sampling policy."""

    name = "nft"
    objective = "nft"


@register_mode
class Awm(ForwardProcess):
    """Advantage Weighted Matching: PPO's ratio on the flow-matching log-likelihood surrogate."""

    name = "awm"
    objective = "awm"
