"""Exponential moving average of the trainable weights, used for evaluation.

The authors' setting: decay 0.9, updated every 8 optimizer steps. Only trainable parameters are
tracked (the LoRA weights under LoRA), so the EMA costs as little memory as the adapter.
"""

from __future__ import annotations

import contextlib

import torch


class EMA:
    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float, every: int):
        self.parameters, self.decay, self.every = parameters, decay, every
        self.shadow = {name: p.detach().float().clone() for name, p in parameters.items()}
        self.steps = 0  # optimizer steps seen

    @torch.no_grad()
    def step(self) -> bool:
        """Count one optimizer step; fold the weights into the average every `every` steps."""
        self.steps += 1
        if self.steps % self.every:
            return False
        for name, param in self.parameters.items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)
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


@torch.no_grad()
def _copy_into(parameters: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    for name, param in parameters.items():
        param.copy_(values[name])
