"""Pictures of a run, for people who read results as pictures: ROC curves per finding, the Recall@K curve,
Dice per class (``evaluate``), and loss curves (``pretrain``, ``finetune``). matplotlib, no display."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(false positive rates, true positive rates, AUC) of binary ``labels`` ranked by ``scores``."""
    from .metrics import auc

    order = np.argsort(-np.asarray(scores, float), kind="stable")
    y = np.asarray(labels, float)[order]
    tpr = np.concatenate([[0.0], np.cumsum(y) / max(1.0, y.sum())])
    fpr = np.concatenate([[0.0], np.cumsum(1 - y) / max(1.0, (1 - y).sum())])
    return fpr, tpr, auc(labels, scores)


def roc_grid(labels: np.ndarray, scores: np.ndarray, names: list[str], path: Path, title: str) -> Path | None:
    """One ROC curve per finding with both classes (false / true positive rate, the chance diagonal, AUC)."""
    keep = [j for j in range(labels.shape[1]) if 0 < labels[:, j].sum() < len(labels)]
    if not keep:
        return None
    plt = _pyplot()
    cols = min(6, len(keep))
    rows = int(np.ceil(len(keep) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.7 * rows), squeeze=False)
    for ax, j in zip(axes.ravel(), keep):
        fpr, tpr, auc = roc_points(labels[:, j], scores[:, j])
        ax.plot(fpr, tpr, color="C0")
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
        ax.set_title(f"{names[j]}\nAUC {auc:.2f} (n+ = {int(labels[:, j].sum())})", fontsize=7)
        ax.set_xlim(-0.03, 1.03), ax.set_ylim(-0.03, 1.03), ax.set_aspect("equal")  # a perfect curve hugs the axes
        ax.tick_params(labelsize=6)
        ax.set_xlabel("false positive rate", fontsize=6), ax.set_ylabel("true positive rate", fontsize=6)
    for ax in axes.ravel()[len(keep):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recall_curve(similarity: np.ndarray, path: Path, recall_at_k) -> Path:
    """Report -> volume Recall@K for every K, against the chance line K / n."""
    plt = _pyplot()
    n = len(similarity)
    ks = np.arange(1, n + 1)
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    ax.plot(ks, [recall_at_k(similarity, int(k)) for k in ks], label="model")
    ax.plot(ks, ks / n, color="0.6", ls="--", label="chance (K / n)")
    ax.set_xlabel(f"K (volumes ranked, of n = {n})"), ax.set_ylabel("Recall@K (fraction of reports)")
    ax.set_xlim(1, n), ax.set_ylim(0, 1.02), ax.legend(fontsize=8)
    ax.set_title("report → volume retrieval", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dice_bars(per_class: dict[str, float | None], path: Path) -> Path | None:
    """Mean Dice per class (classes never present in prediction or target left out)."""
    items = [(k, v) for k, v in per_class.items() if v is not None and v == v]
    if not items:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.32 * len(items) + 1.5), 3.4))
    bars = ax.bar(range(len(items)), [v for _, v in items], color="C2")
    ax.bar_label(bars, labels=[f"{v:.2f}" for _, v in items], fontsize=6, padding=1)  # a Dice of 0 shows too
    ax.set_xticks(range(len(items)), [k for k, _ in items], rotation=70, ha="right", fontsize=7)
    ax.set_ylim(0, 1.08), ax.set_ylabel("Dice (mean over volumes)")
    ax.set_title("segmentation: Dice per class", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(history: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path | None:
    """Each loss term against the optimiser step (log scale where every value is positive)."""
    series = {k: v for k, v in history.items() if v}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for name, points in sorted(series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, label=name, lw=1.2 if name == "total" else 0.9)
    if all(v > 0 for points in series.values() for _, v in points):
        ax.set_yscale("log")
    ax.set_xlabel("optimiser step"), ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
