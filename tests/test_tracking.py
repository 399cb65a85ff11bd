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


def test_a_measurement_is_logged_once_a_step_and_a_changed_result_again(tmp_path):
    spec = RunSpec(tmp_path / "run", "run")
    for seconds, loss in ((3.0, 0.5), (4.0, 0.5), (5.0, 0.25)):  # a stage run three times at step 1
        with Tracker(spec, rank=0) as tracker:
            tracker.log_scalars({"seconds": seconds}, 1, prefix="cost", measured=True)
            tracker.log_scalars({"loss": loss}, 1, prefix="train")
    run = read_run(spec.log_dir)
    assert steps(run, "cost/seconds") == [(1, 3.0)]  # a rerun's wall time adds no second point
    assert steps(run, "train/loss") == [(1, 0.5), (1, 0.25)]  # a result that changed is shown


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

    def __init__(self, spec, run):
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
        def __init__(self, spec, run):
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
        load_params(ROOT / "params.yaml", overrides={"tracking.backends": ["neptune"]})
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


def wandb_history(log_dir: Path) -> dict[tuple[str, int], float]:
    """{(key, iteration): value} of every offline W&B run file under `log_dir`, read from W&B's own
    records (its LevelDB-style log of protobuf `Record`s: 32 KiB blocks, 7-byte chunk headers)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    values = {}
    for path in sorted(log_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, position, pending, records = path.read_bytes(), 7, b"", []  # past the file header
        while position + 7 <= len(data):
            if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
                position += 32768 - position % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[position:position + 7])
            if kind == 0:
                break
            chunk, position = data[position + 7:position + 7 + length], position + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk  # full, first | middle, last
            if kind in (1, 4):
                records.append(pending)
        for raw in records:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                for key, value in items.items():
                    if not key.startswith("_") and key != "iteration":
                        values[(key, int(items["iteration"]))] = value
    return values


def test_wandb_offline_and_mlflow_receive_what_tensorboard_does(tmp_path, monkeypatch):
    """One run over two tracker processes, an evaluation at an earlier step after the updates: W&B
    (offline) and MLflow (its local SQLite store) hold every scalar TensorBoard holds, at its step,
    and the sample."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = RunSpec(tmp_path / "run", "run", backends=("tensorboard", "wandb", "mlflow"),
                   options={"wandb": {"mode": "offline"}})
    video = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    with Tracker(spec, rank=0) as tracker:
        for it in (1, 2):
            tracker.log_scalars({"loss": 0.5 / it, "reward": {"brightness_mean": 0.1 * it}}, it, prefix="train")
    with Tracker(spec, rank=0) as tracker:  # a later stage: the same run in every backend
        tracker.log_scalars({"reward": 0.25}, 0, prefix="eval")
        tracker.log_video("eval/sample", video, 0)
        tracker.log_scalars({"loss": 0.125}, 3, prefix="train")
    board = read_run(spec.log_dir)
    expected = {(tag, event.step): pytest.approx(event.value, rel=1e-6)
                for tag in board.Tags()["scalars"] for event in board.Scalars(tag)}
    assert len(expected) == 6
    logged = wandb_history(spec.log_dir)
    assert {key: value for key, value in logged.items() if not key[0].startswith("eval/sample")} == expected
    assert {key for key in logged if key[0].endswith("/_type")} <= {("eval/sample_frames/_type", 0),
                                                                   ("eval/sample/_type", 0)}  # the sample
    assert len({key for key in logged if key[0].endswith("/_type")}) == 1
    assert len(list(spec.log_dir.glob("wandb/offline-run-*"))) == 2  # one W&B run id, a folder a process

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{spec.log_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("flash-grpo").experiment_id])
    assert run.data.tags["flash_grpo.run_id"] == json.loads((spec.log_dir / RUN_FILE).read_text())["run_id"]
    stored = {(tag, metric.step): metric.value for tag in run.data.metrics
              for metric in client.get_metric_history(run.info.run_id, tag)}
    assert stored == expected
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["images"]  # the sample's frames
    links = json.loads((spec.log_dir / "links.json").read_text())
    assert set(links) == {"tensorboard", "wandb", "mlflow"} and "wandb sync" in links["wandb"]


def test_the_per_step_picture_adds_each_step_s_reward_spread():
    import torch

    from stages.update import with_reward_spread

    steps = torch.tensor([[0], [0], [3], [3], [3], [3]])  # [S, T]: groups of 2, one trained step each
    rewards = [0.0, 1.0, 2.0, 2.0, 1.0, 2.0]  # group stds 0.5, 0 (no signal), 0.5
    trainer = {0: {"items": 2.0, "output_grad_norm": 0.1}, 3: {"items": 2.0, "output_grad_norm": 0.2}}
    picture = with_reward_spread(trainer, steps, rewards, group_size=2)
    assert picture == {"k0": {"items": 2.0, "output_grad_norm": 0.1, "reward_spread": 0.5},
                       "k3": {"items": 2.0, "output_grad_norm": 0.2, "reward_spread": 0.25}}
