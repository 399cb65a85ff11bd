"""Tasks: what a preset trains beyond Wan 2.1 on a prompt file, declared by the task's own package.

A task declares, by name and without importing anything heavy, its prompt source, its rewards and,
where it has one, a video model of its own (the toy task's pixel-space transformer), each as a
"module:attribute" target imported on first use. A task's package calls `register_task` when
imported: it is a plugin (`config/plugins.py`), like the toy task in `flash_grpo_core/tasks/toy/`.
The engine asks this registry for the preset's model and the reward registry for a task's reward,
so neither imports a task; the declaration is torch-free, so the preflight can read it too.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Task:
    name: str
    presets: tuple[str, ...]  # the presets that train it: with `model`, they build the task's model, not Wan 2.1
    prompt_source: str | None = None  # its shipped prompt file (a Wan preset must not train on it)
    # "module:function" of (params, dtype) -> a WanStack: its model, the weights from `model.path` when set
    model: str | None = None
    rewards: dict[str, str] = field(default_factory=dict)  # reward name -> "module:class" registering it


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS and TASKS[task.name] != task:
        raise ValueError(f"a task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def all_tasks() -> list[Task]:
    """Every registered task, the installed plugins' included."""
    from flash_grpo_core.config.plugins import load_plugins

    load_plugins()
    return list(TASKS.values())


def task_for_preset(preset: str) -> Task | None:
    """The task that `preset` trains, or None (Wan 2.1, or the tiny random stack, on a prompt file)."""
    return next((task for task in all_tasks() if preset in task.presets), None)


def load_target(target: str):
    """The attribute a "module:attribute" target names (importing its module)."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)
