"""The benchmarks bench/costs/gpu_step.py, bench/costs/lora_cost.py and bench/costs/gpu_check.sh (smoke
runs at the tiny shape), bench/alignment/toy_probe.py (a smoke run on the shipped toy base), the helpers
only of bench/costs/process_scaling.py and bench/costs/rollout_cost.py (their measurements run for
minutes), the results writer bench/results_io.py, and the `--help` of every benchmark module."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flash_grpo_core.pipeline.workspace import copy_project, tool_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def importable_bench(monkeypatch):
    """`from bench... import ...` works: bench is a package of the repository, outside the installed one."""
    monkeypatch.syspath_prepend(str(ROOT))


def test_lora_cost_runs_every_way_of_training_at_the_tiny_shape(tmp_path, importable_bench):
    from bench.costs import lora_cost

    args = lora_cost.parse_args(["--out-dir", str(tmp_path)])
    full, lora, frozen = (lora_cost.engine_for(args, way, 0) for way in ("full", "lora", "no-weight-grads"))
    transformer_weights = dict(full.policy.transformer.named_parameters())
    assert set(full.policy.parameters) == set(transformer_weights)  # every weight
    assert lora.policy.parameters and all("lora_" in name and p.dtype == torch.float32 and p.requires_grad
                                          for name, p in lora.policy.parameters.items())
    assert not any(p.requires_grad for p in frozen.policy.transformer.parameters())
    half = lora_cost.engine_for(args, "lora", 2)
    assert half.params.model.gradient_checkpointing and half.params.model.checkpoint_every == 2
    lora_cost.main(["--repeats", "1", "--checkpointing", "off", "2", "--tag", "t", "--out-dir", str(tmp_path)])
    rows = json.loads((tmp_path / "lora_cost-tiny-cpu-t.json").read_text())["rows"]
    assert [(row["way"], row["checkpointing"]) for row in rows] == [
        (way, every) for every in (0, 2) for way in lora_cost.WAYS]
    assert all(row["seconds"] > 0 and row["peak_gib"] > 0 for row in rows)
    table = (tmp_path / "lora_cost-tiny-cpu-t.md").read_text()
    assert table.count("| no-weight-grads |") == 2 and "| lora | every 2 |" in table
    with pytest.raises(SystemExit):
        lora_cost.parse_args(["--checkpointing", "1"])  # on is spelt on


def test_lora_cost_runs_the_base_in_the_asked_dtype_on_the_asked_blocks(importable_bench, monkeypatch):
    from bench.costs import lora_cost
    from flash_grpo_core.engine.sampler import compute_dtype
    from flash_grpo_core.models import random_stacks

    args = lora_cost.parse_args(["--dtype", "bfloat16"])
    lora, computed, cast = (lora_cost.engine_for(args, way, 1) for way in ("lora", "lora-compute-input",
                                                                           "lora-base-dtype"))
    assert compute_dtype(lora.policy.transformer) == torch.bfloat16
    assert {p.dtype for p in lora.policy.parameters.values()} == {torch.float32}  # as trained: fp32 adapters
    assert lora.params.model.lora_compute == "float32" and computed.params.model.lora_compute == "input"
    assert {p.dtype for p in computed.policy.parameters.values()} == {torch.float32}
    assert {p.dtype for p in cast.policy.parameters.values()} == {torch.bfloat16}

    asked = {}

    def stop(arch, **kwargs):
        asked.update(kwargs, arch=arch)
        raise InterruptedError

    monkeypatch.setattr(random_stacks, "build_random_stack", stop)
    with pytest.raises(InterruptedError):
        lora_cost.engine_for(lora_cost.parse_args(["--arch", "wan1_3b", "--layers", "2"]), "full", 0)
    assert asked["arch"] == "wan1_3b" and asked["num_layers"] == 2
    for bad in (["--layers", "2"], ["--arch", "wan1_3b", "--layers", "0"]):  # tiny has its own 2 blocks
        with pytest.raises(SystemExit):
            lora_cost.parse_args(bad)


def test_lora_cost_reports_a_way_that_runs_out_of_memory_and_measures_the_rest(tmp_path, importable_bench,
                                                                                 monkeypatch):
    from bench.costs import lora_cost

    def out_of_memory(engine, inputs, input_grad):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(lora_cost, "forward_backward", out_of_memory)
    args = lora_cost.parse_args(["--ways", "full", "--checkpointing", "off", "--out-dir", str(tmp_path)])
    row = lora_cost.measure(args, "full", 0)
    assert row["seconds"] is None and row["peak_gib"] is None
    measured = dict(row, checkpointing=1, seconds=2.0, peak_gib=1.0)
    table = lora_cost.markdown(args, [row, measured, dict(measured, way="lora", seconds=3.0)])
    assert "| full | off | out of memory |" in table and "| lora | on | 3.0000 | 1.50 | nan | 1.00 |" in table


def test_gpu_step_writes_every_figure_at_the_tiny_shape(tmp_path, importable_bench):
    from bench.costs import gpu_step

    # rollout and update only: the iteration part runs bench/costs/iteration_cost.py twice more (13 s)
    subprocess.run([sys.executable, "-m", "bench.costs.gpu_step", "--repeats", "1", "--group", "2", "--steps", "4",
                    "--parts", "rollout", "update", "--out-dir", str(tmp_path)], cwd=ROOT, env=tool_env(OMP_NUM_THREADS="1"), check=True,
                   capture_output=True, text=True, timeout=300)
    results = json.loads((tmp_path / "gpu_step-tiny-cpu.json").read_text())
    rollout, update = results["rollout"], results["update"]
    for key in ("pipeline_s_per_video", "pipeline_sampling_s_per_video", "decode_s_per_video", "raw_s_per_video"):
        assert rollout[key] > 0, key
    assert rollout["pipeline_forward_passes_per_video"] == rollout["raw_forward_passes_per_video"] == 2 * 4  # CFG x N
    assert update["pipeline_s_per_item"] > 0 and update["raw_s_per_item"] > 0
    assert update["trained_items"] == 2 and update["trained_steps_per_sample"] == 1  # flash: G items
    for peaks in (rollout["peak_gib"], update["peak_gib"]):
        assert all(value > 0 for value in peaks.values()) and "raw" in peaks and "pipeline" in peaks
    assert results["memory_kind"] == "process_rss"
    assert "iteration" not in results
    assert set(results["ratios"]) == {"rollout/raw (sampling)", "rollout/raw (with decode)", "update/raw"}
    assert all(math.isfinite(value) and value > 0 for value in results["ratios"].values())
    assert results["meets_target"] == gpu_step.verdicts(results["ratios"])
    table = (tmp_path / "gpu_step-tiny-cpu.md").read_text()
    for name, meets in results["meets_target"].items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert row.endswith(f"| {'yes' if meets else 'no'} |"), row


def test_gpu_step_judges_each_ratio_by_its_own_bound(importable_bench):
    from bench.costs import gpu_step

    verdicts = gpu_step.verdicts({"update/raw": 1.2, "rollout/raw (sampling)": 1.1, "full/flash iteration": 4.9,
                                  "full/flash update": 20.0})
    assert verdicts == {"update/raw": False, "rollout/raw (sampling)": True, "full/flash iteration": False}


def test_process_scaling_builds_stage_runs_from_dvc_yaml(tmp_path, importable_bench):
    from bench.costs import process_scaling

    commands = process_scaling.stage_commands(copy_project(ROOT, tmp_path, preset="tiny"))
    assert list(commands) == list(process_scaling.STAGES)
    rollout = commands["rollout@1"]
    assert rollout[:3] == ["python", "-m", "stages.rollout"]
    assert rollout[rollout.index("--out") + 1] == "runs/tiny/it1/rollout"
    assert commands["eval_checkpoint@1"][commands["eval_checkpoint@1"].index("--iteration") + 1] == "1"
    with pytest.raises(ValueError, match="not a stage command"):
        process_scaling.stage_argv("dvc repro")
    env = process_scaling.stage_env(2, 1)
    assert (env["FLASH_GRPO_NPROC_PER_NODE"], env["OMP_NUM_THREADS"], env["FLASH_GRPO_WARM"]) == ("2", "1", "0")
    assert env["PATH"].startswith(str(Path(sys.executable).parent))  # `python` is this environment's


def test_process_scaling_units_rows_and_table(importable_bench, tiny_params):
    from bench.costs import process_scaling

    # tiny preset: 2 prompts, 1 group per shard -> 2 shards; 2 eval prompts in batches of 8 -> 1 unit
    units = process_scaling.work_units(tiny_params(), eval_prompts=4, trained_items=8)
    assert units == {"rollout@1": 2, "score@1": 2, "update@1": 8, "eval_checkpoint@1": 1}
    walls = {"rollout@1": {1: [4.0, 2.0, 3.0], 2: [2.0, 1.0, 1.5]}}
    bodies = {"rollout@1": {1: [1.0, 1.0, 1.0], 2: [0.0, 0.0, 0.0]}}
    [row] = process_scaling.scaling_rows(walls, bodies, units)
    assert (row["wall_1_s"], row["wall_2_s"], row["wall_ratio"]) == (3.0, 1.5, 2.0)  # medians 3.0 / 1.5
    assert row["own_ratio"] is None  # a stage that reports 0.0 s on 2 processes has no ratio
    result = {"size": "default", "cores": 2, "threads": 1, "repeats": 3, "load_before": [0.5, 0, 0],
              "load_after": [1.5, 0, 0], "stages": [row]}
    table = process_scaling.markdown(result)
    assert "| rollout@1 | 2 | 3.00 | 1.50 | 2.00 | 1.00 | 0.00 |  |" in table
    assert "On a machine with 2 cores a second process can only help when the stage's work is compute-bound" in table


def test_toy_probe_scores_each_start_of_the_shipped_base(tmp_path, importable_bench):
    from bench.alignment import toy_probe

    # with toy.rl_only (train prompts kept out of pre-training) those are scored as a split of their own
    toy_probe.main(["--samples", "1", "--sigmas", "0.5", "--name", "smoke", "--out-dir", str(tmp_path),
                    "--set", "toy.rl_only=[red left, cyan down]"])
    record = json.loads((tmp_path / "toy_probe-smoke.json").read_text())
    assert record["base"] == "bench/toy/base"
    assert [(row["prompts"], row["start"]) for row in record["rows"]] == [
        (split, start) for split in ("train", "rl_only", "held_out") for start in ("noise", "sigma 0.5")]
    assert all(0 <= row[key] <= 1 for row in record["rows"] for key in ("reward", "color", "single", "motion"))
    # the prompt's own clip, half noised, comes back closer to the prompt than a sample from noise does
    noise, half = record["rows"][:2]
    assert half["reward"] > noise["reward"]


def test_rollout_cost_files_each_alignment_record_under_the_toy_preset_of_its_grid(tmp_path, importable_bench):
    from bench.costs import rollout_cost

    def summary(name: str, overrides: dict, rewards: dict) -> str:
        variants = {v: {"final_reward": mean, "final_reward_std": std} for v, (mean, std) in rewards.items()}
        (tmp_path / name).write_text(json.dumps({"config": {"overrides": overrides}, "variants": variants}))
        return str(tmp_path / name)

    n10 = summary("n10.json", {"rollout.same_initial_noise": True}, {"flash": (0.58, 0.002), "flash-fast": (0.57, 0.01)})
    n20 = summary("n20.json", {"rollout.num_steps": 20, "rollout.num_candidates": 10},
                  {"flash": (0.575, 0.005), "flash-fast3": (0.57, 0.008)})
    rewards = rollout_cost.heldout([n10, n20])
    assert rewards == {"toy": {"flash": (0.58, 0.002), "flash-fast": (0.57, 0.01)},
                       "toy-n20": {"flash": (0.575, 0.005), "flash-fast3": (0.57, 0.008)}}
    figures = {"forwards_per_video": 20.0, "reduction": 1.0, "wall_ratio": 1.0, "tail_pixel_error": 0.0,
               "tail_pixel_error_vs_fine": 0.0, "euler_tail_pixel_error_vs_fine": 0.0, "head_x_k_relative_change": 0.0,
               "videos": 4, "num_steps": 10, "num_candidates": 5}
    results = {p: {o: dict(figures) for o in rollout_cost.OPTION_SETS} for p in ("toy", "tiny", "toy-n20")}
    rows = {row["option"]: row for row in rollout_cost.entries(results, rewards)}
    assert rows["head1-tail2"]["heldout_reward"] == 0.57 and rows["head1-tail2"]["flash_heldout_reward"] == 0.58
    assert rows["head1-tail3"]["heldout_reward"] is None  # not run on the toy's own grid
    assert rows["head1-tail3"]["presets"]["toy-n20"]["heldout_reward"] == 0.57
    assert rows["head1-tail3"]["presets"]["toy-n20"]["flash_heldout_reward"] == 0.575
    assert "heldout_reward" not in rows["head1-tail3"]["presets"]["tiny"]  # no reward there
    table = rollout_cost.markdown(list(rows.values()))
    assert "| head1-tail3 | flash-fast3 | 0.5700 ± 0.0080 | 0.5750 ± 0.0050 |" in table.split("(toy-n20,")[1]
    with pytest.raises(SystemExit, match="none of the toy presets"):
        rollout_cost.heldout([summary("n30.json", {"rollout.num_steps": 30}, {"flash": (0.5, 0.0)})])


def test_the_gpu_check_script_runs_its_steps_at_the_tiny_shape(tmp_path):
    """bench/costs/gpu_check.sh with SMOKE=1 (its CPU form; here its iteration step, whose two runs show
    the script's options reach the benchmark; lora_cost alone is tested above): each record lands in
    $OUT, nothing in the checkout, and $OUT holds a handful of files, not one per table."""
    before = sorted((ROOT / "bench" / "results").iterdir())
    env = tool_env(SMOKE="1", STEPS="iteration", OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(ROOT / "bench" / "costs" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "device.txt", "iteration_cost-check-flash-fast3.json", "iteration_cost-check-flash.json", "log.txt"]
    fast = json.loads((tmp_path / "iteration_cost-check-flash-fast3.json").read_text())
    plain = json.loads((tmp_path / "iteration_cost-check-flash.json").read_text())
    assert (fast["config"]["head_steps"], fast["config"]["tail_steps"]) == (1, 3) and plain["config"]["head_steps"] is None
    assert fast["modes"][0]["rollout_forward"] < plain["modes"][0]["rollout_forward"]
    assert sorted((ROOT / "bench" / "results").iterdir()) == before


# Each benchmark's record, by file-name prefix, and the JSON format it has always been written in.
RECORD_FORMATS = {"faults": {"indent": 1}, "toy_probe": {"sort_keys": True, "ensure_ascii": False}}


def test_the_results_writer_gives_the_recorded_bytes_back(tmp_path, importable_bench, capsys):
    """Every committed record, read and written again with its benchmark's format, is the same bytes:
    the one writer changed no benchmark's output."""
    from bench.results_io import RESULTS, json_text, write_results

    records = sorted(RESULTS.glob("*.json"))
    assert len(records) > 15
    for record in records:
        kwargs = RECORD_FORMATS.get(record.stem.split("-")[0], {})
        markdown = record.with_suffix(".md").read_text()
        json_path, md_path = write_results(record.stem, json.loads(record.read_text()), markdown, tmp_path, **kwargs)
        assert json_path.read_bytes() == record.read_bytes(), record.name
        assert md_path.read_bytes() == record.with_suffix(".md").read_bytes(), record.name
    summary = RESULTS / "alignment" / "summary.json"
    assert json_text(json.loads(summary.read_text())) == summary.read_text()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(  # no temporaries left beside them
        [path.name for path in records] + [path.with_suffix(".md").name for path in records])
    assert f"wrote {tmp_path / 'dvc_scaling.json'} and {tmp_path / 'dvc_scaling.md'}" in capsys.readouterr().out


def test_the_results_writer_ends_a_table_with_one_newline_and_keeps_the_old_file_on_failure(tmp_path,
                                                                                          importable_bench):
    from bench.results_io import write_results

    write_results("x", {"b": 1, "a": "é"}, "| table |", tmp_path / "new")  # creates the folder
    assert (tmp_path / "new" / "x.md").read_text() == "| table |\n"
    assert (tmp_path / "new" / "x.json").read_text() == '{\n  "b": 1,\n  "a": "\\u00e9"\n}\n'
    write_results("x", {"b": 1, "a": "é"}, "| table |\n", tmp_path / "new", sort_keys=True, ensure_ascii=False)
    assert (tmp_path / "new" / "x.md").read_text() == "| table |\n"
    assert (tmp_path / "new" / "x.json").read_text(encoding="utf-8") == '{\n  "a": "é",\n  "b": 1\n}\n'
    with pytest.raises(UnicodeEncodeError):  # a table that cannot be written: the old one stays whole
        write_results("x", {"c": 2}, "| \ud800 |", tmp_path / "new")
    assert (tmp_path / "new" / "x.md").read_text() == "| table |\n"
    assert sorted(path.name for path in (tmp_path / "new").iterdir()) == ["x.json", "x.md"]


BENCHMARKS = ["bench.faults.run", "bench.alignment.alignment", "bench.alignment.toy_probe", "bench.alignment.tune",
              *(f"bench.costs.{name}" for name in ("dvc_scaling", "gpu_step", "iteration_cost", "lora_cost",
                                                   "pipeline_overhead", "process_scaling", "rollout_cost"))]


@pytest.mark.parametrize("module", BENCHMARKS)
def test_every_benchmark_module_answers_help(module, importable_bench, capsys):
    import importlib

    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: ")


def test_the_family_packages_run_as_modules_from_the_repository_root():
    """`python -m bench.faults` and `python -m bench.alignment` (their __main__), as a user runs them."""
    code = ("import runpy, sys\n"
            "for name in ('bench.faults', 'bench.alignment'):\n"
            "    sys.argv = [name, '--help']\n"
            "    try:\n"
            "        runpy.run_module(name, run_name='__main__', alter_sys=True)\n"
            "    except SystemExit as done:\n"
            "        assert done.code == 0, (name, done.code)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=tool_env(), capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: python -m bench.faults [-h] [--small]" in done.stdout
    assert "usage: python -m bench.alignment [-h] [--quick]" in done.stdout
