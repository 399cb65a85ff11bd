"""Cheaper flash rollouts: fewer model calls on the ODE parts around the one SDE step.

In a flash rollout (SPEC 4) only the SDE transition k -> k+1 is the policy's action: the update
recomputes log p(x_{k+1} | x_k) and nothing else. x_k has to be a sample of the model's marginal
at sigma_k, and the video the reward sees is a deterministic function of x_{k+1}, so both ODE parts
may be solved more cheaply without touching what is trained on. Options (`rollout.*`, all null by
default, when `generate` calls `sampler.rollout`, byte for byte today's rollouts):

- `head_steps` M': sigma_0 -> sigma_k with min(M', k) steps of diffusers' UniPC (the multistep
  solver the Wan pipeline samples with; order 2 with its corrector, flow prediction) instead of k
  Euler steps. k = 0 has no head.
- The SDE step is unchanged: the training schedule's sigma_k -> sigma_{k+1}, guided, its x_k,
  x_{k+1} and log p recorded as `sampler.rollout` records them (ratio = 1 holds: the update scores
  the recorded x_{k+1} given the recorded x_k).
- `tail_steps` M: sigma_{k+1} -> 0 with min(M, N - k - 1) UniPC steps instead of N - k - 1 Euler steps.
- `guidance_until` (a sigma): after step k, a model call at a sigma below it uses the conditional
  velocity only, one forward instead of two (with either tail). The head and step k stay guided.
  A UniPC tail restarts at the first unguided call, so its multistep history never mixes the two.

Solver sigmas (`method/schedule.py: interval_sigmas`): M + 1 points linear in the unshifted ramp u
between the interval's ends, mapped through a shift. The head takes the training schedule's shift
(`rollout.shift`; its interval lies at high noise, where that schedule is dense), so M steps over M
grid steps are the grid's own sigmas (`authors`). The tail takes a shift of 0.5 (TAIL_SHIFT), which
crowds its steps towards sigma 0: under the training shift the tail's last step is its largest
(sigma 0.48 -> 0 of 3 steps from 0.87 at shift 3), and a final step is UniPC's x0 estimate, coarse
from that high. Measured on 40 toy videos from the same x_{k+1} (an exploratory run of
bench/costs/rollout_cost.py's mean abs pixel error against a 50-step solve, M = 2 / 3 / 4): shift 3:
8.5 / 7.2 / -, uniform in sigma (shift 1): 8.1 / 5.4 / 3.9, shift 0.5: 7.5 / 4.7 / 3.6 (the Euler
tail on the grid: 3.7). A segment never takes more steps than the grid has there; at that cap it
steps through the grid's sigmas. The UniPC scheduler is given them with `flow_shift=1` (they are
placed already) and lowers its order on the final step to sigma 0 (`lower_order_final`; without it
the 2-step tail diverged). The transformer's timestep at every sigma is `1000 * sigma` of the
float64 sigma, truncated, as everywhere.

Samples of a sampling batch with different k (different prompts, or `iso_temporal: false`) are
sampled one k at a time, each k group with its own scheduler (UniPC keeps a history of model
outputs); every sample draws its initial noise and its SDE noise from its own generator, in the
order `sampler.rollout` draws them, so a sample is the same whatever the batch size, and with only
the tail changed x_k, x_{k+1} and log p are the Euler rollout's (also with `rollout.same_initial_noise`,
whose shared initial latent comes from the prompt's generator, as there).

Left out: the head's last UniPC step is not corrected (UniC needs the model output at x_k; the SDE
step evaluates it, but a corrected x_k would then not be the point the recorded velocity belongs
to), and the tail does not reuse the SDE step's model output (x_{k+1} is off that ODE path). Step
caching (TeaCache) is not built: docs/decisions.md, "Cheaper rollouts".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flash_grpo_core.config import RolloutConfig
from flash_grpo_core.engine.sampler import (
    RolloutInputs,
    SamplingSpec,
    _draw,
    _initial,
    predict_velocity,
    sample_generators,
)
from flash_grpo_core.method.batch import PassCounter, RolloutBatch
from flash_grpo_core.method.schedule import interval_sigmas
from flash_grpo_core.method.sde import ode_step, sde_step
from flash_grpo_core.method.steps import sde_mask

TAIL_SHIFT = 0.5  # spacing of the tail's solver sigmas: crowded towards sigma 0 (module docstring)


@dataclass(frozen=True)
class FastRolloutOptions:
    """`rollout.head_steps`, `tail_steps` and `guidance_until` (None: off), and the schedule's shift."""

    head_steps: int | None = None
    tail_steps: int | None = None
    guidance_until: float | None = None
    shift: float = 3.0

    @classmethod
    def from_config(cls, rollout: RolloutConfig) -> FastRolloutOptions:
        return cls(rollout.head_steps, rollout.tail_steps, rollout.guidance_until, rollout.shift)

    @property
    def active(self) -> bool:
        return (self.head_steps, self.tail_steps, self.guidance_until) != (None, None, None)


