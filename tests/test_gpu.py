"""Checks that need a CUDA device; skipped without one. The same code paths run on CPU elsewhere."""

import pytest
import torch

from flash_grpo_core.engine.iteration import build_engine, encode, generate, run_iteration
from flash_grpo_core.engine.trainer import StepContext, score_items
from flash_grpo_core.method.batch import PassCounter
from flash_grpo_core.rewards import build_weighted_reward

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPTS = ["a red square moving left", "a blue ball bouncing"]


def _max_ratio_error(engine):
    batch, _ = generate(engine, PROMPTS, 0, PassCounter())
    cond, uncond = encode(engine, PROMPTS)
    ctx = StepContext(batch, torch.zeros(8), cond, uncond, engine.sigmas.to(engine.device),
                      engine.scales.float().to(engine.device), engine.params.rollout.guidance)
    with torch.no_grad():
        step, old = score_items(engine.policy, ctx, torch.arange(8), PassCounter())
    return (torch.exp(step.log_prob - old) - 1).abs().max().item()


def test_ratio_is_one_on_gpu_in_float32(tiny_params):
    engine = build_engine(tiny_params(model__device="cuda", model__dtype="float32"))
    assert _max_ratio_error(engine) < 1e-5


def test_ratio_is_near_one_on_gpu_in_bfloat16(tiny_params):
    engine = build_engine(tiny_params(model__device="cuda", model__dtype="bfloat16"))
    error = _max_ratio_error(engine)
    print(f"bf16 max |ratio - 1| = {error:.2e}")
    # bf16 matmuls in a different batch composition: must stay below the PPO clip range (1e-3), or
    # on-policy items would already count as clipped
    assert error < 1e-3


def test_iteration_on_gpu_changes_lora_weights(tiny_params):
    engine = build_engine(tiny_params(model__device="cuda"))
    before = {k: v.detach().clone() for k, v in engine.policy.parameters.items()}
    metrics = run_iteration(engine, PROMPTS, build_weighted_reward({"brightness": 1.0}), 0)
    assert metrics["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in engine.policy.parameters.items())
    assert all(v.device.type == "cuda" for v in engine.policy.parameters.values())


def test_offloaded_encoder_and_vae_wait_in_host_memory(tiny_params):
    """model.offload_frozen: UMT5 and the VAE live on the CPU between uses; the videos do not change."""
    plain = build_engine(tiny_params(model__device="cuda", model__dtype="float32"))
    engine = build_engine(tiny_params(model__device="cuda", model__dtype="float32", model__offload_frozen=True))

    def on_cpu(module) -> bool:
        return all(p.device.type == "cpu" for p in module.parameters())

    assert on_cpu(engine.stack.text_encoder) and on_cpu(engine.stack.vae)
    _, videos = generate(engine, PROMPTS, 0, PassCounter())
    assert on_cpu(engine.stack.text_encoder) and on_cpu(engine.stack.vae)
    _, expected = generate(plain, PROMPTS, 0, PassCounter())
    assert (videos.int() - expected.int()).abs().max() <= 1  # the same kernels: at most a rounding step
