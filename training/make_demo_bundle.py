"""Make the demo bundle the napari widget and `make demo` use by default, in one go:

    python -m training.make_demo_bundle                     # on the CPU or a GPU (short default schedule)
    python -m training.make_demo_bundle --pretrain-steps 50 --finetune-steps 20 --out runs/quick  # a smoke run

Pre-trains the tiny preset on synthetic chest CTs of one finding tier (``visible`` by default: every finding
large and contrasted enough for the 64³ model grid), then fine-tunes, one after another, a segmentation head
(9 organs and one class for a lesion of any kind, whose kind the scores and heat maps suggest), a classifier
for the 18 CT-RATE abnormalities (with its own copy of the encoder) and a word-level report decoder that
also reads the classifier's probability of each finding. Every generated volume is preprocessed once
into ``--cache-dir``; each stage keeps its bundle in ``--work``, so a rerun with the same settings continues
from the first stage not yet done.

Then it measures the bundle on ``--held-out`` synthetic volumes of the same tier that no stage trained on
(seeds from 900000) against the targets of the demo model (organ Dice, lesion Dice, classifier AUC, real words
and finding F1 of the drafts, the pointing game of the heat maps, and the demo's own sample), and writes them
into the bundle's model card: each target with its measurement and whether it is met. A missed target stays
in the card as missed. The result (float16, without the pre-training-only heads) goes to
napari_mg3d/assets/demo_bundle. Pre-training follows the recipe measured on the synthetic benchmark
(docs/benchmark.md); what the shipped bundle meets and misses is in docs/training.md and its model card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_mg3d.checkpoint import load_bundle, save_bundle
from napari_mg3d.labels import LABELS, ORGANS
from napari_mg3d.model.words import words_of

from . import finetune, pretrain
from .params import PretrainParams, made_with

DEST = Path(__file__).resolve().parents[1] / "napari_mg3d" / "assets" / "demo_bundle"
HELD_OUT_SEED = 900_000  # training data are seeds 0.. (pre-training) and 100.. (fine-tunes): far below this
# The pre-training recipe shown to learn on the synthetic benchmark's visible tier (docs/benchmark.md): the
# paper's six objectives plus sentence-volume alignment (zero-shot scores, retrieval), 3,000 steps of batch 8
# on 8,000 pairs, one peak learning rate for encoder and fusion, 10% warm-up then cosine.
PRETRAIN_OBJECTIVES = ("mim", "mlm", "sfr", "cml", "ssm", "dfa", "sva")
PRETRAIN_STEPS, PRETRAIN_LR = 3000, 5e-4
FINETUNE_STEPS = {"segment": 1200, "classify": 6000, "report": 12000}
FINETUNE_BATCH = {"segment": 2, "classify": 8, "report": 2}
# The classifier fine-tunes its own copy of the encoder (--own-encoder): on the shared encoder, batch 8 for
# 3,000 steps took the classifier from 0.81 to 0.92 mean AUC but the heat maps' pointing from 0.74 to 0.51
# and the lesion Dice from 0.79 to 0.68 (docs/training.md, demo bundle v6).
FINETUNE_SETTINGS = {"segment": {"seg_target": "organs+lesion", "lr": 1e-3, "lr_encoder": 1e-4},
                     "classify": {"lr": 1e-3, "lr_encoder": 3e-4, "own_encoder": True},
                     "report": {"lr": 5e-4, "lr_encoder": 0.0, "freeze_encoder": True, "finding_prompts": True}}
# The report decoder reads the classifier's probability of each finding (--finding-prompts) and trains 12,000
# steps: on 200 held-out volumes macro finding F1 0.49 without the prompts, 0.65 with them (3,000 steps on 2,000
# pairs), 0.69 at 6,000 and 0.72 at 12,000 steps on 8,000 (docs/training.md, demo bundle v7).
# Each stage's seed (its data order and initialisation) by name, so that a rerun of some stages (--tasks) trains
# them as the whole recipe does.
FINETUNE_SEED = {"segment": 100, "classify": 101, "report": 102}
ORGAN_DICE, LESION_DICE, CLASSIFIER_AUC, FINDING_F1, POINTING, DEMO_HITS = 0.80, 0.50, 0.90, 0.70, 0.60, 2


def _row(output: str, metric: str, target: float, measured: float | None, **extra) -> dict:
    met = None if measured is None or measured != measured else bool(measured >= target)
    return {"output": output, "metric": metric, "target": target, "measured": measured, "met": met, **extra}


def _lowest(values: dict, k: int = 3) -> str:
    """The ``k`` lowest of name -> value (None and NaN left out), lowest first: "Lung nodule 0.11, ..."."""
    items = sorted((v, n) for n, v in values.items() if v is not None and v == v)[:k]
    return ", ".join(f"{n} {v:.2f}" for v, n in items)


def shortfalls(res: dict, known_words: set[str], demo_hits: list[dict] | None) -> dict[str, str]:
    """Per target metric, where a miss comes from, measured: the findings lowest on it, the words that are not
    report words, the demo sentences that missed. The model card keeps it beside each missed target."""
    out = {}
    if res.get("classifier_auc_per_label"):
        out["mean AUC over the 18 findings"] = "lowest: " + _lowest(res["classifier_auc_per_label"])
    drafts = [e["generated"] for e in res.get("drafts", [])]
    unknown = sorted({w for d in drafts for w in words_of(d) if w[0].isalnum() and w not in known_words})
    if unknown:
        out["share of drafted words that occur in reports"] = "not report words: " + ", ".join(unknown[:8])
    f1 = res.get("finding_f1") or {}
    if f1.get("per_finding"):
        text = "lowest: " + _lowest({n: v["f1"] for n, v in f1["per_finding"].items()})
        own = (res.get("classifier_finding_f1") or {}).get("macro_f1")
        if own is not None:
            text += f"; the classifier's own calls (p > 0.5), which the drafts read, reach {own:.2f}"
        out["finding F1 (macro over findings)"] = text
    per_finding = res.get("pointing_per_finding") or {}
    if per_finding:
        out["pointing game: peak in the sentence's lesion"] = "lowest: " + _lowest(
            {n: v["hit_rate"] for n, v in per_finding.items() if v.get("n")})
    missed = [h["sentence"] for h in demo_hits or [] if not h["peak_in_lesion"]]
    if missed:
        out["finding sentences peaking in their lesion"] = "missed: " + " ".join(missed)
    return out


def real_word_share(drafts: list[str], known: set[str]) -> float | None:
    """The share of the drafts' word tokens (punctuation left out) that are words of ``known``."""
    words = [w for d in drafts for w in words_of(d) if w[0].isalnum()]
    return float(np.mean([w in known for w in words])) if words else None


