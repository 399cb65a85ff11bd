"""Serve one registered reward over HTTP, so reward models can run on their own GPUs or hosts.

    python -m flash_grpo_core.rewards.server --reward hpsv3 \\
        --option path=/models/HPSv3.safetensors --option base_path=/models/Qwen2-VL-7B-Instruct \\
        --option device=cuda:1 --host 127.0.0.1 --port 8300

``GET /health`` -> {"status": "ok", "reward": name, "loaded": bool}; ``POST /score`` takes and
returns JSON as ``wire.py`` describes. A starlette application served by uvicorn; the model loads
before the port opens. It binds to 127.0.0.1 unless ``--host`` says otherwise, and anywhere else
refuses to start without a bearer token (``--token`` or FLASH_GRPO_REWARD_TOKEN) that every request
must then carry. Each cost of a request is bounded before it is paid (docs/rewards.md has the
options): the body's size (from its Content-Length and again while it streams in), the decoded
frames (a video of at most ``--video-size`` F x H x W pixels a prompt, the resolution the reward
is fed, checked from the safetensors or PNG headers before any pixel is decoded), the time
to send headers and body, the open connections, and the requests decoded and scored at once.

Status codes: 400 malformed, 401 missing or wrong token, 404 wrong reward name or path, 408 body
too slow, 413 over a limit, 422 the reward rejected its input or produced NaN / inf / the wrong
number of scores (deterministic: the client does not retry), 500 any other failure, 503 too many
connections (the client retries both).

Option values are JSON where they parse as JSON (``frame_stride=2``, ``weights={"VQ": 1}``),
strings otherwise (``path=/models/x``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from flash_grpo_core.rewards import build_reward
from flash_grpo_core.rewards.base import RewardError, check_videos
from flash_grpo_core.rewards.client import TOKEN_ENV
from flash_grpo_core.rewards.wire import PayloadTooLarge, decode_videos, info_to_json


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may cost the server; see the module docstring."""

    max_request_bytes: int = 512 * 2**20
    max_batch: int = 16
    video_size: tuple[int, int, int] = (81, 480, 832)  # F, H, W
    concurrency: int = 1
    max_connections: int = 16
    keep_alive_timeout: float = 5.0
    header_timeout: float = 10.0
    body_timeout: float = 120.0

    def __post_init__(self) -> None:
        numbers = [getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "video_size"]
        if len(self.video_size) != 3 or min([*numbers, *self.video_size]) <= 0:
            raise ValueError(f"limits must be positive, got {self}")

    @property
    def video_pixels(self) -> int:
        frames, height, width = self.video_size
        return frames * height * width


class HTTPError(Exception):
    """An answer other than 200: status and message; `close` when the body was not read to its end."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.close = status, close

    def response(self) -> JSONResponse:
        headers = {"Connection": "close"} if self.close else None
        return JSONResponse({"error": str(self)}, self.status, headers=headers)


async def read_body(request: Request, limits: Limits) -> bytearray:
    """The body as it arrives, refused with 413 as soon as it says or proves to be over the limit.
    What the client still sends is discarded, never stored (DeadlineProtocol)."""
    limit = limits.max_request_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request of {declared} bytes exceeds the limit of {limit}")
    body = bytearray()
    try:
        with anyio.fail_after(limits.body_timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise HTTPError(413, f"request body exceeds the limit of {limit} bytes")
    except TimeoutError:
        raise HTTPError(408, f"request body not received within {limits.body_timeout:g} s", close=True) from None
    except ClientDisconnect:
        raise HTTPError(400, "the client went away while sending", close=True) from None
    return body


def read_request(body: bytearray, reward_name: str, limits: Limits) -> tuple[Any, list[str], list[dict] | None]:
    """The JSON body checked, all but its videos: (videos, prompts, metadata)."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HTTPError(400, f"body is not JSON: {exc}") from exc
    if not isinstance(request, dict):
        raise HTTPError(400, "body must be a JSON object")
    if request.get("reward", reward_name) != reward_name:
        raise HTTPError(404, f"this server serves {reward_name!r}, not {request.get('reward')!r}")
    prompts, metadata = request.get("prompts"), request.get("metadata")
    if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
        raise HTTPError(400, "'prompts' must be a list of strings")
    if metadata is not None and not (isinstance(metadata, list) and all(isinstance(m, dict) for m in metadata)):
        raise HTTPError(400, "'metadata' must be null or a list of objects")
    if len(prompts) > limits.max_batch:
        raise HTTPError(413, f"{len(prompts)} videos exceed the batch limit {limits.max_batch}")
    return request.get("videos"), prompts, metadata


