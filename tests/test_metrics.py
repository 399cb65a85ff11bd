"""Evaluation metrics: hand-worked values for the weight-free dimensions, tiny random models for the rest."""

import sys

import numpy as np
import pytest
import torch

from flash_grpo_core import metrics
from flash_grpo_core.metrics import features, video


def textured_square(frames=9, size=64, side=20, step=3, jitter=False, seed=0):
    """uint8 [F, size, size, 3]: a random-texture square on grey, moving `step` px right per frame
    (or to a random place each frame when jitter)."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = np.full((frames, size, size, 3), 40, dtype=np.uint8)
    for index in range(frames):
        if jitter:
            x, y = (int(v) for v in rng.integers(0, size - side, 2))
        else:
            x, y = 2 + index * step, size // 4
        out[index, y: y + side, x: x + side] = texture
    return out


def static(frames=9, size=32, seed=1):
    frame = np.random.default_rng(seed).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    return np.repeat(frame, frames, axis=0)


# ---------------------------------------------------------------------------------------------
# Weight-free dimensions


def test_static_video_is_perfectly_steady_and_not_dynamic():
    videos = static()[None]  # [1, 9, 32, 32, 3]
    assert video.temporal_flickering(videos) == [1.0]
    assert video.motion_smoothness_flow(videos) == [1.0]
    assert video.dynamic_degree_flow(videos, fps=8) == [False]


def test_temporal_flickering_hand_worked():
    # black / white alternating: every |diff| is 255 -> (255 - 255) / 255 = 0
    flashing = np.zeros((1, 4, 8, 8, 3), dtype=np.uint8)
    flashing[0, 1::2] = 255
    # 0 / 51 alternating: mean |diff| = 51 -> (255 - 51) / 255 = 0.8
    dim = np.zeros((1, 5, 8, 8, 3), dtype=np.uint8)
    dim[0, 1::2] = 51
    # one pair differs by 30 in one channel of all pixels, the other pair not at all:
    # mean over pairs of (30 / 3, 0) = 5 -> 250 / 255
    step = np.zeros((1, 3, 4, 4, 3), dtype=np.uint8)
    step[0, 1:, :, :, 0] = 30
    assert video.temporal_flickering(flashing) == [0.0]
    assert video.temporal_flickering(dim) == pytest.approx([0.8])
    assert video.temporal_flickering(step) == pytest.approx([250 / 255])


def test_motion_smoothness_prefers_linear_motion_over_jitter():
    linear, jittery = textured_square(step=3), textured_square(jitter=True)
    smooth, rough = video.motion_smoothness_flow(np.stack([linear, jittery]))
    assert smooth > 0.99  # the flow interpolator re-creates linear motion almost exactly
    assert rough < smooth - 0.03
    with pytest.raises(ValueError, match="at least 3 frames"):
        video.motion_smoothness_flow(np.zeros((1, 2, 8, 8, 3), dtype=np.uint8))


def test_dynamic_degree_thresholds_follow_vbench():
    # VBench's set_params (vbench/dynamic_degree.py): thres = 6 * min(H, W) / 256, count = round(4 * frames / 16)
    assert video.dynamic_thresholds(16, 256, 256) == (6.0, 4)
    assert video.dynamic_thresholds(41, 480, 832) == (6 * 480 / 256, 10)  # 81 frames at 16 fps -> 41 kept
    assert video.dynamic_thresholds(8, 64, 64) == (6 * 64 / 256, 2)
    assert video.dynamic_thresholds(2, 64, 64)[1] == 1  # VBench's 0 floored at 1


def test_dynamic_degree_on_moving_square():
    # at 64 px the threshold is 6 * 64 / 256 = 1.5 px per kept pair
    fast, slow = textured_square(step=3), textured_square(step=1)
    assert video.dynamic_degree_flow(np.stack([fast, slow]), fps=8) == [True, False]
    # at 16 fps every 2nd frame is kept: 1 px/frame becomes 2 px per pair > 1.5
    assert video.dynamic_degree_flow(slow[None], fps=16) == [True]


def test_dynamic_degree_has_no_frame_rate_factor():
    # Below 8 fps every frame is kept (interval max(1, round(4 / 8)) = 1): 2 px per pair against VBench's
    # 1.5 px threshold is dynamic; a max(1, 8 / fps) = 2 factor would have raised it to 3 px (static).
    moving = textured_square(step=2)
    assert video.dynamic_degree_flow(moving[None], fps=4) == [True]


def test_dynamic_degree_is_named_apart_from_vbench():
    # Farneback, not RAFT: the registry must not offer it under VBench's name
    assert "dynamic_degree" not in metrics.available_metrics()
    assert "dynamic_degree_flow" in metrics.available_metrics()


def test_videos_must_be_uint8_bfhw3():
    with pytest.raises(ValueError, match="uint8 videos"):
        video.temporal_flickering(np.zeros((1, 3, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8 videos"):
        video.temporal_flickering(np.zeros((3, 8, 8, 3), dtype=np.uint8))


def test_consistency_formula_hand_worked():
    # i=1: cos(f1, f0) = 1 to both -> 1; i=2: f2 is orthogonal to f1 and f0 -> 0; mean 0.5
    assert features.consistency(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])) == pytest.approx(0.5)
    # an opposite frame clamps to 0, not -1
    assert features.consistency(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == 0.0
    assert features.consistency(torch.ones(1, 4)) == 1.0


# ---------------------------------------------------------------------------------------------
# Registry


def test_evaluate_videos_without_weights_reports_not_configured():
    videos = torch.from_numpy(np.stack([textured_square(size=32, side=10, step=2), static()]))
    results = metrics.evaluate_videos(videos, ["a", "b"])
    for name in ("temporal_flickering", "motion_smoothness_flow", "dynamic_degree_flow"):
        assert results[name]["status"] == "ok"
        assert len(results[name]["per_video"]) == 2
        assert results[name]["mean"] == pytest.approx(np.mean(results[name]["per_video"]))
    assert results["dynamic_degree_flow"]["per_video"] == [True, False]
    assert results["dynamic_degree_flow"]["mean"] == 0.5
    for name in ("subject_consistency", "background_consistency", "imaging_quality"):
        assert set(results[name]) == {"status", "reason"} and results[name]["status"] == "not configured"
        assert f"eval.metrics.{name}.path" in results[name]["reason"]
    reason = results["aesthetic_quality"]["reason"]
    assert "eval.metrics.aesthetic_quality.path and eval.metrics.aesthetic_quality.head_path" in reason
    assert set(metrics.summary(results)) == {name for name, r in results.items() if r["status"] == "ok"}


def test_evaluate_videos_config_errors_and_disabling(tmp_path):
    videos = static()[None]
    with pytest.raises(KeyError, match="unknown eval.metrics"):
        metrics.evaluate_videos(videos, ["a"], {"subject_consistancy": {"path": "x"}})
    with pytest.raises(ValueError, match="eval.metrics.dynamic_degree_flow: unknown option"):
        metrics.evaluate_videos(videos, ["a"], {"dynamic_degree_flow": {"frames_per_second": 8}})
    with pytest.raises(ValueError, match="1 videos but 2 prompts"):
        metrics.evaluate_videos(videos, ["a", "b"])
    missing = tmp_path / "no-such-dino"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        metrics.evaluate_videos(videos, ["a"], {"subject_consistency": {"path": str(missing)}})
    results = metrics.evaluate_videos(videos, ["a"], {"brisque": {"enabled": False},
                                                      "dynamic_degree_flow": {"fps": 8}})
    assert "brisque" not in results and results["dynamic_degree_flow"]["per_video"] == [False]


def test_imaging_quality_without_pyiqa_is_not_configured(tmp_path, monkeypatch):
    checkpoint = tmp_path / "musiq_spaq_ckpt.pth"
    checkpoint.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # import fails as where pyiqa is not installed
    features.load_musiq.cache_clear()
    result = metrics.evaluate_videos(static()[None], ["a"], {"imaging_quality": {"path": str(checkpoint)}})
    assert result["imaging_quality"]["status"] == "not configured"
    assert "pyiqa" in result["imaging_quality"]["reason"]


def test_imaging_quality_runs_pyiqa_musiq_from_a_local_checkpoint(tmp_path):
    """Where pyiqa imports (a torchvision matching torch: GPU machines, see docs/evaluation.md): a
    randomly initialised MUSIQ saved as a checkpoint scores frames exactly as pyiqa's model does."""
    try:
        from pyiqa.archs.musiq_arch import MUSIQ
    except Exception as exc:  # noqa: BLE001 - pyiqa absent, or a torchvision that does not load
        pytest.skip(f"pyiqa's MUSIQ does not import here: {type(exc).__name__}")
    torch.manual_seed(0)
    videos = textured_square(frames=3)[None]
    checkpoint = tmp_path / "musiq.pth"
    full = MUSIQ(pretrained=False).eval()  # the released architecture, random weights
    torch.save(full.state_dict(), checkpoint)
    features.load_musiq.cache_clear()
    result = metrics.evaluate_videos(videos, ["a"], {"imaging_quality": {"path": str(checkpoint)}})["imaging_quality"]
    with torch.no_grad():
        frames = torch.from_numpy(videos[0]).permute(0, 3, 1, 2).float() / 255.0
        expected = float(full(frames).flatten().mean()) / 100.0
    assert result["status"] == "ok" and result["per_video"][0] == pytest.approx(expected, rel=1e-4)


