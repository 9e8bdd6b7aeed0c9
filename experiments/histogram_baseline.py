"""A floor for the benchmark that learns no features: a logistic regression on each volume's HU histogram.

    python -m experiments.histogram_baseline --tier visible --train 300 --held-out 200

Each model-input volume (the tiny preset's 64³ grid, intensities in [0, 1] for -1000..1000 HU) becomes 40
histogram bins of 50 HU plus the fractions of voxels below -990 HU and -950 HU (air), in -750..-300 HU (ground
glass) and in -300..100 HU (soft tissue, fluid). An L2-regularised logistic regression per finding
(``linear_probe.fit_logistic``, its regularisation chosen on validation volumes) is scored on the held-out
volumes. What it finds, a network trained on the same labels must find too: a supervised classifier below
this floor on a density finding is under-trained, not blind. It cannot see where anything is, so a lesion
that changes few voxels stays near 0.5 here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from napari_mg3d.labels import LABELS
from napari_mg3d.model.config import preset_config
from napari_mg3d.preprocess import preprocess_config_of
from training import metrics
from training.data import SyntheticDataset

from .linear_probe import fit_logistic
from .synthetic_proof import HELD_OUT_SEED, VALIDATION_SEED

HU_BINS = np.linspace(-1000.0, 1000.0, 41)
HU_BANDS = ((-np.inf, -990.0), (-np.inf, -950.0), (-750.0, -300.0), (-300.0, 100.0))


def histogram_features(volume: np.ndarray, hu_window: tuple[float, float] = (-1000.0, 1000.0)) -> np.ndarray:
    """(46,) fractions of voxels per 50-HU bin and per band of a model-input volume scaled to [0, 1]."""
    lo, hi = hu_window
    hu = np.asarray(volume, np.float32).ravel() * (hi - lo) + lo
    bins = np.histogram(hu, bins=HU_BINS)[0] / hu.size
    bands = [np.mean((hu > a) & (hu < b)) for a, b in HU_BANDS]
    return np.concatenate([bins, bands]).astype(np.float32)


def dataset_features(n: int, seed: int, shape, tier: str, cache_dir: str | None, preset: str = "tiny"):
    """(features (n, 46), labels (n, 18)) of synthetic volumes ``seed``..``seed + n - 1``."""
    config = preprocess_config_of(None, preset_config(preset))
    data = SyntheticDataset(n, config, seed=seed, shape=tuple(shape), with_mask=False, tier=tier, cache_dir=cache_dir)
    items = [data[i] for i in range(n)]
    x = np.stack([histogram_features(it["volume"].numpy(), config.hu_window) for it in items])
    y = np.stack([it["labels"].numpy() for it in items])
    return torch.from_numpy(x), y


def baseline(n_train: int, n_val: int, n_test: int, shape, tier: str, cache_dir: str | None,
             cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)) -> dict:
    """Held-out AUC per finding and mean, the regularisation chosen on validation volumes."""
    train = dataset_features(n_train, 0, shape, tier, cache_dir)
    val = dataset_features(n_val, VALIDATION_SEED, shape, tier, cache_dir)
    test = dataset_features(n_test, HELD_OUT_SEED, shape, tier, cache_dir)
    fits = {c: fit_logistic(train[0], train[1], c) for c in cs}
    val_auc = {c: float(np.mean(list(metrics.auc_per_label(val[1], f.logits(val[0]).numpy(), LABELS).values())))
               for c, f in fits.items()}
    best = max(val_auc, key=val_auc.get)
    scores = fits[best].logits(test[0]).numpy()
    boot = metrics.bootstrap_mean_auc(test[1], scores, LABELS)
    return {"tier": tier, "n_train": n_train, "n_val": n_val, "n_test": n_test, "c": best,
            "validation_mean_auc": val_auc, "held_out_mean_auc": boot["value"],
            "se": (boot["high"] - boot["low"]) / 3.92,
            "held_out_auc_per_finding": metrics.auc_per_label(test[1], scores, LABELS)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.histogram_baseline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", default="visible", choices=("hard", "visible"))
    ap.add_argument("--train", type=int, default=300, help="training volumes (seeds 0..)")
    ap.add_argument("--val", type=int, default=100, help="validation volumes (seeds 800000..)")
    ap.add_argument("--held-out", type=int, default=200, help="held-out volumes (seeds 900000..)")
    ap.add_argument("--shape", type=int, nargs=3, default=[80, 112, 144])
    ap.add_argument("--cache-dir", default="runs/cache")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    r = baseline(a.train, a.val, a.held_out, a.shape, a.tier, a.cache_dir or None)
    print(f"histogram baseline ({a.tier}): held-out mean AUC {r['held_out_mean_auc']:.3f} ± {r['se']:.3f}; " + ", ".join(
        f"{k} {v:.2f}" for k, v in r["held_out_auc_per_finding"].items()))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