class RewardApp:
    """The ASGI application for one reward: the token check, then GET /health and POST /score."""

    def __init__(self, reward, limits: Limits, token: str | None) -> None:
        self.reward, self.limits = reward, limits
        self.token = token.encode() if token else None
        self.scoring = anyio.CapacityLimiter(limits.concurrency)
        routes = [Route("/health", self.health, methods=["GET"]), Route("/score", self.score, methods=["POST"])]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self.no_route})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.token is not None and not self.authorized(scope):
            response = JSONResponse({"error": "missing or wrong bearer token"}, 401,
                                    headers={"WWW-Authenticate": "Bearer", "Connection": "close"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(header, b"Bearer " + self.token)

    async def no_route(self, request: Request, exc: HTTPException) -> JSONResponse:
        message = f"no such path {request.url.path!r} for {request.method}; GET /health or POST /score"
        return JSONResponse({"error": message}, exc.status_code)

    async def health(self, request: Request) -> JSONResponse:
        loaded = getattr(self.reward, "loaded", True)
        return JSONResponse({"status": "ok", "reward": self.reward.name, "loaded": loaded})

    async def score(self, request: Request) -> JSONResponse:
        try:
            body = await read_body(request, self.limits)
            # Parsing runs in a thread too: a large body must not stall /health.
            videos, prompts, metadata = await anyio.to_thread.run_sync(
                read_request, body, self.reward.name, self.limits)
            del body  # not needed while it waits for its turn
            async with self.scoring:  # decoded frames exist only here, for `concurrency` requests at most
                if await request.is_disconnected():  # e.g. its client timed out while it waited
                    return JSONResponse({"error": "the client went away"}, 400)
                answer = await anyio.to_thread.run_sync(self.decode_and_score, videos, prompts, metadata)
        except HTTPError as error:
            return error.response()
        except Exception as exc:  # noqa: BLE001 (any other failure becomes a retryable 500)
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, 500)
        return JSONResponse(answer)

    def decode_and_score(self, videos: Any, prompts: list[str], metadata: list[dict] | None) -> dict[str, Any]:
        # The pixel budget: one video of video_size per prompt. decode_videos checks it on the
        # safetensors header or the PNG headers, before any pixel is decoded (a few KB of PNG can
        # claim 6000 x 6000 pixels).
        budget = len(prompts) * self.limits.video_pixels
        try:
            frames = decode_videos(videos, budget)  # [B, F, H, W, 3]
            check_videos(frames, prompts)
        except PayloadTooLarge as exc:
            size = "x".join(map(str, self.limits.video_size))
            raise HTTPError(413, f"{exc} ({len(prompts)} prompt(s) x at most {size} F x H x W pixels a video, "
                                 "--video-size); nothing was decoded") from exc
        except RewardError as exc:
            raise HTTPError(400, str(exc)) from exc
        try:
            output = self.reward(frames, prompts, metadata)
        except RewardError as exc:
            raise HTTPError(422, str(exc)) from exc
        return {"reward": self.reward.name, "scores": output.scores.tolist(), "info": info_to_json(output.info)}


class DeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, changed twice. A connection that has not sent a request's headers
    within `header_timeout` s of opening or of its previous answer is closed (uvicorn's keep-alive
    timer starts after a first answer only, and restarts with every byte). And closing lingers, as
    nginx's does: the answer goes out with a FIN, what the client still sends (the rest of a refused
    body) is discarded for up to `header_timeout` s, then the socket closes; closing at once with
    unread data would reset the connection, and a client still sending would lose the answer."""

    def __init__(self, *args, header_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout, self.lingering = header_timeout, False

    def connection_made(self, transport) -> None:
        super().connection_made(LingeringTransport(transport, self))
        self.loop.call_later(self.header_timeout, self.headers_due, None)

    def data_received(self, data: bytes) -> None:
        if not self.lingering:
            super().data_received(data)

    def on_response_complete(self) -> None:
        answered = self.cycle  # a pipelined request may replace it during the call below
        super().on_response_complete()
        self.loop.call_later(self.header_timeout, self.headers_due, answered)

    def headers_due(self, cycle) -> None:
        if self.cycle is cycle and not self.transport.is_closing():  # no request has begun since
            self.transport.close()


class LingeringTransport:
    """The transport as DeadlineProtocol hands it to uvicorn: close() lingers."""

    def __init__(self, transport, protocol: DeadlineProtocol) -> None:
        self.transport, self.protocol = transport, protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)

    def is_closing(self) -> bool:
        return self.protocol.lingering or self.transport.is_closing()

    def close(self) -> None:
        if self.is_closing():
            return
        self.protocol.lingering = True
        self.transport.resume_reading()  # read to discard: unread data would reset the connection
        if self.transport.can_write_eof():
            self.transport.write_eof()  # after what is buffered: the answer
        self.protocol.loop.call_later(self.protocol.header_timeout, self.transport.close)


class RewardServer:
    """uvicorn serving a RewardApp on a socket bound at construction (port 0 has its number then)."""

    def __init__(self, app: RewardApp, sock: socket.socket) -> None:
        limits = app.limits
        self.app, self.socket, self.thread = app, sock, None
        self.server = uvicorn.Server(uvicorn.Config(
            app, http=functools.partial(DeadlineProtocol, header_timeout=limits.header_timeout), lifespan="off",
            limit_concurrency=limits.max_connections, timeout_keep_alive=limits.keep_alive_timeout,
            timeout_graceful_shutdown=30, log_config=None, proxy_headers=False))

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def run(self) -> None:
        """Serve until stop(), or SIGINT / SIGTERM when called from the main thread."""
        self.server.run(sockets=[self.socket])

    def start(self) -> str:
        """Serve from a background thread; the URL once it accepts connections."""
        self.thread = threading.Thread(target=self.run, name="reward-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the reward server did not start")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=60)
        self.socket.close()


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one (127.0.0.0/8, ::1)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def exposure_problem(host: str, token: str | None) -> str | None:
    """Why the server may not listen on `host` with this token; None when it may."""
    if token or is_loopback(host):
        return None
    return (f"refusing to listen on {host!r} without a bearer token: anything but loopback needs "
            f"{TOKEN_ENV} (or --token)")


def make_server(reward, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                **limits: Any) -> RewardServer:
    """A server for an already built reward (port 0 picks a free port), its model loaded, its socket
    bound; `limits` are Limits' fields. `.start()` serves from a thread, `.run()` here."""
    problem = exposure_problem(host, token)
    if problem:
        raise ValueError(problem)
    app = RewardApp(reward, Limits(**limits), token)
    if hasattr(reward, "ensure_loaded"):
        reward.ensure_loaded()
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    return RewardServer(app, sock)


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


