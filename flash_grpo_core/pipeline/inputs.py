"""Checks of a run's inputs before any stage starts, so a bad edit of `params.yaml` fails in a second
and loses nothing (DVC removes a stage's outputs before it runs the stage's command: a stage that
found the error itself would already have deleted its previous outputs).

`check_inputs` is what the pipeline's `validate` stage (stages/validate.py), the first in dvc.yaml, and
the train-loop flow call. It checks, without loading any weights:
1. the whole params file (`config.load_params`): unknown keys, types, ranges, combinations; the
   rewards against the reward registry (names, required options, options their constructors take);
2. the effective `data.source` (after the selected preset's overrides): a readable prompt file or
   train.txt / test.txt folder, and not a task's own prompts (the toy grid) for a preset that trains Wan 2.1;
3. for such a preset, the layout of the `model.path` folder (models/layout.py);
4. with the curate stage's report of the same source and data settings, that `eval.num_prompts`
   does not exceed the eval prompts it curated;
5. with `cache.type` hardlink/symlink opted into, that no output linked into the DVC cache was
   edited in place (`lock_outputs.verify_linked_outputs`: only links are hashed).
It also warns of the base keys that the selected preset overrides (an edit there would not take
effect), and returns the effective source's files with their sha256: the curate stage
depends on that record, so editing the prompts reruns curate and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from flash_grpo_core.artifacts.prompt_sources import read_prompt_file, source_digests
from flash_grpo_core.config import ConfigError, Params, load_params, read_yaml
from flash_grpo_core.config.loading import REPLACED_WHOLE  # mappings a preset replaces whole: compared as one value
from flash_grpo_core.pipeline.lock_outputs import require_intact_links
from flash_grpo_core.models.layout import check_model_folder

_SOURCE_HINT = ("a folder with train.txt (and test.txt for the eval split), one prompt a line, e.g. the authors' "
                "dataset/video (README, \"First real run\")")


@dataclass(frozen=True)
class CheckedInputs:
    params: Params
    warnings: list[str]  # one line each: what the user may want to know, nothing that stops the run
    sources: dict  # {"source": data.source, "files": {file: sha256}}


def check_inputs(params_path: str | Path = "params.yaml", prompts_report: str | Path | None = None) -> CheckedInputs:
    """Check everything a run reads before its first stage (see the module docstring); raises
    ConfigError, PromptFileError or ModelPathError with a one-line message. Paths in the params are
    relative to the working directory, as in the stages."""
    params, raw = load_params(params_path), read_yaml(params_path)
    check_dvc_params(raw)
    sources = {"source": params.data.source, "files": check_source(params)}
    if params.uses_wan_weights:
        check_model_folder(Path(params.model.path).expanduser().absolute())
    if prompts_report is not None:  # the curated counts, semantic filter included, when still current
        check_eval_prompts(params, sources["files"], Path(prompts_report))
    check_curation(params)
    check_rewards(params)
    require_intact_links(Path("."))  # with cache.type hardlink/symlink: an output edited in place
    return CheckedInputs(params, shadowed_keys(raw, params.preset), sources)


def check_dvc_params(raw: dict, dvc_file: Path = Path("dvc.yaml")) -> None:
    """Every params entry of dvc.yaml's stages is in the params file. A key the dataclasses do not
    need (they have defaults) but a stage lists would stop DVC with 'Parameters ... are missing'
    only once it reaches that stage, after it has removed the stage's outputs."""
    if not dvc_file.is_file():
        return
    for name, stage in (read_yaml(dvc_file).get("stages") or {}).items():
        for entry in stage.get("do", stage).get("params") or []:
            if not isinstance(entry, str):
                continue  # a params file of its own
            key, node = entry.replace("${preset}", str(raw.get("preset"))), raw
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(f"{key} is missing from the params file, and dvc.yaml's {name} stage reads it: "
                                      f"set it (the repository's params.yaml has every key)")
                node = node[part]


def check_curation(params: Params) -> None:
    """The effective source, curated with the data section's exact filters (the semantic one left
    out: it needs a model, and only removes more), leaves a train prompt and `eval.num_prompts`
    eval prompts: the curate stage's own check (`curated_counts`), before DVC removes its outputs."""
    from flash_grpo_core.artifacts.prompt_sources import read_prompt_sources
    from flash_grpo_core.artifacts.prompts import curate

    exact = dataclasses.replace(params.data, semantic_threshold=None)
    curated_counts(curate(read_prompt_sources([params.data.source]), exact), [params.data.source],
                   params.eval.num_prompts)


