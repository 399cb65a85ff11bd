"""Preflight: what a run needs that can be checked before any GPU work, and the run's plan.

    python -m flash_grpo_core.pipeline.preflight [--preset NAME] [--params params.yaml]

Checks, for the preset's effective parameters (after the preset merge), with paths relative to the
folder of the params file (the checkout):
- the Wan model folder (model_index.json; transformer/, vae/, text_encoder/ with config and weights;
  tokenizer/ with its vocabulary), the reward models' and evaluation metrics' local paths (HPSv3's
  file and its Qwen2-VL base folder, any `path` or `*_path` option), the prompt source `data.source`
  (a file, or a folder with train.txt and test.txt);
- a reward server's /health when the `remote` reward is weighted (a short timeout);
- the processes asked for (FLASH_GRPO_NPROC_PER_NODE x FLASH_GRPO_NNODES, as stages/runtime/launch.py reads
  them) against the GPUs visible, and the estimated peak memory per GPU against the card's;
- free disk under pipeline.root against the run's checkpoints and shards (flash_grpo_core/pipeline/plan.py).

Each problem is one line; any problem exits 2. The plan (world size, batch per rank, optimizer
steps, model size, memory, time and disk estimates) is printed either way. No weights are loaded
and torch is not imported: GPUs are counted with torch only when the process has already imported
it, else with nvidia-smi.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from flash_grpo_core.pipeline import plan
from flash_grpo_core.config import ConfigError, load_params
from flash_grpo_core.pipeline.lock_outputs import verify_linked_outputs
from flash_grpo_core.models.layout import missing_parts

NPROC_ENV, NNODES_ENV = "FLASH_GRPO_NPROC_PER_NODE", "FLASH_GRPO_NNODES"  # stages/runtime/launch.py's
TOKEN_ENV = "FLASH_GRPO_REWARD_TOKEN"  # the reward client's bearer token (rewards/client.py)
SERVER_TIMEOUT = 5.0  # seconds for the reward server's /health


class PreflightError(ConfigError):
    """A run that cannot start: the message lists every problem, one a line."""


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)


def check_model_folder(params, project: Path) -> list[str]:
    """A wan preset's model.path: a complete Diffusers-format Wan 2.1 T2V folder, one line per part missing."""
    if not params.uses_wan_weights or not params.model.path:
        return []
    folder = project / params.model.path
    if not folder.is_dir():
        return [f"model.path {params.model.path}: no such folder (put Wan 2.1 T2V in Diffusers format there, "
                f"or set presets.{params.preset}.model.path)"]
    return [f"model.path {params.model.path}: missing {part}" for part in missing_parts(folder)]


def _path_options(options: dict) -> dict[str, str]:
    return {key: value for key, value in options.items()
            if (key == "path" or key.endswith("_path")) and isinstance(value, str)}


def check_model_paths(params, project: Path) -> list[str]:
    """Every weighted reward's and evaluation metric's local path; HPSv3's file and its base folder."""
    problems = []
    sections = [("reward.options", name, params.reward.options.get(name) or {}) for name in params.reward.weights]
    sections += [("eval.metrics", name, options or {}) for name, options in params.eval.metrics.items()]
    for where, name, options in sections:
        for key, value in _path_options(options).items():
            path = project / Path(value).expanduser()
            if name == "hpsv3" and key == "path" and path.is_dir():
                path = path / "HPSv3.safetensors"
            if name == "hpsv3" and key == "base_path" and path.is_dir():
                path = path / "config.json"  # the Qwen2-VL base model's
            if not path.exists():
                problems.append(f"{where}.{name}.{key}: {_shown(path, project)} does not exist")
    return problems


def _shown(path: Path, project: Path) -> str:
    """A path as the params file names it: relative to the checkout when inside it."""
    try:
        return str(path.relative_to(project))
    except ValueError:
        return str(path)


def check_prompts(params, project: Path) -> list[str]:
    """The effective prompt source (the selected preset's `data.source`, else the base one): readable,
    not the toy grid for a preset that trains Wan 2.1, and enough prompts once curated; the validate
    stage's own checks (`inputs.check_source`, `check_curation`), with paths relative to the checkout."""
    from flash_grpo_core.artifacts.prompt_sources import PromptFileError
    from flash_grpo_core.pipeline.inputs import check_curation, check_source

    try:
        with contextlib.chdir(project):
            check_source(params)
            check_curation(params)
    except (ConfigError, PromptFileError) as error:
        return [str(error)]
    return []