def video_size(text: str) -> tuple[int, int, int]:
    try:
        frames, height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FxHxW such as 81x480x832, got {text!r}") from None
    return frames, height, width


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    defaults = Limits()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", required=True, help="registered reward name")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="reward factory option")
    parser.add_argument("--host", default="127.0.0.1", help="anything but loopback needs a token")
    parser.add_argument("--port", type=int, default=8300, help="0 picks a free port")
    parser.add_argument("--token", default=None, help=f"bearer token (prefer {TOKEN_ENV}: argv is visible to ps)")
    parser.add_argument("--max-request-mb", type=float, default=defaults.max_request_bytes / 2**20)
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="videos per request")
    parser.add_argument("--video-size", type=video_size, default=defaults.video_size, metavar="FxHxW",
                        help="the largest video a request may hold, in frames x height x width")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="requests scored at once")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections)
    for name in ("keep_alive_timeout", "header_timeout", "body_timeout"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name), metavar="S")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:  # before the model loads
        others = (getattr(args, field.name) for field in dataclasses.fields(Limits)[1:])  # named alike
        limits = Limits(int(args.max_request_mb * 2**20), *others)
        problem = exposure_problem(args.host, token)
        if problem:
            raise ValueError(problem)
        reward = build_reward(args.reward, **parse_options(args.option))  # checks its options, loads nothing
    except (KeyError, TypeError, ValueError) as error:  # bad limits or host; unknown reward, option or value
        print(f"reward server: {error.args[0] if error.args else error}", file=sys.stderr)
        return 2
    try:
        server = make_server(reward, args.host, args.port, token=token, **dataclasses.asdict(limits))
    except OSError as error:
        print(f"reward server: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[reward-server] %(message)s", stream=sys.stderr)
    # uvicorn shuts down gracefully on SIGTERM, then raises it again: exit 0 then.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"serving reward {reward.name!r} on {server.url}", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.socket.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
