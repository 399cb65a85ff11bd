"""Model rewards on tiny random models built here and saved the way the real weights are released.

CLIP family: a 2-layer CLIPModel with a byte-level tokenizer; HPSv2 also against open_clip's own
model. Qwen2-VL family: a 2-layer Qwen2-VL with a 1-block vision tower, saved with
save_pretrained (the same key layout as the released checkpoints), then an HPSv3 file
(tests/fakes.py) and a VideoAlign directory (LoRA + head + model_config.json) built from it. OCR and BRISQUE run their
real wheel-shipped models. Videos are uint8 [B, F, H, W, 3]. Nothing is downloaded.
"""

import importlib
import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fakes import TINY_PIXELS, make_hpsv3_checkpoint, save_qwen2vl_base
from flash_grpo_core.rewards import RewardError, available_rewards, build_reward
from flash_grpo_core.rewards.clip import open_clip_to_transformers
from flash_grpo_core.rewards.ocr import levenshtein, quoted_text, text_match
from flash_grpo_core.rewards.qwen2vl import VisionInputs, sample_frame_indices

transformers = pytest.importorskip("transformers")


def random_videos(batch, frames, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, height, width, 3), dtype=torch.uint8, generator=generator)


def byte_vocab(suffix=""):
    """Every byte-level character (so any text tokenises), optionally also with a suffix."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = {char: index for index, char in enumerate(chars)}
    if suffix:
        vocab.update({char + suffix: len(chars) + index for index, char in enumerate(chars)})
    return vocab


# ------------------------------------------------------------------------------------------------
# CLIP family


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel + tokenizer + image processor saved like a hub checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    vocab = byte_vocab("</w>")
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    eos = vocab["<|endoftext|>"]
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "gelu",
                "eos_token_id": eos, "bos_token_id": eos - 1, "pad_token_id": eos}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "image_size": 32, "patch_size": 8, "hidden_act": "gelu"}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    return folder


def manual_clip_scores(folder, frames, prompts):
    """exp(logit_scale) * cos per frame with transformers' CLIP, independently of the reward."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tokens = CLIPTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    pixels = CLIPImageProcessor.from_pretrained(folder)(images=list(frames.numpy()), return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=pixels["pixel_values"])
    return out.logits_per_image.diagonal()  # exp(logit_scale) * cos(image_i, text_i)


