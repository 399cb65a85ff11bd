"""The preflight (flash_grpo_core/pipeline/preflight.py) and the run sizes it prints (flash_grpo_core/pipeline/plan.py):
on checkouts built in a temporary folder, without weights, GPUs or torch."""

import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from flash_grpo_core.pipeline import plan, preflight
from flash_grpo_core.config import load_params
from flash_grpo_core.models.layout import WAN_TRANSFORMER_CONFIGS

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A checkout holding only params.yaml (no models, no prompts), on a machine without GPUs."""
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setattr(preflight, "visible_gpus", lambda: (0, None))
    for name in (preflight.NPROC_ENV, preflight.NNODES_ENV):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _complete_layout(root: Path, folder: str = "Wan2.1-T2V-1.3B-Diffusers", arch: str = "wan1_3b") -> None:
    """A Wan 2.1 model's folders as the preflight checks them: configs as small JSON, empty weight
    files, HPSv3's file and its base model's config, and a prompt folder as data.source."""
    model = root / "models" / folder
    _touch(model / "model_index.json", "{}")
    _touch(model / "transformer" / "config.json", json.dumps(WAN_TRANSFORMER_CONFIGS[arch]))
    for part in ("transformer", "vae", "text_encoder"):
        _touch(model / part / "diffusion_pytorch_model.safetensors")
    for part in ("vae", "text_encoder"):
        _touch(model / part / "config.json", "{}")
    _touch(model / "tokenizer" / "tokenizer.json", "{}")
    _touch(root / "models" / "HPSv3" / "HPSv3.safetensors")
    _touch(root / "models" / "Qwen2-VL-7B-Instruct" / "config.json", "{}")
    _touch(root / "prompts" / "video" / "train.txt", "A cat walks on the grass\n")
    # as many eval prompts as the wan presets' eval.num_prompts (8)
    _touch(root / "prompts" / "video" / "test.txt", "".join(f"A dog runs on beach number {i}\n" for i in range(8)))
    text = (root / "params.yaml").read_text().replace("  source: prompts/toy.jsonl", "  source: prompts/video")
    (root / "params.yaml").write_text(text)


def test_missing_paths_are_listed_one_a_line_and_the_plan_is_still_printed(checkout, capsys):
    code = preflight.main(["--preset", "wan1_3b", "--params", str(checkout / "params.yaml")])
    out, err = capsys.readouterr()
    problems = [line.removeprefix("problem: ") for line in err.splitlines() if line.startswith("problem: ")]
    assert code == 2 and err.splitlines()[-1] == f"preflight: {len(problems)} problem(s)"
    for expected in ("model.path models/Wan2.1-T2V-1.3B-Diffusers: no such folder",
                     "reward.options.hpsv3.path: models/HPSv3/HPSv3.safetensors does not exist",
                     "reward.options.hpsv3.base_path: models/Qwen2-VL-7B-Instruct does not exist",
                     "data.source 'prompts/toy.jsonl' does not exist",
                     "preset wan1_3b runs Wan 2.1 on GPUs, but the device resolves to cpu (model.device auto, 0 GPU"):
        assert sum(problem.startswith(expected) for problem in problems) == 1, problems
    assert "memory per GPU (estimate): rollout" in out and "32,760 tokens a video" in out
    assert "48 prompts x 8 = 384 videos an iteration" in out and "2 optimizer step(s) of 192 videos" in out


def test_a_complete_folder_layout_passes_the_path_checks(checkout, monkeypatch, capsys):
    _complete_layout(checkout)
    monkeypatch.setattr(preflight, "visible_gpus", lambda: (1, 141e9))
    monkeypatch.setattr(preflight, "free_disk", lambda project, root: (project, 10**13))
    params = load_params(checkout / "params.yaml", preset="wan1_3b")
    assert preflight.preflight(params, checkout).problems == []  # memory and disk within the card's and the disk's
    assert preflight.main(["--preset", "wan1_3b", "--params", str(checkout / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert "from models/Wan2.1-T2V-1.3B-Diffusers/transformer/config.json" in out and "preflight: ready" in out
    (checkout / "models" / "Wan2.1-T2V-1.3B-Diffusers" / "vae" / "config.json").unlink()
    (checkout / "prompts" / "video" / "train.txt").unlink()
    problems = preflight.preflight(params, checkout).problems
    assert problems[0] == "model.path models/Wan2.1-T2V-1.3B-Diffusers: missing vae/config.json"
    assert len(problems) == 2 and "prompts/video" in problems[1] and "train" in problems[1]


def test_gpus_memory_and_disk_are_checked_against_the_run(checkout, monkeypatch):
    _complete_layout(checkout, "Wan2.1-T2V-14B-Diffusers", "wan14b")
    params = load_params(checkout / "params.yaml", preset="wan14b")
    monkeypatch.setenv(preflight.NPROC_ENV, "8")
    monkeypatch.setattr(preflight, "visible_gpus", lambda: (2, 80e9))
    monkeypatch.setattr(preflight, "free_disk", lambda project, root: (project, 10**9))
    problems = preflight.preflight(params, checkout).problems
    assert problems[0] == "FLASH_GRPO_NPROC_PER_NODE=8 processes per node, but 2 GPU(s) visible"
    assert problems[1].startswith("estimated peak memory") and "exceeds the card's 74.5 GiB" in problems[1]
    assert problems[2].startswith("free disk 1.0 GB under runs is less than")


def test_a_cpu_preset_passes_without_gpus_and_a_bad_world_size_is_named(checkout, monkeypatch):
    shutil.copytree(ROOT / "prompts", checkout / "prompts")
    params = load_params(checkout / "params.yaml", preset="tiny")
    report = preflight.require(params, checkout)
    assert report.plan[0].startswith("world: 1 process(es)") and "on cpu" in report.plan[0]
    monkeypatch.setenv(preflight.NNODES_ENV, "two")
    with pytest.raises(preflight.PreflightError, match="FLASH_GRPO_NNODES='two': expected a whole number"):
        preflight.require(params, checkout)


def test_a_preset_level_prompt_source_is_the_one_checked(checkout):
    shutil.copytree(ROOT / "prompts", checkout / "prompts")
    text = (checkout / "params.yaml").read_text()
    text = text.replace("  tiny:\n", "  tiny:\n    data:\n      source: prompts/example.txt\n")
    (checkout / "params.yaml").write_text(text)
    params = load_params(checkout / "params.yaml", preset="tiny")
    assert params.data.source == "prompts/example.txt"
    assert preflight.preflight(params, checkout).problems == []  # curate reads the effective source
    (checkout / "prompts" / "example.txt").unlink()
    assert preflight.preflight(params, checkout).problems[0].startswith("data.source 'prompts/example.txt' does not exist")


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the handler's protocol
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args):
        pass


def test_the_reward_server_must_answer_its_health_check(checkout):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        params = load_params(checkout / "params.yaml", preset="tiny", overrides={
            "reward.weights": {"remote": 1.0}, "reward.options": {"remote": {"url": url, "name": "hpsv3"}}})
        assert preflight.check_reward_server(params) == []
    finally:
        server.shutdown()
        server.server_close()
    problems = preflight.check_reward_server(params, timeout=2.0)  # nobody listens there any more
    assert len(problems) == 1 and problems[0].startswith(f"reward server {url}: unreachable within 2 s")


def test_parameter_counts_match_the_released_models():
    # the built WanTransformer3DModels count 1.419 B and 14.288 B (tests/test_models.py)
    counts = {name: plan.Arch.from_config(config).parameters() / 1e9
              for name, config in WAN_TRANSFORMER_CONFIGS.items()}
    assert counts["wan1_3b"] == pytest.approx(1.419, abs=5e-4) and counts["wan14b"] == pytest.approx(14.288, abs=5e-4)
    # LoRA r16 on the attention projections at 14B: 40 blocks x 8 layers x 16 x (5120 + 5120) = 52.4 M,
    # a 0.84 GB checkpoint at 16 B each (docs/distributed.md, "Storage plan")
    params = load_params(ROOT / "params.yaml", preset="wan14b")
    arch = plan.Arch.from_config(WAN_TRANSFORMER_CONFIGS["wan14b"])
    assert plan.trained_parameters(params, arch) == 40 * 8 * 16 * 10240
    assert plan.disk_bytes(params, arch)["checkpoint"] / 1e9 == pytest.approx(0.84, abs=0.005)


@pytest.mark.parametrize("name, single, pair", [("wan1_3b", 11.6, 20.4), ("wan14b", 55.1, 83.3)])
def test_memory_estimate_reproduces_the_measured_peaks(name, single, pair):
    """docs/decisions.md, "Preflight": at 480x832x81, LoRA r16 on attention and FFN, checkpointing,
    no optimizer state, the H200 peaks of one branch (which fitted the model) and of a CFG pair."""
    params = load_params(ROOT / "params.yaml", preset=name, overrides={
        "model.lora_targets": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]})
    arch = plan.Arch.from_config(WAN_TRANSFORMER_CONFIGS[name])
    base = 2 * arch.parameters() + 8 * plan.trained_parameters(params, arch)  # bf16 base, fp32 adapters + grads
    activations = plan.activation_bytes(arch, plan.tokens(arch, params.rollout), params.model)
    assert (base + activations) / GIB == pytest.approx(single, rel=0.01)
    assert (base + 2 * activations) / GIB == pytest.approx(pair, rel=0.01)


def test_wan1_3b_preset_memory_is_in_the_documented_range():
    # docs/decisions.md, "Preflight": the wan1_3b update (LoRA on attention, a CFG pair, AdamW and EMA
    # states) within 1 GiB of the measured 20.4 GiB of a pair (adapters on attention and FFN, no
    # optimizer); the 14B one at docs/distributed.md's ~83 GiB on one H200 (not an 80 GB card)
    small = load_params(ROOT / "params.yaml", preset="wan1_3b")
    arch = plan.Arch.from_config(WAN_TRANSFORMER_CONFIGS["wan1_3b"])
    assert plan.tokens(arch, small.rollout) == 32_760
    assert plan.memory_bytes(small, arch, world=8)["update"] / GIB == pytest.approx(20.4, abs=1.0)
    large = load_params(ROOT / "params.yaml", preset="wan14b")
    update = plan.memory_bytes(large, plan.Arch.from_config(WAN_TRANSFORMER_CONFIGS["wan14b"]), world=1)["update"]
    assert 80e9 < update < 141e9 and update / GIB == pytest.approx(83, abs=2)


def test_iteration_time_and_disk_scale_with_the_run():
    params = load_params(ROOT / "params.yaml", preset="wan1_3b")
    arch = plan.Arch.from_config(WAN_TRANSFORMER_CONFIGS["wan1_3b"])
    rollout, update, source = plan.iteration_seconds(params, arch, world=8)
    # 384 videos x 20 steps x 2 (CFG) x 0.61 s / 8 GPUs; 384 items x 2 x 2.63 s / 8
    assert rollout == pytest.approx(384 * 20 * 2 * 0.61 / 8) and update == pytest.approx(384 * 2 * 2.63 / 8)
    assert "wan1_3b: 0.61 s / 2.63 s" in source
    # a shard holds two float32 latents (16x21x60x104) and the uint8 video (81x480x832x3) per sample
    assert plan.shard_bytes(params) == 384 * (2 * 16 * 21 * 60 * 104 * 4 + 81 * 480 * 832 * 3)
    assert [plan.kept_checkpoints(10, every) for every in (0, 1, 3, 4)] == [11, 11, 5, 4]
    baseline = load_params(ROOT / "params.yaml", preset="wan1_3b_flowgrpo")
    assert plan.trained_steps(baseline) == 19 and plan.tokens(arch, baseline.rollout) == 9 * 15 * 26


def test_a_gpu_step_record_replaces_the_notes_step_costs(tmp_path):
    # bench/costs/gpu_step.py's record: 20 CFG steps = 40 forwards of a video, one CFG pair's forward+backward
    # per item, at latents 16x5x30x52 (5 x 15 x 26 = 1,950 tokens)
    record = {"guidance": 4.5, "latent_shape": [16, 5, 30, 52], "update": {"raw_s_per_item": 1.0},
              "rollout": {"raw_s_per_video": 8.0, "raw_forward_passes_per_video": 40}}
    _touch(tmp_path / "bench" / "results" / "gpu_step-wan1_3b-cuda.json", json.dumps(record))
    arch = plan.Arch.from_config(WAN_TRANSFORMER_CONFIGS["wan1_3b"])
    forward, backward, source = plan.step_seconds(arch, 3_900, tmp_path)
    assert (forward, backward) == pytest.approx((0.2 * 2, 0.5 * 2)) and "gpu_step-wan1_3b-cuda.json" in source
    forward, backward, source = plan.step_seconds(arch, 3_900, tmp_path / "elsewhere")  # no record: the notes'
    assert forward == pytest.approx(0.61 * 3_900 / 32_760) and "the project's notes" in source


def test_the_preflight_imports_no_torch():
    code = ("import sys; from flash_grpo_core.pipeline import preflight; preflight.main(['--preset', 'wan1_3b']); "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, check=False).returncode == 0


def test_a_prompt_source_that_curation_would_empty_is_a_problem(checkout):
    (checkout / "prompts").mkdir(exist_ok=True)
    (checkout / "prompts" / "short.txt").write_text("red\nblue\n")  # below data.min_words: nothing survives
    text = (checkout / "params.yaml").read_text().replace("  source: prompts/toy.jsonl", "  source: prompts/short.txt")
    (checkout / "params.yaml").write_text(text)
    problems = preflight.preflight(load_params(checkout / "params.yaml", preset="tiny"), checkout).problems
    assert [p for p in problems if p.startswith("no train prompts left (prompts/short.txt: 2 prompts in")], problems
