"""`validate` stage: the first of dvc.yaml, which every other stage depends on. It checks the whole
params file, the prompt source and (Wan presets) the model folder (`flash_grpo_core.pipeline.inputs`), so
a bad edit of params.yaml fails here with exit code 2 and one line, before DVC reaches a stage whose
outputs it would delete.

    python -m stages.validate --params params.yaml --out runs/validate/valid.json
        --sources runs/validate/sources.json [--prompts-report runs/prompts/report.json]

Outputs: `--out`, a constant marker (the same bytes whenever the params are valid, so rerunning this
stage invalidates nothing downstream), and `--sources`, the effective `data.source` with the sha256
of its files, which only curate depends on. `--prompts-report` (curate's report, read, not a
dependency) lets it check `eval.num_prompts` against the eval prompts already curated. Warnings
(base keys the selected preset overrides) go to stderr, once per run. No torch is imported.
"""

from __future__ import annotations

import argparse

from stages.runtime import common

MARKER = {"valid": True}  # constant: see the module docstring


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.parser("validate", __doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the constant marker every other stage depends on")
    parser.add_argument("--sources", required=True, help="where the effective prompt source's sha256 goes")
    parser.add_argument("--prompts-report", default=None, help="the curate stage's report.json, when it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return common.run("validate", work, args)


def work(args) -> dict:
    """Check the params, the prompt source and the model folder; write the sources record, then the marker."""
    from flash_grpo_core.artifacts.atomic import write_json
    from flash_grpo_core.pipeline.inputs import check_inputs

    checked = check_inputs(args.params, args.prompts_report)
    for warning in checked.warnings:
        common.warn("validate", warning)
    write_json(checked.sources, args.sources)
    write_json(MARKER, args.out)
    return {"preset": checked.params.preset, "source": checked.params.data.source,
            "files": len(checked.sources["files"]), "warnings": len(checked.warnings)}


if __name__ == "__main__":
    common.finish(main())
