"""CLIP-family rewards: CLIP score, PickScore and HPSv2, per frame, aggregated over frames.

All three are a CLIP dual encoder scoring each kept frame against its prompt:

    frame score = scale * cos(image_embedding(frame), text_embedding(prompt))

- ``clip_score``: any transformers ``CLIPModel`` directory; scale = exp(logit_scale) (100 for
  OpenAI CLIP, i.e. 100 * cos as torchmetrics' CLIPScore, without its clamp at 0).
- ``pickscore``: PickScore_v1 (a fine-tuned CLIP ViT-H/14, released as a transformers
  ``CLIPModel``); scale = exp(logit_scale), as its model card computes it. Its repository has no
  processor: point ``processor_path`` at a local laion CLIP-ViT-H-14 directory, as the card does.
- ``hpsv2``: HPSv2 / HPSv2.1 (an open_clip ViT-H-14 fine-tune released as a raw open_clip state
  dict, ``HPS_v2*_compressed.pt``); scale = 1, because the official ``hpsv2.score`` returns the
  plain cosine (about 0.2-0.3). We convert the open_clip state dict to a transformers
  ``CLIPModel`` instead of using the ``hpsv2`` / ``open_clip_torch`` packages: both need
  torchvision, whose PyPI wheels are CUDA builds that fail to load next to the CPU torch this
  project tests with, ``hpsv2`` pins pytest 7.2 and protobuf < 4, and both download weights
  from a hub unless patched. The architecture is identical (laion publishes the same ViT-H-14
  both ways), and the conversion is checked against open_clip's own model in the tests.
  ``clip_path`` is a local laion CLIP-ViT-H-14 transformers directory giving the config,
  tokenizer and image preprocessing; its weights are not read.

Every option ``path``/``processor_path``/``clip_path`` is a local path (nothing is downloaded).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from flash_grpo_core.rewards.base import RewardError, register
from flash_grpo_core.rewards.model_base import (
    FrameModelReward,
    empty_model,
    load_strict,
    require_path,
)


class CLIPReward(FrameModelReward):
    """scale * cos(image, text) per frame with a transformers CLIPModel loaded from ``path``."""

    name = "clip_score"
    use_logit_scale = True

    def __init__(self, path: str | None = None, processor_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = require_path(self.name, path, "path", kind="dir")
        self.processor_path = (
            require_path(self.name, processor_path, "processor_path", kind="dir")
            if processor_path
            else self.path
        )

    def load(self) -> None:
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(self.path, local_files_only=True, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.load_processor()

    def load_processor(self) -> None:
        from transformers import CLIPImageProcessor, CLIPTokenizer

        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(self.processor_path, local_files_only=True)
            self.image_processor = CLIPImageProcessor.from_pretrained(
                self.processor_path, local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise RewardError(
                f"reward {self.name!r}: no CLIP tokenizer / image processor in "
                f"{str(self.processor_path)!r}; set reward.options.{self.name}.processor_path to a "
                f"local CLIP directory that has them ({exc})"
            ) from exc

    def score_frames(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        unique = sorted(set(prompts))
        tokens = self.tokenizer(
            unique, padding=True, truncation=True, max_length=self.max_text_length(), return_tensors="pt"
        ).to(self.device)
        pixels = self.image_processor(images=list(frames.numpy()), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.dtype)  # [N, 3, S, S]
        image = self.model.get_image_features(pixel_values=pixels).pooler_output.float()  # [N, D]
        text = self.model.get_text_features(**tokens).pooler_output.float()  # [P, D]
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        index = torch.tensor([unique.index(prompt) for prompt in prompts], device=self.device)  # [N]
        cosine = (image * text[index]).sum(dim=-1)  # [N]
        scale = self.model.logit_scale.float().exp() if self.use_logit_scale else 1.0
        return (scale * cosine).cpu()

    def max_text_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)


register("clip_score")(CLIPReward)


@register("pickscore")
class PickScoreReward(CLIPReward):
    """PickScore_v1: exp(logit_scale) * cos, from a local CLIPModel directory plus CLIP-H processor."""

    name = "pickscore"


@register("hpsv2")
class HPSv2Reward(CLIPReward):
    """HPSv2 / HPSv2.1: plain cosine of an open_clip ViT-H-14 state dict run as a CLIPModel.

    path: the HPS checkpoint (``.pt`` with a ``state_dict``, read with ``weights_only=True``, or
    ``.safetensors``). clip_path: local transformers CLIP-ViT-H-14 directory (config, tokenizer,
    preprocessor; weights unused).
    """

    name = "hpsv2"
    use_logit_scale = False

    def __init__(self, path: str | None = None, clip_path: str | None = None, **kwargs: Any) -> None:
        super(CLIPReward, self).__init__(**kwargs)
        self.path = require_path(self.name, path, "path", kind="file")
        self.processor_path = require_path(self.name, clip_path, "clip_path", kind="dir")

    def load(self) -> None:
        from transformers import CLIPConfig, CLIPModel

        config = CLIPConfig.from_pretrained(self.processor_path, local_files_only=True)
        state = open_clip_to_transformers(read_state_dict(self.path))
        model = empty_model(lambda: CLIPModel(config))
        load_strict(model, state, f"reward 'hpsv2': {self.path}")
        self.model = model.to(self.device, self.dtype).eval()
        self.load_processor()


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch checkpoint (safe ``weights_only`` unpickler)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise RewardError(f"{path}: expected a state dict, got {type(checkpoint).__name__}")
    return checkpoint


# open_clip (= OpenAI CLIP) names -> transformers CLIPModel names, for everything but attention
RENAMES = [
    (r"^visual\.transformer\.resblocks\.", "vision_model.encoder.layers."),
    (r"^transformer\.resblocks\.", "text_model.encoder.layers."),
    (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    (r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),
    (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
    (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^ln_final\.", "text_model.final_layer_norm."),
]


def open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an open_clip ViT CLIP state dict (standard text tower) to CLIPModel keys.

    Fused attention in_proj [3W, W] is split into q/k/v; projections stored as [W, D] for
    ``x @ proj`` become Linear weights [D, W].
    """
    state = {key.removeprefix("module."): value for key, value in state.items()}
    out: dict[str, torch.Tensor] = {}
    direct = {
        "logit_scale": "logit_scale",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
    }
    for key, value in state.items():
        if key == "attn_mask" or key.endswith(".attn_mask"):
            continue  # the causal mask buffer some checkpoints carry
        if key in direct:
            out[direct[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()  # [W, D] -> [D, W]
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()  # [W, D] -> [D, W]
        elif ".attn.in_proj_" in key:
            prefix, kind = key.split(".attn.in_proj_")  # kind: "weight" or "bias"
            prefix = rename(prefix + ".")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
        else:
            out[rename(key)] = value
    return out


def rename(key: str) -> str:
    for pattern, replacement in RENAMES:
        key = re.sub(pattern, replacement, key)
    return key
