"""A warm stage runner (stages/runtime/warm.py) for a test's scratch project: its stages fork from
one process that imported torch once instead of importing it each (tests/test_warm.py shows the
outputs are a cold stage's bytes; the fault harness kills stages both ways)."""

import contextlib
import subprocess
import sys
import time
from pathlib import Path

from flash_grpo_core.pipeline.workspace import tool_env


@contextlib.contextmanager
def warm_runner(project: Path, min_served: int = 1, **env: str):
    """Runs the warm runner in `project` on the project's own default socket while the block runs,
    with `env` added to its environment (the stages' import-time variables, for them to match);
    afterwards checks that it served at least `min_served` stages and removes its socket."""
    from stages.runtime.warm_client import socket_path

    log = project.parent / f"{project.name}-warm.log"
    with open(log, "w") as handle:
        server = subprocess.Popen([sys.executable, "-m", "stages.runtime.warm"], cwd=project, env=tool_env(**env),
                                  stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "listening" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield
    finally:
        server.kill()  # no stage is running by now; a graceful exit would tear torch down for seconds
        server.wait()
        socket_path(project).unlink(missing_ok=True)
    served = log.read_text().count("warm: stages.")
    assert served >= min_served, log.read_text()[-2000:]  # the stages did run warm
