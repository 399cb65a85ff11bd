"""``RemoteReward``: the reward protocol over HTTP, talking to ``flash_grpo_core.rewards.server``.

    reward = build_reward("remote", url="http://10.0.0.5:8300", name="hpsv3", max_batch=16)
    output = reward(videos, prompts, metadata)          # scores [B], info {key: [B]}

In params.yaml: ``reward.options.remote: {url: ..., name: ...}``. Batches larger than
``max_batch`` are split into several requests (keep it at or below the server's
``--max-batch``). Each request gets ``timeout`` seconds; connection failures, timeouts and 5xx
answers are retried ``retries`` times, waiting ``backoff * 2**attempt`` seconds (at most
``max_backoff``); any 4xx answer fails at once, since sending the same request again cannot
help. Every failure is a RewardError naming the reward and the URL. ``frame_stride`` (which the
pipeline passes to every reward) keeps every n-th frame before sending, so the server's reward
should run with stride 1. The scores that come back
go through the same checks as a local reward's (count, NaN / inf), so a broken server fails the
score stage instead of training on garbage. A server that is not on loopback wants a bearer token:
``token``, or the environment variable FLASH_GRPO_REWARD_TOKEN (better: params.yaml is versioned);
a wrong one is a 401, not retried. Standard library HTTP only; JSON only.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import torch

from flash_grpo_core.rewards.base import (
    RewardError,
    RewardOutput,
    RewardUnavailable,
    check_videos,
    register,
    select_frames,
    validate_output,
)
from flash_grpo_core.rewards.wire import ENCODINGS, encode_videos

sleep = time.sleep  # module-level so tests can record the backoff without sleeping
TOKEN_ENV = "FLASH_GRPO_REWARD_TOKEN"


class TransientError(Exception):
    """A failure worth retrying (connection, timeout, 5xx)."""


@dataclass(frozen=True)
class RemoteOptions:
    """``reward.options.remote``, checked (see the module docstring); an unknown option is a TypeError."""

    url: str
    name: str
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 30.0
    max_batch: int = 16
    encoding: str = "safetensors-base64"
    frame_stride: int = 1
    token: str | None = field(default=None, repr=False)  # a secret: kept out of the repr

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise RewardError(f"reward 'remote': url must start with http:// or https://, got {self.url!r}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise RewardError(f"reward 'remote': max_batch must be a positive integer, got {self.max_batch!r}")
        if not isinstance(self.retries, int) or self.retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise RewardError("reward 'remote': need retries >= 0, timeout > 0 and backoff >= 0")
        if self.encoding not in ENCODINGS:
            raise RewardError(f"reward 'remote': encoding must be one of {ENCODINGS}, got {self.encoding!r}")


@register("remote", required=("url", "name"), hint="the reward server's address")
class RemoteReward:
    """A reward computed by a reward server at ``url`` (see the module docstring), built from
    ``RemoteOptions``' keywords."""

    def __init__(self, **options: Any) -> None:
        o = self.options = RemoteOptions(**options)
        self.url = o.url.rstrip("/")
        self.name = o.name
        self.timeout = float(o.timeout)
        self.retries = o.retries
        self.backoff = float(o.backoff)
        self.max_backoff = float(o.max_backoff)
        self.max_batch = o.max_batch
        self.encoding = o.encoding
        self.frame_stride = o.frame_stride
        self.token = o.token or os.environ.get(TOKEN_ENV) or None

    def __call__(self, videos: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> RewardOutput:
        check_videos(videos, prompts)
        videos = select_frames(videos, self.frame_stride)  # [B, F', H, W, 3]: fewer bytes on the wire
        parts = []
        for start in range(0, videos.shape[0], self.max_batch):
            stop = start + self.max_batch
            chunk_meta = None if metadata is None else list(metadata[start:stop])
            parts.append(self.score_chunk(videos[start:stop], list(prompts[start:stop]), chunk_meta))
        scores = torch.cat([part.scores for part in parts])  # [B]
        keys = set.intersection(*(set(part.info) for part in parts))
        info = {key: torch.cat([part.info[key] for part in parts]) for key in sorted(keys)}
        return validate_output(self.name, RewardOutput(scores=scores, info=info), videos.shape[0])

    def score_chunk(self, videos: torch.Tensor, prompts: list[str], metadata: list[dict] | None) -> RewardOutput:
        body = {
            "reward": self.name,
            "prompts": prompts,
            "metadata": metadata,
            "videos": encode_videos(videos, self.encoding),
        }
        answer = self.post("/score", json.dumps(body).encode("utf-8"))
        if not isinstance(answer, dict):
            raise RewardError(f"reward {self.name!r} at {self.url} answered {type(answer).__name__}, not an object")
        scores = answer.get("scores")
        if not isinstance(scores, list) or len(scores) != len(prompts):
            count = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise RewardError(
                f"reward {self.name!r} at {self.url} returned {count} scores for {len(prompts)} videos"
            )
        try:
            tensor = torch.tensor([float(score) for score in scores])  # [b]
        except (TypeError, ValueError) as exc:
            raise RewardError(f"reward {self.name!r} at {self.url} returned non-numeric scores") from exc
        info = {}
        for key, value in (answer.get("info") or {}).items():
            try:
                tensor_value = torch.tensor(value, dtype=torch.float32)  # [b, ...]
            except (TypeError, ValueError, RuntimeError):
                continue  # diagnostics only: a malformed entry is dropped, not fatal
            if tensor_value.ndim >= 1 and tensor_value.shape[0] == len(prompts):
                info[key] = tensor_value
        try:
            return validate_output(self.name, RewardOutput(scores=tensor, info=info), len(prompts))
        except RewardError as exc:
            raise RewardError(f"{exc} (served at {self.url})") from exc

    def post(self, path: str, data: bytes) -> dict[str, Any]:
        """POST JSON with retries on transient failures; the decoded JSON answer."""
        for attempt in range(self.retries + 1):
            try:
                return self.request(path, data)
            except TransientError as exc:
                if attempt == self.retries:
                    raise RewardUnavailable(
                        f"reward {self.name!r} at {self.url}{path} failed after {attempt + 1} attempt(s): {exc}"
                    ) from exc
                sleep(min(self.backoff * 2**attempt, self.max_backoff))
        raise AssertionError("unreachable")

    def request(self, path: str, data: bytes | None = None) -> dict[str, Any]:
        """One HTTP request; TransientError or RewardError on failure."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            self.url + path, data=data, method="POST" if data is not None else "GET", headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            message = error_message(exc)
            if exc.code >= 500:
                raise TransientError(f"HTTP {exc.code}: {message}") from exc
            raise RewardError(f"reward {self.name!r} at {self.url}{path}: HTTP {exc.code}: {message}") from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise TransientError(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from exc
        except json.JSONDecodeError as exc:
            raise RewardError(f"reward {self.name!r} at {self.url}{path} answered with invalid JSON") from exc

    def health(self) -> dict[str, Any]:
        """The server's /health answer (no retries)."""
        try:
            return self.request("/health")
        except TransientError as exc:
            raise RewardError(f"reward {self.name!r} at {self.url}/health: {exc}") from exc


def error_message(error: urllib.error.HTTPError) -> str:
    """The server's {"error": ...} message, or the raw reason."""
    try:
        return str(json.loads(error.read()).get("error", error.reason))
    except (json.JSONDecodeError, AttributeError, ValueError, OSError):
        return str(error.reason)
