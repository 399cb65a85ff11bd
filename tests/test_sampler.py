"""What the sampler gives the transformer, as the Wan pipeline does: integer timesteps truncated from
1000 * sigma, and a float32 latent state cast to the model's dtype only at the transformer input."""

from dataclasses import replace

import pytest
import torch

from flash_grpo_core.engine import sampler
from flash_grpo_core.engine.iteration import build_engine, encode, generate
from flash_grpo_core.engine.trainer import StepContext, score_items
from flash_grpo_core.method.batch import PassCounter
from flash_grpo_core.method.schedule import flow_sigmas, timesteps, transformer_timesteps
from flash_grpo_core.method.sde import ode_step

PROMPTS = ["a red square moving left", "a blue ball bouncing"]


def _scheduler_timesteps(steps: int, shift: float) -> torch.Tensor:
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps  # int64 [N], what WanPipeline passes to its transformer


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
def test_timesteps_equal_the_schedulers_for_every_step_count(shift):
    for steps in range(1, 61):
        ours = timesteps(flow_sigmas(steps, shift, "diffusers"))
        assert ours.dtype == torch.int64 and torch.equal(ours, _scheduler_timesteps(steps, shift)), steps


def test_timesteps_need_float64_sigmas():
    # 1000 * 0.95 is 950 in float64; float32 holds 0.95 as 0.9499999881, which would truncate to 949
    assert transformer_timesteps(torch.tensor([0.95], dtype=torch.float64)).tolist() == [950]
    with pytest.raises(TypeError, match="float64 sigmas"):
        transformer_timesteps(torch.tensor([0.95]))


def _record_timesteps(transformer) -> list[torch.Tensor]:
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["timestep"].detach().cpu().clone())

    transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_rollout_and_training_give_the_transformer_the_schedulers_integer_timesteps(tiny_params):
    engine = build_engine(tiny_params(rollout__schedule="diffusers"))
    expected = _scheduler_timesteps(20, 3.0)  # the tiny preset's N = 20, shift 3
    seen = _record_timesteps(engine.policy.transformer)
    batch, _ = generate(engine, PROMPTS, 0, PassCounter())
    assert len(seen) == 20  # 8 samples in one batch of 8, conditional and unconditional halves together
    for i, timestep in enumerate(seen):
        assert timestep.dtype == torch.int64 and torch.equal(timestep, expected[i].expand(16)), i

    seen.clear()
    cond, uncond = encode(engine, PROMPTS)
    ctx = StepContext(batch, torch.zeros(8), cond, uncond, engine.sigmas, engine.scales.float(), 4.5)
    with torch.no_grad():
        step, old = score_items(engine.policy, ctx, torch.arange(8), PassCounter())
    trained = expected[batch.steps[:, 0]]  # [8]: each sample's trained step
    assert len(seen) == 1 and torch.equal(seen[0], torch.cat([trained, trained]))
    assert torch.allclose(torch.exp(step.log_prob - old), torch.ones(8), atol=1e-5, rtol=0)  # ratio = 1


def test_bf16_sampling_keeps_a_float32_state(tiny_params, monkeypatch):
    engine = build_engine(tiny_params(model__dtype="bfloat16"))
    transformer = engine.policy.transformer
    assert sampler.compute_dtype(transformer) == torch.bfloat16
    state_dtypes = []
    original = sampler.predict_velocity

    def spy(transformer, latents, *args, **kwargs):
        state_dtypes.append(latents.dtype)
        return original(transformer, latents, *args, **kwargs)

    monkeypatch.setattr(sampler, "predict_velocity", spy)
    batch, _ = generate(engine, PROMPTS, 0, PassCounter())
    assert state_dtypes == [torch.float32] * 20  # the state each step starts from: float32, not the model's bf16
    assert batch.latents.dtype == batch.next_latents.dtype == batch.final_latents.dtype == torch.float32


def test_bf16_ode_sampling_equals_a_float32_reference_loop(tiny_params):
    # The Wan pipeline's loop: x float32; v from the transformer on x cast to bf16 (guided in bf16);
    # x += (sigma' - sigma) * v in float32. Holding x in bf16 instead rounds it after every step.
    engine = build_engine(tiny_params(model__dtype="bfloat16"))
    transformer, sigmas = engine.policy.transformer, engine.sigmas
    cond, uncond = encode(engine, PROMPTS)
    shape = engine.stack.latent_shape(9, 32, 32)
    no_sde = torch.zeros(2, 4, 0, dtype=torch.long)  # [B, G, T = 0]: ODE steps only
    spec = sampler.SamplingSpec(sigmas, torch.zeros(20), 4.5, shape, seed=7, batch_size=8)
    batch = sampler.rollout(transformer, sampler.RolloutInputs(cond, uncond, no_sde), spec)

    x = sampler._draw(sampler.sample_generators(7, list(range(8))), shape)  # [8, C, F, H, W] float32
    embeds = torch.cat([cond.repeat_interleave(4, dim=0), uncond.expand(8, -1, -1)])  # [16, L, D]
    with torch.no_grad():
        for i in range(20):
            t = torch.full((16,), int(1000 * sigmas[i].item()), dtype=torch.long)
            out = transformer(hidden_states=torch.cat([x, x]).bfloat16(), timestep=t, encoder_hidden_states=embeds,
                              return_dict=False)[0]
            v_cond, v_uncond = out.chunk(2)
            x = ode_step(x, v_uncond + 4.5 * (v_cond - v_uncond), sigmas[i], sigmas[i + 1])
    assert x.dtype == torch.float32 and torch.equal(batch.final_latents, x)


