"""The typed configuration: `schema` (the tree and its defaults), `loading` (files, overrides,
one error listing every problem) and `rules` (what must hold across keys).

Everything else imports from here (`from eopd_ray.config import Config, load_config`), not from
the modules below, so the split between them stays an internal matter.
"""

from eopd_ray.config.loading import config_from_dict, config_to_dict, config_to_yaml, load_config
from eopd_ray.config.schema import (
    PAPER_SUFFIX,
    Config,
    DataConfig,
    EvalConfig,
    LearnerConfig,
    LossConfig,
    ModelConfig,
    RolloutConfig,
    RunConfig,
    SyncConfig,
    TeacherConfig,
    total_updates,
)
from eopd_ray.errors import ConfigError

__all__ = [
    "PAPER_SUFFIX",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LearnerConfig",
    "LossConfig",
    "ModelConfig",
    "RolloutConfig",
    "RunConfig",
    "SyncConfig",
    "TeacherConfig",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "total_updates",
]
