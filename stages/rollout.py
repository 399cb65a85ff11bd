"""`rollout@k` stage: iso-temporal rollouts of iteration k from checkpoint k-1, as WebDataset shards.

    python -m stages.rollout --iteration 1 --prompts runs/prompts/train.parquet \
        --checkpoint runs/tiny/it0/checkpoint --out runs/tiny/it1/rollout

Writes whole prompt groups per shard (see flash_grpo_core/artifacts/shards.py), the prompts' embeddings for
the update stage (`prompt_embeds.safetensors`, flash_grpo_core/artifacts/prompt_embeds.py) and
`manifest.json`: the prompts, each prompt's trained steps, seeds and pass counters. The timings go to
`--timings`, a file DVC does not track: in the manifest they would change the rollout's hash on
every run.

On several processes (stages/runtime/launch.py) every rank plans the same steps from the shared seed and
encodes every prompt, then samples, decodes and writes whole shards of its own; rank 0 writes the
embeddings, and `shards.json` and the manifest last. Shards are sampled one at a time on one
process too, so the bytes do not depend on the number of processes.
"""

from __future__ import annotations

from pathlib import Path

from stages.runtime import common


def main(argv=None) -> int:
    parser = common.parser("rollout", __doc__.splitlines()[0])
    parser.add_argument("--iteration", type=int, required=True)
    parser.add_argument("--prompts", required=True, help="train.parquet from the curate stage")
    parser.add_argument("--checkpoint", required=True, help="the previous iteration's checkpoint")
    parser.add_argument("--out", required=True, help="directory for the shards and manifest.json")
    parser.add_argument("--timings", help="JSON file for the stage's timings (untracked; optional)")
    args = parser.parse_args(argv)
    return common.run("rollout", work, args, argv, distributed=True)


def work(args) -> dict:
    """Sample this iteration's rollouts into shards; rank 0 writes the listing and the manifest last."""
    from flash_grpo_core.artifacts.atomic import write_json
    from flash_grpo_core.artifacts.checkpoint import check_config
    from flash_grpo_core.artifacts.prompts import read_prompts_parquet
    from flash_grpo_core.artifacts.shards import ShardWriter
    from flash_grpo_core.engine import distributed as dist
    from flash_grpo_core.engine.iteration import encode, iteration_prompts, plan_steps, reward_from_params
    from flash_grpo_core.method.batch import PassCounter
    from flash_grpo_core.pipeline.tracking import cost, open_tracker

    params = common.load_params(args.params)
    r = params.rollout
    check_config(args.checkpoint, params)  # before the model loads: a checkpoint of other params
    reward_from_params(params)  # the score stage's reward, built (not loaded) now: a missing model path
    # fails here, before any sampling, instead of after the rollout
    chosen = iteration_prompts(read_prompts_parquet(args.prompts), r.prompts_per_iteration, args.iteration,
                               params.seed)
    timings, counter = {}, PassCounter()
    with common.timer(timings, "load_seconds"):
        engine, _ = common.engine_at(params, args.checkpoint)
    texts = [p.prompt for p in chosen]
    steps = plan_steps(params, len(texts), args.iteration)  # [B, G, T], the same on every rank
    with common.timer(timings, "sample_seconds"):
        embeds = encode(engine, texts)  # every prompt on every rank: the same numbers as one process
        entries = sample_shards(engine, Path(args.out), args.iteration, chosen, steps, embeds, counter)
    passes = dist.sum_counts(counter.as_dict())
    if dist.current().is_main:
        ShardWriter(args.out, r.group_size).finish(entries)  # shards.json: the folder is complete
        write_json({"iteration": args.iteration, "seed": params.seed, "mode": params.train.mode,
                    "samples": len(chosen) * r.group_size, "shards": len(entries), "group_size": r.group_size,
                    "prompts": [{"id": p.id, "prompt": p.prompt, "steps": steps[i].tolist()}
                                for i, p in enumerate(chosen)],
                    **passes}, Path(args.out) / "manifest.json")
        if args.timings:
            write_json(timings, args.timings)
        with open_tracker(params) as tracker:  # the sampling's cost, live (params.yaml's tracking:)
            tracker.log_scalars(cost(timings, len(chosen) * r.group_size, dist.current().size, "sample_seconds"),
                                args.iteration, prefix="cost/rollout", measured=True)
    return {"iteration": args.iteration, "samples": len(chosen) * r.group_size, "shards": len(entries),
            **passes, **timings}


def sample_shards(engine, out: Path, iteration: int, chosen, steps, embeds, counter) -> list[dict]:
    """Sample, decode and write this rank's shards of the `chosen` prompts into `out` (whole groups,
    `pipeline.groups_per_shard` each) with the iteration's trained `steps` [B, G, T] and prompt
    `embeds`; every rank's listing entries, gathered. Rank 0 first clears a previous attempt and
    writes the prompt embeddings."""
    from flash_grpo_core.artifacts.prompt_embeds import save_prompt_embeds
    from flash_grpo_core.artifacts.rollout_records import records_from_batch, videos_by_key
    from flash_grpo_core.artifacts.shards import ShardWriter
    from flash_grpo_core.engine import distributed as dist
    from flash_grpo_core.engine.iteration import generate
    from flash_grpo_core.method.modes import get_mode

    params = engine.params
    r, per_shard, world = params.rollout, params.pipeline.groups_per_shard, dist.current()
    writer = ShardWriter(out, r.group_size)
    if world.is_main:
        writer.clear()
        save_prompt_embeds(out, [p.prompt for p in chosen], *embeds)  # before the index: it is written last
    dist.barrier()  # no rank writes a shard into a folder that is still being cleared
    owned = dist.owned_units(-(-len(chosen) // per_shard), world)
    texts, ids, entries = [p.prompt for p in chosen], [p.id for p in chosen], []
    with common.progress_bar(len(owned) * per_shard * r.group_size * r.num_steps, "rollout") as bar:
        for number in owned:
            groups = range(number * per_shard, min((number + 1) * per_shard, len(chosen)))
            batch, videos = generate(engine, texts, iteration, counter, steps, bar, embeds, groups)
            records = records_from_batch(batch, texts, ids, iteration, params.seed, r.group_size,
                                         keep_final=get_mode(params.train.mode).forward_process)
            entries.append(writer.write(number, records, videos_by_key(records, videos)))
    return [entry for part in dist.gather_objects(entries) for entry in part]


if __name__ == "__main__":
    common.finish(main())