def curated_counts(result, sources: list[str], eval_prompts: int | None) -> None:
    """Enough prompts for what the pipeline will ask of them, or a ConfigError: at least one train
    prompt, and (given) as many eval prompts as `eval.num_prompts`."""
    counts = result.report["counts"]
    where = f"{', '.join(sources)}: {counts['in']} prompts in, dropped {json.dumps(counts['dropped'])}"
    if not result.train:
        raise ConfigError(f"no train prompts left ({where}, {counts['eval']} eval); add prompts or loosen the "
                          f"data section's filters")
    if eval_prompts is not None and len(result.eval) < eval_prompts:
        raise ConfigError(f"{len(result.eval)} eval prompts ({where}), but eval.num_prompts is {eval_prompts}: "
                          f"lower it, raise data.min_eval / data.eval_fraction, or add prompts")


def declared_rewards() -> dict[str, tuple[tuple[str, ...], str]]:
    """{name: (required options, hint)} of every reward, read without importing one (rewards import
    torch): the `@register(...)` declarations in the rewards package's source, and the rewards that
    the registered tasks declare (their required options are checked when they are built)."""
    import ast
    import importlib.util

    from flash_grpo_core.config.choices import MODEL_PATH_HINT
    from flash_grpo_core.config.tasks import all_tasks

    known = {name: ((), "") for task in all_tasks() for name in task.rewards}
    for path in sorted(Path(importlib.util.find_spec("flash_grpo_core.rewards").origin).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register" and node.args:
                options = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
                known[ast.literal_eval(node.args[0])] = (tuple(options.get("required", ())),
                                                         options.get("hint", MODEL_PATH_HINT))
    return known


def check_rewards(params: Params) -> None:
    """The configured rewards are declared, with their required options, and build with their
    options (unknown options, a missing weights path) without loading any model. Building imports
    torch: done only when some reward has options."""
    params.reward.check_known(declared_rewards())
    if not any(params.reward.options.values()):
        return
    from flash_grpo_core.engine.iteration import reward_from_params

    try:
        reward_from_params(params)
    except TypeError as error:  # an option the reward's constructor does not take
        raise ConfigError(f"reward.options: {error}") from error


def check_source(params: Params) -> dict[str, str]:
    """The effective data.source's {file: sha256}, after checking that it can be read (every prompt
    parsed) and that a Wan preset is not pointed at the toy grid or at nothing."""
    source, preset = params.data.source, params.preset
    where = f"data.source (or presets.{preset}.data.source)"
    if not Path(source).exists():
        raise ConfigError(f"data.source {source!r} does not exist: set {where} to {_SOURCE_HINT}, or to a "
                          f".txt / .jsonl / .parquet prompt file")
    if params.uses_wan_weights:
        from flash_grpo_core.config.tasks import all_tasks

        for task in all_tasks():
            if task.prompt_source and Path(source).resolve() == Path(task.prompt_source).resolve():
                raise ConfigError(f"data.source is {source!r}, the {task.name} task's prompts, but preset {preset} "
                                  f"trains Wan 2.1: set {where} to {_SOURCE_HINT}")
    read_prompt_file(source)  # a PromptFileError names the file and line
    return source_digests(source)


def check_eval_prompts(params: Params, files: dict[str, str], report: Path) -> None:
    """eval.num_prompts against the eval prompts of the curate stage's `report` when that report
    was curated from the same files with the same data settings (otherwise curate reruns and checks)."""
    if not report.is_file():
        return
    try:
        recorded = json.loads(report.read_text(encoding="utf-8"))
        same = (recorded.get("params") == dataclasses.asdict(params.data)
                and recorded.get("source_digests") == files)
        curated = int(recorded["counts"]["eval"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # unreadable or older: curate reruns or its own check speaks
    if same and curated < params.eval.num_prompts:
        raise ConfigError(f"eval.num_prompts is {params.eval.num_prompts}, but {report} holds {curated} eval prompts "
                          f"(from {params.data.source}): lower it, raise data.min_eval / data.eval_fraction, or "
                          f"add prompts")


def shadowed_keys(raw: dict, preset: str) -> list[str]:
    """A warning (one line) naming each key that the base sections set and the selected preset sets
    to another value, with both places: the base value is not used, so editing it changes nothing."""
    overrides = ((raw.get("presets") or {}).get(preset) or {}) if isinstance(raw.get("presets"), dict) else {}
    shadowed = [f"{key} ({base!r} in the base section, {value!r} in presets.{preset}.{key})"
                for key, base, value in _differing(raw, overrides, "")]
    if not shadowed:
        return []
    return [f"preset {preset} overrides {len(shadowed)} base key(s), whose base values are not used: "
            f"{'; '.join(shadowed)}"]


def _differing(base, overrides, prefix: str):
    """(dotted key, base value, override value) for each override leaf the base sets differently."""
    if not isinstance(base, dict) or not isinstance(overrides, dict):
        return
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            continue
        if isinstance(value, dict) and isinstance(base[key], dict) and key not in REPLACED_WHOLE:
            yield from _differing(base[key], value, f"{dotted}.")
        elif base[key] != value:
            yield dotted, base[key], value

