"""`flash`: one trained step per sample, drawn uniformly from the first K and shared by the group."""

from __future__ import annotations

from flash_grpo_core.method.modes import TrainingMode, register_mode


@register_mode
class Flash(TrainingMode):
    name = "flash"
    rectify = "exact"  # temporal gradient rectification, the paper's
    one_sde_step = True

    def trained_steps(self, rollout, train) -> int:
        return 1

    def plan(self, rollout, train, num_prompts, iteration, generator):
        from flash_grpo_core.method.steps import iso_temporal_steps

        return iso_temporal_steps(num_prompts, rollout.group_size, rollout.num_candidates, generator,
                                  rollout.iso_temporal)
