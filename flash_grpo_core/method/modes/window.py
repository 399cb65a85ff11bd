"""The window baselines: MixGRPO's sliding window (`window`) and a window inside flash's first K
steps (`window_k`); SDE inside the window, ODE elsewhere, no rectification (as published)."""

from __future__ import annotations

from flash_grpo_core.method.modes import TrainingMode, register_mode


@register_mode
class Window(TrainingMode):
    """MixGRPO's progressive window over steps 0..N-2."""

    name = "window"

    def problems(self, rollout, train) -> list[str]:
        if train.window_size <= rollout.num_steps - 1:
            return []
        return [f"train.window_size ({train.window_size}) must be <= rollout.num_steps - 1 "
                f"({rollout.num_steps - 1}): the window slides over steps 0..N-2"]

    def trained_steps(self, rollout, train) -> int:
        return train.window_size

    def plan(self, rollout, train, num_prompts, iteration, generator):
        from flash_grpo_core.method.steps import mixgrpo_window, window_steps

        window = mixgrpo_window(iteration, rollout.num_steps, train.window_size, train.window_stride,
                                train.window_every)
        return window_steps(num_prompts, rollout.group_size, window[0], len(window))


@register_mode
class WindowK(Window):
    """W steps inside the first K candidate steps, the start cycling over [0, K - W]."""

    name = "window_k"

    def problems(self, rollout, train) -> list[str]:
        if train.window_size <= rollout.num_candidates:
            return []
        return [f"train.window_size ({train.window_size}) must be <= rollout.num_candidates "
                f"({rollout.num_candidates}): the window_k window slides over the first K steps"]

    def plan(self, rollout, train, num_prompts, iteration, generator):
        from flash_grpo_core.method.steps import window_start, window_steps

        start = window_start(iteration, rollout.num_candidates, train.window_size, train.window_stride,
                             train.window_every)
        return window_steps(num_prompts, rollout.group_size, start, train.window_size)
