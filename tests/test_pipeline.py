"""The staged pipeline end to end: `dvc repro` on the tiny preset in a temporary copy of the repo.

One copy is shared by the module's tests (a full `dvc repro` costs about a minute on 2 cores);
the tests run in file order and each says what state it leaves.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flash_grpo_core.pipeline.workspace import copy_project, tool_env
from warm_runner import warm_runner

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _run(args, cwd, check=True, **kwargs):
    result = subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True, **kwargs)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _dvc(*args, cwd, check=True):
    return _run([str(BIN / "dvc"), *args], cwd, check=check)


@pytest.fixture(scope="module")
def project(tmp_path_factory, dvc_cache):
    """A git + DVC copy of the repository's tracked and new files, without any run outputs; its
    stages run warm (tests/warm_runner.py)."""
    project = copy_project(ROOT, tmp_path_factory.mktemp("project"), preset="tiny", cache_dir=dvc_cache)  # 2 iterations
    with warm_runner(project, min_served=10):
        yield project


def test_repro_builds_every_artifact(project):
    _dvc("repro", cwd=project)
    runs = project / "runs"
    report = json.loads((runs / "prompts" / "report.json").read_text())
    assert report["counts"]["train"] > 0 and report["counts"]["eval"] >= 2
    from flash_grpo_core.artifacts.checkpoint import read_state
    from flash_grpo_core.artifacts.shards import read_shards

    for it in (1, 2):
        records = read_shards(runs / "tiny" / f"it{it}" / "rollout")
        assert len(records) == 8 and {r.iteration for r in records} == {it}
        manifest = json.loads((runs / "tiny" / f"it{it}" / "rollout" / "manifest.json").read_text())
        assert manifest["forward_passes"] == 8 * 20 * 2
        metrics = json.loads((runs / "tiny" / f"it{it}" / "metrics.json").read_text())
        assert metrics["iteration"] == it and metrics["train_backward_passes"] > 0
        assert metrics["health_warnings"] == [] and metrics["first_ratio_deviation"] < 1e-3  # the guards: silent
        assert metrics["equal_groups_fraction"] == 0.0  # brightness differs within every group
        assert read_state(runs / "tiny" / f"it{it}" / "checkpoint")["iteration"] == it
    metric = json.loads((runs / "tiny" / "eval" / "metrics.json").read_text())  # the DVC metric: numbers only
    assert set(metric) == {"iteration", "base", "trained", "delta", "ci_low", "ci_high"} and metric["iteration"] == 2
    assert metric["ci_low"] <= metric["delta"] <= metric["ci_high"]
    evaluation = json.loads((runs / "tiny" / "eval" / "report" / "evaluation.json").read_text())
    assert metric["trained"] == evaluation["trained"]["reward"] and metric["delta"] == evaluation["delta"]["reward"]
    assert {"reward", "temporal_flickering", "dynamic_degree_flow"} <= set(evaluation["trained"])
    assert "subject_consistency" in evaluation["not_configured"]  # no weights given: named, not faked
    assert evaluation["evaluated"] == [0, 1, 2]  # pipeline.eval_every: 1
    history = json.loads((runs / "tiny" / "eval" / "history.json").read_text())
    assert [row["iteration"] for row in history] == [1, 2]
    points = [json.loads((runs / "tiny" / "eval" / "points" / f"it{it}" / "metrics.json").read_text())
              for it in (0, 1, 2)]
    assert points[0]["metrics"] == evaluation["base"] and points[2]["metrics"] == evaluation["trained"]
    curve = json.loads((runs / "tiny" / "eval" / "curves" / "reward.json").read_text())
    assert curve == [{"iteration": it, "value": point["metrics"]["reward"]} for it, point in zip((0, 1, 2), points)]
    assert (runs / "tiny" / "eval" / "curves" / "temporal_flickering.json").is_file()
    report = runs / "tiny" / "eval" / "report"
    assert (report / "report.html").is_file() and len(list(report.glob("*.mp4"))) == 4
    assert 'data-metric="temporal_flickering"' in (report / "report.html").read_text()  # held-out curves
    shown = json.loads(_dvc("metrics", "show", "--json", cwd=project).stdout)
    files = next(iter(shown.values()))["data"]  # keyed by revision: the workspace
    assert files["runs/tiny/it1/score.json"]["data"]["reward_mean"] == metrics_of(runs / "tiny" / "it1")
    assert files["runs/tiny/eval/metrics.json"]["data"]["trained"] == points[2]["metrics"]["reward"]
    assert set(files) == {"runs/tiny/it1/score.json", "runs/tiny/it2/score.json", "runs/tiny/eval/metrics.json"}
    plots = json.loads(_dvc("plots", "show", "--json", cwd=project).stdout)["data"]
    assert "reward and loss over iterations" in plots
    drawn = plots["runs/tiny/eval/curves/dynamic_degree_flow.json"][0]["content"]["data"]["values"]
    assert [row["iteration"] for row in drawn] == [0, 1, 2]  # a VBench-style metric over iterations
    _assert_tracked(runs / "tiny" / "tracking" / "tiny", runs / "tiny", points)


def _assert_tracked(log_dir: Path, preset_dir: Path, points: list[dict]) -> None:
    """The live run (params.yaml's tracking:, TensorBoard by default), read with TensorBoard's reader:
    the update's numbers and both stages' costs at iterations 1 and 2, each evaluated checkpoint's
    held-out reward and sample."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    run.Reload()
    rows = [json.loads((preset_dir / f"it{it}" / "metrics.json").read_text()) for it in (1, 2)]
    for key in ("reward_mean", "reward_std", "loss", "grad_norm", "clip_fraction", "approx_kl", "ratio_min",
                "ratio_max", "ratio_deviation_mean", "advantage_abs_mean", "equal_groups_fraction", "learning_rate",
                "ema_decay", "train_backward_passes"):
        assert [(e.step, e.value) for e in run.Scalars(f"train/{key}")] == [
            (it, pytest.approx(row[key], rel=1e-6)) for it, row in zip((1, 2), rows)], key
    assert [e.step for e in run.Scalars("train/reward/brightness_mean")] == [1, 2]  # each reward component
    for tag in ("cost/rollout/sample_seconds", "cost/rollout/videos_per_second_per_rank", "cost/rollout/peak_rss_gb",
                "cost/update/train_seconds", "cost/update/videos_per_second_per_rank", "cost/update/peak_rss_gb"):
        assert [e.step for e in run.Scalars(tag)] == [1, 2] and all(e.value > 0 for e in run.Scalars(tag)), tag
    assert [(e.step, e.value) for e in run.Scalars("eval/reward")] == [
        (it, pytest.approx(point["metrics"]["reward"], rel=1e-6)) for it, point in zip((0, 1, 2), points)]
    for dimension in ("temporal_flickering", "dynamic_degree_flow"):  # the VBench-style dimensions evaluated
        assert [e.step for e in run.Scalars(f"eval/{dimension}")] == [0, 1, 2], dimension
    for it, row in zip((1, 2), rows):  # the per-step picture: each trained step k's numbers
        assert row["per_step"] and all(entry["items"] > 0 for entry in row["per_step"].values())
        for k, entry in row["per_step"].items():
            for name, value in entry.items():
                assert (it, pytest.approx(value, rel=1e-6)) in [(e.step, e.value) for e in run.Scalars(
                    f"steps/{k}/{name}")], (k, name)
    from stages.eval_checkpoint import TRACKED_SAMPLES

    samples = sorted(run.Tags()["images"])  # GIFs where moviepy can encode them, else frame grids
    shown = min(TRACKED_SAMPLES, points[0]["prompts"])  # the report's videos: one per held-out prompt, 2 here
    assert len(samples) == shown == 2 and all(tag.startswith(f"eval/sample/{n}") for n, tag in enumerate(samples))
    assert all([e.step for e in run.Images(tag)] == [0, 1, 2] for tag in samples)
    assert len(json.loads((log_dir / "run.json").read_text())["run_id"]) == 32  # one run: every process's id


def metrics_of(iteration_dir) -> float:
    return json.loads((iteration_dir / "metrics.json").read_text())["reward_mean"]


def test_second_repro_does_no_stage_work(project):
    status = _dvc("status", "dvc.yaml", cwd=project).stdout
    assert "up to date" in status, status
    began = time.perf_counter()
    output = _dvc("repro", cwd=project).stdout
    assert "Running stage" not in output
    print(f"no-op dvc repro: {time.perf_counter() - began:.1f} s")


def _locked_files(project: Path) -> dict[str, str]:
    """{path: md5} of every output dvc.lock records (`cache: false` metrics too), a directory's files
    from its manifest in the DVC cache."""
    import re

    from flash_grpo_core.config import read_yaml

    cache = Path(re.search(r"dir = (.+)", (project / ".dvc" / "config.local").read_text()).group(1).strip())
    files = {}
    for entry in read_yaml(project / "dvc.lock")["stages"].values():
        for out in entry.get("outs", []):
            if not out["md5"].endswith(".dir"):
                files[out["path"]] = out["md5"]
                continue
            manifest = cache / "files" / "md5" / out["md5"][:2] / out["md5"][2:]
            files.update({f"{out['path']}/{item['relpath']}": item["md5"]
                          for item in json.loads(manifest.read_text())})
    return files


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


# Bad edits of the finished workspace's params.yaml (text replaced, first occurrence) and the line
# the validate stage gives for each: those that involve the workspace (its curated prompts, DVC's
# loop, the shell command line) and one plain params error. Every other message, e.g. a wrong type,
# K > N, a group of one, a misspelt reward, a negative seed: tests/test_validate.py in-process, and
# through `dvc repro` the 146 cases of the fault harness's record (`python -m bench.faults`).
BAD_EDITS = [
    ("  group_size: 8\n", "  group_sise: 8\n", "unknown key(s) rollout.group_sise"),
    ("      num_prompts: 2\n", "      num_prompts: 7\n", "eval.num_prompts is 7, but runs/prompts/report.json holds 6"),
    ("\niterations: 2\n", "\niterations: 3\n", "run `python -m flash_grpo_core.pipeline.iterations 3`"),
    ("  root: runs", "  root: my runs", "pipeline.root must be a relative path of letters, digits and . _ / -"),
]


@pytest.mark.parametrize("old,new,message", BAD_EDITS, ids=[edit[2].split()[0] for edit in BAD_EDITS])
def test_a_bad_params_edit_fails_at_validate_and_loses_nothing(project, old, new, message):
    """The validate stage runs first and fails with exit code 2 and one line; DVC never reaches a
    stage whose outputs it would delete: every output of the finished run stays, byte for byte."""
    params = project / "params.yaml"
    original = params.read_text()
    assert original.count(old) >= 1
    locked, lock = _locked_files(project), (project / "dvc.lock").read_bytes()
    assert "runs/tiny/it2/score.json" in locked and "runs/tiny/it2/checkpoint/trainable.safetensors" in locked
    params.write_text(original.replace(old, new, 1))
    try:
        result = _dvc("repro", cwd=project, check=False)
    finally:
        params.write_text(original)
    errors = [line for line in result.stderr.splitlines() if line.startswith("validate: error: ")]
    assert result.returncode != 0 and len(errors) == 1 and message in errors[0], result.stderr
    assert "exited with 2" in result.stderr and result.stdout.count("Running stage") == 1, result.stdout
    assert {path: _md5(project / path) for path in locked} == locked and (project / "dvc.lock").read_bytes() == lock
    assert "up to date" in _dvc("status", "dvc.yaml", cwd=project).stdout


def test_a_valid_edit_that_no_stage_reads_reruns_validate_alone(project):
    """Any edit of params.yaml reruns validate (a file dependency); its marker keeps its bytes, so
    nothing downstream reruns: here the tracking section (status only), a comment and
    pipeline.keep_checkpoints_every."""
    params = project / "params.yaml"
    original = params.read_text()
    tracking = original.replace("  run_name: null", "  run_name: elsewhere", 1).replace(
        "  options: {}  ", "  options: {tensorboard: {flush_secs: 5}}  ", 1)
    assert tracking.count("elsewhere") == 1 and "flush_secs" in tracking
    params.write_text(tracking)  # tracking: is no stage's param: watching a run differently reruns nothing
    try:
        status = _dvc("status", "dvc.yaml", cwd=project).stdout
    finally:
        params.write_text(original)
    stale = {line.strip().rstrip(":") for line in status.splitlines() if line and not line.startswith("\t")}
    assert stale == {"validate"}, status
    params.write_text("# a note\n" + original.replace("keep_checkpoints_every: 0", "keep_checkpoints_every: 3", 1))
    try:
        output = _dvc("repro", cwd=project).stdout
    finally:
        params.write_text(original)
    assert output.count("Running stage") == 1 and "Running stage 'validate'" in output, output
    output = _dvc("repro", cwd=project).stdout  # back again: validate once more, nothing else
    assert output.count("Running stage") == 1 and "Running stage 'validate'" in output, output
    assert "up to date" in _dvc("status", "dvc.yaml", cwd=project).stdout


def test_editing_the_prompt_file_reruns_validate_then_curate(project):
    """The base data.source is validate's dependency; its new sha256 in sources.json reruns curate."""
    prompts = project / "prompts" / "toy.jsonl"
    original = prompts.read_text()
    prompts.write_text(original + '{"prompt": "a grey square moving left", "split": "train"}\n')
    try:
        stale = _dvc("status", "dvc.yaml", cwd=project).stdout
        output = _dvc("repro", "curate", cwd=project).stdout
    finally:
        prompts.write_text(original)
    assert "validate:" in stale and "curate:" not in stale  # curate learns it through sources.json
    assert "Running stage 'validate'" in output and "Running stage 'curate'" in output
    assert json.loads((project / "runs" / "prompts" / "report.json").read_text())["counts"]["train"] == 19
    restored = _dvc("repro", "curate", cwd=project).stdout  # back: curate restored from the run cache
    assert "Running stage 'curate'" not in restored and "Stage 'curate' is cached" in restored, restored


def test_changing_a_reward_weight_invalidates_only_what_depends_on_it(project):
    params = project / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("    brightness: 1.0", "    brightness: 2.0", 1))
    try:
        status = _dvc("status", "dvc.yaml", cwd=project).stdout
    finally:
        params.write_text(original)
    stale = {line.strip().rstrip(":") for line in status.splitlines() if line and not line.startswith("\t")}
    assert {"score@1", "score@2", "eval_checkpoint@0", "eval_checkpoint@2"} <= stale  # evaluate: via their outputs
    assert not stale & {"curate", "init", "rollout@1", "rollout@2", "update@1"}, stale


