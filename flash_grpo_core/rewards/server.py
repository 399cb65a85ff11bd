"""Serve one registered reward over HTTP, so reward models can run on their own GPUs or hosts.

    python -m flash_grpo_core.rewards.server --reward hpsv3 \\
        --option path=/models/HPSv3.safetensors --option base_path=/models/Qwen2-VL-7B-Instruct \\
        --option device=cuda:1 --host 127.0.0.1 --port 8300

``GET /health`` -> {"status": "ok", "reward": name, "loaded": bool}; ``POST /score`` takes and
returns JSON as ``wire.py`` describes. Binds to 127.0.0.1 unless ``--host`` says otherwise (use a
cluster-internal address, never a public one: there is no authentication). The model is loaded
before the port opens. Requests are scored one at a time (a lock around the reward: one model
on one device), while /health stays answerable. Limits: ``--max-request-mb`` on the body (413),
``--max-batch`` videos per request (413; the client splits batches to fit), ``--max-pixels`` on
B * F * H * W (413). Status codes: 400 malformed request, 404 wrong reward name or path,
422 the reward rejected its input or produced NaN / inf / the wrong number of scores
(deterministic: the client does not retry), 500 any other failure (the client retries).

Option values are JSON where they parse as JSON (``frame_stride=2``, ``weights={"VQ": 1}``),
strings otherwise (``path=/models/x``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from flash_grpo_core.rewards import build_reward
from flash_grpo_core.rewards.base import RewardError, check_videos
from flash_grpo_core.rewards.wire import PayloadTooLarge, decode_videos, info_to_json


class RewardHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding one reward and its limits."""

    daemon_threads = True

    def __init__(self, address, reward, max_request_bytes: int, max_batch: int, max_pixels: int) -> None:
        super().__init__(address, RewardHandler)
        self.reward = reward
        self.max_request_bytes = max_request_bytes
        self.max_batch = max_batch
        self.max_pixels = max_pixels
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class RequestError(Exception):
    """An HTTP error to send back: status and message."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class RewardHandler(BaseHTTPRequestHandler):
    server: RewardHTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/health":
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}"})
            return
        reward = self.server.reward
        self.send_json(HTTPStatus.OK, {"status": "ok", "reward": reward.name, "loaded": getattr(reward, "loaded", True)})

    def do_POST(self) -> None:
        try:
            if self.path.rstrip("/") != "/score":
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such path {self.path!r}; POST /score")
            self.send_json(HTTPStatus.OK, self.score(self.read_json()))
        except RequestError as exc:
            self.send_json(exc.status, {"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 (any other failure becomes a retryable 500)
            self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})

    def read_json(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        if int(length) > self.server.max_request_bytes:
            self.close_connection = True  # the unread body must not be parsed as a next request
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request of {int(length)} bytes exceeds the limit of {self.server.max_request_bytes}",
            )
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        return body

    def score(self, body: dict[str, Any]) -> dict[str, Any]:
        reward = self.server.reward
        if body.get("reward", reward.name) != reward.name:
            raise RequestError(HTTPStatus.NOT_FOUND, f"this server serves {reward.name!r}, not {body.get('reward')!r}")
        prompts, metadata = body.get("prompts"), body.get("metadata")
        if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
            raise RequestError(HTTPStatus.BAD_REQUEST, "'prompts' must be a list of strings")
        if metadata is not None and not (isinstance(metadata, list) and all(isinstance(m, dict) for m in metadata)):
            raise RequestError(HTTPStatus.BAD_REQUEST, "'metadata' must be null or a list of objects")
        if len(prompts) > self.server.max_batch:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{len(prompts)} videos exceed the batch limit {self.server.max_batch}"
            )
        try:
            videos = decode_videos(body.get("videos"), self.server.max_pixels)
            check_videos(videos, prompts)
        except RewardError as exc:
            too_large = isinstance(exc, PayloadTooLarge)
            status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if too_large else HTTPStatus.BAD_REQUEST
            raise RequestError(status, str(exc)) from exc
        with self.server.lock:
            try:
                output = reward(videos, prompts, metadata)
            except RewardError as exc:
                raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)) from exc
        return {"reward": reward.name, "scores": output.scores.tolist(), "info": info_to_json(output.info)}

    def send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. its timeout)
            self.close_connection = True
            self.log_message("client disconnected before the answer (HTTP %d) was sent", int(status))

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"[reward-server] {self.address_string()} {format % args}\n")


def make_server(
    reward,
    host: str = "127.0.0.1",
    port: int = 0,
    max_request_bytes: int = 512 * 2**20,
    max_batch: int = 64,
    max_pixels: int = 2**31,
) -> RewardHTTPServer:
    """A server for an already built reward (port 0 picks a free port); load its model first."""
    if hasattr(reward, "ensure_loaded"):
        reward.ensure_loaded()
    return RewardHTTPServer((host, port), reward, max_request_bytes, max_batch, max_pixels)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """["key=value", ...] -> {key: JSON value, or the string if it is not JSON}."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", required=True, help="registered reward name")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="reward factory option")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8300, help="0 picks a free port")
    parser.add_argument("--max-request-mb", type=float, default=512.0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-pixels", type=int, default=2**31, help="limit on B * F * H * W per request")
    args = parser.parse_args(argv)
    reward = build_reward(args.reward, **parse_options(args.option))
    server = make_server(
        reward, args.host, args.port, int(args.max_request_mb * 2**20), args.max_batch, args.max_pixels
    )
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"serving reward {reward.name!r} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
