"""One rollout sample on the wire: the `RolloutRecord` type and its WebDataset samples (SPEC 4).

A record is what training needs from one rollout sample; its decoded video travels apart, as a
video sample. `to_sample` / `from_sample` and `video_sample` / `video_from_sample` are the one pair
of conversions between them and the raw bytes of a WebDataset sample (`shards.py` writes and reads
the tar shards that hold them). Tensors are safetensors bytes and metadata is sorted UTF-8 JSON, so
reading a sample never runs code and the bytes are reproducible.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from flash_grpo_core.artifacts.atomic import loads_finite
from flash_grpo_core.artifacts.tar_io import ShardError

FORMAT = "flash-grpo-rollout/2"
ENTRIES = ("json", "tensors.safetensors")
TENSOR_FIELDS = ("steps", "latents", "next_latents", "log_probs")
OPTIONAL_TENSOR_FIELDS = ("final_latents",)  # the forward-process modes' clean sample (`nft`, `awm`)
VIDEO_ENTRY = "video.safetensors"
META_FIELDS = {"prompt_id": str, "prompt": str, "prompt_index": int, "group_index": int, "iteration": int, "seed": int}
_KEY = re.compile(r"[A-Za-z0-9_-]{1,80}")  # 80 + len(".tensors.safetensors") fits a ustar name (100)


@dataclass
class RolloutRecord:
    """One rollout sample's training data (T trained steps; latents [C, F, H, W] per step); its
    decoded video is stored apart (`write_shards`' `videos`, `read_videos`).

    key: str                   unique sample key without dots, e.g. `it0003-p000012-g05`
    prompt_id: str             stable prompt id from the curate stage
    prompt: str                the prompt text
    prompt_index: int          index of the prompt in its iteration's prompt list
    group_index: int           position g in the prompt's group, 0 <= g < G
    iteration: int             training iteration that produced the rollout
    seed: int                  the rollout seed of that iteration
    steps: [T] long            trained step indices k
    latents: [T, C, F, H, W]   x_{t_k}, any floating dtype (bfloat16 included)
    next_latents: [T, C, F, H, W] x_{t_{k+1}}, same shape and dtype as latents
    log_probs: [T] float32     log p_old of next_latents given latents
    final_latents: [C, F, H, W] or None  the sample after the last step, for the modes that train on
                               the forward process (`nft`, `awm`: their records hold T = 0 steps)
    """

    key: str
    prompt_id: str
    prompt: str
    prompt_index: int
    group_index: int
    iteration: int
    seed: int
    steps: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    final_latents: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.validate()

    def _error(self, name: str, problem: str) -> ShardError:
        return ShardError(f"record {self.key!r}: field {name!r}: {problem}")

    def validate(self) -> None:
        """Raise ShardError naming the key and field if any field breaks the format."""
        if not isinstance(self.key, str) or not _KEY.fullmatch(self.key):
            raise ShardError(f"record key {self.key!r}: keys are 1-80 characters of [A-Za-z0-9_-] "
                             "(no dots: webdataset splits a member name into key and field at the first dot)")
        for name, kind in META_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise self._error(name, f"expected {kind.__name__}, got {type(value).__name__}")
        for name in ("prompt_index", "group_index", "iteration"):
            if getattr(self, name) < 0:
                raise self._error(name, f"must be >= 0, got {getattr(self, name)}")
        for name in TENSOR_FIELDS:
            if not isinstance(getattr(self, name), torch.Tensor):
                raise self._error(name, f"expected a torch.Tensor, got {type(getattr(self, name)).__name__}")
        self._validate_tensors()

    def _validate_tensors(self) -> None:
        steps, latents, next_latents = self.steps, self.latents, self.next_latents
        if steps.dtype != torch.long or steps.dim() != 1:
            raise self._error("steps", f"expected long [T], got {steps.dtype} {list(steps.shape)}")
        if latents.dim() != 5 or not latents.is_floating_point():
            raise self._error("latents", f"expected floating [T, C, F, H, W], "
                                         f"got {latents.dtype} {list(latents.shape)}")
        if latents.shape[0] != steps.shape[0]:
            raise self._error("steps", f"length {steps.shape[0]} != latents' T = {latents.shape[0]}")
        if next_latents.shape != latents.shape or next_latents.dtype != latents.dtype:
            raise self._error("next_latents", f"{next_latents.dtype} {list(next_latents.shape)} differs from "
                                              f"latents' {latents.dtype} {list(latents.shape)}")
        if self.log_probs.dtype != torch.float32 or self.log_probs.shape != steps.shape:
            raise self._error("log_probs", f"expected float32 [{steps.shape[0]}], "
                                           f"got {self.log_probs.dtype} {list(self.log_probs.shape)}")
        final = self.final_latents
        if final is not None and (not isinstance(final, torch.Tensor) or final.dim() != 4
                                  or not final.is_floating_point()):
            found = f"{final.dtype} {list(final.shape)}" if isinstance(final, torch.Tensor) else type(final).__name__
            raise self._error("final_latents", f"expected floating [C, F, H, W] or none, got {found}")

    def to_sample(self) -> dict[str, str | bytes]:
        """The WebDataset sample: `__key__` (str), `json` and `tensors.safetensors` (bytes)."""
        self.validate()
        meta = {"format": FORMAT, "key": self.key, **{name: getattr(self, name) for name in META_FIELDS}}
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in self._present_fields()}
        return {
            "__key__": self.key,
            "json": json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
            "tensors.safetensors": save_safetensors(tensors),
        }

    def _present_fields(self) -> tuple[str, ...]:
        return TENSOR_FIELDS + tuple(name for name in OPTIONAL_TENSOR_FIELDS if getattr(self, name) is not None)

    @classmethod
    def from_sample(cls, sample: dict) -> RolloutRecord:
        """Rebuild a record from a sample of raw bytes (ours, or `wds.WebDataset`'s with no decoding).

        Entries whose names start with `_` (`__key__`, `__url__`, ...) are metadata; any other entry
        than `json` and `tensors.safetensors` is an error.
        """
        key = sample.get("__key__")
        where = f"record {key!r}" if key is not None else "record"
        entries = sorted(name for name in sample if not name.startswith("_"))
        if entries != sorted(ENTRIES):
            raise ShardError(f"{where}: expected entries {list(ENTRIES)}, found {entries}")
        meta = _parse_meta(sample["json"], where)
        if key is not None and meta["key"] != key:
            raise ShardError(f"{where}: field 'json': its key {meta['key']!r} differs from the sample key")
        tensors = _load_tensors(sample, "tensors.safetensors", TENSOR_FIELDS, f"record {meta['key']!r}",
                                optional=OPTIONAL_TENSOR_FIELDS)
        return cls(key=meta["key"], **{name: meta[name] for name in META_FIELDS}, **tensors)


def video_sample(key: str, video: torch.Tensor) -> dict[str, str | bytes]:
    """The WebDataset sample of one record's video: `__key__` (str) and `video.safetensors` (bytes)."""
    check_video(key, video)
    return {"__key__": key, VIDEO_ENTRY: save_safetensors({"video": video.detach().cpu().contiguous()})}


def video_from_sample(sample: dict) -> tuple[str, torch.Tensor]:
    """(key, video uint8 [F', H', W', 3]) from a video shard's sample of raw bytes (`__key__` and
    `video.safetensors`; other `_`-prefixed entries such as webdataset's `__url__` are ignored)."""
    key = sample.get("__key__")
    entries = sorted(name for name in sample if not name.startswith("_"))
    if not isinstance(key, str) or not _KEY.fullmatch(key) or entries != [VIDEO_ENTRY]:
        raise ShardError(f"video sample {key!r}: expected a key of [A-Za-z0-9_-] and entries {[VIDEO_ENTRY]}, "
                         f"found {entries}")
    video = _load_tensors(sample, VIDEO_ENTRY, ("video",), f"record {key!r}")["video"]
    check_video(key, video)
    return key, video


def check_video(key: str, video) -> None:
    if not isinstance(video, torch.Tensor) or video.dtype != torch.uint8 or video.dim() != 4 or video.shape[-1] != 3:
        found = f"{video.dtype} {list(video.shape)}" if isinstance(video, torch.Tensor) else type(video).__name__
        raise ShardError(f"record {key!r}: field 'video': expected uint8 [F, H, W, 3], got {found}")


def _load_tensors(sample: dict, field: str, names: Sequence[str], where: str,
                  optional: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    try:
        tensors = load_safetensors(bytes(sample[field]))
    except Exception as error:  # safetensors raises its own (Rust-side) error types for bad bytes
        raise ShardError(f"{where}: field {field!r}: not a readable safetensors file ({error})") from error
    if sorted(set(tensors) - set(optional)) != sorted(names):
        also = f" (and optionally {sorted(optional)})" if optional else ""
        raise ShardError(f"{where}: field {field!r}: expected tensors {sorted(names)}{also}, found {sorted(tensors)}")
    return tensors


def _parse_meta(raw, where: str) -> dict:
    try:
        meta = loads_finite(bytes(raw).decode("utf-8"))
    except (ValueError, TypeError) as error:  # ValueError: not UTF-8, not JSON, non-finite
        raise ShardError(f"{where}: field 'json': not valid UTF-8 JSON of finite numbers ({error})") from error
    expected = {"format", "key", *META_FIELDS}
    if not isinstance(meta, dict) or set(meta) != expected:
        found = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ShardError(f"{where}: field 'json': expected keys {sorted(expected)}, found {found}")
    if meta["format"] != FORMAT:
        raise ShardError(f"{where}: field 'json': format {meta['format']!r}, this reader knows {FORMAT!r}")
    return meta


def check_unique_keys(records: Sequence[RolloutRecord]) -> None:
    seen: set[str] = set()
    for record in records:
        if record.key in seen:
            raise ShardError(f"record key {record.key!r} occurs twice")
        seen.add(record.key)
