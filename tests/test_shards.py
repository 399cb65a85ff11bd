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

from flash_grpo_core.artifacts.records import RolloutRecord, video_from_sample, video_sample
from flash_grpo_core.artifacts.rollout_records import batch_from_records, records_from_batch, videos_by_key
from flash_grpo_core.artifacts.shards import (
    INDEX_NAME,
    iter_groups,
    read_shards,
    read_videos,
    shard_paths,
    video_shard_paths,
    write_shards,
)
from flash_grpo_core.artifacts.tar_io import ShardError
from flash_grpo_core.method.batch import RolloutBatch

PROMPTS, GROUP, STEPS = 3, 2, 2  # B prompts x G samples = S = 6 samples, T = 2 trained steps each
LATENT, VIDEO = (4, 2, 4, 4), (3, 8, 8, 3)  # [C, F, H, W], [F', H', W', 3]
TENSORS = ("steps", "latents", "next_latents", "log_probs")
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
    batch, _ = make_batch(dtype, seed)
    return records_from_batch(batch, PROMPT_TEXTS, PROMPT_IDS, iteration=iteration, seed=1234, group_size=GROUP)


def videos_for(records) -> dict[str, torch.Tensor]:
    """A distinct random video per record, determined by its key alone."""
    def seed(key: str) -> int:
        return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)

    return {r.key: torch.randint(0, 256, VIDEO, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed(r.key)))
            for r in records}


def write(records, out_dir, groups_per_shard=1, group_size=GROUP, **kwargs):
    return write_shards(records, videos_for(records), out_dir, group_size, groups_per_shard, **kwargs)


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
    records = make_records()
    write(records, tmp_path, 2)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert len(read_shards(tmp_path)) == PROMPTS * GROUP
    assert read_videos(tmp_path, [r.key for r in records]).shape == (PROMPTS * GROUP, *VIDEO)


def test_shards_are_byte_identical_whatever_the_record_order_or_clock(tmp_path, monkeypatch):
    records = make_records()
    write(records, tmp_path / "a", 2)
    write(records, tmp_path / "b", 2)
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    clock = 2_000_000_000.0
    monkeypatch.setattr("time.time", lambda: clock)  # a later wall clock must not leak into the bytes
    write_shards(shuffled, dict(reversed(videos_for(records).items())), tmp_path / "c", GROUP, groups_per_shard=2)
    digests = shard_digests(tmp_path / "a")
    assert set(digests) == {"shard-000000.tar", "shard-000001.tar", "video-000000.tar", "video-000001.tar",
                            INDEX_NAME}
    assert shard_digests(tmp_path / "b") == digests == shard_digests(tmp_path / "c")
    for name in ("shard-000000.tar", "video-000000.tar"):
        with tarfile.open(tmp_path / "a" / name) as tar:
            members = tar.getmembers()
        assert [m.name for m in members] == sorted(m.name for m in members)
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
            (0, 0, 0, "flash-grpo", "flash-grpo", 0o644)}


def test_shards_hold_whole_groups_sorted_by_key(tmp_path):
    paths = write(make_records(), tmp_path, 2)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert [(e["name"], e["records"]) for e in index["shards"]] == [("shard-000000.tar", 4), ("shard-000001.tar", 2)]
    assert [(e["name"], e["records"]) for e in index["video_shards"]] == [("video-000000.tar", 4),
                                                                           ("video-000001.tar", 2)]
    assert index["group_size"] == GROUP and index["records"] == PROMPTS * GROUP
    for path, video_path in zip(paths, video_shard_paths(tmp_path), strict=True):
        shard = [RolloutRecord.from_sample(s) for s in wds.WebDataset(str(path), shardshuffle=False)]
        assert [r.key for r in shard] == sorted(r.key for r in shard)
        groups = list(iter_groups(shard, GROUP))
        assert all(len({r.prompt_id for r in group}) == 1 for group in groups)
        videos = [video_from_sample(s) for s in wds.WebDataset(str(video_path), shardshuffle=False)]
        assert [key for key, _ in videos] == [r.key for r in shard]  # shard n of each set: the same records


