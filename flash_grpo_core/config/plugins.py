"""Plugins: installed packages that add tasks, rewards or training modes to the registries.

A plugin is a module named by an entry point of group `flash_grpo.plugins` in its package's
metadata (pyproject.toml: `[project.entry-points."flash_grpo.plugins"] name = "package.module"`);
importing it registers what it brings (`config.tasks.register_task`, `rewards.register`,
`method.modes.register_mode`). The toy task is one (this project's pyproject.toml). The registries
load the plugins when asked for a name they do not hold, so nothing imports a plugin by name.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

GROUP = "flash_grpo.plugins"
_scanned = False


def load_plugins() -> list[str]:
    """Import every installed plugin once (the installed packages' metadata is read on the first
    call of a process only); returns the names of those imported by this call."""
    global _scanned
    if _scanned:
        return []
    _scanned = True
    points = list(entry_points(group=GROUP))
    for point in points:
        importlib.import_module(point.value.split(":")[0])
    return [point.name for point in points]
