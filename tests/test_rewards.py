"""Rewards: hand-worked values for the offline rewards, the checks, the registry, the weighted sum
and the scale guard. Videos are uint8 [B, F, H, W, 3]."""

import math
import sys

import numpy as np
import pytest
import torch

from flash_grpo_core.rewards import (
    Brightness,
    Reward,
    RewardError,
    RewardOutput,
    ScaleGuard,
    WeightedReward,
    aggregate_frames,
    available_rewards,
    build_reward,
    build_weighted_reward,
    check_videos,
    register,
    select_frames,
    validate_output,
)


def constant_video(rgb, batch=1, frames=3, size=8):
    """uint8 [batch, frames, size, size, 3] filled with one colour."""
    return torch.tensor(rgb, dtype=torch.uint8).expand(batch, frames, size, size, 3).clone()


def square_video(rgb, frames=2, size=16, side=8):
    """A side x side square of colour rgb at the centre of a black frame."""
    video = torch.zeros(1, frames, size, size, 3, dtype=torch.uint8)
    start = (size - side) // 2
    video[:, :, start : start + side, start : start + side] = torch.tensor(rgb, dtype=torch.uint8)
    return video


def random_video(shape, seed):
    return torch.randint(
        0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def checkerboard_video(size=8, frames=2):
    """1-pixel black/white checkerboard."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = ((rows + cols) % 2 * 255).to(torch.uint8)  # [H, W]
    return board[None, None, :, :, None].expand(1, frames, size, size, 3).clone()


# ------------------------------------------------------------------------------------------------
# Offline rewards


def test_brightness_is_bt601_luminance_of_a_constant_colour():
    # Y = 0.299 * 200 + 0.587 * 100 + 0.114 * 50 = 59.8 + 58.7 + 5.7 = 124.2 -> 124.2 / 255
    # second video: white (Y = 255) in 1 frame of 2, black in the other -> 0.5
    two_tone = torch.zeros(1, 2, 8, 8, 3, dtype=torch.uint8)
    two_tone[:, 0] = 255
    videos = torch.cat([constant_video((200, 100, 50), frames=2), two_tone])
    out = build_reward("brightness")(videos, ["a", "b"])
    assert out.scores.dtype == torch.float32
    torch.testing.assert_close(out.scores, torch.tensor([124.2 / 255, 0.5]))


def test_colorfulness_zero_for_grey_and_hand_worked_for_pure_red():
    # pure red: rg = 255 - 0 = 255, yb = (255 + 0) / 2 - 0 = 127.5, both constant so std = 0;
    # M = 0.3 * sqrt(255^2 + 127.5^2) = 0.3 * sqrt(81281.25) = 0.3 * 285.0987 = 85.5296 -> / 100
    videos = torch.cat([constant_video((128, 128, 128)), constant_video((255, 0, 0))])
    out = build_reward("colorfulness")(videos, ["grey", "red"])
    torch.testing.assert_close(out.scores, torch.tensor([0.0, 0.855296]), atol=1e-5, rtol=0)
    raw = out.info["colorfulness_raw"]
    torch.testing.assert_close(raw[1], torch.tensor(85.5296), atol=1e-3, rtol=0)


def test_colorfulness_matches_a_per_frame_numpy_loop():
    videos = random_video((2, 3, 6, 5, 3), seed=1)
    expected = []
    for video in videos.numpy().astype(np.float64):
        per_frame = []
        for frame in video:
            rg = frame[..., 0] - frame[..., 1]
            yb = 0.5 * (frame[..., 0] + frame[..., 1]) - frame[..., 2]
            spread = math.sqrt(rg.std() ** 2 + yb.std() ** 2)
            offset = math.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
            per_frame.append(spread + 0.3 * offset)
        expected.append(sum(per_frame) / len(per_frame) / 100)
    out = build_reward("colorfulness")(videos, ["x", "y"])
    torch.testing.assert_close(out.scores, torch.tensor(expected, dtype=torch.float32))
    assert (out.scores > 0).all()


def test_sharpness_flat_is_zero_and_checkerboard_is_one():
    # flat: Laplacian 0 everywhere -> var 0 -> log1p(0) = 0.
    # 1-px checkerboard: each interior pixel differs from its 4 neighbours by 255, so the Laplacian
    # is +-4 * 255 = +-1020, half each on the 6x6 interior -> var = 1020^2, the maximum -> 1.0
    videos = torch.cat([constant_video((90, 90, 90), frames=2), checkerboard_video()])
    out = build_reward("sharpness")(videos, ["flat", "board"])
    torch.testing.assert_close(out.scores, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out.info["laplacian_var"][1], torch.tensor(1020.0**2))


def test_sharpness_laplacian_variance_matches_a_slow_loop():
    video = random_video((1, 1, 6, 7, 3), seed=2)
    rgb = video[0, 0].double()
    grey = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    values = [
        grey[i - 1, j] + grey[i + 1, j] + grey[i, j - 1] + grey[i, j + 1] - 4 * grey[i, j]
        for i in range(1, 5)
        for j in range(1, 6)
    ]
    expected = float(np.var(np.array(values)))
    out = build_reward("sharpness")(video, ["x"])
    assert out.info["laplacian_var"].item() == pytest.approx(expected, rel=1e-4)
    assert out.scores.item() == pytest.approx(
        math.log1p(expected) / math.log1p(1020.0**2), rel=1e-4
    )


def test_temporal_consistency_static_alternating_and_partial():
    static = constant_video((10, 200, 30), frames=4)
    alternating = torch.zeros(1, 4, 8, 8, 3, dtype=torch.uint8)
    alternating[:, 1::2] = 255  # black, white, black, white: every |difference| is 1
    # frames 0, 51, 51, 51: |differences| 51 / 255 = 0.2, then 0, 0 -> mean 0.2 / 3 -> 1 - 0.0667
    step = torch.full((1, 4, 8, 8, 3), 51, dtype=torch.uint8)
    step[:, 0] = 0
    reward = build_reward("temporal_consistency")
    out = reward(torch.cat([static, alternating, step]), ["a"] * 3)
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.0, 1.0 - 0.2 / 3]))
    # two frames 0 then 51 -> 1 - 0.2 = 0.8
    torch.testing.assert_close(reward(step[:, :2], ["s"]).scores, torch.tensor([0.8]))
    assert reward(alternating[:, :1], ["one frame"]).scores.item() == 1.0


def textured_video(shift_per_frame, frames=4, size=64):
    """A smooth random texture translated by shift_per_frame pixels per frame (no wrap-around)."""
    noise = torch.rand(1, 1, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    texture = torch.nn.functional.interpolate(noise, size=(size + 16, size + 16), mode="bicubic")
    texture = (texture[0, 0].clamp(0, 1) * 255).round().to(torch.uint8)  # [size + 16, size + 16]
    crops = [
        texture[4 : 4 + size, shift_per_frame * t : shift_per_frame * t + size]
        for t in range(frames)
    ]
    return torch.stack(crops)[None, :, :, :, None].expand(1, frames, size, size, 3).clone()


def test_motion_magnitude_of_a_2px_shift_and_a_static_video():
    pytest.importorskip("cv2")
    reward = build_reward("motion_magnitude")
    out = reward(torch.cat([textured_video(2), textured_video(0)]), ["moving", "static"])
    # every pixel moves 2 px per frame; Farneback measures about 1.97 on this texture
    assert out.scores[0].item() == pytest.approx(2.0, abs=0.15)
    assert out.scores[1].item() == pytest.approx(0.0, abs=0.01)
    assert reward(textured_video(2)[:, :1], ["one frame"]).scores.item() == 0.0
    # frames two apart move 4 px
    strided = build_reward("motion_magnitude", frame_stride=2)(textured_video(2, frames=5), ["x"])
    assert strided.scores.item() == pytest.approx(4.0, abs=0.3)


def test_motion_magnitude_without_opencv_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    with pytest.raises(ImportError, match="opencv-python-headless"):
        build_reward("motion_magnitude")


def test_color_match_prefers_the_prompted_colour():
    reward = build_reward("color_match")
    videos = torch.cat([square_video((255, 0, 0)), square_video((0, 0, 255))])
    out = reward(videos, ["a red square", "a red square"])
    # red square: the top 10% most saturated pixels are pure red -> distance 0 -> 1.0
    # blue square: |(0,0,1) - (1,0,0)| / sqrt(3) = sqrt(2 / 3) = 0.8165 -> 0.1835
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 1.0 - math.sqrt(2 / 3)]))
    assert out.scores[0] > out.scores[1]
    torch.testing.assert_close(out.info["observed_rgb"][1], torch.tensor([0.0, 0.0, 1.0]))


def test_color_match_without_colour_word_scores_zero_and_white_uses_the_mean():
    reward = build_reward("color_match")
    # white square (64 of 256 pixels) on black: the whole-video mean is 0.25 in each channel,
    # |(0.25,)*3 - (1,)*3| / sqrt(3) = 0.75 -> 0.25; "a cat" has no colour word -> 0
    videos = torch.cat([square_video((255, 255, 255)), square_video((255, 0, 0))])
    out = reward(videos, ["A WHITE cube", "a cat"])
    torch.testing.assert_close(out.scores, torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(out.info["matched"], torch.tensor([1.0, 0.0]))


def test_frame_stride_drops_frames_before_scoring():
    videos = torch.zeros(1, 5, 4, 4, 3, dtype=torch.uint8)
    videos[:, 1::2] = 255  # frames 1 and 3 white; stride 2 keeps frames 0, 2, 4 (all black)
    assert select_frames(videos, 2).shape == (1, 3, 4, 4, 3)
    assert Brightness(frame_stride=2)(videos, ["x"]).scores.item() == 0.0
    assert Brightness()(videos, ["x"]).scores.item() == pytest.approx(2 / 5)
    with pytest.raises(RewardError, match="positive integer"):
        select_frames(videos, 0)


# ------------------------------------------------------------------------------------------------
# Frame aggregation and checks


def test_aggregate_frames_hand_worked():
    scores = torch.tensor(
        [
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0],
            [0.5, 9.0, 0.0, 3.0, 8.0, 1.0, 7.0, 2.0, 4.0, 6.0],
        ]
    )  # [B=2, F=10]
    # mean: 55 / 10 = 5.5 and 40.5 / 10 = 4.05
    torch.testing.assert_close(aggregate_frames(scores, "mean"), torch.tensor([5.5, 4.05]))
    torch.testing.assert_close(aggregate_frames(scores, "min"), torch.tensor([1.0, 0.0]))
    # top 30% of 10 frames = 3 frames: (10 + 9 + 8) / 3 = 9 and (9 + 8 + 7) / 3 = 8
    torch.testing.assert_close(aggregate_frames(scores, "top_mean", 0.3), torch.tensor([9.0, 8.0]))
    # top 25% -> int(2.5) = 2 frames: (10 + 9) / 2 = 9.5 and (9 + 8) / 2 = 8.5; top 10% -> 1 frame = max
    torch.testing.assert_close(aggregate_frames(scores, "top_mean", 0.25), torch.tensor([9.5, 8.5]))
    torch.testing.assert_close(aggregate_frames(scores, "top_mean", 0.1), torch.tensor([10.0, 9.0]))
    # 100 * 0.07 is 7.000000000000001 in floats: int gives 7 frames, 93..99 -> mean 96 (a ceil would take 8)
    hundred = torch.arange(100.0)[None]  # [B=1, F=100]
    torch.testing.assert_close(aggregate_frames(hundred, "top_mean", 0.07), torch.tensor([96.0]))
    torch.testing.assert_close(aggregate_frames(scores[:, :3], "top_mean", 0.3), scores[:, :3].max(dim=1).values)


def test_top_30_percent_of_81_frames_is_the_authors_24():
    # Wan 2.1's 81 frames: the authors take int(81 * 0.3) = int(24.3) = 24 frames (a ceil would take 25).
    # Frame scores 0..80: the top 24 are 57..80, mean (57 + 80) / 2 = 68.5 (25 frames: 56..80, mean 68)
    scores = torch.arange(81.0)[None]  # [B=1, F=81]
    torch.testing.assert_close(aggregate_frames(scores, "top_mean", 0.3), torch.tensor([68.5]))
    with pytest.raises(RewardError, match="median"):
        aggregate_frames(scores, "median")
    with pytest.raises(RewardError, match=r"\[B, F\]"):
        aggregate_frames(scores[0], "mean")


def test_validate_output_rejects_non_finite_scores_with_their_indices():
    scores = torch.tensor([float("inf"), 1.0, float("nan"), 0.0])
    with pytest.raises(RewardError, match=r"'hps'.*2 non-finite.*1 NaN, 1 inf.*\[0, 2\]"):
        validate_output("hps", RewardOutput(scores=scores), 4)


def test_validate_output_rejects_wrong_shape_and_casts_to_float32():
    with pytest.raises(RewardError, match=r"'hps'.*shape \(4, 1\), expected \(4,\)"):
        validate_output("hps", RewardOutput(scores=torch.zeros(4, 1)), 4)
    with pytest.raises(RewardError, match=r"shape \(3,\), expected \(4,\)"):
        validate_output("hps", RewardOutput(scores=torch.zeros(3)), 4)
    out = validate_output("hps", RewardOutput(scores=torch.ones(4, dtype=torch.float64)), 4)
    assert out.scores.dtype == torch.float32


def test_check_videos_rejects_bad_input():
    good = torch.zeros(2, 3, 4, 4, 3, dtype=torch.uint8)
    check_videos(good, ["a", "b"])
    with pytest.raises(RewardError, match="dtype"):
        check_videos(good.float())
    with pytest.raises(RewardError, match="shape"):
        check_videos(good[0])
    with pytest.raises(RewardError, match="shape"):
        check_videos(torch.zeros(2, 3, 4, 4, 4, dtype=torch.uint8))
    with pytest.raises(RewardError, match="2 videos but 1 prompts"):
        build_reward("brightness")(good, ["only one"])


# ------------------------------------------------------------------------------------------------
# Registry and weighted sum


def test_registry_lists_available_rewards_on_unknown_name():
    names = available_rewards()
    offline = {"brightness", "colorfulness", "sharpness", "temporal_consistency"}
    assert offline | {"motion_magnitude", "color_match"} <= set(names)
    with pytest.raises(KeyError, match="unknown reward 'hpsv9'.*brightness.*color_match"):
        build_reward("hpsv9")
    with pytest.raises(ValueError, match="already registered"):
        register("brightness")(lambda: None)
    assert isinstance(build_reward("brightness"), Reward)


class StubReward:
    """Returns fixed scores, or raises."""

    def __init__(self, scores=None, error=None):
        self.name, self.scores, self.error = "stub", scores, error

    def __call__(self, videos, prompts, metadata=None):
        if self.error:
            raise self.error
        return RewardOutput(scores=self.scores, info={"extra": self.scores * 0})


def test_weighted_reward_sums_with_weights_and_keeps_components():
    videos = constant_video((51, 51, 51), batch=2, frames=2)
    reward = build_weighted_reward(
        {"brightness": 2.0, "temporal_consistency": 0.5, "colorfulness": 0.0},
        {"brightness": {"frame_stride": 2}},
    )
    out = reward(videos, ["a", "b"])
    # grey 51: brightness 51 / 255 = 0.2, temporal 1.0 (static), colorfulness 0 (grey)
    # -> 2 * 0.2 + 0.5 * 1.0 + 0 * 0 = 0.9
    torch.testing.assert_close(out.scores, torch.tensor([0.9, 0.9]))
    torch.testing.assert_close(out.info["brightness"], torch.tensor([0.2, 0.2]))
    torch.testing.assert_close(out.info["temporal_consistency"], torch.tensor([1.0, 1.0]))
    assert "colorfulness/colorfulness_raw" in out.info
    assert reward.components["brightness"].frame_stride == 2


def test_weighted_reward_names_the_failing_component():
    videos = constant_video((0, 0, 0), batch=2)
    nan_reward = WeightedReward(
        {"brightness": 1.0, "stub": 1.0},
        components={"stub": StubReward(torch.tensor([0.0, float("nan")]))},
    )
    with pytest.raises(RewardError, match=r"'stub'.*NaN.*\[1\]"):
        nan_reward(videos, ["a", "b"])
    broken = StubReward(error=RuntimeError("weights missing"))
    raising = WeightedReward({"stub": 1.0}, components={"stub": broken})
    with pytest.raises(RewardError, match="'stub' failed: weights missing"):
        raising(videos, ["a", "b"])
    with pytest.raises(ValueError, match="without a weight"):
        build_weighted_reward({"brightness": 1.0}, {"sharpness": {}})
    with pytest.raises(KeyError, match="available"):
        build_weighted_reward({"nope": 1.0})


# ------------------------------------------------------------------------------------------------
# Scale guard


def noisy_batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [0.5 + 0.01 * torch.randn(8, generator=generator) for _ in range(count)]


def test_scale_guard_passes_noise_and_raises_on_a_wild_jump():
    guard = ScaleGuard("hps", max_sigma=20.0, min_history=5)
    for batch in noisy_batches(30):
        guard.check(batch)  # batch means within a few std of 0.5: never 20 std away
    with pytest.raises(RewardError, match=r"'hps'.*std from its history"):
        guard.check(torch.full((8,), 50.0))  # a reward now on a 100x scale
    assert len(guard.history) == 30  # the rejected batch was not recorded


def test_scale_guard_waits_for_history_and_floors_the_std():
    guard = ScaleGuard("r", min_history=5, std_floor=1e-2)
    for _ in range(4):
        guard.check(torch.zeros(4))
    guard.check(torch.full((4,), 100.0))  # only 4 batches of history: no check yet
    # five constant batches: std 0 is floored to 0.01, so a move of 0.1 is 10 std (passes)
    # and a move of 0.3 is 30 std (raises)
    for jump, raises in ((0.1, False), (0.3, True)):
        constant = ScaleGuard("r", min_history=5, std_floor=1e-2)
        for _ in range(5):
            constant.check(torch.zeros(4))
        if raises:
            with pytest.raises(RewardError, match="30.0 std"):
                constant.check(torch.full((4,), jump))
        else:
            assert constant.check(torch.full((4,), jump)) == pytest.approx(jump)


def test_scale_guard_state_roundtrips():
    guard = ScaleGuard("hps")
    for batch in noisy_batches(10, seed=3):
        guard.check(batch)
    restored = ScaleGuard("hps")
    restored.load_state_dict(guard.state_dict())
    assert restored.history == guard.history
    assert restored.state_dict() == guard.state_dict()
    with pytest.raises(RewardError):
        restored.check(torch.full((8,), 5.0))
    weighted = WeightedReward({"brightness": 1.0}, scale_guard=True)
    for _ in range(3):
        weighted(constant_video((51, 51, 51)), ["x"])
    again = WeightedReward({"brightness": 1.0}, scale_guard=True)
    again.load_state_dict(weighted.state_dict())
    assert again.guards["brightness"].history == pytest.approx([0.2, 0.2, 0.2])
