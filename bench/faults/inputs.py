"""Bad inputs of bench/faults/run.py: a corpus of wrong params, prompt files, model folders, checkpoints
and reward server requests, each run once, with what is expected and what happened.

A stage or CLI is expected to exit with code 2 and a first stderr line that names the key or file
(`<stage>: error: ...` for a stage, run directly with its dvc.lock command and outputs moved to a
scratch folder), without a traceback. The reward server (flash_grpo_core/rewards/server.py, started
as its CLI on a free loopback port) is expected to answer a bad request with its 4xx status code.
Files a case needs are written under `bad-inputs/<n>/` in the project, so relative paths work.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.faults.workspace import Result, Workspace, run_command

NAN = math.nan


def wrong_schema_parquet() -> bytes:
    """A readable Parquet file without a `prompt` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": ["a red square moving left", "a blue square moving up"]}), buffer)
    return buffer.getvalue()


@dataclass(frozen=True)
class BadInput:
    name: str  # what is wrong
    category: str  # params | prompts | model | checkpoint | cli
    run: str  # a dvc stage, `iterations` (flash_grpo_core.pipeline.iterations 3) or `reward-server` (its CLI)
    names: str  # what the first stderr line must contain: the key or the file
    params: dict | None = None  # dotted keys set in a copy of the project's params.yaml (--params)
    params_text: str | None = None  # or a params file of this text
    args: dict = field(default_factory=dict)  # flag -> value in the stage's command ("{file}": the file below)
    argv: tuple[str, ...] = ()  # reward-server: its command line
    file: tuple[str, bytes | Callable[[], bytes]] | None = None  # (name, content) written for the case


def params_case(name: str, params: dict, names: str, run: str = "init", category: str = "params") -> BadInput:
    return BadInput(name, category, run, names, params=params)


