"""Qwen2-VL reward models (HPSv3, VideoAlign): a Qwen2-VL backbone plus a reward head.

Both released reward models (HPSv3's ``Qwen2VLRewardModelBT``, VideoAlign's trainer of the same
name) take the backbone's last hidden state at special reward tokens placed in the prompt
(``<|Reward|>``; ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``) through a head
(``rm_head``). We re-implement their inference forward here instead of importing their code,
which pins transformers 4.45 (HPSv3: also deepspeed, trl) and does not run on transformers 5:

- ``Qwen2VLRewardModel``: embeddings, vision tower outputs scattered into the image / video
  placeholder tokens, language model, head at the reward tokens. Like the released forward, the
  language model is called without position ids, so it uses sequential positions (0..L-1 on all
  three M-RoPE axes), not Qwen2-VL's 3D M-RoPE: the released weights were trained that way.
- ``translate_keys``: checkpoints saved by transformers < 4.50 (``model.layers.*``,
  ``visual.*``, ``lm_head``, ``rm_head``) or PEFT (``base_model.model.*``) onto our module tree.
- ``merge_lora``: folds PEFT LoRA pairs into the base Linear weights (W += s * B @ A), so
  inference runs at base-model speed without peft.
- ``VisionInputs``: Qwen2-VL pixel preprocessing (resize to multiples of 28, rescale, CLIP
  normalisation, patchify into [patches, C * 2 * 14 * 14] with temporal patch 2) in torch,
  because transformers' Qwen2-VL video processor needs torchvision, which the CPU test
  environment cannot load. The image path is tested against transformers' own image processor.
- ``chat_text``: the Qwen2-VL-Instruct chat template for one user turn with one image or video
  (the default system prompt, ``add_generation_prompt=True``), hard-coded so the prompt does not
  depend on which template file a local checkpoint carries.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F_nn

from flash_grpo_core.rewards.base import RewardError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|>{pad}<|vision_end|>{text}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PAD_TOKENS = {"image": "<|image_pad|>", "video": "<|video_pad|>"}


def chat_text(text: str, kind: str) -> str:
    """One user turn holding one image or video and ``text``, as Qwen2-VL-Instruct renders it."""
    return CHAT.format(pad=PAD_TOKENS[kind], text=text)


class Qwen2VLRewardModel(torch.nn.Module):
    """A transformers ``Qwen2VLModel`` and a reward head read at special tokens (or the last one).

    forward(...) -> rewards float32 [B, K]: with S reward tokens per sequence and a head of N
    outputs, K = N when S = 1 (HPSv3: N = 2, mu and sigma), K = S when S = N > 1 and
    ``diagonal`` (VideoAlign: token s is read by output s), else S * N.
    """

    def __init__(self, backbone, head: torch.nn.Module, reward_token_ids: list[int], diagonal: bool = False):
        super().__init__()
        self.backbone = backbone  # transformers Qwen2VLModel: .visual, .language_model
        self.head = head.float()
        self.reward_token_ids = list(reward_token_ids)
        self.diagonal = diagonal

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, L]
        attention_mask: torch.Tensor,  # [B, L]
        pixel_values: torch.Tensor | None = None,  # [P, C*2*14*14]
        image_grid_thw: torch.Tensor | None = None,  # [images, 3]
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        config = self.backbone.config
        embeds = self.backbone.get_input_embeddings()(input_ids)  # [B, L, D]
        for pixels, grid, token_id, features in (
            (pixel_values, image_grid_thw, config.image_token_id, self.backbone.get_image_features),
            (pixel_values_videos, video_grid_thw, config.video_token_id, self.backbone.get_video_features),
        ):
            if pixels is None:
                continue
            vision = torch.cat(features(pixels, grid, return_dict=True).pooler_output)  # [T, D]
            mask = (input_ids == token_id).unsqueeze(-1).expand_as(embeds)  # [B, L, D]
            if int(mask[..., 0].sum()) != vision.shape[0]:
                raise RewardError(
                    f"{int(mask[..., 0].sum())} vision placeholder tokens for {vision.shape[0]} features"
                )
            embeds = embeds.masked_scatter(mask, vision.to(embeds.dtype))
        hidden = self.backbone.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # [B, L, D]
        return self.pool(hidden, input_ids, attention_mask)

    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch = hidden.shape[0]
        if not self.reward_token_ids:  # the last non-padding token
            last = attention_mask.long().sum(dim=1) - 1  # [B]
            return self.head(hidden[torch.arange(batch), last].float())  # [B, N]
        mask = torch.isin(input_ids, torch.tensor(self.reward_token_ids, device=input_ids.device))
        counts = mask.sum(dim=1)
        if not bool((counts == len(self.reward_token_ids)).all()):
            raise RewardError(
                f"expected {len(self.reward_token_ids)} reward token(s) per sequence, got {counts.tolist()}"
            )
        rewards = self.head(hidden[mask].float()).view(batch, len(self.reward_token_ids), -1)  # [B, S, N]
        if self.diagonal:
            return rewards.diagonal(dim1=1, dim2=2)  # [B, S]
        return rewards.reshape(batch, -1)  # [B, S*N]


# ---------------------------------------------------------------------------------------------
# Checkpoints

BACKBONE_PATTERNS = [
    (re.compile(r"^model\.language_model\."), "language_model."),
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^visual\."), "visual."),
    (re.compile(r"^model\."), "language_model."),
    (re.compile(r"^language_model\."), "language_model."),
]


def translate_keys(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Split a checkpoint into (backbone, head, lora) state dicts with our module names.

    Accepts transformers < 4.50 names, transformers 5 names, and PEFT-wrapped names
    (``base_model.model.`` prefix, ``.base_layer.``, ``modules_to_save.default``, LoRA pairs
    with or without the adapter name). ``lm_head`` is dropped: a reward model never reads it.
    """
    backbone, head, lora = {}, {}, {}
    for key, value in state.items():
        key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if ".original_module." in key or key.startswith("lm_head."):
            continue
        key = key.replace(".modules_to_save.default.", ".")
        if key.startswith("rm_head."):
            head[key.removeprefix("rm_head.")] = value
            continue
        for pattern, replacement in BACKBONE_PATTERNS:
            if pattern.match(key):
                key = pattern.sub(replacement, key, count=1)
                break
        else:
            raise RewardError(f"unexpected checkpoint key {key!r}")
        if ".lora_" in key:
            lora[key.replace(".default.", ".")] = value
        else:
            backbone[key] = value
    return backbone, head, lora


