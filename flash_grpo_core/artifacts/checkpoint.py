"""Training checkpoints as safetensors: trainable weights, their EMA, and the AdamW state.

A checkpoint is a directory:
    trainable.safetensors   the trainable weights (LoRA or full), float32, by parameter name
    ema.safetensors         their exponential moving average
    optimizer.safetensors   AdamW's exp_avg / exp_avg_sq per parameter name, and its step counts
    state.json              iteration, EMA step count, parameter names, the params that shaped it
It is written into a temporary sibling and renamed into place, so a directory with this name is
always complete. The frozen base model is not stored: it is rebuilt from the preset (seeded tiny
model, or Wan 2.1 from `model.path`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from flash_grpo_core.artifacts.atomic import atomic_directory

FILES = ("trainable.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, or does not fit the model."""


@dataclass
class CheckpointTensors:
    """What a checkpoint holds besides its state.json, as full float32 CPU tensors by parameter name."""

    weights: dict[str, torch.Tensor]  # the trainable weights (LoRA or full)
    ema: dict[str, torch.Tensor]  # their exponential moving average
    optimizer: dict[str, torch.Tensor]  # "<name>::exp_avg", "<name>::exp_avg_sq", "<name>::step"
    ema_steps: int  # optimizer steps the EMA has seen


class TrainState(Protocol):
    """The engine's `Policy` (engine/trainer.py) as a checkpoint sees it, named here so that the
    on-disk format does not import the engine: it hands over full tensors and takes them back (the
    engine gathers and scatters them when its weights are sharded across ranks)."""

    def checkpoint_tensors(self) -> CheckpointTensors: ...

    def restore(self, tensors: CheckpointTensors, source: str) -> None: ...


def write_checkpoint(tensors: CheckpointTensors, directory: str | os.PathLike, meta: dict) -> Path:
    """Write the checkpoint atomically; returns its path."""
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        for name, values in (("trainable", tensors.weights), ("ema", tensors.ema), ("optimizer", tensors.optimizer)):
            save_file({k: v.detach().float().cpu().contiguous() for k, v in values.items()},
                      staging / f"{name}.safetensors")
        state = {"ema_steps": tensors.ema_steps, "parameters": sorted(tensors.weights), **meta}
        (staging / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    return directory


def read_state(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is missing {', '.join(missing)}")
    return json.loads((directory / "state.json").read_text())


def read_checkpoint(directory: str | os.PathLike) -> tuple[CheckpointTensors, dict]:
    """The checkpoint's tensors and its state.json."""
    directory = Path(directory)
    state = read_state(directory)
    tensors = CheckpointTensors(load_file(directory / "trainable.safetensors"), load_file(directory / "ema.safetensors"),
                                load_file(directory / "optimizer.safetensors"), int(state["ema_steps"]))
    return tensors, state


def save_checkpoint(policy: TrainState, directory: str | os.PathLike, meta: dict) -> Path:
    """Write `policy`'s weights, EMA and optimizer state (one process; see `write_checkpoint`)."""
    return write_checkpoint(policy.checkpoint_tensors(), directory, meta)


def load_checkpoint(policy: TrainState, directory: str | os.PathLike) -> dict:
    """Load weights, EMA and optimizer state into `policy`; returns the checkpoint's state.json."""
    tensors, state = read_checkpoint(directory)
    policy.restore(tensors, str(directory))
    return state
