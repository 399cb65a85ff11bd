"""The validate stage and `flash_grpo_core.pipeline.inputs`: what a bad edit of params.yaml, a bad prompt
source or a bad model folder gives before any other stage runs (exit code 2, one line), and what
it writes when everything is valid. Through `dvc repro` on a finished workspace: test_pipeline.py."""

import json
from pathlib import Path

import pytest

from fakes import params_file
from flash_grpo_core.config import ConfigError, read_yaml

ROOT = Path(__file__).resolve().parents[1]
_params = params_file


def _validate(params: Path, out: Path, capsys, report: Path | None = None) -> tuple[int, list[str], list[str]]:
    """Run the stage in this process: (exit code, stdout lines, stderr lines)."""
    from stages import validate

    argv = ["--params", str(params), "--out", str(out / "valid.json"), "--sources", str(out / "sources.json")]
    code = validate.main(argv + (["--prompts-report", str(report)] if report else []))
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


def test_valid_params_write_a_constant_marker_and_the_sources_digest(tmp_path, capsys):
    import hashlib

    code, out, err = _validate(_params(tmp_path), tmp_path / "v", capsys)
    assert code == 0 and out[0].startswith("validate: preset=tiny source=prompts/toy.jsonl files=1 warnings=1")
    assert json.loads((tmp_path / "v" / "valid.json").read_text()) == {"valid": True}
    digest = hashlib.sha256((ROOT / "prompts" / "toy.jsonl").read_bytes()).hexdigest()
    assert json.loads((tmp_path / "v" / "sources.json").read_text()) == {
        "source": "prompts/toy.jsonl", "files": {"prompts/toy.jsonl": digest}}
    marker = (tmp_path / "v" / "valid.json").read_bytes()
    code, _, _ = _validate(_params(tmp_path, train__learning_rate=3e-5), tmp_path / "v", capsys)
    assert code == 0 and (tmp_path / "v" / "valid.json").read_bytes() == marker  # invalidates nothing downstream


def test_a_base_key_the_preset_overrides_is_named_in_both_places_once(tmp_path, capsys):
    code, _, err = _validate(_params(tmp_path, rollout__group_size=16), tmp_path / "v", capsys)
    assert code == 0 and len(err) == 1 and err[0].startswith("validate: warning: preset tiny overrides 11 base key")
    assert "rollout.group_size (16 in the base section, 4 in presets.tiny.rollout.group_size)" in err[0]
    assert "rollout.num_steps" not in err[0]  # tiny does not set it: the base value is used


@pytest.mark.parametrize(("keys", "message"), [
    ({"rollout__group_sise": 8}, "unknown key(s) rollout.group_sise"),
    ({"train__learning_rate": "fast"}, "train.learning_rate must be a number, got 'fast'"),
    ({"presets__tiny__rollout__group_size": 1}, "group_size >= 2"),
    ({"rollout__num_candidates": 30}, "rollout.num_candidates (K=30) must be between 1 and num_steps (N=20)"),
    ({"presets__tiny__rollout__frames": 10}, "rollout.frames - 1 must be divisible by 4"),
    ({"reward__weights": {"brightnes": 1.0}}, "unknown reward(s) ['brightnes']"),
    ({"iterations": 9}, "run `python -m flash_grpo_core.pipeline.iterations 9`"),
    ({"seed": -1}, "seed must be an integer in [0, 2**63), got -1"),
    ({"data__seed": -3}, "data.seed must be an integer in [0, 2**63), got -3"),
    ({"eval__seed": 2**64}, "eval.seed must be an integer in [0, 2**63)"),
    ({"toy__seed": -1}, "toy.seed must be an integer"),
    ({"toy__patch": 0}, "toy.patch must be >= 1, got 0"),
    ({"toy__layers": -2}, "toy.layers must be >= 1, got -2"),
    ({"pipeline__root": "my runs"}, "pipeline.root must be a relative path of letters, digits and . _ / -"),
    ({"data__source": "prompts/none.txt"}, "data.source 'prompts/none.txt' does not exist: set data.source"),
])
def test_a_bad_edit_is_one_line_and_exit_2_and_writes_nothing(tmp_path, capsys, keys, message):
    code, out, err = _validate(_params(tmp_path, **keys), tmp_path / "v", capsys)
    assert code == 2 and out == [] and len(err) == 1, err
    assert err[0].startswith("validate: error: ") and message in err[0], err[0]
    assert not (tmp_path / "v").exists()


