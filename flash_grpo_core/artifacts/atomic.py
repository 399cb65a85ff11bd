"""Atomic file writes: a temporary file beside the target, fsynced, then renamed onto it.

An interrupted writer leaves at most a hidden `.name.<random>.tmp` file, never a half-written
target that a later stage could take for a finished one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not created here: the writer creates it, with the usual permissions (mkstemp would give 0600)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A staging directory beside `path` to fill; it replaces `path` (and whatever was there) only if
    the block succeeds, so a reader sees the old directory or the complete new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield staging
        for file in staging.rglob("*"):  # mkdtemp (and some writers) create owner-only files
            file.chmod(0o755 if file.is_dir() else 0o644)
        staging.chmod(0o755)
        if path.exists():  # a directory cannot be renamed over a non-empty one: move the old one aside
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, retired / path.name)
            os.replace(staging, path)
            shutil.rmtree(retired)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(data, path: str | os.PathLike) -> None:
    """Pretty, key-sorted JSON with a final newline, written atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


METADATA_KEY = "flash_grpo"  # one key: safetensors writes several metadata keys in a random order


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """A safetensors file written atomically, byte-identical for identical input: `metadata` travels
    as one key-sorted JSON string (read back with `read_safetensors`)."""
    from safetensors.torch import save_file

    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True, ensure_ascii=False)} if metadata is not None else None
    with atomic_path(path) as temporary:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(temporary), metadata=header)


def read_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """(tensors, metadata) of a file from `write_safetensors`; raises ValueError (or OSError) if it is
    unreadable, e.g. truncated, or lacks the metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        return tensors, json.loads(header[METADATA_KEY])
    except (SafetensorError, KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable safetensors file with {METADATA_KEY!r} metadata ({error!r})") from error
