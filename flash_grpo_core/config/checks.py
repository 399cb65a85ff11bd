"""The value checks every section uses: the error type, and checks of paths, seeds and counts, each
raising ConfigError with a message that names the key."""

from __future__ import annotations

import re

from flash_grpo_core.config.choices import SAFE_PATH


class ConfigError(ValueError):
    """A params file or override that cannot be used; the message says which key and what to do."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_path(key: str, value: str) -> None:
    """A path that dvc.yaml puts on a stage's command line (run through a shell): plain characters only."""
    _check(isinstance(value, str) and re.fullmatch(SAFE_PATH, value) is not None and ".." not in value.split("/"),
           f"{key} must be a relative path of letters, digits and . _ / - (it goes into dvc.yaml's shell "
           f"commands), got {value!r}")


SEED_LIMIT = 2**63  # seeds are hashed into 63-bit generator seeds (engine/seeding.py); below: non-negative


def _check_seed(key: str, value: int) -> None:
    _check(0 <= value < SEED_LIMIT, f"{key} must be an integer in [0, 2**63), got {value}")


def _check_positive(section: str, config, keys: tuple[str, ...]) -> None:
    """Each of `keys` of `config` >= 1, the message naming the first that is not."""
    for key in keys:
        _check(getattr(config, key) >= 1, f"{section}.{key} must be >= 1, got {getattr(config, key)}")
