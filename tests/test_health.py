"""The health guards (flash_grpo_core/pipeline/health.py): each fires on its injected condition, says
what and where in one line, stops when set to stop, and stays silent on every recorded toy run."""

import collections
import csv
from pathlib import Path

import pytest

from flash_grpo_core.config import ConfigError, HealthConfig, params_from_dict
from flash_grpo_core.pipeline.health import HealthStop, act_on, check_health

ROOT = Path(__file__).resolve().parents[1]


def _row(iteration, reward=0.5, grad=0.01, **extra):
    return {"iteration": iteration, "reward_mean": reward, "grad_norm": grad, "first_ratio_deviation": 1e-7,
            "equal_groups_fraction": 0.0, **extra}


HISTORY = [_row(i, reward=0.5 + 0.01 * (i % 3), grad=0.01 + 0.001 * (i % 2)) for i in range(1, 9)]


@pytest.mark.parametrize("row, guard, words", [
    (_row(9, grad=0.2), "grad_norm", "gradient norm 0.2 is 19.0x its running median"),
    (_row(9, first_ratio_deviation=0.05), "ratio", "up to 0.05 from 1"),
    (_row(9, equal_groups_fraction=1.0), "equal_groups_action", "100% of the groups have equal rewards"),
])
def test_each_guard_fires_on_its_condition(row, guard, words):
    findings = check_health(row, HISTORY, HealthConfig())
    assert [f.guard for f in findings] == [guard] and words in findings[0].message and not findings[0].stop


def test_a_reward_collapse_fires_only_after_the_iterations_in_a_row():
    health, rows = HealthConfig(reward_drop_iterations=3), list(HISTORY)
    for iteration, fires in ((9, False), (10, False), (11, True)):
        row = _row(iteration, reward=0.1)
        assert bool(check_health(row, rows, health)) is fires, iteration
        rows.append(row)
    assert "for 4 iterations in a row" in check_health(_row(12, reward=0.1), rows, health)[0].message
    assert not check_health(_row(12, reward=0.5), rows, health)  # back in its band


def test_nothing_fires_without_two_earlier_iterations_or_when_off():
    assert not check_health(_row(2, grad=5.0), HISTORY[:1], HealthConfig())
    assert not check_health(_row(9, grad=5.0, equal_groups_fraction=1.0), HISTORY,
                            HealthConfig(grad_norm="off", equal_groups_action="off"))


def test_stop_raises_one_line_naming_the_iteration_and_warn_returns_the_lines():
    findings = check_health(_row(9, grad=0.2), HISTORY, HealthConfig(grad_norm="stop"))
    with pytest.raises(HealthStop, match=r"^iteration 9: gradient norm .*stopped \(health.grad_norm: stop"):
        act_on(findings, 9, print)
    said = []
    lines = act_on(check_health(_row(9, grad=0.2), HISTORY, HealthConfig()), 9, said.append)
    assert lines == said and len(lines) == 1 and lines[0].startswith("iteration 9: gradient norm")


def test_the_defaults_are_silent_on_every_recorded_toy_run():
    runs = collections.defaultdict(list)
    for record in sorted((ROOT / "bench" / "results").glob("alignment*/runs.csv")):
        for line in csv.DictReader(record.open()):
            runs[(record.parent.name, line["variant"], line["seed"])].append(
                _row(int(line["iteration"]), float(line["train_reward"]), float(line["grad_norm"])))
    assert len(runs) >= 30
    fired = {key: [f.message for i, row in enumerate(rows) for f in check_health(row, rows[:i], HealthConfig())]
             for key, rows in runs.items()}
    assert not {key: messages for key, messages in fired.items() if messages}


def test_bad_settings_name_their_key():
    with pytest.raises(ConfigError, match="health.grad_norm must be one of"):
        params_from_dict({"health": {"grad_norm": "panic"}})
    with pytest.raises(ConfigError, match="health.equal_groups must be in"):
        params_from_dict({"health": {"equal_groups": 0}})
