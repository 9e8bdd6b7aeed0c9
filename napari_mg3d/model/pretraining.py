"""MG-3D pre-training objectives (paper Sec. III.B-C): the MIM decoder, the MLM head, and the module whose
forward returns every loss. Inference needs none of this (``mg3d.MG3DModel``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import losses as L
from .config import ALL_OBJECTIVES
from .mg3d import InputError, MG3DModel, check_volume, sentence_membership
from .text import TextBatch, whole_word_mask

# Two sentences whose frozen text features are this close are the same finding said the same way (templates
# such as "No pleural effusion."): the other patient's volume is not a negative for it in "sva".
SAME_SENTENCE_COSINE = 0.98


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


class MG3DPretrainer(nn.Module):
    """MG-3D pre-training: the model plus the MIM decoder and MLM head; forward returns every loss.

    ``gather`` (optional) collects features from all devices for the contrastive losses; it must return
    the local rows first. Objectives not in ``config.objectives`` are skipped (and not computed).
    """

    def __init__(self, model: MG3DModel, gather: LossGather | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.mim_decoder = MIMDecoder(self.config.fusion_dim)
        self.mlm_head = MLMHead(self.config.fusion_dim, model.text.vocab_size)
        self.gather = gather

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
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
            # H̄_T as the paper pools it (eq. 8): over sentence-level features, each the mean of its fused words
            member = sentence_membership(text.word_sentence, text.sentence_valid.shape[1]).to(fused_txt.dtype)
            fused_sentences = torch.einsum("bsw,bwd->bsd", member, fused_txt) / member.sum(-1, keepdim=True).clamp_min(1)
            h_text = m.pool_fused_text(fused_sentences, txt.sentence_valid)
            out["cml"] = self._nce(h_image, global_visual) + self._nce(h_text, m.global_text(txt))

        if on & {"ssm", "dfa", "sva"}:
            raw_sent, sent = m.encode_sentences_separately(text)
        if "sva" in on:
            out["sva"] = self._sva(full.tokens, raw_sent, sent, text.sentence_valid)
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

    def _sva(self, tokens: torch.Tensor, raw: torch.Tensor, sent: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Every valid sentence against every volume of the local batch (negatives are not gathered); a volume
        whose report says the same sentence is not a negative for it."""
        owner = torch.nonzero(valid)[:, 0]
        similarity = self.model.sentence_volume_similarity(tokens, sent[valid])
        raw_n = F.normalize(raw.float(), dim=-1)
        shared = _reports_containing(raw_n[valid], raw_n, valid)
        return L.sva_loss(similarity, owner, shared, self.config.temperature)
