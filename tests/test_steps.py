import torch

from flash_grpo_core.method.steps import (
    full_steps,
    iso_temporal_steps,
    mixgrpo_window,
    sde_mask,
    stochastic_steps,
    window_start,
    window_steps,
)


def test_iso_temporal_group_shares_its_step():
    steps = iso_temporal_steps(64, 8, 10, torch.Generator().manual_seed(0))
    assert steps.shape == (64, 8, 1)
    assert torch.all(steps == steps[:, :1])  # every sample of a prompt has the prompt's k
    assert len(steps[:, 0].unique()) > 3  # prompts differ
    assert steps.min() >= 0 and steps.max() < 10


def test_same_seed_gives_the_same_steps():
    # that every rank then plans the same steps is checked in two real processes:
    # tests/test_distributed.py::test_every_rank_plans_the_same_steps
    a = iso_temporal_steps(16, 4, 10, torch.Generator().manual_seed(7))
    b = iso_temporal_steps(16, 4, 10, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_per_sample_ablation_varies_within_groups():
    steps = iso_temporal_steps(32, 8, 10, torch.Generator().manual_seed(0), iso_temporal=False)
    assert any(len(group.unique()) > 1 for group in steps[:, :, 0])


def test_full_mode_trains_the_same_steps_for_all_prompts():
    steps = full_steps(3, 4, 20, timestep_fraction=0.5)
    assert steps.shape == (3, 4, 10)
    assert torch.all(steps == torch.arange(10))


def test_full_mode_truncates_the_trained_fraction_as_flow_grpo():
    # Flow-GRPO: num_train_timesteps = int(num_steps * timestep_fraction); int(19.8) = 19 (round gives 20)
    assert full_steps(1, 2, 20, timestep_fraction=0.99).shape == (1, 2, 19)
    assert full_steps(1, 1, 10, timestep_fraction=0.25).shape == (1, 1, 2)  # int(2.5) = 2 (round: 2, ceil: 3)
    assert full_steps(1, 1, 20, timestep_fraction=0.6).shape == (1, 1, 12)


def test_full_mode_is_stochastic_at_every_step_but_trains_only_its_fraction():
    trained = full_steps(2, 3, 10, timestep_fraction=0.5)  # [B=2, G=3, T=5]
    sde = stochastic_steps(trained, 10, every_step=True)
    assert sde.shape == (2, 3, 10) and sde.all()  # the SDE at all 10 steps, not only at the 5 trained
    # other modes: stochastic exactly at the trained steps
    flash = torch.tensor([[[2], [2]], [[5], [5]]])
    assert torch.equal(stochastic_steps(flash, 8).reshape(4, 8), sde_mask(flash, 8))


def test_mixgrpo_window_schedule_slides_every_25_iterations_and_rolls_back():
    # MixGRPO's scripts: sampling_steps 25, group_size W 4, iters_per_group 25, prog_overlap_step 1, roll_back;
    # the start visits 0..N-2 = 23 and the window is clipped to step 23 (N - 2)
    assert mixgrpo_window(0, 25, 4, 1, 25) == [0, 1, 2, 3]
    assert mixgrpo_window(24, 25, 4, 1, 25) == [0, 1, 2, 3]  # 25 iterations at each position
    assert mixgrpo_window(25, 25, 4, 1, 25) == [1, 2, 3, 4]
    assert mixgrpo_window(20 * 25, 25, 4, 1, 25) == [20, 21, 22, 23]
    assert mixgrpo_window(21 * 25, 25, 4, 1, 25) == [21, 22, 23]  # shrinks at the end of 0..N-2
    assert mixgrpo_window(23 * 25, 25, 4, 1, 25) == [23]
    assert mixgrpo_window(24 * 25, 25, 4, 1, 25) == [0, 1, 2, 3]  # rolled back
    # stride 3 over 0..8 (N = 10): starts 0, 3, 6, then 9 > 8 rolls back to 0
    assert [mixgrpo_window(it, 10, 2, 3, 1)[0] for it in range(5)] == [0, 3, 6, 0, 3]


def test_window_k_moves_and_stays_inside_the_candidates():
    starts = [window_start(it, num_candidates=10, window_size=3, stride=2, every=1) for it in range(6)]
    assert starts == [0, 2, 4, 6, 0, 2]  # 8 positions 0..7 (K - W + 1), stride 2: 8 wraps to 0
    assert [window_start(it, 10, 3, 1, every=2) for it in range(4)] == [0, 0, 1, 1]
    steps = window_steps(2, 3, start=4, window_size=3)
    assert torch.all(steps == torch.tensor([4, 5, 6]))


def test_sde_mask_marks_exactly_the_trained_steps():
    steps = torch.tensor([[[2], [2]], [[5], [5]]])  # B=2, G=2, T=1
    mask = sde_mask(steps, 8)
    assert mask.shape == (4, 8) and mask.sum() == 4
    assert mask[0, 2] and mask[3, 5] and not mask[0, 5]


def test_iteration_prompts_cover_each_prompt_once_per_epoch():
    from flash_grpo_core.engine.iteration import iteration_prompts

    items = list(range(10))
    chosen = [iteration_prompts(items, 4, it, seed=0) for it in range(5)]  # 20 draws = 2 epochs
    flat = [x for batch in chosen for x in batch]
    assert sorted(flat[:10]) == items and sorted(flat[10:]) == items
    assert chosen[1] == iteration_prompts(items, 4, 1, seed=0)  # depends only on (seed, iteration, items)
    assert chosen[1] != iteration_prompts(items, 4, 1, seed=1)
