"""Downstream heads on the MG-3D encoder (paper Sec. IV.B.2) and the prompt-driven anomaly scorer.

* :class:`LinearClassifier` -- disease classification / prognosis on the pooled visual feature F̄_I.
* :class:`SegmentationDecoder` -- the SwinUNETR decoder over the five Swin feature maps.
* :class:`ReportDecoder` -- a transformer decoder over the visual tokens (and, prompted with findings, the
  classifier's probability of each) predicting report words; greedy or beam search with length and
  repetition controls.
* :class:`PromptScorer` -- "{finding} is present." vs "{finding} is not present.", softmax over the pair;
  trainable few-shot (CT-VocabFine). :func:`zero_shot_scores` scores the same pairs with no fine-tuning at
  all, by the volume-conditioned pseudo-log-likelihood under the pre-trained MLM head.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

from ..labels import LOBES, LUNG_FINDINGS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .config import MG3DConfig
    from .mg3d import MG3DModel, VolumeEncoder, VolumeEncoding
    from .text import TextBatch

PROMPT_PAIR = ("{finding} is present.", "{finding} is not present.")
CLASSIFIER_NORMS = ("layer", "batch")


class _Standardise(nn.BatchNorm1d):
    """BatchNorm without affine over the last dimension of (B, ..., d); a batch of one volume (which has no
    spread) uses the running statistics."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.training and x.shape[0] > 1:
            return super().forward(rows).reshape(x.shape)
        return F.batch_norm(rows, self.running_mean, self.running_var, training=False, eps=self.eps).reshape(x.shape)


class LinearClassifier(nn.Module):
    """Linear layer on F̄_I (B, d) -> logits (B, n_classes). ``multilabel`` selects sigmoid vs softmax.

    ``norm`` before the linear layer: "layer" (LayerNorm of each feature vector, as shipped) or "batch"
    (each dimension standardised across volumes, running statistics at inference, no affine; the usual
    linear-probe normalisation). A randomly initialised encoder's pooled features are one common vector plus
    a few-percent variation; LayerNorm keeps that ratio, so a new linear layer starts by predicting the prior
    for every volume. Standardising across volumes removes the common vector."""

    def __init__(self, dim: int, n_classes: int, multilabel: bool = True, norm: str = "layer",
                 encoder: VolumeEncoder | None = None) -> None:
        super().__init__()
        if norm not in CLASSIFIER_NORMS:
            raise ValueError(f"classifier norm {norm!r}: choose one of {', '.join(CLASSIFIER_NORMS)}")
        self.multilabel = multilabel
        self.norm = nn.LayerNorm(dim) if norm == "layer" else _Standardise(dim)
        self.linear = nn.Linear(dim, n_classes)
        self.encoder = encoder  # its own copy of the volume encoder, or None: the model's shared one

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(pooled))

    @torch.no_grad()
    def recalibrate_statistics(self, encodings: Iterable[VolumeEncoding]) -> int:
        """Re-estimate a "batch" norm's running statistics from ``encodings`` (``VolumeEncoding`` batches of
        at least two volumes, made by the final encoder); returns the volumes used (0: nothing changed).
        While the encoder trains, the running statistics average the last ~10 batches, each from a slightly
        different encoder. When the pooled features vary little between volumes, that drift is many times
        their spread, and standardising with the stale statistics sends every logit far out."""
        if not isinstance(self.norm, _Standardise):
            return 0
        norm, saved = self.norm, {k: v.clone() for k, v in self.norm.state_dict().items()}
        norm.reset_running_stats()
        momentum, was_training = norm.momentum, self.training
        norm.momentum = None  # a plain average over the batches
        self.eval()
        norm.train()
        seen = 0
        for encoding in encodings:
            if encoding.tokens.shape[0] > 1:
                self.classify(encoding)
                seen += encoding.tokens.shape[0]
        norm.momentum = momentum
        self.train(was_training)
        if not seen:
            norm.load_state_dict(saved)
        return seen

    @torch.no_grad()
    def init_prior(self, prevalence: Sequence[float] | np.ndarray) -> None:
        """Set the bias so that a volume the features say nothing about gets each label's prevalence (the
        fraction of training volumes with it): log-odds for multi-label, log-probability for one class per
        volume. A zero bias (p = 0.5) makes a head on rare labels spend its first hundreds of steps learning
        the prior. Prevalences are clipped to [1e-3, 1 - 1e-3], so an absent label gets a finite bias."""
        p = torch.as_tensor(prevalence, dtype=torch.float64).clamp(1e-3, 1 - 1e-3)
        if p.shape != self.linear.bias.shape:
            raise ValueError(f"prevalence has {tuple(p.shape)} values; the head has {self.linear.bias.numel()} classes")
        prior = torch.log(p / (1 - p)) if self.multilabel else torch.log(p / p.sum())
        self.linear.bias.copy_(prior.to(self.linear.bias.dtype))

    def classify(self, encoding: VolumeEncoding) -> torch.Tensor:
        """Logits (B, n_classes) from the shared encoder's ``VolumeEncoding``; a classifier with its own encoder
        encodes the volume the encoding was made from itself."""
        if self.encoder is not None:
            if encoding.volume is None:
                raise ValueError("this classifier has its own volume encoder and needs the input volume; the "
                                 "encoding carries none (make it with MG3DModel.encode_volume)")
            encoding = self.encoder(encoding.volume)
        return self(encoding.global_feature)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multilabel else logits.softmax(-1)