def test_brisque_dimension_runs_from_its_wheel():
    pytest.importorskip("brisque")
    pytest.importorskip("skimage")
    results = metrics.evaluate_videos(textured_square(frames=3)[None], ["a"], {"brisque": {"frame_stride": 2}})
    value = results["brisque"]["per_video"][0]
    assert results["brisque"]["status"] == "ok" and np.isfinite(value)
    assert not metrics.higher_is_better("brisque")


def test_reward_entries_and_summary():
    from flash_grpo_core.rewards.base import RewardOutput

    output = RewardOutput(scores=torch.tensor([0.5, 1.5]), info={"clip": torch.tensor([1.0, 3.0])})
    entries = metrics.reward_entries(output)
    assert entries["reward"] == {"status": "ok", "per_video": [0.5, 1.5], "mean": 1.0}
    assert metrics.summary(entries) == {"reward": 1.0, "reward/clip": 2.0}


# ---------------------------------------------------------------------------------------------
# Model-based dimensions on tiny random models saved like real checkpoints


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Directories holding tiny random DINO ViT, DINOv2, CLIP vision and full CLIP models plus processors."""
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("metric_models")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=1,
                             image_size=28, patch_size=7)).save_pretrained(root / "dinov2")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                      ).save_pretrained(root / "dinov2")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    clip_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    text = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
            "vocab_size": 99, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=16))
    clip.save_pretrained(root / "clip")
    CLIPVisionModelWithProjection(vision).save_pretrained(root / "clip_vision")
    CLIPVisionModel(vision).save_pretrained(root / "clip_no_projection")
    for name in ("clip", "clip_vision", "clip_no_projection"):
        clip_processor.save_pretrained(root / name)
    torch.save(torch.nn.Linear(16, 1).state_dict(), root / "head.pth")
    torch.save(torch.nn.Linear(8, 1).state_dict(), root / "head8.pth")
    torch.save({"layer.weight": torch.zeros(1, 16)}, root / "bad_head.pth")
    yield root
    features.clear_model_cache()


def vbench_loop(frame_features):
    """VBench's per-frame loop (subject_consistency.py) on features [F, D], as an independent reference."""
    total, first, previous = 0.0, None, None
    for index, feature in enumerate(torch.nn.functional.normalize(frame_features, dim=-1)):
        feature = feature[None]
        if index == 0:
            first = feature
        else:
            total += (max(0.0, torch.cosine_similarity(previous, feature).item())
                      + max(0.0, torch.cosine_similarity(first, feature).item())) / 2
        previous = feature
    return total / (len(frame_features) - 1)


