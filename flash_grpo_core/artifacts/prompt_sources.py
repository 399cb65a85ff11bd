"""Prompt sources for the `curate` stage: `.txt`, `.jsonl` and `.parquet` files, and folders of them,
read into `RawPrompt`s.

- `.txt`: one prompt per line; blank lines and `#` lines ignored;
- `.jsonl`: objects with a string `prompt`, optional string `source` and `split`;
- `.parquet`: a string `prompt` column, optional string `source` and `split` columns;
- a folder in the layout the authors', Flow-GRPO's and Flow-Factory's prompt sets share:
  `train.txt` and, optionally, `test.txt` (or `.jsonl` / `.parquet` of those names). With a test
  file, its prompts are the eval split and train's the train split, as given; without one, curate
  splits train's prompts by hash. The test file is read first, so a prompt in both stays held out
  (train's copy is dropped as a duplicate, and counted).
`split` ("train" or "eval") assigns a prompt to a split (e.g. a benchmark's held-out combinations).
Strict UTF-8; anything malformed raises `PromptFileError` naming the file and line or row.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "eval")  # the values a source's `split` field may take


class PromptFileError(ValueError):
    """A prompt source that cannot be read; the message names the file and, where it applies, the line."""


@dataclass(frozen=True)
class RawPrompt:
    """A prompt as read, before normalisation; `file:line` says where it came from (line = row for Parquet)."""

    text: str
    source: str  # the value of the `source` column: the file name, or the record's own `source`
    file: str
    line: int
    split: str | None = None  # "train" | "eval" when the source assigns it; None: split by hash


def read_prompt_sources(paths: Sequence[str | os.PathLike]) -> list[RawPrompt]:
    """All prompts of all sources, in the order given (the order decides which duplicate is kept)."""
    return [prompt for path in paths for prompt in read_prompt_file(path)]


def read_prompt_file(path: str | os.PathLike) -> list[RawPrompt]:
    """The prompts of one `.txt`, `.jsonl` or `.parquet` file, in file order, or of a prompt folder."""
    path = Path(path)
    if path.is_dir():
        return read_prompt_folder(path)
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None and not path.exists():
        raise PromptFileError(f"{path}: no such file or folder")
    if reader is None:
        raise PromptFileError(f"{path}: unknown prompt file extension {path.suffix!r} (use .txt, .jsonl or .parquet, "
                              f"or a folder with train.txt / test.txt)")
    if not path.is_file():
        raise PromptFileError(f"{path}: no such file")
    return reader(path)


# A prompt folder's files by split, test first (see the module docstring).
FOLDER_SPLITS = (("test", "eval"), ("train", "train"))
_EXTENSIONS = (".txt", ".jsonl", ".parquet")


def folder_files(folder: Path) -> dict[str, Path]:
    """{"test": file, "train": file} of a prompt folder (test only when present); PromptFileError
    when train is missing or a split has files of two formats."""
    found = {}
    for stem, _ in FOLDER_SPLITS:
        files = [folder / f"{stem}{suffix}" for suffix in _EXTENSIONS if (folder / f"{stem}{suffix}").is_file()]
        if len(files) > 1:
            raise PromptFileError(f"{folder}: {' and '.join(f.name for f in files)} both give the {stem} split; "
                                  f"keep one")
        if files:
            found[stem] = files[0]
    if "train" not in found:
        names = sorted(p.name for p in folder.iterdir())[:8]
        raise PromptFileError(f"{folder}: a prompt folder needs train.txt (one prompt a line; or train.jsonl / "
                              f"train.parquet) and, for a given eval split, test.txt; it holds {names}")
    return found


def read_prompt_folder(folder: Path) -> list[RawPrompt]:
    """The prompts of a train.txt / test.txt folder, test's first, each with its file's split
    (none when there is no test file: curate then splits by hash)."""
    files = folder_files(folder)
    prompts = []
    for stem, split in FOLDER_SPLITS:
        if stem not in files:
            continue
        given = split if "test" in files else None
        for prompt in read_prompt_file(files[stem]):
            if prompt.split is not None and given is not None and prompt.split != given:
                raise PromptFileError(f"{prompt.file}, line {prompt.line}: 'split' {prompt.split!r} contradicts "
                                      f"the folder's layout ({files[stem].name} is the {given} split)")
            prompts.append(dataclasses.replace(prompt, split=prompt.split or given))
    return prompts


def source_digests(path: str | os.PathLike) -> dict[str, str]:
    """{file: sha256} of a prompt source: the file itself, or a folder's train / test files."""
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: no such file or folder")
    files = sorted(folder_files(path).values()) if path.is_dir() else [path]
    return {str(file): hashlib.sha256(file.read_bytes()).hexdigest() for file in files}


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) pairs; strict UTF-8 (a leading BOM is dropped)."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    # bytes.splitlines breaks only on \n, \r, \r\n: line numbers match what an editor shows
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise PromptFileError(f"{path}, line {number}: not valid UTF-8 ({error.reason} at byte {error.start})") \
                from None


def _read_txt(path: Path) -> list[RawPrompt]:
    return [RawPrompt(line, path.name, str(path), number) for number, line in _decoded_lines(path)
            if line.strip() and not line.lstrip().startswith("#")]


def _read_jsonl(path: Path) -> list[RawPrompt]:
    prompts = []
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{where}: invalid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise PromptFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "prompt" not in record:
            raise PromptFileError(f"{where}: no 'prompt' field")
        prompt, source = record["prompt"], record.get("source", path.name)
        if not isinstance(prompt, str):
            raise PromptFileError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
        if not isinstance(source, str):
            raise PromptFileError(f"{where}: 'source' must be a string, got {type(source).__name__}")
        prompts.append(RawPrompt(prompt, source, str(path), number, _split(record.get("split"), where)))
    return prompts


def _split(value, where: str) -> str | None:
    if value is not None and value not in SPLITS:
        raise PromptFileError(f"{where}: 'split' must be one of {SPLITS} or absent, got {value!r}")
    return value


def _read_parquet(path: Path) -> list[RawPrompt]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if "prompt" not in schema.names:
            raise PromptFileError(f"{path}: no 'prompt' column (columns: {schema.names})")
        columns = [name for name in ("prompt", "source", "split") if name in schema.names]
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise PromptFileError(f"{path}: not a readable Parquet file ({error})") from None
    for name in columns:
        kind = table.schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise PromptFileError(f"{path}: column '{name}' must hold strings, got {kind}")
    texts = table.column("prompt").to_pylist()
    sources = table.column("source").to_pylist() if "source" in columns else [path.name] * len(texts)
    splits = table.column("split").to_pylist() if "split" in columns else [None] * len(texts)
    prompts = []
    for row, (text, source, split) in enumerate(zip(texts, sources, splits), start=1):
        if text is None:
            raise PromptFileError(f"{path}, row {row}: null prompt")
        prompts.append(RawPrompt(text, source if source is not None else path.name, str(path), row,
                                 _split(split, f"{path}, row {row}")))
    return prompts
