"""VideoAlign (VideoReward) reward: Qwen2-VL-2B + LoRA + a 3-output head read at VQ / MQ / TA tokens.

``path``: the released directory (``model_config.json`` + ``checkpoint-*/{adapter_model.safetensors,
non_lora_state_dict.pth}`` or ``model.pth``); ``base_path``: the local Qwen2-VL-2B-Instruct
directory (defaults to ``model_name_or_path`` in ``model_config.json`` if that is a local
directory). The score is ``w_VQ * VQ + w_MQ * MQ + w_TA * TA`` after the released normalisation
(``inference_config`` means / stds), i.e. VideoAlign's "Overall" with unit weights. Departures
from the released code: uint8 tensors in, not mp4 paths; pixels preprocessed in torch
(``qwen2vl.VisionInputs``); LoRA merged into the weights instead of running through peft. Here:
the released ``model_config.json`` decides the frame sampling (``data_config.fps`` /
``num_frames`` / ``max_frame_pixels``), the LoRA scaling (``peft_lora_config``, or the
checkpoint's ``adapter_config.json``) and the score normalisation (``inference_config``); the
options ``fps``, ``num_frames``, ``max_pixels`` override it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from flash_grpo_core.rewards.base import RewardError, RewardOutput, register
from flash_grpo_core.rewards.model_base import ModelReward, require_path
from flash_grpo_core.rewards.prompts import VIDEOALIGN_PROMPT, VIDEOALIGN_REWARD_TOKENS
from flash_grpo_core.rewards.qwen2vl import (
    Qwen2VLRewardModel,
    build_head,
    chat_text,
    encode_texts,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    load_tokenizer,
    merge_lora,
    sample_frame_indices,
    translate_keys,
    vision_inputs,
)

DIMENSIONS = ("VQ", "MQ", "TA")


@dataclass(frozen=True)
class VideoAlignOptions:
    """``reward.options.videoalign`` beyond ModelReward's keywords (device, dtype, frame_stride): the
    released directory ``path``, its base model and checkpoint step, the dimensions' weights and
    normalisation, and the frame sampling (None: the released ``data_config``'s), checked as far as
    they can be without reading the files."""

    path: str | None = None
    base_path: str | None = None
    checkpoint_step: int = -1
    weights: dict[str, float] | None = None
    use_norm: bool = True
    fps: float | None = None
    num_frames: int | None = None
    video_fps: float = 16.0
    max_pixels: int | None = None
    min_pixels: int = VIDEO_MIN_PIXELS
    batch_size: int = 2

    def __post_init__(self) -> None:
        if self.fps is not None and self.num_frames is not None:
            raise RewardError("reward 'videoalign': set fps or num_frames, not both")
        stray = set(self.weights or {}) - set(DIMENSIONS)
        if stray:
            raise RewardError(f"reward 'videoalign': unknown weights {sorted(stray)}; use {DIMENSIONS}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise RewardError("reward 'videoalign': batch_size must be a positive integer")


@register("videoalign", required=("path",))
class VideoAlignReward(ModelReward):
    """w_VQ * VQ + w_MQ * MQ + w_TA * TA (normalised as released); info holds the three parts.

    Options: ``VideoAlignOptions``' and ModelReward's keywords; any other is a TypeError."""

    name = "videoalign"

    def __init__(self, **options: Any) -> None:
        own = {option.name for option in fields(VideoAlignOptions)}
        super().__init__(**{key: value for key, value in options.items() if key not in own})
        o = self.options = VideoAlignOptions(**{key: value for key, value in options.items() if key in own})
        self.path = require_path(self.name, o.path, "path", kind="dir")
        config_file = require_path(self.name, str(self.path / "model_config.json"), "path", kind="file")
        released = json.loads(config_file.read_text())
        self.model_config = released.get("model_config", {})
        self.lora_config = released.get("peft_lora_config", {})
        self.norm = released.get("inference_config") if o.use_norm else None
        data = released.get("data_config", {})
        if data.get("prompt_template_type", "detailed_special") != "detailed_special":
            raise RewardError("reward 'videoalign' supports the released prompt_template_type 'detailed_special'")
        fps, num_frames = o.fps, o.num_frames
        if fps is None and num_frames is None:
            fps, num_frames = data.get("fps", 2.0), data.get("num_frames")
            fps = None if num_frames is not None else fps
        self.fps, self.num_frames, self.video_fps = fps, num_frames, float(o.video_fps)
        self.max_pixels = o.max_pixels or data.get("max_frame_pixels")
        self.min_pixels = o.min_pixels
        base = o.base_path or self.model_config.get("model_name_or_path")
        self.base_path = require_path(self.name, base, "base_path", kind="dir")
        self.checkpoint_step = o.checkpoint_step
        self.weights = {name: float((o.weights or {}).get(name, 1.0)) for name in DIMENSIONS}
        self.batch_size = o.batch_size

    def load(self) -> None:
        from transformers import Qwen2VLForConditionalGeneration

        base = Qwen2VLForConditionalGeneration.from_pretrained(
            self.base_path, local_files_only=True, dtype=self.dtype, attn_implementation="sdpa"
        )
        backbone = base.model
        del base  # drops lm_head
        use_tokens = self.model_config.get("use_special_tokens", True)
        tokens = list(VIDEOALIGN_REWARD_TOKENS) if use_tokens else []
        self.tokenizer = load_tokenizer(self.base_path, tokens)
        folder = latest_checkpoint(self.path, self.checkpoint_step)
        state, adapter = read_checkpoint(folder)
        backbone_state, head_state, lora = translate_keys(state)
        embed = backbone_state.get("language_model.embed_tokens.weight")
        backbone.resize_token_embeddings(embed.shape[0] if embed is not None else len(self.tokenizer))
        result = backbone.load_state_dict(backbone_state, strict=False)
        if result.unexpected_keys:
            raise RewardError(f"reward 'videoalign': {folder} has unknown keys {result.unexpected_keys[:3]}")
        merge_lora(backbone, lora, self.lora_scaling(adapter))
        head = build_head(head_state)
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        diagonal = len(ids) == 3 and head_state_outputs(head_state) == 3
        self.model = Qwen2VLRewardModel(backbone.to(self.device, self.dtype), head, ids, diagonal)
        self.model = self.model.to(self.device).eval()
        self.vision = vision_inputs(self.base_path, backbone.config.vision_config)

    def lora_scaling(self, adapter: dict[str, Any]) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (PEFT's definitions)."""
        settings = adapter or self.lora_config
        rank = settings.get("r", settings.get("lora_r"))
        alpha = settings.get("lora_alpha")
        if rank is None or alpha is None:
            return 1.0
        return alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank

    def score(self, videos: torch.Tensor, prompts: list[str], metadata: list[dict] | None) -> RewardOutput:
        metadata = metadata or [{} for _ in prompts]
        parts = torch.cat(
            [
                self.score_batch(videos[start : start + self.batch_size], prompts[start : start + self.batch_size],
                                 metadata[start : start + self.batch_size])
                for start in range(0, videos.shape[0], self.batch_size)
            ]
        ).float().cpu()  # [B, 3]: VQ, MQ, TA
        if self.norm:
            mean = torch.tensor([self.norm[f"{name}_mean"] for name in DIMENSIONS])
            std = torch.tensor([self.norm[f"{name}_std"] for name in DIMENSIONS])
            parts = (parts - mean) / std
        weights = torch.tensor([self.weights[name] for name in DIMENSIONS])
        info = {name: parts[:, index] for index, name in enumerate(DIMENSIONS)}
        return RewardOutput(scores=parts @ weights, info=info)

    def score_batch(self, videos: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        """videos uint8 [b, F', H, W, 3] -> [b, 3]."""
        patches, grids = [], []
        for video, meta in zip(videos, metadata):
            source_fps = float(meta.get("fps", self.video_fps)) / self.frame_stride
            index = sample_frame_indices(video.shape[0], self.num_frames, self.fps, source_fps)
            max_pixels = self.max_pixels or max(
                min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / len(index) * 2), int(self.min_pixels * 1.05)
            )
            video_patches, grid = self.vision.video(video[index], self.min_pixels, int(max_pixels))
            patches.append(video_patches)
            grids.append(grid)
        grids = torch.cat(grids)  # [b, 3]
        texts = [chat_text(VIDEOALIGN_PROMPT.format(text_prompt=prompt), "video") for prompt in prompts]
        tokens = encode_texts(self.tokenizer, texts, grids, "video", self.vision.merge)
        rewards = self.model(
            tokens["input_ids"].to(self.device),
            tokens["attention_mask"].to(self.device),
            pixel_values_videos=torch.cat(patches).to(self.device, self.dtype),
            video_grid_thw=grids.to(self.device),
        )
        if rewards.shape[1] != 3:
            raise RewardError(f"reward 'videoalign' head gives {rewards.shape[1]} outputs, expected 3")
        return rewards


def head_state_outputs(state: dict[str, torch.Tensor]) -> int:
    """Number of head outputs (rows of its last Linear weight)."""
    last = "weight" if "weight" in state else "5.weight"
    return int(state[last].shape[0])


def latest_checkpoint(root: Path, step: int) -> Path:
    """``root/checkpoint-<step>``, or the highest step when step is -1 (as VideoAlign picks)."""
    found = sorted(root.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[-1]))
    if not found:
        raise RewardError(f"reward 'videoalign': no checkpoint-* directory in {str(root)!r}")
    if step == -1:
        return found[-1]
    chosen = root / f"checkpoint-{step}"
    if chosen not in found:
        raise RewardError(f"reward 'videoalign': {str(chosen)!r} does not exist")
    return chosen


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, LoRA settings) of one VideoAlign checkpoint folder; .pth read with weights_only."""
    from safetensors.torch import load_file

    if (folder / "model.pth").is_file():
        return torch.load(folder / "model.pth", map_location="cpu", weights_only=True), {}
    state = dict(load_file(str(folder / "adapter_model.safetensors")))
    state.update(torch.load(folder / "non_lora_state_dict.pth", map_location="cpu", weights_only=True))
    adapter = folder / "adapter_config.json"
    return state, json.loads(adapter.read_text()) if adapter.is_file() else {}
