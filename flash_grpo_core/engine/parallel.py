"""Data parallelism for the update: gradients averaged across ranks by torch's own engines.

- `ddp`: DistributedDataParallel. Every rank holds the whole model; DDP averages the trainable
  weights' gradients in buckets overlapped with the backward pass (of the last micro-batch of an
  optimizer step: the others accumulate under `no_sync`). The default for LoRA (a few MB of
  adapter over a frozen base). Not `static_graph`, which PyTorch does not support with `no_sync`.
- `fsdp`: FSDP2 (`fully_shard`), each transformer block sharded on its own, then the root, so a
  rank holds 1/N of the weights, gradients, AdamW moments and EMA; a block's weights are gathered
  just for its forward and backward. The default for full fine-tuning, and the choice for LoRA on
  80 GB cards. The weights are kept in float32 (FSDP2 shards a group of one dtype only, and fp32 is
  the master copy AdamW needs) and cast to the compute dtype for the forward
  (`MixedPrecisionPolicy`); gradients are reduced in float32. Activation checkpointing, when
  configured, is already on the blocks (engine/iteration.py) before they are sharded.

The model is wrapped only for the update; sampling runs on one process's bare module, and the
checkpoint is gathered to full tensors (`Policy.checkpoint_tensors`), so its format does not
depend on the world size or the strategy.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

STRATEGIES = ("ddp", "fsdp")


class DDPParallel:
    replicated = True  # every rank holds every trainable weight: the replicas can be compared

    def __init__(self, transformer: torch.nn.Module, device: torch.device):
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        # Every trained weight takes part in every backward (masked items still run), so DDP need not
        # search for unused parameters. No static_graph: with no_sync it fails the first accumulated
        # backward and, worked around, stops averaging gradients after the first iteration (pytorch
        # issue 143580; docs/distributed.md). Activation checkpointing is torch's non-reentrant one,
        # which fires each weight's gradient hook once per backward, as plain DDP expects.
        self.module = DistributedDataParallel(transformer, device_ids=device_ids)

    def no_sync(self):
        return self.module.no_sync()


class FSDPParallel:
    replicated = False  # each weight lives on one rank only (sharded): nothing to compare

    def __init__(self, transformer: torch.nn.Module):
        self.module = transformer  # fully_shard changes the module in place

    @contextlib.contextmanager
    def no_sync(self):
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)


def data_parallel(policy, device: torch.device, strategy: str, compute_dtype: torch.dtype, make_optimizer):
    """Wrap `policy` (engine/trainer.py) for a multi-rank update; returns the wrapper.
    `make_optimizer(parameters)` builds the optimizer anew over sharded parameters (fsdp)."""
    if strategy == "ddp":
        return DDPParallel(policy.transformer, device)
    if strategy == "fsdp":
        shard_policy(policy, device, compute_dtype, make_optimizer)
        return FSDPParallel(policy.transformer)
    raise ValueError(f"unknown data-parallel strategy {strategy!r}; expected one of {STRATEGIES}")


@torch.no_grad()
def shard_policy(policy, device: torch.device, compute_dtype: torch.dtype, make_optimizer) -> None:
    """Shard the transformer with FSDP2 and move the optimizer state and EMA onto the shards.

    Every rank holds the same full weights, AdamW state and EMA beforehand (the same checkpoint), so
    each tensor is cut the way its parameter was (`distribute_tensor`) and nothing changes value.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import distribute_tensor

    from flash_grpo_core.models.lora import trainable_parameters

    transformer = policy.transformer
    old_parameters, old_optimizer = policy.parameters, policy.optimizer
    for param in transformer.parameters():  # one dtype per sharded group; mp_policy gives the compute dtype
        if param.dtype != torch.float32:
            param.data = param.data.float()
    # predict_velocity never changes the transformer's output in place, the hazard FSDP2 warns about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    precision = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                     reduce_dtype=torch.float32)
    for block in transformer.blocks:
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(transformer, mesh=mesh, mp_policy=precision)

    parameters = trainable_parameters(transformer)  # the sharded (DTensor) parameters, same names

    def cut(name: str, full: torch.Tensor) -> torch.Tensor:
        sharded = parameters[name]
        return distribute_tensor(full.to(device, torch.float32), sharded.device_mesh, sharded.placements)

    optimizer = make_optimizer(parameters)
    for name, old in old_parameters.items():
        state = old_optimizer.state.get(old)
        if state:
            optimizer.state[parameters[name]] = {
                "step": state["step"], "exp_avg": cut(name, state["exp_avg"]),
                "exp_avg_sq": cut(name, state["exp_avg_sq"])}
    policy.ema.parameters = parameters
    policy.ema.shadow = {name: cut(name, shadow) for name, shadow in policy.ema.shadow.items()}
    policy.parameters, policy.optimizer = parameters, optimizer
