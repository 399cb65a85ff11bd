import hashlib
import json
import pickle
import random
import tarfile
from dataclasses import replace

import pytest
import torch
import webdataset as wds
from safetensors.torch import save as save_safetensors

from flash_grpo_core.sampler import RolloutBatch
from flash_grpo_core.rollout_records import batch_from_records, records_from_batch
from flash_grpo_core.shards import (
    INDEX_NAME, RolloutRecord, ShardError, iter_groups, read_shards, shard_paths, write_shards,
)

PROMPTS, GROUP, STEPS = 3, 2, 2  # B prompts x G samples = S = 6 samples, T = 2 trained steps each
LATENT, VIDEO = (4, 2, 4, 4), (3, 8, 8, 3)  # [C, F, H, W], [F', H', W', 3]
TENSORS = ("steps", "latents", "next_latents", "log_probs", "video")
META = ("key", "prompt_id", "prompt", "prompt_index", "group_index", "iteration", "seed")


def make_batch(dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = PROMPTS * GROUP
    batch = RolloutBatch(
        prompt_index=torch.arange(PROMPTS).repeat_interleave(GROUP),  # [S]
        steps=torch.randint(0, 10, (total, STEPS), generator=g),  # [S, T]
        latents=torch.randn(total, STEPS, *LATENT, generator=g).to(dtype),  # [S, T, C, F, H, W]
        next_latents=torch.randn(total, STEPS, *LATENT, generator=g).to(dtype),
        log_probs=torch.randn(total, STEPS, generator=g),  # [S, T] float32
        final_latents=torch.randn(total, *LATENT, generator=g).to(dtype),
    )
    videos = torch.randint(0, 256, (total, *VIDEO), generator=g, dtype=torch.uint8)  # [S, F', H', W', 3]
    return batch, videos


PROMPT_TEXTS = ["a red square", "a cat on a bicycle, éè", "waves"]
PROMPT_IDS = ["p-aa", "p-bb", "p-cc"]


def make_records(dtype=torch.bfloat16, iteration=3, seed=0):
    batch, videos = make_batch(dtype, seed)
    return records_from_batch(batch, videos, PROMPT_TEXTS, PROMPT_IDS, iteration=iteration, seed=1234,
                              group_size=GROUP)


def assert_same_record(a: RolloutRecord, b: RolloutRecord):
    for name in META:
        assert getattr(a, name) == getattr(b, name), name
    for name in TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


def shard_digests(out_dir):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(out_dir.iterdir())}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_record_round_trip_is_exact(dtype):
    record = make_records(dtype)[0]
    restored = RolloutRecord.from_sample(record.to_sample())
    assert_same_record(record, restored)
    assert restored.latents.dtype == dtype and record.key == "it0003-p000000-g00"


def test_sample_holds_only_json_and_safetensors_bytes():
    sample = make_records()[1].to_sample()
    assert set(sample) == {"__key__", "json", "tensors.safetensors"}
    for name in ("json", "tensors.safetensors"):
        assert isinstance(sample[name], bytes) and not sample[name].startswith(b"\x80")  # pickle's PROTO opcode
    meta = json.loads(sample["json"])
    assert list(meta) == sorted(meta) and meta["key"] == sample["__key__"]
    header_length = int.from_bytes(sample["tensors.safetensors"][:8], "little")  # safetensors: u64 + JSON header
    header = json.loads(sample["tensors.safetensors"][8:8 + header_length])
    assert set(header) == set(TENSORS)


def test_reading_never_unpickles(tmp_path, monkeypatch):
    write_shards(make_records(), tmp_path, GROUP, groups_per_shard=2)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert len(read_shards(tmp_path)) == PROMPTS * GROUP


def test_shards_are_byte_identical_whatever_the_record_order_or_clock(tmp_path, monkeypatch):
    records = make_records()
    write_shards(records, tmp_path / "a", GROUP, groups_per_shard=2)
    write_shards(records, tmp_path / "b", GROUP, groups_per_shard=2)
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    clock = 2_000_000_000.0
    monkeypatch.setattr("time.time", lambda: clock)  # a later wall clock must not leak into the bytes
    write_shards(shuffled, tmp_path / "c", GROUP, groups_per_shard=2)
    digests = shard_digests(tmp_path / "a")
    assert set(digests) == {"shard-000000.tar", "shard-000001.tar", INDEX_NAME}
    assert shard_digests(tmp_path / "b") == digests == shard_digests(tmp_path / "c")
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "flash-grpo", "flash-grpo", 0o644)}


