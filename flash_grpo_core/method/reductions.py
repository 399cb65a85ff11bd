"""Reductions over the global batch (all ranks) that degrade to local ones without torch.distributed.

The advantage std is defined over the whole global batch (SPEC 5); these helpers make that true
on many GPUs and trivially true on one process. (The rectification mean, SPEC 3, covers one
optimizer step's items, which every rank holds: method/rectify.py needs no reduction.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of every element on every rank, float64 scalar."""
    total = values.double().sum()
    if is_distributed():
        dist.all_reduce(total)
    return total


def global_count(values: torch.Tensor) -> torch.Tensor:
    count = torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)
    if is_distributed():
        dist.all_reduce(count)
    return count


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over every element on every rank, float64 scalar."""
    return global_sum(values) / global_count(values)


def global_std(values: torch.Tensor) -> torch.Tensor:
    """Population standard deviation over every element on every rank, float64 scalar."""
    mean = global_mean(values)
    return torch.sqrt(global_mean((values.double() - mean) ** 2))
