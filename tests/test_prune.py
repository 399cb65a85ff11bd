"""Thinning old checkpoints (flash_grpo_core/pipeline/prune.py): every n-th iteration's and the
latest stay, the others leave the workspace and the DVC cache, and `dvc repro --allow-missing` continues the run.

The end-to-end test runs real DVC on a pipeline of the same shape as dvc.yaml (init, then rollout and
update per iteration, evaluations of some checkpoints) whose commands are one-line file writers, so
it takes seconds: what is tested is DVC's bookkeeping, not training.
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from flash_grpo_core.pipeline.workspace import tool_env
from flash_grpo_core.pipeline import prune

BIN = Path(sys.executable).parent


def _lock(iterations: int, evaluated=(), changed: str = "") -> dict:
    stages = {"init": {"outs": [{"path": "runs/toy/it0/checkpoint", "md5": "c0.dir"}]}}
    for k in range(1, iterations + 1):
        stages[f"rollout@{k}"] = {"deps": [{"path": f"runs/toy/it{k - 1}/checkpoint", "md5": f"c{k - 1}.dir"}],
                                  "outs": [{"path": f"runs/toy/it{k}/rollout", "md5": f"r{k}.dir"}]}
        stages[f"update@{k}"] = {"outs": [{"path": f"runs/toy/it{k}/checkpoint", "md5": f"c{k}{changed}.dir"}]}
    for k in evaluated:
        stages[f"eval_checkpoint@{k}"] = {"outs": [{"path": f"runs/toy/eval/points/it{k}", "md5": f"e{k}.dir"}]}
    return stages


def test_the_plan_keeps_every_nth_the_latest_and_what_is_still_read():
    result = prune.plan(_lock(7, evaluated=(0, 3, 6)), "runs/toy", every=3, eval_at=(0, 3, 6, 7))
    assert result.kept == [0, 3, 6, 7] and list(result.pruned) == [1, 2, 4, 5]
    assert result.pruned[4] == "c4.dir"
    # iteration 7's update ran but its evaluation did not: 7 is kept as the latest anyway; an
    # evaluation still to run keeps its checkpoint, as does the next iteration not run yet
    waiting = prune.plan(_lock(5, evaluated=(0,)), "runs/toy", every=5, eval_at=(0, 2, 5))
    assert waiting.kept == [0, 2, 5] and list(waiting.pruned) == [1, 3, 4]
    lock = _lock(4)
    del lock["update@4"]  # iteration 4's rollout ran, its update did not: it3 is read again
    assert prune.plan(lock, "runs/toy", every=2).kept == [0, 2, 3]
    assert prune.plan(_lock(4), "runs/toy", every=0).pruned == {}  # 0: keep everything
    assert prune.plan(_lock(4), "runs/other", every=2).kept == []  # another run's folder


def test_cache_objects_named_by_a_kept_output_stay(tmp_path):
    cache = tmp_path / "cache"

    def put(name: str, content: bytes) -> None:
        path = cache / "files" / "md5" / name[:2] / name[2:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)

    shared, own, kept_own = "aa" + "1" * 30, "bb" + "2" * 30, "cc" + "3" * 30
    put("d1" + "0" * 29 + ".dir", json.dumps([{"md5": shared, "relpath": "config.json"},
                                               {"md5": own, "relpath": "trainable.safetensors"}]).encode())
    put("d2" + "0" * 29 + ".dir", json.dumps([{"md5": shared, "relpath": "config.json"},
                                               {"md5": kept_own, "relpath": "trainable.safetensors"}]).encode())
    for name in (shared, own, kept_own):
        put(name, name.encode())
    stages = {"update@1": {"outs": [{"path": "runs/toy/it1/checkpoint", "md5": "d1" + "0" * 29 + ".dir"}]},
              "update@2": {"outs": [{"path": "runs/toy/it2/checkpoint", "md5": "d2" + "0" * 29 + ".dir"}]}}
    found = prune.cache_objects(stages, {1: "d1" + "0" * 29 + ".dir"}, "runs/toy", cache)
    assert [path.parent.name + path.name for path in found] == ["bb" + "2" * 30, "d1" + "0" * 29 + ".dir"]


MAKE = """import hashlib, json, pathlib, sys
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
source = b"".join(pathlib.Path(p).joinpath("weights.bin").read_bytes() for p in sys.argv[2:])
(out / "weights.bin").write_bytes(hashlib.sha256(source + out.as_posix().encode()).digest() * 64)
(out / "config.json").write_text(json.dumps({"layers": 2}))  # the same bytes in every iteration
"""

PIPELINE = """stages:
  init:
    cmd: python make.py runs/toy/it0/checkpoint
    deps:
      - make.py
    outs:
      - runs/toy/it0/checkpoint
  rollout:
    foreach: ${loop}
    do:
      cmd: python make.py runs/toy/it${key}/rollout runs/toy/it${item}/checkpoint
      deps:
        - make.py
        - runs/toy/it${item}/checkpoint
      outs:
        - runs/toy/it${key}/rollout
  update:
    foreach: ${loop}
    do:
      cmd: python make.py runs/toy/it${key}/checkpoint runs/toy/it${item}/checkpoint runs/toy/it${key}/rollout
      deps:
        - make.py
        - runs/toy/it${item}/checkpoint
        - runs/toy/it${key}/rollout
      outs:
        - runs/toy/it${key}/checkpoint
  eval_checkpoint:
    foreach: [0, 4]
    do:
      cmd: python make.py runs/toy/eval/it${item} runs/toy/it${item}/checkpoint
      deps:
        - make.py
        - runs/toy/it${item}/checkpoint
      outs:
        - runs/toy/eval/it${item}
