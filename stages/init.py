"""`init` stage: the iteration-0 checkpoint (the base model's trainable state before any update).

    python -m stages.init --out runs/tiny/it0/checkpoint --reward-state runs/tiny/it0/reward_state.json

Under LoRA this is the seeded adapter initialisation (a no-op on the base model), its EMA, and an
empty optimizer state; every later iteration starts from the previous iteration's checkpoint.
Also the reward scale guards' empty history, which each score stage extends.
"""

from __future__ import annotations

from stages.runtime import common


def main(argv=None) -> int:
    parser = common.parser("init", __doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--reward-state", required=True,
                        help="reward_state.json to write: the reward scale guards' empty history")
    args = parser.parse_args(argv)
    return common.run("init", work, args)


def work(args) -> dict:
    """Write the iteration-0 checkpoint and the reward guards' empty history."""
    from flash_grpo_core.artifacts.atomic import write_json
    from flash_grpo_core.artifacts.checkpoint import config_record, save_checkpoint
    from flash_grpo_core.engine.iteration import build_engine

    params = common.load_params(args.params)
    engine = build_engine(params, text_encoder=False)  # writes the untrained adapter only
    save_checkpoint(engine.policy, args.out, {"iteration": 0, "preset": params.preset,
                                              "config": config_record(params), "history": []})
    write_json({}, args.reward_state)
    return {"preset": params.preset, "trainable": sum(p.numel() for p in engine.policy.parameters.values())}


if __name__ == "__main__":
    common.finish(main())