def test_eval_prompts_above_the_curated_eval_set_fail_before_curate(tmp_path, capsys):
    """With curate's report of the same source and data settings, eval.num_prompts is checked
    against it; a report of other settings is not used (curate reruns and checks itself)."""
    from flash_grpo_core.artifacts.prompt_sources import source_digests
    from flash_grpo_core.config import load_params

    params = load_params(_params(tmp_path))
    report = tmp_path / "report.json"
    recorded = {"params": {**vars(params.data)}, "source_digests": source_digests(params.data.source),
                "counts": {"eval": 6}}
    report.write_text(json.dumps(recorded))
    code, _, err = _validate(_params(tmp_path, presets__tiny__eval__num_prompts=7), tmp_path / "v", capsys, report)
    assert code == 2 and "eval.num_prompts is 7, but" in err[-1] and "holds 6 eval prompts" in err[-1]
    assert _validate(_params(tmp_path, presets__tiny__eval__num_prompts=6), tmp_path / "v", capsys, report)[0] == 0
    # a report of other prompt files is not used (it says 4: 5 would fail); the source itself, curated
    # here with the exact filters, holds 6, so 5 passes and 7 does not
    report.write_text(json.dumps({**recorded, "source_digests": {"prompts/toy.jsonl": "0" * 64},
                                  "counts": {"eval": 4}}))
    assert _validate(_params(tmp_path, presets__tiny__eval__num_prompts=5), tmp_path / "v", capsys, report)[0] == 0
    code, _, err = _validate(_params(tmp_path, presets__tiny__eval__num_prompts=7), tmp_path / "v", capsys, report)
    assert code == 2 and err[-1].startswith("validate: error: 6 eval prompts (prompts/toy.jsonl: 24 prompts in")


def _prompt_folder(root: Path, train: str = "a cat on a mat\na dog in fog\n", test: str | None = "a fox in a box\n"):
    folder = root / "data" / "video"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text(train)
    if test is not None:
        (folder / "test.txt").write_text(test)
    return folder