def test_clip_score_is_scaled_cosine_aggregated_over_strided_frames(clip_dir):
    videos = random_videos(2, 5, 40, 48)
    prompts = ["a red cat", "a blue dog"]
    reward = build_reward("clip_score", path=str(clip_dir), aggregate="mean", frame_stride=2, batch_size=4)
    assert not reward.loaded  # lazy: nothing loaded until the first call
    out = reward(videos, prompts)
    kept = videos[:, ::2]  # frames 0, 2, 4
    expected = manual_clip_scores(clip_dir, kept.reshape(-1, 40, 48, 3), [p for p in prompts for _ in range(3)])
    torch.testing.assert_close(out.scores, expected.view(2, 3).mean(dim=1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.info["frame_min"], expected.view(2, 3).min(dim=1).values, rtol=1e-4, atol=1e-4)
    top = build_reward("clip_score", path=str(clip_dir), aggregate="top_mean", top_fraction=0.3, frame_stride=2)
    # top 30% of 3 frames = ceil(0.9) = 1 frame: the best frame
    torch.testing.assert_close(top(videos, prompts).scores, expected.view(2, 3).max(dim=1).values, rtol=1e-4, atol=1e-4)
    assert not reward.model.training  # loaded in eval mode


def test_pickscore_needs_a_processor_path_when_the_model_dir_has_none(clip_dir, tmp_path):
    from transformers import CLIPModel

    CLIPModel.from_pretrained(clip_dir).save_pretrained(tmp_path)  # weights only, as PickScore_v1
    videos, prompts = random_videos(1, 2, 32, 32), ["a cat"]
    with pytest.raises(RewardError, match="reward.options.pickscore.processor_path"):
        build_reward("pickscore", path=str(tmp_path))(videos, prompts)
    reward = build_reward("pickscore", path=str(tmp_path), processor_path=str(clip_dir))
    reference = build_reward("clip_score", path=str(clip_dir))
    torch.testing.assert_close(reward(videos, prompts).scores, reference(videos, prompts).scores)


def import_open_clip_model(monkeypatch, request):
    """open_clip's model module without its package __init__, which imports torchvision (whose
    PyPI wheels do not load against CPU torch). Only FrozenBatchNorm2d is needed from it, for
    ResNet towers that this test does not build."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch is not installed (test-only extra)")
    from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig  # noqa: F401
    from transformers.modeling_outputs import BaseModelOutput  # noqa: F401 (imported before the stub)

    stub = types.ModuleType("torchvision.ops.misc")
    stub.FrozenBatchNorm2d = torch.nn.Identity
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    for name, module in (("torchvision", types.ModuleType("torchvision")),
                         ("torchvision.ops", types.ModuleType("torchvision.ops")),
                         ("torchvision.ops.misc", stub), ("open_clip", package)):
        monkeypatch.setitem(sys.modules, name, module)
    before = set(sys.modules)
    model_module = importlib.import_module("open_clip.model")
    imported = set(sys.modules) - before
    request.addfinalizer(lambda: [sys.modules.pop(name, None) for name in imported])  # leave no trace
    return model_module


def test_hpsv2_converts_open_clip_weights_exactly(clip_dir, tmp_path, monkeypatch, request):
    open_clip_model = import_open_clip_model(monkeypatch, request)
    torch.manual_seed(1)
    reference = open_clip_model.CLIP(
        embed_dim=16,
        vision_cfg=open_clip_model.CLIPVisionCfg(layers=2, width=32, head_width=8, patch_size=8, image_size=32, mlp_ratio=2.0),
        text_cfg=open_clip_model.CLIPTextCfg(context_length=77, vocab_size=514, width=32, heads=4, layers=2, mlp_ratio=2.0),
    ).eval()
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": reference.state_dict()}, checkpoint)  # the released format
    reward = build_reward("hpsv2", path=str(checkpoint), clip_path=str(clip_dir), aggregate="mean")
    videos, prompts = random_videos(2, 2, 32, 32, seed=3), ["a red cat", "a tree"]
    out = reward(videos, prompts)
    # the same pixels and tokens through open_clip itself: HPSv2's score is the plain cosine
    pixels = reward.image_processor(images=list(videos.reshape(-1, 32, 32, 3).numpy()), return_tensors="pt")
    tokens = reward.tokenizer([p for p in prompts for _ in range(2)], padding="max_length", max_length=77,
                              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        image = torch.nn.functional.normalize(reference.encode_image(pixels["pixel_values"]), dim=-1)
        text = torch.nn.functional.normalize(reference.encode_text(tokens), dim=-1)
    torch.testing.assert_close(out.scores, (image * text).sum(-1).view(2, 2).mean(dim=1), rtol=1e-4, atol=1e-5)
    assert out.scores.abs().max() <= 1.0  # a cosine, not scaled by logit_scale


def test_open_clip_conversion_splits_attention_and_transposes_projections():
    width, embed = 4, 3
    in_proj = torch.arange(3 * width * width, dtype=torch.float32).view(3 * width, width)
    state = {"module.transformer.resblocks.0.attn.in_proj_weight": in_proj,
             "visual.proj": torch.ones(width, embed), "text_projection": torch.zeros(width, embed),
             "visual.transformer.resblocks.1.mlp.c_fc.bias": torch.ones(8), "attn_mask": torch.ones(2, 2)}
    out = open_clip_to_transformers(state)
    torch.testing.assert_close(out["text_model.encoder.layers.0.self_attn.k_proj.weight"], in_proj[width : 2 * width])
    assert out["visual_projection.weight"].shape == (embed, width)
    assert out["text_projection.weight"].shape == (embed, width)
    assert "vision_model.encoder.layers.1.mlp.fc1.bias" in out and "attn_mask" not in out


# ------------------------------------------------------------------------------------------------
# Missing weights, registry


@pytest.mark.parametrize(
    "name, options, key",
    [
        ("clip_score", {}, "reward.options.clip_score.path"),
        ("pickscore", {"path": "/no/such/pickscore"}, "reward.options.pickscore.path"),
        ("hpsv2", {"path": "/no/such/hps.pt"}, "reward.options.hpsv2.path"),
        ("hpsv3", {}, "reward.options.hpsv3.path"),
        ("videoalign", {"path": "/no/such/videoalign"}, "reward.options.videoalign.path"),
    ],
)
def test_missing_weights_name_the_path_and_the_params_key(name, options, key):
    with pytest.raises(RewardError, match=key) as caught:
        build_reward(name, **options)
    if "path" in options:
        assert options["path"] in str(caught.value) and "does not exist" in str(caught.value)


def test_videoalign_options_are_checked_and_an_unknown_one_refused(tmp_path):
    """reward.options.videoalign: VideoAlignOptions' keys and ModelReward's; any other is a TypeError
    (validate: "reward.options: ..."); the options' own checks need no files."""
    with pytest.raises(TypeError, match="'bogus'"):
        build_reward("videoalign", path=str(tmp_path), bogus=1)
    with pytest.raises(RewardError, match="frame_stride must be a positive integer"):
        build_reward("videoalign", path=str(tmp_path), frame_stride=0)
    with pytest.raises(RewardError, match="set fps or num_frames, not both"):
        build_reward("videoalign", path=str(tmp_path), fps=2.0, num_frames=8)
    with pytest.raises(RewardError, match=r"unknown weights \['overall'\]"):
        build_reward("videoalign", path=str(tmp_path), weights={"overall": 1.0})


def test_every_model_reward_is_registered():
    assert {"clip_score", "pickscore", "hpsv2", "hpsv3", "videoalign", "ocr", "brisque", "remote"} <= set(
        available_rewards()
    )


# ------------------------------------------------------------------------------------------------
# Qwen2-VL family (HPSv3, VideoAlign)

@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory):
    """A tiny Qwen2-VL-Instruct stand-in: config, byte-level BPE tokenizer, weights (legacy layout)."""
    return save_qwen2vl_base(tmp_path_factory.mktemp("qwen2vl"))


