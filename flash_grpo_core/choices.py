"""The named choices of the method, in one torch-free place shared by the math and the config."""

SCHEDULE_KINDS = ("authors", "diffusers")
NOISE_KINDS = ("wan", "flow_grpo", "dance")
RECTIFY_MODES = ("exact", "none", "flow_grpo")
TRAIN_MODES = ("flash", "window", "full")
STD_SCOPES = ("batch", "group")
FINETUNE_KINDS = ("lora", "full")
PRESETS = ("tiny", "wan1_3b", "wan14b", "toy")  # toy: the pixel-space alignment benchmark
