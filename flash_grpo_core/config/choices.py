"""The named choices of params.yaml outside the method's math (those are in method/choices.py), torch-free."""

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
# Paths that dvc.yaml puts into a stage's command line, which DVC runs through a shell.
SAFE_PATH = r"[A-Za-z0-9_][A-Za-z0-9_./-]*"
# Where a reward's required model path comes from (`rewards.register`'s default hint).
MODEL_PATH_HINT = "a local path; or serve it with flash_grpo_core.rewards.server and weight `remote`"
