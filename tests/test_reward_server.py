"""The reward server and RemoteReward on loopback ports that each test opens and closes.

Covers: the CLI process end to end, batch splitting, both wire encodings, request limits and
malformed requests, retries with exponential backoff on 5xx / refused connections / timeouts,
no retry on 4xx, bad outputs (NaN, wrong count, a scale jump) failing with the reward named, and
a hostile client's costs: an oversized body, a PNG bomb, stalled connections, no token.
"""

import base64
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from flash_grpo_core.rewards import RewardError, RewardOutput, WeightedReward, build_reward
from flash_grpo_core.rewards import client as client_module
from flash_grpo_core.rewards import server as server_module
from flash_grpo_core.rewards.base import RewardUnavailable
from flash_grpo_core.rewards.server import make_server, parse_options
from flash_grpo_core.rewards.wire import decode_videos, encode_videos

ROOT = Path(__file__).resolve().parents[1]


def videos_of(batch, frames=3, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, size, size, 3), dtype=torch.uint8, generator=generator)


class StubReward:
    """Mean pixel value times ``scale``; can fail its first ``failures`` calls, sleep, or return NaN."""

    name = "stub"

    def __init__(self, scale=1.0, failures=0, delay=0.0, nan=False):
        self.scale, self.failures, self.delay, self.nan = scale, failures, delay, nan
        self.calls, self.batch_sizes, self.frame_counts, self.spans = 0, [], [], []

    def __call__(self, videos, prompts, metadata=None):
        self.calls += 1
        self.batch_sizes.append(videos.shape[0])
        self.frame_counts.append(videos.shape[1])
        began = time.monotonic()
        time.sleep(self.delay)
        self.spans.append((began, time.monotonic()))
        if self.calls <= self.failures:
            raise RuntimeError("CUDA out of memory (simulated)")
        if self.nan:
            raise RewardError("reward 'stub' produced 1 non-finite score(s)")
        scores = videos.float().mean(dim=(1, 2, 3, 4)) * self.scale  # [B]
        return RewardOutput(scores=scores, info={"prompt_length": torch.tensor([float(len(p)) for p in prompts])})


@pytest.fixture
def serve():
    """serve(reward, **limits) -> url of a running in-process server; all are stopped afterwards."""
    servers = []

    def start(reward, **limits):
        server = make_server(reward, "127.0.0.1", 0, **limits)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def sleeps(monkeypatch):
    """Record the client's backoff sleeps instead of sleeping."""
    recorded = []
    monkeypatch.setattr(client_module, "sleep", recorded.append)
    return recorded


