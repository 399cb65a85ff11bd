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

AdamW's moments are as large as the weights and their EMA together and only the next update reads
them. With `train.optimizer_state: beside` they leave the checkpoint (a DVC output, cached for
every iteration) for a folder beside it, `<run>/optimizer/it<k>/` for the checkpoint
`<run>/it<k>/checkpoint` (its own optimizer.safetensors and checksums.json, written first), which
state.json names (`optimizer_beside`, relative to the checkpoint) and which the update prunes to
the latest `train.keep_optimizer_states` iterations. Only the update reads the moments; the other
stages load weights and EMA alone (`read_checkpoint(optimizer=False)`).
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
from flash_grpo_core.artifacts.atomic import atomic_directory, loads_finite

FILES = ("trainable.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json")
MOMENTS = "optimizer.safetensors"


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


def write_checkpoint(tensors: CheckpointTensors, directory: str | os.PathLike, meta: dict,
                     beside: bool = False) -> Path:
    """Write the checkpoint atomically; returns its path. `beside`: AdamW's moments go to the
    folder `moments_folder(directory)` instead, written (atomically) before the checkpoint."""
    directory = Path(directory)
    parts = [("trainable", tensors.weights), ("ema", tensors.ema)]
    if beside:
        write_moments(tensors.optimizer, moments_folder(directory))
        meta = {**meta, "optimizer_beside": os.path.relpath(moments_folder(directory), directory)}
    else:
        parts.append(("optimizer", tensors.optimizer))
    with atomic_directory(directory) as staging:
        for name, values in parts:
            _save(values, staging / f"{name}.safetensors")
        state = {"ema_steps": tensors.ema_steps, "parameters": sorted(tensors.weights), **meta}
        (staging / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        checksums.write_index(staging, _files(state))  # last: without it the folder reads as unfinished
    return directory


def moments_folder(checkpoint: str | os.PathLike) -> Path:
    """Where `<run>/it<k>/checkpoint` keeps AdamW's moments beside it: `<run>/optimizer/it<k>`."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent / "optimizer" / checkpoint.parent.name


def write_moments(optimizer: dict[str, torch.Tensor], folder: Path) -> None:
    with atomic_directory(folder) as staging:
        _save(optimizer, staging / MOMENTS)
        checksums.write_index(staging, [MOMENTS])


def prune_moments(checkpoint: str | os.PathLike, keep: int) -> list[Path]:
    """Remove the moments folders of iterations before the latest `keep` (counting the one of
    `checkpoint`); returns what was removed."""
    import shutil

    def number(folder: Path) -> int | None:
        return int(folder.name[2:]) if folder.name.startswith("it") and folder.name[2:].isdigit() else None

    folder = moments_folder(checkpoint)
    latest = number(folder)
    if latest is None:  # not a pipeline checkpoint path (<run>/it<k>/checkpoint): nothing to count from
        return []
    removed = [old for old in sorted(folder.parent.iterdir()) if (n := number(old)) is not None and n <= latest - keep]
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    return removed


def _save(values: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().float().cpu().contiguous() for k, v in values.items()}, path)


def _files(state: dict) -> list[str]:
    """The files a checkpoint with this state.json holds (all but the moments when they are beside)."""
    return [name for name in FILES if not (name == MOMENTS and state.get("optimizer_beside"))]


def read_state(directory: str | os.PathLike) -> dict:
    """The checkpoint's state.json, after checking that every file is there and state.json's sha256."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not (directory / "state.json").is_file():
        raise CheckpointError(f"checkpoint {directory} is missing state.json")
    checksums.verify_files(directory, ["state.json"], CheckpointError)
    path = directory / "state.json"
    try:
        state = loads_finite(path.read_text(encoding="utf-8"))
        int(state["ema_steps"])
    except (KeyError, TypeError, ValueError) as error:  # ValueError: not UTF-8, not JSON, non-finite
        raise CheckpointError(f"{path}: not a readable checkpoint state ({error!r})") from error
    missing = [name for name in _files(state) if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is missing {', '.join(missing)}")
    return state


def read_checkpoint(directory: str | os.PathLike, optimizer: bool = True) -> tuple[CheckpointTensors, dict]:
    """The checkpoint's tensors and its state.json, every file read checked against its checksums;
    without `optimizer`, the AdamW moments are left unread (an empty dict)."""
    directory = Path(directory)
    state = read_state(directory)
    checksums.verify_files(directory, [name for name in _files(state) if name != MOMENTS], CheckpointError)
    weights, ema = (_load(directory / f"{name}.safetensors") for name in ("trainable", "ema"))
    _check_ema(directory, weights, ema)
    moments = _read_moments(directory, state) if optimizer else {}
    return CheckpointTensors(weights, ema, moments, int(state["ema_steps"])), state


def _check_ema(directory: Path, weights: dict[str, torch.Tensor], ema: dict[str, torch.Tensor]) -> None:
    """The EMA holds one tensor of the trainable weight's shape per name (the engine checks the
    weights themselves against the model, naming the tensor)."""
    if set(ema) != set(weights):
        odd = sorted(set(ema) ^ set(weights))
        raise CheckpointError(f"{directory / 'ema.safetensors'}: its tensors are not those of trainable.safetensors "
                              f"({len(odd)} differ, e.g. {odd[:2]})")
    for name, tensor in ema.items():
        if tensor.shape != weights[name].shape:
            raise CheckpointError(f"{directory / 'ema.safetensors'}: tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"trainable.safetensors {tuple(weights[name].shape)}")


def _read_moments(directory: Path, state: dict) -> dict[str, torch.Tensor]:
    if not state.get("optimizer_beside"):
        checksums.verify_files(directory, [MOMENTS], CheckpointError)
        return _load(directory / MOMENTS)
    folder = (directory / state["optimizer_beside"]).resolve()
    if not (folder / MOMENTS).is_file():
        raise CheckpointError(f"checkpoint {directory} keeps AdamW's moments in {folder}, which is gone: only the "
                              f"latest train.keep_optimizer_states iterations keep them, outside DVC's cache; "
                              f"continue from the latest iteration, or rerun the updates from one that has them")
    checksums.verify_files(folder, [MOMENTS], CheckpointError)
    return _load(folder / MOMENTS)


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


def save_checkpoint(policy: TrainState, directory: str | os.PathLike, meta: dict, beside: bool = False) -> Path:
    """Write `policy`'s weights, EMA and optimizer state (one process; see `write_checkpoint`)."""
    return write_checkpoint(policy.checkpoint_tensors(), directory, meta, beside)


def load_checkpoint(policy: TrainState, directory: str | os.PathLike, optimizer: bool = True) -> dict:
    """Load weights, EMA and (with `optimizer`) the optimizer state into `policy`; returns the
    checkpoint's state.json."""
    tensors, state = read_checkpoint(directory, optimizer)
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
