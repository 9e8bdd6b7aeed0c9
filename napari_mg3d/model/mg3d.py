"""The MG-3D model (encoders, projections, fusion, pooling) and its pre-training module."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import losses as L
from .config import ALL_OBJECTIVES, MG3DConfig
from .fusion import FusionStack, ModalityDominantCrossAttention, SelfAttentionPooling
from .text import FrozenTextEncoder, TextBatch, whole_word_mask
from .vision import SwinVisionEncoder

log = logging.getLogger(__name__)

# Two sentences whose frozen text features are this close are the same finding said the same way (templates
# such as "No pleural effusion."): the other patient's volume is not a negative for it in "sva".
SAME_SENTENCE_COSINE = 0.98


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
    """features: the 5 Swin feature maps; tokens (B, N, d) fused-width tokens on the 1/16 grid."""

    features: list[torch.Tensor]
    tokens: torch.Tensor
    grid: tuple[int, int, int]

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


class MG3DModel(nn.Module):
    """Everything inference needs: Swin encoder, frozen text encoder, projections, fusion, pooling."""

    def __init__(self, config: MG3DConfig, text_encoder: FrozenTextEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        d = config.fusion_dim
        self.vision = SwinVisionEncoder(config)
        self.text = text_encoder if text_encoder is not None else FrozenTextEncoder(config.text_encoder)
        c16, c32 = self.vision.channels[3], self.vision.channels[4]
        self.proj16 = nn.Conv3d(c16, d, kernel_size=1)
        self.proj32 = nn.Conv3d(c32, d, kernel_size=1)
        self.pos_embed = nn.Parameter(torch.zeros(1, d, *config.token_grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.token_norm = nn.LayerNorm(d)
        self.text_proj = nn.Sequential(nn.Linear(self.text.hidden_size, d), nn.LayerNorm(d))
        # Zero at initialisation: a model starts out reading negated sentences exactly as without the flag.
        self.negation_embedding = nn.Parameter(torch.zeros(self.text.hidden_size)) if config.negation_flag else None
        self.volume_fusion = FusionStack(d, config.fusion_heads, config.fusion_layers)
        self.text_fusion = FusionStack(d, config.fusion_heads, config.fusion_layers)
        self.sentence_attention = ModalityDominantCrossAttention(d, config.fusion_heads)
        self.pool_text = SelfAttentionPooling(d)
        self.pool_fused_text = SelfAttentionPooling(d)
        self.pool_sentence_visual = SelfAttentionPooling(d)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str = "cpu") -> MG3DModel:
        """Load the model of a bundle directory or .zip written by ``save_pretrained``/training."""
        from ..checkpoint import load_bundle

        return load_bundle(name_or_path, device=device).model

    def save_pretrained(self, path: str, **kwargs) -> None:
        """Write this model as a bundle (see napari_mg3d.checkpoint.save_bundle for options)."""
        from ..checkpoint import save_bundle

        save_bundle(path, self, **kwargs)

    def trainable_named_parameters(self):
        """Parameters an optimiser may touch: everything but the frozen text encoder."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("text.")]

    def encode_volume(self, volume: torch.Tensor, voxel_mask: torch.Tensor | None = None) -> VolumeEncoding:
        """(B, 1, Z, Y, X) in [0, 1] -> Swin features and (B, N, d) tokens on the 1/16 grid."""
        feats = self.vision(volume, voxel_mask)
        f16 = self.proj16(feats[3])
        f32 = F.interpolate(self.proj32(feats[4]), size=f16.shape[2:], mode="trilinear", align_corners=False)
        grid = tuple(f16.shape[2:])
        pos = self.pos_embed
        if tuple(pos.shape[2:]) != grid:
            pos = F.interpolate(pos, size=grid, mode="trilinear", align_corners=False)
        tokens = (f16 + f32 + pos).flatten(2).transpose(1, 2)
        return VolumeEncoding(feats, self.token_norm(tokens), grid)  # type: ignore[arg-type]

    def encode_text(self, batch: TextBatch, input_ids: torch.Tensor | None = None) -> TextEncoding:
        """Word features of the whole report (frozen encoder, then projection) and F_S per sentence."""
        words = self.text_proj(self.text(batch, input_ids))
        member = sentence_membership(batch.word_sentence, batch.sentence_valid.shape[1])
        sentences = torch.einsum("bsw,bwd->bsd", member.to(words.dtype), words)
        sentences = sentences / member.sum(-1, keepdim=True).clamp_min(1).to(words.dtype)
        return TextEncoding(words, batch.attention_mask.bool(), sentences, batch.sentence_valid)

    def encode_sentences_separately(self, batch: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw frozen features (B, S, H), projected features (B, S, d)) of each sentence encoded alone.

        With ``config.negation_flag`` the projected feature of a negated sentence is taken from its frozen
        feature plus the learned negation vector; the raw features stay those of the frozen encoder."""
        raw = self.text.separate_sentence_features(batch)
        return raw, self.project_sentences(raw, batch.sentence_negated)

    def project_sentences(self, raw: torch.Tensor, negated: torch.Tensor) -> torch.Tensor:
        """Frozen sentence features (..., H) -> (..., d); ``negated`` (...) bool marks negated sentences."""
        if self.negation_embedding is None:
            return self.text_proj(raw)
        flag = negated.to(raw.dtype)[..., None]
        return self.text_proj(raw + flag * self.negation_embedding.to(raw.dtype))

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

    def sentence_volume_similarity(self, tokens: torch.Tensor, sentences: torch.Tensor,
                                   negated: torch.Tensor | None = None) -> torch.Tensor:
        """(Q, V): cosine between each sentence (Q, d) and its attention read-out over volume v's tokens
        (V, N, d) — how well volume v shows what the sentence says (the "sva" objective's score).

        With ``config.negation_flag``, a sentence marked in ``negated`` (Q,) bool scores minus that cosine:
        "No pleural effusion." fits a volume as much as what it is about (the read-out, which attends where
        an effusion would be) is *not* shown. Without it the frozen encoder's near-identical features for a
        finding and its denial would have to score opposite volumes with nearly the same query."""
        read, _ = self.sentence_visual(tokens, sentences[None].expand(tokens.shape[0], -1, -1),
                                       torch.ones(tokens.shape[0], sentences.shape[0], dtype=torch.bool,
                                                  device=tokens.device))
        similarity = F.cosine_similarity(read.float(), sentences[None].float(), dim=-1, eps=1e-6).t()
        if negated is None or self.negation_embedding is None:
            return similarity
        return torch.where(negated.to(similarity.device)[:, None], -similarity, similarity)

    def sentence_heatmaps(self, encoding: VolumeEncoding, sentences: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, S, gz, gy, gx) attention of each sentence over the 1/16 token grid; each map sums to 1."""
        _, attention = self.sentence_visual(encoding.tokens, sentences, valid, return_attention=True)
        return attention.reshape(attention.shape[0], attention.shape[1], *encoding.grid)


class MIMDecoder(nn.Module):
    """Conv + upsampling decoder: fused tokens on the 1/16 grid -> (B, 1, Z, Y, X) reconstruction.

    Two conv/upsampling stages reach the 1/4 grid; a 1x1 conv then predicts the 4x4x4 voxels under each
    position (voxel shuffle). Full-resolution convolutions would cost ~10x more for the same loss.
    """

    def __init__(self, dim: int, stages: int = 2, shuffle: int = 4) -> None:
        super().__init__()
        blocks, c = [], dim
        for _ in range(stages):
            out = max(c // 2, 16)
            blocks += [nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                       nn.Conv3d(c, out, 3, padding=1), nn.InstanceNorm3d(out, affine=True), nn.GELU()]
            c = out
        blocks.append(nn.Conv3d(c, shuffle ** 3, 1))
        self.net = nn.Sequential(*blocks)
        self.shuffle = shuffle

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        B, N, d = tokens.shape
        x = self.net(tokens.transpose(1, 2).reshape(B, d, *grid))
        r = self.shuffle
        _, _, z, y, w = x.shape
        x = x.view(B, r, r, r, z, y, w).permute(0, 4, 1, 5, 2, 6, 3)
        return x.reshape(B, 1, z * r, y * r, w * r)


class MLMHead(nn.Module):
    """MLP predicting the vocabulary id of each (masked) word, (B, W, d) -> (B, W, V)."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Linear(dim, vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def random_block_mask(
    batch: int, size: tuple[int, int, int], block: int, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, 1, Z, Y, X) float mask of cubic sub-volumes (side ``block``), ``ratio`` of them hidden (1)."""
    grid = [s // block for s in size]
    n = grid[0] * grid[1] * grid[2]
    n_mask = max(1, min(n - 1, round(ratio * n)))
    scores = torch.rand(batch, n, generator=generator)
    order = scores.argsort(dim=1)
    blocks = torch.zeros(batch, n)
    blocks.scatter_(1, order[:, :n_mask], 1.0)
    blocks = blocks.view(batch, 1, *grid)
    for axis in range(3):
        blocks = blocks.repeat_interleave(block, dim=2 + axis)
    return blocks


LossGather = Callable[[torch.Tensor], torch.Tensor]


def _reports_containing(sentences: torch.Tensor, reports: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(Q, B) True where report b has a valid sentence with the same text as sentence q: unit frozen
    features, sentences (Q, H) and reports (B, S, H), cosine > SAME_SENTENCE_COSINE; valid (B, S)."""
    same = torch.einsum("qd,bsd->qbs", sentences, reports) > SAME_SENTENCE_COSINE
    return (same & valid[None]).any(-1)


class SentenceMemory(nn.Module):
    """First-in first-out memory of earlier reports' affirmed sentences for "sva" (``config.sva_memory``).

    It keeps the *frozen* text encoder's sentence features (M, H). The trainable projection and read-out are
    applied afresh at every step, so, unlike a memory of volume features, the remembered negatives are never
    stale. Buffers, so a checkpoint carries the memory and a resumed run sees the same one.
    """

    def __init__(self, size: int, hidden: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("raw", torch.zeros(size, hidden))
        self.register_buffer("written", torch.zeros((), dtype=torch.long))

    @property
    def filled(self) -> int:
        return min(int(self.written), self.size)

    def read(self) -> torch.Tensor:
        """A copy (the caller's graph must not see the next ``write``) of the filled rows, oldest first."""
        n, start = self.filled, int(self.written) % self.size
        order = (torch.arange(n, device=self.raw.device) + (start if n == self.size else 0)) % self.size
        return self.raw[order].clone()

    @torch.no_grad()
    def write(self, raw: torch.Tensor) -> None:
        """Remember sentences, raw frozen features (K, H), skipping any whose text is already remembered
        (cosine > SAME_SENTENCE_COSINE): template sentences recur in many reports, and repeats would crowd
        out everything else."""
        if raw.shape[-1] != self.raw.shape[-1]:
            raise InputError(f"the sentence memory holds features of width {self.raw.shape[-1]}, got "
                             f"{raw.shape[-1]}; the text encoder must not change during a run")
        known = F.normalize(self.read().float(), dim=-1)
        for feature in raw.detach().float():
            unit = F.normalize(feature, dim=-1)
            if known.shape[0] and bool((known @ unit > SAME_SENTENCE_COSINE).any()):
                continue
            self.raw[int(self.written) % self.size] = feature.to(self.raw.dtype)
            self.written += 1
            known = torch.cat([known, unit[None]])


class MG3DPretrainer(nn.Module):
    """MG-3D pre-training: the model plus the MIM decoder and MLM head; forward returns every loss.

    ``gather`` (optional) collects features from all devices for the contrastive losses; it must return
    the local rows first. ``gather_rows`` (optional) collects the sentences every device adds to the sva
    sentence memory, in the same order on every device, so that the devices' memories stay equal.
    Objectives not in ``config.objectives`` are skipped (and not computed).
    """

    def __init__(self, model: MG3DModel, gather: LossGather | None = None,
                 gather_rows: LossGather | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.mim_decoder = MIMDecoder(self.config.fusion_dim)
        self.mlm_head = MLMHead(self.config.fusion_dim, model.text.vocab_size)
        self.gather = gather
        self.gather_rows = gather_rows
        self.sva_memory: SentenceMemory | None = None
        if self.config.sva_memory > 0:
            self.sva_memory = SentenceMemory(self.config.sva_memory, model.text.hidden_size)

    def trainable_named_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("model.text.")]

    def _nce(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if self.gather is not None:
            keys = self.gather(keys)
        return L.info_nce(queries, keys, self.config.temperature)

    def forward(self, volume: torch.Tensor, text: TextBatch, generator: torch.Generator | None = None) -> dict:
        cfg = self.config
        check_volume(volume, cfg)
        if text.batch_size != volume.shape[0]:
            raise InputError(f"{volume.shape[0]} volumes but {text.batch_size} reports; they must pair up")
        on = set(cfg.objectives)
        m = self.model
        zero = volume.new_zeros(())
        out: dict[str, torch.Tensor] = {k: zero for k in ALL_OBJECTIVES}

        full = m.encode_volume(volume)
        global_visual = full.global_feature
        txt = m.encode_text(text)

        if "mim" in on:
            vmask = random_block_mask(volume.shape[0], tuple(volume.shape[2:]), cfg.mim_patch, cfg.mim_ratio,
                                      generator).to(volume.device, volume.dtype)
            masked = m.encode_volume(volume, vmask)
            fused, _ = m.volume_fusion(masked.tokens, txt.sentences, None, txt.sentence_valid)
            out["mim"] = L.mim_loss(self.mim_decoder(fused, masked.grid), volume, vmask)

        if on & {"mlm", "sfr"}:
            wmask = whole_word_mask(text, cfg.mlm_ratio, generator)
            masked_ids = text.input_ids.masked_fill(wmask, m.text.mask_token_id)
            masked_txt = m.encode_text(text, masked_ids)
            fused_words, _ = m.text_fusion(masked_txt.words, full.tokens, masked_txt.word_mask, None)
            if "mlm" in on:
                out["mlm"] = L.mlm_loss(self.mlm_head(fused_words), text.input_ids, wmask)
            if "sfr" in on:
                member = sentence_membership(text.word_sentence, text.sentence_valid.shape[1])
                rec = torch.einsum("bsw,bwd->bsd", member.to(fused_words.dtype), fused_words)
                rec = rec / member.sum(-1, keepdim=True).clamp_min(1).to(rec.dtype)
                # Target is a stop-gradient copy: the reconstruction moves towards F_S, not the reverse.
                out["sfr"] = L.sfr_loss(txt.sentences.detach(), rec, txt.sentence_valid)

        if "cml" in on:
            fused_vol, _ = m.volume_fusion(full.tokens, txt.sentences, None, txt.sentence_valid)
            fused_txt, _ = m.text_fusion(txt.words, full.tokens, txt.word_mask, None)
            h_image = fused_vol.mean(dim=1)
            h_text = m.pool_fused_text(fused_txt, txt.word_mask)
            out["cml"] = self._nce(h_image, global_visual) + self._nce(h_text, m.global_text(txt))

        if on & {"ssm", "dfa", "sva"}:
            raw_sent, sent = m.encode_sentences_separately(text)
        if "sva" in on:
            out["sva"] = self._sva(full.tokens, raw_sent, sent, text.sentence_valid, text.sentence_negated)
        if on & {"ssm", "dfa"}:
            h_sent, _ = m.sentence_visual(full.tokens, sent, text.sentence_valid)
            if "ssm" in on:
                out["ssm"] = L.ssm_loss(raw_sent, h_sent, text.sentence_valid)
            if "dfa" in on:
                pooled = m.pool_sentence_visual(h_sent, text.sentence_valid)
                out["dfa"] = self._nce(global_visual, pooled)

        out["total"] = (cfg.lambda_alpha * (out["mim"] + out["mlm"])
                        + cfg.lambda_beta * (out["sfr"] + out["cml"])
                        + cfg.lambda_gamma * (out["ssm"] + out["dfa"])
                        + cfg.lambda_sva * out["sva"])
        return out

    def _sva(self, tokens: torch.Tensor, raw: torch.Tensor, sent: torch.Tensor, valid: torch.Tensor,
             negated: torch.Tensor) -> torch.Tensor:
        """Every valid sentence (with ``sva_affirmed_only``: every one without a negation cue) against every
        volume of the local batch (negatives are not gathered). With ``sva_memory``, also the other
        direction: each volume picks its own sentences from the batch's and the memory's affirmed sentences;
        in training mode the batch's affirmed sentences are then remembered."""
        queries = valid & ~negated if self.config.sva_affirmed_only else valid
        owner = torch.nonzero(queries)[:, 0]
        similarity = self.model.sentence_volume_similarity(tokens, sent[queries], negated[queries])
        raw_n = F.normalize(raw.float(), dim=-1)
        shared = _reports_containing(raw_n[queries], raw_n, valid)
        loss = L.sva_loss(similarity, owner, shared, self.config.temperature)
        if self.sva_memory is None:
            return loss
        loss = loss + self._sva_sentences(tokens, raw_n, valid, similarity, owner, raw_n[queries],
                                          ~negated[queries])
        if self.training:
            new = raw[valid & ~negated]
            self.sva_memory.write(self.gather_rows(new) if self.gather_rows is not None else new)
        return loss

    def _sva_sentences(self, tokens: torch.Tensor, raw_n: torch.Tensor, valid: torch.Tensor,
                       similarity: torch.Tensor, owner: torch.Tensor, query_raw: torch.Tensor,
                       affirmed: torch.Tensor) -> torch.Tensor:
        """Volume -> sentence: each query sentence's score on its own volume against that volume's scores of
        the candidates, the other reports' affirmed query sentences and the remembered ones, leaving out
        those whose text the volume's own report contains. ``similarity`` (Q, B), ``owner`` (Q,),
        ``query_raw`` (Q, H) unit frozen features and ``affirmed`` (Q,) describe the batch's queries."""
        m = self.model
        remembered = self.sva_memory.read().to(tokens.device)
        no_cue = torch.zeros(remembered.shape[0], dtype=torch.bool, device=tokens.device)
        sent = m.project_sentences(remembered.to(tokens.dtype), no_cue)
        candidates = torch.cat([similarity[affirmed], m.sentence_volume_similarity(tokens, sent, no_cue)])
        candidate_owner = torch.cat([owner[affirmed], owner.new_full((remembered.shape[0],), -1)])
        candidate_raw = torch.cat([query_raw[affirmed], F.normalize(remembered.float(), dim=-1)])
        in_report = _reports_containing(candidate_raw, raw_n, valid)
        allowed = (candidate_owner[None] != owner[:, None]) & ~in_report[:, owner].t()
        positive = similarity[torch.arange(owner.shape[0], device=owner.device), owner]
        return L.sentence_choice_loss(positive, candidates[:, owner].t(), allowed, self.config.temperature)
