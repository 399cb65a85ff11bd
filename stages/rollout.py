"""`rollout@k` stage: iso-temporal rollouts of iteration k from checkpoint k-1, as WebDataset shards.

    python -m stages.rollout --iteration 1 --prompts runs/prompts/train.parquet \
        --checkpoint runs/tiny/it0/checkpoint --out runs/tiny/it1/rollout

Writes whole prompt groups per shard (see flash_grpo_core/artifacts/shards.py), the prompts' embeddings for
the update stage (`prompt_embeds.safetensors`, flash_grpo_core/artifacts/prompt_embeds.py) and
`manifest.json`: the prompts, each prompt's trained steps, seeds, pass counters and timings.
"""

from __future__ import annotations

from pathlib import Path

from stages import _common


def main(argv=None) -> int:
    parser = _common.parser("rollout", __doc__.splitlines()[0])
    parser.add_argument("--iteration", type=int, required=True)
    parser.add_argument("--prompts", required=True, help="train.parquet from the curate stage")
    parser.add_argument("--checkpoint", required=True, help="the previous iteration's checkpoint")
    parser.add_argument("--out", required=True, help="directory for the shards and manifest.json")
    args = parser.parse_args(argv)

    def body():
        from flash_grpo_core.artifacts.atomic import write_json
        from flash_grpo_core.artifacts.prompt_embeds import save_prompt_embeds
        from flash_grpo_core.artifacts.prompts import read_prompts_parquet
        from flash_grpo_core.artifacts.rollout_records import records_from_batch, videos_by_key
        from flash_grpo_core.artifacts.shards import write_shards
        from flash_grpo_core.engine.iteration import encode, generate, iteration_prompts
        from flash_grpo_core.method.batch import PassCounter

        params = _common.load_params(args.params)
        r = params.rollout
        chosen = iteration_prompts(read_prompts_parquet(args.prompts), r.prompts_per_iteration, args.iteration,
                                   params.seed)
        timings, counter = {}, PassCounter()
        with _common.timer(timings, "load_seconds"):
            engine, _ = _common.engine_at(params, args.checkpoint)
        texts = [p.prompt for p in chosen]
        with _common.timer(timings, "sample_seconds"), \
                _common.progress_bar(len(chosen) * r.group_size * r.num_steps, "rollout") as bar:
            embeds = encode(engine, texts)
            batch, videos = generate(engine, texts, args.iteration, counter, progress=bar, embeds=embeds)
        records = records_from_batch(batch, texts, [p.id for p in chosen], args.iteration, params.seed, r.group_size)
        with _common.timer(timings, "write_seconds"):
            save_prompt_embeds(args.out, texts, *embeds)  # before the index: the directory is finished last
            shards = write_shards(records, videos_by_key(records, videos), args.out, r.group_size,
                                  params.pipeline.groups_per_shard)
        steps = batch.steps.reshape(len(chosen), r.group_size, -1)
        write_json({"iteration": args.iteration, "seed": params.seed, "mode": params.train.mode,
                    "samples": len(records), "shards": len(shards), "group_size": r.group_size,
                    "prompts": [{"id": p.id, "prompt": p.prompt, "steps": steps[i].tolist()}
                                for i, p in enumerate(chosen)],
                    **counter.as_dict(), **timings}, Path(args.out) / "manifest.json")
        return {"iteration": args.iteration, "samples": len(records), "shards": len(shards),
                "forward_passes": counter.forward, **timings}

    return _common.run("rollout", body)


if __name__ == "__main__":
    _common.finish(main())
