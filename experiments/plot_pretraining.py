"""Pre-training learning curves as a picture: what a run of ``experiments.synthetic_proof --curve-steps`` has
learnt at each probed step, on held-out volumes, with no labels and no fine-tuning.

    python -m experiments.plot_pretraining runs/proof_visible/full --out docs/figures/pretraining_visible.png \\
        --reference "supervised Swin tiny=0.837" --reference "supervised small CNN=0.905"

Three panels with standard errors: zero-shot mean AUC over the 18 findings (the prompt-pair score, raw and
centred per volume), report -> volume Recall@10 among 100 (chance 0.10), and the pointing game (a finding
sentence's heat-map peak inside its lesion, against the rate of a random cell); a fourth shows the zero-shot
AUC of each finding at each step.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from .plot_curves import finding_grid

ZERO_SHOT = (("zero_shot_sva_auc", "prompt pair"), ("zero_shot_sva_centred_auc", "prompt pair, centred per volume"))


def probe_points(folder: Path) -> list[dict]:
    """The probe results OUT/probe_step{N}.json of one run, in step order."""
    found = []
    for path in Path(folder).glob("probe_step*.json"):
        match = re.fullmatch(r"probe_step(\d+)\.json", path.name)
        if match:
            found.append((int(match.group(1)), json.loads(path.read_text())))
    if not found:
        raise SystemExit(f"{folder}: no probe_step*.json; run experiments.synthetic_proof with --curve-steps first")
    return [point for _, point in sorted(found, key=lambda item: item[0])]


def parse_reference(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    try:
        return (name, float(value)) if sep and name else _bad(text)
    except ValueError:
        return _bad(text)


def _bad(text: str):
    raise SystemExit(f"--reference {text!r}: give NAME=VALUE, e.g. 'supervised Swin tiny=0.837'")


def plot(folder: Path, out: Path, references: list[tuple[str, float]] = (), title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = probe_points(folder)
    steps = [p["steps"] for p in points]
    fig, axes = plt.subplots(1, 4, figsize=(22, 5.2), gridspec_kw={"width_ratios": [1, 1, 1, 1.2]})
    zero, recall, pointing, per = axes
    for key, label in ZERO_SHOT:
        zero.errorbar(steps, [p[f"{key}_mean"] for p in points], yerr=[p.get(f"{key}_se", 0) for p in points],
                      marker="o", capsize=3, label=label)
    for (name, value), color in zip(references, ("tab:red", "k", "tab:purple", "tab:brown", "tab:olive")):
        zero.axhline(value, ls="--", lw=1, color=color, label=name)
    zero.axhline(0.5, color="grey", ls=":", lw=1, label="chance")
    zero.set(xlabel="pre-training step", ylabel="held-out mean AUC, 18 findings", ylim=(0.4, 1.0),
             title="zero-shot classification")
    zero.legend(fontsize=7, loc="upper left")
    for key, label in (("sva", "sentence-volume alignment"), ("global", "global embeddings")):
        recall.errorbar(steps, [p.get(f"recall@10_of_100_{key}", np.nan) for p in points],
                        yerr=[p.get(f"recall@10_of_100_{key}_se", 0) for p in points], marker="o", capsize=3,
                        label=label)
    recall.axhline(0.10, color="grey", ls=":", lw=1, label="chance")
    recall.set(xlabel="pre-training step", ylabel="Recall@10 among 100", ylim=(0, 1), title="report -> volume")
    recall.legend(fontsize=7, loc="upper left")
    pointing.errorbar(steps, [p["pointing_hit_rate"] for p in points], yerr=[p.get("pointing_hit_rate_se", 0)
                      for p in points], marker="o", capsize=3, label="heat-map peak in the lesion")
    pointing.plot(steps, [p["pointing_random_baseline"] for p in points], color="grey", ls=":", marker="x",
                  label="random cell")
    pointing.set(xlabel="pre-training step", ylabel="hit rate", ylim=(0, 1), title="pointing game")
    pointing.legend(fontsize=7, loc="upper left")
    finding_grid(fig, per, [p["zero_shot_sva_auc_per_finding"] for p in points], steps,
                 title="zero-shot AUC per finding (prompt pair)", xlabel="pre-training step", vmin=0.3)
    fig.suptitle(title or f"Pre-training alone, held-out volumes ({points[-1].get('n', '?')}): {folder}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m experiments.plot_pretraining", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the run's folder (OUT/full of experiments.synthetic_proof)")
    ap.add_argument("--out", type=Path, default=Path("docs/figures/pretraining_visible.png"))
    ap.add_argument("--reference", action="append", default=[], type=parse_reference,
                    help="a horizontal line on the zero-shot panel, NAME=VALUE (repeatable)")
    ap.add_argument("--title", default="")
    a = ap.parse_args(argv)
    return plot(a.run, a.out, a.reference, a.title)


if __name__ == "__main__":
    print(main())