def random_videos(batch=2, frames=4, size=32):
    videos = np.random.default_rng(3).integers(0, 256, (batch, frames, size, size, 3), dtype=np.uint8)
    videos[-1] = videos[-1, :1]  # the last video is static
    return videos


def test_subject_consistency_matches_vbench_loop_on_tiny_dino(tiny_models):
    from transformers import ViTImageProcessor, ViTModel

    videos = random_videos()
    result = metrics.evaluate_videos(videos, ["a", "b"], {"subject_consistency": {"path": str(tiny_models / "dino")}})
    entry = result["subject_consistency"]
    # reference: the checkpoint's own processor (a 32x32 frame needs no resize) and CLS features
    model = ViTModel.from_pretrained(tiny_models / "dino")
    processor = ViTImageProcessor.from_pretrained(tiny_models / "dino")
    with torch.no_grad():
        cls = model(**processor(images=list(videos[0]), return_tensors="pt")).last_hidden_state[:, 0]
    assert entry["per_video"][0] == pytest.approx(vbench_loop(cls), abs=1e-5)
    assert entry["per_video"][1] == pytest.approx(1.0, abs=1e-6)
    # DINOv2 through the same AutoModel path, at a non-square size (shorter side resized, no crop)
    tall = random_videos(size=40)[:, :, :, :30]  # [2, 4, H=40, W=30, 3]
    other = metrics.evaluate_videos(tall, ["a", "b"], {"subject_consistency": {"path": str(tiny_models / "dinov2")}})
    assert other["subject_consistency"]["per_video"][0] == pytest.approx(dino_transform_reference(
        tiny_models / "dinov2", tall[0]), abs=1e-5)


