"""Training checkpoints as safetensors: trainable weights, their EMA, and the AdamW state.

A checkpoint is a directory:
    trainable.safetensors   the trainable weights (LoRA or full), float32, by parameter name
    ema.safetensors         their exponential moving average
    optimizer.safetensors   AdamW's exp_avg / exp_avg_sq per parameter name, and its step counts
    state.json              iteration, EMA step count, parameter names, the params that shaped it
                            (`config`: preset, seed, model.finetune and the LoRA settings)
    checksums.json          size and sha256 of the four files above, written last
It is written into a temporary sibling and renamed into place, so a directory with this name is
always complete; readers verify the checksums first and raise CheckpointError naming the bad file.
The frozen base model is not stored: it is rebuilt from the preset (seeded tiny model, or Wan 2.1
from `model.path`), so a checkpoint written under other params is refused (`check_config`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flash_grpo_core.artifacts import checksums
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
        checksums.write_index(staging, FILES)  # last: without it the folder reads as unfinished
    return directory


def read_state(directory: str | os.PathLike) -> dict:
    """The checkpoint's state.json, after checking that every file is there and state.json's sha256."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is missing {', '.join(missing)}")
    checksums.verify_files(directory, ["state.json"], CheckpointError)
    path = directory / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        int(state["ema_steps"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint state ({error!r})") from error
    return state


def read_checkpoint(directory: str | os.PathLike) -> tuple[CheckpointTensors, dict]:
    """The checkpoint's tensors and its state.json, every file checked against checksums.json."""
    directory = Path(directory)
    state = read_state(directory)
    checksums.verify_files(directory, FILES, CheckpointError)
    files = [_load(directory / f"{name}.safetensors") for name in ("trainable", "ema", "optimizer")]
    return CheckpointTensors(*files, int(state["ema_steps"])), state


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error


def config_record(params) -> dict:
    """The params that shape a checkpoint's trainable weights, by key: recorded in state.json."""
    model = params.model
    record = {"preset": params.preset, "seed": params.seed, "model.finetune": model.finetune}
    if model.finetune == "lora":
        record.update({"model.lora_rank": model.lora_rank, "model.lora_alpha": model.lora_alpha,
                       "model.lora_targets": list(model.lora_targets), "model.lora_init": model.lora_init})
    return record


def check_config(directory: str | os.PathLike, params) -> dict:
    """state.json of the checkpoint in `directory`, after checking it was written under `params`'
    `config_record`; CheckpointError naming each differing key with both values otherwise."""
    state = read_state(directory)
    recorded, expected = state.get("config"), config_record(params)
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{Path(directory) / 'state.json'} records no config (written by an older version): "
                              "rerun the stage that wrote it")
    differing = [f"{key}: {recorded.get(key)!r} in the checkpoint, {value!r} in the params"
                 for key, value in expected.items() if recorded.get(key) != value]
    if differing:
        raise CheckpointError(f"checkpoint {directory} was written under other params ({'; '.join(differing)}): "
                              "rerun from the stage that wrote it (`dvc repro`)")
    return state


def save_checkpoint(policy: TrainState, directory: str | os.PathLike, meta: dict) -> Path:
    """Write `policy`'s weights, EMA and optimizer state (one process; see `write_checkpoint`)."""
    return write_checkpoint(policy.checkpoint_tensors(), directory, meta)


def load_checkpoint(policy: TrainState, directory: str | os.PathLike) -> dict:
    """Load weights, EMA and optimizer state into `policy`; returns the checkpoint's state.json."""
    tensors, state = read_checkpoint(directory)
    policy.restore(tensors, str(directory))
    return state


def read_weights(directory: str | os.PathLike, ema: bool) -> dict[str, torch.Tensor]:
    """Only the EMA (`ema`) or the trained weights of a checkpoint, checked against checksums.json:
    for readers that need neither the other nor the optimizer state (under full fine-tuning of
    Wan 14B each file is tens of GB)."""
    name = "ema.safetensors" if ema else "trainable.safetensors"
    read_state(directory)
    checksums.verify_files(directory, [name], CheckpointError)
    return _load(Path(directory) / name)