def test_qwen_patches_match_transformers_image_processor():
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    frame = random_videos(1, 1, 40, 61, seed=5)[0, 0]  # [H, W, 3]
    vision = VisionInputs()
    patches, grid = vision.image(frame, TINY_PIXELS, 4 * TINY_PIXELS)
    height, width = int(grid[0, 1]) * 14, int(grid[0, 2]) * 14
    resized = Image.fromarray(frame.numpy()).resize((width, height), Image.BICUBIC)
    reference = Qwen2VLImageProcessorPil()(images=[resized], do_resize=False, return_tensors="pt")
    torch.testing.assert_close(grid, reference["image_grid_thw"])
    torch.testing.assert_close(patches, reference["pixel_values"], rtol=1e-5, atol=1e-5)
    # a still 2-frame video is one temporal patch of two equal frames: the image's patches
    still = torch.from_numpy(np.array(resized)).expand(2, height, width, 3)
    video_patches, video_grid = vision.video(still, height * width, height * width)
    torch.testing.assert_close(video_grid, grid)
    torch.testing.assert_close(video_patches, patches, rtol=1e-5, atol=1e-5)


def test_video_frame_sampling_follows_qwen_vl_utils():
    # 16 frames at 16 fps, 2 fps wanted: 2 frames, raised to the minimum of 4 -> linspace(0, 15, 4)
    assert sample_frame_indices(16, None, 2.0, 16.0).tolist() == [0, 5, 10, 15]
    # 3 frames: at most the largest multiple of 2 not above 3 -> 2 frames, first and last
    assert sample_frame_indices(3, None, 2.0, 16.0).tolist() == [0, 2]
    # num_frames is rounded to a multiple of 2: round(5 / 2) * 2 = 4
    assert sample_frame_indices(9, 5, None, 16.0).tolist() == [0, 3, 5, 8]


