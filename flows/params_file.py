"""A flow run's parameters, validated and written into the project's `params.yaml`, where DVC reads them.

DVC tracks parameters by the values in `params.yaml`, so a run's preset, iteration count and
overrides must be written there before any stage runs (as `dvc exp run --set-param` does). Each
override is validated first (`flash_grpo_core.config.params_from_dict`: unknown keys, wrong types
and impossible combinations fail with the key's name), then written with a round-trip YAML
editor (comments and layout stay) at the place where it takes effect:

- under `presets.<preset>` when that preset already sets the key (a base value would be shadowed);
- in the base section otherwise, so every stage that lists the key in `dvc.yaml` sees the change.

The file is replaced atomically and re-read: it must give exactly the validated parameters.
Written values stay in `params.yaml` after the run (like `dvc exp run -S`), so `dvc repro` alone
reproduces the last run; one run per workspace at a time (see `workspace_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESERVED = ("preset", "iterations", "presets", "pipeline")  # set by their own flow parameters, or structural
# ... except the retention of old checkpoints, which no stage reads (flash_grpo_core/pipeline/prune.py)
UNRESERVED = ("pipeline.keep_checkpoints_every",)


def _leaves(overrides: dict[str, Any]) -> dict[str, Any]:
    """Dotted overrides with mapping values flattened to their leaves (config.py merges mappings)."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            flat.update(_leaves({f"{key}.{inner}": item for inner, item in value.items()}))
        else:
            flat[key] = value
    return flat


def _defines(mapping: Any, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return False
        mapping = mapping[key]
    return True


def validate(path: Path, preset: str, iterations: int | None, overrides: dict[str, Any] | None):
    """The typed `Params` this run would use; raises ConfigError naming the bad key."""
    from flash_grpo_core.config import ConfigError, params_from_dict, read_yaml
    from flash_grpo_core.config.dvc_layout import dvc_layout

    overrides = _leaves(overrides or {})
    for key in overrides:
        if key.split(".")[0] in RESERVED and key not in UNRESERVED:
            raise ConfigError(f"overrides: {key!r} cannot be overridden here; use the flow's preset/iterations "
                              f"parameters, or edit params.yaml for presets and pipeline")
    raw = read_yaml(path)
    if iterations is not None:
        if type(iterations) is not int or iterations < 1:
            raise ConfigError(f"iterations must be an integer >= 1, got {iterations!r}")
        pipeline = raw.get("pipeline") or {}
        raw = {**raw, "iterations": iterations,
               "pipeline": {**pipeline, **dvc_layout(iterations, int(pipeline.get("eval_every") or 0))}}
    try:
        return params_from_dict(raw, preset, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path} with this run's parameters: {error}") from None


def write(path: Path, preset: str, iterations: int | None, overrides: dict[str, Any] | None):
    """Validate, then write the run's parameters into `path`; returns the `Params` the stages will see."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    from flash_grpo_core.artifacts.atomic import atomic_path
    from flash_grpo_core.config import ConfigError, load_params
    from flash_grpo_core.config.dvc_layout import set_dvc_layout

    params = validate(path, preset, iterations, overrides)
    yaml = YAML()  # round-trip: comments, quotes and layout stay
    yaml.preserve_quotes = True
    yaml.representer.add_representer(type(None), lambda dumper, _: dumper.represent_scalar("tag:yaml.org,2002:null",
                                                                                         "null"))
    data = yaml.load(path.read_text())
    data["preset"] = preset
    set_dvc_layout(data, params.iterations)
    for dotted, value in _leaves(overrides or {}).items():
        keys = dotted.split(".")
        scoped = (data.get("presets") or {}).get(preset)
        node = scoped if _defines(scoped, keys) else data
        for key in keys[:-1]:
            node = node.setdefault(key, CommentedMap())
        node[keys[-1]] = value
    text = io.StringIO()
    yaml.dump(data, text)
    if text.getvalue() == path.read_text():
        return params
    with atomic_path(path) as temporary:
        temporary.write_text(text.getvalue())
        if load_params(temporary) != params:  # never leave a file that means something else
            raise ConfigError(f"writing the overrides into {path} would not give the validated parameters")
    return params


@contextlib.contextmanager
def workspace_lock(project: Path) -> Iterator[None]:
    """Hold an exclusive lock on the workspace for a whole run: `params.yaml` is one run's state."""
    lock_path = project / ".dvc" / "tmp" / "train-loop.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RuntimeError(f"another train-loop run ({holder}) is using the workspace {project}; "
                               f"one run per workspace at a time") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
