"""One iteration on the tiny random Wan stack: invariants of the policy, determinism, bad input."""

import pytest
import torch

from flash_grpo_core.engine.iteration import (
    advantages_for,
    build_engine,
    encode,
    generate,
    plan_steps,
    run_iteration,
    update,
)
from flash_grpo_core.engine.trainer import StepContext, score_items
from flash_grpo_core.method.advantages import NonFiniteError
from flash_grpo_core.method.batch import PassCounter
from flash_grpo_core.rewards import RewardOutput, build_weighted_reward

PROMPTS = ["a red square moving left", "a blue ball bouncing"]


def _snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_recomputed_log_prob_equals_rollout_with_unchanged_weights(tiny_params):
    engine = build_engine(tiny_params())
    batch, videos = generate(engine, PROMPTS, 0, PassCounter())
    assert videos.dtype == torch.uint8 and videos.shape == (8, 9, 32, 32, 3)
    cond, uncond = encode(engine, PROMPTS)
    ctx = StepContext(batch, torch.zeros(8), cond, uncond, engine.sigmas, engine.scales.float(), 4.5)
    with torch.no_grad():
        step, old = score_items(engine.policy, ctx, torch.arange(8), PassCounter())
    ratio = torch.exp(step.log_prob - old)
    assert torch.allclose(ratio, torch.ones(8), atol=1e-5, rtol=0)


def test_rollout_is_iso_temporal_and_independent_of_batch_size(tiny_params):
    small = build_engine(tiny_params(rollout__batch_size=3))
    batch, _ = generate(small, PROMPTS, 0, PassCounter())
    steps = batch.steps.reshape(2, 4)
    assert torch.all(steps == steps[:, :1])  # one k per prompt, shared by its group
    assert steps.max() < 10
    large, _ = generate(build_engine(tiny_params(rollout__batch_size=8)), PROMPTS, 0, PassCounter())
    # same noise per sample whatever the chunking; only float summation order differs between batch sizes
    assert torch.allclose(batch.final_latents, large.final_latents, atol=1e-4)
    assert torch.allclose(batch.log_probs, large.log_probs, atol=1e-5)


def test_update_changes_trainable_weights_and_only_them(tiny_params):
    engine = build_engine(tiny_params())
    before = _snapshot(engine.policy.transformer)
    batch, _ = generate(engine, PROMPTS, 0, PassCounter())
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.3])
    metrics = update(engine, PROMPTS, batch, advantages, 0, PassCounter())
    after = _snapshot(engine.policy.transformer)
    trainable = set(engine.policy.parameters)
    assert trainable and all("lora" in name for name in trainable)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and changed <= trainable
    assert metrics["grad_norm"] > 0 and metrics["trained_items"] == 8


def test_an_update_makes_better_samples_more_likely(tiny_params):
    """GRPO's direction: after one optimizer step the recorded SDE transitions of the samples with a
    positive advantage gain log-probability against those with a negative one (to first order
    sum(A (log p_new - log p_old)) = lr x the gradient's inner product with Adam's step > 0)."""
    engine = build_engine(tiny_params(train__minibatches=1))
    batch, _ = generate(engine, PROMPTS, 0, PassCounter())
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.3])
    cond, uncond = encode(engine, PROMPTS)
    ctx = StepContext(batch, advantages, cond, uncond, engine.sigmas, engine.scales.float(), 4.5)
    update(engine, PROMPTS, batch, advantages, 0, PassCounter())
    with torch.no_grad():
        step, old = score_items(engine.policy, ctx, torch.arange(8), PassCounter())
    change = step.log_prob - old
    assert change.abs().max() > 0 and float((advantages * change).sum()) > 0, change
    opposite = build_engine(tiny_params(train__minibatches=1))  # the opposite advantages: the opposite way
    update(opposite, PROMPTS, batch, -advantages, 0, PassCounter())
    with torch.no_grad():
        flipped, _ = score_items(opposite.policy, ctx, torch.arange(8), PassCounter())
    assert float((advantages * (flipped.log_prob - old)).sum()) < 0


