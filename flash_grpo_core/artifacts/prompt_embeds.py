"""The prompt embeddings of one iteration's rollouts, stored beside its shards.

The rollout stage encodes its prompts once and writes `prompt_embeds.safetensors` into the rollout
directory; the update stage reads them instead of loading the text encoder (UMT5-XXL for Wan 2.1,
about 11 GB in bfloat16) only to encode the same prompts again. They are also exactly the
embeddings the rollout sampled with, so the update's old-policy log-probabilities match it.

The file holds `cond` [B, L', D] (the iteration's prompts, in order) and, with guidance, `uncond`
[1, L', D] (the negative prompt), in the transformer's dtype. Encoders zero every position past a
prompt's last token, so L' stops at the last position any prompt uses and reading pads back to the
full text length with zeros: the same tensors, a fraction of the bytes. The metadata names the
prompts and the full text length, so a file that does not belong to the rollout read with it is
refused, and the sha256 of the tensors and metadata (`write_safetensors`; `shards.json` lists only
the shards), so a corrupt file is refused too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from flash_grpo_core.artifacts.tar_io import ShardError

FILE_NAME = "prompt_embeds.safetensors"
FORMAT = "flash-grpo-prompt-embeds/1"


def save_prompt_embeds(directory: str | os.PathLike, prompts: list[str], cond: torch.Tensor,
                       uncond: torch.Tensor | None) -> Path:
    """Write `cond` [B, L, D] for `prompts` and `uncond` [1, L, D] (or None) atomically; returns the path."""
    from flash_grpo_core.artifacts.safetensors_io import write_safetensors

    if cond.ndim != 3 or cond.shape[0] != len(prompts):
        raise ValueError(f"cond {list(cond.shape)}: expected [B={len(prompts)}, L, D]")
    if uncond is not None and (uncond.ndim != 3 or uncond.shape[0] != 1 or uncond.shape[1:] != cond.shape[1:]):
        raise ValueError(f"uncond {list(uncond.shape)}: expected [1, {cond.shape[1]}, {cond.shape[2]}]")
    tensors = {"cond": cond} if uncond is None else {"cond": cond, "uncond": uncond}
    used = max(_used_length(tensor) for tensor in tensors.values())
    path = Path(directory) / FILE_NAME
    write_safetensors({name: tensor[:, :used].detach().cpu() for name, tensor in tensors.items()}, path,
                      {"format": FORMAT, "prompts": prompts, "text_len": cond.shape[1]})
    return path


def load_prompt_embeds(directory: str | os.PathLike, prompts: list[str], device: torch.device | str = "cpu",
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cond [B, L, D] in the order of `prompts`, uncond [1, L, D] or None) from a rollout directory.

    Raises ShardError naming the file when it is missing, unreadable, or holds other prompts.
    """
    from flash_grpo_core.artifacts.safetensors_io import read_safetensors

    path = Path(directory) / FILE_NAME
    if not path.is_file():
        raise ShardError(f"{path}: missing; the rollout stage writes it with the shards (rerun that stage)")
    try:
        tensors, metadata = read_safetensors(path)
        stored, text_len = list(metadata["prompts"]), int(metadata["text_len"])
        valid = metadata.get("format") == FORMAT and tensors["cond"].shape[0] == len(stored)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ShardError(f"{path}: not a readable prompt embeddings file ({error}); is it truncated?") from error
    if not valid:
        raise ShardError(f"{path}: not a {FORMAT!r} file")
    rows = {prompt: row for row, prompt in enumerate(stored)}
    missing = [prompt for prompt in prompts if prompt not in rows]
    if missing:
        raise ShardError(f"{path}: holds no embedding for prompt(s) {missing[:3]}; it belongs to another rollout")
    cond = _pad(tensors["cond"][[rows[prompt] for prompt in prompts]], text_len).to(device)
    uncond = _pad(tensors["uncond"], text_len).to(device) if "uncond" in tensors else None
    return cond, uncond


def _used_length(embeds: torch.Tensor) -> int:
    """1 + the last sequence position of [B, L, D] with a nonzero entry (at least 1)."""
    nonzero = embeds.detach().ne(0).any(dim=-1).any(dim=0).nonzero()  # [n, 1]
    return int(nonzero[-1]) + 1 if len(nonzero) else 1


def _pad(embeds: torch.Tensor, text_len: int) -> torch.Tensor:
    """[B, L', D] zero-padded along the sequence to [B, text_len, D]."""
    return torch.nn.functional.pad(embeds, (0, 0, 0, text_len - embeds.shape[1]))
