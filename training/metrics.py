"""Evaluation metrics with bootstrap confidence intervals, on well-kept implementations (torchmetrics).

The one implementation of each metric in the project (training, evaluation and the experiments call these).
All functions take plain arrays; ``bootstrap`` wraps any of them: 95% interval over patients resampled
with replacement.

Conventions: an AUC needs both classes among the rows, else it is undefined (NaN) and a per-label table
leaves that label out. A Dice is undefined (NaN) when a class is absent from both the prediction and the
target, and means over classes or volumes skip undefined values (:func:`mean_defined`); a class that is
predicted but absent from the target has Dice 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def auc(labels: Sequence[float], scores: Sequence[float]) -> float:
    """Area under the ROC curve (binary) from the ranks of ``scores`` alone (Mann-Whitney U; tied scores count
    half); NaN when only one class is present. Scores may be probabilities or logits of any size: nothing is
    squashed first. (torchmetrics' binary_auroc, used before, applies a sigmoid to scores outside [0, 1];
    float32 logits above ~17 all become 1.0 there, and a perfectly separated finding scored 0.50.)"""
    from scipy.stats import rankdata

    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.size != s.size:
        raise ValueError(f"auc: {y.size} labels but {s.size} scores")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_per_label(labels: np.ndarray, scores: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """AUC of each column of ``labels`` (N, L) 0/1 against ``scores`` (N, L), keyed by ``names``; labels
    that are all positive or all negative among the N have no AUC and are left out."""
    n = len(labels)
    return {name: auc(labels[:, j], scores[:, j]) for j, name in enumerate(names) if 0 < labels[:, j].sum() < n}


def mean_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean of :func:`auc_per_label` over the labels with both classes present (NaN if there is none)."""
    per = auc_per_label(np.asarray(labels), np.asarray(scores), [str(j) for j in range(np.asarray(labels).shape[1])])
    return float(np.mean(list(per.values()))) if per else float("nan")


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    y, p = np.asarray(labels), np.asarray(predictions)
    return float((y == p).mean()) if len(y) else float("nan")


def dice(pred, target) -> float:
    """Dice of two binary masks (numpy arrays or tensors); NaN when both are empty (undefined)."""
    a, b = np.asarray(pred, bool), np.asarray(target, bool)
    denom = a.sum() + b.sum()
    return float(2 * (a & b).sum() / denom) if denom else float("nan")


def dice_per_class(pred, target, n_classes: int) -> list[float]:
    """Dice of each foreground class 1..n_classes-1 of two label maps (NaN where a class is in neither)."""
    p, t = np.asarray(pred), np.asarray(target)
    return [dice(p == c, t == c) for c in range(1, n_classes)]


def mean_defined(values) -> float:
    """Mean over the defined (non-NaN, non-None) values; NaN when none is."""
    kept = [float(v) for v in values if v is not None and v == v]
    return float(np.mean(kept)) if kept else float("nan")


TEXT_TOKENISATION = "sacreBLEU 13a (punctuation split from words), lower-cased"


def _tokens(text: str) -> list[str]:
    """The tokens every text metric here compares: sacreBLEU's 13a tokenisation, lower-cased."""
    from torchmetrics.functional.text.sacre_bleu import _SacreBLEUTokenizer

    return _SacreBLEUTokenizer.tokenize(text.lower(), "13a")


def bleu(candidates: list[str], references: list[str], n: int = 4) -> float:
    """Corpus BLEU-n (uniform weights up to n), one reference per candidate, tokenised as
    TEXT_TOKENISATION says (so "effusion." and "effusion ." are the same words)."""
    from torchmetrics.functional.text import sacre_bleu_score

    return float(sacre_bleu_score([c.lower() for c in candidates], [[r.lower()] for r in references], n_gram=n,
                                  tokenize="13a"))


def meteor(candidates: list[str], references: list[str], alpha: float = 0.9, beta: float = 3.0,
           gamma: float = 0.5) -> float:
    """Mean METEOR (Banerjee & Lavie 2005) with its exact-match stage only (no stemming or synonyms, which
    need WordNet): F = P R / (alpha P + (1 - alpha) R) over aligned unigrams, times 1 - gamma (chunks /
    matches)^beta; the alignment pairs each candidate word with the first unused equal reference word."""
    scores = []
    for cand, ref in zip(candidates, references):
        c, r = _tokens(cand), _tokens(ref)
        used, pairs = set(), []
        for i, word in enumerate(c):
            j = next((j for j, w in enumerate(r) if w == word and j not in used), None)
            if j is not None:
                used.add(j)
                pairs.append((i, j))
        if not pairs:
            scores.append(0.0)
            continue
        precision, recall = len(pairs) / len(c), len(pairs) / len(r)
        f_mean = precision * recall / (alpha * precision + (1 - alpha) * recall)
        chunks = 1 + sum(1 for (i0, j0), (i1, j1) in zip(pairs, pairs[1:]) if not (i1 == i0 + 1 and j1 == j0 + 1))
        scores.append(f_mean * (1 - gamma * (chunks / len(pairs)) ** beta))
    return float(np.mean(scores)) if scores else float("nan")


