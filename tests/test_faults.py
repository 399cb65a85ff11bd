"""Fault injection: the fault points stages and writers expose (flash_grpo_core/artifacts/faults.py), and the
harness bench/faults/ (`python -m bench.faults --small`) in its small version: 2 kill points
(SIGKILL of a warm stage between a shard's write and its rename, Ctrl-C after a cold stage
finished), 3 corruptions and 8 bad inputs on a scratch copy of the tiny preset, every case clean,
and 4 bad edits through `dvc repro` on the finished workspace, each recorded with the outputs it
lost; the check of linked outputs (scripts/verify_cache.py --links) in a DVC project with hard
links. The full version's record: bench/results/faults.md."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _call(spec: str, *call, rank_env: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """fault_point(*call) in a fresh interpreter with FLASH_GRPO_FAULT=spec."""
    env = {key: value for key, value in os.environ.items() if key not in ("FLASH_GRPO_FAULT", "RANK")}
    env.update(FLASH_GRPO_FAULT=spec, **({"RANK": rank_env} if rank_env else {}))
    code = f"from flash_grpo_core.artifacts.faults import fault_point; fault_point{call!r}; print('passed')"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.parametrize("spec, call, rank_env, killed", [
    ("written:manifest.json", ("written", None, "manifest.json"), None, True),
    ("written:manifest.json", ("written", None, "shards.json"), None, False),  # another output
    ("written", ("written", None, "shards.json"), None, True),  # no file named: every output
    ("renamed", ("written", None, "shards.json"), None, False),  # another point
    ("renamed:manifest.json", ("finished",), None, False),  # a point without a file
    ("joined@1", ("joined", 1), None, True),
    ("joined@1", ("joined", 0), None, False),
    ("started@1", ("started",), None, False),  # no RANK: rank 0
    ("started@1", ("started",), "1", True),
    ("", ("started",), None, False),
])
def test_a_fault_point_kills_only_where_it_is_named(spec, call, rank_env, killed):
    result = _call(spec, *call, rank_env=rank_env)
    assert (result.returncode == -signal.SIGKILL) == killed, result
    assert killed or result.stdout.strip() == "passed"


def test_a_hanging_fault_point_says_where_it_hangs():
    with pytest.raises(subprocess.TimeoutExpired) as hung:
        _call("written:shards.json:hang", "written", None, "shards.json", timeout=3)
    stderr = hung.value.stderr or b""
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    assert text.startswith("fault: hanging at written shards.json (pid ")


@pytest.fixture
def importable_bench(monkeypatch):
    """`from bench... import ...` works: bench is a package of the repository, outside the installed one."""
    monkeypatch.syspath_prepend(str(ROOT))


def test_every_stage_of_dvc_yaml_has_a_kill_point(importable_bench):
    """A stage added to dvc.yaml without a kill point of its own fails here (docs/architecture.md)."""
    from bench.faults.kills import FULL
    from flash_grpo_core.pipeline.stage_order import stage_order

    killed = {case.stage.split("@")[0] for case in FULL}
    assert set(stage_order(ROOT / "dvc.yaml")) <= killed, sorted(set(stage_order(ROOT / "dvc.yaml")) - killed)


@pytest.mark.slow
def test_the_small_fault_run_is_clean(importable_bench, dvc_cache, tmp_path):
    from bench.faults import report, run

    results = run.run(small=True, cache_dir=dvc_cache, scratch=tmp_path)
    kills, corruptions, inputs = results["kill_points"], results["corruptions"], results["bad_inputs"]
    cases = results["cases"]
    failing = ([case for case in cases["kill_points"] if not case["resumed_equal"]]
               + [case for case in cases["corruptions"] if not (case["detected_named"] and case["ended_correct"])]
               + [case for case in cases["bad_inputs"] if not case["clear"]])
    assert not failing, failing
    assert kills["tried"] == kills["fired"] == kills["resumed_equal"] == 2 and kills["orphans"] == 0
    assert corruptions["tried"] == corruptions["detected_named"] == corruptions["ended_correct"] == 3
    assert corruptions["reader_named"] >= 1  # the truncated shard: score@1 names it
    assert inputs["tried"] == inputs["clear_exit2"] == 8
    assert results["lost"] == 0
    assert results["warm_stage_runs"] > 0  # the warm cases did run warm
    table = report.markdown(results)
    assert "| kill points | 2 | 2 resumed equal to the reference; orphaned processes: 0; artifacts lost: 0 |" in table
    _check_repro_record(results, table)


def _check_repro_record(results: dict, table: str) -> None:
    """Bad edits through `dvc repro` on the finished workspace: each refused (exit 2 naming the key
    or file), refused by DVC itself or warned of as expected, and no finished output lost: the
    validate stage checks the inputs before DVC removes any stage's outputs."""
    from bench.faults import repro_cases

    repro, cases = results["repro"], {case["case"]: case for case in results["cases"]["repro"]}
    assert repro["tried"] == len(cases) == len(repro_cases.SMALL) == 4
    assert repro["lost"] == 0 and repro["lost_cases"] == [] and not any(case["lost"] for case in cases.values())
    assert repro["passed"] == 4, [case for case in cases.values() if not case["passed"]]
    assert all(case["dvc_exit"] != 0 for case in cases.values() if case["expect"] in ("refused", "dvc"))
    assert "params.yaml" in cases["params: unclosed bracket"]["first_line"]
    assert cases["prompt file edited to garbage"]["failed_stage"] == "validate"
    assert "| bad inputs through `dvc repro` on a finished workspace | 4 | 4 passed" in table


