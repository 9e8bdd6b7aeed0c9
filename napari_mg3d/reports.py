"""Radiology report -> sentences, keeping each sentence's character span in the original text.

Sentences are made concise but complete (paper Sec. III.B.1): a report is cut at sentence punctuation
(. ! ?), at a semicolon followed by a capitalised clause, and at line breaks that start a new item, but
not inside decimals ("0.8 cm", "1.5x2"), common abbreviations ("e.g.", "approx."), or enumeration
markers ("1." / "2)"), and section headers ("Findings:", "Impression:") are not sentences.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ABBREVIATIONS = {
    "e.g", "i.e", "eg", "ie", "vs", "approx", "appr", "dr", "mr", "mrs", "ms", "prof", "fig", "figs",
    "no", "nos", "ca", "cf", "etc", "incl", "max", "min", "ant", "post", "sup", "inf", "lat", "med", "resp",
    "st", "bilat", "c.f", "w", "y.o", "yr", "yrs", "mo", "sec", "ser", "img", "im", "se",
}
HEADER = re.compile(
    r"(?im)^\s*(findings?|impressions?|conclusions?|results?|technique|history|indication|comparison|"
    r"clinical information|opinion|diagnosis|recommendations?)\s*:\s*"
)
ENUMERATION = re.compile(r"^\s*(?:\(?\d{1,2}[.)]|[-*\u2022])\s+")
TRIM = " \t\r\n\"'`,;:"


@dataclass(frozen=True)
class Sentence:
    """One sentence: its text and its [start, end) character span in the original report."""

    text: str
    start: int
    end: int


def _is_boundary(text: str, i: int) -> bool:
    """Is the punctuation at text[i] the end of a sentence?"""
    ch = text[i]
    nxt = text[i + 1] if i + 1 < len(text) else ""
    if ch == ";":
        rest = text[i + 1:].lstrip()
        return bool(rest) and rest[0].isupper()
    if nxt and not nxt.isspace() and nxt not in "\"')":
        return False  # "0.8", "1.5x2", "e.g.x", "img117."? -> no space, not an end
    if ch != ".":
        return True
    before = text[:i]
    word = re.search(r"([A-Za-z][A-Za-z.]*)$", before)
    if word and word.group(1).lower().rstrip(".") in ABBREVIATIONS:
        rest = text[i + 1:].lstrip()
        # "No. 3" / "e.g. the" continue; an abbreviation that ends the report or precedes a capital
        # letter after a sentence-final word ("... etc. The") still ends the sentence.
        if word.group(1).lower() in {"etc", "approx"}:
            return not rest or rest[0].isupper()
        return not rest
    if re.search(r"(?:^|\s)\(?\d{1,2}$", before) and re.match(r"\s*(?:^|\n|\s)", text[i + 1:] or " "):
        line_start = before.rfind("\n") + 1
        if before[line_start:].strip().isdigit():
            return False  # "1." enumeration marker at the start of a line
        if re.search(r"[.;:]\s*\d{1,2}$", before) or re.fullmatch(r"\s*\d{1,2}", before):
            return False  # "... finding. 2. next" inline enumeration
    return True


def _pieces(text: str, start: int, end: int):
    """Yield (start, end) spans of candidate sentences inside text[start:end]."""
    seg_start = start
    i = start
    while i < end:
        ch = text[i]
        if ch in ".!?;" and _is_boundary(text[:end], i):
            yield seg_start, i + 1
            seg_start = i + 1
        elif ch == "\n":
            rest = text[i + 1:end].lstrip(" \t")
            prev = text[seg_start:i].strip()
            if rest.startswith("\n") or ENUMERATION.match(rest) or (prev and rest[:1].isupper()):
                yield seg_start, i
                seg_start = i + 1
        i += 1
    yield seg_start, end


def _clean_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start] in TRIM:
        start += 1
    m = ENUMERATION.match(text[start:end])
    if m:
        start += m.end()
    while end > start and text[end - 1] in TRIM:
        end -= 1
    return start, end


def split_sentences(report: str) -> list[Sentence]:
    """Split ``report`` into sentences with character spans (``report[s.start:s.end] == s.text``).

    Headers ("Findings:", "Impression:") are dropped; a report without sentence punctuation is one
    sentence. Returns [] for a report with no text.
    """
    if not isinstance(report, str):
        raise TypeError(f"report must be a string, got {type(report).__name__}")
    sections, last = [], 0
    for m in HEADER.finditer(report):
        sections.append((last, m.start()))
        last = m.end()
    sections.append((last, len(report)))
    out: list[Sentence] = []
    for s0, s1 in sections:
        for a, b in _pieces(report, s0, s1):
            a, b = _clean_span(report, a, b)
            # keep the sentence-final period inside the span
            if b < len(report) and report[b:b + 1] in ".!?" and b < s1:
                b += 1
            piece = report[a:b]
            if re.search(r"[A-Za-z0-9]", piece):
                out.append(Sentence(piece, a, b))
    return out


def sentence_texts(report: str) -> list[str]:
    """The sentences of ``report`` as strings; raises ValueError for a report without any text."""
    sentences = [s.text for s in split_sentences(report)]
    if not sentences:
        raise ValueError(f"report is empty (got {report[:40]!r}): MG-3D needs at least one sentence of text")
    return sentences


# Negation cues (in the spirit of NegEx, Chapman et al. 2001): the synthetic generator does not link a
# denied finding's sentence to a lesion. The rule is sentence-level: a negation or normality cue outside a
# pseudo-negation ("no change", "not only").
_CUES = (
    r"no", r"not", r"\w*n't", r"cannot", r"without", r"absent", r"absence of", r"negative for", r"free of",
    r"neither", r"nor", r"ruled out", r"rules out", r"excluded", r"unremarkable", r"normal", r"within normal limits",
)
_PSEUDO = (
    r"no change", r"no significant change", r"no interval change", r"no significant interval change",
    r"not only", r"not necessarily", r"no increase", r"no decrease", r"gram negative",
)
# (?<![\w-]) keeps "normal" from matching inside "abnormal" and "no" inside "nodule" or "non-".
NEGATION_CUE = re.compile(r"(?<![\w-])(?:" + "|".join(_CUES) + r")(?![\w-])", re.IGNORECASE)
PSEUDO_NEGATION = re.compile(r"(?<![\w-])(?:" + "|".join(_PSEUDO) + r")(?![\w-])", re.IGNORECASE)


def is_negated(sentence: str) -> bool:
    """Whether ``sentence`` denies a finding or states normality, by cue words (case-insensitive).

    "The heart is not enlarged." and "Heart size is normal." are negated; "Cardiomegaly is present.",
    "Abnormal opacity." and "No change in the nodule." are not."""
    return NEGATION_CUE.search(PSEUDO_NEGATION.sub(" ", sentence)) is not None