def check_reward_server(params, timeout: float = SERVER_TIMEOUT) -> list[str]:
    """The `remote` reward's server answers GET /health (rewards/server.py) within `timeout` seconds."""
    if "remote" not in params.reward.weights:
        return []
    options = params.reward.options.get("remote") or {}
    url = str(options.get("url", "")).rstrip("/")
    token = options.get("token") or os.environ.get(TOKEN_ENV)
    request = urllib.request.Request(url + "/health", headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return []
    except urllib.error.HTTPError as error:
        hint = f" (a token: reward.options.remote.token or {TOKEN_ENV})" if error.code in (401, 403) else ""
        return [f"reward server {url}: GET /health answered HTTP {error.code}{hint}"]
    except (urllib.error.URLError, OSError, ValueError) as error:
        return [f"reward server {url}: unreachable within {timeout:g} s ({getattr(error, 'reason', error)})"]


def world_size() -> tuple[int, int, list[str]]:
    """(processes per node, nodes) as the launcher reads them, with a problem line for a bad value."""
    values, problems = [], []
    for name in (NPROC_ENV, NNODES_ENV):
        raw = os.environ.get(name, "1").strip() or "1"
        value = int(raw) if raw.isdigit() else 0
        if value < 1:
            problems.append(f"{name}={raw!r}: expected a whole number of at least 1")
        values.append(max(value, 1))
    return values[0], values[1], problems


def visible_gpus() -> tuple[int, float | None]:
    """(GPUs this process sees, the smallest card's memory in bytes or None): torch's count when the
    process has imported torch already, else nvidia-smi's cards limited by CUDA_VISIBLE_DEVICES."""
    torch = sys.modules.get("torch")
    if torch is not None:
        count = torch.cuda.device_count()
        return count, min((torch.cuda.get_device_properties(i).total_memory for i in range(count)), default=None)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0, None
    try:
        listed = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=20, check=True).stdout.split()
        sizes = [float(mib) * 2**20 for mib in listed]
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0, None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [entry.strip() for entry in visible.split(",")]
        count = next((i for i, entry in enumerate(entries) if entry in ("", "-1")), len(entries))
        sizes = sizes[:count]
    return len(sizes), min(sizes, default=None)


def check_devices(params, nproc: int, gpus: int) -> tuple[str, list[str]]:
    """The device the stages resolve (model.device; auto: cuda when a GPU is visible) and its problems."""
    device = params.model.device
    on_gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
    if not on_gpu:
        if params.uses_wan_weights:
            return "cpu", [f"preset {params.preset} runs Wan 2.1 on GPUs, but the device resolves to cpu "
                           f"(model.device {device}, {gpus} GPU(s) visible)"]
        return "cpu", []
    if nproc > gpus:
        return "cuda", [f"{NPROC_ENV}={nproc} processes per node, but {gpus} GPU(s) visible"]
    return "cuda", []


def check_memory(peak: float, card: float | None) -> list[str]:
    if card is None or peak <= card:
        return []
    return [f"estimated peak memory {peak / plan.GIB:.1f} GiB per GPU exceeds the card's {card / plan.GIB:.1f} GiB: "
            f"lower rollout.batch_size or train.micro_batch, or set model.cfg_sequential / offload_frozen"]


def free_disk(project: Path, root: str) -> tuple[Path, int]:
    """Free bytes on the file system that will hold pipeline.root (its nearest existing folder)."""
    folder = project / root
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder, shutil.disk_usage(folder).free


def iterations_to_run(params, project: Path) -> int:
    """The run's iterations whose checkpoint is not in the workspace yet (a resumed run needs less)."""
    runs = project / params.pipeline.root / params.preset
    return sum(not (runs / f"it{k}" / "checkpoint").is_dir() for k in range(1, params.iterations + 1))


def check_disk(params, sizes: dict[str, float], free: int) -> list[str]:
    if free >= sizes["planned"]:
        return []
    planned, iteration = sizes["planned"] / plan.GB, sizes["iteration"] / plan.GB
    return [f"free disk {free / plan.GB:.1f} GB under {params.pipeline.root} is less than the "
            f"{planned:.1f} GB of the {sizes['iterations']} iteration(s) to run ({iteration:.1f} GB each: checkpoint "
            f"and rollout shards, with DVC's cache copy); free space or plan fewer iterations"]


