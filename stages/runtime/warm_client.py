"""The warm stage runner's client side: a stage started as `python -m stages.<name>` hands itself to
the warm server (stages/runtime/warm.py) when one is listening for this checkout, and runs cold otherwise.

Everything here is light (no torch): it runs at the start of every stage process, before the stage
imports anything heavy. The protocol is one JSON line per message over a Unix socket, the caller's
standard streams passed as file descriptors with the first message.

Before it sends anything the client checks that the socket can only be the user's own server: its
folder is owned by the user and closed to group and others (`$XDG_RUNTIME_DIR` when it is such a
folder, else `/tmp/flash-grpo-warm-<uid>/`, which the server creates with mode 0700), the socket is a
socket owned by the user, and the process listening on it runs as the user (SO_PEERCRED). Otherwise
it says why in one line and runs cold: an impostor never sees the stage's environment, arguments or
standard streams. `FLASH_GRPO_WARM_SOCKET` moves the socket; the same checks apply to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("flash_grpo_core", "stages")
# Environment variables that libraries read when they are imported: a stage whose values differ
# from the server's runs cold, since the server's modules were imported under the server's values.
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "DIFFUSERS", "TORCH", "PYTORCH", "CUDA", "OMP_", "MKL_",
                   "OPENBLAS", "PYTHON", "LD_", "TOKENIZERS")
CHILD_FLAG = "FLASH_GRPO_WARM_CHILD"
MAX_MESSAGE = 1 << 20


def socket_path(root: Path = ROOT) -> Path:
    """The server's socket for the checkout at `root` (FLASH_GRPO_WARM_SOCKET overrides it), in
    this user's private folder (`socket_folder`)."""
    override = os.environ.get("FLASH_GRPO_WARM_SOCKET")
    if override:
        return Path(override)
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return socket_folder() / f"flash-grpo-warm-{digest}.sock"


def socket_folder() -> Path:
    """$XDG_RUNTIME_DIR when it is private to this user, else a per-user folder in the temp folder
    (created by the server with mode 0700, refused by both sides when it is anyone else's)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and folder_problem(Path(runtime)) is None:
        return Path(runtime)
    return Path(tempfile.gettempdir()) / f"flash-grpo-warm-{os.getuid()}"


def folder_problem(folder: Path) -> str | None:
    """Why `folder` may not hold the warm socket (None when it is a folder of this user's that group
    and others cannot enter): anyone who can write to it could put their own socket there."""
    try:
        info = os.stat(folder)
    except OSError as error:
        return f"cannot inspect {folder}: {error.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{folder} is not a folder"
    if info.st_uid != os.getuid():
        return f"{folder} belongs to uid {info.st_uid}, not {os.getuid()}"
    if info.st_mode & 0o077:
        return f"{folder} is open to group or others (mode {stat.S_IMODE(info.st_mode):o}, needs 700)"
    return None


def socket_problem(path: Path, info: os.stat_result) -> str | None:
    """Why the file at `path` (lstat `info`) is not this user's server socket; None when it is."""
    if not stat.S_ISSOCK(info.st_mode):
        return f"{path} is not a socket"
    if info.st_uid != os.getuid():
        return f"{path} belongs to uid {info.st_uid}, not {os.getuid()}"
    return folder_problem(path.parent)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process listening on the other end of a connected Unix socket (Linux)."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return uid


def connect(path: Path) -> socket.socket | None:
    """A connection to this user's warm server at `path`, or None: no socket there (quietly), or one
    that cannot be trusted with the stage's environment and terminal (saying why, in one line)."""
    try:
        info = os.lstat(path)
    except OSError:
        return None  # no server
    problem = socket_problem(path, info)
    sock = None
    if problem is None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5.0)
            sock.connect(str(path))
            uid = peer_uid(sock)
            if uid != os.getuid():
                problem = f"its server runs as uid {uid}, not {os.getuid()}"
        except (OSError, AttributeError) as error:  # AttributeError: no SO_PEERCRED on this platform
            problem = str(error)  # e.g. a stale socket of a server that died
    if problem is None:
        return sock
    if sock is not None:
        sock.close()
    print(f"warm: running cold: {path}: {problem}", file=sys.stderr)
    return None


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
    try:
        streams = [stream.fileno() for stream in (sys.stdin, sys.stdout, sys.stderr)]
    except (AttributeError, OSError, ValueError):
        return None  # a closed standard stream: nothing to hand over
    path = socket_path()
    sock = connect(path)
    if sock is None:
        return None
    try:
        send(sock, {"module": module, "argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ),
                     "root": str(ROOT)}, fds=streams)
        replies = lines(sock)
        reply = next(replies, None)
    except (OSError, ValueError) as error:
        sock.close()
        print(f"warm: running cold: {path}: {error}", file=sys.stderr)
        return None  # a server that went away
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
