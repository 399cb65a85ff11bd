"""Fault injection: the fault points stages and writers expose (flash_grpo_core/faults.py), and the
harness bench/faults.py in its small version: 3 kill points (SIGKILL of a warm stage between a
shard's write and its rename, SIGKILL of dvc after a rename, Ctrl-C after a cold stage finished),
3 corruptions and 8 bad inputs on a scratch copy of the tiny preset, every case clean. The full
version's record: bench/results/faults.md."""

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
    code = f"from flash_grpo_core.faults import fault_point; fault_point{call!r}; print('passed')"
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
    """`from bench import ...` works: the scripts live outside the package."""
    monkeypatch.syspath_prepend(str(ROOT))


@pytest.mark.slow
def test_the_small_fault_run_is_clean(importable_bench, dvc_cache, tmp_path):
    from bench import faults

    results = faults.run(small=True, cache_dir=dvc_cache, scratch=tmp_path)
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
    table = faults.markdown(results)
    assert "| kill points | 2 | 2 resumed equal to the reference; orphaned processes: 0; artifacts lost: 0 |" in table
