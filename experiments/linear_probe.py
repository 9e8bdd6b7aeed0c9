"""How much does an encoder's volume representation say about each finding? A supervised linear probe.

    python -m experiments.linear_probe --bundle runs/proof/full/bundle --out runs/probe.json
    python -m experiments.linear_probe --bundle random:tiny --tier visible --train 5 20 100   # label efficiency

The tokens F_I (B, N, d) of synthetic volumes are pooled over N (mean, max, or both), standardised with the
training set's statistics, and an L2-regularised logistic regression per finding is fitted on training
volumes (seeds 0.., the pre-training set), its regularisation chosen on validation volumes (seeds 800000..),
and its AUC reported on the held-out volumes (seeds 900000..) that the synthetic benchmark's zero-shot probe
uses. A zero-shot read-out is a linear score of the same tokens (up to the attention read-out), so the probe
is a practical ceiling for it: when zero-shot AUC is close to the probe's, the encoder is the limit, not the
prompts or the scoring rule.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_mg3d.checkpoint import load_bundle
from napari_mg3d.labels import LABELS
from training import metrics

from .synthetic_proof import HELD_OUT_SEED, VALIDATION_SEED, token_features

POOLINGS = {
    "mean": lambda t: t.mean(1),
    "max": lambda t: t.amax(1),
    "mean+max": lambda t: torch.cat([t.mean(1), t.amax(1)], dim=1),
}


@dataclass
class LogisticFit:
    """Standardisation (mean, std of the training features) and weights (d, F), bias (F)."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) / self.std) @ self.weight + self.bias