def test_shards_hold_whole_groups_sorted_by_key(tmp_path):
    paths = write_shards(make_records(), tmp_path, GROUP, groups_per_shard=2)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert [(e["name"], e["records"]) for e in index["shards"]] == [("shard-000000.tar", 4), ("shard-000001.tar", 2)]
    assert index["group_size"] == GROUP and index["records"] == PROMPTS * GROUP
    for path in paths:
        shard = [RolloutRecord.from_sample(s) for s in wds.WebDataset(str(path), shardshuffle=False)]
        assert [r.key for r in shard] == sorted(r.key for r in shard)
        groups = list(iter_groups(shard, GROUP))
        assert all(len({r.prompt_id for r in group}) == 1 for group in groups)


def test_records_not_in_whole_groups_are_rejected(tmp_path):
    records = make_records()
    with pytest.raises(ShardError, match="whole groups"):
        write_shards(records[:-1], tmp_path, GROUP, groups_per_shard=1)  # a group lost a member
    with pytest.raises(ShardError, match="whole groups"):
        write_shards(records, tmp_path, group_size=4, groups_per_shard=1)  # 6 records, groups of 4
    with pytest.raises(ShardError, match="different prompts"):
        write_shards(records, tmp_path, group_size=3, groups_per_shard=1)  # 3 divides 6, but mixes prompts
    twice_first = [records[0], replace(records[1], group_index=0)] + records[2:]  # group indices [0, 0]
    with pytest.raises(ShardError, match=r"group indices \[0, 0\] are not 0..1"):
        write_shards(twice_first, tmp_path, GROUP, groups_per_shard=1)
    with pytest.raises(ShardError, match="occurs twice"):
        write_shards(records + records[:2], tmp_path, GROUP, groups_per_shard=1)
    assert not (tmp_path / INDEX_NAME).exists()


def test_missing_index_means_incomplete(tmp_path):
    write_shards(make_records(), tmp_path, GROUP, groups_per_shard=1)
    (tmp_path / INDEX_NAME).unlink()
    with pytest.raises(ShardError, match=r"incomplete: no shards\.json \(was the rollout stage interrupted\?\)"):
        read_shards(tmp_path)


def test_missing_shard_file_is_named(tmp_path):
    write_shards(make_records(), tmp_path, GROUP, groups_per_shard=1)
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(ShardError, match="shard-000001.tar: missing"):
        read_shards(tmp_path)


def test_truncated_shard_is_named(tmp_path):
    write_shards(make_records(), tmp_path, GROUP, groups_per_shard=1)
    path = tmp_path / "shard-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ShardError, match="shard-000001.tar: sha256"):
        read_shards(tmp_path)
    # With the index rewritten to match the cut file, the tar parse itself must still fail loudly.
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["shards"][1]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"shard-000001\.tar.*(truncated|holds \d+ records)"):
        read_shards(tmp_path)


def test_flipped_bytes_fail_the_checksum(tmp_path):
    write_shards(make_records(), tmp_path, GROUP, groups_per_shard=1)
    path = tmp_path / "shard-000002.tar"
    data = bytearray(path.read_bytes())
    data[2000:2008] = bytes(b ^ 0xFF for b in data[2000:2008])
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-000002.tar: sha256 .* does not match"):
        read_shards(tmp_path)