def test_reward_head_reads_special_tokens_and_takes_the_diagonal():
    from flash_grpo_core.rewards.qwen2vl import Qwen2VLRewardModel

    head = torch.nn.Linear(2, 3, bias=False)
    head.weight.data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # outputs x, y, x + y
    model = Qwen2VLRewardModel(backbone=None, head=head, reward_token_ids=[7, 8, 9], diagonal=True)
    hidden = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [5.0, 6.0]]])  # [B=1, L=5, D=2]
    input_ids = torch.tensor([[1, 7, 8, 1, 9]])
    # token 7 -> output 0 of (1, 2) = 1; token 8 -> output 1 of (3, 4) = 4; token 9 -> output 2 of (5, 6) = 11
    torch.testing.assert_close(model.pool(hidden, input_ids, torch.ones(1, 5)), torch.tensor([[1.0, 4.0, 11.0]]))
    model.diagonal = False  # all 3 x 3 outputs, token-major
    assert model.pool(hidden, input_ids, torch.ones(1, 5)).shape == (1, 9)
    with pytest.raises(RewardError, match="expected 3 reward token"):
        model.pool(hidden, torch.tensor([[1, 7, 8, 1, 1]]), torch.ones(1, 5))


def reference_hpsv3(base, state, reward, frames, prompts):
    """mu per frame through transformers' own Qwen2VLModel (sequential positions, as released)."""
    from transformers import Qwen2VLModel

    from flash_grpo_core.rewards.prompts import HPSV3_PROMPT
    from flash_grpo_core.rewards.qwen2vl import chat_text, encode_texts

    model = Qwen2VLModel.from_pretrained(base, local_files_only=True).eval()
    model.resize_token_embeddings(state["model.embed_tokens.weight"].shape[0])
    model.get_input_embeddings().weight.data = state["model.embed_tokens.weight"]
    head = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.Linear(8, 4),
                               torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    head.load_state_dict({key[len("rm_head."):]: value for key, value in state.items() if key.startswith("rm_head.")})
    images = [reward.vision.image(frame, TINY_PIXELS, TINY_PIXELS) for frame in frames]
    grids = torch.cat([grid for _, grid in images])
    texts = [chat_text(HPSV3_PROMPT.format(text_prompt=prompt), "image") for prompt in prompts]
    tokens = encode_texts(reward.tokenizer, texts, grids, "image", 2)
    batch, length = tokens["input_ids"].shape
    with torch.no_grad():
        hidden = model(**tokens, pixel_values=torch.cat([p for p, _ in images]), image_grid_thw=grids,
                       position_ids=torch.arange(length).view(1, 1, -1).expand(3, batch, -1)).last_hidden_state
        at_reward = hidden[tokens["input_ids"] == reward.tokenizer.convert_tokens_to_ids("<|Reward|>")]  # [N, D]
        return head(at_reward)[:, 0]


