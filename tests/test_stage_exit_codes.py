"""Stage exit codes tell an orchestrator what a retry can do: 2 never helps, 75 may."""

from flash_grpo_core.config import ConfigError
from flash_grpo_core.rewards.base import RewardUnavailable
from stages import _common


def _raising(error):
    def body():
        raise error

    return body


def test_known_input_error_exits_2_with_one_line(capsys):
    assert _common.run("score", _raising(ConfigError("train.learning_rate must be > 0"))) == 2
    assert capsys.readouterr().err.strip() == "score: error: train.learning_rate must be > 0"


def test_unreachable_reward_exits_75(capsys):
    code = _common.run("score", _raising(RewardUnavailable("reward 'hpsv3' at http://127.0.0.1:9/score failed")))
    assert code == 75 and "transient" in capsys.readouterr().err


def test_success_prints_one_summary_line(capsys):
    assert _common.run("score", lambda: {"iteration": 1, "reward_mean": 0.5}) == 0
    assert capsys.readouterr().out.startswith("score: iteration=1 reward_mean=0.5 seconds=")