def test_offloaded_frozen_modules_visit_the_device_only_to_encode_and_decode(tiny_params, monkeypatch):
    """model.offload_frozen moves UMT5 to the device around each encoding and the VAE around each
    decoding, back to host memory after (on the CPU both moves are to the CPU: the calls are what is
    checked here; test_gpu.py checks where the weights are on a GPU); the rollout does not change."""
    expected_batch, expected = generate(build_engine(tiny_params()), PROMPTS, 0, PassCounter())
    engine = build_engine(tiny_params(model__offload_frozen=True))
    moves = []
    for name in ("text_encoder", "vae"):
        module = getattr(engine.stack, name)
        move = module.to
        monkeypatch.setattr(module, "to", lambda device, _name=name, _move=move: (moves.append((_name, str(device))),
                                                                                _move(device))[1])
    batch, videos = generate(engine, PROMPTS, 0, PassCounter())
    assert moves == [("text_encoder", "cpu"), ("text_encoder", "cpu"), ("vae", "cpu"), ("vae", "cpu")]
    assert torch.equal(videos, expected) and torch.equal(batch.log_probs, expected_batch.log_probs)


def test_zero_advantages_leave_the_weights_unchanged(tiny_params):
    engine = build_engine(tiny_params(train__skip_zero_advantage=False))
    before = _snapshot(engine.policy.transformer)
    batch, _ = generate(engine, PROMPTS, 0, PassCounter())
    update(engine, PROMPTS, batch, torch.zeros(8), 0, PassCounter())
    after = _snapshot(engine.policy.transformer)
    assert all(torch.equal(before[name], after[name]) for name in before)


def _two_iterations(params):
    engine = build_engine(params)
    reward = build_weighted_reward({"brightness": 1.0, "colorfulness": 0.5})
    metrics = [run_iteration(engine, PROMPTS, reward, it) for it in range(2)]
    return metrics, {k: v.detach().clone() for k, v in engine.policy.parameters.items()}


def test_same_seed_gives_bit_identical_runs(tiny_params):
    metrics_a, weights_a = _two_iterations(tiny_params())
    metrics_b, weights_b = _two_iterations(tiny_params())
    assert metrics_a == metrics_b
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
    metrics_c, _ = _two_iterations(tiny_params(seed=1))
    assert metrics_c[0]["reward_mean"] != metrics_a[0]["reward_mean"]


@pytest.mark.parametrize("mode,trained_per_sample", [("flash", 1), ("window", 3), ("window_k", 3), ("full", 10)])
def test_modes_count_their_passes(tiny_params, mode, trained_per_sample):
    params = tiny_params(train__mode=mode, train__window_size=3, train__timestep_fraction=0.5,
                         train__skip_zero_advantage=False)
    engine = build_engine(params)
    steps = plan_steps(params, 2, iteration=0)
    assert steps.shape == (2, 4, trained_per_sample)
    metrics = run_iteration(engine, PROMPTS, build_weighted_reward({"brightness": 1.0}), 0)
    samples = 8
    assert metrics["rollout_forward_passes"] == samples * 20 * 2  # N steps, cond + uncond
    assert metrics["train_forward_passes"] == samples * trained_per_sample * 2
    assert metrics["train_backward_passes"] == samples * trained_per_sample * 2


def test_window_mode_follows_mixgrpo_schedule(tiny_params):
    # MixGRPO's defaults: W 4, moved by 1 step every 25 iterations over steps 0..N-2 (N = 20 here)
    params = tiny_params(train__mode="window")
    assert plan_steps(params, 2, iteration=0)[0, 0].tolist() == [0, 1, 2, 3]
    assert plan_steps(params, 2, iteration=24)[0, 0].tolist() == [0, 1, 2, 3]
    assert plan_steps(params, 2, iteration=25)[1, 3].tolist() == [1, 2, 3, 4]
    assert plan_steps(params, 2, iteration=17 * 25)[0, 0].tolist() == [17, 18]  # clipped to N - 2 = 18
    assert plan_steps(params, 2, iteration=19 * 25)[0, 0].tolist() == [0, 1, 2, 3]  # rolled back


