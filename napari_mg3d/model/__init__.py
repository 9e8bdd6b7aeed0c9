"""MG-3D model core: config, encoders, fusion, objectives. No napari or Qt imports."""

from .config import (
    ALL_OBJECTIVES,
    OBJECTIVES,
    PRESETS,
    ConfigError,
    MG3DConfig,
    build_model_config,
    preset_config,
)
from .mg3d import InputError, MG3DModel, VolumeEncoding, check_volume
from .pretraining import MG3DPretrainer
from .text import FrozenTextEncoder, TextBatch, TextEncoderUnavailable, tokenize_reports

__all__ = [
    "ALL_OBJECTIVES", "OBJECTIVES", "PRESETS", "ConfigError", "MG3DConfig", "build_model_config", "preset_config", "InputError", "MG3DModel",
    "MG3DPretrainer", "VolumeEncoding", "check_volume", "FrozenTextEncoder", "TextBatch",
    "TextEncoderUnavailable", "tokenize_reports",
]