def batch_lines(params, nproc: int, nnodes: int, device: str, gpus: int) -> list[str]:
    """World size, the iteration's prompts, groups and videos, and how they are dealt and trained."""
    r, train, world = params.rollout, params.train, nproc * nnodes
    videos, groups_per_rank = r.prompts_per_iteration * r.group_size, -(-r.prompts_per_iteration // world)
    return [f"world: {world} process(es) ({NPROC_ENV}={nproc} x {NNODES_ENV}={nnodes}) on {device}, "
            f"{gpus} GPU(s) visible",
            f"batch: {r.prompts_per_iteration} prompts x {r.group_size} = {videos} videos an iteration, dealt as "
            f"whole groups: at most {groups_per_rank} groups = {groups_per_rank * r.group_size} videos per rank",
            f"update: {train.minibatches} optimizer step(s) of {videos // train.minibatches} videos; mode "
            f"{train.mode}, rectify {train.rectify}, {plan.trained_steps(params)} trained step(s) per video, "
            f"micro_batch {train.micro_batch}"]


def model_lines(params, arch: plan.Arch, source: str) -> list[str]:
    """The transformer's size, what the update trains, and the tokens of one video."""
    m, r = params.model, params.rollout
    trained = plan.trained_parameters(params, arch)
    kind = f"LoRA r{m.lora_rank}/alpha {m.lora_alpha} on {', '.join(m.lora_targets)}" if m.finetune == "lora" else \
        "full fine-tuning"
    lines = [f"model: {arch.parameters() / 1e9:.3f} B parameters ({arch.heads} heads x {arch.head_dim}, ffn "
             f"{arch.ffn}, {arch.layers} layers; {source}); {kind}: {trained / 1e6:.1f} M trained",
             f"tokens: {r.height}x{r.width}x{r.frames} -> latents {'x'.join(map(str, plan.latent_shape(r)))} -> "
             f"{plan.tokens(arch, r):,} tokens a video"]
    unknown = plan.lora_parameters(arch, m.lora_rank, m.lora_targets)[1] if m.finetune == "lora" else []
    if unknown:
        lines.append(f"note: LoRA targets {', '.join(unknown)} not counted (no known shape)")
    return lines


def estimate_lines(params, arch: plan.Arch, world: int, card: float | None, project: Path) -> list[str]:
    """Peak memory per GPU and time per iteration, labelled as the estimates they are."""
    memory = plan.memory_bytes(params, arch, world)
    lines = [f"memory per GPU (estimate): rollout {memory['rollout'] / plan.GIB:.1f} GiB, update "
             f"{memory['update'] / plan.GIB:.1f} GiB, peak {memory['peak'] / plan.GIB:.1f} GiB; card: "
             + (f"{card / plan.GIB:.1f} GiB" if card else "none visible")]
    seconds = plan.iteration_seconds(params, arch, world, project)
    if seconds is None:
        lines.append("time per iteration: no measured step cost for this architecture")
    else:
        rollout, update, source = seconds
        lines.append(f"time per iteration (estimate from {source}, scaled by tokens; decode, rewards and I/O "
                     f"not counted): rollout {rollout / 60:.1f} min + update {update / 60:.1f} min on {world} GPU(s)")
    return lines


def disk_line(params, sizes: dict[str, float], folder: str, free: int) -> str:
    return (f"disk: checkpoint {sizes['checkpoint'] / plan.GB:.2f} GB + shards {sizes['shards'] / plan.GB:.1f} GB an "
            f"iteration ({sizes['iteration'] / plan.GB:.1f} GB with DVC's cache copy); {sizes['iterations']} "
            f"iteration(s) to run: {sizes['planned'] / plan.GB:.1f} GB; free: {free / plan.GB:.1f} GB at {folder}")


def preflight(params, project: Path) -> Report:
    """Every check and the plan for `params` in the checkout `project`."""
    report = Report()
    for check in (check_model_folder, check_model_paths):
        report.problems += check(params, project)
    report.problems += check_prompts(params, project) + check_reward_server(params)
    report.problems += verify_linked_outputs(project) if (project / "dvc.lock").is_file() else []
    nproc, nnodes, problems = world_size()
    gpus, card = visible_gpus()
    device, device_problems = check_devices(params, nproc, gpus)
    report.problems += problems + device_problems
    report.plan += batch_lines(params, nproc, nnodes, device, gpus)
    arch, source = plan.model_arch(params, project)
    if arch is None:
        report.plan.append(f"model: {source}; no memory, time or disk estimates")
        return report
    world = nproc * nnodes
    report.plan += model_lines(params, arch, source) + estimate_lines(params, arch, world, card, project)
    if device == "cuda":
        report.problems += check_memory(plan.memory_bytes(params, arch, world)["peak"], card)
    sizes = plan.disk_bytes(params, arch, iterations_to_run(params, project))
    folder, free = free_disk(project, params.pipeline.root)
    report.plan.append(disk_line(params, sizes, _shown(folder, project), free))
    report.problems += check_disk(params, sizes, free)
    return report


def require(params, project: Path) -> Report:
    """The preflight, raising PreflightError with every problem (one a line) if there is any."""
    report = preflight(params, project)
    if report.problems:
        raise PreflightError(f"preflight of preset {params.preset}: {len(report.problems)} problem(s):\n"
                             + "\n".join(report.problems))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flash_grpo_core.pipeline.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="the preset to check (default: params.yaml's `preset`)")
    parser.add_argument("--params", default="params.yaml", help="the params file; paths are relative to its folder")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, preset=args.preset)
        report = preflight(params, Path(args.params).resolve().parent)
    except ConfigError as error:
        print(f"preflight: {error}", file=sys.stderr)
        return 2
    print(f"preflight of preset {params.preset} ({args.params}):")
    for line in report.plan:
        print(f"  {line}")
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"preflight: {len(report.problems)} problem(s)" if report.problems else "preflight: ready",
          file=sys.stderr if report.problems else sys.stdout)
    return 2 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