def test_corrupt_entry_names_shard_and_key(tmp_path):
    record = make_records()[0]
    sample = record.to_sample()
    tensors = {name: getattr(record, name) for name in TENSORS}
    tensors["next_latents"] = tensors["next_latents"][:, :2].contiguous()
    sample["tensors.safetensors"] = save_safetensors(tensors)
    with pytest.raises(ShardError, match=r"record 'it0003-p000000-g00': field 'next_latents'"):
        RolloutRecord.from_sample(sample)
    sample["tensors.safetensors"] = b"not safetensors"
    with pytest.raises(ShardError, match=r"'it0003-p000000-g00': field 'tensors.safetensors'"):
        RolloutRecord.from_sample(sample)
    with pytest.raises(ShardError, match="expected entries"):
        RolloutRecord.from_sample({**record.to_sample(), "pth": b"\x80\x04"})


def test_keys_with_dots_are_rejected():
    record = make_records()[0]
    with pytest.raises(ShardError, match="no dots"):
        replace(record, key="it0003.p000000-g00")


@pytest.mark.parametrize("field, value, message", [
    ("next_latents", torch.zeros(STEPS, 4, 2, 4, 5, dtype=torch.bfloat16), "next_latents"),
    ("steps", torch.zeros(STEPS + 1, dtype=torch.long), "steps"),
    ("log_probs", torch.zeros(STEPS, dtype=torch.float64), "log_probs"),
    ("video", torch.zeros(*VIDEO, dtype=torch.float32), "video"),
    ("video", torch.zeros(3, 8, 8, 4, dtype=torch.uint8), "video"),
])
def test_shape_or_dtype_mismatch_names_the_field(field, value, message):
    record = make_records()[0]
    with pytest.raises(ShardError, match=rf"record 'it0003-p000000-g00': field '{message}'"):
        replace(record, **{field: value})
    setattr(record, field, value)  # mutated after construction: to_sample checks again
    with pytest.raises(ShardError, match=rf"field '{message}'"):
        record.to_sample()


def test_batch_round_trip_through_records_and_disk(tmp_path):
    batch, videos = make_batch()
    records = records_from_batch(batch, videos, PROMPT_TEXTS, PROMPT_IDS, iteration=3, seed=1234, group_size=GROUP)
    write_shards(records, tmp_path, GROUP, groups_per_shard=2)
    for source in (records, read_shards(tmp_path)):
        rebuilt, rebuilt_videos, prompts, prompt_ids = batch_from_records(source)
        for name in ("prompt_index", "steps", "latents", "next_latents", "log_probs"):
            a, b = getattr(batch, name), getattr(rebuilt, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert torch.equal(rebuilt_videos, videos)
        assert prompts == PROMPT_TEXTS and prompt_ids == PROMPT_IDS
        assert rebuilt.final_latents.shape == (PROMPTS * GROUP, 0)


def test_prompt_index_is_renumbered_in_first_seen_order():
    batch, videos = make_batch()
    batch.prompt_index = torch.tensor([2, 2, 0, 0, 1, 1])
    records = records_from_batch(batch, videos, PROMPT_TEXTS, PROMPT_IDS, iteration=0, seed=0, group_size=GROUP)
    rebuilt, _, prompts, prompt_ids = batch_from_records(records)
    assert rebuilt.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert prompt_ids == ["p-cc", "p-aa", "p-bb"] and prompts[0] == "waves"


def test_webdataset_streams_the_same_records(tmp_path):
    write_shards(make_records(), tmp_path, GROUP, groups_per_shard=2)
    urls = [str(path) for path in shard_paths(tmp_path)]
    streamed = list(wds.WebDataset(urls, shardshuffle=False).map(RolloutRecord.from_sample))
    read = read_shards(tmp_path)
    assert len(streamed) == len(read) == PROMPTS * GROUP
    for a, b in zip(sorted(streamed, key=lambda r: r.key), read):
        assert_same_record(a, b)


def test_rewrite_clears_an_interrupted_attempt(tmp_path):
    records = make_records()
    write_shards(records, tmp_path, GROUP, groups_per_shard=1)  # 3 shards
    (tmp_path / ".tmp-shard-000000.tar").write_bytes(b"half a shard")
    (tmp_path / "notes.txt").write_text("not ours")
    write_shards(records, tmp_path, GROUP, groups_per_shard=3)  # 1 shard: the old 2nd and 3rd are stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "shard-000000.tar", INDEX_NAME]
    assert [r.key for r in read_shards(tmp_path)] == sorted(r.key for r in records)