def test_records_not_in_whole_groups_are_rejected(tmp_path):
    records = make_records()
    with pytest.raises(ShardError, match="whole groups"):
        write(records[:-1], tmp_path)  # a group lost a member
    with pytest.raises(ShardError, match="whole groups"):
        write(records, tmp_path, group_size=4)  # 6 records, groups of 4
    with pytest.raises(ShardError, match="different prompts"):
        write(records, tmp_path, group_size=3)  # 3 divides 6, but mixes prompts
    twice_first = [records[0], replace(records[1], group_index=0)] + records[2:]  # group indices [0, 0]
    with pytest.raises(ShardError, match=r"group indices \[0, 0\] are not 0..1"):
        write(twice_first, tmp_path)
    with pytest.raises(ShardError, match="occurs twice"):
        write(records + records[:2], tmp_path)
    assert not (tmp_path / INDEX_NAME).exists()


def test_videos_must_match_the_records(tmp_path):
    records = make_records()
    videos = videos_for(records)
    with pytest.raises(ShardError, match=r"no video for \['it0003-p000002-g01'\], videos of unknown records \[\]"):
        write_shards(records, {k: v for k, v in videos.items() if k != "it0003-p000002-g01"}, tmp_path, GROUP, 1)
    with pytest.raises(ShardError, match=r"no video for \[\], videos of unknown records \['it0009-p000000-g00'\]"):
        write_shards(records, {**videos, "it0009-p000000-g00": videos[records[0].key]}, tmp_path, GROUP, 1)
    for bad in (videos[records[0].key].float(), torch.zeros(3, 8, 8, 4, dtype=torch.uint8)):
        with pytest.raises(ShardError, match=r"record 'it0003-p000001-g00': field 'video': expected uint8"):
            write_shards(records, {**videos, "it0003-p000001-g00": bad}, tmp_path, GROUP, 1)
    with pytest.raises(ShardError, match="name the same files"):
        write(records, tmp_path, video_pattern="shard-%06d.tar")
    assert not any(tmp_path.iterdir())  # every check comes before the disk is touched
    with pytest.raises(ShardError, match="videos hold 5 samples, the records 6"):
        videos_by_key(records, torch.zeros(5, *VIDEO, dtype=torch.uint8))


def test_read_videos_returns_the_asked_records_in_order(tmp_path):
    records = make_records()
    videos = videos_for(records)
    write(records, tmp_path, 2)
    keys = [records[4].key, records[0].key, records[5].key]  # a subset, not in key order, across shards
    assert torch.equal(read_videos(tmp_path, keys), torch.stack([videos[key] for key in keys]))
    with pytest.raises(ShardError, match=r"no video for records \['it0003-p000007-g00'\]"):
        read_videos(tmp_path, [records[0].key, "it0003-p000007-g00"])
    with pytest.raises(ShardError, match="expected distinct record keys"):
        read_videos(tmp_path, [records[0].key, records[0].key])
    with pytest.raises(ShardError, match="expected distinct record keys"):
        read_videos(tmp_path, [])


def test_videos_of_different_shapes_are_named(tmp_path):
    records = make_records()
    videos = {**videos_for(records), records[3].key: torch.zeros(2, 8, 8, 3, dtype=torch.uint8)}
    write_shards(records, videos, tmp_path, GROUP, groups_per_shard=1)
    with pytest.raises(ShardError, match=r"record 'it0003-p000001-g01': field 'video': shape \[2, 8, 8, 3\] differs"):
        read_videos(tmp_path, [r.key for r in records])


def test_the_record_reader_never_opens_a_video_shard(tmp_path):
    records = make_records()
    write(records, tmp_path)
    path = tmp_path / "video-000001.tar"
    path.write_bytes(path.read_bytes()[:1000])  # truncated: only read_videos may notice
    assert [r.key for r in read_shards(tmp_path)] == sorted(r.key for r in records)
    with pytest.raises(ShardError, match="video-000001.tar: sha256"):
        read_videos(tmp_path, [r.key for r in records])
    path.unlink()
    with pytest.raises(ShardError, match="video-000001.tar: missing"):
        read_videos(tmp_path, [r.key for r in records])


def test_an_older_format_is_named(tmp_path):
    write(make_records(), tmp_path)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    (tmp_path / INDEX_NAME).write_text(json.dumps({**index, "format": "flash-grpo-rollout/1"}))
    with pytest.raises(ShardError, match=r"format 'flash-grpo-rollout/1', this reader knows 'flash-grpo-rollout/2' "
                                         r"\(rerun the rollout stage"):
        read_shards(tmp_path)


def test_missing_index_means_incomplete(tmp_path):
    write(make_records(), tmp_path)
    (tmp_path / INDEX_NAME).unlink()
    with pytest.raises(ShardError, match=r"incomplete: no shards\.json \(was the rollout stage interrupted\?\)"):
        read_shards(tmp_path)


