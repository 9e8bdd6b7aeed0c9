"""The report decoder's vocabulary: whole words (and punctuation marks) that occur in the training reports.

A draft made from it can only contain words that reports use; a word seen fewer than ``min_count`` times in
the training reports becomes ``<unk>``, which the decoder is never allowed to emit. Words are lower-cased
(a sentence's first word is capitalised again when the draft is written out). The text encoder keeps its own
tokenizer; this one is for the decoder only, and is saved in the bundle beside it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
# a word: letters/digits with inner hyphens, apostrophes or decimal points ("ground-glass", "3.5"); else one mark
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'.][a-z0-9]+)*|[^\sa-z0-9]")
_NO_SPACE_BEFORE = {".", ",", ";", ":", ")", "%", "?", "!"}
_NO_SPACE_AFTER = {"(", "/"}


def words_of(text: str) -> list[str]:
    """The lower-cased word and punctuation tokens of ``text``."""
    return _TOKEN.findall(text.lower())


class WordVocabulary:
    """Word <-> id. Ids 0-3 are <pad>, <bos>, <eos>, <unk>; the rest are words by falling frequency."""

    def __init__(self, words: Sequence[str], min_count: int = 1) -> None:
        words = [w for w in words if w not in SPECIALS]
        self.itos = [*SPECIALS, *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("a word vocabulary lists a word twice")
        self.min_count = min_count

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, reports: Iterable[str], min_count: int = 2) -> WordVocabulary:
        """The words that occur at least ``min_count`` times in ``reports`` (ties in alphabetical order)."""
        counts = Counter(w for text in reports for w in words_of(text))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if not kept:
            raise ValueError(f"no word occurs {min_count} times in the training reports: the report decoder has "
                             "nothing to learn; check that the data has reports")
        return cls(kept, min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_len: int) -> list[int]:
        """[<bos>] ids [<eos>], at most ``max_len`` ids (the report is cut, the <eos> kept)."""
        ids = [self.stoi.get(w, self.unk_id) for w in words_of(text)][: max(0, max_len - 2)]
        return [self.bos_id, *ids, self.eos_id]

    def batch(self, texts: Sequence[str], max_len: int):
        """(B, T) long tensor of :meth:`encode` ids padded with <pad>."""
        import torch

        rows = [self.encode(t, max_len) for t in texts]
        out = torch.full((len(rows), max(len(r) for r in rows)), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Readable text: specials dropped, no space before closing marks, sentences capitalised."""
        out, capital, glue = [], True, True
        for i in ids:
            if not 0 <= int(i) < len(self.itos) or int(i) < len(SPECIALS):
                continue
            w = self.itos[int(i)]
            if capital and w[0].isalpha():
                w, capital = w[0].upper() + w[1:], False
            if out and not glue and w not in _NO_SPACE_BEFORE:
                out.append(" ")
            out.append(w)
            glue = w in _NO_SPACE_AFTER
            if w in (".", "?", "!"):
                capital = True
        return "".join(out)

    def to_json(self) -> dict:
        return {"format": "mg3d-word-vocabulary", "version": 1, "min_count": self.min_count,
                "words": self.itos[len(SPECIALS):]}

    @classmethod
    def from_json(cls, data: dict, source: str = "the vocabulary") -> WordVocabulary:
        if data.get("format") != "mg3d-word-vocabulary" or not isinstance(data.get("words"), list):
            raise ValueError(f"{source} is not an MG-3D word vocabulary (expected format mg3d-word-vocabulary "
                             "with a list of words)")
        return cls(data["words"], int(data.get("min_count", 1)))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> WordVocabulary:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read the report decoder's word vocabulary ({err})") from None
        return cls.from_json(data, str(path))


def report_text(ids: Sequence[int], spec: dict, tokenizer=None) -> str:
    """A report decoder's output ids as text: through the word vocabulary its bundle spec carries, or, for a
    decoder made before word vocabularies, the text tokenizer's word pieces (sentences capitalised)."""
    if spec.get("vocabulary"):
        return WordVocabulary.from_json(spec["vocabulary"], "the report head's vocabulary").decode(ids)
    if tokenizer is None:
        raise ValueError("this report head predicts word pieces: decoding it needs the text tokenizer")
    text = tokenizer.decode(list(ids), skip_special_tokens=True).strip()
    return ". ".join(part.strip().capitalize() for part in text.split(" . ") if part.strip())
