"""The update's terms for the modes that train on the forward process (`nft`, `awm`;
method/forward_process.py holds their losses, method/modes/forward.py the modes), and the hook that
reads each item's output gradient for the per-step picture, for every mode.

`policy` and `ctx` are engine/trainer.py's `Policy` and `StepContext` (the trainer calls here).
"""

from __future__ import annotations

import torch

from flash_grpo_core.engine.sampler import predict_velocity
from flash_grpo_core.engine.seeding import derive_seed
from flash_grpo_core.method.batch import PassCounter
from flash_grpo_core.method.forward_process import awm_log_prob, nft_terms, noised, velocity_distance
from flash_grpo_core.method.loss import ppo_clip_loss


def watch_output(ctx, v: torch.Tensor, steps: torch.Tensor) -> None:
    """The per-step picture: each item's |dL/dv|, read in the backward (the gradient is unchanged)."""
    if ctx.output_grads is not None and v.requires_grad:
        v.register_hook(lambda grad: ctx.output_grads.append((steps.cpu(), grad.detach().float().flatten(1)
                                                               .norm(dim=1).cpu())))


class WeightsAt:
    """`module` called with `weights` in place of its parameters of those names (torch.func), as
    `predict_velocity` calls a transformer: the sampling policy, while the trained weights move on."""

    def __init__(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]):
        self.module, self.weights = module, weights  # `module`: compute_dtype reads its patch embedding

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.module, self.weights, args, kwargs, strict=False)


def forward_process_terms(policy, ctx, items: torch.Tensor, train, counter: PassCounter):
    """The forward-process modes' loss terms [M] (method/forward_process.py): each item's final
    sample re-noised at its level with its own noise, the velocities of the trained policy (with
    grad) and of the sampling policy, without guidance. Also returns the flow-matching surrogate
    log p [M] under both, whose ratio is AWM's (and, for `nft`, reported as its drift)."""
    trained = ctx.batch.steps.shape[1]
    samples, slots = items // trained, items % trained
    levels = ctx.batch.steps[samples, slots]
    device = ctx.cond_embeds.device
    sigma = ctx.sigmas[levels]  # [M] float64
    x0 = ctx.batch.final_latents[samples].to(device).float()  # [M, C, F, H, W]
    noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(
        derive_seed(ctx.noise_seed, s, j))) for s, j in zip(samples.tolist(), slots.tolist())]).to(device)
    x_t = noised(x0, noise, sigma)
    cond = ctx.cond_embeds[ctx.batch.prompt_index[samples]]
    v = predict_velocity(policy.trained_module, x_t, sigma, cond, None, 1.0, counter, ctx.cfg_sequential)
    watch_output(ctx, v, levels)
    counter.backward += counter.last_forward
    with torch.no_grad():
        v_old = predict_velocity(WeightsAt(policy.transformer, ctx.sampling_weights), x_t, sigma, cond, None, 1.0,
                                 counter, ctx.cfg_sequential)
    advantages = ctx.advantages[samples].to(device)
    weights = ctx.weights[samples, slots].to(device)
    t = sigma.float()
    new, old = awm_log_prob(v, noise, x0, t, train.awm_weighting), awm_log_prob(v_old, noise, x0, t, train.awm_weighting)
    if ctx.objective == "nft":
        terms = weights * nft_terms(v, v_old, x0, x_t, t, advantages, train.nft_beta, train.adv_clip)
    else:
        terms = ppo_clip_loss(new, old, advantages, weights, train.clip_range, reduction="none")
    if train.kl_beta > 0:
        with torch.no_grad(), policy.reference_context() as reference:
            v_ref = predict_velocity(reference, x_t, sigma, cond, None, 1.0, counter, ctx.cfg_sequential)
        terms = terms + train.kl_beta * velocity_distance(v, v_ref)
    return terms, new.detach(), old