def test_missing_shard_file_is_named(tmp_path):
    write(make_records(), tmp_path)
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(ShardError, match="shard-000001.tar: missing"):
        read_shards(tmp_path)


def test_truncated_shard_is_named(tmp_path):
    write(make_records(), tmp_path)
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
    write(make_records(), tmp_path)
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
    video = video_sample(record.key, videos_for([record])[record.key])
    with pytest.raises(ShardError, match=r"record 'it0003-p000000-g00': field 'video.safetensors': not a readable"):
        video_from_sample({**video, "video.safetensors": b"not safetensors"})
    with pytest.raises(ShardError, match=r"expected tensors \['video'\], found \['frames'\]"):
        video_from_sample({**video, "video.safetensors": save_safetensors({"frames": torch.zeros(1)})})
    with pytest.raises(ShardError, match="field 'video': expected uint8"):
        video_from_sample({**video, "video.safetensors": save_safetensors({"video": torch.zeros(*VIDEO)})})
    with pytest.raises(ShardError, match=r"expected a key .* found \['json', 'video.safetensors'\]"):
        video_from_sample({**video, "json": b"{}"})


def test_keys_with_dots_are_rejected():
    record = make_records()[0]
    with pytest.raises(ShardError, match="no dots"):
        replace(record, key="it0003.p000000-g00")


@pytest.mark.parametrize("field, value, message", [
    ("next_latents", torch.zeros(STEPS, 4, 2, 4, 5, dtype=torch.bfloat16), "next_latents"),
    ("steps", torch.zeros(STEPS + 1, dtype=torch.long), "steps"),
    ("log_probs", torch.zeros(STEPS, dtype=torch.float64), "log_probs"),
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
    records = records_from_batch(batch, PROMPT_TEXTS, PROMPT_IDS, iteration=3, seed=1234, group_size=GROUP)
    write_shards(records, videos_by_key(records, videos), tmp_path, GROUP, groups_per_shard=2)
    for source in (records, read_shards(tmp_path)):
        rebuilt, prompts, prompt_ids = batch_from_records(source)
        for name in ("prompt_index", "steps", "latents", "next_latents", "log_probs"):
            a, b = getattr(batch, name), getattr(rebuilt, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert torch.equal(read_videos(tmp_path, [r.key for r in source]), videos)
        assert prompts == PROMPT_TEXTS and prompt_ids == PROMPT_IDS
        assert rebuilt.final_latents.shape == (PROMPTS * GROUP, 0)


def test_prompt_index_is_renumbered_in_first_seen_order():
    batch, _ = make_batch()
    batch.prompt_index = torch.tensor([2, 2, 0, 0, 1, 1])
    records = records_from_batch(batch, PROMPT_TEXTS, PROMPT_IDS, iteration=0, seed=0, group_size=GROUP)
    rebuilt, prompts, prompt_ids = batch_from_records(records)
    assert rebuilt.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert prompt_ids == ["p-cc", "p-aa", "p-bb"] and prompts[0] == "waves"


def test_webdataset_streams_the_same_records(tmp_path):
    records = make_records()
    write(records, tmp_path, 2)
    urls = [str(path) for path in shard_paths(tmp_path)]
    streamed = list(wds.WebDataset(urls, shardshuffle=False).map(RolloutRecord.from_sample))
    read = read_shards(tmp_path)
    assert len(streamed) == len(read) == PROMPTS * GROUP
    for a, b in zip(sorted(streamed, key=lambda r: r.key), read):
        assert_same_record(a, b)
    urls = [str(path) for path in video_shard_paths(tmp_path)]
    streamed_videos = dict(wds.WebDataset(urls, shardshuffle=False).map(video_from_sample))
    expected = videos_for(records)
    assert streamed_videos.keys() == expected.keys()
    assert all(torch.equal(streamed_videos[key], expected[key]) for key in expected)


def test_rewrite_clears_an_interrupted_attempt(tmp_path):
    records = make_records()
    write(records, tmp_path, 1)  # 3 shards of each set
    (tmp_path / ".tmp-video-000000.tar").write_bytes(b"half a shard")
    (tmp_path / "notes.txt").write_text("not ours")
    write(records, tmp_path, 3)  # 1 shard of each: the old 2nd and 3rd are stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "shard-000000.tar", INDEX_NAME,
                                                          "video-000000.tar"]
    assert [r.key for r in read_shards(tmp_path)] == sorted(r.key for r in records)