JSONL = "prompts.jsonl"
FULL = [
    params_case("unknown top-level key", {"colour": "red"}, "colour"),
    params_case("misspelt key", {"train.learnin_rate": 1e-4}, "train.learnin_rate"),
    params_case("negative learning rate", {"train.learning_rate": -1e-4}, "train.learning_rate"),
    params_case("NaN learning rate", {"train.learning_rate": NAN}, "train.learning_rate"),
    params_case("learning rate a string", {"train.learning_rate": "fast"}, "train.learning_rate"),
    params_case("unknown reward name", {"reward.weights": {"aesthetics": 1.0}}, "reward.weights", "score@1"),
    params_case("NaN reward weight", {"reward.weights.brightness": NAN}, "reward.weights.brightness", "score@1"),
    params_case("reward weight a string", {"reward.weights.brightness": "1"}, "reward.weights.brightness", "score@1"),
    params_case("minibatches that do not divide the batch", {"presets.tiny.train.minibatches": 3},
                "train.minibatches", "update@1"),
    params_case("device cuda without CUDA", {"model.device": "cuda"}, "model.device"),
    params_case("unknown device", {"model.device": "tpu"}, "model.device"),
    params_case("pipeline.root with shell characters", {"pipeline.root": "runs; rm -rf ~"}, "pipeline.root"),
    params_case("pipeline.root outside the project", {"pipeline.root": "../elsewhere"}, "pipeline.root"),
    params_case("unknown preset", {"preset": "wan2b"}, "preset"),
    params_case("group_size 1", {"presets.tiny.rollout.group_size": 1}, "group_size", "rollout@1"),
    params_case("frames not 4k+1", {"presets.tiny.rollout.frames": 10}, "rollout.frames", "rollout@1"),
    params_case("height not a multiple of 16", {"presets.tiny.rollout.height": 40}, "rollout.height", "rollout@1"),
    params_case("height 0", {"presets.tiny.rollout.height": 0}, "rollout.height", "rollout@1"),
    params_case("eval.num_prompts above the eval prompts", {"presets.tiny.eval.num_prompts": 50}, "eval.num_prompts",
      "eval_checkpoint@0"),
    params_case("num_candidates above num_steps", {"rollout.num_candidates": 30}, "rollout.num_candidates"),
    params_case("window larger than N - 1", {"train.mode": "window", "train.window_size": 25}, "train.window_size"),
    params_case("unknown train mode", {"train.mode": "fastest"}, "train.mode"),
    params_case("LoRA rank 0", {"model.lora_rank": 0}, "model.lora_rank"),
    params_case("LoRA rank not an integer", {"model.lora_rank": 2.5}, "model.lora_rank"),
    params_case("betas of one value", {"train.betas": [0.9]}, "train.betas"),
    params_case("EMA decay 1", {"train.ema_decay": 1.0}, "train.ema_decay"),
    params_case("iterations 0", {"iterations": 0}, "iterations"),
    params_case("pipeline.loop out of step with iterations", {"iterations": 3}, "pipeline.loop"),
    params_case("negative weight decay", {"train.weight_decay": -0.1}, "train.weight_decay", "update@1"),
    params_case("negative noise level", {"rollout.noise_level": -1.0}, "rollout.noise_level", "rollout@1"),
    params_case("NaN eval guidance", {"eval.guidance": NAN}, "eval.guidance", "eval_checkpoint@0"),
    params_case("eval fraction above 1", {"data.eval_fraction": 1.5}, "data.eval_fraction", "curate"),
    params_case("data.source with ..", {"data.source": "../prompts/toy.jsonl"}, "data.source"),
    params_case("seed not an integer", {"seed": 1.5}, "seed"),
    params_case("text_len 0", {"presets.tiny.model.text_len": 0}, "model.text_len"),
    BadInput("params not valid YAML", "params", "init", "params.yaml", params_text="train: [unclosed\n"),
    BadInput("params a YAML list", "params", "init", "params.yaml", params_text="- 1\n- 2\n"),
    BadInput("params file missing", "params", "init", "no-such/params.yaml", args={"--params": "no-such/params.yaml"}),
    params_case("wan preset, model.path folder missing",
                {"preset": "wan1_3b", "presets.wan1_3b.model.path": "models/no-such-wan"}, "models/no-such-wan",
                category="model"),
    params_case("wan preset without model.path", {"preset": "wan14b", "presets.wan14b.model.path": None},
                "model.path", category="model"),
    BadInput("wan preset, model.path an empty folder", "model", "init", "empty-wan",
             params={"preset": "wan1_3b", "presets.wan1_3b.model.path": "{dir}/empty-wan"},
             file=("empty-wan/", b"")),
    params_case("checkpoint of another seed", {"seed": 5}, "seed", "eval_checkpoint@0", "checkpoint"),
    params_case("checkpoint of another LoRA rank", {"model.lora_rank": 8}, "model.lora_rank", "rollout@1",
                "checkpoint"),
    params_case("checkpoint of LoRA, params of full fine-tuning", {"model.finetune": "full"}, "model.finetune",
                "update@1", "checkpoint"),
    BadInput("checkpoint folder missing", "checkpoint", "eval_checkpoint@0", "runs/tiny/it9/checkpoint",
             args={"--checkpoint": "runs/tiny/it9/checkpoint"}),
    BadInput("checkpoint of another iteration", "checkpoint", "eval_checkpoint@1", "runs/tiny/it2/checkpoint",
             args={"--checkpoint": "runs/tiny/it2/checkpoint"}),
    BadInput("scores of another iteration", "checkpoint", "update@1", "scores.parquet",
             args={"--scores": "runs/tiny/it2/scores.parquet"}),
    BadInput("reward state not JSON", "checkpoint", "score@1", "reward_state.json",
             args={"--reward-state-in": "{file}"}, file=("reward_state.json", b"{broken")),
    BadInput("malformed JSONL line", "prompts", "curate", JSONL, args={"--sources": "{file}"},
             file=(JSONL, b'{"prompt": "a red square moving left"}\n{"prompt": 3}\n')),
    BadInput("JSONL line not JSON", "prompts", "curate", JSONL, args={"--sources": "{file}"},
             file=(JSONL, b'{"prompt": "a red square moving left"}\nnot json\n')),
    BadInput("empty prompt file", "prompts", "curate", JSONL, args={"--sources": "{file}"}, file=(JSONL, b"")),
    BadInput("prompts parquet of another schema", "prompts", "curate", "prompts.parquet",
             args={"--sources": "{file}"}, file=("prompts.parquet", wrong_schema_parquet)),
    BadInput("prompt file missing", "prompts", "curate", "no-such.jsonl", args={"--sources": "prompts/no-such.jsonl"}),
    BadInput("unknown prompt file type", "prompts", "curate", "prompts.csv", args={"--sources": "{file}"},
             file=("prompts.csv", b"prompt\na red square moving left\n")),
    BadInput("prompt text not UTF-8", "prompts", "curate", "prompts.txt", args={"--sources": "{file}"},
             file=("prompts.txt", b"a red \xff square moving left\n")),
    BadInput("unknown split value", "prompts", "curate", JSONL, args={"--sources": "{file}"},
             file=(JSONL, b'{"prompt": "a red square moving left", "split": "test"}\n')),
    BadInput("rollout prompts of another schema", "prompts", "rollout@1", "prompts.parquet",
             args={"--prompts": "{file}"}, file=("prompts.parquet", wrong_schema_parquet)),
    BadInput("iterations on an invalid params file", "cli", "iterations", "train.learning_rate",
             params={"train.learning_rate": -1e-4}),
    BadInput("reward server: unknown reward", "cli", "reward-server", "no_such", argv=("--reward", "no_such")),
    BadInput("reward server: open host without a token", "cli", "reward-server", "0.0.0.0",
             argv=("--reward", "brightness", "--host", "0.0.0.0")),
    BadInput("reward server: batch limit 0", "cli", "reward-server", "limits",
             argv=("--reward", "brightness", "--max-batch", "0")),
]
SMALL = [entry for entry in FULL if entry.name in (
    "negative learning rate", "NaN reward weight", "minibatches that do not divide the batch", "group_size 1",
    "pipeline.root with shell characters", "wan preset, model.path folder missing", "checkpoint of another LoRA rank",
    "malformed JSONL line")]

