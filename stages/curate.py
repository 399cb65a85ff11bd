"""`curate` stage (SPEC section 7, stage 1): prompt sources -> train.parquet, eval.parquet, report.json.

    python -m stages.curate --sources prompts/example.txt [more ...] --out-dir data/prompts --params params.yaml

Settings are the `data` section of the params file (the fields of `flash_grpo_core.artifacts.prompts.CurateConfig`);
without that section, or without --params, CurateConfig's defaults apply. The work is in
`flash_grpo_core/artifacts/prompts.py` (sources: `prompt_sources.py`); this module reads arguments, calls it
through `_common.run` (errors, summary line, watchdog) and checks the counts before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys

from stages import _common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.curate", description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", required=True, help="prompt files: .txt, .jsonl or .parquet")
    parser.add_argument("--out-dir", required=True, help="where train.parquet, eval.parquet and report.json go")
    parser.add_argument("--params", default=None, help="params.yaml; its `data` section configures curation")
    return parser.parse_args(argv)


def load_config(params_path: str | None):
    """CurateConfig from the params file's `data` section, or the defaults."""
    from flash_grpo_core.artifacts.prompts import CurateConfig
    from flash_grpo_core.config import read_yaml

    if params_path is None:
        return CurateConfig()
    return CurateConfig.from_mapping(read_yaml(params_path).get("data"))


def check_counts(result, sources: list[str], params_path: str | None) -> None:
    """Enough prompts for what the pipeline will ask of them, or a ConfigError before anything is
    written: at least one train prompt, and as many eval prompts as `eval.num_prompts`."""
    from flash_grpo_core.config import ConfigError, load_params

    counts = result.report["counts"]
    where = f"{', '.join(sources)}: {counts['in']} prompts in, dropped {json.dumps(counts['dropped'])}"
    if not result.train:
        raise ConfigError(f"no train prompts left ({where}, {counts['eval']} eval); add prompts or loosen the "
                          f"data section's filters")
    if params_path is not None:
        wanted = load_params(params_path).eval.num_prompts
        if len(result.eval) < wanted:
            raise ConfigError(f"{len(result.eval)} eval prompts ({where}), but eval.num_prompts is {wanted}: "
                              f"lower it, raise data.min_eval / data.eval_fraction, or add prompts")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body():
        from flash_grpo_core.artifacts.prompt_sources import read_prompt_sources
        from flash_grpo_core.artifacts.prompts import SEMANTIC_UNAVAILABLE, curate, write_curation

        config = load_config(args.params)
        result = curate(read_prompt_sources(args.sources), config)
        check_counts(result, args.sources, args.params)  # before anything is written
        write_curation(result, args.out_dir)
        if result.report["semantic_dedupe"] == SEMANTIC_UNAVAILABLE:
            print(f"curate: warning: semantic dedupe {SEMANTIC_UNAVAILABLE}", file=sys.stderr)
        counts = result.report["counts"]
        return {"sources": len(args.sources), "prompts_in": counts["in"], "train": counts["train"],
                "eval": counts["eval"], "dropped": json.dumps(counts["dropped"], separators=(",", ":"))}

    return _common.run("curate", body)


if __name__ == "__main__":
    _common.finish(main())
