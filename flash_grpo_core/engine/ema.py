"""Exponential moving average of the trainable weights, used for evaluation.

As the authors' `EMAModuleWrapper` (flow_grpo/ema.py, `get_current_decay` and `step`): after
optimizer step s (counted from 1, the authors' `global_step` after its increment), the weights are
folded in when (s + 1) % every == 0, with the warmed-up decay min((1 + s) / (10 + s), decay). Their
setting is decay 0.9 every 8 steps: after 64 steps about 9% of the base weights remain in the
average (a constant 0.9 would keep 43%). The step count is saved with the checkpoint, so a resumed
run continues the warm-up where it stopped (the authors' script restarts its count at 0). Only
trainable parameters are tracked (the LoRA weights under LoRA), so the EMA costs as little memory
as the adapter.
"""

from __future__ import annotations

import contextlib

import torch


class EMA:
    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float, every: int):
        self.parameters, self.decay, self.every = parameters, decay, every
        self.shadow = {name: p.detach().float().clone() for name, p in parameters.items()}
        self.steps = 0  # optimizer steps seen

    def current_decay(self, step: int) -> float:
        """The decay applied after optimizer step `step` (1-based): warms up from 2/11 towards `decay`."""
        return min((1 + step) / (10 + step), self.decay)

    @torch.no_grad()
    def step(self) -> bool:
        """Count one optimizer step; fold the weights in when (steps + 1) % every == 0."""
        self.steps += 1
        if (self.steps + 1) % self.every:
            return False
        weight = 1.0 - self.current_decay(self.steps)
        for name, param in self.parameters.items():
            self.shadow[name].lerp_(param.detach().float(), weight)
        return True

    def state_dict(self) -> dict:
        return {"shadow": {k: v.clone() for k, v in self.shadow.items()}, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {sorted(missing)[:3]}")
        self.shadow = {k: state["shadow"][k].float().clone() for k in self.shadow}
        self.steps = int(state["steps"])

    @contextlib.contextmanager
    def applied(self):
        """Temporarily load the EMA weights into the model (for evaluation), restoring them after."""
        saved = {name: p.detach().clone() for name, p in self.parameters.items()}
        try:
            _copy_into(self.parameters, self.shadow)
            yield
        finally:
            _copy_into(self.parameters, saved)


def folds(steps: int, every: int) -> int:
    """How many times the weights were folded in over optimizer steps 1..`steps` (those s with
    (s + 1) % every == 0): 0 means the EMA still holds the weights it started from."""
    return (steps + 1) // every - 1 // every


def unfolded_warning(steps: int, every: int, iteration: int, key: str) -> str | None:
    """A one-line warning when a trained checkpoint's EMA was never folded in, so that using it
    (`key`: eval.use_ema or export.use_ema) means using the untrained starting weights; else None.
    With the authors' cadence (every 8) and two optimizer steps an iteration, iterations 1-3 are such."""
    if iteration == 0 or folds(steps, every) > 0:
        return None
    return (f"the EMA of iteration {iteration} was never folded in ({steps} optimizer step(s); the first fold is "
            f"after step {max(every - 1, 1)} with train.ema_every {every}): {key} gives the untrained starting "
            f"weights; set {key}: false or a smaller train.ema_every for so short a run")


@torch.no_grad()
def _copy_into(parameters: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    for name, param in parameters.items():
        param.copy_(values[name])
