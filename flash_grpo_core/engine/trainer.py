"""The rectified GRPO update: recompute log-probabilities of stored SDE steps and take PPO-clip steps.

Trained items are (sample, step) pairs of a `RolloutBatch`. Per iteration the items are shuffled and
split into `minibatches` optimizer steps (the first is exactly on-policy, later ones slightly off
it, which is what the ratio clip is for). Each item's loss term is weighted by its rectification
weight; the loss is summed over a sample's trained steps and averaged over samples (SPEC 5, 6), and
accumulated over micro-batches so memory does not grow with T.
Items whose advantage is exactly zero carry no signal and are skipped (`skip_zero_advantage`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from flash_grpo_core.config import TrainConfig
from flash_grpo_core.engine.ema import EMA
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

    def reference_context(self):
        if self.reference is not None:
            return contextlib.nullcontext(self.reference)
        from flash_grpo_core.models.lora import adapters_disabled

        return _yielding(adapters_disabled(self.transformer), self.transformer)


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
    sigmas: torch.Tensor  # [N + 1]
    scales: torch.Tensor  # [N]
    guidance: float
    weights: torch.Tensor | None = None  # [S, T] rectification weights, set by update_policy


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
    v = predict_velocity(model, x, ctx.sigmas[steps], cond, ctx.uncond_embed, ctx.guidance, counter)
    step = sde_step(x, v, ctx.sigmas[steps], ctx.sigmas[steps + 1], ctx.scales[steps], prev_sample=x_next)
    return step, ctx.batch.log_probs[samples, slots].to(device)


def _item_terms(policy: Policy, ctx: StepContext, items: torch.Tensor, train: TrainConfig, counter: PassCounter):
    """Loss terms [M] (with grad), new and old log-probs [M] of flat items."""
    step, old = score_items(policy, ctx, items, counter)
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
    """Run the minibatch optimizer steps of one iteration; return averaged training metrics."""
    total, trained = ctx.batch.steps.shape
    ctx.weights = rectification_weights(step_factors, ctx.batch.steps, train.rectify)  # [S, T]
    order = torch.randperm(total * trained, generator=generator)
    per_minibatch = total * trained // train.minibatches
    history: list[dict[str, float]] = []
    for chunk in order.split(per_minibatch):
        history.append(_minibatch_step(policy, ctx, chunk, train, counter, samples_in_chunk=len(chunk) / trained))
        if progress is not None:
            progress.update(len(chunk))
    summed = {"trained_items"}
    return {key: sum(h[key] for h in history) / (1 if key in summed else len(history)) for key in history[0]}


def _minibatch_step(policy: Policy, ctx: StepContext, items: torch.Tensor, train: TrainConfig,
                    counter: PassCounter, samples_in_chunk: float) -> dict[str, float]:
    signal = ctx.advantages[items // ctx.batch.steps.shape[1]] != 0  # [M]
    if train.skip_zero_advantage:
        items = items[signal]
    policy.optimizer.zero_grad(set_to_none=True)
    loss_sum, new_parts, old_parts = 0.0, [], []
    for micro in items.split(train.micro_batch):
        terms, new, old = _item_terms(policy, ctx, micro, train, counter)
        loss = terms.sum() / samples_in_chunk  # summed over steps, averaged over the chunk's samples
        check_finite("policy loss", loss.detach())
        loss.backward()
        loss_sum += float(loss.detach())
        new_parts.append(new)
        old_parts.append(old)
    grad_norm = 0.0
    # Without signal no step is taken at all: AdamW's decoupled weight decay would still move weights.
    if signal.any():
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(policy.parameters.values()), train.grad_clip))
        if not torch.isfinite(torch.tensor(grad_norm)):
            raise NonFiniteError(f"gradient norm is {grad_norm}; the optimizer step was not taken")
        policy.optimizer.step()
    policy.ema.step()
    stats = {"clip_fraction": 0.0, "approx_kl": 0.0, "ratio_mean": 1.0}
    if new_parts:
        stats = policy_stats(torch.cat(new_parts), torch.cat(old_parts), train.clip_range)
    return {"loss": loss_sum, "grad_norm": grad_norm, "trained_items": float(len(items)), **stats}
