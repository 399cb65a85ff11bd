"""The score stage's table: one row per rollout sample, rewards, reward components and advantages.

Columns: `key` (the rollout record key), `prompt_id`, `iteration`, `group_index`, `reward`,
`advantage`, then one float column per reward component (`component/<name>`). Rows are in record
key order, which is prompt-major: whole groups, one after another. The schema's key-value metadata
holds the sha256 of the columns (`flash_grpo_sha256`, flash_grpo_core/artifacts/checksums.py), which
`read_scores` verifies: a corrupt or truncated table is a ScoresError naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from flash_grpo_core.artifacts.atomic import atomic_path
from flash_grpo_core.artifacts.checksums import DIGEST_KEY, columns_digest
from flash_grpo_core.method.advantages import check_finite

COMPONENT_PREFIX = "component/"
class ScoresError(ValueError):
    """A scores table that does not match the rollouts it should describe."""


def write_scores(path: str | os.PathLike, records: Sequence, rewards: torch.Tensor, advantages: torch.Tensor,
                 components: dict[str, torch.Tensor]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_finite("rewards", rewards)
    check_finite("advantages", advantages)
    columns = {
        "key": pa.array([r.key for r in records], pa.string()),
        "prompt_id": pa.array([r.prompt_id for r in records], pa.string()),
        "iteration": pa.array([r.iteration for r in records], pa.int32()),
        "group_index": pa.array([r.group_index for r in records], pa.int32()),
        "reward": pa.array(rewards.double().tolist(), pa.float64()),
        "advantage": pa.array(advantages.double().tolist(), pa.float64()),
    }
    for name in sorted(components):
        columns[COMPONENT_PREFIX + name] = pa.array(components[name].double().tolist(), pa.float64())
    table = pa.table(columns)
    table = table.replace_schema_metadata({DIGEST_KEY: columns_digest(table.to_pydict())})
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary, compression="zstd")


def read_scores(path: str | os.PathLike) -> dict[str, list]:
    """The table's columns ({name: values}), after checking them against the sha256 stored with them;
    ScoresError naming the file when it is missing, not Parquet, truncated or corrupt."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        columns = table.to_pydict()
    except (OSError, ValueError, pa.ArrowException) as error:  # missing file, not Parquet, corrupt pages
        raise ScoresError(f"cannot read scores {path}: {error}") from error
    recorded = (table.schema.metadata or {}).get(DIGEST_KEY, b"").decode("ascii", "replace")
    if columns_digest(columns) != recorded:
        raise ScoresError(f"scores {path}: the columns' sha256 does not match the one stored with them "
                          f"({'none stored: written by an older version' if not recorded else 'the file is corrupt'})")
    missing = [name for name in ("key", "advantage", "reward") if name not in columns]
    if missing:
        raise ScoresError(f"scores {path}: no column(s) {missing}")
    return columns


def read_advantages(path: str | os.PathLike, keys: Sequence[str]) -> torch.Tensor:
    """Advantages float32 [S] aligned to `keys`; a clear error if the table does not match them."""
    return aligned_advantages(read_scores(path), keys, path)


def aligned_advantages(table: dict[str, list], keys: Sequence[str], path: str | os.PathLike) -> torch.Tensor:
    """`read_advantages` on a table already read from `path` (`read_scores`)."""
    by_key = dict(zip(table["key"], table["advantage"]))
    missing = [key for key in keys if key not in by_key]
    if missing or len(by_key) != len(keys):
        raise ScoresError(f"scores {path} do not match the rollouts: {len(missing)} sample(s) without a score "
                          f"(e.g. {missing[:3]}), {len(by_key)} scored vs {len(keys)} rolled out")
    advantages = torch.tensor([by_key[key] for key in keys], dtype=torch.float32)
    check_finite(f"advantages in {path}", advantages)
    return advantages
