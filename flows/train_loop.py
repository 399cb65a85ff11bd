"""Prefect flow `train-loop` (SPEC section 7): curate, init, then rollout -> score -> update for each
iteration (each evaluated checkpoint right after its update), then evaluate, each stage run as
`dvc repro <stage>` in the project checkout.

DVC stays the source of truth for artifacts and caching: a finished stage is skipped (or restored
from DVC's run cache), never recomputed, so a retried or repeated run resumes at the first
unfinished stage. Prefect adds parameters, retries, concurrency limits and run history; tasks return
small metadata (stage outcome, timings, output hashes, metrics) and Prefect caches nothing.

Each step is a plain `dvc repro <stage>`, not `--single-item`: DVC re-checks the upstream stages
(about a second, since they are up to date by then) and would rerun one that went stale between
steps, so a step never trains on outdated inputs.

The flow runs in its working directory, the project checkout (prefect.yaml's pull step sets it
from `FLASH_GRPO_PROJECT`); see docs/prefect.md. Only prefect and light modules are imported at
the top, so a worker starts a run quickly; the stages import torch in their own processes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from flows import dvc_runner, params_file

# The model presets of the training loop (params.yaml's `toy` preset belongs to bench/alignment,
# whose base model comes from the `pretrain` stage, which this flow does not run).
Preset = Literal["tiny", "wan1_3b", "wan1_3b_flowgrpo", "wan14b"]
STAGE_RETRIES = 2
STAGE_RETRY_DELAYS = [10, 60]  # seconds: a busy file system or reward server gets a moment
LOGGED_METRICS = ("reward_mean", "reward_std", "loss", "clip_fraction", "approx_kl",
                  "train_forward_passes", "train_backward_passes", "rollout_seconds", "train_seconds")


def stage_names(iterations: int, eval_at: list[int] | tuple[int, ...] = (),
                dvc_file: str | Path = "dvc.yaml") -> list[str]:
    """The DVC stages of a run, in the order the flow reproduces them: dvc.yaml's order
    (`flash_grpo_core.pipeline.stage_order`), its `foreach` stages expanded iteration by iteration. The stages before
    the first `foreach` stage come first; then, for each iteration 0..`iterations`, the `foreach`
    stages that run for it (over pipeline.loop: iterations 1..N; over pipeline.eval_at: `eval_at`,
    the evaluated checkpoints, each evaluated as soon as it exists), in dvc.yaml's order; then the
    other stages."""
    from flash_grpo_core.pipeline.stage_order import foreach_items, stage_order

    order, foreach = stage_order(dvc_file), foreach_items(dvc_file)
    runs_for = {"${pipeline.loop}": range(1, iterations + 1), "${pipeline.eval_at}": tuple(eval_at)}
    unknown = {name: items for name, items in foreach.items() if items not in runs_for}
    if unknown:
        raise ValueError(f"{dvc_file}: the flow cannot expand foreach {unknown}: only pipeline.loop and eval_at")
    looped = [name for name in order if name in foreach]
    first = order.index(looped[0]) if looped else len(order)
    loop = [f"{name}@{it}" for it in range(iterations + 1) for name in looped if it in runs_for[foreach[name]]]
    return [*order[:first], *loop, *(name for name in order[first:] if name not in foreach)]


def is_transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry transient stage failures only, never a deterministic one."""
    try:
        state.result()
    except dvc_runner.TransientStageError:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is not worth repeating
        return False
    return False


def check_project(project: Path) -> None:
    missing = [name for name in ("dvc.yaml", "params.yaml", ".dvc") if not (project / name).exists()]
    if missing:
        raise FileNotFoundError(f"train-loop must run in the Flash-GRPO checkout, but {project} has no "
                                f"{', '.join(missing)}; start the worker with FLASH_GRPO_PROJECT=<checkout> "
                                f"(docs/prefect.md)")


