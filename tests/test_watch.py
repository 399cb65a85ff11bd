"""`python -m flash_grpo_core.pipeline.watch`: a run's table from the small JSON files the stages write."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flash_grpo_core.pipeline import watch

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, record) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record if isinstance(record, str) else json.dumps(record))


def _iteration(run: Path, k: int, reward: float, loss: float) -> None:
    """What rollout@k, score@k and update@k leave in it<k>/ (field names as the stages write them)."""
    folder = run / f"it{k}"
    _write(folder / "rollout" / "manifest.json", {"iteration": k, "forward_passes": 320})
    _write(folder / "scores.parquet", "")
    _write(folder / "score.json", {"iteration": k, "reward_mean": reward, "reward_std": 0.25})
    _write(folder / "metrics.json", {"approx_kl": 1.5e-05, "clip_fraction": 0.125, "grad_norm": 0.75,
                                     "iteration": k, "loss": loss, "ratio_mean": 1.0, "reward_mean": reward,
                                     "reward_std": 0.25, "rollout_forward_passes": 320,
                                     "train_backward_passes": 16, "train_forward_passes": 16,
                                     "trained_items": 8.0})
    _write(folder / "rollout.timings.json", {"load_seconds": 8.4, "sample_seconds": 6.5})
    _write(folder / "update.timings.json", {"load_seconds": 6.4, "train_seconds": 0.75})
    _write(folder / "checkpoint" / "checksums.json", {})


def _point(run: Path, k: int, reward: float) -> None:
    _write(run / "eval" / "points" / f"it{k}" / "metrics.json",
           {"iteration": k, "prompts": 4, "use_ema": True, "num_steps": 4, "metrics": {"reward": reward},
            "per_video": {}, "not_configured": {}})


@pytest.fixture
def run(tmp_path) -> Path:
    """runs/tiny after init, two iterations and the evaluation of checkpoints 0 and 2."""
    run = tmp_path / "runs" / "tiny"
    _write(run / "it0" / "checkpoint" / "checksums.json", {})
    _iteration(run, 1, 0.5, -0.01)
    _iteration(run, 2, 0.625, -0.02)
    _point(run, 0, 0.5)
    _point(run, 2, 0.75)
    _write(run / "eval" / "metrics.json", {"iteration": 2, "base": 0.5, "trained": 0.75, "delta": 0.25,
                                           "ci_low": 0.125, "ci_high": 0.375})
    _write(run / "export" / "export.json", {})
    return run


def _table(run: Path, plan=watch.Plan()) -> list[str]:
    files = watch.Files()
    text = watch.format_table(watch.read_rows(run, files), watch.read_evaluation(run, files),
                              watch.read_status(run, files, plan))
    return text.splitlines()


def test_the_table_of_two_iterations_and_an_evaluation(run):
    lines = _table(run, watch.Plan(iterations=2, eval_at=(0, 2)))
    assert lines[0].split() == ["it", "reward", "std", "loss", "clip", "kl", "grad_norm", "rollout_s", "train_s",
                                "eval_reward"]
    assert lines[1].split() == ["0", *["-"] * 8, "0.5"]  # the base: evaluated, not trained
    assert lines[2].split() == ["1", "0.5", "0.25", "-0.01", "0.125", "1.5e-05", "0.75", "6.5", "0.75", "-"]
    assert lines[3].split() == ["2", "0.625", "0.25", "-0.02", "0.125", "1.5e-05", "0.75", "6.5", "0.75", "0.75"]
    assert len({len(line) for line in lines[:4]}) == 1  # fixed-width columns
    assert lines[4] == ("held-out reward at iteration 2: base 0.5, trained 0.75, delta +0.25 "
                        "(95% interval +0.125 to +0.375)")
    assert lines[5] == "nothing running: the run is complete (2 iterations, evaluated, exported)"


def test_a_learning_rate_and_reward_components_get_columns_when_present(run):
    metrics = json.loads((run / "it2" / "metrics.json").read_text())
    _write(run / "it2" / "metrics.json", {**metrics, "learning_rate": 1e-4})
    _write(run / "it2" / "score.json", {"iteration": 2, "reward_mean": 0.625, "reward_std": 0.25,
                                        "hpsv3_mean": 0.5, "motion_mean": 0.75})
    lines = _table(run)
    assert lines[0].split()[7] == "lr" and lines[0].split()[-2:] == ["hpsv3", "motion"]
    assert lines[3].split()[7] == "0.0001" and lines[3].split()[-2:] == ["0.5", "0.75"]
    assert lines[2].split()[7] == "-"


@pytest.mark.parametrize("present, running", [
    (["rollout/manifest.json"], "score@3"),
    (["rollout/manifest.json", "scores.parquet"], "update@3"),
    (["rollout/prompt_embeds.safetensors"], "rollout@3"),  # a rollout folder without its manifest
])
def test_the_last_line_names_the_stage_in_progress(run, present, running):
    for name in present:
        _write(run / "it3" / name, "")
    assert _table(run, watch.Plan(iterations=3, eval_at=(0, 3)))[-1] == f"in progress (or next): {running}"


def test_after_the_last_iteration_the_evaluation_is_next(run):
    (run / "eval" / "metrics.json").unlink()
    assert _table(run, watch.Plan(iterations=2, eval_at=(0, 1, 2)))[-1] == "in progress (or next): eval_checkpoint@1"
    assert _table(run, watch.Plan(iterations=2, eval_at=(0, 2)))[-1] == "in progress (or next): evaluate"


def test_dvc_s_lock_names_the_running_stage(run, tmp_path):
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    assert _table(run)[-1].startswith("nothing running (no DVC lock); next stage: rollout@3")
    lock = {"write": {str((run / "it3" / "rollout").resolve()): {"pid": os.getpid(), "cmd": "dvc repro"}},
            "read": {}}
    _write(tmp_path / ".dvc" / "tmp" / "rwlock", lock)
    assert _table(run)[-1] == f"running: rollout@3 (DVC lock, pid {os.getpid()})"
    _write(tmp_path / ".dvc" / "tmp" / "rwlock", {"write": {str(tmp_path / "runs" / "prompts" / "train.parquet"):
                                                            {"pid": os.getpid()}}})
    assert _table(run)[-1].startswith("running: curate (DVC lock")


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]", '{"loss": "NaN?"}'])
def test_a_missing_or_garbage_file_shows_as_a_dash(run, content):
    for name in ("metrics.json", "score.json", "update.timings.json"):
        path = run / "it1" / name
        path.unlink()
        if content is not None and name != "metrics.json":
            _write(path, content)
    if content is not None:
        _write(run / "it1" / "metrics.json", content)
    _write(run / "eval" / "metrics.json", "{half")
    lines = _table(run)
    row = {line.split()[0]: line.split() for line in lines[1:4]}
    if content is None:  # no metrics.json: iteration 1 is not finished, no row
        assert "1" not in row and lines[1].split()[0] == "0"
    else:
        assert row["1"] == ["1", *["-"] * 6, "6.5", "-", "-"]
    assert not any(line.startswith("held-out") for line in lines)


def test_json_rows(run, capsys):
    assert watch.main([str(run), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kind"] for r in records] == ["iteration"] * 3 + ["evaluation", "status"]
    assert records[2] == {"kind": "iteration", "iteration": 2, "reward_mean": 0.625, "reward_std": 0.25,
                          "loss": -0.02, "clip_fraction": 0.125, "approx_kl": 1.5e-05, "grad_norm": 0.75,
                          "learning_rate": None, "rollout_seconds": 6.5, "train_seconds": 0.75, "eval_reward": 0.75}
    assert records[0]["loss"] is None and records[0]["eval_reward"] == 0.5
    assert records[3]["delta"] == 0.25
    assert records[4]["next"] == "rollout@3 (or the evaluation, after the last iteration)"


def test_a_missing_run_directory_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert watch.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run directory at" in err


def test_the_command_imports_no_torch_and_reads_params_for_its_default(run, tmp_path):
    code = ("import sys; from flash_grpo_core.pipeline import watch; code = watch.main(); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(code)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("preset: toy ", "preset: tiny "))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[3].split()[:2] == ["2", "0.625"]


def test_follow_prints_what_changed_and_stops_on_ctrl_c(run):
    out, calls = io.StringIO(), []

    def sleep(seconds):
        calls.append(seconds)
        if len(calls) == 1:  # a third iteration finishes between two refreshes
            _iteration(run, 3, 0.875, -0.03)
            return
        raise KeyboardInterrupt

    watcher = watch.Watcher(run, watch.Plan())
    assert watch.follow(watcher, 2.0, out=out, sleep=sleep) == 0
    lines = out.getvalue().splitlines()
    assert calls == [2.0, 2.0]
    assert lines[0].split()[0] == "it" and sum(line.split()[0] == "it" for line in lines) == 1  # one header
    assert [line.split()[0] for line in lines[1:4]] == ["0", "1", "2"]
    assert lines[-2].split()[:2] == ["3", "0.875"]  # only the new row, then the new status
    assert lines[-1].endswith("] in progress (or next): rollout@4 (or the evaluation, after the last iteration)")


def test_follow_from_the_command_line_exits_0_on_ctrl_c(run, capsys):
    def interrupted(_):
        raise KeyboardInterrupt

    assert watch.main([str(run), "--follow", "5", "--json"], sleep=interrupted) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["kind"] == "status"
