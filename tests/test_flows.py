"""The `train-loop` flow's logic, with stage execution replaced only at the subprocess boundary.

`FakeDvc` stands in for `subprocess.Popen` inside `flows.dvc_runner`: it answers `dvc repro <stage>`
the way DVC does (runs a stage once, then says it did not change; fails on request with the exit
code a stage would give) and writes the metrics files the real stages write. Everything above it
(parameter validation and writing, sequencing, retries, logging, the returned metadata) is the
real code, run by Prefect against a temporary local API (`prefect_test_harness`, ~15 s once).
"""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ONE_ITERATION = ["validate", "curate", "init", "eval_checkpoint@0", "rollout@1", "score@1", "update@1",
                 "eval_checkpoint@1", "evaluate", "export"]


class _FakeProcess:
    def __init__(self, output: str, returncode: int):
        self.stdout = io.StringIO(output)
        self.returncode = returncode

    def wait(self, timeout=None):
        return self.returncode

    def poll(self):
        return self.returncode

    def terminate(self):
        pass

    kill = terminate


class FakeDvc:
    """`dvc repro <stage>` as seen through its output: run once, then up to date; scripted failures."""

    def __init__(self, project: Path):
        self.project = project
        self.calls: list[str] = []
        self.done: set[str] = set()
        self.failures: dict[str, list[int]] = {}  # stage -> exit codes of its next runs
        self.allow_missing: list[bool] = []  # whether each call passed --allow-missing

    def __call__(self, args, cwd, env, **kwargs):
        allow_missing = args[2] == "--allow-missing"
        assert Path(args[0]) == Path(sys.executable).parent / "dvc" and args[1] == "repro"
        assert len(args) == 3 + allow_missing
        assert Path(cwd) == self.project
        assert env["PATH"].startswith(str(Path(sys.executable).parent)) and env["DVC_NO_ANALYTICS"] == "1"
        stage = args[-1]
        self.calls.append(stage)
        self.allow_missing.append(allow_missing)
        if stage in self.done:
            return _FakeProcess(f"Stage '{stage}' didn't change, skipping\nData and pipelines are up to date.\n", 0)
        name = stage.split("@")[0]
        output = f"Running stage '{stage}':\n> python -m stages.{name} ...\n"
        codes = self.failures.get(stage)
        if codes:
            code = codes.pop(0)
            message = f"{name}: error: model.path models/x does not exist\n" if code == 2 else "Traceback ...\nOSError: [Errno 5] Input/output error\n"
            return _FakeProcess(output + message + f"ERROR: failed to reproduce '{stage}': failed to run: "
                                                   f"python -m stages.{name} ..., exited with {code}\n", 255)
        self._write_outputs(stage)
        self.done.add(stage)
        return _FakeProcess(output + f"{name}: seconds=0.1\nUpdating lock file 'dvc.lock'\n"
                                     f"To track the changes with git, run:\n\n\tgit add dvc.lock\n", 0)

    def _write_outputs(self, stage: str) -> None:
        runs = self.project / "runs" / "tiny"
        if stage == "rollout@1":  # the first stage that logs opens the tracker, which says where it shows the run
            from flash_grpo_core.artifacts.atomic import write_json

            (runs / "tracking" / "tiny").mkdir(parents=True, exist_ok=True)
            write_json({"tensorboard": "tensorboard --logdir runs/tiny/tracking/tiny"},
                       runs / "tracking" / "tiny" / "links.json")
        if stage.startswith("update@"):
            it = int(stage.split("@")[1])
            (runs / f"it{it}").mkdir(parents=True, exist_ok=True)
            (runs / f"it{it}" / "metrics.json").write_text(json.dumps(
                {"iteration": it, "reward_mean": 0.5 + it / 10, "reward_std": 0.1, "loss": -0.01 * it,
                 "train_backward_passes": 16}))
            (runs / f"it{it}" / "rollout.timings.json").write_text(json.dumps({"sample_seconds": 1.5}))
            (runs / f"it{it}" / "update.timings.json").write_text(json.dumps({"train_seconds": 2.5}))
        if stage == "evaluate":
            (runs / "eval").mkdir(parents=True, exist_ok=True)
            (runs / "eval" / "metrics.json").write_text(json.dumps({"delta": {"reward": 0.01}}))


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A temporary Prefect API (SQLite) and home: nothing is written to ~/.prefect."""
    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_HOME", str(home))  # before prefect's first import in this session
        patch.delenv("PREFECT_API_URL", raising=False)
        from prefect.settings import PREFECT_HOME, temporary_settings
        from prefect.testing.utilities import prefect_test_harness

        with temporary_settings(updates={PREFECT_HOME: home}), prefect_test_harness(server_startup_timeout=90):
            yield


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A checkout as the flow sees it (params.yaml, dvc.yaml, .dvc, the prompt source the preflight
    checks) as the working directory."""
    for name in ("params.yaml", "dvc.yaml", "prompts/toy.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def dvc(project, monkeypatch):
    from flows import dvc_runner

    fake = FakeDvc(project)
    monkeypatch.setattr(dvc_runner.subprocess, "Popen", fake)
    return fake


@pytest.fixture
def train_loop(prefect_api, monkeypatch):
    """The flow, with retry delays of 0 s so the retry tests do not wait."""
    from flows import train_loop as module

    monkeypatch.setattr(module, "run_stage", module.run_stage.with_options(retry_delay_seconds=0))
    return module.train_loop


# The subprocess boundary and the params file, without Prefect.

def test_the_stage_order_is_dvc_yaml_s():
    """One declaration of the stages and their order: dvc.yaml, read by `pipeline.stage_order`."""
    from flash_grpo_core.pipeline.stage_order import foreach_items, stage_order

    assert stage_order(ROOT / "dvc.yaml") == ["validate", "curate", "init", "rollout", "score", "update",
                                              "eval_checkpoint", "evaluate", "export"]
    assert foreach_items(ROOT / "dvc.yaml") == {"rollout": "${pipeline.loop}", "score": "${pipeline.loop}",
                                                "update": "${pipeline.loop}", "eval_checkpoint": "${pipeline.eval_at}"}
    assert stage_order(ROOT / "bench" / "toy" / "dvc.yaml") == ["pretrain"]


def test_the_flow_follows_dvc_yaml_s_order(tmp_path):
    """A stage added to dvc.yaml (or moved there) is where the flow runs it, with no list to edit."""
    from flows.train_loop import stage_names

    text = (ROOT / "dvc.yaml").read_text()
    edited = text.replace("\n  score:\n", "\n  probe:\n    foreach: ${pipeline.loop}\n    do:\n      cmd: probe\n"
                                          "  score:\n").replace("\n  export:\n", "\n  summary:\n    cmd: summary\n"
                                                                                "  export:\n")
    (tmp_path / "dvc.yaml").write_text(edited)
    assert stage_names(2, (0, 2), tmp_path / "dvc.yaml") == [
        "validate", "curate", "init", "eval_checkpoint@0", "rollout@1", "probe@1", "score@1", "update@1",
        "rollout@2", "probe@2", "score@2", "update@2", "eval_checkpoint@2", "evaluate", "summary", "export"]
    (tmp_path / "dvc.yaml").write_text(edited.replace("foreach: ${pipeline.loop}\n    do:\n      cmd: probe",
                                                      "foreach: ${pipeline.other}\n    do:\n      cmd: probe"))
    with pytest.raises(ValueError, match=r"cannot expand foreach \{'probe': '\$\{pipeline.other\}'\}"):
        stage_names(2, (0, 2), tmp_path / "dvc.yaml")


def test_stage_order_unrolls_the_loop():
    from flows.train_loop import stage_names

    dvc_file = ROOT / "dvc.yaml"
    assert stage_names(2, dvc_file=dvc_file) == ["validate", "curate", "init", "rollout@1", "score@1", "update@1",
                                                 "rollout@2", "score@2", "update@2", "evaluate", "export"]
    assert stage_names(4, (0, 2, 4), dvc_file) == ["validate", "curate", "init", "eval_checkpoint@0",
                                                   "rollout@1", "score@1", "update@1",
                                                   "rollout@2", "score@2", "update@2", "eval_checkpoint@2",
                                                   "rollout@3", "score@3", "update@3",
                                                   "rollout@4", "score@4", "update@4", "eval_checkpoint@4", "evaluate",
                                                   "export"]


def test_repro_reads_what_dvc_did_and_classifies_failures(dvc, project):
    from flows import dvc_runner

    lines = []
    first = dvc_runner.repro("curate", project, lines.append)
    assert first.ran == ("curate",) and first.did_work and "curate: seconds=0.1" in lines
    assert dvc_runner.repro("curate", project).skipped == ("curate",)
    dvc.failures = {"init": [2, 1, -9]}
    with pytest.raises(dvc_runner.StageError, match=r"init failed on its input \(exit 2\): init: error: model.path"):
        dvc_runner.repro("init", project)
    for code in (1, -9):
        with pytest.raises(dvc_runner.TransientStageError, match=f"exit code {code}: OSError"):
            dvc_runner.repro("init", project)


def test_dvc_failing_before_the_stage_is_transient(project, monkeypatch):
    from flows import dvc_runner

    lock = "ERROR: Unable to acquire lock. Most likely another DVC process is running or was terminated abruptly.\n"
    monkeypatch.setattr(dvc_runner.subprocess, "Popen", lambda *args, **kwargs: _FakeProcess(lock, 255))
    with pytest.raises(dvc_runner.TransientStageError, match="Unable to acquire lock"):
        dvc_runner.repro("curate", project)


def test_overrides_are_written_where_they_take_effect(project):
    from flash_grpo_core.config import load_params
    from flows import params_file

    before = (project / "params.yaml").read_text()
    params = params_file.write(project / "params.yaml", "tiny", 3,
                               {"train.learning_rate": 3e-5, "train.minibatches": 1, "rollout.group_size": 2})
    assert load_params(project / "params.yaml") == params
    assert params.iterations == 3 and params.pipeline.loop == {"1": 0, "2": 1, "3": 2}
    assert params.pipeline.eval_at == (0, 1, 2, 3)  # params.yaml's eval_every: 1
    from flash_grpo_core.config import read_yaml

    raw = read_yaml(project / "params.yaml")
    assert raw["train"]["learning_rate"] == 3e-5  # the tiny preset does not set it: the base section
    assert raw["presets"]["tiny"]["train"]["minibatches"] == 1  # the preset sets it: a base value would be shadowed
    assert raw["presets"]["tiny"]["rollout"]["group_size"] == 2 and raw["rollout"]["group_size"] == 8
    text = (project / "params.yaml").read_text()
    assert "# toy | tiny | wan1_3b | wan1_3b_flowgrpo | wan14b" in text and "path: null" in text  # comments, nulls stay
    assert len(text.splitlines()) == len(before.splitlines())


@pytest.mark.parametrize("overrides, message", [
    ({"train.learning_rte": 1e-4}, "unknown key.*train.learning_rte"),
    ({"train.learning_rate": "fast"}, "train.learning_rate must be a number"),
    ({"train.minibatches": 3}, r"train.minibatches \(3\) must divide"),
    ({"pipeline.root": "elsewhere"}, "'pipeline.root' cannot be overridden"),
])
def test_bad_overrides_fail_naming_the_key_and_leave_params_unchanged(project, overrides, message):
    from flash_grpo_core.config import ConfigError
    from flows import params_file

    before = (project / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=message):
        params_file.write(project / "params.yaml", "tiny", None, overrides)
    assert (project / "params.yaml").read_text() == before


def test_one_run_per_workspace(project):
    from flows.params_file import workspace_lock

    with workspace_lock(project):
        code = ("import sys; from pathlib import Path; from flows.params_file import workspace_lock\n"
                "with workspace_lock(Path(sys.argv[1])): pass")
        other = subprocess.run([sys.executable, "-c", code, str(project)], capture_output=True, text=True, cwd=ROOT,
                               check=False)
        assert other.returncode != 0 and "another train-loop run" in other.stderr
    with workspace_lock(project):  # released when the run ends
        pass


def test_artifact_keys_are_what_prefect_accepts():
    from flows.train_loop import artifact_key

    assert artifact_key("train-loop", "wan1_3b") == "train-loop-wan1-3b"  # Prefect refuses "_" in a key
    assert artifact_key("tracking", "My.Preset") == "tracking-my-preset"


def test_flow_module_imports_no_torch():
    code = "import sys, flows.train_loop; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


def test_prefect_yaml_declares_one_limited_deployment_per_preset():
    from flash_grpo_core.config import read_yaml

    spec = read_yaml(ROOT / "prefect.yaml")
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"tiny", "wan1_3b", "wan1_3b_flowgrpo", "wan14b"}
    for name, deployment in deployments.items():
        assert deployment["entrypoint"] == "flows/train_loop.py:train_loop"
        assert deployment["parameters"]["preset"] == name and deployment["concurrency_limit"] == 1
        assert deployment["work_pool"]["name"] == "flash-grpo"
        # the GPU presets run every GPU stage on the node's 8 GPUs (stages/runtime/launch.py), the tiny one on 1
        env = deployment["work_pool"].get("job_variables", {}).get("env", {})
        assert env.get("FLASH_GRPO_NPROC_PER_NODE") == (None if name == "tiny" else "8")
    assert "set_working_directory" in str(spec["pull"])


