"""A PNG of mid-slices with their reports, to judge the phantoms' realism by eye."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .phantom import SyntheticSample


def contact_sheet(samples: list[SyntheticSample], path: str | Path, columns: int = 4) -> Path:
    """PNG of mid-slices (axial through the largest lesion) with the reports, to judge realism."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = int(np.ceil(len(samples) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 5.2 * rows), squeeze=False)
    for ax, s in zip(axes.ravel(), samples):
        lesion = s.lesion_label_map() > 0
        z = int(np.argmax(lesion.sum((1, 2)))) if lesion.any() else s.volume.shape[0] // 2
        ax.imshow(np.clip(s.volume[z], -1000, 400), cmap="gray", vmin=-1000, vmax=400)
        if lesion[z].any():
            ax.contour(lesion[z], levels=[0.5], colors="red", linewidths=0.6)
        text = "\n".join(t[:60] for t in s.sentences[:6])
        ax.set_title(f"seed {s.seed}", fontsize=8)
        ax.text(0, -0.02, text, transform=ax.transAxes, fontsize=6, va="top")
        ax.axis("off")
    for ax in axes.ravel()[len(samples):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
