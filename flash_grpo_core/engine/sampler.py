"""Rollouts: ODE sampling with SDE steps at the stochastic steps, classifier-free guidance batched.

For B prompts x G samples (sample s = b * G + g) and trained steps [B, G, T] (see `method/steps.py`), every
sample starts from its own noise and follows deterministic Euler steps, except at its stochastic
steps (by default exactly its trained steps; in Flow-GRPO's `full` mode every step), where the SDE
step of `method/sde.py` is taken. At the trained ones x_t, x_{t+1} and log p_old are recorded.

Each sample draws all its noise (initial latent and SDE noise) from its own CPU generator seeded by
(seed, sample id), so a rollout does not depend on the batch size used to sample it, on the
device, or on which rank produced it. With `same_initial`, a prompt's group shares one initial
latent, drawn from a generator seeded by (seed, "initial", prompt id), and its samples differ
only by their SDE noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flash_grpo_core.engine.seeding import derive_seed
from flash_grpo_core.method.batch import PassCounter, RolloutBatch
from flash_grpo_core.method.schedule import transformer_timesteps
from flash_grpo_core.method.sde import ode_step, sde_step
from flash_grpo_core.method.steps import sde_mask


def compute_dtype(transformer) -> torch.dtype:
    """The dtype the transformer computes in: its patch embedding's (some modules stay fp32)."""
    return getattr(transformer, "module", transformer).patch_embedding.weight.dtype  # through a DDP wrapper too


def predict_velocity(
    transformer, latents: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
    uncond: torch.Tensor | None, guidance: float, counter: PassCounter | None = None, cfg_sequential: bool = False,
) -> torch.Tensor:
    """Guided velocity v = v_u + w (v_c - v_u) for latents [S, C, F, H, W] at float64 sigma [S].

    The conditional and unconditional halves go through the transformer as one batch of 2S, or with
    `cfg_sequential` one after the other (with activation checkpointing, a backward then recomputes
    one half at a time: about half the peak activation memory, for the 14B update on 80 GB cards).
    As in the Wan pipeline, the latents (float32 state) are cast to the model's dtype only here, and
    the timestep is the integer `1000 * sigma` truncated (`method/schedule.py: transformer_timesteps`).
    """
    dtype = compute_dtype(transformer)
    timestep = transformer_timesteps(sigma).to(latents.device)  # [S] int64
    guided = uncond is not None and guidance != 1.0
    halves = [cond]
    if guided:
        halves.append(uncond.expand_as(cond))
        if not cfg_sequential:
            latents, timestep, halves = torch.cat([latents, latents]), torch.cat([timestep, timestep]), [torch.cat(halves)]
    outs = [transformer(hidden_states=latents.to(dtype), timestep=timestep, encoder_hidden_states=text.to(dtype),
                        return_dict=False)[0] for text in halves]
    out = torch.cat(outs) if len(outs) > 1 else outs[0]  # [S or 2S, C, F, H, W]
    if counter is not None:
        counter.forward += out.shape[0]
        counter.last_forward = out.shape[0]
    if not guided:
        return out
    v_cond, v_uncond = out.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