# ------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def cli_server():
    """(process, url) of the CLI serving brightness, 1 MB a request; it must exit 0 on SIGTERM."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "FLASH_GRPO_REWARD_TOKEN": ""}
    command = [sys.executable, "-m", "flash_grpo_core.rewards.server", "--reward", "brightness",
               "--option", "frame_stride=2", "--port", "0", "--max-batch", "4", "--max-request-mb", "1"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    try:
        line = process.stdout.readline()  # "serving reward 'brightness' on http://127.0.0.1:PORT"
        assert "serving reward 'brightness' on http://127.0.0.1:" in line
        yield process, line.split(" on ")[1].strip()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        process.stdout.close()


def test_cli_server_process_scores_like_the_local_reward(cli_server):
    _, url = cli_server
    remote = build_reward("remote", url=url, name="brightness", max_batch=4)
    assert remote.health() == {"status": "ok", "reward": "brightness", "loaded": True}
    videos, prompts = videos_of(6), [f"prompt {i}" for i in range(6)]
    local = build_reward("brightness", frame_stride=2)(videos, prompts)
    torch.testing.assert_close(remote(videos, prompts).scores, local.scores)


@pytest.mark.parametrize("encoding", ["safetensors-base64", "png-base64"])
def test_client_splits_batches_and_returns_local_scores(serve, encoding):
    stub = StubReward()
    url = serve(stub)
    remote = build_reward("remote", url=url, name="stub", max_batch=2, encoding=encoding)
    videos, prompts = videos_of(5), ["a", "bb", "ccc", "dddd", "eeeee"]
    out = remote(videos, prompts, [{"fps": 16}] * 5)
    assert stub.batch_sizes == [2, 2, 1]  # 5 videos in requests of at most 2
    assert stub.frame_counts == [3, 3, 3]
    torch.testing.assert_close(out.scores, videos.float().mean(dim=(1, 2, 3, 4)))
    torch.testing.assert_close(out.info["prompt_length"], torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))


def test_client_applies_the_pipelines_frame_stride_before_sending(serve):
    stub = StubReward()
    remote = build_reward("remote", url=serve(stub), name="stub", frame_stride=2)  # as reward_from_params passes it
    videos = videos_of(2, frames=5)
    out = remote(videos, ["a", "b"])
    assert stub.frame_counts == [3]  # frames 0, 2, 4
    torch.testing.assert_close(out.scores, videos[:, ::2].float().mean(dim=(1, 2, 3, 4)))


def test_remote_options_keep_their_names_defaults_and_checks():
    remote = build_reward("remote", url="http://127.0.0.1:1/", name="stub", token="s3cret")
    assert (remote.url, remote.name, remote.timeout, remote.retries, remote.backoff, remote.max_backoff,
            remote.max_batch, remote.encoding, remote.frame_stride, remote.token) == (
        "http://127.0.0.1:1", "stub", 120.0, 3, 1.0, 30.0, 16, "safetensors-base64", 1, "s3cret")
    assert "s3cret" not in repr(remote.options)
    with pytest.raises(TypeError, match="'bogus'"):  # validate turns it into "reward.options: ..."
        build_reward("remote", url="http://127.0.0.1:1", name="stub", bogus=1)
    with pytest.raises(RewardError, match="max_batch must be a positive integer, got 0"):
        build_reward("remote", url="http://127.0.0.1:1", name="stub", max_batch=0)
    with pytest.raises(RewardError, match="url must start with http:// or https://"):
        build_reward("remote", url="127.0.0.1:1", name="stub")


def test_wire_round_trip_is_exact_and_never_pickles():
    videos = videos_of(2, frames=2, size=5)
    for encoding in ("safetensors-base64", "png-base64"):
        assert torch.equal(decode_videos(encode_videos(videos, encoding), max_pixels=10**6), videos)
    with pytest.raises(RewardError, match="encoding"):
        decode_videos({"encoding": "pickle", "data": "gASVAAAAAAAAAAB9lC4="}, max_pixels=10**6)
    with pytest.raises(RewardError, match="limit of 99 pixels"):
        decode_videos(encode_videos(videos), max_pixels=99)  # 2 * 2 * 5 * 5 = 100 pixels


def test_parse_options_reads_json_values_and_plain_strings():
    options = parse_options(["path=/models/x", "frame_stride=2", "top_fraction=3e-05", 'weights={"VQ": 1}'])
    assert options == {"path": "/models/x", "frame_stride": 2, "top_fraction": 3e-05, "weights": {"VQ": 1}}


# ------------------------------------------------------------------------------------------------
# Limits, malformed and hostile requests (4xx: never retried): size, pixels, connections, time, token


def post(url, body: bytes):
    request = urllib.request.Request(url + "/score", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_server_rejects_malformed_and_oversized_requests(serve):
    url = serve(StubReward(), max_batch=2, max_request_bytes=20_000)
    good = {"reward": "stub", "prompts": ["a"], "videos": encode_videos(videos_of(1))}
    assert post(url, json.dumps(good).encode())[0] == 200
    assert post(url, b"{not json")[0] == 400
    assert post(url, json.dumps({**good, "prompts": "a"}).encode())[0] == 400
    assert post(url, json.dumps({**good, "prompts": ["a", "b"]}).encode())[0] == 400  # 1 video, 2 prompts
    assert post(url, json.dumps({**good, "reward": "hpsv3"}).encode()) == (
        404, {"error": "this server serves 'stub', not 'hpsv3'"})
    too_many = {"reward": "stub", "prompts": ["a"] * 3, "videos": encode_videos(videos_of(3))}
    assert post(url, json.dumps(too_many).encode())[0] == 413  # batch limit 2
    big = {"reward": "stub", "prompts": ["a"], "videos": encode_videos(videos_of(1, size=64))}
    status, answer = post(url, json.dumps(big).encode())  # about 50 kB > 20 kB
    assert status == 413 and "exceeds the limit" in answer["error"]


def test_client_gets_4xx_once_and_names_the_url(serve, sleeps):
    stub = StubReward()
    url = serve(stub, max_batch=1)
    remote = build_reward("remote", url=url, name="stub", max_batch=2, retries=3)
    with pytest.raises(RewardError, match=rf"'stub' at {url}/score: HTTP 413: 2 videos exceed the batch limit 1"):
        remote(videos_of(2), ["a", "b"])
    assert sleeps == [] and stub.calls == 0
    nan = StubReward(nan=True)
    with pytest.raises(RewardError, match=r"HTTP 422: reward 'stub' produced 1 non-finite"):
        build_reward("remote", url=serve(nan), name="stub", retries=3)(videos_of(1), ["a"])
    assert nan.calls == 1 and sleeps == []


def exchange(url, head: bytes, chunks=(), timeout=15.0):
    """Send `head`, then `chunks` until the server answers: (status, body, bytes of chunks sent)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sent, answer = 0, b""
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # answered before the body ended
            sock.sendall(chunk)
            sent += len(chunk)
        while data := sock.recv(65536):
            answer += data
    return int(answer.split()[1]), answer.partition(b"\r\n\r\n")[2], sent


