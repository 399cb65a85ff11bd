"""Training modes, one object each: which steps a rollout trains, which it samples with the SDE,
the mode's own config checks and its published defaults (SPEC sections 4 and 6).

A mode is a `TrainingMode` subclass in a module of this package (or of a user's package, imported
before params load), registered with `@register_mode`; `train.mode` names it. The package imports
every module in it on first use, so a new mode is one new file. Torch-free at import: the config
checks `train.mode` against the registry without loading torch; plans import it when called.
"""

from __future__ import annotations

import importlib
import pkgutil


class TrainingMode:
    """One way of choosing the trained steps. Subclasses set `name` and implement `plan`."""

    name = ""
    rectify = "none"  # what `train.rectify: auto` resolves to: the mode's published setting
    one_sde_step = False  # one SDE step per sample, the trained one: the cheaper-rollout options apply
    sde_every_step = False  # the rollout samples every step with the SDE (Flow-GRPO), not only the trained
    # "policy_gradient": PPO on the rollout's stored SDE steps (engine/trainer.py); "nft" or "awm":
    # the forward process, re-noising the rollout's final samples (method/forward_process.py)
    objective = "policy_gradient"

    @property
    def forward_process(self) -> bool:
        """Whether the mode trains on re-noised final samples: ODE rollouts, no step stored."""
        return self.objective != "policy_gradient"

    def problems(self, rollout, train) -> list[str]:
        """What is wrong with the rollout and train sections for this mode (messages naming the keys)."""
        return []

    def trained_steps(self, rollout, train) -> int:
        """Trained steps per sample (at most, for modes whose count varies), for sizing a run."""
        raise NotImplementedError

    def plan(self, rollout, train, num_prompts: int, iteration: int, generator):
        """LongTensor [B, G, T] of the trained steps of `iteration` (0-based as the engine counts);
        `generator`, seeded from the run's seed and the iteration, for modes that draw."""
        raise NotImplementedError

    def stochastic(self, train_steps, num_steps: int):
        """BoolTensor [B, G, N]: where each sample takes the SDE step in the rollout."""
        from flash_grpo_core.method.steps import stochastic_steps

        return stochastic_steps(train_steps, num_steps, every_step=self.sde_every_step)


MODES: dict[str, TrainingMode] = {}


def register_mode(cls: type[TrainingMode]) -> type[TrainingMode]:
    """Class decorator: make `cls` selectable as `train.mode: <cls.name>`."""
    if not cls.name or cls.name in MODES and type(MODES[cls.name]) is not cls:
        raise ValueError(f"training mode {cls.name!r} is unnamed or registered twice")
    MODES[cls.name] = cls()
    return cls


def mode_names() -> tuple[str, ...]:
    return tuple(MODES)


def get_mode(name: str) -> TrainingMode:
    if name not in MODES:
        raise KeyError(f"unknown training mode {name!r}; known: {', '.join(MODES)}")
    return MODES[name]


for _module in pkgutil.iter_modules(__path__):  # the built-in modes register themselves
    importlib.import_module(f"{__name__}.{_module.name}")