def demo_targets(res: dict, known_words: set[str], demo_hits: list[dict] | None) -> list[dict]:
    """The demo model's targets, each beside what ``res`` (:func:`training.evaluate.evaluate` on held-out
    volumes) measured; ``met`` is None where nothing was measured (the bundle lacks the head)."""
    per_class = res.get("dice_per_class") or {}
    rows = [_row(f"organ: {o}", "Dice", ORGAN_DICE, per_class.get(o)) for o in ORGANS]
    if "lesion" in per_class:  # one class for a lesion of any kind (the organs+lesion target)
        rows.append(_row("lesions (one class, any kind)", "Dice, mean over the volumes with a lesion", LESION_DICE,
                         per_class["lesion"]))
    else:
        lesions = [per_class[k] for k in LABELS if per_class.get(k) is not None]
        rows.append(_row("lesions (every lesion class present, mean)", "Dice", LESION_DICE,
                         float(np.mean(lesions)) if lesions else None, classes=len(lesions)))
    auc = res.get("classifier_auc") or {}
    rows.append(_row("abnormality scores (classifier)", "mean AUC over the 18 findings", CLASSIFIER_AUC,
                     auc.get("value"), interval=[auc.get("low"), auc.get("high")] if auc else None))
    drafts = [e["generated"] for e in res.get("drafts", [])]
    rows.append(_row("drafted report", "share of drafted words that occur in reports", 1.0,
                     real_word_share(drafts, known_words) if drafts else None))
    f1 = res.get("finding_f1") or {}
    rows.append(_row("drafted report", "finding F1 (macro over findings)", FINDING_F1, f1.get("macro_f1"),
                     micro_f1=f1.get("micro_f1"), wrong_denial_share=f1.get("wrong_denial_share")))
    pointing = res.get("pointing") or {}
    rows.append(_row("heat maps", "pointing game: peak in the sentence's lesion", POINTING, pointing.get("value"),
                     chance=pointing.get("chance"), sentences=pointing.get("n_sentences")))
    hits = None if demo_hits is None else float(sum(h["peak_in_lesion"] for h in demo_hits))
    rows.append(_row("heat maps on the demo's own sample", "finding sentences peaking in their lesion", DEMO_HITS,
                     hits, of=len(demo_hits or [])))
    why = shortfalls(res, known_words, demo_hits)
    for row in rows:
        if row["met"] is False and row["metric"] in why:
            row["shortfall"] = why[row["metric"]]
    return rows


