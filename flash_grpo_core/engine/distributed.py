"""Process groups for multi-process stages, and how a stage's work is split across ranks.

A stage started under torchrun (stages/runtime/launch.py starts it so) finds RANK, WORLD_SIZE and
LOCAL_RANK in its environment; `init_from_env` joins the process group (gloo for CPU tensors, NCCL
for CUDA tensors when CUDA is present) and pins the rank's GPU. Without torchrun nothing is set up
and every helper here degrades to the single-process case, so the same stage code runs on 1 CPU
process and on 96 GPUs.

Work is split in units that do not depend on the world size (whole shards of prompt groups, whole
evaluation prompts), so every unit is computed exactly as a 1-process run computes it and the
outputs are the same bytes whatever the world size: `owned_units` deals the units round-robin.

`check_replicas` is the cluster's guard against ranks that drift apart (a data-parallel wrapper
that stopped averaging gradients, a rank that skipped a step): an exact checksum per tensor,
gathered from every rank, and one error line naming the ranks and tensors that differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "FLASH_GRPO_DIST_TIMEOUT"  # seconds a collective may wait for a peer (default 1800)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """Whether this process is a rank that torchrun started (its environment names a world)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def current() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env() -> World:
    """Join the process group torchrun described in the environment; a no-op without torchrun."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return current()
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"  # object and CPU collectives on gloo, GPU tensors on NCCL
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    dist.init_process_group(backend, timeout=timeout)
    return current()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def owned_units(count: int, world: World) -> list[int]:
    """The unit numbers 0..count-1 this rank computes: every world.size-th, starting at its rank."""
    return list(range(world.rank, count, world.size))


def gather_objects(value) -> list:
    """Every rank's `value`, in rank order, on every rank (one collective; [value] on one process)."""
    world = current()
    if not world.distributed:
        return [value]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def sum_counts(values: dict[str, int]) -> dict[str, int]:
    """Integer counters summed over the ranks (same keys on every rank)."""
    totals: dict[str, int] = {}
    for part in gather_objects(values):
        for key, value in part.items():
            totals[key] = totals.get(key, 0) + value
    return totals


class ReplicaMismatch(RuntimeError):
    """Ranks that should hold identical copies of some tensors hold different ones."""


_SAME_WIDTH_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def replica_checksums(tensors: dict[str, torch.Tensor]) -> list[int]:
    """One exact integer per tensor: the sum of its elements' bit patterns, read as integers of the
    element's width (a changed bit in one element changes it). Computed where the tensors live, one
    copy to the host."""
    if not tensors:
        return []
    sums = [t.detach().contiguous().view(_SAME_WIDTH_INTEGER[t.element_size()]).sum(dtype=torch.int64)
            for t in tensors.values()]
    return torch.stack(sums).cpu().tolist()


def check_replicas(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise ReplicaMismatch on every rank when the ranks' `tensors` (same names everywhere) are not
    bit for bit the same; one collective, nothing on one process."""
    if not current().distributed:
        return
    gathered = gather_objects(replica_checksums(tensors))  # [world size][number of tensors]
    apart = [rank for rank, sums in enumerate(gathered) if sums != gathered[0]]
    if apart:
        names = list(tensors)
        differing = [names[i] for i in range(len(names)) if len({sums[i] for sums in gathered}) > 1]
        raise ReplicaMismatch(f"rank(s) {apart} hold other {what} than rank 0: {len(differing)} of {len(names)} "
                              f"tensors differ (e.g. {differing[0]}); the ranks did not average their gradients "
                              "alike, so the update stops here")