def fit_logistic(features: torch.Tensor, labels: np.ndarray, c: float, iterations: int = 300) -> LogisticFit:
    """One L2-regularised logistic regression per column of ``labels`` (penalty |W|² / (2 c n)), full batch."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z, y = (features - mean) / std, torch.as_tensor(labels)
    weight = torch.zeros(z.shape[1], y.shape[1], requires_grad=True)
    bias = torch.zeros(y.shape[1], requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ weight + bias, y, reduction="sum") / len(z)
        loss = loss + weight.square().sum() / (2 * c * len(z))
        loss.backward()
        return loss

    optimiser.step(closure)
    return LogisticFit(mean, std, weight.detach(), bias.detach())


def load_encoder(bundle: str | Path):
    """The model of a bundle, or ``random:PRESET``: that preset at a fixed random initialisation (seed 0)."""
    text = str(bundle)
    if text.startswith("random:"):
        from napari_mg3d.model import MG3DModel
        from napari_mg3d.model.config import preset_config

        torch.manual_seed(0)
        return MG3DModel(preset_config(text.partition(":")[2])).eval()
    return load_bundle(bundle).model.eval()


def probe(bundle: str | Path, n_train: int | list[int] = 200, n_val: int = 100, n_test: int = 100,
          shape=(80, 112, 144), cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0), tier: str = "hard",
          cache_dir: str | None = None, draws: int = 1, pool: int = 0) -> dict:
    """Held-out AUC per finding and mean for each pooling, with the regularisation chosen on validation;
    ``n_train`` a list: one probe per training-set size (the first n of the same training volumes).

    With ``draws`` > 1, each size smaller than ``pool`` (default: the largest size) is probed on that many
    random subsets of the first ``pool`` training volumes, the same subsets for every bundle (seeded by size
    and draw), and reports the mean over draws with its standard error: with 5 labelled volumes, which 5
    decides much of the result."""
    model = load_encoder(bundle)
    sizes = [n_train] if isinstance(n_train, int) else list(n_train)
    pool = max(pool, max(sizes))
    train_all = token_features(model, 0, pool, shape, tier, cache_dir)
    val = token_features(model, VALIDATION_SEED, n_val, shape, tier, cache_dir)
    test = token_features(model, HELD_OUT_SEED, n_test, shape, tier, cache_dir)
    out: dict = {"bundle": str(bundle), "tier": tier, "n_val": n_val, "n_test": n_test, "by_train_size": {}}
    if draws > 1:
        out.update(draws=draws, pool=pool)
    for n in sizes:
        if draws > 1 and n < pool:
            out["by_train_size"][str(n)] = _probe_draws(train_all, n, draws, val, test, cs)
        else:
            out["by_train_size"][str(n)] = _probe_poolings((train_all[0][:n], train_all[1][:n]), val, test, cs)
    if isinstance(n_train, int) and draws == 1:  # the single-size layout earlier results use
        out.update(n_train=n_train, poolings=out.pop("by_train_size")[str(n_train)])
    return out


def paired_lead(result: dict, baseline: dict, pooling: str = "mean+max") -> dict[str, dict]:
    """How far ``result``'s probe is ahead of ``baseline``'s at each training-set size both have, paired over
    the draws (the same labelled subsets for every bundle): mean difference of held-out mean AUC and its
    standard error. Both must come from :func:`probe` with the same --draws and --pool."""
    if (result.get("draws"), result.get("pool")) != (baseline.get("draws"), baseline.get("pool")):
        raise ValueError(f"the probes were drawn differently (draws/pool {result.get('draws')}/{result.get('pool')} "
                         f"vs {baseline.get('draws')}/{baseline.get('pool')}); pair only probes made alike")
    out = {}
    for size, poolings in result["by_train_size"].items():
        theirs = baseline["by_train_size"].get(size, {}).get(pooling, {}).get("per_draw")
        mine = poolings[pooling].get("per_draw")
        if mine and theirs:
            diff = np.array(mine) - np.array(theirs)
            out[size] = {"lead": float(diff.mean()), "se": float(diff.std(ddof=1) / np.sqrt(len(diff)))}
    return out


def subset(pool: int, n: int, draw: int) -> np.ndarray:
    """Draw ``draw`` of ``n`` of the first ``pool`` training volumes: the same indices for every bundle."""
    return np.sort(np.random.default_rng([n, draw]).choice(pool, n, replace=False))


def _probe_draws(train_all, n: int, draws: int, val, test, cs) -> dict:
    runs = []
    for k in range(draws):
        idx = torch.as_tensor(subset(len(train_all[0]), n, k))
        runs.append(_probe_poolings((train_all[0][idx], train_all[1][idx.numpy()]), val, test, cs))
    out = {}
    for name in runs[0]:
        values = np.array([r[name]["held_out_mean_auc"] for r in runs])
        findings = runs[0][name]["held_out_auc_per_finding"]
        out[name] = {"held_out_mean_auc": float(values.mean()), "se": float(values.std(ddof=1) / np.sqrt(draws)),
                     "per_draw": values.tolist(), "c_per_draw": [r[name]["c"] for r in runs],
                     "held_out_auc_per_finding": {f: float(np.mean([r[name]["held_out_auc_per_finding"][f]
                                                                    for r in runs])) for f in findings}}
    return out


def _probe_poolings(train, val, test, cs) -> dict:
    out: dict = {}
    for name, pool in POOLINGS.items():
        x_train, x_val, x_test = pool(train[0]), pool(val[0]), pool(test[0])
        fits = {c: fit_logistic(x_train, train[1], c) for c in cs}
        val_auc = {c: float(np.mean(list(metrics.auc_per_label(val[1], f.logits(x_val).numpy(), LABELS).values())))
                   for c, f in fits.items()}
        best = max(val_auc, key=val_auc.get)
        per = metrics.auc_per_label(test[1], fits[best].logits(x_test).numpy(), LABELS)
        out[name] = {"c": best, "validation_mean_auc": val_auc, "held_out_mean_auc": float(np.mean(list(per.values()))),
                                 "held_out_auc_per_finding": per}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.linear_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="",
                    help="model bundle (directory or .zip) whose encoder is probed, or random:PRESET")
    ap.add_argument("--compare", nargs=2, metavar=("RESULT", "BASELINE"), default=None,
                    help="instead of probing: how far the probe in RESULT (a JSON of --out) is ahead of the one in "
                         "BASELINE, paired over their draws")
    ap.add_argument("--train", type=int, nargs="+", default=[200],
                    help="training volumes (seeds 0..); several sizes give one probe each (label efficiency)")
    ap.add_argument("--val", type=int, default=100, help="validation volumes for the regularisation (seeds 800000..)")
    ap.add_argument("--held-out", type=int, default=100, help="held-out volumes (seeds 900000..)")
    ap.add_argument("--shape", type=int, nargs=3, default=[80, 112, 144], help="voxels of the synthetic CTs")
    ap.add_argument("--tier", default="hard", choices=("hard", "visible"), help="the generator's finding style")
    ap.add_argument("--cache-dir", default="", help="preprocessed-volume cache shared with the training runs")
    ap.add_argument("--draws", type=int, default=1,
                    help="probe each training-set size on this many random subsets (mean and standard error)")
    ap.add_argument("--pool", type=int, default=0,
                    help="with --draws: the subsets come from the first POOL training volumes (default: the "
                         "largest --train)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    a = ap.parse_args(argv)
    if a.compare:
        lead = paired_lead(*(json.loads(Path(f).read_text()) for f in a.compare))
        for n, r in lead.items():
            print(f"train {n:>4s} mean+max: {a.compare[0]} ahead of {a.compare[1]} by {r['lead']:+.3f} ± {r['se']:.3f}")
        return lead
    if not a.bundle:
        raise SystemExit("give --bundle to probe, or --compare RESULT BASELINE")
    if a.draws < 1:
        raise SystemExit(f"--draws {a.draws}: give 1 or more")
    sizes = a.train[0] if len(a.train) == 1 else a.train
    result = probe(a.bundle, sizes, a.val, a.held_out, a.shape, tier=a.tier, cache_dir=a.cache_dir or None,
                   draws=a.draws, pool=a.pool)
    by_size = result.get("by_train_size") or {str(result["n_train"]): result["poolings"]}
    for n, poolings in by_size.items():
        for name, r in poolings.items():
            spread = f" ± {r['se']:.3f} over {len(r['per_draw'])} draws" if "se" in r else f" (C={r['c']})"
            print(f"train {n:>4s} {name:9s} held-out mean AUC {r['held_out_mean_auc']:.3f}{spread}; " + ", ".join(
                f"{f} {v:.2f}" for f, v in r["held_out_auc_per_finding"].items()), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
