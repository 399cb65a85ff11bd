"""The named choices of the method, in one torch-free place shared by the math and the config."""

SCHEDULE_KINDS = ("authors", "diffusers")
NOISE_KINDS = ("wan", "flow_grpo", "dance")
RECTIFY_MODES = ("exact", "none", "flow_grpo")
# train.rectify: `auto` (the default) is resolved per train.mode when params load (config/loading.py):
# TGR for flash, none for the baselines, as Flow-GRPO and MixGRPO publish them; an explicit mode wins.
RECTIFY_BY_MODE = {"flash": "exact", "window": "none", "window_k": "none", "full": "none"}
# window: MixGRPO's sliding window over steps 0..N-2; window_k: a window inside flash's first K steps
TRAIN_MODES = ("flash", "window", "window_k", "full")
STD_SCOPES = ("batch", "group")
FINETUNE_KINDS = ("lora", "full")
LORA_INITS = ("gaussian", "default")  # peft's init_lora_weights: "gaussian", or True (kaiming-uniform A)
LORA_COMPUTES = ("input", "float32")  # the adapters' products: in the layer input's dtype, or in float32
# The authors' LoRA targets: q, k, v and output projections of self- (attn1) and cross-attention
# (attn2) in diffusers' Wan naming, matched by peft as module-name suffixes; no FFN.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# toy: the pixel-space alignment benchmark; wan1_3b_flowgrpo: the Flow-GRPO baseline on Wan 2.1 1.3B.
# No dots in names: DVC splits its parameter paths (`presets.<name>`) on them.
PRESETS = ("tiny", "wan1_3b", "wan1_3b_flowgrpo", "wan14b", "toy")
PARALLEL_STRATEGIES = ("auto", "ddp", "fsdp")  # data parallelism of the update on several ranks
OPTIMIZER_STATES = ("checkpoint", "beside")  # where a checkpoint's AdamW moments are stored
# Every reward the registry holds (flash_grpo_core/rewards, and the toy task's), so that the config
# can refuse an unknown name before any stage loads a model; tests/test_config.py keeps it in step.
REWARD_NAMES = ("brightness", "brisque", "clip_score", "color_match", "colorfulness", "hpsv2", "hpsv3",
                "motion_magnitude", "ocr", "pickscore", "remote", "sharpness", "temporal_consistency",
                "toy_following", "videoalign")
# Paths that dvc.yaml puts into a stage's command line, which DVC runs through a shell.
SAFE_PATH = r"[A-Za-z0-9_][A-Za-z0-9_./-]*"