"""


def _run(args, cwd):
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=tool_env(), capture_output=True, text=True,
                            check=False, timeout=300)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _loop(project: Path, iterations: int) -> None:
    (project / "params.yaml").write_text("loop:\n" + "".join(f"  '{k}': {k - 1}\n" for k in range(1, iterations + 1)))


@pytest.fixture
def pipeline(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    _run(["git", "init", "-q"], project)
    _run([BIN / "dvc", "init", "-q"], project)
    (project / "make.py").write_text(MAKE)
    (project / "dvc.yaml").write_text(PIPELINE)
    _loop(project, 4)
    _run([BIN / "dvc", "repro"], project)
    return project


def test_pruned_checkpoints_leave_workspace_and_cache_and_the_run_continues(pipeline):
    from flows import dvc_runner

    params = SimpleNamespace(preset="toy", pipeline=SimpleNamespace(root="runs", eval_at=(0, 4),
                                                                    keep_checkpoints_every=2))
    cache = prune.dvc_cache_dir(pipeline)
    objects_before = {p for p in (cache / "files").rglob("*") if p.is_file()}
    assert prune.prune(pipeline, params, dry_run=True).pruned and (pipeline / "runs/toy/it1/checkpoint").is_dir()
    result = prune.prune(pipeline, params)
    assert list(result.pruned) == [1, 3] and result.kept == [0, 2, 4]
    for k in range(5):
        assert (pipeline / f"runs/toy/it{k}/checkpoint").is_dir() == (k in (0, 2, 4)), k
    gone = objects_before - {p for p in (cache / "files").rglob("*") if p.is_file()}
    assert sorted(gone) == sorted(result.objects) and len(gone) == 4  # two .dir listings, two weights
    assert all(not path.name.endswith(".json") for path in gone)
    config = json.loads((pipeline / "runs/toy/it2/checkpoint/config.json").read_text())
    assert config == {"layers": 2}  # its object, shared with the pruned ones, stayed
    recorded = json.loads((pipeline / "runs/toy/pruned.json").read_text())
    assert recorded["every"] == 2 and sorted(recorded["iterations"]) == ["1", "3"]
    assert prune.pruned_iterations(pipeline, params) == result.pruned

    status = _run([BIN / "dvc", "status"], pipeline)
    assert "update@1" in status and "deleted" in status  # DVC still sees them as missing
    assert "Running stage" not in _run([BIN / "dvc", "repro", "--allow-missing"], pipeline)

    before = (pipeline / "runs/toy/it4/checkpoint/weights.bin").read_bytes()
    _loop(pipeline, 5)  # one more iteration: only its stages run, from the latest checkpoint
    run = dvc_runner.repro("update@5", pipeline, allow_missing=True)
    assert sorted(run.ran) == ["rollout@5", "update@5"], run.lines
    assert (pipeline / "runs/toy/it4/checkpoint/weights.bin").read_bytes() == before
    again = prune.prune(pipeline, params)
    assert list(again.pruned) == [] and again.kept == [0, 2, 4, 5]  # 4: every 2nd; 5: the latest
    assert sorted(json.loads((pipeline / "runs/toy/pruned.json").read_text())["iterations"]) == ["1", "3"]


def test_the_command_reports_and_refuses_bad_settings(pipeline, capsys):
    from flash_grpo_core.config import ConfigError, load_params

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match="pipeline.keep_checkpoints_every must be >= 0"):
        load_params(root / "params.yaml", overrides={"pipeline.keep_checkpoints_every": -1})
    with pytest.raises(SystemExit):
        prune.main(["--every", "-2"])
    assert "--every must be >= 0" in capsys.readouterr().err
    assert prune.main(["--params", str(pipeline / "missing.yaml")]) == 2
    assert "params file not found" in capsys.readouterr().err
