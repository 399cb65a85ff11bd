"""Model-based VBench-style dimensions: subject / background consistency, aesthetic and imaging quality.

Every model is read from a local path given in ``eval.metrics.<name>``; nothing is downloaded.
Definitions follow VBench (``vbench/<dimension>.py``); where ours differs it says so.

- ``subject_consistency``: DINO ViT-B/16 CLS features (VBench loads ``dino_vitb16`` from
  torch.hub; we load a transformers ``ViTModel`` / ``Dinov2Model`` directory such as
  ``facebook/dino-vitb16`` with ``AutoModel``). Frames are resized so the shorter side is the
  processor's size (224), aspect kept, no crop, ImageNet-normalised, as VBench's
  ``dino_transform``. Score per video = mean over frames i >= 1 of
  (max(0, cos(f_i, f_{i-1})) + max(0, cos(f_i, f_0))) / 2.
- ``background_consistency``: the same formula on CLIP ViT-B/32 image embeddings (VBench:
  openai ``clip.encode_image``, i.e. after the visual projection; ours:
  ``CLIPVisionModelWithProjection.image_embeds`` from a transformers CLIP directory, which also
  loads a full ``CLIPModel`` checkpoint such as ``openai/clip-vit-base-patch32``). Shorter side
  resized to 224 (bicubic), centre crop 224, CLIP-normalised, as VBench's ``clip_transform``.
- ``aesthetic_quality``: LAION aesthetic predictor v2 linear head (``sa_0_4_vit_l_14_linear.pth``,
  a ``Linear(768, 1)`` state dict; ``.safetensors`` also read) on L2-normalised CLIP ViT-L/14
  image embeddings, divided by 10, mean over frames.
- ``imaging_quality``: MUSIQ trained on SPAQ (``musiq_spaq_ckpt-358bb6af.pth``) through the
  ``pyiqa`` package, frames in [0, 1] resized so the longer side is at most 512 (VBench's default
  "longer" mode), mean over frames / 100. ``pyiqa`` needs torchvision, whose PyPI wheels are CUDA
  builds that cannot load beside a CPU torch, so this dimension works only where a matching
  torchvision is installed (a GPU machine); pyiqa unpickles the checkpoint (``weights_only=False``).
- ``brisque``: not a VBench dimension. BRISQUE on every 8th frame (the reward module's code, weights in the
  ``brisque`` wheel) as a weight-free no-reference quality stand-in; lower is better.

VBench averages consistency over all frames of all videos; we report the mean of per-video
scores, which is the same when every video has the same number of frames (ours always do).
Resizing uses torch's bilinear / bicubic without antialiasing (VBench's newer ``antialias=False``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F_nn

from flash_grpo_core.metrics.video import as_numpy_videos

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MetricUnavailable(RuntimeError):
    """A dimension cannot run in this environment (a package is missing); reported, not raised."""


def require_local(name: str, key: str, value, kind: str = "dir") -> Path:
    """The existing local path set as ``eval.metrics.<name>.<key>``, or an error naming it."""
    if value is None or value == "":
        raise ValueError(f"eval.metrics.{name}.{key} is not set (local weights are required)")
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"eval.metrics.{name}.{key} = {str(path)!r} does not exist "
                                f"(weights are read from local paths; nothing is downloaded)")
    if kind == "dir" and not path.is_dir():
        raise NotADirectoryError(f"eval.metrics.{name}.{key} = {str(path)!r} is not a directory")
    if kind == "file" and not path.is_file():
        raise IsADirectoryError(f"eval.metrics.{name}.{key} = {str(path)!r} is not a file")
    return path


# ---------------------------------------------------------------------------------------------
# Loading (cached: base and trained videos are scored with one load)


@functools.lru_cache(maxsize=4)
def load_vision(kind: str, path: str, device: str, dtype: str):
    """(model in eval mode, image processor) for kind "dino" (AutoModel) or "clip" (with projection)."""
    from transformers import AutoImageProcessor, AutoModel, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    model_class = AutoModel if kind == "dino" else CLIPVisionModelWithProjection
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a full CLIPModel's unused text weights are expected, not news
    try:
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        model, info = model_class.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype],
                                                  output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot load a {kind} vision model and image processor from {path!r}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    # a weight left at its random initialisation would give plausible-looking, meaningless scores
    missing = [key for key in info["missing_keys"] if not key.startswith("pooler.")]
    if missing:
        raise ValueError(f"the {kind} model in {path!r} lacks weights for {sorted(missing)[:5]} "
                         f"({len(missing)} tensors): not a matching checkpoint")
    return model.to(device).eval(), processor


@functools.lru_cache(maxsize=2)
def load_aesthetic_head(path: str, device: str) -> torch.nn.Linear:
    """The LAION aesthetic linear head from a ``.pth`` or ``.safetensors`` state dict {weight [1, D], bias [1]}."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or set(state) != {"weight", "bias"} or state["weight"].shape[0] != 1:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path!r} is not a Linear(D, 1) state dict with keys weight [1, D] and bias [1]; "
                         f"found {found}")
    head = torch.nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    return head.to(device).eval()