def test_full_mode_takes_sde_steps_after_its_trained_steps(tiny_params):
    from flash_grpo_core.engine.iteration import sampling_spec
    from flash_grpo_core.engine.sampler import RolloutInputs, rollout
    from flash_grpo_core.engine.seeding import derive_seed

    engine = build_engine(tiny_params(train__mode="full", train__timestep_fraction=0.5))
    batch, _ = generate(engine, PROMPTS, 0, PassCounter())
    assert batch.steps.shape == (8, 10)  # trains the first 10 of 20 steps
    # reference: the same rollout with SDE steps only at the trained steps
    cond, uncond = encode(engine, PROMPTS)
    r = engine.params.rollout
    spec = sampling_spec(engine, engine.sigmas, engine.scales, r.guidance, derive_seed(engine.params.seed, 0, "noise"))
    inputs = RolloutInputs(cond, uncond, plan_steps(engine.params, 2, 0))
    trained_only = rollout(engine.policy.transformer, inputs, spec)
    # the trained steps see the same noise; steps 10..19 are SDE steps too, so the videos differ
    assert torch.equal(batch.latents, trained_only.latents) and torch.equal(batch.log_probs, trained_only.log_probs)
    assert (batch.final_latents - trained_only.final_latents).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-3


def test_full_mode_loss_is_averaged_over_the_trained_steps(tiny_params):
    # with every advantage 1 and no rectification each item's PPO term is -ratio = -1 (to the clip
    # range, 1e-3): the mean over 10 trained steps is -1, where a sum over them would give -10
    engine = build_engine(tiny_params(train__mode="full", train__timestep_fraction=0.5, train__rectify="none"))
    batch, _ = generate(engine, PROMPTS, 0, PassCounter())
    metrics = update(engine, PROMPTS, batch, torch.ones(8), 0, PassCounter())
    assert metrics["loss"] == pytest.approx(-1.0, abs=2e-3)


def test_kl_term_runs_against_the_adapter_free_reference(tiny_params):
    engine = build_engine(tiny_params(train__kl_beta=0.1))
    metrics = run_iteration(engine, PROMPTS, build_weighted_reward({"brightness": 1.0}), 0)
    assert metrics["train_forward_passes"] == 2 * metrics["train_backward_passes"]  # policy + reference


def test_full_finetune_trains_every_transformer_weight(tiny_params):
    engine = build_engine(tiny_params(model__finetune="full", train__kl_beta=0.1))
    names = {name for name, _ in engine.policy.transformer.named_parameters()}
    assert set(engine.policy.parameters) == names
    metrics = run_iteration(engine, PROMPTS, build_weighted_reward({"brightness": 1.0}), 0)
    assert metrics["grad_norm"] > 0


def test_nan_reward_fails_with_a_clear_message(tiny_params):
    engine = build_engine(tiny_params())

    def broken(videos, prompts, metadata=None):
        scores = torch.ones(len(prompts))
        scores[2] = float("nan")
        return RewardOutput(scores=scores, info={})

    with pytest.raises(NonFiniteError, match=r"rewards contains 1 non-finite value.*\[2\]"):
        run_iteration(engine, PROMPTS, broken, 0)
    with pytest.raises(NonFiniteError, match="rewards"):
        advantages_for(engine.params, torch.tensor([float("inf")] * 8))


def test_missing_model_path_names_the_path(tiny_params, tmp_path):
    from flash_grpo_core.models.wan import ModelPathError

    missing = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    params = tiny_params(preset="wan1_3b", model__path=str(missing))
    with pytest.raises(ModelPathError, match=str(missing)):
        build_engine(params)