def test_sequential_cfg_halves_give_the_batched_velocity_and_gradient(tiny_params):
    """`model.cfg_sequential`: the conditional and unconditional halves one after the other give
    the velocity and the gradient of one batch of 2S (to float rounding), counted as 2S forwards."""
    engine = build_engine(tiny_params())
    cond, uncond = encode(engine, PROMPTS)
    latents = torch.randn(2, *engine.stack.latent_shape(9, 32, 32), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.4], dtype=torch.float64)
    results = []
    for sequential in (False, True):
        counter = PassCounter()
        engine.policy.optimizer.zero_grad(set_to_none=True)
        v = sampler.predict_velocity(engine.policy.transformer, latents, sigma, cond, uncond, 4.5, counter,
                                     cfg_sequential=sequential)
        v.square().mean().backward()
        grads = {name: p.grad.clone() for name, p in engine.policy.parameters.items()}
        results.append((v.detach(), grads, counter.forward))
    (v_pair, g_pair, n_pair), (v_seq, g_seq, n_seq) = results
    assert n_pair == n_seq == 4
    assert torch.allclose(v_pair, v_seq, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in g_pair.values())
    for name in g_pair:
        assert torch.allclose(g_pair[name], g_seq[name], atol=1e-6, rtol=1e-4), name


def test_stochastic_steps_beyond_the_trained_ones_draw_noise_but_are_not_recorded(tiny_params):
    # Flow-GRPO's full mode: SDE at every step, the first steps trained; each sample keeps drawing its
    # noise from its own generator, so the trained steps see the noise they see without the extra steps
    engine = build_engine(tiny_params())
    cond, uncond = encode(engine, PROMPTS)
    shape, sigmas = engine.stack.latent_shape(9, 32, 32), engine.sigmas
    trained = torch.arange(2).expand(2, 4, 2).clone()  # [B=2, G=4, T=2]: steps 0 and 1
    every = torch.ones(2, 4, 20, dtype=torch.bool)  # [B, G, N]
    spec = sampler.SamplingSpec(sigmas, engine.scales.float(), 4.5, shape, seed=7, batch_size=8)
    inputs = sampler.RolloutInputs(cond, uncond, trained)
    only_trained = sampler.rollout(engine.policy.transformer, inputs, spec)
    everywhere = sampler.rollout(engine.policy.transformer, replace(inputs, sde_steps=every), spec)
    assert everywhere.steps.shape == (8, 2) and everywhere.log_probs.shape == (8, 2)  # one log p per trained step
    assert torch.equal(everywhere.latents, only_trained.latents)  # the same noise up to the trained steps
    assert torch.equal(everywhere.log_probs, only_trained.log_probs)
    assert not torch.equal(everywhere.final_latents, only_trained.final_latents)  # SDE noise on steps 2..19
    with pytest.raises(ValueError, match="every trained step must be a stochastic"):
        sampler.rollout(engine.policy.transformer, replace(inputs, sde_steps=torch.zeros(2, 4, 20, dtype=torch.bool)),
                        spec)


def test_a_group_can_share_its_initial_noise(tiny_params):
    """rollout.same_initial_noise (MixGRPO's init_same_noise): a group's samples start from one latent
    and differ by their SDE noise only; each prompt its own, whatever the batch size or rank."""
    engine = build_engine(tiny_params())
    cond, uncond = encode(engine, PROMPTS)
    shape, sigmas = engine.stack.latent_shape(9, 32, 32), engine.sigmas
    trained = torch.zeros(2, 4, 1, dtype=torch.long)  # [B=2, G=4, T=1]: step 0, x_0 is the initial latent
    args = (engine.policy.transformer, sampler.RolloutInputs(cond, uncond, trained))

    def spec(batch_size, same_initial=False):
        return sampler.SamplingSpec(sigmas, engine.scales.float(), 4.5, shape, 7, batch_size, same_initial=same_initial)

    own, shared = sampler.rollout(*args, spec(8)), sampler.rollout(*args, spec(8, same_initial=True))
    first = shared.latents[:, 0]  # [S, C, F, H, W]
    assert all(torch.equal(first[s], first[4 * (s // 4)]) for s in range(8)) and not torch.equal(first[0], first[4])
    assert not torch.equal(own.latents[0, 0], own.latents[1, 0])  # the default: each sample its own
    assert not torch.equal(shared.next_latents[0, 0], shared.next_latents[1, 0])  # the SDE step still differs
    # the same noise in batches of 3 (the numbers then differ only by the batch's float rounding)
    assert torch.allclose(sampler.rollout(*args, spec(3, same_initial=True)).final_latents, shared.final_latents,
                          atol=1e-5)
    second_prompt = sampler.rollout(engine.policy.transformer,
                                    sampler.RolloutInputs(cond[1:], uncond, trained[1:], first_sample=4),
                                    spec(8, same_initial=True))
    assert torch.allclose(second_prompt.final_latents, shared.final_latents[4:], atol=1e-5)  # another rank's share