def demo_sample_pointing(bundle: str | Path, tier: str) -> list[dict]:
    """The demo's check on its own sample (``python -m napari_mg3d.demo``), without the viewer."""
    from napari_mg3d.demo import demo_sample, finding_sentence_pointing
    from napari_mg3d.inference import Predictor
    from napari_mg3d.volume import Volume

    sample = demo_sample(tier=tier)
    predictor = Predictor(bundle)
    predictor.encode(Volume(sample.volume, sample.affine))
    return finding_sentence_pointing(sample.sentences, lambda i: predictor.heatmap(sample.sentences[i]), sample)


def known_words(res: dict, bundle_meta: dict) -> set[str]:
    """Words that reports use: those of the held-out reports and of the report decoder's vocabulary (built
    from its training reports)."""
    vocabulary = ((bundle_meta.get("head_specs") or {}).get("report") or {}).get("vocabulary") or {}
    return {w for d in res.get("drafts", []) for w in words_of(d["reference"])} | set(vocabulary.get("words", []))


def measure(bundle: str | Path, n: int, tier: str, shape) -> dict:
    """The held-out measurements and the target table of ``bundle``."""
    from .evaluate import evaluate

    t0 = time.perf_counter()
    res = evaluate(str(bundle), f"synthetic:{n},{tier}", n_boot=500, seed=HELD_OUT_SEED, synthetic_shape=shape,
                   keep_drafts=True)
    hits = demo_sample_pointing(bundle, tier)
    return {"held_out": {"data": f"synthetic:{n},{tier}", "seeds": [HELD_OUT_SEED, HELD_OUT_SEED + n - 1],
                         "seconds": round(time.perf_counter() - t0, 1)},
            "targets": demo_targets(res, known_words(res, load_bundle(bundle).meta), hits),
            "demo_sample_pointing": hits, "metrics": res}


