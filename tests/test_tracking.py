"""Live tracking (flash_grpo_core/pipeline/tracking.py), read back with TensorBoard's own reader."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flash_grpo_core.config import ConfigError, load_params
from flash_grpo_core.pipeline.tracking import LEDGER_FILE, RUN_FILE, RunSpec, Tracker, run_spec

ROOT = Path(__file__).resolve().parents[1]


def read_run(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def steps(accumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_scalars_land_at_their_iteration(tmp_path):
    spec = RunSpec(tmp_path / "run", "run")
    with Tracker(spec, rank=0) as tracker:
        for it in (1, 2):
            tracker.log_scalars({"loss": 0.5 / it, "grad_norm": 2.0, "note": "text",
                                 "reward": {"brightness_mean": 0.1 * it}, "nan": float("nan")}, it, prefix="train")
    run = read_run(spec.log_dir)
    assert set(run.Tags()["scalars"]) == {"train/loss", "train/grad_norm", "train/reward/brightness_mean"}
    assert steps(run, "train/loss") == [(1, 0.5), (2, 0.25)]
    assert [s for s, _ in steps(run, "train/reward/brightness_mean")] == [1, 2]
    assert json.loads((spec.log_dir / RUN_FILE).read_text())["run_name"] == "run"


_APPEND = """
import sys
from pathlib import Path
from flash_grpo_core.pipeline.tracking import RunSpec, Tracker
with Tracker(RunSpec(Path(sys.argv[1]), "run"), rank=0) as tracker:
    tracker.log_scalars({"loss": 0.25}, 2)  # a rerun of iteration 2: the same value, nothing added
    tracker.log_scalars({"loss": 0.125}, 3)
    print(tracker.run_id)
"""


def test_a_later_process_appends_to_the_same_run_once(tmp_path):
    spec = RunSpec(tmp_path / "run", "run")
    with Tracker(spec, rank=0) as tracker:
        tracker.log_scalars({"loss": 0.5}, 1)
        tracker.log_scalars({"loss": 0.25}, 2)
    first = tracker.run_id
    result = subprocess.run([sys.executable, "-c", _APPEND, str(spec.log_dir)], cwd=ROOT, capture_output=True,
                            text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == first  # the run id read back from run.json
    assert steps(read_run(spec.log_dir), "loss") == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert len(list(spec.log_dir.glob("events.out.tfevents.*"))) == 2  # one event file a process, one log dir
    assert len((spec.log_dir / LEDGER_FILE).read_text().splitlines()) == 3


def test_other_ranks_write_nothing(tmp_path, monkeypatch):
    spec = RunSpec(tmp_path / "run", "run")
    with Tracker(spec, rank=1) as tracker:
        tracker.log_scalars({"loss": 1.0}, 1)
        tracker.log_video("sample", np.zeros((2, 4, 4, 3), np.uint8), 1)
    monkeypatch.setenv("RANK", "3")
    with Tracker(spec) as tracker:  # the rank from torchrun's environment
        tracker.log_scalars({"loss": 1.0}, 1)
    assert not spec.log_dir.exists()


class Broken:
    name = "tensorboard"
    calls = 0

    def __init__(self, spec):
        pass

    def scalars(self, values, step):
        Broken.calls += 1
        raise RuntimeError("the writer is broken")

    video = scalars

    def close(self):
        raise RuntimeError("the writer is broken")


def test_a_failing_backend_warns_once_and_the_caller_goes_on(tmp_path, capsys):
    spec = RunSpec(tmp_path / "run", "run")
    with Tracker(spec, rank=0, backends={"tensorboard": Broken}) as tracker:
        for it in (1, 2, 3):
            tracker.log_scalars({"loss": 1.0}, it)
            tracker.log_video("sample", np.zeros((2, 4, 4, 3), np.uint8), it)
    err = capsys.readouterr().err
    assert err.count("warning: tracking: tensorboard disabled (RuntimeError: the writer is broken)") == 1, err
    assert Broken.calls == 1 and not (spec.log_dir / LEDGER_FILE).exists()  # nothing counted as logged

    class Missing:
        def __init__(self, spec):
            raise ImportError("No module named 'tensorboard'")

    with Tracker(spec, rank=0, backends={"tensorboard": Missing}) as tracker:
        tracker.log_scalars({"loss": 1.0}, 1)
        tracker.log_scalars({"loss": 1.0}, 2)
    assert capsys.readouterr().err.count("tensorboard disabled (ImportError") == 1


def test_a_sample_video_is_logged_at_its_iteration(tmp_path):
    spec = RunSpec(tmp_path / "run", "run")
    video = np.random.default_rng(0).integers(0, 255, (9, 8, 8, 3), dtype=np.uint8)
    with Tracker(spec, rank=0) as tracker:
        tracker.log_video("eval/sample", video, 2)
        tracker.log_video("eval/sample", video, 2)  # again: already in the run
    images = read_run(spec.log_dir).Tags()["images"]
    assert len(images) == 1 and images[0] in ("eval/sample", "eval/sample_frames")  # a GIF where moviepy can
    events = read_run(spec.log_dir).Images(images[0])
    assert [event.step for event in events] == [2]
    if images[0] == "eval/sample_frames":  # no video encoder: the frames left to right
        assert (events[0].height, events[0].width) == (8, 9 * 8)


def test_the_tracking_section_resolves_per_preset_and_stays_out_of_presets(tmp_path):
    params = load_params(ROOT / "params.yaml", preset="tiny")
    assert params.tracking.backends == ("tensorboard",)
    assert run_spec(params).log_dir == Path("runs") / "tiny" / "tracking" / "tiny"
    custom = load_params(ROOT / "params.yaml", preset="tiny",
                         overrides={"tracking.run_name": "a", "tracking.dir": "tb"})
    assert run_spec(custom).log_dir == Path("tb") / "a"
    off = load_params(ROOT / "params.yaml", preset="tiny", overrides={"tracking.backends": []})
    assert not Tracker(run_spec(off), rank=0).active
    with pytest.raises(ConfigError, match="tracking.backends: unknown"):
        load_params(ROOT / "params.yaml", overrides={"tracking.backends": ["wandb"]})
    text = (ROOT / "params.yaml").read_text().replace("  tiny:\n    model:\n",
                                                      "  tiny:\n    tracking:\n      run_name: b\n    model:\n", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match="presets.tiny: set `tracking` in the base section only"):
        load_params(tmp_path / "params.yaml")


def test_no_stage_lists_the_tracking_section_in_dvc_yaml():
    from flash_grpo_core.config import read_yaml

    for name, stage in read_yaml(ROOT / "dvc.yaml")["stages"].items():
        assert not [p for p in stage.get("do", stage).get("params") or [] if str(p).startswith("tracking")], name


def test_a_stage_cost_is_its_timings_throughput_and_peak_memory():
    from flash_grpo_core.pipeline.tracking import cost

    numbers = cost({"load_seconds": 1.0, "train_seconds": 4.0}, videos=16, world_size=2, seconds_key="train_seconds")
    assert numbers["load_seconds"] == 1.0 and numbers["videos_per_second_per_rank"] == 2.0
    assert numbers["peak_rss_gb"] > 0  # no GPU here: the process's resident set
    assert "videos_per_second_per_rank" not in cost({}, videos=16, world_size=1, seconds_key="train_seconds")
