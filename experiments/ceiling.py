"""The benchmark's ceiling: what labels teach the encoder with the budget pre-training gets.

    python -m experiments.ceiling --tier visible --steps 1000 --batch-size 4 --out runs/bench/ceiling
    python -m experiments.ceiling --tier visible --classifier runs/bench/ceiling/bundle   # evaluate only

The same command again continues a run that was stopped (it checkpoints every 100 steps).

A classifier trained end to end on the 18 labels (``training.finetune --task classify`` from scratch, the
same volumes, steps, batch and vision learning rate as the pre-training run it bounds), scored on the
held-out volumes (seeds 900000..) the zero-shot probe uses. A benchmark whose ceiling is near 0.5 decides
nothing; the issue asks for >= 0.90 on the visible tier. Standard errors: bootstrap (1000 resamples of the
volumes), the 95% interval's width / 3.92.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from napari_mg3d.checkpoint import load_bundle
from napari_mg3d.labels import LABELS
from napari_mg3d.preprocess import preprocess_config_of
from training import finetune, metrics
from training.data import SyntheticDataset
from training.evaluate import classifier_ranking_scores

from .synthetic_proof import HELD_OUT_SEED


def mean_auc_with_se(labels: np.ndarray, scores: np.ndarray) -> dict:
    """Mean AUC over the findings present and absent among the volumes, its bootstrap standard error, and
    the AUC per finding."""
    boot = metrics.bootstrap_mean_auc(labels, scores, LABELS)
    per = metrics.auc_per_label(labels, scores, LABELS)
    return {"mean_auc": boot["value"], "se": (boot["high"] - boot["low"]) / 3.92, "n_findings": boot["n_labels"],
            "auc_per_finding": per}


@torch.no_grad()
def classifier_auc(bundle: str | Path, n: int, shape, tier: str, cache_dir: str | None = None,
                   seed: int = HELD_OUT_SEED) -> dict:
    """Held-out mean AUC (with its standard error) of a bundle's trained classifier on ``n`` volumes."""
    b = load_bundle(bundle)
    model = b.model.eval()
    heads, _ = b.build_heads()
    if "classifier" not in heads:
        raise SystemExit(f"{bundle} has no trained classifier; fine-tune one with --task classify")
    data = SyntheticDataset(n, preprocess_config_of(b.meta, model.config), seed=seed, shape=tuple(shape),
                            with_mask=False, tier=tier, cache_dir=cache_dir)
    scores, labels = [], []
    for i in range(n):
        item = data[i]
        enc = model.encode_volume(item["volume"][None])
        scores.append(classifier_ranking_scores(heads["classifier"], enc)[0].numpy())
        labels.append(item["labels"].numpy())
    return {"n": n, "seeds": [seed, seed + n - 1], "tier": tier, **mean_auc_with_se(np.array(labels), np.stack(scores))}


def train_classifier(out: Path, pairs: int, steps: int, batch: int, shape, tier: str, preset: str = "tiny",
                     lr_encoder: float = 2e-4, precision: str = "32-true", cache_dir: str = "",
                     num_workers: int = 1, seed: int = 0) -> Path:
    """The supervised arm, from scratch; returns its bundle (reused when it exists; a run that was stopped
    continues from its checkpoint)."""
    bundle = out / "bundle"
    if (bundle / "config.json").is_file():
        return bundle
    resume = "last" if finetune.checkpoint_path(out).is_file() else ""
    params = finetune.FinetuneParams(
        task="classify", preset=preset, data=f"synthetic:{pairs},{tier}", val_data=f"synthetic:50,{tier}",
        steps=steps, batch_size=batch, lr=1e-3, lr_encoder=lr_encoder, head_norm="batch",
        synthetic_shape=list(shape), precision=precision, cache_dir=cache_dir, num_workers=num_workers, seed=seed,
        out_dir=str(out), log_every=50, checkpoint_every=100, resume=resume)
    return finetune.run(params)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.ceiling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench/ceiling")
    ap.add_argument("--classifier", default="", help="evaluate this classifier bundle instead of training one")
    ap.add_argument("--tier", default="visible", choices=("hard", "visible"))
    ap.add_argument("--preset", default="tiny", choices=("tiny", "base", "large"))
    ap.add_argument("--pairs", type=int, default=2000, help="training volumes (seeds 0..)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr-encoder", type=float, default=2e-4, help="the pre-training run's vision learning rate")
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--shape", type=int, nargs=3, default=[80, 112, 144])
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--cache-dir", default="runs/cache")
    ap.add_argument("--num-workers", type=int, default=1)
    a = ap.parse_args(argv)
    out = Path(a.out)
    bundle = Path(a.classifier) if a.classifier else train_classifier(
        out, a.pairs, a.steps, a.batch_size, a.shape, a.tier, a.preset, a.lr_encoder, a.precision, a.cache_dir,
        a.num_workers)
    result = {"bundle": str(bundle), **classifier_auc(bundle, a.held_out, a.shape, a.tier, a.cache_dir or None)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"classifier_heldout_{a.tier}.json").write_text(json.dumps(result, indent=1))
    print(f"supervised ceiling ({a.tier}): mean AUC {result['mean_auc']:.3f} ± {result['se']:.3f} over "
          f"{result['n_findings']} findings, {a.held_out} held-out volumes; " + ", ".join(
              f"{k} {v:.2f}" for k, v in result["auc_per_finding"].items()))
    return result


if __name__ == "__main__":
    main()