def peak_memory(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    return int(Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1].split()[0]) * 1024


def test_an_oversized_body_is_refused_as_it_streams_in(cli_server, sleeps):
    process, url = cli_server  # --max-request-mb 1
    before = peak_memory(process.pid)
    head = b"POST /score HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    megabyte = b"x" * 2**20
    chunked = (b"%x\r\n%s\r\n" % (len(megabyte), megabyte) for _ in range(256))  # 256 MB, no Content-Length
    status, body, sent = exchange(url, head + b"Transfer-Encoding: chunked\r\n\r\n", chunked)
    assert status == 413 and b"exceeds the limit of 1048576 bytes" in body
    assert sent < 64 * 2**20  # answered long before the body's end
    status, body, _ = exchange(url, head + b"Content-Length: 10000000000\r\n\r\n")  # the body never sent
    assert status == 413 and b"request of 10000000000 bytes exceeds the limit" in body
    assert peak_memory(process.pid) - before < 32 * 2**20  # not the body: a few MB at most
    remote = build_reward("remote", url=url, name="brightness", retries=3)
    with pytest.raises(RewardError, match=r"HTTP 413: request of \d+ bytes exceeds the limit of 1048576"):
        remote(videos_of(1, frames=4, size=1024), ["a"])  # 16 MB sent whole: the answer survives
    assert sleeps == [] and remote.health()["status"] == "ok"


def test_black_pngs_over_the_pixel_budget_are_refused_before_decoding(serve, monkeypatch):
    from PIL import Image, ImageFile

    loads, original_load = [], ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: loads.append(image.size) or original_load(image))
    stub = StubReward()
    url = serve(stub)  # the default budget: 81 x 480 x 832 pixels a video (Wan 2.1 at 480p)
    small = {"reward": "stub", "prompts": ["a"], "videos": encode_videos(videos_of(1), "png-base64")}
    assert post(url, json.dumps(small).encode())[0] == 200 and loads  # the spy sees PNGs decoded
    loads.clear()
    png = io.BytesIO()
    Image.new("1", (6000, 6000)).save(png, format="PNG")  # black, a few KB
    frames = [[base64.b64encode(png.getvalue()).decode("ascii")] * 4]
    request = json.dumps({"reward": "stub", "prompts": ["a"], "videos": {"encoding": "png-base64", "frames": frames}})
    assert len(request) < 200_000  # 432 MB of pixels once decoded
    status, answer = post(url, request.encode())
    assert status == 413 and "[1, 4, 6000, 6000, 3]" in answer["error"] and "--video-size" in answer["error"]
    assert loads == [] and stub.calls == 1  # not one pixel decoded, the reward not called


