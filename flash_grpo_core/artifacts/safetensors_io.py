"""Safetensors files that carry their own sha256: written atomically and byte-identical for identical
input, verified when read (prompt embeddings, evaluation samples)."""

from __future__ import annotations

import json
import os

from flash_grpo_core.artifacts.atomic import atomic_path, loads_finite
from flash_grpo_core.artifacts.checksums import tensors_digest

METADATA_KEY = "flash_grpo"  # one key: safetensors writes several metadata keys in a random order


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """A safetensors file written atomically, byte-identical for identical input: `metadata` and the
    sha256 of the tensors and metadata travel as one key-sorted JSON string (read back, and
    verified, with `read_safetensors`)."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    metadata = {} if metadata is None else metadata
    record = {"metadata": metadata, "sha256": tensors_digest(tensors, metadata)}
    header = {METADATA_KEY: json.dumps(record, sort_keys=True, ensure_ascii=False)}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=header)


def read_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """(tensors, metadata) of a file from `write_safetensors`, after checking its sha256; raises
    ValueError naming the file (or OSError) if it is unreadable, e.g. truncated, lacks the metadata,
    or its tensors or metadata differ from what was written (a flipped byte)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            names = handle.keys()  # a safetensors handle, not a dict: it cannot be iterated
            tensors = {name: handle.get_tensor(name) for name in names}
        record = loads_finite(header[METADATA_KEY])
        metadata, recorded = record["metadata"], record["sha256"]
    except (SafetensorError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: not a readable safetensors file with {METADATA_KEY!r} metadata and its sha256 "
                         f"({error!r}); is it truncated or from an older version?") from error
    if tensors_digest(tensors, metadata) != recorded:
        raise ValueError(f"{path}: sha256 of its tensors and metadata does not match the one recorded in it: "
                         "the file is corrupt or was changed after writing")
    return tensors, metadata
