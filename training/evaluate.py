"""Evaluate an MG-3D bundle with the paper's metrics, each with a bootstrap 95% confidence interval.

    python -m training.evaluate --bundle runs/finetune/bundle --data synthetic:128 --out results.json

Computed where the bundle and the data allow it:
* zero-shot prompt anomaly AUC per label and mean ("{finding} is present." vs "... is not present."), read
  out as ``napari_mg3d.model.scoring`` chooses among the label-free sources: the CT-VocabFine prompt head,
  else sentence-volume alignment, else the MLM pseudo-likelihood; the result names the source it used;
* classification AUC (classifier head) and accuracy at 0.5;
* report -> volume retrieval Recall@5/10/50/100 (cosine of global volume and global report features, as in
  the paper);
* Dice (segmentation head, data with masks);
* BLEU-1..4, METEOR and ROUGE-L, and the findings the drafts assert (report head);
* the pointing game on synthetic data (whose lesions are known): the share of finding sentences whose
  heat-map peak lies in a token cell their lesion covers, beside the rate of a random cell.
Prints a table laid out like the paper's Table II and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from napari_mg3d.inference import Predictor
from napari_mg3d.labels import LABELS, segmentation_target
from napari_mg3d.model.heads import report_memory
from napari_mg3d.model.scoring import SOURCE_TITLES, choose_score_source, finding_scores
from napari_mg3d.model.text import tokenize_reports
from napari_mg3d.model.words import report_text
from napari_mg3d.preprocess import labels_to_model, preprocess_record

from . import figures as G
from . import metrics as M
from .data import SyntheticDataset, build_dataset, collate
from .params import run_cli

log = logging.getLogger("training.evaluate")


def refuse_non_finite(scores: np.ndarray, names: list[str], what: str) -> None:
    """An AUC of NaN scores would rank them arbitrarily and look like a result: refuse, naming what broke."""
    bad = ~np.isfinite(scores)
    if bad.any():
        findings = [n for n, b in zip(names, bad.any(0)) if b]
        raise SystemExit(f"{what}: {int(bad.any(1).sum())} of {len(scores)} volumes got NaN/inf scores "
                         f"({', '.join(findings[:4])}{', ...' if len(findings) > 4 else ''}); no AUC is computed "
                         "from them. The model is probably broken (a diverged run)")


def classifier_ranking_scores(head, encoding) -> torch.Tensor:
    """Scores whose order per class is the classifier's, without saturating (B, n_classes), float64: the
    logits of a multi-label head, the log-softmax of a one-class-per-volume head. A float32 sigmoid or softmax
    makes every logit above ~17 exactly 1.0, a tie that an AUC cannot rank."""
    with torch.no_grad():
        logits = head.classify(encoding).double()
    return logits if head.multilabel else torch.log_softmax(logits, dim=-1)


LESION_CELL_OVERLAP = 0.25  # a token cell belongs to a lesion when its densest model voxel is this much lesion


class PointingHit(NamedTuple):
    """One finding sentence in the pointing game: its heat map's peak in its lesion (``hit``), the hit rate of
    a uniformly random cell (``chance``) and the finding it describes (``finding``)."""

    hit: bool
    chance: float
    finding: str


@torch.no_grad()
def sample_pointing(model, encoding, text, sample, record, sentences=None) -> list[PointingHit]:
    """The pointing game on one synthetic ``sample`` (``encoding`` and ``text`` of batch size 1, ``record`` its
    preprocessing; ``sentences``: the sentences' projected features when already computed): one
    :class:`PointingHit` for each of its sentences that describes a lesion."""
    if sentences is None:
        _, sentences = model.encode_sentences_separately(text)
    heat = model.sentence_heatmaps(encoding, sentences, text.sentence_valid)[0].float().cpu()  # (S, gz, gy, gx)
    out = []
    for k, names in enumerate(sample.sentence_links[: heat.shape[0]]):
        if not names:
            continue
        mask = np.zeros(sample.volume.shape, np.uint8)
        for name in names:
            mask[sample.lesions[name]] = 1
        share = torch.from_numpy(labels_to_model(mask, record, representation="probabilities")[1]).float()
        cells = F.adaptive_max_pool3d(share[None, None], heat.shape[1:])[0, 0] > LESION_CELL_OVERLAP
        hit = M.pointing_hit(heat[k].numpy(), cells.numpy())
        if hit is not None:
            out.append(PointingHit(*hit, sample.lesion_labels[names[0]]))
    return out


def pointing_per_finding(hits: list[PointingHit]) -> dict[str, dict]:
    """Hit rate, random-cell rate and number of sentences of each finding, in LABELS order."""
    found = {h.finding for h in hits}
    out = {}
    for finding in [f for f in LABELS if f in found] + sorted(found - set(LABELS)):
        mine = [h for h in hits if h.finding == finding]
        out[finding] = {"hit_rate": float(np.mean([h.hit for h in mine])),
                        "chance": float(np.mean([h.chance for h in mine])), "n": len(mine)}
    return out


@torch.no_grad()
def collect(predictor: Predictor, data: str, seed: int, synthetic_shape, limit: int = 0) -> dict:
    """Run the model over the data once; keep what every metric needs."""
    model, heads, cfg = predictor.model, predictor.heads, predictor.config
    ds = build_dataset(data, predictor.preprocess_config, None, seed, tuple(synthetic_shape))
    if getattr(ds, "target", None) is not None and "segmentation" in heads:
        ds.target = segmentation_target(predictor.class_names) or "lesions"
    from tqdm import tqdm

    loader = tqdm(DataLoader(ds, batch_size=1, collate_fn=collate), desc="evaluating", total=len(ds))
    names = predictor.label_names
    zero_shot = choose_score_source(heads, cfg, zero_shot=True)
    out: dict[str, list] = {k: [] for k in ("labels", "zero_shot", "classifier", "global_v", "global_t",
                                            "dice", "dice_per_class", "generated", "reference", "pointing")}
    out["zero_shot_source"] = [zero_shot]
    dev = predictor.device
    for i, batch in enumerate(loader):
        if batch is None:
            continue
        if limit and i >= limit:
            break
        x = batch["volume"].to(dev)
        enc = model.encode_volume(x)
        text = tokenize_reports(model.text.tokenizer, batch["sentences"], cfg.max_words, cfg.max_sentences,
                                cfg.max_sentence_words).to(dev)
        # one classifier pass (with its own encoder, a second encoding) for its scores and the draft reading them
        ranking = classifier_ranking_scores(heads["classifier"], enc) if "classifier" in heads else None
        out["global_v"].append(enc.global_feature[0].cpu())
        out["global_t"].append(model.global_text(model.encode_text(text))[0].cpu())
        if isinstance(ds, SyntheticDataset):
            sample = ds.sample(i)  # its lesions; the volume was preprocessed once, by the dataset
            record = preprocess_record(sample.volume.shape, sample.affine, predictor.preprocess_config)
            out["pointing"] += sample_pointing(model, enc, text, sample, record)
        if batch["labels"] is not None:
            out["labels"].append(batch["labels"][0].numpy())
            if zero_shot is not None:
                out["zero_shot"].append(finding_scores(zero_shot, model, heads, enc, names)[0].float().cpu().numpy())
            if ranking is not None:
                out["classifier"].append(ranking[0].cpu().numpy())
        if "segmentation" in heads and batch["mask"] is not None:
            pred = heads["segmentation"](x, enc.features).argmax(1)[0].cpu()
            per_class = M.dice_per_class(pred, batch["mask"][0], len(predictor.class_names) or int(pred.max()) + 1)
            out["dice_per_class"].append(per_class)
            volume_dice = M.mean_defined(per_class)
            if volume_dice == volume_dice:  # a volume with no class in prediction or target has no Dice
                out["dice"].append(volume_dice)
        if "report" in heads:
            probabilities = None if ranking is None else heads["classifier"].probabilities(ranking).float()
            ids = heads["report"].generate(report_memory(heads["report"], enc.tokens, probabilities))[0]
            spec = predictor.bundle.meta.get("head_specs", {}).get("report", {})
            out["generated"].append(report_text(ids, spec, model.text.tokenizer))
            out["reference"].append(batch["report"][0])
    return out


def evaluate(bundle: str, data: str, n_boot: int = 1000, seed: int = 0, synthetic_shape=(96, 128, 160),
             limit: int = 0, device: str = "auto", figures_dir: str | Path | None = None,
             keep_drafts: bool = False) -> dict:
    """The metrics as a dict; with ``figures_dir``, also ROC curves per finding, the Recall@K curve, Dice per
    class (PNG) and the table (markdown) there; with ``keep_drafts``, every drafted report beside its
    reference (``drafts``), not only three examples."""
    predictor = Predictor(bundle, device=device)
    figures = Path(figures_dir) if figures_dir else None
    if figures:
        figures.mkdir(parents=True, exist_ok=True)
    drawn: list[str] = []
    c = collect(predictor, data, seed, synthetic_shape, limit)
    names = predictor.label_names
    res: dict = {"bundle": str(bundle), "data": data, "n_volumes": len(c["global_v"])}
    if c["labels"]:
        Y = np.stack(c["labels"])
        for key, title in (("zero_shot", "zero_shot_auc"), ("classifier", "classifier_auc")):
            if c[key]:
                P = np.stack(c[key])
                refuse_non_finite(P, names, f"{title.replace('_auc', '')} scores of {bundle}")
                res[title] = M.bootstrap_mean_auc(Y, P, names, n=n_boot, seed=seed)
                res[title + "_per_label"] = M.auc_per_label(Y, P, names)
                if figures and G.roc_grid(Y, P, names, figures / f"roc_{key}.png",
                                          f"ROC per finding: {key.replace('_', '-')} scores, n = {len(Y)} volumes"):
                    drawn.append(f"roc_{key}.png")
                if key == "zero_shot":
                    res["zero_shot_source"] = SOURCE_TITLES[c["zero_shot_source"][0]]
                if key == "classifier":
                    # P ranks (logits or log-probabilities); the decision threshold is p = 0.5 of the probability
                    cut = 0.0 if predictor.heads["classifier"].multilabel else float(np.log(0.5))
                    res["classifier_accuracy"] = M.bootstrap(
                        lambda y, p, cut=cut: float(((p > cut) == (y > 0.5)).mean()), Y, P, n=n_boot, seed=seed)
                    # the findings it calls present (p > 0.5): what a draft that said exactly those would score
                    res["classifier_finding_f1"] = M.call_f1(P > cut, Y, names)
    if len(c["global_v"]) > 1:
        V = F.normalize(torch.stack(c["global_v"]), dim=-1)
        T = F.normalize(torch.stack(c["global_t"]), dim=-1)
        S = (T @ V.t()).numpy()
        n = len(S)
        for k in (5, 10, 50, 100):
            if k < n:
                res[f"recall@{k}"] = {"value": M.recall_at_k(S, k), "chance": k / n}
        if figures:
            drawn.append(G.recall_curve(S, figures / "recall_at_k.png", M.recall_at_k).name)
    if c["dice"]:
        res["dice"] = M.bootstrap(lambda d: float(np.mean(d)), np.array(c["dice"]), n=n_boot, seed=seed)
        classes = predictor.class_names[1:] or [f"class {k}" for k in range(1, len(c["dice_per_class"][0]) + 1)]
        res["dice_per_class"] = {name: (None if v != v else v) for name, v in
                                 zip(classes, (M.mean_defined(col) for col in zip(*c["dice_per_class"])))}
        if figures and G.dice_bars(res["dice_per_class"], figures / "dice_per_class.png"):
            drawn.append("dice_per_class.png")
    if c["pointing"]:
        hits = np.array([h.hit for h in c["pointing"]], float)
        res["pointing"] = {**M.bootstrap(lambda h: float(np.mean(h)), hits, n=n_boot, seed=seed),
                           "chance": float(np.mean([h.chance for h in c["pointing"]])), "n_sentences": len(hits)}
        res["pointing_per_finding"] = pointing_per_finding(c["pointing"])
    if c["generated"]:
        gen, ref = c["generated"], c["reference"]
        for k in range(1, 5):
            res[f"bleu{k}"] = M.bootstrap(lambda a, b, k=k: M.bleu(list(a), list(b), k), gen, ref, n=min(n_boot, 200), seed=seed)
        res["rougeL"] = M.bootstrap(lambda a, b: M.rouge_l(list(a), list(b)), gen, ref, n=min(n_boot, 200), seed=seed)
        res["meteor"] = M.bootstrap(lambda a, b: M.meteor(list(a), list(b)), gen, ref, n=min(n_boot, 200), seed=seed)
        if c["labels"] and len(c["labels"]) == len(gen) and set(names) <= set(LABELS):  # the keyword rule's labels
            res["finding_f1"] = M.finding_f1(gen, np.stack(c["labels"]), names)
        res["text_tokenisation"] = M.TEXT_TOKENISATION
        res["examples"] = [{"generated": g, "reference": r} for g, r in list(zip(gen, ref))[:3]]
        if keep_drafts:
            res["drafts"] = [{"generated": g, "reference": r} for g, r in zip(gen, ref)]
    if figures:
        (figures / "results.md").write_text(format_table(res) + "\n")
        res["figures"] = drawn + ["results.md"]
    return res


def format_table(res: dict) -> str:
    def cell(key):
        v = res.get(key)
        if v is None:
            return "-"
        if "low" in v:
            chance = f" (chance {100 * v['chance']:.2f})" if "chance" in v else ""
            return f"{100 * v['value']:.2f} [{100 * v['low']:.2f}, {100 * v['high']:.2f}]{chance}"
        if "chance" in v:
            return f"{100 * v['value']:.2f} (chance {100 * v['chance']:.2f})"
        return f"{100 * v['value']:.2f}"

    cols = [("Dice (%)", "dice"), ("AUC (%)", "classifier_auc"), ("BLEU-1", "bleu1"), ("BLEU-2", "bleu2"),
            ("BLEU-3", "bleu3"), ("BLEU-4", "bleu4"), ("METEOR", "meteor"), ("ROUGE-L", "rougeL"),
            ("zero-shot AUC (%)", "zero_shot_auc")]
    cols += [(f"Recall@{k}", f"recall@{k}") for k in (5, 10, 50, 100) if f"recall@{k}" in res]
    if "pointing" in res:
        cols.append(("pointing (%)", "pointing"))
    if "finding_f1" in res:
        res = {**res, "finding_macro_f1": {"value": res["finding_f1"]["macro_f1"]}}
        cols.append(("finding F1 of drafts (macro)", "finding_macro_f1"))
    head = "| " + " | ".join(c for c, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    row = "| " + " | ".join(cell(k) for _, k in cols) + " |"
    source = f"; zero-shot scores from {res['zero_shot_source']}" if res.get("zero_shot_source") else ""
    for key in ("classifier_auc", "zero_shot_auc"):
        if key in res and "n_labels" in res[key]:
            source += f"; {key.replace('_auc', '').replace('_', '-')} AUC: mean over {res[key]['n_labels']} findings with both classes"
    if "text_tokenisation" in res:
        source += f"; text metrics on {res['text_tokenisation']} tokens, METEOR exact-match only"
    return f"{head}\n{sep}\n{row}\n\n(n = {res['n_volumes']} volumes; 95% bootstrap intervals in brackets{source})"


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(_main, argv)


def _main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="model bundle (directory or .zip)")
    ap.add_argument("--data", default="synthetic:128", help="evaluation data (same syntax as pretrain --data)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    ap.add_argument("--limit", type=int, default=0, help="evaluate at most this many volumes (0: all)")
    ap.add_argument("--seed", type=int, default=12345, help="seed (synthetic data and bootstrap)")
    ap.add_argument("--synthetic-shape", type=int, nargs=3, default=[96, 128, 160])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="", help="write the results as JSON here, and beside it the ROC curves, the "
                    "Recall@K curve, Dice per class (PNG) and results.md")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    a = ap.parse_args(argv)
    res = evaluate(a.bundle, a.data, a.bootstrap, a.seed, a.synthetic_shape, a.limit, a.device,
                   figures_dir=Path(a.out).parent if a.out else None)
    print(format_table(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2, default=float))
        print(f"wrote {a.out}")
    return res



def cli() -> None:
    """The console script: ``main`` without its return value (which the script would print as an error)."""
    main()


if __name__ == "__main__":
    main()
