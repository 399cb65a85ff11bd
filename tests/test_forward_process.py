"""The forward-process losses of the `nft` and `awm` modes against hand computations on one item."""

import pytest
import torch

from flash_grpo_core.method.forward_process import (
    awm_log_prob,
    nft_terms,
    noised,
    optimality,
    velocity_distance,
)

X0 = torch.tensor([[1.0, -1.0]])  # one item [M = 1, 2]
NOISE = torch.tensor([[0.5, 0.5]])
T = torch.tensor([0.5])
V = torch.tensor([[0.2, -0.4]])


def test_noising_follows_the_rectified_flow_path():
    assert noised(X0, NOISE, T).tolist() == [[0.75, -0.25]]
    assert noised(X0, NOISE, torch.tensor([0.0])).tolist() == X0.tolist()  # t = 0: the clean sample
    assert noised(X0, NOISE, torch.tensor([1.0])).tolist() == NOISE.tolist()  # t = 1: pure noise


def test_optimality_maps_the_clipped_advantage_to_zero_one():
    r = optimality(torch.tensor([-9.0, -5.0, 0.0, 1.0, 5.0, 9.0]), adv_clip=5.0)
    assert r.tolist() == pytest.approx([0.0, 0.0, 0.5, 0.6, 1.0, 1.0])


def test_nft_loss_equals_the_hand_computation():
    # v+ = v (b = 1, v_old = 0): x0+ = x_t - t v+ = [0.65, -0.05], error [-0.35, 0.95]:
    #   mse 0.5125 / mae 0.65; v- = 2 v_old - v: x0- = [0.85, -0.45], error [-0.15, 0.55]: 0.1625 / 0.35;
    # r = 0.6 (A = 1, c = 5): 5 * (0.6 * 0.5125 / 0.65 + 0.4 * 0.1625 / 0.35) / 1
    x_t = noised(X0, NOISE, T)
    terms = nft_terms(V, torch.zeros_like(V), X0, x_t, T, torch.tensor([1.0]), beta=1.0, adv_clip=5.0)
    assert terms.tolist() == pytest.approx([5 * (0.6 * 0.5125 / 0.65 + 0.4 * 0.1625 / 0.35)], rel=1e-6)
    # b = 0.5 with v_old = v: both implicit policies are v itself, the advantage no longer matters
    same = nft_terms(V, V, X0, x_t, T, torch.tensor([3.0]), beta=0.5, adv_clip=5.0)
    assert same.tolist() == pytest.approx([5 * (0.5125 / 0.65) / 0.5], rel=1e-6)


def test_nft_pulls_towards_the_target_for_a_good_sample_and_away_for_a_bad_one():
    target = NOISE - X0  # the path's velocity
    x_t = noised(X0, NOISE, T)
    for advantage, sign in ((5.0, 1.0), (-5.0, -1.0)):
        v = V.clone().requires_grad_(True)
        nft_terms(v, V, X0, x_t, T, torch.tensor([advantage]), beta=1.0, adv_clip=5.0).sum().backward()
        descent = -v.grad  # the direction a gradient step moves v
        assert sign * float((descent * (target - V)).sum()) > 0, advantage


def test_awm_log_prob_is_the_negative_flow_matching_error():
    # e - x0 = [-0.5, 1.5]; (v - target)^2 = [0.49, 3.61], mean 2.05
    assert awm_log_prob(V, NOISE, X0, T).tolist() == pytest.approx([-2.05])
    assert awm_log_prob(V, NOISE, X0, T, "t").tolist() == pytest.approx([-1.025])
    assert awm_log_prob(V, NOISE, X0, T, "t**2").tolist() == pytest.approx([-0.5125])
    with pytest.raises(ValueError, match="AWM weighting must be one of"):
        awm_log_prob(V, NOISE, X0, T, "huber")


def test_velocity_distance_is_the_mean_squared_difference():
    assert velocity_distance(V, torch.zeros_like(V)).tolist() == pytest.approx([(0.04 + 0.16) / 2])
