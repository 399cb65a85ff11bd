"""`prefect deployment run train-loop/tiny` end to end: a real Prefect server, worker and DVC pipeline.

One module-wide stack, started once: a temporary git + DVC copy of the repository, a Prefect server
on a free loopback port (temporary PREFECT_HOME, SQLite, analytics off), the `flash-grpo` process
pool, the deployments of prefect.yaml and one worker, whose flow runs' stages start warm
(tests/warm_runner.py: the worker's PYTHONPATH repeats the project's own path). The tests run in file order on one iteration
of the tiny preset: a run whose evaluate stage fails, its retry (which resumes there), then a second
run with the same parameters (which does no stage work). Every process started here is stopped by
its id when the module ends, also when a test fails.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from warm_runner import warm_runner

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = ["-p", "iterations=1", "-p", 'overrides={"train.learning_rate": 0.0002}']  # the same for every run
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Stack:
    """The processes and settings of one Prefect server + worker, all stopped by `stop`."""

    def __init__(self, project: Path, home: Path):
        from flash_grpo_core.pipeline.workspace import tool_env

        self.project, self.home, self.port = project, home, _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = tool_env(PREFECT_HOME=str(home), PREFECT_API_URL=self.api, PREFECT_UI_ENABLED="false",
                            PREFECT_WORKER_QUERY_SECONDS="1",
                            FLASH_GRPO_PROJECT=str(project))
        self.processes: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.home / f"{name}.log", "w") as log:
            process = subprocess.Popen([str(BIN / "prefect"), *args], cwd=self.project, env=self.env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def prefect(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=self.project, env=self.env,
                                capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode:
            raise AssertionError(f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}\n{self.logs()}")
        return result

    def wait_healthy(self, timeout: float = 90) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.processes[0].poll() is None, f"the server exited:\n{self.logs()}"
            try:
                if httpx.get(f"{self.api}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"no healthy server after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(self.home.glob("*.log")))

    def stop(self) -> None:
        """Worker first, then server: SIGTERM, SIGINT, SIGINT (a worker may ignore the first signals), SIGKILL."""
        import psutil

        for process in reversed(self.processes):
            try:
                descendants = psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                descendants = []
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGINT, signal.SIGKILL):
                if process.poll() is not None:
                    break
                os.killpg(process.pid, sig)  # its own session, started above: pgid == pid
                try:
                    process.wait(timeout=4)
                except subprocess.TimeoutExpired:
                    pass
            for child in descendants:  # a flow run or server process that left the group
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory, dvc_cache):
    from flash_grpo_core.pipeline.workspace import copy_project

    project = copy_project(ROOT, tmp_path_factory.mktemp("project"), preset="tiny", cache_dir=dvc_cache)
    stack = Stack(project, tmp_path_factory.mktemp("prefect-home"))
    try:
        stack.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(stack.port))
        stack.wait_healthy()
        stack.prefect("work-pool", "create", "flash-grpo", "--type", "process")
        stack.prefect("deploy", "--all")
        stack.start("worker", "worker", "start", "--pool", "flash-grpo", "--limit", "1")
        with warm_runner(project, min_served=8):  # validate .. export: every stage that ran
            yield stack
    finally:
        stack.stop()
        assert all(process.poll() is not None for process in stack.processes)


def _run_id(output: str) -> str:
    return next(line.split("UUID:")[1].strip() for line in output.splitlines() if "UUID:" in line)


def _flow_run(stack: Stack, run_id: str) -> dict:
    import httpx

    return httpx.get(f"{stack.api}/flow_runs/{run_id}", timeout=10).json()


def _wait_finished(stack: Stack, run_id: str, attempts: int, timeout: float = 200) -> dict:
    """The flow run once its `attempts`-th attempt reached a final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _flow_run(stack, run_id)
        if run["run_count"] >= attempts and run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} not finished after {timeout} s: {run['state']}\n{stack.logs()}")