def test_editing_another_preset_changes_nothing(project):
    """Stages track `presets.${preset}` only: the wan presets' overrides are not the tiny run's params."""
    params = project / "params.yaml"
    original = params.read_text()
    assert "  wan14b:\n    model:\n" in original
    params.write_text(original.replace("  wan14b:\n    model:\n", "  wan14b:\n    model:\n      lora_rank: 8\n", 1))
    try:
        status = _dvc("status", "dvc.yaml", cwd=project).stdout
        params.write_text(original.replace("  tiny:\n    model:\n", "  tiny:\n    model:\n      lora_rank: 8\n", 1))
        changed = _dvc("status", "dvc.yaml", cwd=project).stdout
    finally:
        params.write_text(original)
    stale = {line.strip().rstrip(":") for line in status.splitlines() if line and not line.startswith("\t")}
    assert stale == {"validate"}, status  # the params file changed: validate rechecks it, and nothing else
    assert "init:" in changed and "presets.tiny" in changed  # the selected preset's overrides are tracked


def test_deleted_output_is_restored_from_the_run_cache(project):
    checkpoint = project / "runs" / "tiny" / "it1" / "checkpoint"
    before = (checkpoint / "trainable.safetensors").read_bytes()
    shutil.rmtree(checkpoint)
    output = _dvc("repro", "update@1", cwd=project).stdout
    assert "Running stage 'update@1'" not in output and "Stage 'update@1' is cached - skipping run" in output
    assert (checkpoint / "trainable.safetensors").read_bytes() == before


