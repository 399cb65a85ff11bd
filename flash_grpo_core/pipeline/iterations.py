"""Set the number of training iterations in params.yaml: `iterations`, `pipeline.loop` and `eval_at`.

    python -m flash_grpo_core.pipeline.iterations 5 [--params params.yaml]

DVC's `foreach` needs the iterations spelled out (it cannot count), so params.yaml keeps the count,
the {iteration: previous} mapping and the evaluated checkpoints (from `pipeline.eval_every`); this
rewrites them together, keeping the file's comments. Raising the count makes `dvc repro` run only
the new iterations (and evaluate the new checkpoints).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def set_iterations(path: Path, iterations: int) -> None:
    from ruamel.yaml import YAML, YAMLError

    from flash_grpo_core.artifacts.atomic import atomic_path
    from flash_grpo_core.config import ConfigError, load_params
    from flash_grpo_core.config.dvc_layout import set_dvc_layout

    yaml = YAML()  # round-trip: comments and layout stay
    try:
        data = yaml.load(path.read_text())
    except YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    set_dvc_layout(data, iterations)
    with atomic_path(path) as temporary:
        with open(temporary, "w") as handle:
            yaml.dump(data, handle)
        try:
            load_params(temporary)  # never leave a params file that does not load
        except ConfigError as error:
            reason = str(error).removeprefix(f"{temporary}: ")
            raise ConfigError(f"{path}: {reason} (left unchanged: fix it, then rerun)") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flash_grpo_core.pipeline.iterations",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("count", type=int)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("the iteration count must be >= 1")
    if not Path(args.params).is_file():
        parser.error(f"no params file at {args.params}")
    from flash_grpo_core.config import ConfigError

    try:
        set_iterations(Path(args.params), args.count)
    except ConfigError as error:
        print(f"iterations: error: {error}", file=sys.stderr)
        return 2
    print(f"iterations: {args.count} ({args.params})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
