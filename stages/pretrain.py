"""`pretrain` stage: the alignment benchmark's base model, pre-trained on the synthetic toy task.

    python -m stages.pretrain --out bench/toy/base

Flow-matching pre-training of the pixel-space Wan transformer on coloured squares moving in a
direction (flash_grpo_core/tasks/toy/), `toy.pretrain_steps` steps. Writes transformer.safetensors
and pretrain.json (loss curve summary, time).
"""

from __future__ import annotations

from stages.runtime import common


def main(argv=None) -> int:
    parser = common.parser("pretrain", __doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for transformer.safetensors and pretrain.json")
    parser.add_argument("--steps", type=int, default=None, help="override toy.pretrain_steps (quick runs)")
    args = parser.parse_args(argv)
    return common.run("pretrain", work, args)


def work(args) -> dict:
    """Pre-train the toy base model and save it with its loss summary."""
    import dataclasses
    import time

    from flash_grpo_core.tasks import toy

    params = common.load_params(args.params)
    cfg = params.toy
    steps = cfg.pretrain_steps if args.steps is None else args.steps
    stack = toy.build_toy_stack(cfg, text_len=16)
    began = time.perf_counter()
    with common.progress_bar(steps, "pretrain") as bar:
        losses = toy.pretrain(stack, cfg, steps=steps, progress=bar)
    seconds = time.perf_counter() - began
    tail = losses[-100:] or [float("nan")]
    summary = {"toy": dataclasses.asdict(cfg), "steps": steps, "seconds": round(seconds, 1),
               "loss_first": losses[0] if losses else None,
               "loss_last100_mean": sum(tail) / len(tail),
               "loss_curve": [round(x, 5) for x in losses[:: max(1, steps // 100)]]}
    toy.save_base(stack, args.out, summary)
    return {"steps": steps, "loss_last100_mean": round(summary["loss_last100_mean"], 4)}


if __name__ == "__main__":
    common.finish(main())
