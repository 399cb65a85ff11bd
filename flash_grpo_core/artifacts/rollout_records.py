"""Converting between one iteration's `RolloutBatch` and per-sample `RolloutRecord`s.

The rollout stage turns its batch into records for the shards (flash_grpo_core/artifacts/shards.py); the
score and update stages turn the records they read back into a batch. Record keys are
`it<iteration>-p<prompt>-g<group>`, so sorting by key keeps whole groups together, prompt-major.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flash_grpo_core.artifacts.records import TENSOR_FIELDS, RolloutRecord, check_unique_keys
from flash_grpo_core.artifacts.tar_io import ShardError
from flash_grpo_core.method.batch import RolloutBatch


def records_from_batch(batch: RolloutBatch, prompts: list[str], prompt_ids: list[str], iteration: int, seed: int,
                       group_size: int, keep_final: bool = False) -> list[RolloutRecord]:
    """Split one iteration's rollouts (S samples) into records, in sample order.

    Sample s belongs to prompt `batch.prompt_index[s]` (an index into `prompts` / `prompt_ids`) and
    is member s % G of its group; the G consecutive samples of a group must share a prompt.
    `batch.counters` is not part of a record, nor `batch.final_latents` unless `keep_final` (the
    forward-process modes train on them).
    """
    total = batch.num_samples
    if group_size < 1 or total % group_size:
        raise ShardError(f"{total} samples do not form whole groups of {group_size}")
    if len(prompts) != len(prompt_ids):
        raise ShardError(f"{len(prompts)} prompts but {len(prompt_ids)} prompt ids")
    prompt_index = batch.prompt_index.tolist()  # [S]
    for s, p in enumerate(prompt_index):
        if not 0 <= p < len(prompts):
            raise ShardError(f"sample {s}: prompt index {p} outside the {len(prompts)} prompts")
        if p != prompt_index[s - s % group_size]:
            raise ShardError(f"sample {s}: group {s // group_size} mixes prompts "
                             f"{prompt_index[s - s % group_size]} and {p}")
    prompt_width, group_width = max(6, len(str(len(prompts) - 1))), max(2, len(str(group_size - 1)))
    records = []
    for s, p in enumerate(prompt_index):
        g = s % group_size
        records.append(RolloutRecord(
            key=f"it{iteration:04d}-p{p:0{prompt_width}d}-g{g:0{group_width}d}", prompt_id=prompt_ids[p],
            prompt=prompts[p], prompt_index=p, group_index=g, iteration=iteration, seed=seed,
            # clone: a record owns its tensors rather than keeping the whole batch alive
            steps=batch.steps[s].clone(), latents=batch.latents[s].clone(), next_latents=batch.next_latents[s].clone(),
            log_probs=batch.log_probs[s].clone(), final_latents=batch.final_latents[s].clone() if keep_final else None))
    check_unique_keys(records)
    return records


def videos_by_key(records: Sequence[RolloutRecord], videos: torch.Tensor) -> dict[str, torch.Tensor]:
    """{record key: video} for `write_shards`, from the batch's decoded videos [S, F', H', W', 3] in sample order."""
    if videos.shape[0] != len(records):
        raise ShardError(f"videos hold {videos.shape[0]} samples, the records {len(records)}")
    return {record.key: video for record, video in zip(records, videos)}


def batch_from_records(records: Sequence[RolloutRecord]) -> tuple[RolloutBatch, list[str], list[str]]:
    """Stack records (in the given order) back into (RolloutBatch, prompts, prompt_ids).

    Prompts are numbered in first-seen order of their (iteration, prompt_index), and
    `batch.prompt_index` indexes the returned `prompts` / `prompt_ids`. `final_latents` come back
    where the records hold them, else as an empty tensor of shape [S, 0]; `counters` comes back empty.
    """
    if not records:
        raise ShardError("no records to build a batch from")
    first = records[0]
    slots: dict[tuple[int, int], int] = {}
    prompts, prompt_ids, prompt_index = [], [], []
    for record in records:
        _check_same_layout(first, record)
        slot = slots.setdefault((record.iteration, record.prompt_index), len(slots))
        if slot == len(prompts):
            prompts.append(record.prompt)
            prompt_ids.append(record.prompt_id)
        elif (prompts[slot], prompt_ids[slot]) != (record.prompt, record.prompt_id):
            raise ShardError(f"record {record.key!r}: prompt index {record.prompt_index} of iteration "
                             f"{record.iteration} names two different prompts")
        prompt_index.append(slot)

    def stack(name: str) -> torch.Tensor:
        return torch.stack([getattr(record, name) for record in records])

    batch = RolloutBatch(prompt_index=torch.tensor(prompt_index, dtype=torch.long), steps=stack("steps"),
                         latents=stack("latents"), next_latents=stack("next_latents"), log_probs=stack("log_probs"),
                         final_latents=stack("final_latents") if first.final_latents is not None
                         else torch.empty(len(records), 0, dtype=first.latents.dtype))
    return batch, prompts, prompt_ids


def _check_same_layout(first: RolloutRecord, record: RolloutRecord) -> None:
    if (first.final_latents is None) != (record.final_latents is None):
        raise ShardError(f"record {record.key!r}: field 'final_latents': present in one of records {first.key!r} and "
                         f"{record.key!r} only; records of one batch must match")
    for name in (*TENSOR_FIELDS, *(["final_latents"] if first.final_latents is not None else [])):
        a, b = getattr(first, name), getattr(record, name)
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ShardError(f"record {record.key!r}: field {name!r}: {b.dtype} {list(b.shape)} differs from record "
                             f"{first.key!r}'s {a.dtype} {list(a.shape)}; records of one batch must match")