def test_a_token_is_required_off_loopback_and_enforced_when_set(serve, sleeps, monkeypatch, capsys):
    monkeypatch.delenv("FLASH_GRPO_REWARD_TOKEN", raising=False)
    monkeypatch.setattr(server_module, "build_reward", lambda *a, **k: pytest.fail("the model must not load"))
    assert server_module.main(["--reward", "brightness", "--host", "0.0.0.0", "--port", "0"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "refusing to listen on '0.0.0.0' without a bearer token" in error
    with pytest.raises(ValueError, match="without a bearer token"):
        make_server(StubReward(), "0.0.0.0", 0)
    assert server_module.is_loopback("localhost") and server_module.is_loopback("127.0.0.2")
    assert not server_module.is_loopback("") and not server_module.is_loopback("::")
    stub = StubReward()  # on loopback a token is optional; once set, it is enforced
    url = serve(stub, token="s3cret")
    for header in (b"", b"Authorization: Bearer wrong\r\n", b"Authorization: s3cret\r\n"):
        assert exchange(url, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s\r\n" % header)[0] == 401
    with pytest.raises(RewardError, match="HTTP 401: missing or wrong bearer token"):
        build_reward("remote", url=url, name="stub", retries=3)(videos_of(1), ["a"])
    assert sleeps == [] and stub.calls == 0  # a 401 is not retried
    assert build_reward("remote", url=url, name="stub", token="s3cret")(videos_of(1), ["a"]).scores.shape == (1,)
    monkeypatch.setenv("FLASH_GRPO_REWARD_TOKEN", "s3cret")
    assert build_reward("remote", url=url, name="stub").health()["status"] == "ok"


def test_stalled_connections_are_capped_then_dropped(serve):
    url = serve(StubReward(), max_connections=4, header_timeout=2.0, body_timeout=1.0)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    health = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    stalled = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
    for sock in stalled:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")  # headers begun, never finished
    assert exchange(url, health)[0] == 503  # no fifth connection's work while they hang
    assert all(sock.recv(1) == b"" for sock in stalled)  # dropped after the header timeout, not 10 s
    for sock in stalled:
        sock.close()
    deadline = time.monotonic() + 5
    while exchange(url, health)[0] != 200:  # once the server has seen them close
        assert time.monotonic() < deadline
        time.sleep(0.05)
    slow_body = b"POST /score HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1000\r\n\r\n{"
    status, body, _ = exchange(url, slow_body)
    assert status == 408 and b"not received within 1 s" in body


def test_only_the_configured_number_of_requests_score_at_once(serve):
    stub = StubReward(delay=0.3)
    remote = build_reward("remote", url=serve(stub, concurrency=2), name="stub")
    with ThreadPoolExecutor(5) as pool:
        scored = [pool.submit(remote, videos_of(1), ["a"]) for _ in range(5)]
        time.sleep(0.1)
        assert remote.health()["status"] == "ok"  # answers while they score
    assert all(future.result().scores.shape == (1,) for future in scored)
    most_at_once = max(sum(start <= began < end for start, end in stub.spans) for began, _ in stub.spans)
    assert len(stub.spans) == 5 and most_at_once == 2


# ------------------------------------------------------------------------------------------------
# Transient failures (retried with exponential backoff)


def test_client_retries_5xx_with_exponential_backoff(serve, sleeps):
    stub = StubReward(failures=2)
    remote = build_reward("remote", url=serve(stub), name="stub", retries=3, backoff=0.5)
    out = remote(videos_of(1), ["a"])
    assert stub.calls == 3 and sleeps == [0.5, 1.0]  # backoff * 2**attempt
    assert torch.isfinite(out.scores).all()
    failing = StubReward(failures=10)
    remote = build_reward("remote", url=serve(failing), name="stub", retries=1, backoff=0.5)
    with pytest.raises(RewardError, match=r"'stub' at http://127.0.0.1:\d+/score failed after 2 attempt\(s\): HTTP 500"):
        remote(videos_of(1), ["a"])
    assert failing.calls == 2


def test_client_retries_refused_connections_and_caps_the_backoff(sleeps):
    with socket.socket() as sock:  # bound, not listening: refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        remote = build_reward("remote", url=url, name="hpsv3", retries=4, backoff=1.0, max_backoff=3.0)
        with pytest.raises(RewardUnavailable, match=rf"'hpsv3' at {url}/score failed after 5 attempt\(s\)"):
            remote(videos_of(1), ["a"])
    assert sleeps == [1.0, 2.0, 3.0, 3.0]


def test_client_times_out_a_slow_server(serve, sleeps):
    remote = build_reward("remote", url=serve(StubReward(delay=1.0)), name="stub", timeout=0.2, retries=1)
    with pytest.raises(RewardError, match="failed after 2 attempt"):
        remote(videos_of(1), ["a"])
    assert sleeps == [1.0]


# ------------------------------------------------------------------------------------------------
# Bad outputs from a misbehaving server


class CannedHandler(BaseHTTPRequestHandler):
    """Answers every POST with the server's ``answer`` JSON text."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        data = self.server.answer.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "answer, message",
    [
        ('{"scores": [NaN, 1.0]}', r"'stub' produced 1 non-finite score\(s\) \(1 NaN.*served at http://127.0.0.1:\d+"),
        ('{"scores": [1.0, Infinity]}', r"1 non-finite score\(s\) \(0 NaN, 1 inf\) at batch indices \[1\]"),
        ('{"scores": [1.0]}', r"'stub' at http://127.0.0.1:\d+ returned 1 scores for 2 videos"),
        ('{"scores": ["high", 1.0]}', "non-numeric scores"),
        ("<html>oops</html>", "invalid JSON"),
    ],
)
def test_bad_remote_outputs_fail_naming_the_reward(answer, message):
    server = ThreadingHTTPServer(("127.0.0.1", 0), CannedHandler)
    server.answer = answer
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        remote = build_reward("remote", url=f"http://127.0.0.1:{server.server_address[1]}", name="stub")
        with pytest.raises(RewardError, match=message):
            remote(videos_of(2), ["a", "b"])
    finally:
        server.shutdown()
        server.server_close()


def test_a_remote_reward_jumping_scale_fails_the_weighted_reward(serve):
    stub = StubReward(scale=0.01)
    options = {"remote": {"url": serve(stub), "name": "stub"}}
    reward = WeightedReward({"remote": 1.0}, options, scale_guard=True)
    for seed in range(6):
        reward(videos_of(4, seed=seed), ["a"] * 4)
    stub.scale = 100.0  # e.g. the server restarted with other weights
    with pytest.raises(RewardError, match=r"reward 'remote' batch mean .* std from its history"):
        reward(videos_of(4, seed=7), ["a"] * 4)