def test_switching_a_parameter_back_restores_from_cache(project):
    """The mechanism behind switching presets back and forth: outputs come from the run cache."""
    params = project / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("  seed: 1234", "  seed: 4321", 1))
    assert "Running stage 'evaluate'" in _dvc("repro", cwd=project).stdout
    params.write_text(original)
    output = _dvc("repro", cwd=project).stdout
    # validate (persist: outside the run cache) rechecks the params in a second; nothing else runs
    assert output.count("Running stage") == 1 and "Running stage 'validate'" in output, output
    assert "Stage 'evaluate' is cached - skipping run" in output, output


@pytest.mark.parametrize("stage,output,downstream", [
    ("score@1", "it1/scores.parquet", "update@1"),
    ("eval_checkpoint@0", "eval/points/it0/videos.safetensors", "evaluate"),  # metadata in a fixed order
])
def test_forced_single_stage_reproduces_the_same_bytes(project, stage, output, downstream):
    path = project / "runs" / "tiny" / output
    before = path.read_bytes()
    log = _dvc("repro", "--force", "--single-item", stage, cwd=project).stdout
    assert f"Running stage '{stage}'" in log and f"Running stage '{downstream}'" not in log
    assert path.read_bytes() == before


def test_rollout_shards_are_byte_reproducible(project, tmp_path):
    out = tmp_path / "again"
    _run([sys.executable, "-m", "stages.rollout", "--iteration", "1", "--prompts", "runs/prompts/train.parquet",
          "--checkpoint", "runs/tiny/it0/checkpoint", "--out", str(out)], project)
    original = project / "runs" / "tiny" / "it1" / "rollout"
    names = sorted(p.name for p in original.glob("*.tar"))
    assert {"shard-000000.tar", "video-000000.tar"} <= set(names) and names == sorted(p.name for p in out.glob("*.tar"))
    for name in [*names, "shards.json", "prompt_embeds.safetensors"]:
        assert (original / name).read_bytes() == (out / name).read_bytes(), name


