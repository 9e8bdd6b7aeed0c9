"""Learning curves as a picture: held-out mean AUC (± its standard error) against samples seen, one line per
curve file of ``experiments.supervised_curve``, and the per-finding AUCs of the last curve's points.

    python -m experiments.plot_curves experiments/results/supervised_curve_*.json --out docs/figures/ceiling.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def label_of(result: dict, path: Path) -> str:
    schedule = result.get("schedule", "constant")
    old_auc = "" if result.get("auc") == "ranks" else " (old AUC: a lower bound)"
    return (f"{result.get('arm', path.stem)}, {result.get('n_train', '?')} volumes, lr {result.get('lr')} "
            f"{schedule}{'' if schedule == 'constant' else ' to ' + str(result.get('steps'))}{old_auc}")


def finding_grid(fig, ax, per_step: list[dict[str, float]], steps: list[int], title: str, xlabel: str,
                 vmin: float = 0.5) -> None:
    """AUC per finding (rows, sorted by the last step) at each step (columns), each cell written in."""
    names = sorted(per_step[-1], key=per_step[-1].get)
    grid = np.array([[auc.get(n, np.nan) for auc in per_step] for n in names])
    image = ax.imshow(grid, vmin=vmin, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    dark_below = (vmin + 1.0) / 2
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if grid[i, j] < dark_below else "black")
    ax.set(xlabel=xlabel, title=title)
    fig.colorbar(image, ax=ax, fraction=0.04, label="AUC")


def plot(paths: list[Path], out: Path, target: float = 0.9) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [(p, json.loads(p.read_text())) for p in paths]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [1, 1.25]})
    for path, r in results:
        pts = r["curve"]
        x = [p["samples"] for p in pts]
        y = np.array([p["mean_auc"] for p in pts])
        se = np.array([p.get("se", 0.0) for p in pts])
        left.errorbar(x, y, yerr=se, marker="o", capsize=3, label=label_of(r, path))
    left.axhline(target, color="k", ls="--", lw=1, label=f"ceiling target {target}")
    left.axhline(0.5, color="grey", ls=":", lw=1, label="chance")
    left.set(xlabel="training samples seen", ylabel="held-out mean AUC, 18 findings", ylim=(0.45, 1.0),
             title="Supervised ceiling on the visible tier (trained end to end)")
    left.legend(fontsize=7, loc="lower right")
    last_path, last = results[-1]
    finding_grid(fig, right, [p["auc_per_finding"] for p in last["curve"]], [p["step"] for p in last["curve"]],
                 title=f"per finding: {label_of(last, last_path)}", xlabel="step", vmin=0.5)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m experiments.plot_curves", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("curves", nargs="+", type=Path, help="curve JSON files of experiments.supervised_curve")
    ap.add_argument("--out", type=Path, default=Path("docs/figures/ceiling_visible.png"))
    a = ap.parse_args(argv)
    return plot(a.curves, a.out)


if __name__ == "__main__":
    print(main())
