"""The EMA of the trainable weights: the authors' warm-up schedule, and resuming it from a checkpoint."""

from fractions import Fraction

import pytest
import torch

from flash_grpo_core.artifacts.checkpoint import load_checkpoint, save_checkpoint
from flash_grpo_core.engine.ema import EMA, folds, unfolded_warning
from flash_grpo_core.engine.trainer import Policy


def _base_share(decay: float, every: int, steps: int) -> float:
    """The share of the base weights left in the EMA after `steps` optimizer steps.

    The weight starts at 1 (the base) and is 0 after every optimizer step, so the average is the
    product of the decays applied: the base's share.
    """
    weight = torch.nn.Parameter(torch.ones(3))
    ema = EMA({"w": weight}, decay=decay, every=every)
    for _ in range(steps):
        with torch.no_grad():
            weight.zero_()
        ema.step()
    return ema.shadow["w"][0].item()


def test_base_share_after_64_steps_is_the_authors_9_percent():
    # Decay 0.9 every 8 steps: updates after steps s = 7, 15, ..., 63 ((s + 1) % 8 == 0), each with
    # min((1 + s) / (10 + s), 0.9); none reaches the cap, so the share is
    # 8/17 * 16/25 * 24/33 * 32/41 * 40/49 * 48/57 * 56/65 * 64/73 = 0.0888 (a constant 0.9: 0.9^8 = 0.430).
    by_hand = Fraction(8, 17) * Fraction(16, 25) * Fraction(24, 33) * Fraction(32, 41) * Fraction(40, 49) \
        * Fraction(48, 57) * Fraction(56, 65) * Fraction(64, 73)
    assert float(by_hand) == pytest.approx(0.0888, abs=1e-4)
    assert _base_share(0.9, 8, 64) == pytest.approx(float(by_hand), rel=1e-5)


def test_warm_up_every_step_and_the_cap():
    # every = 1: s = 1, 2, 3 give 2/11, 3/12, 4/13; product 24 / 1716 = 0.013986
    assert _base_share(0.9, 1, 3) == pytest.approx(24 / 1716, rel=1e-5)
    # decay 0.6: (1 + s) / (10 + s) >= 0.6 from s = 13, so s = 1..14 give 2/11 ... 13/22, then 0.6, 0.6
    by_hand = 1.0
    for s in range(1, 13):
        by_hand *= (1 + s) / (10 + s)
    assert _base_share(0.6, 1, 14) == pytest.approx(by_hand * 0.6 * 0.6, rel=1e-5)


def test_updates_fall_when_step_plus_one_is_a_multiple_of_every():
    ema = EMA({"w": torch.nn.Parameter(torch.zeros(1))}, decay=0.9, every=8)
    applied = [s for s in range(1, 33) if ema.step()]
    assert applied == [7, 15, 23, 31]
    assert [ema.current_decay(s) for s in (1, 7, 80, 1000)] == [2 / 11, 8 / 17, 0.9, 0.9]


def _policy(seed: int) -> Policy:
    """Weights, AdamW and an EMA with every = 4: what a checkpoint holds (artifacts/checkpoint.py)."""
    generator = torch.Generator().manual_seed(seed)
    parameters = {"a": torch.nn.Parameter(torch.randn(4, 3, generator=generator)),
                  "b": torch.nn.Parameter(torch.randn(5, generator=generator))}
    optimizer = torch.optim.AdamW(list(parameters.values()), lr=0.1, weight_decay=1e-4)
    return Policy(torch.nn.Module(), parameters, optimizer, EMA(parameters, decay=0.9, every=4))


def _train(policy: Policy, first: int, last: int) -> None:
    """Optimizer steps first..last-1, each with a gradient that depends only on the step."""
    for step in range(first, last):
        for offset, param in enumerate(policy.parameters.values()):
            param.grad = torch.sin(torch.arange(param.numel(), dtype=torch.float32) + step + offset).view_as(param)
        policy.optimizer.step()
        policy.ema.step()


@pytest.mark.parametrize("stop", [3, 9])
def test_resuming_from_a_checkpoint_continues_the_warm_up_exactly(tmp_path, stop):
    steps = 20
    straight = _policy(seed=0)
    _train(straight, 0, steps)

    first = _policy(seed=0)
    _train(first, 0, stop)
    save_checkpoint(first, tmp_path / "checkpoint", {"iteration": 1})
    resumed = _policy(seed=1)  # other weights: the checkpoint must restore them all
    load_checkpoint(resumed, tmp_path / "checkpoint")
    assert resumed.ema.steps == stop
    _train(resumed, stop, steps)

    assert resumed.ema.steps == straight.ema.steps == steps
    for name in straight.parameters:
        assert torch.equal(resumed.parameters[name], straight.parameters[name]), name
        assert torch.equal(resumed.ema.shadow[name], straight.ema.shadow[name]), name


@pytest.mark.parametrize("every", [1, 2, 8])
def test_folds_counts_what_the_ema_folded_in(every):
    ema = EMA({"w": torch.nn.Parameter(torch.zeros(2))}, decay=0.9, every=every)
    folded = 0
    for steps in range(1, 20):
        folded += ema.step()
        assert folds(steps, every) == folded, (steps, every)
    assert folds(0, every) == 0


def test_a_trained_checkpoint_whose_ema_never_folded_is_named():
    # the authors' cadence: every 8, two optimizer steps an iteration; the first fold is after step 7
    warning = unfolded_warning(steps=6, every=8, iteration=3, key="export.use_ema")
    assert "iteration 3 was never folded in" in warning and "after step 7" in warning
    assert "export.use_ema: false" in warning
    assert unfolded_warning(steps=8, every=8, iteration=4, key="eval.use_ema") is None
    assert unfolded_warning(steps=0, every=8, iteration=0, key="eval.use_ema") is None  # the base is the base
    assert unfolded_warning(steps=1, every=1, iteration=1, key="eval.use_ema") is None
