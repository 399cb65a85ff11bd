"""Typed, validated configuration: one frozen dataclass per `params.yaml` section, loaded in one place.

`params.yaml` holds the base sections, the selected `preset`, and under `presets:` the overrides
each preset applies on top of the base (sizes, model path, batch). `sections.py` defines the
sections and checks their values and combinations; `loading.py` reads the YAML, applies the preset
and overrides and builds them. What the rest of the project uses is importable from here. No
torch, so flows and CLIs validate parameters cheaply.
"""

from flash_grpo_core.config.loading import load_params, params_from_dict, read_yaml, to_dict
from flash_grpo_core.config.monitoring import HealthConfig, TrackingConfig
from flash_grpo_core.config.sections import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    Params,
    PipelineConfig,
    RewardConfig,
    RolloutConfig,
    ToyConfig,
    TrainConfig,
)

__all__ = ["ConfigError", "DataConfig", "EvalConfig", "ExportConfig", "HealthConfig", "ModelConfig", "Params",
           "PipelineConfig", "RewardConfig", "RolloutConfig", "ToyConfig", "TrackingConfig", "TrainConfig",
           "load_params", "params_from_dict", "read_yaml", "to_dict"]
