"""`full`: Flow-GRPO: the whole trajectory sampled with the SDE, its first int(fraction x N) steps trained."""

from __future__ import annotations

from flash_grpo_core.method.modes import TrainingMode, register_mode


@register_mode
class Full(TrainingMode):
    name = "full"
    sde_every_step = True

    def problems(self, rollout, train) -> list[str]:
        if int(rollout.num_steps * train.timestep_fraction) >= 1:
            return []
        return [f"train.timestep_fraction ({train.timestep_fraction}) trains int({rollout.num_steps} x "
                f"{train.timestep_fraction}) = 0 steps; raise it"]

    def trained_steps(self, rollout, train) -> int:
        return int(rollout.num_steps * train.timestep_fraction)  # steps.full_step_count, without torch

    def plan(self, rollout, train, num_prompts, iteration, generator):
        from flash_grpo_core.method.steps import full_steps

        return full_steps(num_prompts, rollout.group_size, rollout.num_steps, train.timestep_fraction)
