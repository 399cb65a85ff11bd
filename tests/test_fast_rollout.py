"""Cheaper flash rollouts (engine/fast_rollout.py): the trained step is what the Euler rollout records,
the ODE parts around it take fewer model calls, and every call is counted."""

import pytest
import torch

from flash_grpo_core.config import ConfigError
from flash_grpo_core.engine.fast_rollout import TAIL_SHIFT, segment_sigmas
from flash_grpo_core.engine.iteration import build_engine, encode, generate
from flash_grpo_core.engine.trainer import StepContext, score_items
from flash_grpo_core.method.batch import PassCounter
from flash_grpo_core.method.schedule import flow_sigmas, interval_sigmas

PROMPTS = ["a red square moving left", "a blue ball bouncing"]


def _rollout(tiny_params, **overrides):
    """Rollouts of PROMPTS (2 prompts x 4 samples, N = 20) and their transformer forwards."""
    engine = build_engine(tiny_params(**overrides))
    counter = PassCounter()
    batch, _ = generate(engine, PROMPTS, 0, counter)
    return engine, batch, counter.forward


def _guided_calls(engine, k: int) -> tuple[int, int]:
    """(guided, unguided) model calls of one sample whose SDE step is k, from the options."""
    r, sigmas = engine.params.rollout, engine.sigmas
    head = len(segment_sigmas(sigmas, 0, k, r.head_steps, r.shift)) - 1
    tail = segment_sigmas(sigmas, k + 1, r.num_steps, r.tail_steps, TAIL_SHIFT)[:-1]  # the sigmas called at
    unguided = 0 if r.guidance_until is None else int((tail < r.guidance_until).sum())
    return head + 1 + len(tail) - unguided, unguided


def _expected_forwards(engine, batch) -> int:
    calls = [_guided_calls(engine, k) for k in batch.steps[:, 0].tolist()]
    return sum(2 * guided + unguided for guided, unguided in calls)  # a guided call is cond + uncond


def test_interval_sigmas_follow_the_shifted_schedule():
    grid = flow_sigmas(20, 3.0)
    # M steps over M grid steps of the `authors` schedule are its own sigmas (linear in the unshifted ramp)
    assert torch.allclose(interval_sigmas(float(grid[5]), 0.0, 15, 3.0), grid[5:], atol=1e-12, rtol=0)
    coarse = interval_sigmas(float(grid[3]), 0.0, 3, 3.0)
    assert coarse.dtype == torch.float64 and coarse[0] == grid[3] and coarse[-1] == 0.0
    assert torch.all(coarse[1:] < coarse[:-1])
    shifted = coarse[:-1] - coarse[1:]  # step sizes; shift 3: the largest is the last, down to 0
    towards_zero = interval_sigmas(float(grid[3]), 0.0, 3, TAIL_SHIFT)
    crowded = towards_zero[:-1] - towards_zero[1:]  # shift < 1: the smallest is the last
    assert shifted[-1] > shifted[0] and crowded[-1] < crowded[0]
    assert len(segment_sigmas(grid, 0, 4, 10, 3.0)) == 5  # never more steps than the grid has there
    with pytest.raises(ValueError, match=">= 1"):
        interval_sigmas(0.9, 0.0, 0, 3.0)


@pytest.mark.parametrize("shared", [False, True])
def test_tail_solver_keeps_the_trained_step_and_nears_euler_as_it_refines(tiny_params, shared):
    # batch_size = group size: every sampling batch is one k group in both samplers, so equal bits;
    # `shared`: a group's samples start from one latent (rollout.same_initial_noise) in both
    _, euler, euler_forwards = _rollout(tiny_params, rollout__batch_size=4, rollout__same_initial_noise=shared)
    assert torch.equal(euler.latents[0], euler.latents[1]) == shared  # a shared start: one x_k per group
    assert euler_forwards == 8 * 20 * 2
    errors = {}
    for steps in (2, 10):
        engine, batch, forwards = _rollout(tiny_params, rollout__batch_size=4, rollout__tail_steps=steps,
                                           rollout__same_initial_noise=shared)
        assert torch.equal(batch.steps, euler.steps)
        assert torch.equal(batch.latents, euler.latents) and torch.equal(batch.next_latents, euler.next_latents)
        assert torch.equal(batch.log_probs, euler.log_probs)
        assert forwards == _expected_forwards(engine, batch) < euler_forwards
        errors[steps] = float((batch.final_latents - euler.final_latents).abs().mean())
    assert 0 < errors[10] < errors[2]
    # k = 8 here for the first prompt: 2 x (8 Euler + 1 SDE + 2 UniPC) forwards for each of its samples
    assert euler.steps[0, 0] == 8 and _guided_calls(engine, 8) == (8 + 1 + 10, 0)


