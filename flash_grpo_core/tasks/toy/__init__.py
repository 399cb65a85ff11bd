"""The alignment benchmark's task: coloured squares moving in a direction, in pixel space.

`data` (prompts and clips), `model` (the pixel-space Wan transformer, its pre-training and base
files), `reward` (`toy_following`). Importing this package declares the task (config/tasks.py):
the `toy` preset builds its model, and its reward is found by name; it is a plugin like a user's
task (pyproject.toml's `flash_grpo.plugins` entry point), so the engine, rewards and metrics never
import it. Torch-free: the submodules' names below load on first access.
"""

from __future__ import annotations

import importlib

from flash_grpo_core.config.tasks import Task, register_task

PROMPT_SOURCE = "prompts/toy.jsonl"  # the colour x direction grid with its held-out split (shipped)
TASK = register_task(Task("toy", presets=("toy",), prompt_source=PROMPT_SOURCE,
                          model="flash_grpo_core.tasks.toy.model:build_stack",
                          rewards={"toy_following": "flash_grpo_core.tasks.toy.reward:ToyFollowingReward"}))

_LAZY = {"data": ("DIRECTIONS", "PALETTE", "make_clips", "parse_prompt", "pretrain_prompts", "prompt_for",
                  "rl_only_prompts", "toy_prompts"),
         "model": ("BASE_WEIGHTS", "build_stack", "build_toy_stack", "load_base", "pretrain", "save_base"),
         "reward": ("ToyFollowingReward",)}


def __getattr__(name: str):
    module = next((module for module, names in _LAZY.items() if name in names), None)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