def clear_model_cache() -> None:
    """Drop every cached metric model (frees their memory)."""
    load_vision.cache_clear()
    load_aesthetic_head.cache_clear()
    load_musiq.cache_clear()


# ---------------------------------------------------------------------------------------------
# Preprocessing and features


def processor_geometry(processor, kind: str) -> tuple[int, int | None]:
    """(shorter-side resize, centre-crop size or None) the way VBench's transforms use them."""
    size = processor.size
    shorter = size.get("shortest_edge") or size.get("height")
    crop = processor.crop_size.get("height") if getattr(processor, "do_center_crop", False) else None
    if kind == "dino":  # dino_transform: shorter side to the network's input size, no crop
        return (crop or shorter), None
    return shorter, crop


def preprocess(frames: torch.Tensor, processor, kind: str) -> torch.Tensor:
    """uint8 frames [N, H, W, 3] -> normalised float [N, 3, H', W'] as VBench's dino/clip transforms."""
    shorter, crop = processor_geometry(processor, kind)
    pixels = frames.permute(0, 3, 1, 2).float()  # [N, 3, H, W], 0..255
    height, width = pixels.shape[-2:]
    scale = shorter / min(height, width)
    new_size = (max(shorter, round(height * scale)), max(shorter, round(width * scale)))
    mode = "bilinear" if kind == "dino" else "bicubic"
    pixels = F_nn.interpolate(pixels, size=new_size, mode=mode, align_corners=False, antialias=False)
    if crop is not None:
        top, left = (new_size[0] - crop) // 2, (new_size[1] - crop) // 2
        pixels = pixels[..., top: top + crop, left: left + crop]
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (pixels.clamp(0, 255) / 255.0 - mean) / std  # [N, 3, H', W']


@torch.inference_mode()
def frame_features(video: np.ndarray, model, processor, kind: str, batch_size: int) -> torch.Tensor:
    """One video uint8 [F, H, W, 3] -> float32 features [F, D] (DINO CLS or CLIP image embeds)."""
    device, dtype = model.device, model.dtype
    chunks = []
    for start in range(0, video.shape[0], batch_size):
        pixels = preprocess(torch.from_numpy(video[start: start + batch_size]), processor, kind)
        pixels = pixels.to(device=device, dtype=dtype)  # [n, 3, H', W']
        if kind == "dino":
            extra = {"interpolate_pos_encoding": True} if model.config.model_type == "vit" else {}
            chunks.append(model(pixel_values=pixels, **extra).last_hidden_state[:, 0])  # [n, D]
        else:
            chunks.append(model(pixel_values=pixels).image_embeds)  # [n, D]
    return torch.cat(chunks).float().cpu()  # [F, D]


def consistency(features: torch.Tensor) -> float:
    """VBench's consistency of per-frame features [F, D]: mean over i >= 1 of
    (max(0, cos(f_i, f_{i-1})) + max(0, cos(f_i, f_0))) / 2; 1.0 for a single frame."""
    if features.shape[0] < 2:
        return 1.0
    unit = F_nn.normalize(features.double(), dim=-1)  # [F, D]
    to_previous = (unit[1:] * unit[:-1]).sum(-1).clamp(min=0)  # [F-1]
    to_first = (unit[1:] * unit[:1]).sum(-1).clamp(min=0)  # [F-1]
    return float(((to_previous + to_first) / 2).mean())


# ---------------------------------------------------------------------------------------------
# Dimensions: (videos uint8 [B, F, H, W, 3], options) -> one float per video


