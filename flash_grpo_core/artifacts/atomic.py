"""Atomic file writes: a temporary file beside the target, fsynced, then renamed onto it.

An interrupted writer leaves at most a hidden `.name.<12 hex>.tmp` file or folder (and, while a
folder replaces an old one, `.name.<12 hex>.old`), never a half-written target that a later stage
could take for a finished one. A killed process runs no clean-up, so every write of `name` first
removes the temporaries that earlier writes of `name` left: the next run of the stage that was
interrupted leaves nothing beside its outputs, where a folder hash (e.g. `evaluate`'s dependency on
`eval/points/`) would otherwise include them.

Safetensors files that carry their sha256 are written with these in `safetensors_io.py`.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flash_grpo_core.artifacts.faults import fault_point


def _temporary(path: Path, suffix: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.{suffix}")


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove what interrupted writes of `path` left beside it; returns what was removed.

    Matches only this module's names for `path` (and those of its earlier `mkdtemp` naming), so the
    temporaries of other outputs in the same folder are left alone."""
    path = Path(path)
    name = re.escape(path.name)
    stale = re.compile(rf"\.{name}\.(?:[0-9a-f]{{12}}\.(?:tmp|old)|[a-z0-9_]{{8}}\.tmp|old-[a-z0-9_]{{8}})")
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in sorted(path.parent.iterdir()):
        if stale.fullmatch(candidate.name):
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    # not created here: the writer creates it, with the usual permissions (mkstemp would give 0600)
    temporary = _temporary(path)
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        fault_point("written", file=path.name)  # FLASH_GRPO_FAULT: a kill between write and rename (tests)
        os.replace(temporary, path)
        fault_point("renamed", file=path.name)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A staging directory beside `path` to fill; it replaces `path` (and whatever was there) only if
    the block succeeds, so a reader sees the old directory or the complete new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    staging = _temporary(path)
    staging.mkdir()
    try:
        yield staging
        for file in staging.rglob("*"):  # some writers create owner-only files
            file.chmod(0o755 if file.is_dir() else 0o644)
        staging.chmod(0o755)
        fault_point("written", file=path.name)
        if path.exists():  # a directory cannot be renamed over a non-empty one: move the old one aside
            retired = _temporary(path, "old")
            os.replace(path, retired)
            os.replace(staging, path)
            shutil.rmtree(retired)
        else:
            os.replace(staging, path)
        fault_point("renamed", file=path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(data, path: str | os.PathLike) -> None:
    """Pretty, key-sorted JSON with a final newline, written atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def loads_finite(text: str | bytes):
    """`json.loads` that refuses NaN, Infinity and numbers beyond float range with a ValueError
    naming the token: every state a stage reads holds finite numbers, and Python's json would
    otherwise accept them (and write them) without a word."""
    def refuse(token: str):
        raise ValueError(f"non-finite number {token} (JSON holds finite numbers only)")

    def parse_float(token: str) -> float:
        value = float(token)
        return value if math.isfinite(value) else refuse(token)

    return json.loads(text, parse_constant=refuse, parse_float=parse_float)


def read_json_object(path: str | os.PathLike, error: type[Exception], rerun: str) -> dict:
    """A JSON object a stage wrote; `error` naming the file (and `rerun`, what restores it) when it is
    missing, not JSON, holds a non-finite number, or is not an object."""
    try:
        data = loads_finite(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as problem:
        raise error(f"cannot read {path}: {type(problem).__name__}: {problem} ({rerun})") from problem
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not an object ({rerun})")
    return data