class SegmentationDecoder(nn.Module):
    """SwinUNETR decoder: input volume + Swin features (strides 2..32) -> (B, n_classes, Z, Y, X) logits."""

    def __init__(self, feature_size: int, n_classes: int, norm: str = "instance") -> None:
        super().__init__()
        f = feature_size

        def basic(cin, cout):
            return UnetrBasicBlock(3, cin, cout, kernel_size=3, stride=1, norm_name=norm, res_block=True)

        def up(cin, cout):
            return UnetrUpBlock(3, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm, res_block=True)

        self.encoder1, self.encoder2, self.encoder3 = basic(1, f), basic(f, f), basic(2 * f, 2 * f)
        self.encoder4, self.encoder10 = basic(4 * f, 4 * f), basic(16 * f, 16 * f)
        self.decoder5, self.decoder4, self.decoder3 = up(16 * f, 8 * f), up(8 * f, 4 * f), up(4 * f, 2 * f)
        self.decoder2, self.decoder1 = up(2 * f, f), up(f, f)
        self.out = UnetOutBlock(3, f, n_classes)
        instance_norm_as_group_norm(self)
        self.channels_last = False

    def forward(self, volume: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        if self.channels_last:
            fmt = torch.channels_last_3d
            volume = volume.contiguous(memory_format=fmt)
            features = [f.contiguous(memory_format=fmt) for f in features]
        enc0 = self.encoder1(volume)
        enc1, enc2, enc3 = self.encoder2(features[0]), self.encoder3(features[1]), self.encoder4(features[2])
        x = self.decoder5(self.encoder10(features[4]), features[3])
        x = self.decoder2(self.decoder3(self.decoder4(x, enc3), enc2), enc1)
        return self.out(self.decoder1(x, enc0))


def instance_norm_as_group_norm(module: nn.Module) -> None:
    """Replace every InstanceNorm3d without running statistics by GroupNorm with one group per channel —
    the same function and the same parameters (state dicts stay compatible), but a kernel that works on
    channels-last tensors. Instance norm makes a contiguous copy of its input, and oneDNN's bf16
    convolutions on the CPU want channels-last: the copies back and forth were ~40% of the decoder's time."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.InstanceNorm3d) and not child.track_running_stats:
            norm = nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=child.affine)
            if child.affine:
                norm.load_state_dict(child.state_dict())
            setattr(module, name, norm)
        else:
            instance_norm_as_group_norm(child)


def use_channels_last(decoder: SegmentationDecoder, enabled: bool = True) -> SegmentationDecoder:
    """Run ``decoder`` on channels-last (N, D, H, W, C) memory: ~2x faster on the CPU in bf16 (bench/)."""
    decoder.to(memory_format=torch.channels_last_3d if enabled else torch.contiguous_format)
    decoder.channels_last = enabled
    return decoder


@dataclass
class GenerationSettings:
    """max_len / min_len in tokens; beams 1 = greedy; no_repeat_ngram blocks repeated n-grams;
    repetition_penalty > 1 discourages tokens already generated; length_penalty for beam ranking.

    Three beams by default: on 50 validation volumes the demo model's drafts reached finding F1 0.48 against
    0.43 greedy, BLEU-4 0.26 against 0.24, with no doubled phrase ("is seen is seen"), at 0.07 s a draft
    against 0.05 (``python -m experiments.decoding_settings``)."""

    max_len: int = 96
    min_len: int = 4
    beams: int = 3
    no_repeat_ngram: int = 3
    repetition_penalty: float = 1.2
    length_penalty: float = 1.0


class ReportDecoder(nn.Module):
    """Transformer decoder over visual tokens (B, N, d) predicting report tokens: whole words of the bundle's
    word vocabulary (``unk_id`` set: that id is never generated), or, in bundles made before it, the text
    tokenizer's word pieces. Decoding keeps each layer's keys and values of earlier positions.

    With ``findings`` (the classifier's label names) the memory it reads is :meth:`prompted_memory`: the
    visual tokens and one token per finding carrying the classifier's probability, so a draft can say what the
    classifier (with its own encoder, the better detector) finds."""

    def __init__(self, dim: int, vocab_size: int, layers: int = 2, heads: int = 4, max_len: int = 160,
                 bos_id: int = 101, eos_id: int = 102, pad_id: int = 0, unk_id: int | None = None,
                 findings: Sequence[str] | None = None) -> None:
        super().__init__()
        self.findings = list(findings) if findings else None
        if self.findings:  # per finding an "absent" and a "present" token (the scale of the normed visual tokens)
            self.finding_tokens = nn.Parameter(torch.randn(2, len(self.findings), dim))
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(dim)
        self.lm = nn.Linear(dim, vocab_size)
        self.lm.weight = self.embed.weight  # tied input/output embeddings: half the parameters
        # small init: with tied weights, N(0, 1) embeddings would make the first logits ~10x too confident
        nn.init.normal_(self.embed.weight, std=0.02)
        self.bos_id, self.eos_id, self.pad_id, self.max_len = bos_id, eos_id, pad_id, max_len
        self.unk_id = unk_id

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Teacher forcing: tokens (B, T) starting with BOS -> logits (B, T, V) for the next token
        (``last_only``: (B, 1, V) for the last position)."""
        T = tokens.shape[1]
        x = self.embed(tokens) + self.pos[:, :T]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=tokens.device), diagonal=1)
        pad = tokens == self.pad_id
        pad[:, 0] = False
        x = self.decoder(x, memory, tgt_mask=causal, tgt_key_padding_mask=pad)
        return self.lm(self.norm(x[:, -1:] if last_only else x))

    def prompted_memory(self, tokens: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
        """The visual tokens (B, N, d) followed by one token per finding (B, F, d): its "absent" token moved
        towards its "present" token by the classifier's probability (B, F) of the finding."""
        if self.findings is None:
            raise ValueError("this report decoder drafts from the visual tokens alone; it takes no findings")
        if probabilities.shape[-1] != len(self.findings):
            raise ValueError(f"the report decoder takes {len(self.findings)} finding probabilities per volume; "
                             f"got {probabilities.shape[-1]}")
        absent, present = self.finding_tokens.to(tokens.dtype)
        p = probabilities.to(tokens.dtype)[..., None]
        return torch.cat([tokens, absent + p * (present - absent)], 1)

    def loss(self, target_ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the next token; target_ids (B, T) = [BOS] report [EOS] [PAD]..."""
        logits = self(target_ids[:, :-1], memory)
        gold = target_ids[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gold.reshape(-1), ignore_index=self.pad_id)

    # ----- decoding with cached keys and values (the same arithmetic as forward, one position at a time) -----
    def memory_keys_values(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the cross-attention keys and values of ``memory`` (B, N, d): (B, H, N, d/H) each."""
        out = []
        for layer in self.decoder.layers:
            attn, d = layer.multihead_attn, layer.multihead_attn.embed_dim
            w, b = attn.in_proj_weight, attn.in_proj_bias
            k, v = F.linear(memory, w[d:2 * d], b[d:2 * d]), F.linear(memory, w[2 * d:], b[2 * d:])
            out.append((_heads(k, attn.num_heads), _heads(v, attn.num_heads)))
        return out

    def step(self, tokens: torch.Tensor, position: int, cache: list | None,
             memory_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list]:
        """Logits (A, V) of the token after ``tokens`` (A,) at ``position``, given the keys and values of the
        earlier positions (``cache``, None at position 0); returns them with this position's appended."""
        x = self.embed(tokens)[:, None] + self.pos[:, position:position + 1]
        new_cache = []
        for i, layer in enumerate(self.decoder.layers):
            attn, heads = layer.self_attn, layer.self_attn.num_heads
            q, k, v = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            k, v = _heads(k, heads), _heads(v, heads)
            if cache is not None:
                k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
            new_cache.append((k, v))
            x = x + _attend(_heads(q, heads), k, v, attn)
            cross, d = layer.multihead_attn, layer.multihead_attn.embed_dim
            q = F.linear(layer.norm2(x), cross.in_proj_weight[:d], cross.in_proj_bias[:d])
            mk, mv = memory_kv[i]
            x = x + _attend(_heads(q, heads), mk.expand(len(x), -1, -1, -1), mv.expand(len(x), -1, -1, -1), cross)
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
        return self.lm(self.norm(x))[:, 0], new_cache

    def _adjust(self, logits: torch.Tensor, seqs: torch.Tensor, s: GenerationSettings, step: int) -> torch.Tensor:
        logp = logits.log_softmax(-1)
        never = [t for t in (self.pad_id, self.bos_id, self.unk_id) if t is not None and t != self.eos_id]
        logp[:, never] = float("-inf")
        if s.repetition_penalty != 1.0:
            seen = torch.zeros_like(logp, dtype=torch.bool).scatter_(1, seqs, True)
            logp = torch.where(seen, logp * s.repetition_penalty, logp)
        if s.no_repeat_ngram > 1 and seqs.shape[1] >= s.no_repeat_ngram:
            n = s.no_repeat_ngram
            for b in range(seqs.shape[0]):
                seq = seqs[b].tolist()
                prefix = tuple(seq[-(n - 1):])
                banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == prefix]
                if banned:
                    logp[b, banned] = float("-inf")
        if step < s.min_len:
            logp[:, self.eos_id] = float("-inf")
        return logp

    @torch.no_grad()
    def generate(self, memory: torch.Tensor, settings: GenerationSettings | None = None) -> list[list[int]]:
        """Token ids (without BOS/EOS) per volume; greedy when beams == 1, else beam search (hypotheses ranked
        by log-probability / length ** length_penalty, the length counting BOS)."""
        s = settings or GenerationSettings()
        return [self._search(memory[b:b + 1], s) for b in range(memory.shape[0])]

    def _search(self, memory: torch.Tensor, s: GenerationSettings) -> list[int]:
        width, max_len = max(1, s.beams), min(s.max_len, self.max_len - 1)
        memory_kv = self.memory_keys_values(memory)
        seqs = torch.full((1, 1), self.bos_id, dtype=torch.long, device=memory.device)
        scores, cache, done = [0.0], None, []  # done: (sequence, score) of hypotheses that ended with EOS
        for step in range(max_len):
            logits, cache = self.step(seqs[:, -1], step, cache, memory_kv)
            top = self._adjust(logits.float(), seqs, s, step).topk(width, dim=-1)
            length = seqs.shape[1] + 1
            pool: list[tuple[float, float, tuple[int, int] | list[int]]] = []  # (rank, score, (beam, token) or done)
            for i in range(len(seqs)):
                for lp, tok in zip(top.values[i].tolist(), top.indices[i].tolist()):
                    if lp != float("-inf"):
                        pool.append(((scores[i] + lp) / length ** s.length_penalty, scores[i] + lp, (i, tok)))
            pool += [(score / len(seq) ** s.length_penalty, score, seq) for seq, score in done]
            pool = sorted(pool, key=lambda c: c[0], reverse=True)[:width]
            done = [(c[2], c[1]) for c in pool if isinstance(c[2], list)]
            grown = [c for c in pool if not isinstance(c[2], list)]
            done += [([*seqs[i].tolist(), tok], score) for _, score, (i, tok) in grown if tok == self.eos_id]
            alive = [(score, i, tok) for _, score, (i, tok) in grown if tok != self.eos_id]
            if not alive:
                break
            index = torch.tensor([i for _, i, _ in alive], device=seqs.device)
            new_tokens = torch.tensor([[tok] for _, _, tok in alive], device=seqs.device)
            seqs = torch.cat([seqs[index], new_tokens], 1)
            scores = [score for score, _, _ in alive]
            cache = [(k[index], v[index]) for k, v in cache]
        else:
            done += [(seqs[i].tolist(), scores[i]) for i in range(len(seqs))]
        best = max(done, key=lambda c: c[1] / len(c[0]) ** s.length_penalty)[0]
        return [t for t in best[1:] if t not in (self.eos_id, self.pad_id)]


def classifier_probabilities(classifier: LinearClassifier, encoding: VolumeEncoding) -> torch.Tensor:
    """(B, n_classes) float32 probabilities of ``classifier`` for the encoded volumes, without gradients."""
    with torch.no_grad():
        return classifier.probabilities(classifier.classify(encoding).float())


def report_memory(report: ReportDecoder, tokens: torch.Tensor,
                  probabilities: torch.Tensor | None = None) -> torch.Tensor:
    """What ``report`` drafts from: the visual tokens (B, N, d), and for a decoder prompted with findings
    (``report.findings``) also the classifier's ``probabilities`` (B, F) of them (:func:`classifier_probabilities`,
    computed once by the caller, who may need them for the scores too)."""
    if report.findings is None:
        return tokens
    if probabilities is None:
        raise ValueError("this report decoder drafts from the classifier's findings, and the bundle has no "
                         "classifier head; use the bundle the report stage was trained in")
    return report.prompted_memory(tokens, probabilities)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, d) -> (B, H, T, d/H)."""
    B, T, d = x.shape
    return x.view(B, T, heads, d // heads).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: nn.MultiheadAttention) -> torch.Tensor:
    """Scaled dot-product attention of (B, H, T, d/H) queries over keys/values, through ``attn``'s output
    projection: (B, T, d)."""
    o = F.scaled_dot_product_attention(q, k, v)
    B, H, T, dh = o.shape
    return attn.out_proj(o.transpose(1, 2).reshape(B, T, H * dh))


class PromptScorer(nn.Module):
    """p(present) = softmax over the prompt pair of cos(W_v F̄_I, W_t F_prompt) / τ (CT-VocabFine head).

    Projections start at identity so the untrained head already compares MG-3D's own features."""

    def __init__(self, dim: int, temperature: float = 0.07) -> None:
        super().__init__()
        self.visual = nn.Linear(dim, dim)
        self.textual = nn.Linear(dim, dim)
        for lin in (self.visual, self.textual):
            nn.init.eye_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.log_scale = nn.Parameter(torch.tensor(float(-torch.log(torch.tensor(temperature)))))

    def forward(self, visual: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """visual (B, d), prompts (F, 2, d) -> logits (B, F, 2)."""
        v = F.normalize(self.visual(visual), dim=-1)
        t = F.normalize(self.textual(prompts), dim=-1)
        return torch.einsum("bd,fpd->bfp", v, t) * self.log_scale.exp()


def prompt_texts(findings: list[str], pair: tuple[str, str] = PROMPT_PAIR) -> list[list[str]]:
    """[[positive, negative] for each finding]."""
    return [[pair[0].format(finding=f), pair[1].format(finding=f)] for f in findings]


def prompt_batch(tokenizer: PreTrainedTokenizerBase, findings: list[str], pair: tuple[str, str] = PROMPT_PAIR) -> TextBatch:
    """The prompt pairs as a TextBatch of F "reports" of 2 sentences; ``model.encode_sentences_separately``
    then gives (F, 2, ·) features, each prompt encoded on its own."""
    from .text import tokenize_reports

    return tokenize_reports(tokenizer, prompt_texts(findings, pair), max_sentences=2)


def build_head(spec: dict, config: MG3DConfig, vocab_size: int) -> nn.Module:
    """Rebuild a head from its bundle description ``{"type": ..., ...}`` (config: MG3DConfig)."""
    kind = spec.get("type")
    if kind == "classifier":
        pooling = spec.get("pooling", "mean")
        if pooling != "mean":
            raise ValueError(f"classifier head with pooling {pooling!r} in bundle; this napari-mg3d reads "
                             "mean-pooled classifiers only (the attention read-out was removed: no gain)")
        from .mg3d import VolumeEncoder

        encoder = VolumeEncoder(config) if spec.get("own_encoder") else None
        return LinearClassifier(config.fusion_dim, int(spec["n_classes"]), bool(spec.get("multilabel", True)),
                                spec.get("norm", "layer"), encoder)
    if kind == "segmentation":
        return SegmentationDecoder(config.feature_size, int(spec["n_classes"]))
    if kind == "report":
        unk = spec.get("unk_id")
        return ReportDecoder(config.fusion_dim, int(spec.get("vocab_size", vocab_size)), int(spec.get("layers", 2)),
                             int(spec.get("heads", 4)), int(spec.get("max_len", 160)), int(spec.get("bos_id", 101)),
                             int(spec.get("eos_id", 102)), int(spec.get("pad_id", 0)),
                             int(unk) if unk is not None else None, spec.get("findings"))
    if kind == "prompt":
        return PromptScorer(config.fusion_dim, float(spec.get("temperature", 0.07)))
    if kind == "mlm":
        from .pretraining import MLMHead

        return MLMHead(config.fusion_dim, vocab_size)
    if kind == "mim":
        from .pretraining import MIMDecoder

        return MIMDecoder(config.fusion_dim)
    raise ValueError(f"unknown head type {kind!r} in bundle; this napari-mg3d knows classifier, segmentation, "
                     "report, prompt, mlm, mim")


@torch.no_grad()
def alignment_zero_shot_margins(model: MG3DModel, tokens: torch.Tensor, findings: list[str],
                                pair: tuple[str, str] = PROMPT_PAIR, by_lobe: bool = True) -> torch.Tensor:
    """(F,) logit margin "present" minus "not present" per finding for one volume from the "sva" objective:
    each prompt of the pair is read out over the volume tokens (1, N, d) and compared with itself (cosine),
    divided by the training temperature; a lung finding's "present" lobe by lobe (``by_lobe``, see
    alignment_prompt_logits). Only meaningful for a model pre-trained with "sva"."""
    logits = alignment_prompt_logits(model, tokens, findings, pair, by_lobe)
    return logits[:, 0] - logits[:, 1]


def alignment_prompt_logits(model: MG3DModel, tokens: torch.Tensor, findings: list[str],
                            pair: tuple[str, str] = PROMPT_PAIR, by_lobe: bool = True) -> torch.Tensor:
    """(F, 2) sentence-volume score of each prompt of the pair over the volume tokens (1, N, d), divided by
    the training temperature (see alignment_zero_shot_margins). With ``by_lobe``, the "present" score of a
    finding of the lung parenchyma (``labels.LUNG_FINDINGS``) is the best of "<finding> in the <lobe>." over
    the five lobes: a sentence's read-out looks where the sentence says, and such a finding is present if it
    is in some lobe (visible-tier benchmark, 200 held-out volumes: mean AUC 0.777 -> 0.873, rule chosen on
    validation volumes; docs/benchmark.md)."""
    batch = prompt_batch(model.text.tokenizer, findings, pair).to(tokens.device)
    _, prompts = model.encode_sentences_separately(batch)
    similarity = model.sentence_volume_similarity(tokens, prompts.reshape(-1, prompts.shape[-1]))[:, 0]
    logits = similarity.view(len(findings), 2) / model.config.temperature
    lung = [i for i, f in enumerate(findings) if f in LUNG_FINDINGS] if by_lobe else []
    if lung:
        from .text import tokenize_reports

        texts = [[f"{findings[i]} in the {lobe}."] for i in lung for lobe in LOBES]
        _, lobed = model.encode_sentences_separately(tokenize_reports(model.text.tokenizer, texts, max_sentences=1)
                                                     .to(tokens.device))
        best = model.sentence_volume_similarity(tokens, lobed[:, 0])[:, 0].view(len(lung), len(LOBES)).amax(-1)
        logits = logits.clone()
        logits[lung, 0] = best.to(logits.dtype) / model.config.temperature
    return logits


def margins_to_scores(margins: torch.Tensor) -> torch.Tensor:
    """p(present) from pair margins (softmax over the pair of logits = sigmoid of their difference)."""
    return torch.sigmoid(margins)


@torch.no_grad()
def alignment_zero_shot_scores(model: MG3DModel, tokens: torch.Tensor, findings: list[str],
                               pair: tuple[str, str] = PROMPT_PAIR, by_lobe: bool = True) -> torch.Tensor:
    """p(present) per finding for one volume, with no fine-tuning (see alignment_zero_shot_margins and
    margins_to_scores). Returns (F,)."""
    return margins_to_scores(alignment_zero_shot_margins(model, tokens, findings, pair, by_lobe))


@torch.no_grad()
def zero_shot_scores(model: MG3DModel, mlm_head: nn.Module, tokens: torch.Tensor, findings: list[str],
                     pair: tuple[str, str] = PROMPT_PAIR) -> torch.Tensor:
    """p(present) per finding for one volume, with no fine-tuning: for each prompt of the pair, the mean
    log-probability of its words when each is masked in turn and predicted by the pre-trained MLM head
    from the volume (pseudo-log-likelihood, volume-conditioned); softmax over the pair.

    tokens: (1, N, d) volume tokens of one volume. Returns (F,) probabilities.
    """
    tok = model.text.tokenizer
    texts = [t for p in prompt_texts(findings, pair) for t in p]
    enc = tok(texts, padding=True, return_tensors="pt")
    ids, att = enc["input_ids"].to(tokens.device), enc["attention_mask"].to(tokens.device)
    special = torch.isin(ids, torch.tensor(tok.all_special_ids, device=ids.device))
    rows, owner, target, position = [], [], [], []
    for p in range(ids.shape[0]):
        for t in torch.nonzero(att[p].bool() & ~special[p]).flatten().tolist():
            masked = ids[p].clone()
            masked[t] = model.text.mask_token_id
            rows.append(masked)
            owner.append(p)
            target.append(int(ids[p, t]))
            position.append(t)
    masked_ids = torch.stack(rows)
    row_att = att[torch.tensor(owner, device=ids.device)]
    words = model.text_proj(model.text.word_features(masked_ids, row_att))
    fused, _ = model.text_fusion(words, tokens.expand(len(rows), -1, -1), row_att.bool(), None)
    idx = torch.arange(len(rows), device=ids.device)
    logp = mlm_head(fused[idx, torch.tensor(position, device=ids.device)]).log_softmax(-1)
    picked = logp[idx, torch.tensor(target, device=ids.device)]
    owner_t = torch.tensor(owner, device=ids.device)
    pll = torch.zeros(ids.shape[0], device=ids.device).index_add_(0, owner_t, picked.float())  # bf16 under autocast
    pll = pll / torch.bincount(owner_t, minlength=ids.shape[0]).clamp_min(1)
    return pll.view(len(findings), 2).softmax(-1)[:, 0]
