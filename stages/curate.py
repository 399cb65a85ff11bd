"""`curate` stage (SPEC section 7, stage 1): prompt sources -> train.parquet, eval.parquet, report.json.

    python -m stages.curate --params params.yaml --out-dir runs/prompts [--sources prompts/example.txt ...]

Settings are the effective `data` section of the params file (after the selected preset's
overrides: the fields of `flash_grpo_core.artifacts.prompts.CurateConfig`); without --params,
CurateConfig's defaults apply. Without --sources it reads the effective `data.source` (a file, or a
train.txt / test.txt folder), after the checks of the validate stage (`inputs.check_source`: a
Wan preset refuses the toy grid). The report records each source file's sha256. The work is in
`flash_grpo_core/artifacts/prompts.py` (sources: `prompt_sources.py`); this module reads arguments, calls it
through `stages.runtime.common.run` (errors, summary line, watchdog) and checks the counts before anything
is written.
"""

from __future__ import annotations

import argparse
import json
import sys

from stages.runtime import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.curate", description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", default=None,
                        help="prompt files (.txt, .jsonl, .parquet) or train.txt / test.txt folders; default: the "
                             "params' effective data.source")
    parser.add_argument("--out-dir", required=True, help="where train.parquet, eval.parquet and report.json go")
    parser.add_argument("--params", default=None,
                        help="params.yaml; its effective `data` section (the preset's overrides applied) configures "
                             "curation")
    return parser.parse_args(argv)


def load_config(params_path: str | None):
    """CurateConfig from the params file's effective `data` section, or the defaults."""
    from flash_grpo_core.artifacts.prompts import CurateConfig
    from flash_grpo_core.config import load_params

    if params_path is None:
        return CurateConfig()
    return load_params(params_path).data


def source_paths(args) -> list[str]:
    """--sources, or the params' effective data.source after the validate stage's checks of it."""
    from flash_grpo_core.config import ConfigError, load_params
    from flash_grpo_core.pipeline.inputs import check_source

    if args.sources:
        return args.sources
    if args.params is None:
        raise ConfigError("give --sources, or --params whose data.source names the prompts")
    params = load_params(args.params)
    check_source(params)
    return [params.data.source]


def check_counts(result, sources: list[str], params_path: str | None) -> None:
    """Enough prompts for the run (`inputs.curated_counts`), before anything is written."""
    from flash_grpo_core.config import load_params
    from flash_grpo_core.pipeline.inputs import curated_counts

    curated_counts(result, sources, load_params(params_path).eval.num_prompts if params_path else None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return common.run("curate", work, args)


def work(args) -> dict:
    """Curate the prompt sources into train.parquet, eval.parquet and report.json."""
    from flash_grpo_core.artifacts.prompt_sources import read_prompt_sources, source_digests
    from flash_grpo_core.artifacts.prompts import SEMANTIC_UNAVAILABLE, curate, write_curation

    config, sources = load_config(args.params), source_paths(args)
    digests = {file: digest for source in sources for file, digest in source_digests(source).items()}
    result = curate(read_prompt_sources(sources), config)
    result.report["source_digests"] = digests  # what the validate stage compares eval.num_prompts against
    check_counts(result, sources, args.params)  # before anything is written
    write_curation(result, args.out_dir)
    if result.report["semantic_dedupe"] == SEMANTIC_UNAVAILABLE:
        print(f"curate: warning: semantic dedupe {SEMANTIC_UNAVAILABLE}", file=sys.stderr)
    counts = result.report["counts"]
    return {"sources": len(sources), "prompts_in": counts["in"], "train": counts["train"],
            "eval": counts["eval"], "dropped": json.dumps(counts["dropped"], separators=(",", ":"))}


if __name__ == "__main__":
    common.finish(main())