def test_hpsv3_loads_the_released_layout_and_matches_transformers(qwen_base, tmp_path):
    from flash_grpo_core.rewards.hpsv3 import jpeg_round_trip

    state = make_hpsv3_checkpoint(qwen_base, tmp_path / "HPSv3.safetensors")
    videos, prompts = random_videos(2, 3, 40, 48, seed=11), ["a cat on a mat", "fireworks over a city"]
    frame_prompts = [p for p in prompts for _ in range(3)]
    reward = build_reward("hpsv3", path=str(tmp_path), base_path=str(qwen_base), pixels=TINY_PIXELS,
                          aggregate="mean", batch_size=4, jpeg=False)
    out = reward(videos, prompts)
    assert out.scores.shape == (2,) and out.scores.dtype == torch.float32
    expected = reference_hpsv3(qwen_base, state, reward, videos.reshape(6, 40, 48, 3), frame_prompts)
    torch.testing.assert_close(out.scores, expected.view(2, 3).mean(dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reward(videos, prompts).scores, out.scores)  # deterministic
    top = build_reward("hpsv3", path=str(tmp_path / "HPSv3.safetensors"), base_path=str(qwen_base), pixels=TINY_PIXELS)
    assert (top.aggregate, top.top_fraction, top.jpeg) == ("top_mean", 0.3, True)  # the authors' settings
    # by default the frames are scored as the authors' client sends them: after a JPEG round trip
    seen = jpeg_round_trip(videos.reshape(6, 40, 48, 3))
    assert (seen.int() - videos.reshape(6, 40, 48, 3).int()).abs().float().mean() > 1  # the round trip is lossy
    expected_jpeg = reference_hpsv3(qwen_base, state, reward, seen, frame_prompts)
    assert not torch.allclose(expected_jpeg, expected, rtol=1e-4, atol=1e-5)
    # top 30% of 3 frames is 1 frame: the best one
    torch.testing.assert_close(top(videos, prompts).scores, expected_jpeg.view(2, 3).max(dim=1).values,
                               rtol=1e-4, atol=1e-5)


def test_jpeg_round_trip_is_pils_default_quality():
    import io

    import numpy as np
    from PIL import Image

    from flash_grpo_core.rewards.hpsv3 import jpeg_round_trip

    frames = random_videos(1, 2, 32, 24, seed=3)[0]  # [2, 32, 24, 3]
    out = jpeg_round_trip(frames)
    assert out.shape == frames.shape and out.dtype == torch.uint8
    for frame, got in zip(frames.numpy(), out.numpy()):
        for quality, same in ((75, True), (95, False)):
            buffer = io.BytesIO()
            Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
            assert np.array_equal(np.asarray(Image.open(buffer)), got) == same


def test_hpsv3_rejects_a_checkpoint_with_missing_weights(qwen_base, tmp_path):
    state = make_hpsv3_checkpoint(qwen_base, tmp_path / "HPSv3.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "HPSv3.safetensors"))
    reward = build_reward("hpsv3", path=str(tmp_path), base_path=str(qwen_base), pixels=TINY_PIXELS)
    with pytest.raises(RewardError, match=r"1 missing keys.*language_model.layers.1.mlp.up_proj"):
        reward(random_videos(1, 1, 28, 28), ["x"])


def make_videoalign_dir(base, folder, norm):
    """A VideoReward directory as released: model_config.json naming the base model, and
    checkpoint-*/ with PEFT LoRA weights, adapter_config.json and non-LoRA weights (head, embeddings)."""
    from transformers import AutoTokenizer

    rows = len(AutoTokenizer.from_pretrained(base)) + 3  # + <|VQ_reward|>, <|MQ_reward|>, <|TA_reward|>
    generator = torch.Generator().manual_seed(3)
    lora = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 32, generator=generator),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 2, generator=generator),
        "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight": torch.randn(2, 64, generator=generator),
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight": torch.randn(32, 2, generator=generator),
    }
    non_lora = {
        "base_model.model.rm_head.weight": torch.randn(3, 32, generator=generator),
        "base_model.model.model.embed_tokens.weight": 0.02 * torch.randn(rows, 32, generator=generator),
    }
    (folder / "checkpoint-5").mkdir(parents=True)  # an older, incomplete checkpoint: must not be picked
    (folder / "checkpoint-10").mkdir()
    save_file(lora, str(folder / "checkpoint-10" / "adapter_model.safetensors"))
    torch.save(non_lora, folder / "checkpoint-10" / "non_lora_state_dict.pth")
    (folder / "checkpoint-10" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    (folder / "model_config.json").write_text(json.dumps({
        "model_config": {"model_name_or_path": str(base), "output_dim": 3, "use_special_tokens": True,
                         "reward_token": "special"},
        "peft_lora_config": {"lora_enable": True, "lora_r": 2, "lora_alpha": 4},
        "data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": TINY_PIXELS,
                        "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special"},
        "inference_config": norm,
    }))
    return lora, non_lora