def build_head(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The released heads: ``nn.Linear(D, N, bias=False)`` (VideoAlign, HPSv3 "default") or
    HPSv3's "ranknet" Sequential(Linear(D, 1024), ReLU, Dropout, Linear(1024, 16), ReLU,
    Linear(16, N)), recognised from the state dict keys."""
    if "weight" in state:
        out_dim, in_dim = state["weight"].shape
        head = torch.nn.Linear(in_dim, out_dim, bias="bias" in state)
    elif {"0.weight", "3.weight", "5.weight"} <= set(state):
        shapes = [state[f"{index}.weight"].shape for index in (0, 3, 5)]  # [out, in] each
        head = torch.nn.Sequential(
            torch.nn.Linear(shapes[0][1], shapes[0][0]),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.05),
            torch.nn.Linear(shapes[1][1], shapes[1][0]),
            torch.nn.ReLU(),
            torch.nn.Linear(shapes[2][1], shapes[2][0], bias="5.bias" in state),
        )
    else:
        raise RewardError(f"unrecognised reward head with keys {sorted(state)[:6]}")
    head.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)
    return head.eval()


def merge_lora(backbone: torch.nn.Module, lora: dict[str, torch.Tensor], scaling: float) -> int:
    """Fold LoRA pairs ``<module>.lora_A.weight`` [r, in] / ``lora_B.weight`` [out, r] into the
    module's Linear weight: W += scaling * B @ A (in float32). Returns the number merged."""
    modules = dict(backbone.named_modules())
    prefixes = sorted({key.split(".lora_")[0] for key in lora})
    for prefix in prefixes:
        module = modules.get(prefix)
        if not isinstance(module, torch.nn.Linear):
            raise RewardError(f"LoRA weights for {prefix!r}, which is not a Linear layer of the model")
        down, up = lora[f"{prefix}.lora_A.weight"], lora[f"{prefix}.lora_B.weight"]  # [r, in], [out, r]
        delta = scaling * (up.float() @ down.float())  # [out, in]
        module.weight.data += delta.to(module.weight.device, module.weight.dtype)
    return len(prefixes)


# ---------------------------------------------------------------------------------------------
# Pixels and text