@task(name="prepare-params", cache_policy=NO_CACHE, persist_result=False)
def prepare_params(project: str, preset: str, iterations: int | None, overrides: dict[str, Any] | None) -> dict:
    """Validate the run's parameters, run the preflight (flash_grpo_core/pipeline/preflight.py: paths, GPUs,
    memory, disk; every problem fails the run, none is retried), write them into params.yaml."""
    from flash_grpo_core.pipeline import preflight
    from flash_grpo_core.pipeline.prune import pruned_iterations
    from flash_grpo_core.pipeline.tracking import run_spec

    path = Path(project) / "params.yaml"
    preflight.require(params_file.validate(path, preset, iterations, overrides), Path(project))
    params = params_file.write(path, preset, iterations, overrides)
    get_run_logger().info(f"params.yaml: preset={preset} iterations={params.iterations} "
                          f"overrides={overrides or {}} mode={params.train.mode} device={params.model.device}")
    return {"preset": preset, "iterations": params.iterations, "root": params.pipeline.root,
            "eval_at": list(params.pipeline.eval_at), "keep_every": params.pipeline.keep_checkpoints_every,
            "pruned": bool(pruned_iterations(Path(project), params)), "tracking": str(run_spec(params).log_dir)}


@task(name="dvc-repro", task_run_name="{stage}", retries=STAGE_RETRIES, retry_delay_seconds=STAGE_RETRY_DELAYS,
      retry_condition_fn=is_transient, cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, project: str, allow_missing: bool = False) -> dict:
    """`dvc repro <stage>`, its output in the run's logs; returns what DVC did and the outputs' hashes.
    `allow_missing` once checkpoints were pruned: DVC skips their stages instead of rebuilding the chain."""
    logger = get_run_logger()

    def relay(line: str) -> None:
        if dvc_runner.worth_logging(line):
            logger.info(line)

    result = dvc_runner.repro(stage, Path(project), relay, allow_missing=allow_missing)
    outcome = ("ran" if stage in result.ran else
               "restored from the run cache" if stage in result.restored else "up to date, skipped")
    logger.info(f"{stage}: {outcome} ({result.seconds:.1f} s)")
    return {"stage": stage, "outcome": outcome, "ran": list(result.ran), "seconds": result.seconds,
            "outs": locked_outs(Path(project), stage)}


@task(name="prune", cache_policy=NO_CACHE, persist_result=False)
def prune_checkpoints(project: str) -> bool:
    """Remove the checkpoints pipeline.keep_checkpoints_every gives up (flash_grpo_core/pipeline/prune.py);
    returns whether any checkpoint of the run is pruned now."""
    from flash_grpo_core.config import load_params
    from flash_grpo_core.pipeline import prune

    params = load_params(Path(project) / "params.yaml")
    result = prune.prune(Path(project), params)
    if result.pruned:
        get_run_logger().info(f"pruned the checkpoints of {', '.join(f'it{k}' for k in result.pruned)} "
                              f"({len(result.objects)} cache objects, {result.bytes / 1e9:.2f} GB)")
    return bool(prune.pruned_iterations(Path(project), params))


def locked_outs(project: Path, stage: str) -> dict[str, str]:
    """The stage's outputs and their hashes as DVC recorded them in dvc.lock."""
    from flash_grpo_core.config import read_yaml

    lock = project / "dvc.lock"
    entry = (read_yaml(lock).get("stages") or {}).get(stage, {}) if lock.is_file() else {}
    return {out["path"]: out.get("md5", "") for out in entry.get("outs", [])}


