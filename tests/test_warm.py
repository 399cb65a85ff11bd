"""The warm stage runner (stages/runtime/warm.py): same outputs as a cold stage, exit codes and streams passed
through, current code on disk, cold runs where the warm one could differ, a dead client's stage stopped,
and a client that hands nothing to a socket that is not its own user's server's."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flash_grpo_core.pipeline.workspace import copy_project, tool_env
from stages.runtime import warm_client
from stages.runtime.warm import Server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A project copy with a warm runner listening on its own socket; yields (project, env, log path).

    The runner starts with SIGINT ignored, as a script's background job (`... &`) starts it, and
    must still stop on SIGINT (Ctrl-C) at the end.
    """
    project = copy_project(ROOT, tmp_path_factory.mktemp("warm-project"), preset="tiny")
    socket_path = tmp_path_factory.mktemp("sock") / "warm.sock"
    env = tool_env(FLASH_GRPO_WARM_SOCKET=str(socket_path))
    log = project / "warm.log"
    with open(log, "w") as handle:
        server = subprocess.Popen([sys.executable, "-m", "stages.runtime.warm"], cwd=project, env=env, stdout=handle,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 120
    while "listening" not in log.read_text():
        assert server.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    yield project, env, log
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        pytest.fail("the warm runner did not stop on SIGINT")
    assert "warm: stopped" in log.read_text() and not socket_path.exists()  # the socket removed on the way out


def _stage(project, env, *args, **extra):
    return subprocess.run([sys.executable, "-m", *args], cwd=project, env={**env, **extra}, capture_output=True,
                          text=True, timeout=300)


def _served(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("warm: stages.")]


def test_warm_stage_writes_the_same_bytes_as_a_cold_one(warm, tmp_path):
    project, env, log = warm
    before = len(_served(log))
    hot = _stage(project, env, "stages.init", "--out", str(tmp_path / "hot"), "--reward-state", str(tmp_path / "h.json"))
    assert hot.returncode == 0, hot.stderr
    assert len(_served(log)) == before + 1 and "stages.init" in _served(log)[-1]
    assert hot.stdout.startswith("init: preset=tiny")  # the stage's output reaches the caller's stdout
    cold = _stage(project, env, "stages.init", "--out", str(tmp_path / "cold"), "--reward-state",
                  str(tmp_path / "c.json"), FLASH_GRPO_WARM="0")
    assert cold.returncode == 0 and len(_served(log)) == before + 1  # FLASH_GRPO_WARM=0 runs here
    for name in ("trainable.safetensors", "ema.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "hot" / name).read_bytes() == (tmp_path / "cold" / name).read_bytes(), name


def test_exit_code_and_error_message_pass_through(warm, tmp_path):
    project, env, log = warm
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  mode: fastest\n")
    result = _stage(project, env, "stages.init", "--params", str(bad), "--out", str(tmp_path / "out"),
                    "--reward-state", str(tmp_path / "s.json"))
    assert result.returncode == 2 and "init: error:" in result.stderr and "train.mode" in result.stderr
    assert "stages.init --params" in _served(log)[-1]  # it did run warm
    assert not (tmp_path / "out").exists()


def test_each_stage_imports_the_current_code(warm, tmp_path):
    project, env, log = warm
    module = project / "stages" / "init.py"
    original = module.read_text()
    module.write_text(original.replace('if __name__ == "__main__":', 'print("edited code")\n\nif __name__ == "__main__":'))
    try:
        result = _stage(project, env, "stages.init", "--out", str(tmp_path / "c"), "--reward-state",
                        str(tmp_path / "s.json"))
    finally:
        module.write_text(original)
    assert result.returncode == 0 and "edited code" in result.stdout
    assert "stages.init" in _served(log)[-1]


def test_a_different_import_time_environment_runs_cold(warm, tmp_path):
    project, env, log = warm
    before = len(_served(log))
    result = _stage(project, env, "stages.init", "--out", str(tmp_path / "c"), "--reward-state",
                    str(tmp_path / "s.json"), TORCH_SHOW_CPP_STACKTRACES="1")
    assert result.returncode == 0 and "running cold: environment differs" in result.stderr
    assert len(_served(log)) == before


def test_a_pythonpath_that_repeats_the_server_s_path_is_no_difference(tmp_path):
    """A Prefect worker's flow runs carry a PYTHONPATH of the workspace's own path: a stage with it
    imports what the server imported, so it runs warm; a folder the server's path lacks does not."""
    from stages.runtime.warm import differing_environment

    server = {"OMP_NUM_THREADS": "1"}
    on_path = os.pathsep.join([*[entry for entry in sys.path if entry][-2:], ""])  # folders of this process's path
    assert differing_environment({**server, "PYTHONPATH": on_path}, server) == []
    assert differing_environment({**server, "PYTHONPATH": str(tmp_path)}, server) == ["PYTHONPATH"]
    assert differing_environment({"OMP_NUM_THREADS": "2", "PYTHONPATH": on_path}, server) == ["OMP_NUM_THREADS"]


def test_a_killed_client_stops_its_stage(warm, tmp_path):
    project, env, log = warm
    client = subprocess.Popen([sys.executable, "-m", "stages.pretrain", "--out", str(tmp_path / "base"),
                               "--steps", "100000"], cwd=project, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (_served(log) and "stages.pretrain" in _served(log)[-1]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    pid = int(_served(log)[-1].rsplit("(pid ", 1)[1].rstrip(")"))
    time.sleep(1.0)
    os.kill(pid, 0)  # the stage runs in the server's child
    client.kill()
    client.wait()
    deadline = time.monotonic() + 20
    while _alive(pid):
        assert time.monotonic() < deadline, "the stage outlived its client"
        time.sleep(0.1)
    assert not (tmp_path / "base" / "transformer.safetensors").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is gone


def test_a_stage_of_another_checkout_runs_cold(warm, tmp_path):
    _, env, log = warm
    before = len(_served(log))
    result = _stage(ROOT, env, "stages.init", "--out", str(tmp_path / "c"), "--reward-state", str(tmp_path / "s.json"))
    assert result.returncode == 0 and "running cold: the server runs the checkout at" in result.stderr
    assert len(_served(log)) == before


def _lazy_third_party_imports() -> set[str]:
    """Third-party modules that the core and the stages import inside functions (installed ones)."""
    import ast
    from importlib.util import find_spec

    found = set()
    for path in [*(ROOT / "flash_grpo_core").rglob("*.py"), *(ROOT / "stages").rglob("*.py")]:
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    found.add(node.module)
    return {name for name in found if name.split(".")[0] not in {*sys.stdlib_module_names, "flash_grpo_core", "stages"}
            and find_spec(name.split(".")[0]) is not None}


def test_the_server_imports_what_the_stages_import_lazily():
    from stages.runtime.warm import OPTIONAL_LIBRARIES

    lazy = _lazy_third_party_imports()
    assert {"pyarrow.parquet", "cv2", "ruamel.yaml"} <= lazy  # the scan sees imports inside functions
    probe = ("import json, sys\nfrom stages.runtime import warm\nwarm.warm_up()\n"
             "print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=tool_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    imported = set(json.loads(result.stdout.splitlines()[-1]))
    missing = {name for name in lazy - imported
               if not any(name == optional or name.startswith(optional + ".") for optional in OPTIONAL_LIBRARIES)}
    assert not missing, f"every warm stage would import these again: {sorted(missing)}"
    assert not any(name.split(".")[0] == "flash_grpo_core" for name in imported)  # the project's code is dropped
    extras = {name for name in imported if any(name == optional or name.startswith(optional + ".")
                                               for optional in OPTIONAL_LIBRARIES)}
    assert not extras, f"warming up imported optional extras: {sorted(extras)}"


def test_the_pre_imported_modules_are_those_the_stages_import(tmp_path):
    """PROJECT_MODULES is read from the stages' source: a new stage's imports (inside its functions
    too, a submodule named in `from ... import`) are pre-imported without a list to edit."""
    from stages.runtime.warm import PROJECT_MODULES, project_modules

    assert {"flash_grpo_core.engine.iteration", "flash_grpo_core.models.wan", "flash_grpo_core.artifacts.shards",
            "flash_grpo_core.pipeline.report", "flash_grpo_core.engine.distributed"} <= set(PROJECT_MODULES)
    assert all(name.startswith("flash_grpo_core.") or name == "flash_grpo_core" for name in PROJECT_MODULES)
    stages = tmp_path / "stages"
    shutil.copytree(ROOT / "stages", stages, ignore=shutil.ignore_patterns("__pycache__"))
    assert project_modules(stages, ROOT) == PROJECT_MODULES
    (stages / "probe.py").write_text(
        "import json\n\nfrom stages.runtime import common\n\n\ndef work(args):\n"
        "    import flash_grpo_core.method.sde\n"
        "    from flash_grpo_core.artifacts import checksums\n"
        "    from flash_grpo_core.method.schedule import flow_sigmas\n"
        "    from . import validate\n")
    new = {"flash_grpo_core.method.sde", "flash_grpo_core.artifacts.checksums", "flash_grpo_core.method.schedule"}
    assert set(project_modules(stages, ROOT)) == set(PROJECT_MODULES) | new


# ------------------------------------------------------------------------------------------------
# Whose socket: the client sends its environment, argv and standard streams only to its own user's
# server, in a folder nobody else can write to.

OTHER_UID = 65534  # nobody
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="giving files to another uid needs root")


def _private_folder(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o700)  # whatever the umask
    return path


class Listener:
    """A socket at `path` that records whatever a client sends it: an impostor's server."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self.sock.settimeout(0.05)
        self.received, self.stop = b"", threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    self.received += conn.recv(1 << 20)
                except OSError:
                    pass

    def close(self) -> bytes:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()
        return self.received


@pytest.fixture
def stage_client(monkeypatch, tmp_path):
    """delegate_from(socket) -> (delegate()'s result, its stderr), called as `python -m stages.init`
    with real standard streams and a planted secret in its environment."""
    monkeypatch.setitem(sys.modules, "__main__", SimpleNamespace(__spec__=SimpleNamespace(name="stages.init")))
    monkeypatch.delenv("FLASH_GRPO_WARM", raising=False)
    monkeypatch.delenv(warm_client.CHILD_FLAG, raising=False)
    monkeypatch.setenv("PLANTED_SECRET", "do-not-leak")
    stderr = tmp_path / "client-stderr.txt"

    def delegate_from(path: Path):
        monkeypatch.setenv("FLASH_GRPO_WARM_SOCKET", str(path))
        with (monkeypatch.context() as patch, open(os.devnull) as stdin, open(os.devnull, "w") as stdout,
              open(stderr, "w") as err):
            for name, stream in (("stdin", stdin), ("stdout", stdout), ("stderr", err)):
                patch.setattr(sys, name, stream)
            result = warm_client.delegate()
        return result, stderr.read_text()

    return delegate_from


@pytest.fixture
def short_tmp():
    """A folder with a short path: a Unix socket's path has at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="w", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def test_the_default_socket_lives_in_a_private_folder_the_server_creates(monkeypatch, short_tmp):
    monkeypatch.delenv("FLASH_GRPO_WARM_SOCKET", raising=False)
    runtime = _private_folder(short_tmp / "runtime")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert warm_client.socket_path().parent == runtime
    runtime.chmod(0o755)  # not private: not used
    monkeypatch.setattr(tempfile, "tempdir", str(short_tmp))
    folder = short_tmp / f"flash-grpo-warm-{os.getuid()}"
    assert warm_client.socket_path().parent == folder
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert warm_client.socket_path().parent == folder and not folder.exists()
    Server(warm_client.socket_path(), {}, {}).serve(stop_after=0.2)
    assert folder.stat().st_mode & 0o777 == 0o700  # created private
    folder.chmod(0o777)
    with pytest.raises(SystemExit, match="refusing to listen in .* open to group or others"):
        Server(warm_client.socket_path(), {}, {}).serve(stop_after=0.2)


def test_a_socket_in_a_folder_others_can_write_to_is_refused(stage_client, tmp_path):
    folder = _private_folder(tmp_path / "open")
    listener = Listener(folder / "warm.sock")
    folder.chmod(0o777)  # anyone could have put this socket here
    result, stderr = stage_client(folder / "warm.sock")
    assert result is None and listener.close() == b""  # runs cold, sends nothing
    assert stderr.count("\n") == 1 and "running cold" in stderr and "open to group or others (mode 777" in stderr


@needs_root
def test_a_socket_in_another_users_folder_is_refused(stage_client, tmp_path):
    folder = _private_folder(tmp_path / "theirs")
    listener = Listener(folder / "warm.sock")
    os.chown(folder, OTHER_UID, -1)
    result, stderr = stage_client(folder / "warm.sock")
    assert result is None and listener.close() == b""
    assert f"belongs to uid {OTHER_UID}, not 0" in stderr


@needs_root
def test_a_socket_of_another_user_is_refused(stage_client, tmp_path):
    path = _private_folder(tmp_path / "private") / "warm.sock"
    listener = Listener(path)
    os.chown(path, OTHER_UID, -1)
    result, stderr = stage_client(path)
    assert result is None and listener.close() == b""
    assert f"warm.sock belongs to uid {OTHER_UID}" in stderr


IMPOSTOR = """
import os, socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
os.setuid(int(sys.argv[2]))  # the socket file stays root's; the listening process is not
listener.listen()
print("listening", flush=True)
listener.settimeout(30)
conn, _ = listener.accept()
conn.settimeout(10)
data = b""
while not data.endswith(b"\\n"):
    chunk = conn.recv(1 << 20)
    if not chunk:
        break
    data += chunk
print(len(data), flush=True)
"""


@needs_root
def test_a_server_running_as_another_user_is_refused(stage_client, tmp_path):
    path = _private_folder(tmp_path / "private") / "warm.sock"
    impostor = subprocess.Popen([sys.executable, "-c", IMPOSTOR, str(path), str(OTHER_UID)], stdout=subprocess.PIPE,
                                text=True)
    try:
        assert impostor.stdout.readline().strip() == "listening"
        result, stderr = stage_client(path)
        assert result is None and f"its server runs as uid {OTHER_UID}, not 0" in stderr
        assert impostor.stdout.readline().strip() == "0"  # the impostor received nothing
    finally:
        impostor.kill()
        impostor.wait()
        impostor.stdout.close()