def segment_sigmas(sigmas: torch.Tensor, first: int, last: int, solver_steps: int | None, shift: float) -> torch.Tensor:
    """The float64 sigmas a segment steps through, from grid index `first` to `last`: the grid's own
    (Euler, or `solver_steps` >= the grid's steps there) or `solver_steps` of them placed by
    `interval_sigmas` with `shift`."""
    grid = sigmas[first:last + 1]  # [last - first + 1]
    if solver_steps is None or solver_steps >= last - first:
        return grid
    return interval_sigmas(float(grid[0]), float(grid[-1]), solver_steps, shift)


def flow_scheduler(segment: torch.Tensor):
    """diffusers' UniPC (order 2, flow prediction) set to step through the float64 sigmas `segment`."""
    from diffusers import UniPCMultistepScheduler

    to_zero = float(segment[-1]) == 0.0
    # `set_timesteps(sigmas=...)` shifts what it is given (identity with flow_shift 1) and appends the
    # final sigma: 0 for a tail, or (`sigma_min`) a copy of the last one, here the head's end sigma_k,
    # whose step is never taken.
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                        final_sigmas_type="zero" if to_zero else "sigma_min")
    scheduler.set_timesteps(sigmas=np.asarray(segment[:-1] if to_zero else segment, dtype=np.float64))
    scheduler.set_begin_index(0)
    return scheduler


@dataclass
class RolloutSolver:
    """Samples the segments of a flash rollout: the model, guidance, schedule and options they share."""

    transformer: torch.nn.Module
    uncond: torch.Tensor | None
    spec: SamplingSpec
    options: FastRolloutOptions
    counter: PassCounter | None

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, guided: bool = True) -> torch.Tensor:
        return predict_velocity(self.transformer, x, sigma.expand(len(x)), cond, self.uncond if guided else None,
                                self.spec.guidance, self.counter, self.spec.cfg_sequential)

    def integrate(self, x: torch.Tensor, cond: torch.Tensor, segment: torch.Tensor, solver: bool,
                  guided_down_to: float | None = None) -> torch.Tensor:
        """x [b, C, F, H, W] at segment[0] -> at segment[-1], one model call per step, Euler or UniPC.
        Calls at a sigma below `guided_down_to` are unguided, and a solver starts afresh at the first
        of them: a multistep history that mixed guided and unguided outputs would extrapolate the
        guidance's change as if it were the trajectory's."""
        calls = segment[:-1]  # the sigmas the model is called at, decreasing
        switch = len(calls) if guided_down_to is None else int((calls >= guided_down_to).sum())
        x = self._steps(x, cond, segment[:switch + 1], solver, guided=True)
        return self._steps(x, cond, segment[switch:], solver, guided=False)

    def _steps(self, x: torch.Tensor, cond: torch.Tensor, segment: torch.Tensor, solver: bool,
               guided: bool) -> torch.Tensor:
        if len(segment) < 2:
            return x
        scheduler = flow_scheduler(segment) if solver else None
        for j in range(len(segment) - 1):
            v = self.velocity(x, segment[j], cond, guided)
            if scheduler is None:
                x = ode_step(x, v, segment[j], segment[j + 1])
            else:
                # v in float32: the scheduler's sigma * v would otherwise be rounded to a bf16 model's dtype
                x = scheduler.step(v.float(), scheduler.timesteps[j], x, return_dict=False)[0]
        return x

    def trajectory(self, x: torch.Tensor, cond: torch.Tensor, k: int, generators: list[torch.Generator]):
        """One k group: head, the SDE step at k (noise from each sample's generator), tail.
        Returns (x_k, the SDE step, the final latents)."""
        o, sigmas = self.options, self.spec.sigmas
        x = self.integrate(x, cond, segment_sigmas(sigmas, 0, k, o.head_steps, o.shift), o.head_steps is not None)
        v = self.velocity(x, sigmas[k], cond)
        noise = _draw(generators, tuple(x.shape[1:])).to(x.device)  # [b, C, F, H, W]
        step = sde_step(x, v, sigmas[k], sigmas[k + 1], self.spec.scales[k], noise=noise)
        tail = segment_sigmas(sigmas, k + 1, len(sigmas) - 1, o.tail_steps, TAIL_SHIFT)
        final = self.integrate(step.prev_sample, cond, tail, o.tail_steps is not None, o.guidance_until)
        return x, step, final