def dino_transform_reference(path, frames):
    """VBench's dino_transform (torchvision's Resize of the shorter side to the input size: bilinear,
    no antialias, no crop; ImageNet normalisation) written out by hand, CLS features of a plain
    Dinov2Model, then the VBench loop: an independent computation for one video [F, H, W, 3]."""
    from transformers import Dinov2Model

    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0  # [F, 3, 40, 30]
    # the processor's crop size 28 is the network's input: 30 -> 28 and 40 -> int(28 * 40 / 30) = 37
    pixels = torch.nn.functional.interpolate(pixels, size=(37, 28), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        cls = Dinov2Model.from_pretrained(path)(pixel_values=pixels).last_hidden_state[:, 0]  # [F, D]
    return vbench_loop(cls)


def test_background_consistency_reads_full_clip_checkpoints(tiny_models):
    from transformers import CLIPImageProcessor, CLIPModel

    videos = random_videos()
    config = {"background_consistency": {"path": str(tiny_models / "clip")}}
    result = metrics.evaluate_videos(videos, ["a", "b"], config)
    model = CLIPModel.from_pretrained(tiny_models / "clip")
    processor = CLIPImageProcessor.from_pretrained(tiny_models / "clip")
    with torch.no_grad():
        embeds = model.get_image_features(**processor(images=list(videos[0]), return_tensors="pt"))
    embeds = getattr(embeds, "pooler_output", embeds)  # a tensor, or an output object in newer transformers
    assert result["background_consistency"]["per_video"][0] == pytest.approx(vbench_loop(embeds), abs=1e-4)
    assert result["background_consistency"]["per_video"][1] == pytest.approx(1.0, abs=1e-6)


def test_checkpoint_without_the_projection_is_refused(tiny_models):
    with pytest.raises(ValueError, match="lacks weights for .*visual_projection"):
        metrics.evaluate_videos(random_videos(), ["a", "b"],
                                {"background_consistency": {"path": str(tiny_models / "clip_no_projection")}})


def test_aesthetic_quality_is_head_on_normalised_clip_embedding(tiny_models):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    videos = random_videos()
    options = {"path": str(tiny_models / "clip_vision"), "head_path": str(tiny_models / "head.pth")}
    scores = metrics.evaluate_videos(videos, ["a", "b"], {"aesthetic_quality": options})["aesthetic_quality"]
    model = CLIPVisionModelWithProjection.from_pretrained(tiny_models / "clip_vision")
    processor = CLIPImageProcessor.from_pretrained(tiny_models / "clip_vision")
    head = torch.nn.Linear(16, 1)
    head.load_state_dict(torch.load(tiny_models / "head.pth"))
    with torch.no_grad():
        embeds = model(**processor(images=list(videos[0]), return_tensors="pt")).image_embeds
        expected = (head(torch.nn.functional.normalize(embeds, dim=-1)) / 10).mean().item()
    assert scores["per_video"][0] == pytest.approx(expected, abs=1e-5)
    only_clip = metrics.evaluate_videos(videos, ["a", "b"], {"aesthetic_quality": {"path": options["path"]}})
    assert "head_path" in only_clip["aesthetic_quality"]["reason"]
    with pytest.raises(ValueError, match="takes 8 features but the CLIP model"):
        features.aesthetic_quality(videos, path=options["path"], head_path=str(tiny_models / "head8.pth"))
    with pytest.raises(ValueError, match="not a Linear"):
        features.aesthetic_quality(videos, path=options["path"], head_path=str(tiny_models / "bad_head.pth"))
