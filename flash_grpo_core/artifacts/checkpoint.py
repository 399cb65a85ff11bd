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
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from flash_grpo_core.artifacts.atomic import atomic_directory

FILES = ("trainable.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, or does not fit the model."""


class TrainState(Protocol):
    """What a checkpoint holds of the engine's `Policy` (engine/trainer.py), named here so that the
    on-disk format does not import the engine: the trainable weights, their optimizer, their EMA
    (`shadow`, `steps`, `load_state_dict`)."""

    parameters: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: Any


def _optimizer_tensors(policy: TrainState) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, param in policy.parameters.items():
        state = policy.optimizer.state.get(param, {})
        for field in ("exp_avg", "exp_avg_sq", "step"):
            if field in state:
                tensors[f"{name}::{field}"] = torch.as_tensor(state[field]).detach().float().cpu().contiguous()
    return tensors


def save_checkpoint(policy: TrainState, directory: str | os.PathLike, meta: dict) -> Path:
    """Write the checkpoint atomically; returns its path."""
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        weights = {k: v.detach().float().cpu().contiguous() for k, v in policy.parameters.items()}
        save_file(weights, staging / "trainable.safetensors")
        save_file({k: v.contiguous() for k, v in policy.ema.shadow.items()}, staging / "ema.safetensors")
        save_file(_optimizer_tensors(policy), staging / "optimizer.safetensors")
        state = {"ema_steps": policy.ema.steps, "parameters": sorted(policy.parameters), **meta}
        (staging / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    return directory


def read_state(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is missing {', '.join(missing)}")
    return json.loads((directory / "state.json").read_text())


@torch.no_grad()
def load_checkpoint(policy: TrainState, directory: str | os.PathLike) -> dict:
    """Load weights, EMA and optimizer state into `policy`; returns the checkpoint's state.json."""
    directory = Path(directory)
    state = read_state(directory)
    weights = load_file(directory / "trainable.safetensors")
    if set(weights) != set(policy.parameters):
        extra, absent = sorted(set(weights) - set(policy.parameters)), sorted(set(policy.parameters) - set(weights))
        raise CheckpointError(f"checkpoint {directory} does not fit the model: {len(absent)} trainable weight(s) "
                              f"absent (e.g. {absent[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}); "
                              f"was it written with other model or LoRA settings?")
    for name, param in policy.parameters.items():
        if weights[name].shape != param.shape:
            raise CheckpointError(f"checkpoint {directory}: {name} has shape {tuple(weights[name].shape)}, "
                                  f"the model expects {tuple(param.shape)}")
        param.copy_(weights[name])
    policy.ema.load_state_dict({"shadow": load_file(directory / "ema.safetensors"), "steps": state["ema_steps"]})
    optimizer = load_file(directory / "optimizer.safetensors")
    for name, param in policy.parameters.items():
        if f"{name}::exp_avg" in optimizer:
            policy.optimizer.state[param] = {
                "step": optimizer[f"{name}::step"].reshape(()),
                "exp_avg": optimizer[f"{name}::exp_avg"].to(param.device, param.dtype),
                "exp_avg_sq": optimizer[f"{name}::exp_avg_sq"].to(param.device, param.dtype),
            }
    return state
