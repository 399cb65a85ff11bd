import pytest
import torch

from flash_grpo_core.method.advantages import NonFiniteError, group_advantages
from flash_grpo_core.method.loss import kl_penalty, policy_stats, ppo_clip_loss
from flash_grpo_core.method.rectify import rectification_factors, rectification_weights
from flash_grpo_core.method.schedule import flow_sigmas
from flash_grpo_core.method.sde import noise_scales, rectification_coefficients


def test_ppo_clip_loss_hand_worked():
    eps = 0.1
    log_old = torch.zeros(4)
    # ratios 1.05 (inside), 1.3 (above 1 + eps), 0.8 (below 1 - eps), 1.3 with a negative advantage
    log_new = torch.log(torch.tensor([1.05, 1.3, 0.8, 1.3]))
    advantages = torch.tensor([1.0, 2.0, 1.0, -1.0])
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0])
    terms = ppo_clip_loss(log_new, log_old, advantages, weights, eps, reduction="none")
    # item 0: -1*1*1.05 = -1.05 vs -1.05 (inside the clip)            -> -1.05
    # item 1: -0.5*2*1.3 = -1.3 vs -0.5*2*1.1 = -1.1, max             -> -1.1 (clipped: no more gain)
    # item 2: -2*1*0.8 = -1.6 vs -2*1*0.9 = -1.8, max                 -> -1.6 (unclipped: full penalty)
    # item 3: -1*(-1)*1.3 = 1.3 vs 1*1.1 = 1.1, max                   -> 1.3 (pessimistic side kept)
    assert terms.tolist() == pytest.approx([-1.05, -1.1, -1.6, 1.3], abs=1e-6)
    assert ppo_clip_loss(log_new, log_old, advantages, weights, eps).item() == pytest.approx((-1.05 - 1.1 - 1.6 + 1.3) / 4)


def test_clip_boundaries_stop_the_gradient():
    eps = 0.1
    log_new = torch.log(torch.tensor([1.2, 0.95, 0.85])).requires_grad_(True)
    advantages = torch.tensor([1.0, 1.0, -1.0])
    loss = ppo_clip_loss(log_new, torch.zeros(3), advantages, torch.ones(3), eps, reduction="none").sum()
    loss.backward()
    # above 1 + eps with A > 0, and below 1 - eps with A < 0: clipped, no gradient
    assert log_new.grad[0] == 0 and log_new.grad[2] == 0
    # inside the range: d(-A r)/d log r = -A r = -0.95
    assert log_new.grad[1].item() == pytest.approx(-0.95, abs=1e-6)


def test_zero_advantage_gives_zero_gradient():
    log_new = torch.randn(5, requires_grad=True)
    loss = ppo_clip_loss(log_new, torch.randn(5), torch.zeros(5), torch.rand(5) + 0.5, 1e-3)
    loss.backward()
    assert torch.count_nonzero(log_new.grad) == 0


def test_kl_penalty_hand_worked():
    mean = torch.ones(2, 3)
    ref = torch.zeros(2, 3)
    std = torch.tensor([[0.5], [1.0]])
    # mean over elements of (1 - 0)^2 = 1, divided by 2 std^2: 1 / 0.5 = 2 and 1 / 2 = 0.5
    assert kl_penalty(mean, ref, std).tolist() == pytest.approx([2.0, 0.5])


def test_policy_stats():
    stats = policy_stats(torch.log(torch.tensor([1.0, 1.01, 0.98])), torch.zeros(3), clip_range=0.015)
    assert stats["clip_fraction"] == pytest.approx(1 / 3)  # only |0.98 - 1| > 0.015
    assert stats["ratio_mean"] == pytest.approx((1 + 1.01 + 0.98) / 3, abs=1e-6)
    assert stats["ratio_deviation_max"] == pytest.approx(0.02, abs=1e-6)


def test_advantages_hand_worked():
    rewards = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    # group means 2 and 2; batch std of [1, 3, 2, 2] = sqrt((1 + 1 + 0 + 0) / 4) = sqrt(0.5)
    adv = group_advantages(rewards)
    expected = torch.tensor([[-1.0, 1.0], [0.0, 0.0]]) / (0.5**0.5 + 1e-4)
    assert torch.allclose(adv, expected, atol=1e-6)
    # per-group std: group 1 std = 1 -> [-1, 1] / (1 + 1e-4); group 2 std = 0 and centred 0 -> 0
    per_group = group_advantages(rewards, std_scope="group")
    assert torch.allclose(per_group, torch.tensor([[-1.0, 1.0], [0.0, 0.0]]) / (1 + 1e-4), atol=1e-6)