def read_metrics(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def log_iteration(logger, run: dict, iteration: int, stages: list[dict]) -> dict:
    """Log one iteration's reward, loss and timings; returns them as a row of the run's table."""
    folder = Path(run["root"]) / run["preset"] / f"it{iteration}"
    metrics = read_metrics(folder / "metrics.json")
    # wall times live outside the hashed outputs (dvc.yaml's --timings files)
    metrics["rollout_seconds"] = read_metrics(folder / "rollout.timings.json").get("sample_seconds")
    metrics["train_seconds"] = read_metrics(folder / "update.timings.json").get("train_seconds")
    row = {"iteration": iteration, **{key: metrics[key] for key in LOGGED_METRICS if metrics.get(key) is not None}}
    row["stage_seconds"] = round(sum(s["seconds"] for s in stages if s["stage"].endswith(f"@{iteration}")), 2)
    logger.info(f"iteration {iteration}/{run['iterations']}: "
                + " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                           for key, value in row.items() if key != "iteration"))
    return row


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) naming `parts`, e.g. a preset."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower())


def link_tracker(run: dict, shown: dict[str, str]) -> dict[str, str]:
    """Put where the tracker shows the run (its links.json, written by the first stage that logs) on
    the flow run's page as a markdown artifact, when it appears or changes; returns what is shown."""
    from flash_grpo_core.pipeline.tracking import read_links

    links = read_links(Path(run["tracking"]))
    if links and links != shown:
        from prefect.artifacts import create_markdown_artifact

        lines = [f"- **{name}**: {link if '://' in link else f'`{link}`'}" for name, link in sorted(links.items())]
        create_markdown_artifact("\n".join([f"Live tracking of the {run['preset']} run:", "", *lines]),
                                 key=artifact_key("tracking", run["preset"]),
                                 description=f"Where the {run['preset']} run's curves and samples are")
        get_run_logger().info("tracking: " + "; ".join(f"{name}: {link}" for name, link in sorted(links.items())))
    return links or shown


def report(run: dict, rows: list[dict], stages: list[dict]) -> dict:
    """The run's summary: logged, attached to the run as a table artifact, returned."""
    from prefect.artifacts import create_table_artifact

    evaluation = read_metrics(Path(run["root"]) / run["preset"] / "eval" / "metrics.json")
    ran = [s["stage"] for s in stages if s["outcome"] == "ran"]
    get_run_logger().info(f"train-loop {run['preset']}: {len(ran)} of {len(stages)} stages ran "
                          f"({', '.join(ran) or 'none: everything was up to date'}); evaluation: "
                          f"{json.dumps(evaluation.get('delta', evaluation), sort_keys=True)}")
    if rows:
        create_table_artifact(rows, key=artifact_key("train-loop", run["preset"]),
                              description=f"Per-iteration metrics of the {run['preset']} preset")
    return {**run, "stages": stages, "metrics": rows, "evaluation": evaluation}


@flow(name="train-loop", validate_parameters=True)
def train_loop(preset: Preset = "tiny",
               iterations: Annotated[int, Field(ge=1)] | None = None,
               overrides: dict[str, Any] | None = None) -> dict:
    """Run the Flash-GRPO pipeline for one model preset through DVC.

    Args:
        preset: the model preset (`tiny` runs on a CPU; `wan1_3b`, `wan1_3b_flowgrpo` (the Flow-GRPO
            baseline) and `wan14b` load local Wan 2.1 weights).
        iterations: training iterations (None: keep params.yaml's `iterations`).
        overrides: dotted params.yaml keys to set for this run, e.g. {"train.learning_rate": 3e-5};
            validated before any stage starts, then written into params.yaml.
    """
    project = Path.cwd()
    check_project(project)
    logger = get_run_logger()
    with params_file.workspace_lock(project):
        run = prepare_params(str(project), preset, iterations, overrides)
        run["root"] = str(project / run["root"])
        run["tracking"] = str(project / run["tracking"])
        shown: dict[str, str] = {}
        stages: list[dict] = []
        rows: list[dict] = []
        pruned = run.pop("pruned")
        for stage in stage_names(run["iterations"], run["eval_at"], project / "dvc.yaml"):
            stages.append(run_stage(stage, str(project), allow_missing=pruned))
            shown = link_tracker(run, shown)
            if stage.startswith("update@"):
                rows.append(log_iteration(logger, run, int(stage.split("@")[1]), stages))
            if run["keep_every"] and stage.startswith(("update@", "eval_checkpoint@")):
                pruned = prune_checkpoints(str(project)) or pruned
        return report(run, rows, stages)
