"""The on-disk formats and their writers: atomic writes (`atomic`), prompt tables (`prompts`),
rollout records and their WebDataset shards (`records`, `shards` over `tar_io`, `rollout_records`),
prompt embeddings (`prompt_embeds`), scores (`scores`) and checkpoints (`checkpoint`). Nothing
here imports the engine: the types they share live in `method.batch`."""