def test_videoalign_merges_lora_reads_three_tokens_and_normalises(qwen_base, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    norm = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 0.0, "TA_std": 4.0}
    lora, non_lora = make_videoalign_dir(qwen_base, tmp_path, norm)
    options = {"path": str(tmp_path), "min_pixels": TINY_PIXELS, "video_fps": 8.0}
    videos, prompts = random_videos(3, 8, 40, 40, seed=2), ["a dog runs", "rain", "a dog runs"]
    videos[2] = videos[0]
    raw = build_reward("videoalign", use_norm=False, **options)
    parts = raw(videos, prompts, [{"fps": 8}] * 3)
    # LoRA merged as PEFT defines it: W + (alpha / r) * B @ A, alpha / r = 4 / 2 = 2
    base = Qwen2VLForConditionalGeneration.from_pretrained(qwen_base).model
    q_proj = raw.model.backbone.language_model.layers[0].self_attn.q_proj.weight
    expected_q = base.language_model.layers[0].self_attn.q_proj.weight + 2.0 * (
        lora["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
        @ lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    torch.testing.assert_close(q_proj, expected_q)
    torch.testing.assert_close(raw.model.backbone.get_input_embeddings().weight,
                               non_lora["base_model.model.model.embed_tokens.weight"])
    raw_parts = torch.stack([parts.info[name] for name in ("VQ", "MQ", "TA")], dim=1)  # [B, 3]
    torch.testing.assert_close(parts.scores, raw_parts.sum(dim=1))  # "Overall" = VQ + MQ + TA
    torch.testing.assert_close(raw_parts[0], raw_parts[2])  # same video and prompt, batched with others
    assert not torch.allclose(raw_parts[0], raw_parts[1])
    # released normalisation: (x - mean) / std per dimension; weights pick the mix
    normed = build_reward("videoalign", **options)(videos, prompts, [{"fps": 8}] * 3)
    mean, std = torch.tensor([0.5, -1.0, 0.0]), torch.tensor([2.0, 0.5, 4.0])
    torch.testing.assert_close(normed.scores, ((raw_parts - mean) / std).sum(dim=1), rtol=1e-4, atol=1e-5)
    vq_only = build_reward("videoalign", weights={"VQ": 2.0, "MQ": 0.0, "TA": 0.0}, **options)
    torch.testing.assert_close(vq_only(videos, prompts).scores, 2.0 * (raw_parts[:, 0] - 0.5) / 2.0, rtol=1e-4, atol=1e-5)
    with pytest.raises(RewardError, match="unknown weights"):
        build_reward("videoalign", weights={"overall": 1.0}, **options)


def test_videoalign_needs_a_local_base_model(qwen_base, tmp_path):
    make_videoalign_dir(qwen_base, tmp_path, None)
    config = json.loads((tmp_path / "model_config.json").read_text())
    config["model_config"]["model_name_or_path"] = "Qwen/Qwen2-VL-2B-Instruct"  # a hub id, as released
    (tmp_path / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(RewardError, match="reward.options.videoalign.base_path"):
        build_reward("videoalign", path=str(tmp_path))
    assert build_reward("videoalign", path=str(tmp_path), base_path=str(qwen_base)).base_path == qwen_base


# ------------------------------------------------------------------------------------------------
# OCR and BRISQUE (weights shipped in their wheels)


def test_ocr_text_match_is_flow_grpos_edit_distance_score():
    assert quoted_text('a neon sign that says "Open 24h" at night') == "Open 24h"
    assert quoted_text("no quotes here") is None
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert text_match("CAT", "cast") == 1 - 1 / 4  # one insertion away from a 4-letter target
    assert text_match("the big CAT sign", "cat") == 1.0  # target inside the recognised text: d = 0
    assert text_match("", "cat") == 0.0  # d = 3 = len(target)
    assert text_match("xyzxyzxyz", "ab") == 0.0  # d = 9, capped at len(target) = 2
    assert text_match("Open24H", "open 24h") == 1.0  # case and spaces ignored


def text_frames(text, frames=2, size=(64, 160)):
    """uint8 [1, F, H, W, 3]: black text on white, drawn with Pillow's default font."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (size[1], size[0]), "white")
    ImageDraw.Draw(image).text((10, 18), text, fill="black", font=ImageFont.load_default(size=24))
    return torch.from_numpy(np.array(image)).expand(1, frames, *size, 3).clone()


def test_ocr_reward_reads_drawn_text_and_scores_blank_frames_zero():
    pytest.importorskip("rapidocr")
    reward = build_reward("ocr", det_limit_side_len=64, threads=2)
    blank = torch.full((1, 2, 64, 160, 3), 255, dtype=torch.uint8)
    videos = torch.cat([text_frames("CAT 42"), blank, text_frames("CAT 42")])
    out = reward(videos, ['a sign that says "CAT 42"', 'a sign that says "CAT 42"', "a sign"])
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out.info["has_target"], torch.tensor([1.0, 1.0, 0.0]))
    # "CAT 42" against the target "CAT 4": substring -> 1; against "DOG 42": 3 substitutions of 5 -> 0.4
    partial = reward(torch.cat([text_frames("CAT 42")] * 2), ['"CAT 4"', 'say "DOG 42"'])
    torch.testing.assert_close(partial.scores, torch.tensor([1.0, 1 - 3 / 5]))


def textured_frame(noise_sigma, size=96, seed=1):
    """A smooth multi-scale texture with Gaussian noise of the given std (0..255 scale), [H, W, 3]."""
    base = sum(
        torch.nn.functional.interpolate(torch.rand(1, 1, cells, cells, generator=torch.Generator().manual_seed(cells)),
                                        size=(size, size), mode="bicubic")[0, 0] / (level + 1)
        for level, cells in enumerate((4, 8, 16, 32))
    )
    base = (base - base.min()) / (base.max() - base.min()) * 200 + 28
    noise = torch.randn(size, size, generator=torch.Generator().manual_seed(seed)) * noise_sigma
    return (base + noise).clamp(0, 255).round().to(torch.uint8)[..., None].expand(size, size, 3)


def test_brisque_prefers_less_noise_and_gives_flat_frames_the_worst_score():
    pytest.importorskip("brisque")
    reward = build_reward("brisque")
    light, heavy = textured_frame(10), textured_frame(50)
    flat = torch.full((96, 96, 3), 128, dtype=torch.uint8)
    videos = torch.stack([torch.stack([light, light]), torch.stack([heavy, heavy]), torch.stack([light, flat])])
    out = reward(videos, ["x"] * 3)
    assert out.scores[0] > out.scores[1]  # heavier noise, worse natural-scene statistics
    torch.testing.assert_close(out.scores, -out.info["brisque_raw"] / 100)  # reward = -BRISQUE / 100
    torch.testing.assert_close(out.info["undefined_frames"], torch.tensor([0.0, 0.0, 1.0]))
    # the flat frame has no statistics: it gets undefined_score = 100 -> (-BRISQUE(light) / 100 - 1) / 2
    torch.testing.assert_close(out.scores[2], (out.scores[0] - 1.0) / 2)