def _messages(stack: Stack, run_id: str, until: str, timeout: float = 20) -> list[str]:
    """The run's log messages, once one containing `until` has arrived (logs are shipped in batches)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
        messages = [log["message"] for log in httpx.post(f"{stack.api}/logs/filter", json=body, timeout=10).json()]
        if any(until in message for message in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)


def _deployment_run(stack: Stack, *args: str) -> tuple[str, subprocess.CompletedProcess]:
    result = stack.prefect("deployment", "run", "train-loop/tiny", *args, "--watch", "--watch-timeout", "280",
                           timeout=300, check=False)
    assert "UUID:" in result.stdout, f"{result.stdout}\n{result.stderr}\n{stack.logs()}"
    return _run_id(result.stdout), result


def test_deployments_are_registered_one_per_preset_with_a_limit_of_one(stack):
    import httpx

    for name in ("tiny", "wan1_3b", "wan14b"):
        deployment = httpx.get(f"{stack.api}/deployments/name/train-loop/{name}", timeout=10).json()
        assert deployment["parameters"] == {"preset": name} and deployment["work_pool_name"] == "flash-grpo"
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(stack.project)}}]


def test_failing_stage_marks_the_run_failed(stack):
    evaluate = stack.project / "stages" / "evaluate.py"
    shutil.copy2(evaluate, stack.home / "evaluate.py")
    evaluate.write_text('import sys\nprint("evaluate: error: injected failure", file=sys.stderr)\nsys.exit(2)\n')
    run_id, result = _deployment_run(stack, *RUN)
    stack.failed_run = run_id
    assert result.returncode != 0, result.stdout
    state = _flow_run(stack, run_id)["state"]
    assert state["type"] == "FAILED" and "evaluate failed on its input (exit 2)" in state["message"], state
    it1 = stack.project / "runs" / "tiny" / "it1"
    assert (it1 / "metrics.json").is_file() and (it1 / "checkpoint").is_dir()
    assert not (stack.project / "runs" / "tiny" / "eval" / "metrics.json").exists()
    messages = _messages(stack, run_id, "evaluate: error: injected failure")
    assert any(m.startswith("iteration 1/1: reward_mean=") and "loss=" in m for m in messages)
    assert "evaluate: error: injected failure" in messages  # the stage's own output is in the run's logs
    from flash_grpo_core.config import load_params

    params = load_params(stack.project / "params.yaml")  # the run's parameters, where DVC reads them
    assert params.iterations == 1 and params.train.learning_rate == 2e-4


def test_retry_resumes_at_the_first_unfinished_stage(stack):
    shutil.copy2(stack.home / "evaluate.py", stack.project / "stages" / "evaluate.py")  # fixed
    stack.prefect("flow-run", "retry", stack.failed_run)
    run = _wait_finished(stack, stack.failed_run, attempts=2)
    assert run["state"]["type"] == "COMPLETED" and run["run_count"] == 2, run["state"]
    messages = _messages(stack, stack.failed_run, "stages ran")
    assert "train-loop tiny: 2 of 10 stages ran (evaluate, export)" in "\n".join(messages), messages
    for stage in ("curate", "init", "eval_checkpoint@0", "rollout@1", "score@1", "update@1", "eval_checkpoint@1"):
        assert f"{stage}: up to date, skipped" in "\n".join(messages)
    evaluation = json.loads((stack.project / "runs" / "tiny" / "eval" / "metrics.json").read_text())
    assert evaluation["iteration"] == 1 and {"base", "trained", "delta"} <= set(evaluation)
    from flash_grpo_core.config import read_yaml

    locked = read_yaml(stack.project / "dvc.lock")["stages"]
    for stage in ("curate", "init", "eval_checkpoint@0", "rollout@1", "score@1", "update@1", "eval_checkpoint@1",
                  "evaluate"):
        outs = [stack.project / out["path"] for out in locked[stage].get("outs", [])]
        assert outs and all(out.exists() for out in outs), stage  # every output, recorded by DVC


def test_second_run_with_the_same_parameters_does_no_stage_work(stack):
    outputs = [path for path in (stack.project / "runs").rglob("*") if path.is_file()]
    before = {path: path.stat().st_mtime_ns for path in outputs}
    run_id, result = _deployment_run(stack, *RUN)
    assert result.returncode == 0, result.stdout
    assert _flow_run(stack, run_id)["state"]["type"] == "COMPLETED"
    messages = _messages(stack, run_id, "stages ran")
    assert "train-loop tiny: 0 of 10 stages ran" in "\n".join(messages), messages
    assert not any(m.startswith("Running stage") for m in messages)
    assert {path: path.stat().st_mtime_ns for path in outputs} == before
    status = subprocess.run([str(BIN / "dvc"), "status", "evaluate"], cwd=stack.project, env=stack.env,
                            capture_output=True, text=True, check=False)  # evaluate and all upstream
    assert "up to date" in status.stdout, status.stdout