@pytest.mark.parametrize("lora_compute", ["float32", "input"])
def test_bfloat16_iteration_runs_and_keeps_ratio_near_one(tiny_params, lora_compute):
    # the GPU dtype path, exercised on the CPU: some Wan modules stay fp32 while the rest is bf16
    engine = build_engine(tiny_params(model__dtype="bfloat16", model__gradient_checkpointing=True,
                                      model__lora_compute=lora_compute))
    adapter = engine.policy.transformer.blocks[0].attn1.to_q.lora_A["default"]
    assert (type(adapter) is not torch.nn.Linear) == (lora_compute == "input")  # the adapters multiply in bf16
    batch, videos = generate(engine, PROMPTS, 0, PassCounter())
    assert batch.latents.dtype == torch.float32 and videos.dtype == torch.uint8  # the float32 state, as sampled
    cond, uncond = encode(engine, PROMPTS)
    ctx = StepContext(batch, torch.zeros(8), cond, uncond, engine.sigmas, engine.scales.float(), 4.5)
    with torch.no_grad():
        step, old = score_items(engine.policy, ctx, torch.arange(8), PassCounter())
    assert (torch.exp(step.log_prob - old) - 1).abs().max() < 1e-3  # below the PPO clip range (1e-3)
    metrics = run_iteration(engine, PROMPTS, build_weighted_reward({"brightness": 1.0}), 1)
    assert metrics["grad_norm"] > 0


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointing_every_nth_block_recomputes_those_and_leaves_the_gradients(tiny_params, every):
    latents = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def lora_grads_and_block_calls(**model):
        engine = build_engine(tiny_params(**model))
        transformer, calls = engine.policy.transformer.train(), []
        for index, block in enumerate(transformer.blocks):
            block.register_forward_pre_hook(lambda *_, index=index: calls.append(index))  # the recompute stops early
        cond, _ = encode(engine, PROMPTS)
        out = transformer(hidden_states=latents, timestep=torch.full((2,), 500.0), encoder_hidden_states=cond,
                          return_dict=False)[0]
        out.square().mean().backward()
        return [p.grad.clone() for p in engine.policy.parameters.values()], sorted(calls)

    plain, once = lora_grads_and_block_calls()
    grads, calls = lora_grads_and_block_calls(model__gradient_checkpointing=True, model__checkpoint_every=every)
    blocks = sorted(set(once))
    assert once == blocks and len(blocks) >= 2  # without checkpointing each block runs once
    assert calls == sorted(blocks + [b for b in blocks if b % every == 0])  # the chosen ones again, in the backward
    assert all(torch.allclose(g, p, rtol=1e-5, atol=1e-7) for g, p in zip(grads, plain))


def test_the_per_step_picture_counts_each_trained_step_and_its_output_gradient(tiny_params):
    """On one on-policy optimizer step (ratio 1, nothing clipped) the loss is linear in the
    advantages: doubling them doubles each step's mean |dL/dv|; the items add up to what was trained."""
    params = tiny_params(train__mode="window", train__window_size=3, train__minibatches=1, train__kl_beta=0.0)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.3])
    pictures = []
    for scale in (1.0, 2.0):
        engine = build_engine(params)
        batch, _ = generate(engine, PROMPTS, 0, PassCounter())
        metrics = update(engine, PROMPTS, batch, advantages * scale, 0, PassCounter())
        pictures.append(metrics["per_step"])
    assert set(pictures[0]) == set(batch.steps.unique().tolist()) and len(pictures[0]) == 3  # the window's steps
    assert sum(entry["items"] for entry in pictures[0].values()) == metrics["trained_items"] == 24
    for k, entry in pictures[0].items():
        assert entry["output_grad_norm"] > 0
        assert pictures[1][k]["output_grad_norm"] == pytest.approx(2 * entry["output_grad_norm"], rel=1e-4)