# A two-stage DVC project with hard links into its cache: `check` runs scripts/verify_cache.py
# --links and writes a stamp (`persist`: DVC leaves it in place when the check fails) that `make`
# depends on, so the check runs before any other stage, as a pipeline's first stage would.
LINKED_DVC_YAML = """\
stages:
  check:
    cmd: python {verify} --links && echo checked > checked.txt
    always_changed: true
    outs:
      - checked.txt:
          cache: false
          persist: true
  make:
    cmd: python make.py
    deps: [make.py, checked.txt]
    outs: [out.bin, folder]
"""
MAKE_PY = """\
from pathlib import Path
Path("out.bin").write_bytes(bytes(range(256)) * 4)
Path("folder").mkdir(exist_ok=True)
Path("folder/a.bin").write_bytes(b"weights" * 100)
Path("folder/b.txt").write_text("a listing\\n")
"""


def _linked_project(folder: Path) -> Path:
    from flash_grpo_core.pipeline.workspace import tool_env

    (folder / "dvc.yaml").write_text(LINKED_DVC_YAML.format(verify=ROOT / "scripts" / "verify_cache.py"))
    (folder / "make.py").write_text(MAKE_PY)
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "cache.type", "hardlink"]):
        subprocess.run(command, cwd=folder, env=tool_env(), check=True, capture_output=True)
    return folder


@pytest.mark.slow
def test_a_linked_output_edited_in_place_is_named_before_anything_reruns(tmp_path):
    from flash_grpo_core.pipeline.lock_outputs import cache_dir, changed_outputs, read_lock, verify_linked_outputs
    from flash_grpo_core.pipeline.workspace import tool_env

    project = _linked_project(tmp_path)
    dvc = [str(Path(sys.executable).parent / "dvc"), "repro"]
    first = subprocess.run(dvc, cwd=project, env=tool_env(), capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    outs = read_lock(project / "dvc.lock")
    assert changed_outputs(project, outs) == {}  # DVC's md5s, of a file and of a directory, recomputed
    assert (project / "folder/a.bin").stat().st_nlink == 2 and verify_linked_outputs(project) == []
    victim = project / "folder/a.bin"
    victim.chmod(0o644)  # DVC's read-only protection, which root ignores anyway
    with open(victim, "r+b") as handle:
        handle.write(b"W")
    folder_md5 = next(out.md5 for out in outs if out.path == "folder")
    listing = json.loads((cache_dir(project) / "files/md5" / folder_md5[:2] / folder_md5[2:]).read_text())
    recorded = next(entry["md5"] for entry in listing if entry["relpath"] == "a.bin")
    poisoned = cache_dir(project) / "files/md5" / recorded[:2] / recorded[2:]
    assert poisoned.read_bytes().startswith(b"W")  # the cache object changed with the output
    second = subprocess.run(dvc, cwd=project, env=tool_env(), capture_output=True, text=True, check=False)
    first_line = second.stderr.strip().splitlines()[0]
    assert first_line.startswith("verify_cache: error: folder/a.bin (output of make)") and recorded in first_line
    assert "exited with 2" in second.stderr and "Running stage 'make'" not in second.stdout
    assert victim.read_bytes().startswith(b"W") and (project / "checked.txt").is_file()
    assert changed_outputs(project, outs) == {"folder": "changed"}
    # what the pipeline's validate stage and the preflight (the train-loop flow's first step) call
    from flash_grpo_core.pipeline.lock_outputs import DamagedOutputError, require_intact_links

    with pytest.raises(DamagedOutputError, match="folder/a.bin \\(output of make\\)"):
        require_intact_links(project)