@torch.no_grad()
def fast_rollout(transformer, inputs: RolloutInputs, spec: SamplingSpec, counter: PassCounter | None = None,
                 progress=None, *, options: FastRolloutOptions) -> RolloutBatch:
    """`sampler.rollout` for flash rollouts (`inputs.train_steps` [B, G, 1]) with the cheaper ODE
    parts of `options`; the same arguments, and `inputs.sde_steps`, if given, must be the trained steps."""
    cond_embeds, train_steps, sde_steps = inputs.cond_embeds, inputs.train_steps, inputs.sde_steps
    latent_shape = spec.latent_shape
    num_prompts, group, trained = train_steps.shape
    num_steps, total = len(spec.sigmas) - 1, num_prompts * group
    if trained != 1 or (sde_steps is not None and not torch.equal(
            sde_steps.reshape(total, num_steps), sde_mask(train_steps, num_steps))):
        raise ValueError("cheaper rollouts take exactly one SDE step per sample, the trained one (train.mode flash)")
    run = RolloutSolver(transformer, inputs.uncond_embed, spec, options, counter)
    steps = train_steps.reshape(total, 1)  # [S, 1]
    prompt_index = torch.arange(num_prompts).repeat_interleave(group)  # [S]
    latents = torch.empty(total, 1, *latent_shape, dtype=torch.float32)  # [S, 1, C, F, H, W]
    next_latents, log_probs = torch.empty_like(latents), torch.empty(total, 1)
    finals = torch.empty(total, *latent_shape, dtype=torch.float32)  # [S, C, F, H, W]
    for start in range(0, total, spec.batch_size):
        ids = torch.arange(start, min(start + spec.batch_size, total))
        sample_ids = [inputs.first_sample + i for i in ids.tolist()]
        generators = sample_generators(spec.seed, sample_ids)
        x = _initial(spec.seed, generators, sample_ids, group if spec.same_initial else None,
                     latent_shape).to(cond_embeds.device)  # [b, C, F, H, W]
        for k in sorted(set(steps[ids, 0].tolist())):
            rows = (steps[ids, 0] == k).nonzero().flatten()  # positions in the chunk
            x_k, step, final = run.trajectory(x[rows], cond_embeds[prompt_index[ids[rows]]], k,
                                              [generators[r] for r in rows.tolist()])
            latents[ids[rows], 0], next_latents[ids[rows], 0] = x_k.cpu(), step.prev_sample.cpu()
            log_probs[ids[rows], 0], finals[ids[rows]] = step.log_prob.cpu(), final.cpu()
            if progress is not None:
                progress.update(len(rows) * num_steps)  # the bar counts grid steps
    return RolloutBatch(prompt_index=prompt_index, steps=steps, latents=latents, next_latents=next_latents,
                        log_probs=log_probs, final_latents=finals)