def _wan_folder(root: Path) -> Path:
    """A Wan folder's layout (no weights are read by the checks): empty weight files."""
    folder = root / "models" / "wan"
    for part in ("transformer", "vae", "text_encoder"):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text("{}")
        (folder / part / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    (folder / "model_index.json").write_text("{}")
    return folder


def test_a_wan_preset_on_the_toy_grid_or_no_prompts_fails_naming_data_source(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "toy.jsonl").write_text((ROOT / "prompts" / "toy.jsonl").read_text())
    _wan_folder(tmp_path)
    wan = {"presets__wan1_3b__model__path": "models/wan", "presets__wan1_3b__reward__weights": {"brightness": 1.0},
           "presets__wan1_3b__reward__options": {}, "presets__wan1_3b__eval__num_prompts": 1}
    code, _, err = _validate(_params(tmp_path, "wan1_3b", **wan), tmp_path / "v", capsys)
    assert code == 2 and err[-1].startswith("validate: error: data.source is 'prompts/toy.jsonl', the toy task's")
    assert "presets.wan1_3b.data.source" in err[-1] and "train.txt" in err[-1] and "dataset/video" in err[-1]
    code, _, err = _validate(_params(tmp_path, "wan1_3b", data__source="data/video", **wan), tmp_path / "v", capsys)
    assert code == 2 and "data.source 'data/video' does not exist" in err[-1] and "train.txt" in err[-1]
    _prompt_folder(tmp_path)
    code, out, _ = _validate(_params(tmp_path, "wan1_3b", data__source="data/video", **wan), tmp_path / "v", capsys)
    assert code == 0 and "files=2" in out[0]  # train.txt and test.txt, each with its sha256
    assert set(json.loads((tmp_path / "v" / "sources.json").read_text())["files"]) == {
        "data/video/test.txt", "data/video/train.txt"}
    (tmp_path / "models" / "wan" / "vae" / "config.json").unlink()
    code, _, err = _validate(_params(tmp_path, "wan1_3b", data__source="data/video", **wan), tmp_path / "v", capsys)
    assert code == 2 and "is incomplete: missing vae/config.json" in err[-1]


def test_a_preset_points_curate_at_its_own_prompt_folder(tmp_path, capsys, monkeypatch):
    """No --sources: curate reads the effective data.source; test.txt is the eval split as given,
    a prompt in both files stays held out and its train copy is counted as a duplicate."""
    from stages import curate

    monkeypatch.chdir(tmp_path)
    _prompt_folder(tmp_path, train="a cat on a mat\na dog in fog\na fox in a box\ncat\n",
                   test="a fox in a box\na hen in a pen\n")
    params = _params(tmp_path, presets__tiny__data={"source": "data/video"})
    assert curate.main(["--params", str(params), "--out-dir", "out"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["counts"]["train"] == 2 and report["counts"]["eval"] == 2
    assert report["sources"]["data/video/train.txt"]["dropped"]["duplicate"] == 1
    assert report["sources"]["data/video/train.txt"]["dropped"]["too_short"] == 1
    assert report["sources"]["data/video/test.txt"]["eval"] == 2 and report["split"]["given"]["eval"] == 2
    assert set(report["source_digests"]) == {"data/video/train.txt", "data/video/test.txt"}


@pytest.mark.parametrize(("files", "message"), [
    ({"test.txt": "a fox in a box\n"}, "a prompt folder needs train.txt"),
    ({"train.txt": "a cat\n", "train.jsonl": '{"prompt": "a cat"}\n'}, "train.txt and train.jsonl both give"),
    ({"train.jsonl": '{"prompt": "a cat on a mat", "split": "eval"}\n', "test.txt": "a fox in a box\n"},
     "train.jsonl, line 1: 'split' 'eval' contradicts the folder's layout"),
])
def test_a_malformed_prompt_folder_is_named(tmp_path, files, message):
    from flash_grpo_core.artifacts.prompt_sources import PromptFileError, read_prompt_file

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(PromptFileError, match=message.replace("(", r"\(")):
        read_prompt_file(tmp_path)


def test_a_jsonl_folder_without_test_is_split_by_hash(tmp_path):
    from flash_grpo_core.artifacts.prompt_sources import read_prompt_file

    (tmp_path / "train.jsonl").write_text('{"prompt": "a cat on a mat"}\n{"prompt": "a dog", "split": "eval"}\n')
    assert [(p.text, p.split) for p in read_prompt_file(tmp_path)] == [("a cat on a mat", None), ("a dog", "eval")]


def test_config_errors_are_caught_without_importing_torch():
    """The validate stage's errors come back in a second: its imports and its error path load no torch."""
    import subprocess
    import sys

    script = ("import sys; from stages import validate; code = validate.main(['--params', 'nope.yaml', '--out', "
              "'o/v.json', '--sources', 'o/s.json']); print(code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["2", "False"] and "params file not found: nope.yaml" in result.stderr


def test_shadowed_keys_compare_replaced_mappings_whole():
    from flash_grpo_core.pipeline.inputs import shadowed_keys

    raw = {"reward": {"weights": {"brightness": 1.0}}, "rollout": {"height": 480},
           "presets": {"toy": {"reward": {"weights": {"brightness": 1.0}}, "rollout": {"height": 16, "width": 16}}}}
    [warning] = shadowed_keys(raw, "toy")
    assert "1 base key" in warning
    assert "rollout.height (480 in the base section, 16 in presets.toy.rollout.height)" in warning
    assert shadowed_keys(raw, "tiny") == []
    with pytest.raises(ConfigError):
        from flash_grpo_core.pipeline.inputs import check_inputs

        check_inputs(ROOT / "no-such-params.yaml")


def test_prompts_that_curate_would_refuse_and_unknown_reward_options_fail_validate(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "short.txt").write_text("red\nblue\n")  # below data.min_words: nothing survives
    code, _, err = _validate(_params(tmp_path, data__source="prompts/short.txt"), tmp_path / "v", capsys)
    assert code == 2 and err[-1].startswith("validate: error: no train prompts left (prompts/short.txt: 2 prompts in")
    (tmp_path / "prompts" / "toy.jsonl").write_text((ROOT / "prompts" / "toy.jsonl").read_text())
    code, _, err = _validate(_params(tmp_path, reward__options={"brightness": {"bogus": 1}}), tmp_path / "v", capsys)
    assert code == 2 and "reward.options:" in err[-1] and "'bogus'" in err[-1]


def test_a_key_a_dvc_stage_reads_must_be_in_the_params_file():
    from flash_grpo_core.pipeline.inputs import check_dvc_params

    raw = read_yaml(ROOT / "params.yaml")
    check_dvc_params(raw, ROOT / "dvc.yaml")  # the repository's params hold every key its stages list
    del raw["train"]["learning_rate"]  # the dataclass has a default, DVC's params check does not
    with pytest.raises(ConfigError, match="train.learning_rate is missing from the params file, and dvc.yaml's init"):
        check_dvc_params(raw, ROOT / "dvc.yaml")
