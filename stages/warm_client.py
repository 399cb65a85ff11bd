"""The warm stage runner's client side: a stage started as `python -m stages.<name>` hands itself to
the warm server (stages/warm.py) when one is listening for this checkout, and runs cold otherwise.

Everything here is light (no torch): it runs at the start of every stage process, before the stage
imports anything heavy. The protocol is one JSON line per message over a Unix socket, the caller's
standard streams passed as file descriptors with the first message.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("flash_grpo_core", "stages")
# Environment variables that libraries read when they are imported: a stage whose values differ
# from the server's runs cold, since the server's modules were imported under the server's values.
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "DIFFUSERS", "TORCH", "PYTORCH", "CUDA", "OMP_", "MKL_",
                   "OPENBLAS", "PYTHON", "LD_", "TOKENIZERS")
CHILD_FLAG = "FLASH_GRPO_WARM_CHILD"
MAX_MESSAGE = 1 << 20


def socket_path(root: Path = ROOT) -> Path:
    """The server's socket for the checkout at `root` (FLASH_GRPO_WARM_SOCKET overrides it)."""
    override = os.environ.get("FLASH_GRPO_WARM_SOCKET")
    if override:
        return Path(override)
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"flash-grpo-warm-{os.getuid()}-{digest}.sock"


def import_environment(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key.startswith(IMPORT_TIME_ENV) and key != CHILD_FLAG}


def send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = (json.dumps(message) + "\n").encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def lines(sock: socket.socket):
    buffer = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield json.loads(line)


def delegate() -> int | None:
    """Run this `python -m stages.<name>` process's stage in the warm server; its exit code, or None
    when it must run here (no server, or one that could behave differently: see the module doc)."""
    main = sys.modules.get("__main__")
    module = getattr(getattr(main, "__spec__", None), "name", "") or ""
    if (os.environ.get("FLASH_GRPO_WARM") == "0" or os.environ.get(CHILD_FLAG) == "1"
            or not module.startswith("stages.")):
        return None
    path = socket_path()
    if not path.exists():
        return None
    try:
        streams = [stream.fileno() for stream in (sys.stdin, sys.stdout, sys.stderr)]
    except (AttributeError, OSError, ValueError):
        return None  # a closed standard stream: nothing to hand over
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5.0)
        sock.connect(str(path))
        send(sock, {"module": module, "argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ),
                     "root": str(ROOT)}, fds=streams)
        replies = lines(sock)
        reply = next(replies, None)
    except (OSError, ValueError) as error:
        sock.close()
        print(f"warm: running cold: {path}: {error}", file=sys.stderr)
        return None  # no server listening (a stale socket), or one that went away
    if not reply or "fallback" in reply:
        sock.close()
        print(f"warm: running cold: {reply.get('fallback') if reply else 'no reply'}", file=sys.stderr)
        return None
    sock.settimeout(None)
    previous = {}

    def forward(signum, _frame):
        try:
            send(sock, {"signal": signum})
        except OSError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[signum] = signal.signal(signum, forward)
    try:
        for reply in replies:
            if "exit" in reply:
                return int(reply["exit"])
        return 1  # the server went away mid-stage (it kills the stage when that happens)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sock.close()