def test_advantages_are_clipped():
    rewards = torch.tensor([[0.0] * 99 + [100.0]])
    assert group_advantages(rewards, clip=5.0).max().item() == pytest.approx(5.0)


def test_nan_reward_is_rejected_with_its_index():
    with pytest.raises(NonFiniteError, match=r"rewards contains 1 non-finite.*\[3\]"):
        group_advantages(torch.tensor([[1.0, 2.0], [3.0, float("nan")]]))


def test_rectification_weights_modes():
    sigmas = flow_sigmas(20, 3.0)
    steps = torch.tensor([[0], [3], [9], [9]])
    exact = rectification_weights(rectification_factors(sigmas, "exact"), steps, "exact")
    c = rectification_coefficients(sigmas)[steps]
    assert torch.allclose(exact.double(), c / c.mean(), atol=1e-6)
    assert exact.mean().item() == pytest.approx(1.0, abs=1e-6)  # the learning rate keeps its meaning
    assert torch.equal(rectification_weights(rectification_factors(sigmas, "none"), steps, "none"), torch.ones(4, 1))
    flow = rectification_weights(rectification_factors(sigmas, "flow_grpo"), steps, "flow_grpo")
    delta = sigmas[:-1] - sigmas[1:]
    assert torch.allclose(flow.double(), (noise_scales(sigmas) / delta.sqrt())[steps], atol=1e-5)
    with pytest.raises(ValueError, match="unknown rectify mode"):
        rectification_factors(sigmas, "partial")


def test_rectification_weights_average_one_in_each_optimizer_step():
    """SPEC 3: the mean is over the items of the current optimizer step, not over the iteration."""
    factors = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)  # c of steps 0..3
    # step 1 trains steps [0, 1, 1, 3]: c = [1, 2, 2, 8], mean 13/4 -> [4, 8, 8, 32] / 13
    first = rectification_weights(factors, torch.tensor([0, 1, 1, 3]), "exact")
    assert torch.allclose(first, torch.tensor([4.0, 8.0, 8.0, 32.0]) / 13)
    # step 2 trains steps [2, 2, 3]: c = [4, 4, 8], mean 16/3 -> [0.75, 0.75, 1.5]
    second = rectification_weights(factors, torch.tensor([2, 2, 3]), "exact")
    assert torch.allclose(second, torch.tensor([0.75, 0.75, 1.5]))
    assert first.mean().item() == pytest.approx(1.0) and second.mean().item() == pytest.approx(1.0)
    # one mean over the iteration's 7 items (29 / 7) would give step 1 a mean weight of 3.25 x 7 / 29 = 0.78
    assert rectification_weights(factors, torch.tensor([0, 1, 1, 3, 2, 2, 3]), "exact")[:4].mean().item() == \
        pytest.approx(3.25 * 7 / 29)
    assert torch.equal(rectification_weights(factors * 0 + 1, torch.tensor([2, 2, 3]), "none"), torch.ones(3))
    assert rectification_weights(factors, torch.tensor([], dtype=torch.long), "exact").numel() == 0


def test_step_weights_cover_the_items_the_step_trains():
    """engine/trainer.py: an optimizer step's weights over its trained items (zero-advantage ones
    skipped), laid out [S, T], zero for items of other steps."""
    from types import SimpleNamespace

    from flash_grpo_core.engine.trainer import step_weights

    factors = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    steps = torch.tensor([[0, 3], [1, 2], [3, 3]])  # [S=3, T=2]
    ctx = SimpleNamespace(batch=SimpleNamespace(steps=steps))
    # flat items 0 (step 0), 2 (step 1), 5 (step 3): c = [1, 2, 8], mean 11/3 -> [3, 6, 24] / 11
    weights = step_weights(ctx, torch.tensor([5, 0, 2]), factors, "exact")
    expected = torch.tensor([[3.0, 0.0], [6.0, 0.0], [0.0, 24.0]]) / 11
    assert torch.allclose(weights, expected) and weights.sum().item() == pytest.approx(3.0)