# The reward server, started with --max-request-mb 0.01 --max-batch 2: (name, method, path, body, status)
REQUESTS = [
    ("body not JSON", "POST", "/score", b"{not json", 400),
    ("body a JSON array", "POST", "/score", b"[1, 2]", 400),
    ("wrong reward name", "POST", "/score", {"reward": "hpsv3", "prompts": ["a"], "videos": None}, 404),
    ("oversized request", "POST", "/score", b"x" * 20000, 413),
    ("more videos than the batch limit", "POST", "/score", {"prompts": ["a", "b", "c"], "videos": None}, 413),
    ("prompts not strings", "POST", "/score", {"prompts": [1, 2], "videos": None}, 400),
    ("metadata not a list of objects", "POST", "/score", {"prompts": ["a"], "metadata": "x", "videos": None}, 400),
    ("videos not decodable", "POST", "/score", {"prompts": ["a"], "videos": "garbage"}, 400),
    ("unknown path", "GET", "/nope", None, 404),
]


def write_params(workspace: Workspace, folder: Path, entry: BadInput) -> str:
    """The case's params file (relative to the project)."""
    path = folder / "params.yaml"
    if entry.params_text is not None:
        path.write_text(entry.params_text)
    else:
        from ruamel.yaml import YAML

        yaml = YAML()
        data = yaml.load((workspace.project / "params.yaml").read_text())
        relative = str(folder.relative_to(workspace.project))
        for dotted, value in entry.params.items():
            *parents, leaf = dotted.split(".")
            node = data
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value.replace("{dir}", relative) if isinstance(value, str) else value
        with open(path, "w") as handle:
            yaml.dump(data, handle)
    return str(path.relative_to(workspace.project))


def run_entry(workspace: Workspace, entry: BadInput, folder: Path) -> Result:
    folder.mkdir(parents=True)
    replace = {}
    if entry.file is not None:
        name, content = entry.file
        target = folder / name
        if name.endswith("/"):
            target.mkdir()
        else:
            target.write_bytes(content() if callable(content) else content)
        replace = {flag: str(target.relative_to(workspace.project)) if value == "{file}" else value
                   for flag, value in entry.args.items()}
    else:
        replace = dict(entry.args)
    if entry.params is not None or entry.params_text is not None:
        replace["--params"] = write_params(workspace, folder, entry)
    if entry.run == "iterations":
        return run_command([sys.executable, "-m", "flash_grpo_core.pipeline.iterations", "3",
                            "--params", replace["--params"]], workspace.project, workspace.env(True), timeout=120)
    if entry.run == "reward-server":
        return run_command([sys.executable, "-m", "flash_grpo_core.rewards.server", "--port", "0",
                            *entry.argv], workspace.project, workspace.env(True), timeout=60)
    return workspace.run_stage(entry.run, replace)[0]


def run_bad_input(workspace: Workspace, entry: BadInput, number: int) -> dict:
    folder = workspace.project / "bad-inputs" / str(number)
    result = run_entry(workspace, entry, folder)
    line = result.first_error_line
    prefix = f"{entry.run.split('@')[0]}: error" if entry.run not in ("iterations", "reward-server") else ""
    clear = (result.code == 2 and entry.names in line and line.startswith(prefix)
             and "Traceback" not in result.stderr)
    return {"case": entry.name, "category": entry.category, "run": entry.run, "expected": "exit 2",
            "names": entry.names, "exit": result.code, "first_line": workspace.scrub(line)[:300],
            "last_line": workspace.scrub(result.last_error_line)[:300], "traceback": "Traceback" in result.stderr,
            "seconds": round(result.seconds, 1), "clear": clear}


def run_requests(workspace: Workspace) -> list[dict]:
    """Every bad request of REQUESTS against one reward server process."""
    server = subprocess.Popen([sys.executable, "-m", "flash_grpo_core.rewards.server", "--reward", "brightness",
                               "--port", "0", "--max-request-mb", "0.01", "--max-batch", "2"],
                              cwd=workspace.project, env=workspace.env(True), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        if "serving reward" not in line:
            return [{"case": f"reward server: {name}", "category": "reward server", "expected": f"HTTP {status}",
                     "got": f"server did not start: {line!r}", "clear": False} for name, _, _, _, status in REQUESTS]
        url = line.rsplit(" ", 1)[1].strip()
        return [_request(url, *request) for request in REQUESTS]
    finally:
        server.terminate()
        server.wait(timeout=30)


def _request(url: str, name: str, method: str, path: str, body, status: int) -> dict:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            got, text = answer.status, answer.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        got, text = error.code, error.read().decode(errors="replace")
    except OSError as error:
        got, text = None, str(error)
    return {"case": f"reward server: {name}", "category": "reward server", "run": f"{method} {path}",
            "expected": f"HTTP {status}", "names": "", "exit": got, "first_line": text[:300], "last_line": "",
            "traceback": False,
            "seconds": None, "clear": got == status}


def cleanup(workspace: Workspace) -> None:
    shutil.rmtree(workspace.project / "bad-inputs", ignore_errors=True)
