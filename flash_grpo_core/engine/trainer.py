"""The rectified GRPO update: recompute log-probabilities of stored SDE steps and take PPO-clip steps.

Trained items are (sample, step) pairs of a `RolloutBatch`. Per iteration the items are shuffled and
split into `minibatches` optimizer steps (the first is exactly on-policy, later ones slightly off
it, which is what the ratio clip is for). Each item's loss term is weighted by its rectification
weight, normalised over the items the optimizer step trains (method/rectify.py, SPEC 3); the loss
is the mean over a minibatch's items, that is over its samples and their trained steps (SPEC 5, 6:
Flow-GRPO and MixGRPO average over the trained steps), and is accumulated over micro-batches so
memory does not grow with T.
Items whose advantage is exactly zero carry no signal and are skipped (`skip_zero_advantage`).

On several ranks every rank holds the whole batch and draws the same minibatches; each takes every
world-size-th item of a minibatch, and gradients are averaged across ranks by the data-parallel
wrapper (DDP or FSDP2, engine/parallel.py) with the last micro-batch. Zero-advantage items are
skipped by all ranks alike, and a rank with fewer items than the others runs masked ones, so every
rank makes the same collective calls (ranks that disagree on them deadlock). After every optimizer
step the ranks compare checksums of their trainable weights (DDP keeps a full copy on each) and the
update fails at once if they differ (engine/distributed.py `check_replicas`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from flash_grpo_core.artifacts.checkpoint import CheckpointError, CheckpointTensors
from flash_grpo_core.config import TrainConfig
from flash_grpo_core.engine.ema import EMA
from flash_grpo_core.engine.forward_process import forward_process_terms, watch_output
from flash_grpo_core.engine.sampler import predict_velocity
from flash_grpo_core.method.advantages import NonFiniteError, check_finite
from flash_grpo_core.method.batch import PassCounter, RolloutBatch
from flash_grpo_core.method.loss import kl_penalty, policy_stats, ppo_clip_loss
from flash_grpo_core.method.rectify import rectification_weights
from flash_grpo_core.method.sde import sde_step


@dataclass
class Policy:
    """The trained transformer with its optimizer, EMA and (full fine-tuning with KL) a frozen reference."""

    transformer: torch.nn.Module
    parameters: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: EMA
    reference: torch.nn.Module | None = None  # None: under LoRA the reference is the adapter-free model
    parallel: object | None = None  # on several ranks, DDP or FSDP2 (engine/parallel.py): `module`, `no_sync()`

    @property
    def trained_module(self) -> torch.nn.Module:
        """What forwards that carry gradients go through: the module whose hooks average them."""
        return self.transformer if self.parallel is None else self.parallel.module

    def checkpoint_tensors(self) -> CheckpointTensors:
        """Full float32 CPU copies of the weights, EMA and AdamW state. Sharded tensors are gathered
        from every rank first: a collective, so every rank calls this, and one writes the result."""
        optimizer = {}
        for name, param in self.parameters.items():
            state = self.optimizer.state.get(param, {})
            for field in ("exp_avg", "exp_avg_sq", "step"):
                if field in state:
                    optimizer[f"{name}::{field}"] = _full(torch.as_tensor(state[field]))
        return CheckpointTensors({name: _full(p) for name, p in self.parameters.items()},
                                 {name: _full(t) for name, t in self.ema.shadow.items()}, optimizer, self.ema.steps)

    @torch.no_grad()
    def restore(self, tensors: CheckpointTensors, source: str) -> None:
        """Load a checkpoint's tensors into the (not yet sharded) weights, EMA and optimizer."""
        weights, names = tensors.weights, set(self.parameters)
        if set(weights) != names:
            extra, absent = sorted(set(weights) - names), sorted(names - set(weights))
            raise CheckpointError(f"checkpoint {source} does not fit the model: {len(absent)} trainable weight(s) "
                                  f"absent (e.g. {absent[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}); "
                                  f"was it written with other model or LoRA settings?")
        for name, param in self.parameters.items():
            if weights[name].shape != param.shape:
                raise CheckpointError(f"checkpoint {source}: {name} has shape {tuple(weights[name].shape)}, "
                                      f"the model expects {tuple(param.shape)}")
            param.copy_(weights[name])
        self.ema.load_state_dict({"shadow": tensors.ema, "steps": tensors.ema_steps})
        for name, param in self.parameters.items():
            if f"{name}::exp_avg" in tensors.optimizer:
                self.optimizer.state[param] = {
                    "step": tensors.optimizer[f"{name}::step"].reshape(()),
                    "exp_avg": tensors.optimizer[f"{name}::exp_avg"].to(param.device, param.dtype),
                    "exp_avg_sq": tensors.optimizer[f"{name}::exp_avg_sq"].to(param.device, param.dtype),
                }

    def gradient_sync(self, sync: bool):
        """Accumulate micro-batches locally; average gradients across ranks with the last one."""
        if self.parallel is None or sync:
            return contextlib.nullcontext()
        return self.parallel.no_sync()

    def reference_context(self):
        if self.reference is not None:
            return contextlib.nullcontext(self.reference)
        from flash_grpo_core.models.lora import adapters_disabled

        return _yielding(adapters_disabled(self.transformer), self.transformer)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy of the whole tensor, gathered from every rank if it is sharded (DTensor)."""
    tensor = tensor.detach()
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.float().cpu().contiguous()


@contextlib.contextmanager
def _yielding(context, value):
    with context:
        yield value


def make_optimizer(parameters: dict[str, torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(parameters.values()), lr=train.learning_rate, betas=train.betas,
                             weight_decay=train.weight_decay)


@dataclass
class StepContext:
    """Per-iteration tensors the loss of an item needs, shared by all micro-batches."""

    batch: RolloutBatch
    advantages: torch.Tensor  # [S]
    cond_embeds: torch.Tensor  # [B, L, D]
    uncond_embed: torch.Tensor | None  # [1, L, D]
    sigmas: torch.Tensor  # [N + 1] float64: the transformer's integer timesteps are truncated from them
    scales: torch.Tensor  # [N]
    guidance: float
    cfg_sequential: bool = False  # the CFG halves one after the other (predict_velocity)
    weights: torch.Tensor | None = None  # [S, T] rectification weights of the current optimizer step's items
    output_grads: list | None = None  # while a list: each trained forward appends (steps [M], |dL/dv| [M])
    objective: str = "policy_gradient"  # the mode's (method/modes): or "nft" / "awm" on the forward process
    noise_seed: int = 0  # forward process: each item's noise comes from (noise_seed, sample, slot)
    sampling_weights: dict | None = None  # forward process: the trainable weights that sampled the rollouts


def score_items(policy: Policy, ctx: StepContext, items: torch.Tensor, counter: PassCounter,
                transformer: torch.nn.Module | None = None):
    """Re-score stored SDE steps of flat items (sample * T + slot) under the current model.

    Returns the SDE step (its log_prob [M] is log p_new, with grad when enabled) and log p_old [M].
    """
    trained = ctx.batch.steps.shape[1]
    samples, slots = items // trained, items % trained
    steps = ctx.batch.steps[samples, slots]
    device = ctx.cond_embeds.device
    x = ctx.batch.latents[samples, slots].to(device)  # [M, C, F, H, W]
    x_next = ctx.batch.next_latents[samples, slots].to(device)
    cond = ctx.cond_embeds[ctx.batch.prompt_index[samples]]
    model = policy.transformer if transformer is None else transformer
    v = predict_velocity(model, x, ctx.sigmas[steps], cond, ctx.uncond_embed, ctx.guidance, counter,
                         ctx.cfg_sequential)
    watch_output(ctx, v, steps)
    step = sde_step(x, v, ctx.sigmas[steps], ctx.sigmas[steps + 1], ctx.scales[steps], prev_sample=x_next)
    return step, ctx.batch.log_probs[samples, slots].to(device)


def _item_terms(policy: Policy, ctx: StepContext, items: torch.Tensor, train: TrainConfig, counter: PassCounter):
    """Loss terms [M] (with grad), new and old log-probs [M] of flat items."""
    if ctx.objective != "policy_gradient":
        return forward_process_terms(policy, ctx, items, train, counter)
    step, old = score_items(policy, ctx, items, counter, transformer=policy.trained_module)
    counter.backward += counter.last_forward
    samples, slots = items // ctx.batch.steps.shape[1], items % ctx.batch.steps.shape[1]
    advantages = ctx.advantages[samples].to(old.device)
    weights = ctx.weights[samples, slots].to(old.device)
    terms = ppo_clip_loss(step.log_prob, old, advantages, weights, train.clip_range, reduction="none")
    if train.kl_beta > 0:
        with torch.no_grad(), policy.reference_context() as reference:
            ref_mean = score_items(policy, ctx, items, counter, transformer=reference)[0].mean
        terms = terms + train.kl_beta * kl_penalty(step.mean, ref_mean, step.std)
    return terms, step.log_prob.detach(), old


def update_policy(policy: Policy, ctx: StepContext, step_factors: torch.Tensor, train: TrainConfig,
                  generator: torch.Generator, counter: PassCounter, progress=None) -> dict[str, float]:
    """Run the minibatch optimizer steps of one iteration; return averaged training metrics, and the
    first minibatch's max |ratio - 1| (its weights sampled the rollout: it must be ~0)."""
    total, trained = ctx.batch.steps.shape
    order = torch.randperm(total * trained, generator=generator)
    per_minibatch = total * trained // train.minibatches
    history: list[dict[str, float]] = []
    for chunk in order.split(per_minibatch):
        history.append(_minibatch_step(policy, ctx, chunk, step_factors, train, counter))
        if progress is not None:
            progress.update(len(chunk))
    summed = {"trained_items"}
    numbers = [key for key in history[0] if key != "per_step"]
    return {**{key: sum(h[key] for h in history) / (1 if key in summed else len(history)) for key in numbers},
            "first_ratio_deviation": history[0]["ratio_deviation_max"],
            "per_step": _per_step(h["per_step"] for h in history)}


