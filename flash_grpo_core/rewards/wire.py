"""The reward server's wire format: JSON only, videos as base64 safetensors or base64 PNG frames.

Request (``POST /score``)::

    {"reward": "hpsv3", "prompts": [B strings], "metadata": [B objects] | null,
     "videos": {"encoding": "safetensors-base64", "data": "<base64 of a safetensors file
                holding one uint8 tensor 'videos' [B, F, H, W, 3]>"}}
    or  "videos": {"encoding": "png-base64", "frames": [B lists of F base64 PNG strings]}

Response: ``{"reward": name, "scores": [B numbers], "info": {key: [B numbers]}}``; errors:
``{"error": message}`` with a 4xx / 5xx status. Nothing is ever unpickled: safetensors holds only
raw tensor bytes and a JSON header, PNG only pixels. PNG is lossless, so both encodings give
identical scores; it exists for clients without safetensors.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import torch

from flash_grpo_core.rewards.base import RewardError, check_videos

ENCODINGS = ("safetensors-base64", "png-base64")


class PayloadTooLarge(RewardError):
    """The videos exceed the receiver's pixel limit."""


def encode_videos(videos: torch.Tensor, encoding: str = "safetensors-base64") -> dict[str, Any]:
    """uint8 [B, F, H, W, 3] -> the JSON ``videos`` object."""
    check_videos(videos)
    videos = videos.detach().cpu().contiguous()
    if encoding == "safetensors-base64":
        from safetensors.torch import save

        return {"encoding": encoding, "data": base64.b64encode(save({"videos": videos})).decode("ascii")}
    if encoding == "png-base64":
        from PIL import Image

        frames = []
        for video in videos.numpy():
            encoded = []
            for frame in video:
                buffer = io.BytesIO()
                Image.fromarray(frame).save(buffer, format="PNG", compress_level=1)
                encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
            frames.append(encoded)
        return {"encoding": encoding, "frames": frames}
    raise RewardError(f"unknown video encoding {encoding!r}; choose one of {ENCODINGS}")


def decode_videos(payload: Any, max_pixels: int) -> torch.Tensor:
    """The JSON ``videos`` object -> uint8 [B, F, H, W, 3]; RewardError on anything malformed.

    max_pixels bounds B * F * H * W before any pixel is decoded (a PNG can claim a huge size).
    """
    if not isinstance(payload, dict) or payload.get("encoding") not in ENCODINGS:
        raise RewardError(f"'videos' must be an object with 'encoding' in {ENCODINGS}")
    try:
        if payload["encoding"] == "safetensors-base64":
            videos = decode_safetensors(payload.get("data"), max_pixels)
        else:
            videos = decode_png(payload.get("frames"), max_pixels)
    except RewardError:
        raise
    except Exception as exc:  # bad base64, a corrupt PNG, a decompression bomb: the sender's fault
        raise RewardError(f"cannot decode videos ({payload['encoding']}): {exc}") from exc
    check_videos(videos)
    return videos


def decode_safetensors(data: Any, max_pixels: int) -> torch.Tensor:
    from safetensors.torch import load

    if not isinstance(data, str):
        raise RewardError("'videos.data' must be a base64 string")
    raw = base64.b64decode(data, validate=True)
    header_length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_length])
    tensors = {key: value for key, value in header.items() if key != "__metadata__"}
    if set(tensors) != {"videos"}:
        raise RewardError(f"safetensors payload must hold exactly one tensor 'videos', got {sorted(tensors)}")
    shape = tensors["videos"].get("shape", [])
    if tensors["videos"].get("dtype") != "U8" or len(shape) != 5:
        raise RewardError(f"'videos' must be uint8 [B, F, H, W, 3], got {tensors['videos']}")
    check_pixels(shape, max_pixels)
    return load(raw)["videos"]  # the header was read by hand so the size check comes first


def decode_png(frames: Any, max_pixels: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    if not isinstance(frames, list) or not frames or not all(isinstance(video, list) for video in frames):
        raise RewardError("'videos.frames' must be a list of B lists of base64 PNG frames")
    images = [[Image.open(io.BytesIO(base64.b64decode(frame, validate=True))) for frame in video] for video in frames]
    sizes = {image.size for video in images for image in video}
    lengths = {len(video) for video in images}
    if len(sizes) != 1 or len(lengths) != 1:
        raise RewardError(f"all frames must share one size and all videos one length, got {sizes}, {lengths}")
    (width, height), (length,) = sizes.pop(), lengths
    check_pixels([len(images), length, height, width, 3], max_pixels)
    array = np.stack([np.stack([np.asarray(image.convert("RGB")) for image in video]) for video in images])
    return torch.from_numpy(array)  # [B, F, H, W, 3]


def check_pixels(shape: list[int], max_pixels: int) -> None:
    pixels = 1
    for size in shape[:4]:
        pixels *= int(size)
    if pixels > max_pixels:
        raise PayloadTooLarge(f"videos of shape {list(shape)} exceed the server's limit of {max_pixels} pixels")


def info_to_json(info: dict[str, torch.Tensor]) -> dict[str, list]:
    """Info tensors -> nested lists of floats (entries that are not tensors are dropped)."""
    return {key: value.detach().float().cpu().tolist() for key, value in info.items() if isinstance(value, torch.Tensor)}
