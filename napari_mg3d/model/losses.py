"""The MG-3D objectives as plain functions (paper eq. 2, 4, 6, 7-9, 12, 13)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over a batch, one direction: row i's positive is key i, negatives are the other keys.

    loss = mean_i -log( exp(q_i·k_i/τ) / Σ_j exp(q_i·k_j/τ) ), with q and k L2-normalised.
    queries (B, d), keys (B', d) with B' >= B (keys gathered from other devices come after the local ones
    only if the caller puts the local keys first). The paper sums over i; the mean keeps the scale
    independent of batch size.
    """
    q = F.normalize(queries.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    logits = q @ k.t() / temperature
    target = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, target)


def mim_loss(reconstruction: torch.Tensor, target: torch.Tensor, voxel_mask: torch.Tensor) -> torch.Tensor:
    """MSE over masked voxels only (eq. 2). All tensors (B, 1, Z, Y, X); voxel_mask 1 = was hidden."""
    m = voxel_mask.to(reconstruction.dtype)
    se = (reconstruction.float() - target.float()).pow(2) * m
    return se.sum() / m.sum().clamp_min(1.0)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the masked words (eq. 4). logits (B, W, V), labels (B, W) token ids, word_mask (B, W)."""
    if not word_mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[word_mask].float(), labels[word_mask])


def sfr_loss(sentence_features: torch.Tensor, reconstructed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mean over valid sentences of |cos(F_S, S_rec) - 1| (eq. 5-6). Inputs (B, S, d), valid (B, S)."""
    cos = F.cosine_similarity(sentence_features.float(), reconstructed.float(), dim=-1, eps=1e-6)
    gap = (cos - 1.0).abs()
    v = valid.to(gap.dtype)
    return (gap * v).sum() / v.sum().clamp_min(1.0)


def pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """(B, S, d) -> (B, B, S, S): cosine similarity of every sentence of patient i with every of patient j."""
    n = F.normalize(x.float(), dim=-1, eps=1e-6)
    return torch.einsum("isd,jtd->ijst", n, n)


def ssm_loss(text_sentences: torch.Tensor, visual_sentences: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Semantics similarity matching (eq. 12).

    For every pair of patients i < j, the mean absolute difference between cos(F_S^i, F_S^j) and
    cos(H_S^i, H_S^j) over their valid sentence pairs; averaged over the B(B-1)/2 pairs. A batch of one
    patient has no pair: the loss is 0 (and carries no gradient).
    text_sentences (B, S, d_t), visual_sentences (B, S, d_v), valid (B, S).
    """
    B = text_sentences.shape[0]
    if B < 2:
        return visual_sentences.sum() * 0.0
    diff = (pairwise_cosine(text_sentences) - pairwise_cosine(visual_sentences)).abs()
    v = valid.to(diff.dtype)
    pair_mask = torch.einsum("is,jt->ijst", v, v)
    per_pair = (diff * pair_mask).sum((-1, -2)) / pair_mask.sum((-1, -2)).clamp_min(1.0)
    i, j = torch.triu_indices(B, B, offset=1, device=diff.device)
    return per_pair[i, j].mean()


def sva_loss(similarity: torch.Tensor, owner: torch.Tensor, shared: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sentence-volume alignment (not in the paper): InfoNCE over the volumes of the batch, per sentence.

    similarity (Q, V): cosine of each sentence's read-out over volume v with the sentence itself;
    owner (Q,): index of the sentence's own volume (the positive); shared (Q, V): True where volume v's own
    report contains the same sentence (e.g. "No pleural effusion."), which is then not used as a negative.
    """
    if similarity.shape[0] == 0 or similarity.shape[1] < 2:
        return similarity.sum() * 0.0
    logits = similarity.float() / temperature
    cols = torch.arange(similarity.shape[1], device=similarity.device)
    not_negative = shared & (cols[None, :] != owner[:, None])
    return F.cross_entropy(logits.masked_fill(not_negative, float("-inf")), owner)


def present_class_dice_ce(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Segmentation loss: voxel cross-entropy plus the soft Dice loss of the (volume, class) pairs whose class
    is in the volume's target. logits (B, C, Z, Y, X), target (B, Z, Y, X) class indices.

    A class absent from a volume gets no Dice term (cross-entropy alone penalises predicting it). With a Dice
    term for every class, each absent class costs ~1/C unless its probability is zero everywhere, so with 18
    lesion classes of which a volume shows at most four, the cheapest solution is to predict no lesion at all.
    """
    n_classes = logits.shape[1]
    ce = F.cross_entropy(logits.float(), target)
    prob = logits.float().softmax(1)
    onehot = F.one_hot(target, n_classes).movedim(-1, 1).to(prob.dtype)
    dims = tuple(range(2, logits.dim()))
    overlap = (prob * onehot).sum(dims)
    size = onehot.sum(dims)
    dice = (2 * overlap + eps) / (prob.sum(dims) + size + eps)
    return ce + (1 - dice)[size > 0].mean()
