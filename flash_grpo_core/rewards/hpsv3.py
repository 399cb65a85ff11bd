"""HPSv3 reward: the released Qwen2-VL reward model (Qwen2-VL-7B-Instruct + a "ranknet" MLP head on
the ``<|Reward|>`` token, outputs (mu, sigma); mu is the score), loaded from local files.

It is an image model: every kept frame is scored at 256 * 28 * 28 pixels, as its released
inferencer resizes images, and frame scores are aggregated (default: mean of the top 30% of
frames, the Flash-GRPO authors' setting). ``path``: ``HPSv3.safetensors`` (the whole model, as
released) or a directory holding it; ``base_path``: a local Qwen2-VL-7B-Instruct directory for the
config and tokenizer (its weights are not read: the HPSv3 file has them all). ``jpeg`` (default
true): every frame is saved as JPEG at PIL's default quality and read back before scoring, as the
Flash-GRPO authors' client sends frames to their HPSv3 server (``flow_grpo/rewards.py:
video_hpsv3_remote``, commit 4211013), so scores match theirs; false scores the decoded pixels as
they are.

Departures from the released code: the inputs are uint8 tensors, not image paths (no
encode-decode round trip, except the JPEG one above); pixels are preprocessed in torch (see
``qwen2vl.VisionInputs``).
"""

from __future__ import annotations

from typing import Any

import torch

from flash_grpo_core.rewards.base import RewardError, register
from flash_grpo_core.rewards.model_base import (
    FrameModelReward,
    empty_model,
    load_strict,
    require_path,
)
from flash_grpo_core.rewards.prompts import (
    HPSV3_PROMPT,
    HPSV3_REWARD_TOKEN,
)
from flash_grpo_core.rewards.qwen2vl import (
    Qwen2VLRewardModel,
    build_head,
    chat_text,
    encode_texts,
    load_tokenizer,
    translate_keys,
    vision_inputs,
)

IMAGE_PIXELS = 256 * 28 * 28  # HPSv3's min_pixels = max_pixels


def jpeg_round_trip(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [N, H, W, 3] saved as JPEG with PIL's defaults (quality 75, 4:2:0) and decoded."""
    import io

    import numpy as np
    from PIL import Image

    decoded = []
    for frame in frames.cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG")
        decoded.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return torch.from_numpy(np.stack(decoded))  # [N, H, W, 3] uint8


@register("hpsv3", required=("path", "base_path"))
class HPSv3Reward(FrameModelReward):
    """HPSv3 mu per frame, aggregated over frames (default top 30%)."""

    name = "hpsv3"

    def __init__(
        self,
        path: str | None = None,
        base_path: str | None = None,
        pixels: int = IMAGE_PIXELS,
        aggregate: str = "top_mean",
        top_fraction: float = 0.3,
        batch_size: int = 8,
        jpeg: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(aggregate=aggregate, top_fraction=top_fraction, batch_size=batch_size, **kwargs)
        if not isinstance(jpeg, bool):
            raise RewardError(f"reward 'hpsv3': jpeg must be true or false, got {jpeg!r}")
        self.jpeg = jpeg
        self.path = require_path(self.name, path, "path")
        if self.path.is_dir():
            self.path = require_path(self.name, str(self.path / "HPSv3.safetensors"), "path", kind="file")
        self.base_path = require_path(self.name, base_path, "base_path", kind="dir")
        self.pixels = pixels

    def load(self) -> None:
        from safetensors.torch import load_file
        from transformers import Qwen2VLConfig, Qwen2VLModel

        config = Qwen2VLConfig.from_pretrained(self.base_path, local_files_only=True)
        self.tokenizer = load_tokenizer(self.base_path, [HPSV3_REWARD_TOKEN])
        reward_id = self.tokenizer.convert_tokens_to_ids(HPSV3_REWARD_TOKEN)
        backbone_state, head_state, lora = translate_keys(load_file(str(self.path)))
        if lora:
            raise RewardError(f"reward 'hpsv3': {self.path} holds LoRA weights; expected a full model")
        rows = backbone_state["language_model.embed_tokens.weight"].shape[0]
        if reward_id >= rows:
            raise RewardError(f"reward 'hpsv3': token {HPSV3_REWARD_TOKEN} has id {reward_id} >= {rows} embeddings")
        config.text_config.vocab_size = rows  # the trainer resized the embeddings to the tokenizer
        backbone = empty_model(lambda: Qwen2VLModel(config))
        load_strict(backbone, backbone_state, f"reward 'hpsv3': {self.path}")
        backbone = backbone.to(self.device, self.dtype)
        self.model = Qwen2VLRewardModel(backbone, build_head(head_state), [reward_id]).to(self.device).eval()
        self.vision = vision_inputs(self.base_path, config.vision_config)

    def score_frames(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if self.jpeg:
            frames = jpeg_round_trip(frames)
        images = [self.vision.image(frame, self.pixels, self.pixels) for frame in frames]
        pixels = torch.cat([patches for patches, _ in images]).to(self.device, self.dtype)  # [P, C*T*14*14]
        grids = torch.cat([grid for _, grid in images])  # [N, 3]
        texts = [chat_text(HPSV3_PROMPT.format(text_prompt=prompt), "image") for prompt in prompts]
        tokens = encode_texts(self.tokenizer, texts, grids, "image", self.vision.merge)
        rewards = self.model(
            tokens["input_ids"].to(self.device),
            tokens["attention_mask"].to(self.device),
            pixel_values=pixels,
            image_grid_thw=grids.to(self.device),
        )  # [N, 2]: mu, sigma
        return rewards[:, 0]
