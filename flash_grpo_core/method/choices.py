"""The named variants of the method's math, torch-free so that the config can check them cheaply."""

SCHEDULE_KINDS = ("authors", "diffusers")
NOISE_KINDS = ("wan", "flow_grpo", "dance")
RECTIFY_MODES = ("exact", "none", "flow_grpo")
STD_SCOPES = ("batch", "group")
AWM_WEIGHTINGS = ("uniform", "t", "t**2")  # method/forward_process.py: awm_log_prob