def test_head_solver_keeps_ratio_one_at_the_first_update(tiny_params):
    engine, batch, forwards = _rollout(tiny_params, rollout__head_steps=2)
    assert forwards == _expected_forwards(engine, batch) < 8 * 20 * 2
    cond, uncond = encode(engine, PROMPTS)
    ctx = StepContext(batch, torch.zeros(8), cond, uncond, engine.sigmas, engine.scales.float(), 4.5)
    with torch.no_grad():
        step, old = score_items(engine.policy, ctx, torch.arange(8), PassCounter())
    assert torch.allclose(torch.exp(step.log_prob - old), torch.ones(8), atol=1e-5, rtol=0)  # ratio = 1


def test_guidance_stops_below_its_sigma_after_the_trained_step(tiny_params):
    _, euler, _ = _rollout(tiny_params, rollout__batch_size=4)
    engine, batch, forwards = _rollout(tiny_params, rollout__batch_size=4, rollout__guidance_until=0.5)
    assert torch.equal(batch.next_latents, euler.next_latents)  # the head and step k stay guided
    # k = 8 (sigma 0.818): Euler tail calls at the 11 sigmas 0.785 .. 0.136, of which 5 are below 0.5
    # (0.4997, 0.428, 0.346, 0.250, 0.136): 8 head + 1 SDE + 6 tail calls guided
    assert _guided_calls(engine, 8) == (8 + 1 + 6, 5)
    assert forwards == _expected_forwards(engine, batch)
    assert not torch.equal(batch.final_latents, euler.final_latents)


def test_every_sample_keeps_its_noise_whatever_the_batch(tiny_params):
    options = {"rollout__head_steps": 2, "rollout__tail_steps": 3, "rollout__guidance_until": 0.5,
               "rollout__iso_temporal": False}  # one k per sample: several k groups in a sampling batch
    _, small, small_forwards = _rollout(tiny_params, rollout__batch_size=3, **options)
    _, large, large_forwards = _rollout(tiny_params, rollout__batch_size=8, **options)
    assert len(set(small.steps[:, 0].tolist())) > 1 and small_forwards == large_forwards
    assert torch.allclose(small.latents, large.latents, atol=1e-5)
    assert torch.allclose(small.log_probs, large.log_probs, atol=1e-5)
    assert torch.allclose(small.final_latents, large.final_latents, atol=1e-4)


@pytest.mark.parametrize("overrides,message", [
    ({"train__mode": "full", "rollout__tail_steps": 3}, "one SDE step per sample .train.mode flash. only; .*train.mode 'full'"),
    ({"train__mode": "window", "rollout__guidance_until": 0.5}, "train.mode 'window'"),
    ({"rollout__tail_steps": 0}, "rollout.tail_steps must be between 1 and 19 solver steps"),
    ({"rollout__head_steps": -2}, "rollout.head_steps must be between 1 and 9 solver steps"),
    # at most k <= K - 1 head steps and N - 1 tail steps: more would change nothing
    ({"rollout__head_steps": 10}, r"rollout.head_steps must be between 1 and 9 solver steps.* got 10"),
    ({"rollout__tail_steps": 20}, r"rollout.tail_steps must be between 1 and 19 solver steps.* got 20"),
    ({"rollout__guidance_until": 0.0}, r"rollout.guidance_until must be a sigma in \(0, 1\]"),
])
def test_cheaper_rollout_options_are_validated(tiny_params, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_params(**overrides)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cheaper_rollouts_keep_ratio_near_one_on_gpu_in_bfloat16(tiny_params):
    engine, batch, _ = _rollout(tiny_params, model__device="cuda", model__dtype="bfloat16",
                                rollout__head_steps=2, rollout__tail_steps=3, rollout__guidance_until=0.5)
    cond, uncond = encode(engine, PROMPTS)
    ctx = StepContext(batch, torch.zeros(8), cond, uncond, engine.sigmas.to(engine.device),
                      engine.scales.float().to(engine.device), 4.5)
    with torch.no_grad():
        step, old = score_items(engine.policy, ctx, torch.arange(8), PassCounter())
    assert (torch.exp(step.log_prob - old) - 1).abs().max().item() < 1e-3  # below the PPO clip range
    assert torch.isfinite(batch.final_latents).all()
