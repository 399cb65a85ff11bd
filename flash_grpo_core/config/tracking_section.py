"""params.yaml's `tracking:` section: where a run's live curves go (flash_grpo_core/pipeline/tracking.py).

No stage lists it under `params:` in dvc.yaml, and a preset may not override it (`presets.<name>` is
a tracked param of every stage): watching a run differently never reruns a stage."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from flash_grpo_core.config.checks import _check

TRACKING_BACKENDS = ("tensorboard",)  # the backends implemented; W&B and MLflow are later work
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
