"""Checksums for every artifact a stage reads, in one design: a sha256 index written last, verified on read.

- Folders of files (checkpoints): `checksums.json`, written into the folder after every other file,
  lists each file's size and sha256 (as `shards.json` does for the rollout shards). A folder
  without it is an unfinished or foreign write; a file that differs from it is named.
- Single safetensors files (prompt embeddings, eval videos): the digest of the tensors (name,
  dtype, shape, bytes) and of the metadata travels in the file's own metadata, so the file stays
  one DVC output that the run cache restores whole (a sidecar file would not travel with it).
- Parquet tables (scores): the digest of the columns travels in the schema's key-value metadata.

Verification raises the caller's error type (CheckpointError, ShardError, ScoresError: the stages
turn them into exit code 2 with one line) naming the bad file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from flash_grpo_core.artifacts.atomic import loads_finite
from flash_grpo_core.artifacts.tar_io import sha256

INDEX_NAME = "checksums.json"
FORMAT = "flash-grpo-checksums/1"


def write_index(directory: str | os.PathLike, names: Iterable[str]) -> Path:
    """Write `directory/checksums.json` listing `names` (files in `directory`); call it last."""
    directory = Path(directory)
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256(directory / name)}
             for name in sorted(names)}
    path = directory / INDEX_NAME
    path.write_text(json.dumps({"format": FORMAT, "files": files}, indent=2, sort_keys=True) + "\n")
    return path


def read_index(directory: Path, error: type[Exception]) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of `directory/checksums.json`; `error` naming it when absent or unreadable."""
    path = directory / INDEX_NAME
    if not path.is_file():
        raise error(f"{directory} has no {INDEX_NAME}: an unfinished write or one by an older version "
                    "(rerun the stage that writes it)")
    try:
        index = loads_finite(path.read_text(encoding="utf-8"))
        files = index["files"]
        valid = index["format"] == FORMAT and all(
            isinstance(entry["sha256"], str) and isinstance(entry["bytes"], int) for entry in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise error(f"{path}: not a readable checksum index ({exc!r})") from exc
    if not valid:
        raise error(f"{path}: not a {FORMAT!r} checksum index")
    return files


def verify_files(directory: str | os.PathLike, names: Iterable[str], error: type[Exception]) -> None:
    """Check that each of `names` exists and matches `directory/checksums.json`; `error` naming the bad file."""
    directory = Path(directory)
    files = read_index(directory, error)
    for name in names:
        path = directory / name
        if name not in files:
            raise error(f"{path}: not listed in {directory / INDEX_NAME}")
        if not path.is_file():
            raise error(f"{path}: missing (listed in {directory / INDEX_NAME})")
        size, digest = path.stat().st_size, sha256(path)
        if size != files[name]["bytes"] or digest != files[name]["sha256"]:
            raise error(f"{path}: {size} bytes, sha256 {digest[:16]}..., but {INDEX_NAME} says "
                        f"{files[name]['bytes']} bytes, {files[name]['sha256'][:16]}...: the file is truncated, "
                        "corrupt or was changed after writing")


def tensors_digest(tensors: Mapping, metadata) -> str:
    """sha256 of the tensors (by name: dtype, shape, bytes) and the JSON-serialisable `metadata`."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode("utf-8"))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


DIGEST_KEY = b"flash_grpo_sha256"  # a Parquet table's schema metadata: the columns_digest of its columns


def columns_digest(columns: Mapping[str, list]) -> str:
    """sha256 of a table's columns ({name: values}; floats round-trip exactly). Values JSON cannot hold
    (bytes, NaN: a corrupt table's) hash by their repr, so they never match a written table's digest."""
    text = json.dumps(dict(columns), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
