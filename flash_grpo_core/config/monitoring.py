"""Sections that watch a run without changing what it computes: `tracking` (where the live curves go,
flash_grpo_core/pipeline/tracking.py) and `health` (guards against a run going wrong,
pipeline/health.py). No stage lists them under `params:` in dvc.yaml, and a preset may not override
`tracking` (`presets.<name>` is a param of every stage): editing them reruns only the validate
check; a stage a guard stopped has no lock entry and reruns anyway (docs/decisions.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

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


TRACKING_BACKENDS = ("tensorboard", "wandb", "mlflow")  # pipeline/tracking.py BACKENDS (wandb, mlflow: extras)
RUN_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"  # one folder name under `dir`


@dataclass(frozen=True)
class TrackingConfig:
    backends: tuple[str, ...] = ("tensorboard",)  # []: tracking off
    project: str = "flash-grpo"  # recorded with the run (the project of a hosted tracker)
    run_name: str | None = None  # None: the preset; the run's folder under `dir`
    dir: str | None = None  # None: <pipeline.root>/<preset>/tracking
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # {backend: its writer's keywords}

    def __post_init__(self):
        unknown = sorted(set(self.backends) - set(TRACKING_BACKENDS))
        _check(not unknown, f"tracking.backends: unknown {unknown}; known: {list(TRACKING_BACKENDS)} ([] turns "
                            "tracking off)")
        _check(len(set(self.backends)) == len(self.backends),
               f"tracking.backends lists one twice: {list(self.backends)}")
        _check(bool(self.project.strip()), "tracking.project must not be empty")
        _check(self.run_name is None or re.fullmatch(RUN_NAME, self.run_name) is not None,
               f"tracking.run_name must be letters, digits and . _ - (one folder name), got {self.run_name!r}")
        _check(self.dir is None or bool(self.dir.strip()), "tracking.dir must be a path or null")
        extra = sorted(set(self.options) - set(TRACKING_BACKENDS))
        _check(not extra, f"tracking.options: {extra} is no backend; known: {list(TRACKING_BACKENDS)}")
        for name, options in self.options.items():
            _check(isinstance(options, dict), f"tracking.options.{name} must be a mapping, got {options!r}")