# The flow, run by Prefect.

def test_flow_runs_every_stage_in_order_and_reports_metrics(train_loop, dvc, project):
    summary = train_loop(preset="tiny", iterations=2)
    assert dvc.calls == ["validate", "curate", "init", "eval_checkpoint@0", "rollout@1", "score@1", "update@1",
                         "eval_checkpoint@1", "rollout@2", "score@2", "update@2", "eval_checkpoint@2", "evaluate",
                         "export"]
    assert [s["outcome"] for s in summary["stages"]] == ["ran"] * 14
    assert [row["iteration"] for row in summary["metrics"]] == [1, 2]
    assert summary["metrics"][1]["reward_mean"] == pytest.approx(0.7) and summary["metrics"][1]["loss"] == -0.02
    assert summary["evaluation"] == {"delta": {"reward": 0.01}}
    json.dumps(summary)  # small, plain metadata: no tensors
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:  # the flow run's page links the tracker's run
        (link,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tracking-tiny"])))
    assert "tensorboard --logdir runs/tiny/tracking/tiny" in link.data and link.type == "markdown"
    from flash_grpo_core.config import load_params

    assert load_params(project / "params.yaml").iterations == 2


def test_second_run_with_the_same_parameters_does_no_stage_work(train_loop, dvc):
    train_loop(preset="tiny", iterations=1)
    summary = train_loop(preset="tiny", iterations=1)
    assert dvc.calls == ONE_ITERATION * 2
    assert {s["outcome"] for s in summary["stages"]} == {"up to date, skipped"}


@pytest.mark.parametrize("parameters, message", [
    ({"overrides": {"train.mode": "fastest"}}, "train.mode must be one of"),
    ({"preset": "wan14b"}, "model.path models/Wan2.1-T2V-14B-Diffusers: no such folder"),
    ({"iterations": 0}, "iterations"),
    ({"preset": "wan7b"}, "preset"),
])
def test_bad_parameters_fail_before_any_stage(train_loop, dvc, project, parameters, message):
    before = (project / "params.yaml").read_text()
    state = train_loop(**parameters, return_state=True)
    assert state.is_failed() and dvc.calls == []
    with pytest.raises(Exception, match=message):
        state.result()
    assert (project / "params.yaml").read_text() == before


def test_the_preflight_runs_once_before_dvc_and_lists_every_problem(train_loop, dvc, project, monkeypatch):
    from flash_grpo_core.pipeline import preflight

    calls = []

    def recorded(params, folder):
        calls.append((params.preset, folder, list(dvc.calls)))
        return real(params, folder)

    real = preflight.require
    monkeypatch.setattr(preflight, "require", recorded)
    train_loop(preset="tiny", iterations=1)  # on a CPU: no GPU needed, its prompt file is there
    assert calls == [("tiny", project, [])] and dvc.calls == ONE_ITERATION
    calls.clear()
    dvc.calls.clear()
    before = (project / "params.yaml").read_text()
    state = train_loop(preset="wan1_3b_flowgrpo", iterations=1, return_state=True)
    assert state.is_failed() and dvc.calls == [] and len(calls) == 1  # a deterministic failure: no retry
    with pytest.raises(preflight.PreflightError) as failure:
        state.result()
    lines = str(failure.value).splitlines()
    for expected in ("model.path models/Wan2.1-T2V-1.3B-Diffusers: no such folder",
                     "reward.options.hpsv3.path: models/HPSv3/HPSv3.safetensors does not exist",
                     "reward.options.hpsv3.base_path: models/Qwen2-VL-7B-Instruct does not exist"):
        assert sum(line.startswith(expected) for line in lines) == 1, lines
    assert (project / "params.yaml").read_text() == before


def test_a_missing_prompt_source_fails_the_tiny_run_before_any_stage(train_loop, dvc, project):
    (project / "prompts" / "toy.jsonl").unlink()
    state = train_loop(preset="tiny", iterations=1, return_state=True)
    assert state.is_failed() and dvc.calls == []
    with pytest.raises(Exception, match="data.source 'prompts/toy.jsonl' does not exist"):
        state.result()


def test_transient_failure_is_retried(train_loop, dvc):
    dvc.failures = {"score@1": [1, -9]}  # an I/O error, then a killed process; the third try works
    summary = train_loop(preset="tiny", iterations=1)
    assert dvc.calls == ["validate", "curate", "init", "eval_checkpoint@0", "rollout@1", "score@1", "score@1",
                         "score@1", "update@1", "eval_checkpoint@1", "evaluate", "export"]
    assert summary["stages"][5]["outcome"] == "ran"


def test_deterministic_failure_fails_the_run_without_retry_and_a_rerun_resumes(train_loop, dvc):
    dvc.failures = {"update@1": [2]}
    state = train_loop(preset="tiny", iterations=1, return_state=True)
    assert state.is_failed() and "update@1 failed on its input (exit 2)" in state.message
    assert dvc.calls == ONE_ITERATION[:7]  # not retried, nothing after it started
    dvc.calls.clear()
    summary = train_loop(preset="tiny", iterations=1)  # the same parameters again
    assert [s["outcome"] for s in summary["stages"]] == ["up to date, skipped"] * 6 + ["ran"] * 4


def test_pruning_after_updates_lets_the_later_stages_skip_the_removed_checkpoints(train_loop, dvc, monkeypatch):
    """pipeline.keep_checkpoints_every > 0: the flow prunes after each update and evaluation; once a
    checkpoint is gone, every later `dvc repro` passes --allow-missing (flash_grpo_core/pipeline/prune.py)."""
    from flash_grpo_core.pipeline import prune

    pruned, calls = {}, []

    def fake_prune(project, params, **kwargs):  # the real one is tested on real DVC in test_prune.py
        calls.append(dvc.calls[-1])
        newly = {1: "c1.dir"} if "update@2" in dvc.done and 1 not in pruned else {}
        pruned.update(newly)
        return prune.Plan(kept=[], pruned=newly)

    monkeypatch.setattr(prune, "prune", fake_prune)
    monkeypatch.setattr(prune, "pruned_iterations", lambda project, params: dict(pruned))
    train_loop(preset="tiny", iterations=3, overrides={"pipeline.keep_checkpoints_every": 2})
    assert calls == [stage for stage in dvc.calls if stage.startswith(("update@", "eval_checkpoint@"))]
    first = dvc.calls.index("update@2") + 1
    assert dvc.allow_missing == [False] * first + [True] * (len(dvc.calls) - first)
    dvc.calls.clear()
    dvc.allow_missing.clear()
    train_loop(preset="tiny", iterations=3, overrides={"pipeline.keep_checkpoints_every": 2})
    assert dvc.allow_missing and all(dvc.allow_missing)  # a later run of the workspace starts with it