def pretrain_params(out: Path, data: str, steps: int, batch_size: int, shape: list[int], run_with: dict,
                    **kw) -> PretrainParams:
    """The pre-training stage: the recipe measured on the synthetic benchmark (PRETRAIN_*), so that a finished
    benchmark run (``experiments.synthetic_proof``, same data, steps and batch) counts as this stage."""
    return PretrainParams(
        data=data, max_steps=steps, batch_size=batch_size, out_dir=str(out), synthetic_shape=list(shape),
        objectives=list(PRETRAIN_OBJECTIVES), warmup_steps=max(1, steps // 10), lr_vision=PRETRAIN_LR,
        lr_fusion=PRETRAIN_LR, checkpoint_every=100, log_every=5, progress=False, **run_with, **kw)


def continue_or_set_aside(params: finetune.FinetuneParams, stage: Path) -> finetune.FinetuneParams:
    """A fine-tune stage interrupted earlier: continue it when its checkpoint has these settings; otherwise
    (it was started with other settings, e.g. other step counts) rename its folder to ``<stage>.stale-<time>``,
    said on the console, and start afresh. Nothing is deleted."""
    checkpoint = finetune.checkpoint_path(stage)
    if not checkpoint.is_file():
        return params
    try:
        recorded = dict(torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)["params"])
    except Exception:  # noqa: BLE001 - unreadable: as stale as one with other settings
        recorded = {}
    differ = finetune.differing_options(recorded, params)
    if recorded and not differ:
        params.resume = "last"
        return params
    stale = stage.with_name(f"{stage.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    stage.rename(stale)
    print(f"{stage} held an interrupted run with other settings ({', '.join(differ) or 'unreadable checkpoint'}); "
          f"moved it to {stale} and starting this stage afresh", flush=True)
    return params


def made_from_nothing_seconds(meta: dict, measuring: float) -> float | None:
    """Wall time of every stage the bundle still owes something to (superseded ones left out), each however
    often it was resumed or reused, plus the held-out measurement; None when a stage did not record its time
    (stages made before 2026-12-08)."""
    from napari_mg3d.model_card import derive_model_card

    stages = [s for s in derive_model_card(meta)["trained_on"]["steps"] if not s.get("superseded")]
    if not stages or any(s.get("seconds") is None for s in stages):
        return None
    return round(sum(s["seconds"] for s in stages) + measuring, 1)


def default_precision() -> str:
    """bf16 autocast where it pays: a CUDA GPU, or a CPU with AMX (measured 1.47x per step on 2 cores)."""
    if torch.cuda.is_available():
        return "bf16-mixed"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "32-true"
    return "bf16-mixed" if "amx_bf16" in flags else "32-true"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m training.make_demo_bundle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/demo_bundle", help="working folder for the stages")
    ap.add_argument("--out", default=str(DEST), help="where the final bundle goes")
    ap.add_argument("--tier", default="visible", choices=("visible", "hard"), help="synthetic finding tier")
    ap.add_argument("--pairs", type=int, default=8000, help="synthetic volume-report pairs (seeds 0..)")
    ap.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    ap.add_argument("--finetune-steps", type=int, default=None,
                    help="steps of every fine-tune (default: " + ", ".join(f"{k} {v}" for k, v in FINETUNE_STEPS.items())
                         + "; a segmentation step costs ~8 classifier steps on a CPU)")
    ap.add_argument("--finetune-batch-size", type=int, default=None,
                    help="batch of every fine-tune (default: " + ", ".join(f"{k} {v}" for k, v in FINETUNE_BATCH.items())
                         + ")")
    ap.add_argument("--batch-size", type=int, default=8, help="pre-training batch")
    ap.add_argument("--input-size", type=int, nargs=3, default=None, help="override the tiny preset's 64x64x64")
    ap.add_argument("--synthetic-shape", type=int, nargs=3, default=[80, 112, 144])
    ap.add_argument("--text-encoder", default="", help="text encoder (default: the preset's)")
    ap.add_argument("--conv-stages", type=int, default=None,
                    help="convolutional early encoder stages (0: the paper's Swin; default: the preset's, 2)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cache-dir", default="runs/cache", help="keep each preprocessed volume here (float16)")
    ap.add_argument("--precision", default="", help="32-true | bf16-mixed (default: bf16 on a GPU or an AMX CPU)")
    ap.add_argument("--held-out", type=int, default=50, help="held-out volumes the targets are measured on")
    ap.add_argument("--from-bundle", default="", help="skip pre-training and start the fine-tunes from this bundle")
    ap.add_argument("--tasks", nargs="+", default=["segment", "classify", "report"],
                    help="fine-tunes to run, in order (segment, classify, report)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    work = Path(a.work)
    shape = list(a.synthetic_shape)
    data = f"synthetic:{a.pairs},{a.tier}"
    run_with = {"num_workers": a.workers, "cache_dir": a.cache_dir, "precision": a.precision or default_precision()}

    bundle = Path(a.from_bundle) if a.from_bundle else work / "pretrain" / "bundle"
    if not a.from_bundle:
        params = pretrain_params(work / "pretrain", data, a.pretrain_steps, a.batch_size, shape, run_with,
                                 input_size=a.input_size, text_encoder=a.text_encoder,
                                 conv_stages=a.conv_stages)
        if not made_with(bundle, params):
            params.resume = "last" if (work / "pretrain" / "checkpoints" / "last.ckpt").exists() else ""
            bundle = pretrain.run(params)
    for task in a.tasks:
        params = finetune.FinetuneParams(
            task=task, bundle=str(bundle), data=data, val_data=f"synthetic:16,{a.tier}",
            steps=a.finetune_steps or FINETUNE_STEPS[task], batch_size=a.finetune_batch_size or FINETUNE_BATCH[task],
            seed=FINETUNE_SEED[task], synthetic_shape=shape, out_dir=str(work / task), log_every=10, **run_with,
            **FINETUNE_SETTINGS[task])
        done = work / task / "bundle"
        bundle = done if made_with(done, params) else finetune.run(continue_or_set_aside(params, work / task))

    final = load_bundle(bundle)
    heads, specs = final.build_heads(skip=("mim_decoder", "mlm_head"))  # pre-training heads: not needed
    card = measure(bundle, a.held_out, a.tier, shape)
    meta = {**final.meta, "head_specs": specs,
            "model_card": {"held_out": card["held_out"], "targets": card["targets"],
                           "made_in_seconds": made_from_nothing_seconds(final.meta, card["held_out"]["seconds"])}}
    meta["made_by"] = " ".join(["python -m training.make_demo_bundle", *(sys.argv[1:] if argv is None else argv)])
    meta["made_in_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    save_bundle(out, final.model, heads=heads, meta=meta, embed_text_encoder=False, dtype=torch.float16)
    (work / "held_out_measurements.json").write_text(json.dumps(card, indent=1, default=str))
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    total = meta["model_card"]["made_in_seconds"]
    print(f"demo bundle: {out} ({size_mb:.1f} MB, {meta['made_in_seconds'] / 60:.0f} min this run; "
          + (f"{total / 60:.0f} min from nothing, every stage counted)" if total is not None else
             "some stages did not record their time)"))
    for row in card["targets"]:
        value = "-" if row["measured"] is None else f"{row['measured']:.3f}"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[row["met"]]
        print(f"  {row['output']:<45s} {row['metric']:<48s} {value:>7s} (target {row['target']}) {verdict}"
              + (f"; {row['shortfall']}" if row.get("shortfall") else ""))
    return out


if __name__ == "__main__":
    main()
