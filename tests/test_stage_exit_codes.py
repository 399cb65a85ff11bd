"""Stage exit codes tell an orchestrator what a retry can do: 2 never helps, 75 may."""

from flash_grpo_core.config import ConfigError
from flash_grpo_core.rewards.base import RewardUnavailable
from stages.runtime import common


def _raising(error):
    def work(args):
        raise error

    return work


def test_known_input_error_exits_2_with_one_line(capsys):
    assert common.run("score", _raising(ConfigError("train.learning_rate must be > 0")), None) == 2
    assert capsys.readouterr().err.strip() == "score: error: train.learning_rate must be > 0"


def test_a_health_guard_set_to_stop_exits_2_with_one_line(capsys):
    from flash_grpo_core.pipeline.health import HealthStop

    line = "iteration 7: gradient norm 3 is 30.0x its running median 0.1; stopped (health.grad_norm: stop; ...)"
    assert common.run("update", _raising(HealthStop(line)), None) == 2
    assert capsys.readouterr().err.strip() == f"update: error: {line}"


def test_unreachable_reward_exits_75(capsys):
    code = common.run("score", _raising(RewardUnavailable("reward 'hpsv3' at http://127.0.0.1:9/score failed")),
                      None)
    assert code == 75 and "transient" in capsys.readouterr().err


def test_success_prints_one_summary_line(capsys):
    assert common.run("score", lambda args: {"iteration": args, "reward_mean": 0.5}, 1) == 0
    assert capsys.readouterr().out.startswith("score: iteration=1 reward_mean=0.5 seconds=")


def test_finish_keeps_the_exit_code_and_flushes_buffered_output(tmp_path):
    """A stage process ends by os._exit (no interpreter teardown): nothing printed may be lost."""
    import os
    import subprocess
    import sys

    script = ("import logging, sys; from stages.runtime import common; logging.basicConfig(filename=sys.argv[1]); "
              "print('summary', end=''); print('warning', end='', file=sys.stderr); "
              "logging.getLogger('stage').error('logged'); common.finish(75)")
    log = tmp_path / "stage.log"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # block-buffered pipes
    result = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True, text=True, check=False,
                            env=env)
    assert (result.returncode, result.stdout, result.stderr) == (75, "summary", "warning")
    assert "logged" in log.read_text()