def test_interrupted_stage_is_rerun_and_never_taken_as_done(project):
    """Kill `dvc repro` inside rollout@2; the next repro reruns what was unfinished and ends clean,
    and neither rerun adds a point to the tracked run (the same results; a wall time once a step)."""
    tracked = _tracked_points(project)
    _dvc("repro", "--force", "--single-item", "rollout@2", cwd=project, check=False)  # make it stale first
    (project / "runs" / "tiny" / "it2" / "rollout" / "shards.json").unlink()  # as if the writer died
    status = _dvc("status", "dvc.yaml", cwd=project).stdout
    assert "rollout@2" in status  # DVC sees the output changed: it is not taken as done
    # cold, so that one second into the stage it is still loading or sampling (warm, it may be done)
    process = subprocess.Popen([str(BIN / "dvc"), "repro", "--force", "--single-item", "rollout@2"], cwd=project,
                               env=tool_env(FLASH_GRPO_WARM="0"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    for line in process.stdout:
        if "Running stage 'rollout@2'" in line:
            time.sleep(1.0)  # inside the stage: loading the model or sampling
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    from flash_grpo_core.artifacts.shards import read_shards
    from flash_grpo_core.artifacts.tar_io import ShardError

    rollout = project / "runs" / "tiny" / "it2" / "rollout"
    if rollout.exists():
        with pytest.raises(ShardError, match="incomplete"):
            read_shards(rollout)
    _dvc("repro", cwd=project)
    assert len(read_shards(rollout)) == 8
    assert "up to date" in _dvc("status", "dvc.yaml", cwd=project).stdout
    assert _tracked_points(project) == tracked  # the forced rerun and the resumed one added no point


def _tracked_points(project: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the tiny preset's tracked run, in logging order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = EventAccumulator(str(project / "runs" / "tiny" / "tracking" / "tiny"), size_guidance={"scalars": 0})
    run.Reload()
    return {tag: [(e.step, e.value) for e in run.Scalars(tag)] for tag in run.Tags()["scalars"]}


@pytest.mark.parametrize("name", ["shard-000000.tar", "video-000001.tar"])
def test_corrupt_shard_fails_the_score_stage_naming_the_file(project, tmp_path, name):
    broken = tmp_path / "rollout"
    shutil.copytree(project / "runs" / "tiny" / "it1" / "rollout", broken)
    shard = broken / name
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = _run([sys.executable, "-m", "stages.score", "--iteration", "1", "--rollout", str(broken),
                   "--out", str(tmp_path / "scores.parquet"), "--summary", str(tmp_path / "score.json"),
                   "--reward-state-in", "runs/tiny/it0/reward_state.json",
                   "--reward-state-out", str(tmp_path / "state.json")], project, check=False)
    assert result.returncode == 2
    assert name in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "scores.parquet").exists()


def test_evaluate_without_an_evaluated_checkpoint_names_the_stage_to_run(project, tmp_path):
    points = tmp_path / "points"
    shutil.copytree(project / "runs" / "tiny" / "eval" / "points", points)
    shutil.rmtree(points / "it1")
    result = _run([sys.executable, "-m", "stages.evaluate", "--points", str(points),
                   "--checkpoint", "runs/tiny/it2/checkpoint", "--report", str(tmp_path / "report"),
                   "--metrics", str(tmp_path / "metrics.json"), "--history", str(tmp_path / "history.json"),
                   "--curves", str(tmp_path / "curves")], project, check=False)
    assert result.returncode == 2 and "eval_checkpoint@1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "curves").exists()


def test_malformed_prompt_file_fails_curate_naming_file_and_line(project, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a red square"}\n{"prompt": 3}\n')
    result = _run([sys.executable, "-m", "stages.curate", "--sources", str(bad), "--out-dir", str(tmp_path / "out")],
                  project, check=False)
    assert result.returncode == 2 and str(bad) in result.stderr and "line 2" in result.stderr
    assert not (tmp_path / "out" / "train.parquet").exists()


def test_reward_on_a_different_scale_than_its_history_fails_the_score_stage(project, tmp_path):
    history = {"guards": {"brightness": {"name": "brightness", "history": [100.0 + 0.01 * i for i in range(10)]}}}
    state = tmp_path / "reward_state.json"
    state.write_text(json.dumps(history))
    result = _run([sys.executable, "-m", "stages.score", "--iteration", "1",
                   "--rollout", "runs/tiny/it1/rollout", "--out", str(tmp_path / "scores.parquet"),
                   "--summary", str(tmp_path / "score.json"), "--reward-state-in", str(state),
                   "--reward-state-out", str(tmp_path / "state-out.json")], project, check=False)
    assert result.returncode == 2 and "brightness" in result.stderr, result.stderr
    assert not (tmp_path / "scores.parquet").exists()
    carried = json.loads((project / "runs" / "tiny" / "it2" / "reward_state.json").read_text())
    assert len(carried["guards"]["brightness"]["history"]) == 2  # one batch mean per iteration so far


def test_extending_the_run_continues_its_tracked_curves(project):
    """Two more iterations (`python -m flash_grpo_core.pipeline.iterations 4`, then `dvc repro`): only
    the new iterations run, and each adds one point a tag to the same tracked run, at its step."""
    run_file = project / "runs" / "tiny" / "tracking" / "tiny" / "run.json"
    run_id, before = json.loads(run_file.read_text())["run_id"], _tracked_points(project)
    _run([sys.executable, "-m", "flash_grpo_core.pipeline.iterations", "4"], project)
    output = _dvc("repro", cwd=project).stdout
    assert "Running stage 'update@3'" in output and "Running stage 'update@1'" not in output
    assert json.loads(run_file.read_text())["run_id"] == run_id
    after = _tracked_points(project)
    for tag, points in after.items():
        assert points[:len(before.get(tag, []))] == before.get(tag, []), tag  # nothing earlier is touched
        added = [step for step, _ in points[len(before.get(tag, [])):]]
        if tag.startswith("steps/"):  # a trained step k: at the new iterations that drew it, once each
            assert added in ([], [3], [4], [3, 4]), (tag, added)
        else:  # every other number at both new iterations
            assert added == [3, 4], (tag, added)
    assert any(tag.startswith("steps/") and len(after[tag]) > len(before.get(tag, [])) for tag in after)
