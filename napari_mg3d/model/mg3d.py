"""The MG-3D model that inference needs: encoders, projections, fusion, pooling (objectives: ``pretraining``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import MG3DConfig
from .fusion import FusionStack, ModalityDominantCrossAttention, SelfAttentionPooling
from .text import FrozenTextEncoder, TextBatch
from .vision import SwinVisionEncoder


class InputError(ValueError):
    """Input the model cannot take; the message names the value and what is expected."""


def check_volume(volume: torch.Tensor, config: MG3DConfig) -> None:
    """Validate a model-space batch (B, 1, Z, Y, X), float, finite, sized for the encoder."""
    if not isinstance(volume, torch.Tensor):
        raise InputError(f"volume must be a torch.Tensor, got {type(volume).__name__}")
    if volume.dim() != 5 or volume.shape[1] != 1:
        raise InputError(
            f"volume must have shape (B, 1, Z, Y, X); got {tuple(volume.shape)}. "
            "Add batch and channel axes with volume[None, None] for a single (Z, Y, X) volume."
        )
    if not volume.is_floating_point():
        raise InputError(f"volume must be floating point (intensities in [0, 1]); got dtype {volume.dtype}")
    bad = [s for s in volume.shape[2:] if s % 32]
    if bad:
        raise InputError(
            f"spatial size {tuple(volume.shape[2:])} is not a multiple of 32 on every axis; preprocess the "
            f"volume to the preset's input size {config.input_size} (napari_mg3d.preprocess)"
        )
    if not torch.isfinite(volume).all():
        n = int((~torch.isfinite(volume)).sum())
        raise InputError(f"volume contains {n} NaN/inf voxels; replace them (e.g. with -1000 HU) before running")


@dataclass
class VolumeEncoding:
    """features: the 5 Swin feature maps; tokens (B, N, d) fused-width tokens on the 1/16 grid; volume: the
    model-space input (B, 1, Z, Y, X) they were encoded from (a head with its own encoder reads it)."""

    features: list[torch.Tensor]
    tokens: torch.Tensor
    grid: tuple[int, int, int]
    volume: torch.Tensor | None = None

    @property
    def global_feature(self) -> torch.Tensor:
        """F̄_I: mean-pooled volume tokens, (B, d)."""
        return self.tokens.mean(dim=1)


@dataclass
class TextEncoding:
    """words (B, W, d) projected word features; word_mask (B, W) real tokens; sentences (B, S, d) F_S
    (mean of each sentence's word features); sentence_valid (B, S)."""

    words: torch.Tensor
    word_mask: torch.Tensor
    sentences: torch.Tensor
    sentence_valid: torch.Tensor


def sentence_membership(word_sentence: torch.Tensor, n_sentences: int) -> torch.Tensor:
    """(B, W) sentence index per token -> (B, S, W) bool membership."""
    idx = torch.arange(n_sentences, device=word_sentence.device)
    return word_sentence[:, None, :] == idx[None, :, None]


VOLUME_PATH = ("vision", "proj16", "proj32", "pos_embed", "token_norm")  # what encode_volume uses


def _add_token_layers(module: nn.Module, config: MG3DConfig) -> None:
    """The layers after ``module.vision`` on the volume path: 1x1 projections of the 1/16 and 1/32 features
    to the fusion width, the position embedding of the token grid and the token norm."""
    d = config.fusion_dim
    module.proj16 = nn.Conv3d(module.vision.channels[3], d, kernel_size=1)
    module.proj32 = nn.Conv3d(module.vision.channels[4], d, kernel_size=1)
    module.pos_embed = nn.Parameter(torch.zeros(1, d, *config.token_grid))
    nn.init.trunc_normal_(module.pos_embed, std=0.02)
    module.token_norm = nn.LayerNorm(d)


def _encode_volume(parts: nn.Module, volume: torch.Tensor, voxel_mask: torch.Tensor | None) -> VolumeEncoding:
    """The volume path (``parts`` has the modules of VOLUME_PATH): Swin features, then the 1/16 and 1/32
    features projected to the fusion width, summed with the position embedding and normalised."""
    feats = parts.vision(volume, voxel_mask)
    f16 = parts.proj16(feats[3])
    f32 = F.interpolate(parts.proj32(feats[4]), size=f16.shape[2:], mode="trilinear", align_corners=False)
    grid = tuple(f16.shape[2:])
    pos = parts.pos_embed
    if tuple(pos.shape[2:]) != grid:
        pos = F.interpolate(pos, size=grid, mode="trilinear", align_corners=False)
    tokens = (f16 + f32 + pos).flatten(2).transpose(1, 2)
    return VolumeEncoding(feats, parts.token_norm(tokens), grid, volume)  # type: ignore[arg-type]


class VolumeEncoder(nn.Module):
    """The volume path of :class:`MG3DModel` on its own (Swin encoder, projections, position embedding, token
    norm): a task head's private copy, fine-tuned for that task alone, so that the shared encoder, and with it
    the heat maps, zero-shot scores and the other heads, keeps the features they were trained on (the paper
    fine-tunes one model per downstream task). About 0.6 M parameters with the tiny preset."""

    def __init__(self, config: MG3DConfig) -> None:
        super().__init__()
        self.vision = SwinVisionEncoder(config)
        _add_token_layers(self, config)

    @classmethod
    def copy_of(cls, model: MG3DModel) -> VolumeEncoder:
        """A copy of ``model``'s volume path (its weights, device and dtype) that trains on its own."""
        encoder = cls(model.config)
        encoder.load_state_dict({k: v for k, v in model.state_dict().items() if k.split(".")[0] in VOLUME_PATH})
        reference = model.proj16.weight
        return encoder.to(device=reference.device, dtype=reference.dtype)

    def forward(self, volume: torch.Tensor, voxel_mask: torch.Tensor | None = None) -> VolumeEncoding:
        return _encode_volume(self, volume, voxel_mask)


class MG3DModel(nn.Module):
    """Everything inference needs: Swin encoder, frozen text encoder, projections, fusion, pooling."""

    def __init__(self, config: MG3DConfig, text_encoder: FrozenTextEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        d = config.fusion_dim
        self.vision = SwinVisionEncoder(config)
        self.text = text_encoder if text_encoder is not None else FrozenTextEncoder(config.text_encoder)
        _add_token_layers(self, config)
        self.text_proj = nn.Sequential(nn.Linear(self.text.hidden_size, d), nn.LayerNorm(d))
        self.volume_fusion = FusionStack(d, config.fusion_heads, config.fusion_layers)
        self.text_fusion = FusionStack(d, config.fusion_heads, config.fusion_layers)
        self.sentence_attention = ModalityDominantCrossAttention(d, config.fusion_heads)
        self.pool_text = SelfAttentionPooling(d)
        self.pool_fused_text = SelfAttentionPooling(d)
        self.pool_sentence_visual = SelfAttentionPooling(d)

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters an optimiser may touch: everything but the frozen text encoder."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("text.")]

    def encode_volume(self, volume: torch.Tensor, voxel_mask: torch.Tensor | None = None) -> VolumeEncoding:
        """(B, 1, Z, Y, X) in [0, 1] -> Swin features and (B, N, d) tokens on the 1/16 grid."""
        return _encode_volume(self, volume, voxel_mask)

    def encode_text(self, batch: TextBatch, input_ids: torch.Tensor | None = None) -> TextEncoding:
        """Word features of the whole report (frozen encoder, then projection) and F_S per sentence."""
        words = self.text_proj(self.text(batch, input_ids))
        member = sentence_membership(batch.word_sentence, batch.sentence_valid.shape[1])
        sentences = torch.einsum("bsw,bwd->bsd", member.to(words.dtype), words)
        sentences = sentences / member.sum(-1, keepdim=True).clamp_min(1).to(words.dtype)
        return TextEncoding(words, batch.attention_mask.bool(), sentences, batch.sentence_valid)

    def encode_sentences_separately(self, batch: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw frozen features (B, S, H), projected features (B, S, d)) of each sentence encoded alone."""
        raw = self.text.separate_sentence_features(batch)
        return raw, self.text_proj(raw)

    def global_text(self, text: TextEncoding) -> torch.Tensor:
        """F̄_T: self-attention pooling over sentence features, (B, d)."""
        return self.pool_text(text.sentences, text.sentence_valid)

    def sentence_visual(
        self, tokens: torch.Tensor, sentences: torch.Tensor, valid: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """H_S (B, S, d): each sentence as a query over the patient's volume tokens (eq. 11), and the
        head-averaged attention (B, S, N) — the sentence-to-region heat map — when asked for."""
        out = self.sentence_attention(tokens, sentences, query_mask=valid, return_dominant=False,
                                      return_queries=True, return_attention=return_attention)
        attention = out.attention.mean(dim=1) if out.attention is not None else None
        return out.queries, attention

    def sentence_volume_similarity(self, tokens: torch.Tensor, sentences: torch.Tensor) -> torch.Tensor:
        """(Q, V): cosine between each sentence (Q, d) and its attention read-out over volume v's tokens
        (V, N, d) — how well volume v shows what the sentence says (the "sva" objective's score)."""
        read, _ = self.sentence_visual(tokens, sentences[None].expand(tokens.shape[0], -1, -1),
                                       torch.ones(tokens.shape[0], sentences.shape[0], dtype=torch.bool,
                                                  device=tokens.device))
        return F.cosine_similarity(read.float(), sentences[None].float(), dim=-1, eps=1e-6).t()

    def sentence_heatmaps(self, encoding: VolumeEncoding, sentences: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, S, gz, gy, gx) attention of each sentence over the 1/16 token grid; each map sums to 1."""
        _, attention = self.sentence_visual(encoding.tokens, sentences, valid, return_attention=True)
        return attention.reshape(attention.shape[0], attention.shape[1], *encoding.grid)
