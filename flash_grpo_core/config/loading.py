"""Loading `params.yaml` into `Params`, in one place:
1. reads YAML with a YAML 1.2 loader (so `3e-05` is a float, as DVC writes it);
2. deep-merges `presets[preset]`, then any caller overrides (`{"train.learning_rate": 3e-5}`);
3. resolves per-mode defaults: `train.rectify: auto` (or unset) becomes the mode's own
   (each training mode's `rectify`, method/modes: exact for flash, none for the baselines), so every reader sees
   exact | none | flow_grpo;
4. builds the section dataclasses (`sections.py`), rejecting unknown keys and wrong types with the
   offending key path; the dataclasses then check their values and `Params` the combinations.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from flash_grpo_core.config.choices import PRESETS
from flash_grpo_core.method.modes import MODES
from flash_grpo_core.config.building import build_section
from flash_grpo_core.config.sections import ConfigError, Params, _check


# Mappings that an override replaces whole instead of merging into: a preset that names its reward
# weights means exactly those rewards, not those added to the base's.
REPLACED_WHOLE = ("weights", "options")


def _merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in REPLACED_WHOLE:
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _dotted(overrides: dict[str, Any]) -> dict:
    nested: dict = {}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def read_yaml(path: str | Path) -> dict:
    """Read a YAML file with a YAML 1.2 loader; a clear error for a missing or malformed file."""
    from ruamel.yaml import YAML, YAMLError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        data = YAML(typ="safe", pure=True).load(path.read_text())
    except YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    return data or {}


def params_from_dict(raw: dict, preset: str | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """Typed Params from a parsed params mapping, the selected preset's overrides and dotted overrides."""
    _check(isinstance(raw, dict), f"the params file must be a mapping of sections, got a {type(raw).__name__}")
    raw = _merge(raw, _dotted(overrides or {}))
    presets = raw.pop("presets", {}) or {}
    _check(isinstance(presets, dict), "presets must be a mapping of preset names to overrides")
    chosen = preset or raw.get("preset", "tiny")
    _check(chosen in PRESETS, f"preset must be one of {PRESETS}, got {chosen!r}")
    _check(set(presets) <= set(PRESETS), f"presets: unknown preset(s) {sorted(set(presets) - set(PRESETS))}")
    tracked = sorted(name for name, section in presets.items() if isinstance(section, dict) and "tracking" in section)
    _check(not tracked, f"presets.{', presets.'.join(tracked)}: set `tracking` in the base section only; a preset's "
                        "overrides are params of every stage, so changing them there would rerun the pipeline")
    merged = _merge(raw, presets.get(chosen, {}) or {})
    merged = _merge(merged, _dotted(overrides or {}))  # caller overrides win over the preset's
    merged["preset"] = chosen
    return build_section(Params, _resolved_rectify(merged), "")


def _resolved_rectify(merged: dict) -> dict:
    """`train.rectify` auto or unset as the training mode's own; an explicit setting is kept. A bad
    mode is left for TrainConfig to name."""
    train = merged.get("train")
    if not isinstance(train, dict) or train.get("rectify", "auto") != "auto":
        return merged
    mode = train.get("mode", "flash")
    if not isinstance(mode, str) or mode not in MODES:
        return merged
    return {**merged, "train": {**train, "rectify": MODES[mode].rectify}}


def load_params(path: str | Path = "params.yaml", preset: str | None = None,
                overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate `params.yaml` (see the module docstring)."""
    try:
        return params_from_dict(read_yaml(path), preset, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def to_dict(params: Params) -> dict:
    """Plain mapping of the resolved parameters (for manifests and logs)."""
    return dataclasses.asdict(params)
