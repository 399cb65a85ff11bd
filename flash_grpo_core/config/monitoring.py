"""Sections that watch a run without changing what it computes: `health` (guards against a run
going wrong). No stage lists them in dvc.yaml's `params:`, so editing them reruns nothing; a stage
a guard stopped has no lock entry and reruns anyway (docs/decisions.md, "Health guards")."""

from __future__ import annotations

from dataclasses import dataclass

from flash_grpo_core.config.checks import _check

GUARD_ACTIONS = ("warn", "stop", "off")


@dataclass(frozen=True)
class HealthConfig:
    """Thresholds of the update stage's guards (pipeline/health.py) and what each does when it fires.

    Non-finite losses, gradients and rewards always stop the stage (exit 2): they are not guards."""

    grad_norm_spike: float = 10.0  # the gradient norm above this many times its running median
    grad_norm: str = "warn"
    ratio_drift: float = 0.01  # max |ratio - 1| on the first minibatch, whose weights are the rollout's
    ratio: str = "warn"
    reward_drop: float = 4.0  # the mean reward below its running mean by this many running stds ...
    reward_drop_iterations: int = 3  # ... this many iterations in a row
    reward: str = "warn"
    equal_groups: float = 1.0  # this fraction of groups (or more) with all rewards equal: no signal
    equal_groups_action: str = "warn"
    window: int = 20  # iterations the running median, mean and std look back over

    def __post_init__(self):
        for key in ("grad_norm", "ratio", "reward", "equal_groups_action"):
            _check(getattr(self, key) in GUARD_ACTIONS,
                   f"health.{key} must be one of {GUARD_ACTIONS}, got {getattr(self, key)!r}")
        _check(self.grad_norm_spike > 1 and self.ratio_drift > 0 and self.reward_drop > 0,
               "health.grad_norm_spike must be > 1, health.ratio_drift and health.reward_drop > 0")
        _check(0 < self.equal_groups <= 1, f"health.equal_groups must be in (0, 1], got {self.equal_groups}")
        _check(self.reward_drop_iterations >= 1 and self.window >= 2,
               "health.reward_drop_iterations must be >= 1 and health.window >= 2")
