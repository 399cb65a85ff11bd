import math

import pytest
import torch

from flash_grpo_core.method.schedule import flow_sigmas
from flash_grpo_core.method.sde import gradient_factors, noise_scales, ode_step, rectification_coefficients, sde_step


def _latents(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 2, 3, 3, generator=g), torch.randn(batch, 4, 2, 3, 3, generator=g)


def test_log_prob_matches_torch_normal():
    x, v = _latents()
    sigma, sigma_next, scale = torch.tensor([0.9, 0.7, 0.5]), torch.tensor([0.8, 0.6, 0.3]), torch.tensor([0.9, 0.6, 0.4])
    step = sde_step(x, v, sigma, sigma_next, scale, generator=torch.Generator().manual_seed(1))
    reference = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean))
    expected = reference.log_prob(step.prev_sample).mean(dim=(1, 2, 3, 4))
    assert torch.allclose(step.log_prob, expected, atol=1e-5)
    assert step.log_prob.shape == (3,)


def test_mean_and_std_follow_the_spec():
    x, v = _latents(batch=1)
    sigma, sigma_next, s = 0.8, 0.6, 0.5  # dt = -0.2
    # mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt
    #      = x (1 - 0.25 * 0.2 / 1.6) + v (1 + 0.25 * 0.2 / 1.6) (-0.2) = 0.96875 x - 0.20625 v
    step = sde_step(x, v, sigma, sigma_next, s, noise=torch.zeros_like(x))
    assert torch.allclose(step.mean, 0.96875 * x - 0.20625 * v, atol=1e-6)
    assert step.std.item() == pytest.approx(0.5 * math.sqrt(0.2))
    assert torch.equal(step.prev_sample, step.mean)  # zero noise: the sample is the mean


def test_scoring_a_given_sample_reproduces_its_log_prob():
    x, v = _latents()
    drawn = sde_step(x, v, 0.9, 0.85, 0.5, generator=torch.Generator().manual_seed(3))
    scored = sde_step(x, v, 0.9, 0.85, 0.5, prev_sample=drawn.prev_sample)
    assert torch.equal(scored.log_prob, drawn.log_prob)


def test_bf16_sample_log_prob_is_computed_from_the_rounded_sample():
    x, v = (t.bfloat16() for t in _latents())
    drawn = sde_step(x, v, 0.9, 0.85, 0.5, generator=torch.Generator().manual_seed(3))
    assert drawn.prev_sample.dtype == torch.bfloat16 and drawn.log_prob.dtype == torch.float32
    scored = sde_step(x, v, 0.9, 0.85, 0.5, prev_sample=drawn.prev_sample)
    assert torch.equal(scored.log_prob, drawn.log_prob)


def test_ode_step_is_euler():
    x, v = _latents()
    assert torch.allclose(ode_step(x, v, 0.9, 0.7), x - 0.2 * v, atol=1e-6)


def test_noise_scale_forms():
    sigmas = flow_sigmas(10, 3.0)
    assert torch.allclose(noise_scales(sigmas, "wan"), sigmas[1] * sigmas[:-1])
    assert torch.allclose(noise_scales(sigmas, "dance"), torch.full((10,), 0.3, dtype=torch.float64))
    flow = noise_scales(sigmas, "flow_grpo")
    # steps after the first: 0.7 sqrt(sigma / (1 - sigma)); the first uses 1 - sigma_1 in the denominator
    assert torch.allclose(flow[1:], 0.7 * torch.sqrt(sigmas[1:-1] / (1 - sigmas[1:-1])))
    assert flow[0].item() == pytest.approx(0.7 * math.sqrt(sigmas[0] / (1 - sigmas[1])))
    assert torch.all(torch.isfinite(noise_scales(flow_sigmas(10, 3.0, "diffusers"), "flow_grpo")))
    with pytest.raises(ValueError, match="unknown noise kind"):
        noise_scales(sigmas, "ddim")


def _grad_norm_wrt_velocity(sigmas, scales, i, noise):
    x = torch.zeros(1, 4, 2, 4, 4)
    v = torch.zeros_like(x, requires_grad=True)
    step = sde_step(x, v, sigmas[i], sigmas[i + 1], scales[i], noise=noise)  # on-policy sample
    scored = sde_step(x, v, sigmas[i], sigmas[i + 1], scales[i], prev_sample=step.prev_sample.detach())
    (grad,) = torch.autograd.grad(scored.log_prob.sum(), v)
    return grad.norm().item()


@pytest.mark.parametrize("kind", ["wan", "flow_grpo", "dance"])
def test_rectified_gradient_norm_does_not_depend_on_the_timestep(kind):
    sigmas = flow_sigmas(20, 3.0)
    scales = noise_scales(sigmas, kind)
    coefficients = rectification_coefficients(sigmas, kind)
    noise = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    raw = {i: _grad_norm_wrt_velocity(sigmas, scales, i, noise) for i in (0, 4, 9, 14, 19)}
    rectified = {i: raw[i] * coefficients[i].item() for i in raw}
    assert max(raw.values()) / min(raw.values()) > 3  # raw norms differ by a large factor
    first = rectified[0]
    for value in rectified.values():
        assert value == pytest.approx(first, rel=1e-3)
    # d log p / d v = -g eps / D: the rectified norm is |eps| / D for every timestep
    assert first == pytest.approx(noise.norm().item() / noise.numel(), rel=1e-3)


def test_gradient_factor_spans_an_order_of_magnitude_over_the_wan_schedule():
    g = gradient_factors(flow_sigmas(20, 3.0))
    assert g.max() / g.min() > 10  # 0.134 at sigma_0 to 2.91 at sigma_19
    assert torch.all(g[1:] > g[:-1])  # grows monotonically towards low noise
