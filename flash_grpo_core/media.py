"""Writing sample videos people can look at: animated GIFs (Pillow), alone or side by side."""

from __future__ import annotations

import os

import torch

from flash_grpo_core.atomic import atomic_path


def write_gif(video: torch.Tensor, path: str | os.PathLike, fps: int = 8) -> None:
    """An animated GIF of a uint8 video [F, H, W, 3], written atomically."""
    from PIL import Image

    if video.dtype != torch.uint8 or video.dim() != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a uint8 video [F, H, W, 3], got {video.dtype} {tuple(video.shape)}")
    frames = [Image.fromarray(frame.numpy()) for frame in video]
    with atomic_path(path) as temporary:
        frames[0].save(temporary, format="GIF", save_all=True, append_images=frames[1:],
                       duration=max(1, round(1000 / fps)), loop=0)


def side_by_side(*videos: torch.Tensor, gap: int = 2) -> torch.Tensor:
    """Videos [F, H, W, 3] of equal F and H joined left to right with white gaps."""
    frames, height = videos[0].shape[0], videos[0].shape[1]
    spacer = torch.full((frames, height, gap, 3), 255, dtype=torch.uint8)
    parts = [part for video in videos for part in (video, spacer)][:-1]
    return torch.cat(parts, dim=2)
