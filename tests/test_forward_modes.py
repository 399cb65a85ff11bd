"""The forward-process modes (`nft`, `awm`) on the tiny random Wan stack: ODE rollouts that keep
the final samples, an update that re-noises them, records that carry them, the guards' ratio."""

import pytest
import torch

from flash_grpo_core.artifacts.rollout_records import batch_from_records, records_from_batch
from flash_grpo_core.artifacts.records import RolloutRecord
from flash_grpo_core.engine.iteration import build_engine, generate, plan_steps, run_iteration, update
from flash_grpo_core.method.batch import PassCounter
from flash_grpo_core.rewards import build_weighted_reward

PROMPTS = ["a red square moving left", "a blue ball bouncing"]
LEVELS = 4  # int(20 steps x 0.2): noise levels each final sample is trained at


def _params(tiny_params, mode, **overrides):
    return tiny_params(train__mode=mode, train__timestep_fraction=0.2, **overrides)


@pytest.mark.parametrize("mode", ["nft", "awm"])
def test_the_rollout_samples_the_ode_and_keeps_only_the_final_samples(tiny_params, mode):
    params = _params(tiny_params, mode)
    assert plan_steps(params, 2, iteration=1).shape == (2, 4, LEVELS)
    engine, counter = build_engine(params), PassCounter()
    batch, videos = generate(engine, PROMPTS, 1, counter)
    assert batch.steps.shape == (8, 0) and batch.latents.shape[1] == 0 and batch.log_probs.shape == (8, 0)
    assert batch.final_latents.shape[0] == 8 and videos.shape[0] == 8
    assert counter.forward == 8 * 20 * 2  # every step with the ODE, guided
    flow = build_engine(tiny_params(train__mode="full"))  # the same noise: the ODE path differs from the SDE's
    assert not torch.equal(generate(flow, PROMPTS, 1, PassCounter())[0].final_latents, batch.final_latents)
    records = records_from_batch(batch, PROMPTS, ["p0", "p1"], 1, params.seed, 4, keep_final=True)
    again = [RolloutRecord.from_sample(record.to_sample()) for record in records]  # through the shard format
    restored, _, _ = batch_from_records(again)
    assert torch.equal(restored.final_latents, batch.final_latents) and restored.steps.shape == (8, 0)


@pytest.mark.parametrize("mode", ["nft", "awm"])
def test_an_update_re_noises_the_final_samples_and_is_on_policy_at_its_first_step(tiny_params, mode):
    params = _params(tiny_params, mode, train__skip_zero_advantage=False)
    engine = build_engine(params)
    before = {name: p.detach().clone() for name, p in engine.policy.parameters.items()}
    metrics = run_iteration(engine, PROMPTS, build_weighted_reward({"brightness": 1.0}), 1)
    items = 8 * LEVELS
    assert metrics["trained_items"] == items
    assert metrics["train_forward_passes"] == 2 * items  # the trained policy and the sampling policy, unguided
    assert metrics["train_backward_passes"] == items
    assert metrics["first_ratio_deviation"] < 1e-5  # the sampling policy's copy gives the trained weights' values
    assert set(metrics["per_step"]) == set(range(LEVELS))  # each noise level: its items and output gradient
    assert any(not torch.equal(before[name], p) for name, p in engine.policy.parameters.items())


def test_the_forward_modes_are_deterministic_and_differ(tiny_params):
    def weights(mode):
        engine = build_engine(_params(tiny_params, mode))
        run_iteration(engine, PROMPTS, build_weighted_reward({"brightness": 1.0}), 1)
        return {name: p.detach().clone() for name, p in engine.policy.parameters.items()}

    nft, awm = weights("nft"), weights("awm")
    assert all(torch.equal(nft[name], value) for name, value in weights("nft").items())
    assert any(not torch.equal(nft[name], awm[name]) for name in nft)


def test_nft_moves_towards_the_good_samples_clean_latents(tiny_params):
    """One optimizer step on one sample with a high advantage lowers its flow-matching error at the
    trained levels, and with a low advantage raises it (the implicit policies' directions)."""
    errors = {}
    for advantage in (5.0, -5.0):
        params = _params(tiny_params, "nft", train__learning_rate=1e-3, train__minibatches=1, train__ema_every=1)
        engine = build_engine(params)
        batch, _ = generate(engine, PROMPTS, 1, PassCounter())
        advantages = torch.zeros(8)
        advantages[0] = advantage
        first = _flow_matching_error(engine, batch, params)
        update(engine, PROMPTS, batch, advantages, 1, PassCounter())
        errors[advantage] = _flow_matching_error(engine, batch, params) - first
    assert errors[5.0] < 0 < errors[-5.0], errors


def _flow_matching_error(engine, batch, params) -> float:
    """Sample 0's mean squared velocity error at the trained levels, with fixed noise."""
    from flash_grpo_core.engine.iteration import encode
    from flash_grpo_core.engine.sampler import predict_velocity
    from flash_grpo_core.method.forward_process import noised

    cond, _ = encode(engine, PROMPTS)
    x0 = batch.final_latents[:1].float()
    total = 0.0
    with torch.no_grad():
        for level in range(LEVELS):
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(level))
            sigma = engine.sigmas[level].reshape(1)
            v = predict_velocity(engine.policy.transformer, noised(x0, noise, sigma), sigma, cond[:1], None, 1.0)
            total += float(((v.float() - (noise - x0)) ** 2).mean())
    return total / LEVELS


def test_fast_rollouts_and_unknown_weightings_are_refused(tiny_params):
    from flash_grpo_core.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.head_steps, tail_steps and guidance_until apply to rollouts"):
        _params(tiny_params, "nft", rollout__head_steps=1)
    with pytest.raises(ConfigError, match="train.awm_weighting must be one of"):
        _params(tiny_params, "awm", train__awm_weighting="huber")
    with pytest.raises(ConfigError, match="0 noise levels"):
        tiny_params(train__mode="awm", train__timestep_fraction=0.01)
    with pytest.raises(ConfigError, match="the group's videos would be identical"):
        _params(tiny_params, "nft", rollout__same_initial_noise=True)


def test_the_preflight_plans_one_stored_latent_a_sample(tiny_params):
    import math

    from flash_grpo_core.pipeline import plan

    flash, nft = tiny_params(), _params(tiny_params, "nft")  # flash stores 2 latents a sample (x_k, x_k+1)
    latent_bytes = math.prod(plan.latent_shape(flash.rollout)) * 4
    assert plan.shard_bytes(flash) - plan.shard_bytes(nft) == 8 * (2 - 1) * latent_bytes