def _per_step(parts) -> dict[int, dict[str, float]]:
    """{trained step k: its items and their mean |dL/dv|} from the optimizer steps' {k: (sum, count)}:
    the loss gradient at the transformer's output, how hard each step's items push the model."""
    merged = _merge_sums(parts)
    return {k: {"items": float(count), "output_grad_norm": total / count} for k, (total, count) in merged.items()}


def _merge_sums(parts) -> dict[int, tuple[float, int]]:
    sums: dict[int, tuple[float, int]] = {}
    for part in parts:
        for k, (total, count) in part.items():
            previous = sums.get(k, (0.0, 0))
            sums[k] = (previous[0] + total, previous[1] + count)
    return dict(sorted(sums.items()))


def rank_micro_batches(items: torch.Tensor, micro_batch: int, rank: int, world_size: int):
    """This rank's share of a minibatch's items as (items, live) micro-batches, as many on every rank.

    The rank takes every world_size-th item; ranks with fewer are padded with masked (live False)
    copies of the first item, whose loss counts zero but whose backward joins the gradient average.
    """
    if len(items) == 0:
        return []
    share = -(-len(items) // world_size)  # ceil: the largest rank's item count
    mine = items[rank::world_size]
    live = torch.arange(share) < len(mine)  # [share]
    padded = torch.cat([mine, items[:1].expand(share - len(mine))])
    return list(zip(padded.split(micro_batch), live.split(micro_batch)))


def step_weights(ctx: StepContext, items: torch.Tensor, step_factors: torch.Tensor, mode: str) -> torch.Tensor:
    """[S, T] rectification weights of the flat `items` one optimizer step trains (all ranks' items:
    every rank holds the whole batch), normalised over those items; 0 elsewhere."""
    steps = ctx.batch.steps.reshape(-1)[items]  # [M]
    weights = torch.zeros(ctx.batch.steps.numel(), dtype=torch.float32, device=steps.device)
    weights[items] = rectification_weights(step_factors, steps, mode)
    return weights.reshape(ctx.batch.steps.shape)


def _minibatch_step(policy: Policy, ctx: StepContext, items: torch.Tensor, step_factors: torch.Tensor,
                    train: TrainConfig, counter: PassCounter) -> dict[str, float]:
    from flash_grpo_core.engine.distributed import check_replicas, current, gather_objects

    world, items_in_chunk = current(), len(items)
    signal = ctx.advantages[items // ctx.batch.steps.shape[1]] != 0  # [M], the same on every rank
    if train.skip_zero_advantage:
        items = items[signal]
    ctx.weights = step_weights(ctx, items, step_factors, train.rectify)  # [S, T]
    policy.optimizer.zero_grad(set_to_none=True)
    micros = rank_micro_batches(items, train.micro_batch, world.rank, world.size)
    loss_sum, new_parts, old_parts, per_step = 0.0, [], [], {}
    for number, (micro, live) in enumerate(micros):
        ctx.output_grads = []
        with policy.gradient_sync(number == len(micros) - 1):
            terms, new, old = _item_terms(policy, ctx, micro, train, counter)
            # averaged over the chunk's items (samples x trained steps); x world size since DDP averages
            loss = (terms * live.to(terms.device)).sum() * world.size / items_in_chunk
            check_finite("policy loss", loss.detach())
            loss.backward()
        for steps, norms in ctx.output_grads:  # the live items' output gradients, by trained step
            for k, norm in zip(steps[live].tolist(), norms[live].tolist()):
                total, count = per_step.get(k, (0.0, 0))
                per_step[k] = (total + norm / world.size, count + 1)  # DDP's x world size undone
        ctx.output_grads = None
        loss_sum += float(loss.detach()) / world.size
        new_parts.append(new[live.to(new.device)])
        old_parts.append(old[live.to(old.device)])
    grad_norm = 0.0
    # Without signal no step is taken at all: AdamW's decoupled weight decay would still move weights.
    if signal.any():
        grad_norm = float(_full(torch.nn.utils.clip_grad_norm_(list(policy.parameters.values()), train.grad_clip)))
        if not torch.isfinite(torch.tensor(grad_norm)):
            raise NonFiniteError(f"gradient norm is {grad_norm}; the optimizer step was not taken")
        policy.optimizer.step()
    policy.ema.step()
    if policy.parallel is not None and policy.parallel.replicated:
        check_replicas(policy.parameters, f"trainable weights after optimizer step {policy.ema.steps}")
    parts = gather_objects((loss_sum, [t.cpu() for t in new_parts], [t.cpu() for t in old_parts], per_step))
    new_all = [t for part in parts for t in part[1]]
    stats = {"clip_fraction": 0.0, "approx_kl": 0.0, "ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0,
             "ratio_deviation_mean": 0.0, "ratio_deviation_max": 0.0}  # no item trained: policy_stats' keys
    if new_all:
        stats = policy_stats(torch.cat(new_all), torch.cat([t for part in parts for t in part[2]]), train.clip_range)
    return {"loss": sum(part[0] for part in parts), "grad_norm": grad_norm, "trained_items": float(len(items)),
            **stats, "per_step": _merge_sums(part[3] for part in parts)}