def _consistency(name: str, kind: str, videos, path, device, dtype, batch_size) -> list[float]:
    path = require_local(name, "path", path)
    if dtype not in DTYPES:
        raise ValueError(f"eval.metrics.{name}.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model, processor = load_vision(kind, str(path), str(device), dtype)
    return [consistency(frame_features(video, model, processor, kind, batch_size))
            for video in as_numpy_videos(videos)]


def subject_consistency(videos, path=None, device="cpu", dtype="float32", batch_size=32) -> list[float]:
    """VBench subject consistency with a local DINO ViT directory (see the module docstring)."""
    return _consistency("subject_consistency", "dino", videos, path, device, dtype, batch_size)


def background_consistency(videos, path=None, device="cpu", dtype="float32", batch_size=32) -> list[float]:
    """VBench background consistency with a local CLIP directory (see the module docstring)."""
    return _consistency("background_consistency", "clip", videos, path, device, dtype, batch_size)


def aesthetic_quality(videos, path=None, head_path=None, device="cpu", dtype="float32",
                      batch_size=32) -> list[float]:
    """VBench aesthetic quality: LAION head on normalised CLIP ViT-L/14 embeddings / 10, frame mean."""
    clip_path = require_local("aesthetic_quality", "path", path)
    head_file = require_local("aesthetic_quality", "head_path", head_path, kind="file")
    model, processor = load_vision("clip", str(clip_path), str(device), dtype)
    head = load_aesthetic_head(str(head_file), str(device))
    if head.in_features != model.config.projection_dim:
        raise ValueError(f"eval.metrics.aesthetic_quality: head {str(head_file)!r} takes {head.in_features} "
                         f"features but the CLIP model at {str(clip_path)!r} gives {model.config.projection_dim}")
    scores = []
    for video in as_numpy_videos(videos):
        embeddings = F_nn.normalize(frame_features(video, model, processor, "clip", batch_size), dim=-1)  # [F, D]
        with torch.inference_mode():
            frame_scores = head(embeddings.to(head.weight.device)).squeeze(-1) / 10.0  # [F]
        scores.append(float(frame_scores.mean()))
    return scores


@functools.lru_cache(maxsize=1)
def load_musiq(path: str, device: str):
    """pyiqa's MUSIQ with a local checkpoint; MetricUnavailable when pyiqa (or torchvision) cannot load."""
    try:
        from pyiqa.archs.musiq_arch import MUSIQ
    except Exception as exc:  # pyiqa missing, or a torchvision that does not match torch
        raise MetricUnavailable(f"imaging_quality needs pyiqa with a torchvision matching torch "
                                f"(pip install pyiqa): {type(exc).__name__}: {exc}") from exc
    return MUSIQ(pretrained_model_path=path).to(device).eval()


@torch.inference_mode()
def imaging_quality(videos, path=None, device="cpu", batch_size=16, max_side=512) -> list[float]:
    """VBench imaging quality: MUSIQ-SPAQ per frame (longer side <= max_side), frame mean / 100."""
    model = load_musiq(str(require_local("imaging_quality", "path", path, kind="file")), str(device))
    scores = []
    for video in as_numpy_videos(videos):
        pixels = torch.from_numpy(video).permute(0, 3, 1, 2).float()  # [F, 3, H, W]
        height, width = pixels.shape[-2:]
        if max(height, width) > max_side:
            scale = max_side / max(height, width)
            pixels = F_nn.interpolate(pixels, size=(int(scale * height), int(scale * width)),
                                      mode="bilinear", antialias=False)
        frame_scores = torch.cat([model((chunk / 255.0).to(device)).flatten().float().cpu()
                                  for chunk in pixels.split(batch_size)])  # [F]
        scores.append(float(frame_scores.mean()) / 100.0)
    return scores


def brisque(videos, prompts=None, frame_stride=8) -> list[float]:
    """Mean BRISQUE per video (lower is better) through the ``brisque`` reward; not a VBench dimension.

    Every ``frame_stride``-th frame only: BRISQUE takes about 0.5 s per 480x832 frame on one core.
    """
    try:
        from flash_grpo_core.rewards.brisque import BRISQUEReward

        reward = BRISQUEReward(frame_stride=frame_stride)
        reward.ensure_loaded()
    except ImportError as exc:
        raise MetricUnavailable(f"brisque needs the brisque and scikit-image packages: {exc}") from exc
    tensor = torch.from_numpy(as_numpy_videos(videos))
    output = reward(tensor, list(prompts) if prompts is not None else [""] * tensor.shape[0])
    return [float(value) for value in output.info["brisque_raw"]]