class VisionInputs:
    """Qwen2-VL pixel preprocessing: frames uint8 [T, H, W, 3] -> patches and grid (t, h, w)."""

    def __init__(self, patch_size=14, merge_size=2, temporal_patch_size=2, mean=CLIP_MEAN, std=CLIP_STD):
        self.patch = patch_size
        self.merge = merge_size
        self.temporal = temporal_patch_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def size(self, height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
        """Qwen2-VL's smart_resize: multiples of patch*merge, area within [min, max] pixels."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        return smart_resize(height, width, self.patch * self.merge, min_pixels, max_pixels)

    def image(self, frame: torch.Tensor, min_pixels: int, max_pixels: int):
        """One frame uint8 [H, W, 3] -> (patches [h*w, 3*T*P*P], grid [1, h, w]); PIL bicubic resize
        as ``qwen_vl_utils.fetch_image`` does."""
        from PIL import Image

        height, width = self.size(frame.shape[0], frame.shape[1], min_pixels, max_pixels)
        resized = Image.fromarray(frame.numpy()).resize((width, height), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized).copy())  # [h, w, 3]
        return self.patchify(pixels.permute(2, 0, 1)[None].float())

    def video(self, frames: torch.Tensor, min_pixels: int, max_pixels: int):
        """Frames uint8 [T, H, W, 3] -> patches, grid [1, 3]; bicubic antialiased resize as
        ``qwen_vl_utils.fetch_video`` does on tensors."""
        height, width = self.size(frames.shape[1], frames.shape[2], min_pixels, max_pixels)
        video = frames.permute(0, 3, 1, 2).float()  # [T, 3, H, W]
        video = F_nn.interpolate(video, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        return self.patchify(video)

    def patchify(self, video: torch.Tensor):
        """[T, 3, H, W] on 0..255 -> (patches [t*h*w, 3*T*P*P], grid [[t, h, w]]); the last frame is
        repeated up to a multiple of the temporal patch, as transformers' processors do."""
        video = (video / 255.0 - self.mean) / self.std
        if pad := -video.shape[0] % self.temporal:
            video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
        frames, channels, height, width = video.shape
        grid_t, grid_h, grid_w = frames // self.temporal, height // self.patch, width // self.patch
        merge, patch = self.merge, self.patch
        patches = video.reshape(
            grid_t, self.temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch
        ).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, h/m, w/m, m, m, C, T, P, P]
        patches = patches.reshape(grid_t * grid_h * grid_w, channels * self.temporal * patch * patch)
        return patches, torch.tensor([[grid_t, grid_h, grid_w]])


def encode_texts(tokenizer, texts: list[str], grids: torch.Tensor, kind: str, merge_size: int) -> dict:
    """Tokenise chat texts, expanding each vision placeholder to t*h*w / merge^2 tokens.

    texts: B strings each with one placeholder; grids: [B, 3]. Right padding, as both
    released reward models use. -> {"input_ids": [B, L], "attention_mask": [B, L]}.
    """
    pad = PAD_TOKENS[kind]
    expanded = []
    for text, grid in zip(texts, grids):
        if text.count(pad) != 1:
            raise RewardError(f"expected one {pad} in the chat text, got {text.count(pad)}")
        expanded.append(text.replace(pad, pad * (int(grid.prod()) // merge_size**2)))
    tokenizer.padding_side = "right"
    return dict(tokenizer(expanded, padding=True, return_tensors="pt", add_special_tokens=False))


def sample_frame_indices(total: int, num_frames: int | None, fps: float | None, video_fps: float) -> torch.Tensor:
    """Frame indices as ``qwen_vl_utils`` picks them: ``num_frames`` (rounded to a multiple of 2)
    or ``fps`` frames per second of a ``video_fps`` video (at least 4, at most 768 and the video),
    evenly spaced over the video. A video shorter than 2 frames repeats its frame."""
    factor = 2
    if num_frames is not None:
        count = max(factor, round(num_frames / factor) * factor)
    elif fps is not None:
        low = math.ceil(4 / factor) * factor
        high = math.floor(min(768, total) / factor) * factor
        count = min(max(total / video_fps * fps, low), high, total)
        count = max(factor, math.floor(count / factor) * factor)
    else:
        raise RewardError("set num_frames or fps for video sampling")
    return torch.linspace(0, total - 1, count).round().long()


# Qwen2-VL's video pixel budgets (qwen_vl_utils defaults), used by VideoAlign's frame sampling.
VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen_vl_utils defaults
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28


def load_tokenizer(base_path: Path, special_tokens: list[str]):
    """The base model's tokenizer with the reward tokens added, as both trainers add them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    tokenizer.add_tokens(special_tokens, special_tokens=True)
    return tokenizer


def vision_inputs(base_path: Path, vision_config) -> VisionInputs:
    """Patch sizes from the model config; normalisation from preprocessor_config.json if present."""
    mean, std = CLIP_MEAN, CLIP_STD
    preprocessor = base_path / "preprocessor_config.json"
    if preprocessor.is_file():
        settings = json.loads(preprocessor.read_text())
        mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
    return VisionInputs(
        vision_config.patch_size, vision_config.spatial_merge_size, vision_config.temporal_patch_size, mean, std
    )