def rouge_l(candidates: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure."""
    from torchmetrics.functional.text import rouge_score

    return float(rouge_score([c.lower() for c in candidates], [r.lower() for r in references],
                             rouge_keys="rougeL")["rougeL_fmeasure"])


def pointing_hit(heat: np.ndarray, lesion_cells: np.ndarray) -> tuple[bool, float] | None:
    """The pointing game for one sentence: whether the peak of its heat map ``heat`` (gz, gy, gx) lies in a
    cell its lesion covers (``lesion_cells``, boolean, the same grid), and the hit rate of a uniformly random
    cell (the lesion's share of the cells). None when the lesion covers no cell (nothing to point at)."""
    cells = np.asarray(lesion_cells, bool)
    if cells.shape != np.shape(heat):
        raise ValueError(f"heat map {np.shape(heat)} and lesion cells {cells.shape} are on different grids")
    if not cells.any():
        return None
    return bool(cells.flat[int(np.argmax(heat))]), float(cells.mean())


def recall_at_k(similarity: np.ndarray, k: int) -> float:
    """Report->volume retrieval: similarity[i, j] of report i and volume j, the match of report i is
    volume i; fraction of reports whose volume ranks in the top k. Ranks are pessimistic: a volume that
    ties with the match ranks above it, so a collapsed encoder (all similarities equal) scores 0, not 1."""
    s = np.asarray(similarity)
    own = s[np.arange(len(s)), np.arange(len(s))]
    rank = (s >= own[:, None]).sum(1) - 1  # the other volumes at least as similar as the match
    return float((rank < k).mean())


def recall_at_k_in_pools(similarity: np.ndarray, k: int, pool: int) -> float:
    """:func:`recall_at_k` among ``pool`` candidates: the reports and volumes split in order into consecutive
    pools of ``pool`` (a last, smaller pool is left out), each report ranked among its pool's volumes; the
    mean over all the pooled reports. Makes Recall@K comparable across held-out sets of different sizes."""
    s = np.asarray(similarity)
    pools = len(s) // pool
    if pools == 0:
        raise ValueError(f"Recall@{k} among {pool} needs at least {pool} reports and volumes; got {len(s)}")
    return float(np.mean([recall_at_k(s[i * pool:(i + 1) * pool, i * pool:(i + 1) * pool], k) for i in range(pools)]))


def binomial_se(rate: float, n: int) -> float:
    """Standard error of a hit rate over ``n`` independent trials."""
    return float(np.sqrt(rate * (1 - rate) / n)) if n > 0 else float("nan")


def bootstrap_mean_auc(labels: np.ndarray, scores: np.ndarray, names: Sequence[str], n: int = 1000, seed: int = 0,
                       alpha: float = 0.05) -> dict:
    """Mean AUC over a fixed label set (those with both classes among all the volumes) with its bootstrap
    interval; a resample in which one of those labels has a single class is skipped, never averaged over
    fewer labels. Reports the labels and how many resamples were used."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    keep = [j for j in range(labels.shape[1]) if 0 < labels[:, j].sum() < len(labels)]
    if not keep:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n_labels": 0, "labels": [],
                "resamples": 0}
    y, p = labels[:, keep], scores[:, keep]
    value = float(np.mean([auc(y[:, j], p[:, j]) for j in range(len(keep))]))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        ys = y[idx]
        if ((ys.sum(0) == 0) | (ys.sum(0) == len(ys))).any():
            continue
        samples.append(np.mean([auc(ys[:, j], p[idx, j]) for j in range(len(keep))]))
    low, high = (np.quantile(samples, [alpha / 2, 1 - alpha / 2]) if samples else (float("nan"), float("nan")))
    return {"value": value, "low": float(low), "high": float(high), "n_labels": len(keep),
            "labels": [names[j] for j in keep], "resamples": len(samples)}


def bootstrap(metric: Callable[..., float], *arrays, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """{"value", "low", "high"}: the metric on all data and its (1-alpha) bootstrap interval over rows."""
    rng = np.random.default_rng(seed)
    m = len(arrays[0])
    value = metric(*arrays)
    samples = []
    for _ in range(n):
        idx = rng.integers(0, m, m)
        v = metric(*[_take(a, idx) for a in arrays])
        if v == v:  # skip NaN resamples (e.g. one class only)
            samples.append(v)
    if not samples:
        return {"value": value, "low": float("nan"), "high": float("nan")}
    low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return {"value": value, "low": float(low), "high": float(high)}


def _take(a, idx):
    if isinstance(a, np.ndarray):
        return a[idx]
    return [a[i] for i in idx]


def named_findings(sentence: str) -> set[str]:
    """The CT-RATE findings a sentence names by keyword, asserted or denied."""
    from napari_mg3d.labels import LABELS
    from napari_mg3d.synthetic.vocabulary import KEYWORDS

    low = f" {sentence.lower()} "
    return {label for label in LABELS if any(kw in low for kw in KEYWORDS[label])}


def sentence_findings(sentence: str) -> set[str]:
    """The CT-RATE findings one sentence asserts: those it names by keyword, none if it is negated."""
    from napari_mg3d.reports import is_negated

    return set() if is_negated(sentence) else named_findings(sentence)


def _findings_of_sentences(report: str, denied: bool) -> set[str]:
    from napari_mg3d.reports import is_negated, sentence_texts

    found: set[str] = set()
    for sentence in sentence_texts(report):
        if is_negated(sentence) == denied:
            found |= named_findings(sentence)
    return found


def denied_findings(report: str) -> set[str]:
    """The CT-RATE findings a report denies: named in a negated sentence ("No pleural effusion.")."""
    return _findings_of_sentences(report, denied=True)


def asserted_findings(report: str) -> set[str]:
    """The CT-RATE findings a report asserts: a sentence that names one (by keyword) and is not negated
    ("No pleural effusion." asserts nothing; "There is a small left pleural effusion." asserts it)."""
    return _findings_of_sentences(report, denied=False)


def finding_f1(reports: Sequence[str], truth: np.ndarray, names: Sequence[str]) -> dict:
    """Clinical accuracy of drafted reports: per finding, precision / recall / F1 of the findings the drafts
    assert (:func:`asserted_findings`) against the volumes' true labels ``truth`` (n, F); their macro mean over
    the findings that occur in the truth or in a draft, and the micro F1 over every (volume, finding) pair.
    A finding neither true nor asserted anywhere has no F1 (None). F1 does not see a draft that denies a
    finding the volume has ("No atelectasis." beside atelectasis): ``wrong_denials`` counts those (volume,
    finding) pairs among the ``denials``, and ``wrong_denial_share`` is their share."""
    truth = np.asarray(truth) > 0.5
    def per_name(found: list[set[str]]) -> np.ndarray:
        return np.array([[name in f for name in names] for f in found], bool).reshape(truth.shape)

    said = per_name([asserted_findings(r) for r in reports])
    res = call_f1(said, truth, names)
    denied = per_name([denied_findings(r) for r in reports])
    wrong = int((denied & truth).sum())
    return {**res, "denials": int(denied.sum()), "wrong_denials": wrong,
            "wrong_denial_share": wrong / int(denied.sum()) if denied.any() else None}


def call_f1(said: np.ndarray, truth: np.ndarray, names: Sequence[str]) -> dict:
    """Per finding, precision / recall / F1 of yes/no calls ``said`` (n, F) against ``truth`` (n, F); the macro
    mean over the findings that occur in the truth or in a call (one neither true nor called has F1 None) and
    the micro F1 over every (volume, finding) pair."""
    said, truth = np.asarray(said, bool), np.asarray(truth) > 0.5
    per: dict[str, dict] = {}
    for j, name in enumerate(names):
        tp, fp, fn = int((said[:, j] & truth[:, j]).sum()), int((said[:, j] & ~truth[:, j]).sum()), int((~said[:, j] & truth[:, j]).sum())
        if tp + fp + fn == 0:
            per[name] = {"precision": None, "recall": None, "f1": None, "support": 0}
            continue
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per[name] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    defined = [v["f1"] for v in per.values() if v["f1"] is not None]
    tp, fp, fn = int((said & truth).sum()), int((said & ~truth).sum()), int((~said & truth).sum())
    micro = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"macro_f1": float(np.mean(defined)) if defined else float("nan"), "micro_f1": micro, "per_finding": per}
