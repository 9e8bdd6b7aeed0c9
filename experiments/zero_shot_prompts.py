"""Which prompts read a pre-trained bundle's zero-shot finding scores best? Chosen on validation volumes,
reported on the held-out ones.

The product's rule until 2026-12-08 (``napari_mg3d.model.heads.PROMPT_PAIR``) scored a finding by the
sentence-volume alignment ("sva") of "X is present." minus that of "X is not present."; this comparison made
``lobes/pair`` the product's rule (``alignment_prompt_logits(by_lobe=True)``). The training reports say where a
lung finding is ("Atelectasis in the left lower lobe.") and deny in other words ("No atelectasis."), and a
sentence's read-out attends to the region it names, so a prompt without a place may read the wrong region.
This compares rules that differ only in their sentences, all label-free:

- ``pair``: the old product pair; ``pair centred``: its margins centred per volume over the 18 findings;
- ``no-style``: "X." minus "No x." (the reports' way of denying);
- ``lobes/pair`` and ``lobes/no-style``: for a finding of the lung parenchyma, the best of the five
  "X in the <lobe>." minus the pair's or the no-style denial (a finding is present if it is present in some
  lobe); other findings keep the plain rule;
- ``lobes only``: the best lobe sentence alone (other findings: the pair);
- ``ensemble``: the mean of the margins of ``pair``, ``no-style``, ``lobes/pair`` and ``lobes/no-style``.

    python -m experiments.zero_shot_prompts --bundle runs/onego/pretrain/bundle --tier visible \
        --validation 100 --held-out 200 --cache-dir runs/cache --out runs/zero_shot_prompts.json

The rule with the best mean AUC on the validation volumes (seeds from 800000) is marked ``chosen``; every
rule is reported on the held-out volumes (seeds from 900000) with its bootstrap standard error, and the
chosen one's paired difference from ``pair`` with its own bootstrap standard error.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from experiments.synthetic_proof import HELD_OUT_SEED, VALIDATION_SEED, token_features
from napari_mg3d.checkpoint import load_bundle
from napari_mg3d.labels import LABELS, LOBES, LUNG_FINDINGS
from napari_mg3d.model.heads import PROMPT_PAIR
from napari_mg3d.model.text import tokenize_reports
from training import metrics

RULES = ("pair", "pair centred", "no-style", "lobes/pair", "lobes/no-style", "lobes only", "ensemble")


def prompt_sentences(findings: list[str]) -> dict[str, list[str]]:
    """The sentences of every rule, by kind: present / absent (the product's pair), bare / denied (no-style),
    and the five lobe sentences of each finding (F*5, lobe fastest)."""
    lower = [f[0].lower() + f[1:] for f in findings]
    return {"present": [PROMPT_PAIR[0].format(finding=f) for f in findings],
            "absent": [PROMPT_PAIR[1].format(finding=f) for f in findings],
            "bare": [f"{f}." for f in findings],
            "denied": [f"No {x}." for x in lower],
            "lobes": [f"{f} in the {lobe}." for f in findings for lobe in LOBES]}


@torch.no_grad()
def sentence_scores(model, tokens: torch.Tensor, sentences: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """sva score (cosine / temperature) of every sentence on every volume: kind -> (V, S) array (lobes:
    (V, F, 5))."""
    out = {}
    for kind, texts in sentences.items():
        batch = tokenize_reports(model.text.tokenizer, [[t] for t in texts], max_sentences=1)
        _, feats = model.encode_sentences_separately(batch)
        sim = model.sentence_volume_similarity(tokens, feats[:, 0]).t() / model.config.temperature  # (V, S)
        out[kind] = sim.numpy()
    out["lobes"] = out["lobes"].reshape(tokens.shape[0], -1, len(LOBES))
    return out


def rule_margins(s: dict[str, np.ndarray], findings: list[str]) -> dict[str, np.ndarray]:
    """(V, F) margin of every rule (higher: more likely present)."""
    lung = np.array([f in LUNG_FINDINGS for f in findings])
    best_lobe = s["lobes"].max(axis=-1)
    pair = s["present"] - s["absent"]
    no_style = s["bare"] - s["denied"]
    lobes_pair = np.where(lung, best_lobe - s["absent"], pair)
    lobes_no = np.where(lung, best_lobe - s["denied"], no_style)
    return {"pair": pair, "pair centred": pair - pair.mean(axis=1, keepdims=True), "no-style": no_style,
            "lobes/pair": lobes_pair, "lobes/no-style": lobes_no, "lobes only": np.where(lung, best_lobe, pair),
            "ensemble": (pair + no_style + lobes_pair + lobes_no) / 4}


def mean_auc_with_se(labels: np.ndarray, scores: np.ndarray, boot: int = 300) -> dict:
    per = metrics.auc_per_label(labels, scores, LABELS)
    b = metrics.bootstrap_mean_auc(labels, scores, LABELS, n=boot)
    return {"mean_auc": float(np.mean(list(per.values()))), "se": (b["high"] - b["low"]) / 3.92,
            "auc_per_finding": per}


def paired_difference(labels: np.ndarray, a: np.ndarray, b: np.ndarray, boot: int = 300, seed: int = 0) -> dict:
    """Mean AUC of ``a`` minus that of ``b`` on the same volumes, with a bootstrap standard error over volumes."""
    rng = np.random.default_rng(seed)
    keep = [j for j in range(labels.shape[1]) if 0 < labels[:, j].sum() < len(labels)]

    def diff(idx):
        y = labels[idx][:, keep]
        if any(y[:, j].sum() in (0, len(idx)) for j in range(y.shape[1])):
            return None
        return (np.mean([metrics.auc(y[:, j], a[idx][:, keep[j]]) for j in range(len(keep))])
                - np.mean([metrics.auc(y[:, j], b[idx][:, keep[j]]) for j in range(len(keep))]))

    point = diff(np.arange(len(labels)))
    draws = [d for d in (diff(rng.integers(0, len(labels), len(labels))) for _ in range(boot)) if d is not None]
    return {"difference": float(point), "se": float(np.std(draws)), "resamples": len(draws)}


def load_sva_model(bundle: str | Path):
    model = load_bundle(bundle).model.eval()
    if "sva" not in model.config.objectives:
        raise SystemExit(f"{bundle}: pre-trained without the sva objective, so it has no sentence-volume "
                         "read-out to prompt; give a bundle pre-trained with sva")
    return model


def evaluate(model, first_seed: int, n: int, shape, tier: str, cache_dir: str | None) -> dict:
    tokens, labels = token_features(model, first_seed, n, shape, tier, cache_dir=cache_dir)
    margins = rule_margins(sentence_scores(model, tokens, prompt_sentences(list(LABELS))), list(LABELS))
    return {"seeds": [first_seed, first_seed + n - 1], "labels": labels, "margins": margins}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.zero_shot_prompts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="a bundle pre-trained with the sva objective")
    ap.add_argument("--tier", default="visible", choices=("hard", "visible"))
    ap.add_argument("--validation", type=int, default=100, help="validation volumes the rule is chosen on")
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--shape", type=int, nargs=3, default=[80, 112, 144])
    ap.add_argument("--cache-dir", default="runs/cache")
    ap.add_argument("--out", default="runs/zero_shot_prompts.json")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    result: dict = {"bundle": str(a.bundle), "tier": a.tier}
    model = load_sva_model(a.bundle)
    for name, seed, n in (("validation", VALIDATION_SEED, a.validation), ("held_out", HELD_OUT_SEED, a.held_out)):
        r = evaluate(model, seed, n, a.shape, a.tier, a.cache_dir or None)
        result[name] = {"seeds": r["seeds"],
                        "rules": {k: mean_auc_with_se(r["labels"], m) for k, m in r["margins"].items()}}
        if name == "validation":
            result["chosen"] = max(RULES, key=lambda k: result["validation"]["rules"][k]["mean_auc"])
        else:
            result["held_out"]["chosen_minus_pair"] = paired_difference(
                r["labels"], r["margins"][result["chosen"]], r["margins"]["pair"])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    for rule in RULES:
        v, h = result["validation"]["rules"][rule], result["held_out"]["rules"][rule]
        mark = "  <- chosen on validation" if rule == result["chosen"] else ""
        print(f"{rule:16s} validation {v['mean_auc']:.3f} ± {v['se']:.3f}   held-out {h['mean_auc']:.3f} ± {h['se']:.3f}{mark}")
    d = result["held_out"]["chosen_minus_pair"]
    print(f"held-out, chosen minus pair: {d['difference']:+.3f} ± {d['se']:.3f}")
    return result


if __name__ == "__main__":
    main()
