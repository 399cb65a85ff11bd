"""Rollout records on disk: WebDataset tar shards with safetensors tensors and a `shards.json` index.

One rollout sample is one `RolloutRecord` (SPEC section 4: what training needs from a rollout) and
one decoded video (what scoring needs). They go to two sets of shards, so the update stage never
reads a video: at Wan 2.1's 81 x 480 x 832 a video is about 97 MB, some 90% of a sample's bytes.

    shard-000000.tar   per record, in this order:
        <key>.json                  metadata, UTF-8 JSON with sorted keys: format, key, prompt_id,
                                    prompt, prompt_index, group_index, iteration, seed
        <key>.tensors.safetensors   one safetensors file holding steps, latents, next_latents, log_probs
    video-000000.tar   the same records' videos:
        <key>.video.safetensors     one safetensors file holding `video`, uint8 [F', H', W', 3]

Shard n of each set holds the same records. WebDataset splits a member name at the first dot of its
base name: what comes before is the sample key, what comes after (`json`, `tensors.safetensors`,
`video.safetensors`) the field name. So keys never contain dots (they are `[A-Za-z0-9_-]`, at most
80 characters, e.g. `it0003-p000012-g05`). Written last, `shards.json`:

    {"format": ..., "group_size": G, "records": n,
     "shards": [{"name": "shard-000000.tar", "records": n0, "bytes": ..., "sha256": ...}, ...],
     "video_shards": [{"name": "video-000000.tar", ...}, ...]}

A directory without `shards.json` is an unfinished write (an interrupted rollout stage).

Why this format:
- No pickle anywhere: tensors are safetensors bytes and metadata is JSON, so reading a shard never
  runs code (webdataset's default `.pth` decoder unpickles; we never use its decoders).
- bfloat16 latents round-trip exactly (`.npy` cannot hold bf16; safetensors can).
- Byte-reproducible shards, so DVC sees identical outputs for identical rollouts: records are
  sorted by key, every tar header is fixed (mtime 0, uid/gid 0, fixed uname/gname, mode 0644,
  ustar format) and the index holds no timestamps. The tars are written with `tarfile`
  (flash_grpo_core/artifacts/tar_io.py) rather than webdataset 1.0.2's `TarWriter`, whose `format` argument
  is ignored and whose uid/gid cannot be set; the result is an ordinary WebDataset shard all the same.
- Whole groups per shard (a shard holds `groups_per_shard * G` records), so a reader streaming one
  shard always sees complete groups for the group-relative advantages.
- Videos in their own shards: `read_shards` (the update) reads and checksums only the training
  tensors; `read_videos` (scoring) reads the videos.

`read_shards` and `read_videos` parse the tars with `tarfile` directly, not through
`wds.WebDataset`: they check every shard against the index's sha256, reject unexpected or
duplicated entries and report errors naming the shard file and record key, where webdataset's
pipeline would hand exceptions to its handlers and group members silently. Standard tools still
stream the shards: `wds.WebDataset(urls, shardshuffle=False).map(RolloutRecord.from_sample)` (no
`.decode()`, so no pickle) with the urls from `shard_paths`, and `.map(video_from_sample)` over
`video_shard_paths`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from flash_grpo_core.artifacts.atomic import loads_finite
from flash_grpo_core.artifacts.records import (
    FORMAT,
    RolloutRecord,
    check_unique_keys,
    check_video,
    video_from_sample,
    video_sample,
)
from flash_grpo_core.artifacts.tar_io import TEMP_PREFIX, ShardError, replace_atomically, sha256, tar_samples, write_tar

INDEX_NAME = "shards.json"


def iter_groups(records: Iterable[RolloutRecord], group_size: int) -> Iterator[list[RolloutRecord]]:
    """Yield the records G at a time, checking each chunk is one prompt's whole group.

    A group is G consecutive records with the same (iteration, prompt_index, prompt_id) whose
    group indices are 0..G-1. Raises ShardError otherwise.
    """
    records = list(records)
    if group_size < 1 or len(records) % group_size:
        raise ShardError(f"{len(records)} records do not form whole groups of {group_size}")
    for start in range(0, len(records), group_size):
        group = records[start:start + group_size]
        head = group[0]
        for record in group:
            if (record.iteration, record.prompt_index, record.prompt_id) != (head.iteration, head.prompt_index,
                                                                              head.prompt_id):
                raise ShardError(f"records {head.key!r} and {record.key!r} fall in one group of {group_size} but "
                                 "belong to different prompts: records must come in whole consecutive groups")
        if sorted(record.group_index for record in group) != list(range(group_size)):
            raise ShardError(f"group of {head.key!r}: group indices {[r.group_index for r in group]} are not "
                             f"0..{group_size - 1}: records must come in whole consecutive groups")
        yield group


class ShardWriter:
    """Writes one rollout directory's shards, possibly from several processes, and the index last.

    Shard n holds groups [n * groups_per_shard, (n + 1) * groups_per_shard) of the iteration, and is
    written whole by whichever process sampled it (`write`), under a temporary name renamed when
    complete. One process clears a previous attempt first (`clear`) and, once every shard is
    written, writes `shards.json` from every writer's listing entries (`finish`).
    """

    def __init__(self, out_dir: str | os.PathLike, group_size: int, pattern: str = "shard-%06d.tar",
                 video_pattern: str = "video-%06d.tar"):
        self.names = _shard_name_pattern(pattern), _shard_name_pattern(video_pattern)
        if self.names[0].fullmatch(video_pattern % 0) or self.names[1].fullmatch(pattern % 0):
            raise ShardError(f"shard name patterns {pattern!r} and {video_pattern!r} name the same files")
        self.out_dir, self.group_size = Path(out_dir), group_size
        self.patterns = {"shards": pattern, "video_shards": video_pattern}

    def clear(self) -> None:
        """Remove a previous attempt's index, temporary files and shards; other files stay."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _remove_previous_attempt(self.out_dir, self.names)

    def write(self, number: int, records: Sequence[RolloutRecord], videos: Mapping[str, torch.Tensor]) -> dict:
        """Write shard `number` of both sets from whole groups; returns its listing entries."""
        ordered = sorted(records, key=lambda record: record.key)
        check_unique_keys(ordered)
        list(iter_groups(ordered, self.group_size))  # validates before anything touches the disk
        _check_videos_match(ordered, {record.key: videos[record.key] for record in ordered if record.key in videos})
        entries = {"number": number}
        for listing, samples in (("shards", [record.to_sample() for record in ordered]),
                                 ("video_shards", [video_sample(record.key, videos[record.key]) for record in ordered])):
            path = self.out_dir / (self.patterns[listing] % number)
            write_tar(samples, path)
            entries[listing] = {"name": path.name, "records": len(ordered), "bytes": path.stat().st_size,
                                "sha256": sha256(path)}
        return entries

    def finish(self, entries: Iterable[dict]) -> list[Path]:
        """Write `shards.json` from the `write` entries of every shard; returns the record shards' paths."""
        entries = sorted(entries, key=lambda entry: entry["number"])
        if [entry["number"] for entry in entries] != list(range(len(entries))):
            raise ShardError(f"shards {[entry['number'] for entry in entries]} are not 0..{len(entries) - 1}")
        index = {"format": FORMAT, "group_size": self.group_size,
                 "records": sum(entry["shards"]["records"] for entry in entries),
                 **{listing: [entry[listing] for entry in entries] for listing in LISTINGS}}
        replace_atomically(self.out_dir / INDEX_NAME,
                           (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        return [self.out_dir / entry["shards"]["name"] for entry in entries]


def shard_groups(records: Iterable[RolloutRecord], group_size: int, groups_per_shard: int) -> list[list[RolloutRecord]]:
    """Records sorted by key and cut into shards of `groups_per_shard` whole groups."""
    if groups_per_shard < 1:
        raise ShardError(f"groups_per_shard must be >= 1, got {groups_per_shard}")
    ordered = sorted(records, key=lambda record: record.key)
    check_unique_keys(ordered)
    groups = list(iter_groups(ordered, group_size))
    return [[record for group in groups[start:start + groups_per_shard] for record in group]
            for start in range(0, len(groups), groups_per_shard)]


def write_shards(records: Iterable[RolloutRecord], videos: Mapping[str, torch.Tensor], out_dir: str | os.PathLike,
                 group_size: int, groups_per_shard: int, pattern: str = "shard-%06d.tar",
                 video_pattern: str = "video-%06d.tar") -> list[Path]:
    """Write records and their videos ({key: uint8 [F', H', W', 3]}) as byte-reproducible tar shards
    of whole groups, then `shards.json`, from one process; return the record shards' paths.

    Records are sorted by key first (the order they come in does not matter) and must then form
    whole consecutive groups of G; `videos` holds exactly one video per record. Shard n of each set
    holds the same records. A previous attempt's index, temporary files and shards matching either
    pattern are removed first; other files in `out_dir` are left alone.
    """
    writer = ShardWriter(out_dir, group_size, pattern, video_pattern)
    shards = shard_groups(records, group_size, groups_per_shard)
    _check_videos_match([record for shard in shards for record in shard], videos)
    writer.clear()
    return writer.finish([writer.write(number, shard, videos) for number, shard in enumerate(shards)])


def _check_videos_match(records: Sequence[RolloutRecord], videos: Mapping[str, torch.Tensor]) -> None:
    keys = [record.key for record in records]
    missing, unknown = sorted(set(keys) - set(videos)), sorted(set(videos) - set(keys))
    if missing or unknown:
        raise ShardError(f"videos must match the records one to one: no video for {_some(missing)}, "
                         f"videos of unknown records {_some(unknown)}")
    for key in keys:
        check_video(key, videos[key])


def _some(keys: Sequence[str], shown: int = 3) -> str:
    return "[" + ", ".join(map(repr, keys[:shown])) + (f", ... ({len(keys)} in all)" if len(keys) > shown else "") + "]"


def _shard_name_pattern(pattern: str) -> re.Pattern:
    """The regex of shard names `pattern` produces; the pattern holds exactly one `%d`-style number."""
    specs = re.findall(r"%0?\d*d", pattern)
    rest = pattern.replace(specs[0], "", 1) if len(specs) == 1 else pattern
    if len(specs) != 1 or "%" in rest or "/" in pattern or os.sep in pattern or pattern.startswith(TEMP_PREFIX) \
            or pattern % 0 == INDEX_NAME:
        raise ShardError(f"shard name pattern {pattern!r}: expected a file name with one %d-style number, "
                         f"e.g. 'shard-%06d.tar'")
    head, tail = pattern.split(specs[0], 1)
    return re.compile(re.escape(head) + r"\d+" + re.escape(tail))


def _remove_previous_attempt(out_dir: Path, shard_names: Sequence[re.Pattern]) -> None:
    # The index goes first, so the directory reads as unfinished until the new index is written.
    (out_dir / INDEX_NAME).unlink(missing_ok=True)
    for path in sorted(out_dir.iterdir()):
        if path.is_file() and (path.name.startswith(TEMP_PREFIX) or any(n.fullmatch(path.name) for n in shard_names)):
            path.unlink()


LISTINGS = ("shards", "video_shards")


def _load_index(out_dir: Path) -> dict:
    index_path = out_dir / INDEX_NAME
    if not index_path.is_file():
        raise ShardError(f"rollout directory {out_dir} is incomplete: no {INDEX_NAME} "
                         "(was the rollout stage interrupted?)")
    try:
        index = loads_finite(index_path.read_text(encoding="utf-8"))
        if index["format"] != FORMAT:
            raise ShardError(f"{index_path}: format {index['format']!r}, this reader knows {FORMAT!r} "
                             "(rerun the rollout stage to rewrite it)")
        valid = all(
            isinstance(entry["name"], str) and "/" not in entry["name"] and isinstance(entry["records"], int)
            and isinstance(entry["sha256"], str) for listing in LISTINGS for entry in index[listing])
    except (ValueError, KeyError, TypeError) as error:  # ValueError: not UTF-8, not JSON, non-finite
        raise ShardError(f"{index_path}: not a valid shard index ({error!r})") from error
    if not valid or len(index["shards"]) != len(index["video_shards"]):
        raise ShardError(f"{index_path}: not a {FORMAT!r} shard index")
    return index


def _listed_paths(out_dir: Path, index: dict, listing: str) -> list[Path]:
    paths = [out_dir / entry["name"] for entry in index[listing]]
    for path in paths:
        if not path.is_file():
            raise ShardError(f"shard {path}: missing (listed in {out_dir / INDEX_NAME})")
    return paths


def shard_paths(out_dir: str | os.PathLike) -> list[Path]:
    """The record shards listed in `out_dir/shards.json` (each must exist), e.g. as urls for `wds.WebDataset`."""
    out_dir = Path(out_dir)
    return _listed_paths(out_dir, _load_index(out_dir), "shards")


def video_shard_paths(out_dir: str | os.PathLike) -> list[Path]:
    """The video shards listed in `out_dir/shards.json` (each must exist), in the order of `shard_paths`."""
    out_dir = Path(out_dir)
    return _listed_paths(out_dir, _load_index(out_dir), "video_shards")


def shard_count(out_dir: str | os.PathLike) -> int:
    """How many shards (of each set) a finished shard directory holds."""
    return len(_load_index(Path(out_dir))["shards"])


def read_shards(out_dir: str | os.PathLike, shards: Sequence[int] | None = None) -> list[RolloutRecord]:
    """The records of a finished shard directory (of the shards numbered `shards`, default all),
    sorted by key, after checking each shard's sha256. The video shards are not opened."""
    records = list(_read_listing(Path(out_dir), "shards", RolloutRecord.from_sample, shards))
    records.sort(key=lambda record: record.key)
    check_unique_keys(records)
    return records


def read_videos(out_dir: str | os.PathLike, keys: Sequence[str], shards: Sequence[int] | None = None) -> torch.Tensor:
    """The videos of the records `keys`, stacked in that order: uint8 [len(keys), F', H', W', 3].

    Reads the video shards numbered `shards` (default all), checks each one's sha256 and fills the
    result one shard at a time, so at most one shard's bytes are held besides it. Every key must
    have exactly one video of the common shape.
    """
    out_dir = Path(out_dir)
    position = {key: i for i, key in enumerate(keys)}
    if not keys or len(position) != len(keys):
        raise ShardError(f"read_videos: expected distinct record keys, got {_some(list(keys))}")
    out, seen = None, set()
    for key, video in _read_listing(out_dir, "video_shards", video_from_sample, shards):
        if key in seen:
            raise ShardError(f"{out_dir}: the video of record {key!r} occurs twice")
        seen.add(key)
        if key not in position:
            continue
        if out is None:
            out = torch.empty(len(keys), *video.shape, dtype=video.dtype)
        elif video.shape != out.shape[1:]:
            raise ShardError(f"record {key!r}: field 'video': shape {list(video.shape)} differs from the other "
                             f"videos' {list(out.shape[1:])}")
        out[position[key]] = video
    missing = [key for key in keys if key not in seen]
    if missing:
        raise ShardError(f"{out_dir}: no video for records {_some(missing)}")
    return out


def _read_listing(out_dir: Path, listing: str, parse: Callable[[dict], object],
                  shards: Sequence[int] | None = None) -> Iterator:
    """Parse every sample of the index's `listing` shards (those numbered `shards`, default all), one
    shard at a time, each after its sha256 check."""
    index = _load_index(out_dir)
    numbers = range(len(index[listing])) if shards is None else shards
    if any(not 0 <= number < len(index[listing]) for number in numbers):
        raise ShardError(f"{out_dir}: shards {list(numbers)} asked for, {INDEX_NAME} lists {len(index[listing])}")
    paths = _listed_paths(out_dir, index, listing)
    for path, entry in ((paths[number], index[listing][number]) for number in numbers):
        digest = sha256(path)
        if digest != entry["sha256"]:
            raise ShardError(f"shard {path}: sha256 {digest} does not match {INDEX_NAME} ({entry['sha256']}); "
                             "the file is truncated, corrupt or was changed after writing")
        parsed = [_parse_in_shard(parse, sample, path) for sample in tar_samples(path)]
        if len(parsed) != entry["records"]:
            raise ShardError(f"shard {path}: holds {len(parsed)} records, {INDEX_NAME} says {entry['records']}")
        yield from parsed


def _parse_in_shard(parse: Callable[[dict], object], sample: dict, path: Path):
    try:
        return parse(sample)
    except ShardError as error:
        raise ShardError(f"shard {path}: {error}") from error