def sample_generators(seed: int, sample_ids: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from (seed, sample id)."""
    return [torch.Generator().manual_seed(derive_seed(seed, sid)) for sid in sample_ids]


def _draw(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def _initial(seed: int, generators: list[torch.Generator], sample_ids: list[int], group: int | None,
             shape: tuple[int, ...]) -> torch.Tensor:
    """Initial latents [b, C, F, H, W]: each sample's own, or with `group` its prompt's (sample id // group)."""
    if group is None:
        return _draw(generators, shape)
    prompts = [torch.Generator().manual_seed(derive_seed(seed, "initial", sid // group)) for sid in sample_ids]
    return _draw(prompts, shape)


@dataclass(frozen=True)
class SamplingSpec:
    """How a rollout call samples, the same for all its prompts: the schedule, the guidance, the
    latent shape, the noise and the batching (`engine/iteration.py: sampling_spec` reads it from
    the params)."""

    sigmas: torch.Tensor  # [N + 1] float64
    scales: torch.Tensor  # [N] the SDE steps' noise scales (unused where no step is stochastic)
    guidance: float  # classifier-free guidance; 1.0 or no uncond embedding: none
    latent_shape: tuple[int, int, int, int]  # [C, F, H, W]
    seed: int  # each sample's noise comes from (seed, its iteration-wide id)
    batch_size: int  # samples per transformer call
    cfg_sequential: bool = False  # the CFG halves one after the other (`predict_velocity`)
    same_initial: bool = False  # a group's samples share their initial latent (module docstring)


@dataclass(frozen=True)
class RolloutInputs:
    """What a rollout call samples from: its prompts' embeddings, their samples' trained (and
    stochastic) steps, and where its samples sit in the iteration."""

    cond_embeds: torch.Tensor  # [B, L, D]
    uncond_embed: torch.Tensor | None  # [1, L, D]; None: no guidance
    train_steps: torch.Tensor  # [B, G, T]
    # BoolTensor [B, G, N], where each sample takes the SDE step (None: its trained steps, which it
    # must include; `method/steps.py: stochastic_steps`)
    sde_steps: torch.Tensor | None = None
    # the iteration-wide id of the first sample here, when these prompts are a slice of the
    # iteration's (each sample's noise comes from its iteration-wide id)
    first_sample: int = 0


@torch.no_grad()
def rollout(transformer, inputs: RolloutInputs, spec: SamplingSpec, counter: PassCounter | None = None,
            progress=None) -> RolloutBatch:
    """Sample B x G videos' latents from `inputs` (prompt embeddings, trained and stochastic steps)
    as `spec` says.

    `progress`, if given, is told `update(n)` after each step of n samples (a tqdm bar, say).
    """
    cond_embeds, uncond_embed, train_steps = inputs.cond_embeds, inputs.uncond_embed, inputs.train_steps
    sde_steps, first_sample = inputs.sde_steps, inputs.first_sample
    sigmas, scales, seed, latent_shape = spec.sigmas, spec.scales, spec.seed, spec.latent_shape
    num_prompts, group, trained = train_steps.shape
    num_steps, total = len(sigmas) - 1, num_prompts * group
    device = cond_embeds.device
    steps = train_steps.reshape(total, trained)  # [S, T]
    mask = sde_mask(train_steps, num_steps)  # [S, N]
    if sde_steps is not None:
        if (mask & ~sde_steps.reshape(total, num_steps)).any():
            raise ValueError("rollout: every trained step must be a stochastic (SDE) step")
        mask = sde_steps.reshape(total, num_steps).clone()
    slot = torch.full((total, num_steps), -1, dtype=torch.long)
    slot.scatter_(1, steps, torch.arange(trained).expand(total, trained))
    prompt_index = torch.arange(num_prompts).repeat_interleave(group)  # [S]
    latents = torch.empty(total, trained, *latent_shape, dtype=torch.float32)  # [S, T, C, F, H, W] as sampled
    next_latents, log_probs = torch.empty_like(latents), torch.empty(total, trained)
    finals = []
    for start in range(0, total, spec.batch_size):
        ids = list(range(start, min(start + spec.batch_size, total)))
        generators = sample_generators(seed, [first_sample + i for i in ids])
        x = _initial(seed, generators, [first_sample + i for i in ids], group if spec.same_initial else None,
                     latent_shape).to(device)  # [b, C, F, H, W] float32 state; the model gets it cast
        cond = cond_embeds[prompt_index[ids]]
        for i in range(num_steps):
            sigma = sigmas[i].expand(len(ids))
            v = predict_velocity(transformer, x, sigma, cond, uncond_embed, spec.guidance, counter, spec.cfg_sequential)
            x_next = ode_step(x, v, sigmas[i], sigmas[i + 1])
            stochastic = mask[ids, i]
            if stochastic.any():
                # Only the samples that take the SDE step draw noise, so each sample's stream is its own.
                noise = torch.zeros(len(ids), *latent_shape)
                noise[stochastic] = _draw([g for g, s in zip(generators, stochastic) if s], latent_shape)
                step = sde_step(x, v, sigmas[i], sigmas[i + 1], scales[i], noise=noise.to(device))
                recorded = stochastic & (slot[ids, i] >= 0)  # [b]: the trained ones among them
                rows = torch.tensor(ids)[recorded]
                cols = slot[rows, i]
                latents[rows, cols] = x[recorded].cpu()
                next_latents[rows, cols] = step.prev_sample[recorded].cpu()
                log_probs[rows, cols] = step.log_prob[recorded].cpu()
                x_next = torch.where(stochastic.to(device).view(-1, 1, 1, 1, 1), step.prev_sample, x_next)
            x = x_next
            if progress is not None:
                progress.update(len(ids))
        finals.append(x.cpu())
    return RolloutBatch(prompt_index=prompt_index, steps=steps, latents=latents, next_latents=next_latents,
                        log_probs=log_probs, final_latents=torch.cat(finals))
