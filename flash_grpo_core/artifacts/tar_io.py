"""Byte-reproducible WebDataset tar files: write samples with fixed headers, read them back.

A sample is a dict `{"__key__": key, field: bytes, ...}`; in the tar it is one member per field,
named `<key>.<field>`, fields in sorted order. Every header is fixed (mtime 0, uid/gid 0, uname and
gname `flash-grpo`, mode 0644, ustar format), so the bytes depend only on the samples. Files are
written under `TEMP_PREFIX + name`, fsynced and renamed into place. The rollout shard format on top
of this is flash_grpo_core/artifacts/shards.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

from flash_grpo_core.artifacts.faults import fault_point

TEMP_PREFIX = ".tmp-"  # unfinished files in an output directory; removed before the next write
TAR_USER = "flash-grpo"
TAR_MODE = 0o644


class ShardError(ValueError):
    """A record, shard or shard directory that breaks the format; the message names what and where."""


def write_tar(samples: Sequence[dict], path: Path) -> None:
    """A ustar archive whose bytes depend only on the samples: fixed headers, samples in the given
    order, each sample's fields (all but the `__key__`) in sorted order."""
    temp = path.with_name(TEMP_PREFIX + path.name)
    with open(temp, "wb") as stream:
        with tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                for field in sorted(name for name in sample if not name.startswith("_")):
                    data = sample[field]
                    info = tarfile.TarInfo(f"{sample['__key__']}.{field}")
                    info.size, info.mtime, info.mode = len(data), 0, TAR_MODE
                    info.uid = info.gid = 0
                    info.uname = info.gname = TAR_USER
                    tar.addfile(info, io.BytesIO(data))
        stream.flush()
        os.fsync(stream.fileno())
    fault_point("written", file=path.name)  # FLASH_GRPO_FAULT: a kill between write and rename (tests)
    os.replace(temp, path)
    fault_point("renamed", file=path.name)


def replace_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(TEMP_PREFIX + path.name)
    with open(temp, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    fault_point("written", file=path.name)  # FLASH_GRPO_FAULT: a kill between write and rename (tests)
    os.replace(temp, path)
    fault_point("renamed", file=path.name)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tar_samples(path: Path) -> list[dict]:
    """The shard's samples as raw bytes ({'__key__', '__url__', field: bytes}), members grouped by key."""
    samples: list[dict] = []
    key = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key = member.name.split(".", 1)[0]
                if not member.isfile() or "/" in member.name or "." not in member.name:
                    raise ShardError(f"shard {path}: unexpected tar member {member.name!r}")
                field = member.name.split(".", 1)[1]
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key, "__url__": str(path)})
                if field in samples[-1]:
                    raise ShardError(f"shard {path}: record {key!r}: entry {field!r} occurs twice")
                samples[-1][field] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
        where = f", record {key!r}" if key is not None else ""
        raise ShardError(f"shard {path}{where}: not a readable tar file ({error}); is it truncated?") from error
    return samples
