"""Does MG-3D pre-training work? The synthetic benchmark (rerunnable; results as JSON + markdown).

    python -m experiments.synthetic_proof --out runs/proof                  # everything, from scratch
    python -m experiments.synthetic_proof --pretrained runs/x/bundle --skip-ablation   # evaluate a bundle

On held-out report-conditioned synthetic chest CTs (ground truth known):
 (a) zero-shot anomaly AUC per finding and mean ("{finding} is present." vs "is not present.", no
     fine-tuning), scored two ways: the pre-trained MLM head's volume-conditioned pseudo-likelihood, and the
     sentence-volume alignment score (for runs pre-trained with "sva");
 (b) report -> volume Recall@10 against chance: cosine of the global features F̄_T, F̄_I (as in the paper)
     and the mean sentence-volume alignment score of the report's sentences;
 (c) segmentation fine-tuned on 20 labelled volumes from the pre-trained encoder vs from scratch, same
     budget, Dice on held-out volumes;
 (d) pointing game: does the token cell a finding sentence attends to most overlap the lesion it describes,
     against a random cell (the expected hit rate of a uniformly random cell);
 (e) ablations: the paper's six objectives without "sva", without SSM+DFA, without MIM+MLM; each trained for
     half the steps of the full run on the same schedule and compared with the full run's bundle at that step.

With --cycles N the full run is continued for N-1 more cycles of --steps each (warm restart: new warm-up and
cosine from the previous cycle's bundle, --seed c-1 for cycle c, so a new data order and new masks); each cycle
is probed, and the segmentation comparison starts from the last one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_mg3d.checkpoint import load_bundle
from napari_mg3d.labels import LABELS, SEGMENTATION_TARGETS
from napari_mg3d.model.heads import alignment_prompt_logits, alignment_zero_shot_margins, margins_to_scores
from napari_mg3d.model.scoring import available_score_sources, finding_scores
from napari_mg3d.model.text import tokenize_reports
from napari_mg3d.preprocess import preprocess, preprocess_config_of
from napari_mg3d.synthetic import generate_sample, real_report_sample
from napari_mg3d.volume import Volume
from training import finetune, metrics, pretrain
from training.evaluate import pointing_per_finding, sample_pointing
from training.params import PretrainParams, made_with

HELD_OUT_SEED = 900_000
RETRIEVAL_POOL = 100  # Recall@10 is reported among this many candidates (chance 0.10)
VALIDATION_SEED = 800_000  # for choices such as the zero-shot scoring rule; disjoint from the held-out volumes


@torch.no_grad()
def probe(bundle: str | Path, n: int, shape, seed: int = HELD_OUT_SEED, tier: str = "hard",
          real_reports: str | Path | None = None) -> dict:
    """(a), (b) and (d) on ``n`` held-out samples of ``tier``. With ``real_reports`` (a CT-RATE reports CSV),
    sample i renders row i: the report's own text and exactly its labelled findings (real-report mode), text
    that pre-training on the template reports never saw."""
    if real_reports is not None:
        import csv

        with open(real_reports, newline="", encoding="utf-8") as fh:
            rows = sum(1 for _ in csv.DictReader(fh))
        if rows < n:
            raise SystemExit(f"--real-reports {real_reports} holds {rows} reports; ask for at most that many")
    b = load_bundle(bundle)
    model = b.model.eval()
    cfg = model.config
    pre_cfg = preprocess_config_of(b.meta, cfg)
    heads, _ = b.build_heads()
    sources = [s for s in available_score_sources(heads, cfg) if s in ("sva", "mlm")]
    if "mlm" not in cfg.objectives and "mlm" in sources:
        sources.remove("mlm")
    aligned = "sva" in sources
    scores: dict[str, list] = {"zero_shot_mlm": [], "zero_shot_sva": [], "zero_shot_sva_centred": []}
    labels, gv, gt, tokens, sentences, owners, pointed = ([] for _ in range(7))
    for i in range(n):
        s = (generate_sample(seed + i, shape=tuple(shape), tier=tier) if real_reports is None else
             real_report_sample(seed + i, real_reports, index=i, shape=tuple(shape), tier=tier))
        x, rec = preprocess(Volume(s.volume, s.affine), pre_cfg)
        enc = model.encode_volume(x[None])
        text = tokenize_reports(model.text.tokenizer, [s.sentences], cfg.max_words, cfg.max_sentences,
                                cfg.max_sentence_words)
        gv.append(enc.global_feature[0])
        gt.append(model.global_text(model.encode_text(text))[0])
        labels.append([s.labels[k] for k in LABELS])
        if "mlm" in sources:
            scores["zero_shot_mlm"].append(finding_scores("mlm", model, heads, enc, LABELS)[0].numpy())
        if aligned:
            margins = alignment_zero_shot_margins(model, enc.tokens, LABELS)  # one read-out for both scores
            scores["zero_shot_sva"].append(margins_to_scores(margins).numpy())
            scores["zero_shot_sva_centred"].append(margins_to_scores(margins - margins.mean()).numpy())
        _, sent = model.encode_sentences_separately(text)
        tokens.append(enc.tokens[0])
        sentences.append(sent[0][text.sentence_valid[0]])
        owners += [i] * int(text.sentence_valid[0].sum())
        pointed += sample_pointing(model, enc, text, s, rec, sent)  # the sentences encoded once
    Y = np.array(labels)
    out: dict = {"n": n, "objectives": list(cfg.objectives)}
    if real_reports is not None:
        out["real_reports"] = str(real_reports)
    for key, rows in scores.items():
        if rows:
            P = np.stack(rows)
            per = metrics.auc_per_label(Y, P, LABELS)
            out[f"{key}_auc_mean"] = float(np.mean(list(per.values())))
            boot = metrics.bootstrap_mean_auc(Y, P, LABELS, n=300)
            out[f"{key}_auc_se"] = (boot["high"] - boot["low"]) / 3.92
            out[f"{key}_auc_per_finding"] = per
    S = (F.normalize(torch.stack(gt), dim=-1) @ F.normalize(torch.stack(gv), dim=-1).t()).numpy()
    similarities = {"global": S}
    if aligned:
        similarities["sva"] = report_volume_alignment(model, tokens, sentences, owners)
    for name, sim in similarities.items():
        out[f"recall@10_{name}"] = metrics.recall_at_k(sim, 10)
        if n >= RETRIEVAL_POOL:  # the benchmark's retrieval measure: among 100 (chance 0.10) whatever n is
            r = metrics.recall_at_k_in_pools(sim, 10, RETRIEVAL_POOL)
            out[f"recall@10_of_{RETRIEVAL_POOL}_{name}"] = r
            out[f"recall@10_of_{RETRIEVAL_POOL}_{name}_se"] = metrics.binomial_se(r, n // RETRIEVAL_POOL * RETRIEVAL_POOL)
    out["recall@10_chance"] = 10 / n
    hits = [h.hit for h in pointed]
    out["pointing_hit_rate"] = float(np.mean(hits)) if hits else None
    out["pointing_hit_rate_se"] = metrics.binomial_se(float(np.mean(hits)), len(hits)) if hits else None
    out["pointing_random_baseline"] = float(np.mean([h.chance for h in pointed])) if hits else None
    out["pointing_n"] = len(hits)
    out["pointing_per_finding"] = pointing_per_finding(pointed)
    return out


@torch.no_grad()
def token_features(model, first_seed: int, n: int, shape, tier: str = "hard",
                   cache_dir: str | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Tokens (n, N, d) of synthetic volumes ``first_seed``.. (``shape`` voxels, preprocessed to the model's
    input, through the training cache when ``cache_dir`` is given) and their 0/1 finding labels (n, len(LABELS))."""
    from training.data import SyntheticDataset

    data = SyntheticDataset(n, preprocess_config_of(None, model.config), seed=first_seed, shape=tuple(shape),
                            with_mask=False, tier=tier, cache_dir=cache_dir)
    tokens, labels = [], []
    for i in range(n):
        item = data[i]
        tokens.append(model.encode_volume(item["volume"][None]).tokens[0].float())
        labels.append(item["labels"].numpy())
    return torch.stack(tokens), np.array(labels, dtype=np.float32)


@torch.no_grad()
def scoring_rules(bundle: str | Path, n: int, shape, seed: int = VALIDATION_SEED, tier: str = "hard") -> dict:
    """Zero-shot AUC of four read-outs of the sva score on ``n`` volumes from ``seed`` (by default validation
    volumes, never the held-out ones, so that a rule chosen here can be reported on the held-out set): the prompt
    pair's margin, that margin centred per volume over the 18 findings, the "present" prompt alone, and that
    prompt centred."""
    model = load_bundle(bundle).model.eval()
    tokens, Y = token_features(model, seed, n, shape, tier)
    P = torch.stack([alignment_prompt_logits(model, t[None], LABELS) for t in tokens])
    pair, present = P[:, :, 0] - P[:, :, 1], P[:, :, 0]
    rules = {"pair": pair, "pair centred": torch.stack([margins_to_scores(m - m.mean()) for m in pair]),
             "present only": present,
             "present only centred": torch.stack([margins_to_scores(m - m.mean()) for m in present])}
    out: dict = {"seeds": [seed, seed + n - 1], "variants": {}}
    for name, scores in rules.items():
        scores = scores.numpy()
        per = metrics.auc_per_label(Y, scores, LABELS)
        out["variants"][name] = {"mean_auc": float(np.mean(list(per.values()))), "auc_per_finding": per}
    return out


def report_volume_alignment(model, tokens: list[torch.Tensor], sentences: list[torch.Tensor], owners: list[int]):
    """(reports, volumes): mean over a report's sentences of its sentence-volume alignment score."""
    flat = torch.cat(sentences)
    owner = torch.tensor(owners)
    sim = model.sentence_volume_similarity(torch.stack(tokens), flat)  # (Q, V)
    per_report = torch.zeros(len(tokens), sim.shape[1]).index_add_(0, owner, sim)
    return (per_report / torch.bincount(owner, minlength=len(tokens))[:, None].clamp_min(1)).numpy()


# Learning rates of the benchmark's pre-training. The vision rate was 2e-4 (never measured); the supervised Swin
# tiny learns the visible tier at 1e-3 with the same warm-up + cosine (docs/benchmark.md), so from 2026-12-07
# the encoder gets 5e-4.
LR_VISION, LR_FUSION = 5e-4, 5e-4


def pretrain_params(out: Path, pairs: int, steps: int, objectives, shape, batch: int, tier: str = "hard",
                    **kw) -> PretrainParams:
    """The benchmark's pre-training recipe; ``kw`` adds or overrides PretrainParams fields (e.g. the
    ``num_workers``, ``precision`` and ``cache_dir`` of :func:`runtime`)."""
    recipe = dict(data=f"synthetic:{pairs},{tier}", max_steps=steps, batch_size=batch, out_dir=str(out),
                  synthetic_shape=list(shape), objectives=list(objectives), warmup_steps=max(1, steps // 10),
                  lr_vision=LR_VISION, lr_fusion=LR_FUSION, checkpoint_every=max(1, steps // 4), log_every=5, progress=False,
                  num_workers=1)
    return PretrainParams(**{**recipe, **kw})


def runtime(num_workers: int = 1, precision: str = "32-true", cache_dir: str = "") -> dict:
    """How the benchmark's runs execute, not what they compute: data-loading workers (synthetic volumes are
    made on the fly, ~13 per second per core, so a GPU needs many), the numeric precision of every
    pre-training and fine-tuning run, and the folder where each volume is kept once made (float16)."""
    return {"num_workers": num_workers, "precision": precision, "cache_dir": cache_dir}


def pretrain_runtime(run_with: dict, checkpoint_every: int = 0) -> dict:
    """``run_with`` for the pre-training runs, with how often they checkpoint (0: four times a run)."""
    return {**run_with, **({"checkpoint_every": checkpoint_every} if checkpoint_every else {})}


def run_pretrain(out: Path, pairs: int, steps: int, objectives, shape, batch: int, snapshot: int = 0,
                 **kw) -> dict[int, Path]:
    """Pre-train; with ``snapshot`` also export the bundle at that step (stop there, export, resume)."""
    bundles: dict[int, Path] = {}
    if snapshot:
        bundles[snapshot] = snapshot_run(out, pairs, steps, snapshot, objectives, shape, batch, **kw)
    bundles[steps] = snapshot_run(out, pairs, steps, steps, objectives, shape, batch, **kw)
    return bundles


def learning_curve(out: Path, pairs: int, steps: int, stops: list[int], objectives, shape, batch: int,
                   held_out: int, tier: str = "hard", **kw) -> dict[int, dict]:
    """Pre-train on the ``steps``-step schedule, stopping at each of ``stops`` to export a bundle and probe it
    on ``held_out`` volumes; each probe is kept in OUT/probe_step{N}.json, so an interrupted curve continues
    where it stopped (the run itself resumes from its last checkpoint, with the same data order)."""
    results: dict[int, dict] = {}
    for stop in sorted(set(stops) | {steps}):
        saved = out / f"probe_step{stop}.json"
        if saved.is_file():
            results[stop] = json.loads(saved.read_text())
            continue
        t0 = time.perf_counter()
        bundle = snapshot_run(out, pairs, steps, stop, objectives, shape, batch, tier=tier, **kw)
        print(f"pre-training to step {stop}: {time.perf_counter() - t0:.0f} s", flush=True)
        t0 = time.perf_counter()
        probed = probe(bundle, held_out, shape, tier=tier)
        results[stop] = {"steps": stop, **probed, "probe_s": time.perf_counter() - t0}
        saved.write_text(json.dumps(results[stop], indent=1))
        print(f"step {stop}: {json.dumps({k: v for k, v in results[stop].items() if not isinstance(v, dict)})}", flush=True)
    return results


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])


def continue_cycles(out: Path, first: Path, cycles: int, pairs: int, steps: int, objectives, shape,
                    batch: int, **kw) -> list[tuple[Path, int]]:
    """Cycles 2..``cycles``: each a new schedule of ``steps`` steps starting from the previous cycle's bundle."""
    done, previous = [], first
    for c in range(2, cycles + 1):
        folder = out / f"cycle{c}"
        bundle = folder / "bundle"
        if not bundle.exists():
            resume = "last" if (folder / "checkpoints" / "last.ckpt").exists() else ""
            pretrain.run(pretrain_params(folder, pairs, steps, objectives, shape, batch, resume=resume,
                                         init_from=str(previous), seed=c - 1, **kw))
        done.append((bundle, c * steps))
        previous = bundle
    return done


def snapshot_run(out: Path, pairs: int, schedule: int, stop: int, objectives, shape, batch: int, **kw) -> Path:
    """Train on the ``schedule``-step schedule but stop at step ``stop`` and export the bundle there (the
    full run's half-way snapshot and the ablations, which compare at the same step of the same schedule).
    An interrupted run continues from its last checkpoint."""
    bundle = out / "bundle" if stop == schedule else out / "bundle_step" / f"{stop}"
    if (bundle / "config.json").is_file():
        return bundle
    last_ckpt = out / "checkpoints" / "last.ckpt"
    resume = "last" if last_ckpt.exists() else ""
    done = _checkpoint_step(last_ckpt) if resume else 0
    until = 0 if stop == schedule else stop - done  # stop_after_steps counts from where the run resumes
    if stop < schedule and until <= 0:  # a killed run checkpointed past this stop: take what it left
        pretrain.bundle_from_checkpoint(last_ckpt, bundle)
        return bundle
    last = pretrain.run(pretrain_params(out, pairs, schedule, objectives, shape, batch, resume=resume,
                                        stop_after_steps=until, **kw))
    if stop < schedule:
        pretrain.bundle_from_checkpoint(last, bundle)
    return bundle


def random_init_bundle(out: Path, like: Path) -> Path:
    """A bundle with the architecture and objectives of ``like`` at random initialisation (the baseline)."""
    from napari_mg3d.checkpoint import save_bundle
    from napari_mg3d.model import MG3DModel

    if not out.exists():
        torch.manual_seed(0)
        save_bundle(out, MG3DModel(load_bundle(like).config))
    return out


def seg_compare(pretrained: Path, out: Path, steps: int, shape, preset_size, seeds=(7,),
                freeze_steps: int = 0, target: str = "all", preset: str = "tiny",
                run_with: dict | None = None, tier: str = "hard", conv_stages: int | None = None) -> dict:
    """Both arms once per seed (initialisation of the decoder, data order); Dice means over the seeds.
    ``run_with``: :func:`runtime` settings for both arms; the scratch arm has the pre-trained encoder's
    architecture (``preset``, ``preset_size``, ``conv_stages``)."""
    common = dict(task="segment", data=f"synthetic:20,{tier}", val_data=f"synthetic:10,{tier}", steps=steps, batch_size=2,
                  seg_target=target, synthetic_shape=list(shape), lr=1e-3, lr_encoder=1e-4, log_every=20,
                  freeze_encoder_steps=freeze_steps, **(run_with or {}))
    res = {}
    for name, extra in (("pretrained", {"bundle": str(pretrained)}),
                        ("scratch", {"preset": preset, "input_size": list(preset_size),
                                     "conv_stages": conv_stages})):
        per_seed = {}
        for seed in seeds:
            params = finetune.FinetuneParams(out_dir=str(out / f"seg_{name}_seed{seed}"), seed=seed, **common, **extra)
            b = Path(params.out_dir) / "bundle"
            if made_with(b, params):  # e.g. the scratch arm, which does not depend on the pre-trained bundle
                print(f"segmentation {name}: reusing {b}, trained with the same settings", flush=True)
            else:
                b = finetune.run(params)
            per_seed[seed] = load_bundle(b).meta["provenance"]["metrics"]
        classes = per_seed[seeds[0]].get("dice_per_class") or {}
        res[name] = {
            "mean_dice": float(np.mean([m["mean_dice"] for m in per_seed.values()])),
            "mean_dice_per_seed": {str(s): m["mean_dice"] for s, m in per_seed.items()},
            "dice_per_class": {c: _mean_defined([m["dice_per_class"].get(c) for m in per_seed.values()]) for c in classes},
        }
    return res


def _mean_defined(values: list[float | None]) -> float | None:
    """Mean over the seeds where a class's Dice is defined (None: the class is absent from the held-out set)."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _f(value, se=None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if se is None or se != se else f"{value:.3f} ± {se:.3f}"


def _recall(r: dict, name: str) -> str:
    """Recall@10 among 100, or among all the probe's volumes (said) where it had fewer than 100."""
    pooled = r.get(f"recall@10_of_{RETRIEVAL_POOL}_{name}")
    if pooled is not None:
        return _f(pooled, r.get(f"recall@10_of_{RETRIEVAL_POOL}_{name}_se"))
    value = r.get(f"recall@10_{name}")
    return "-" if value is None else f"{_f(value)} (of {r.get('n', '?')}, chance {r['recall@10_chance']:.2f})"


def to_markdown(results: dict) -> str:
    lines = ["| run | steps | zero-shot AUC: sva / MLM | Recall@10 among 100: sva / global (chance 0.10) | "
             "pointing hit rate (random cell) |", "|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        lines.append(f"| {name} | {r.get('steps', '-')} | {_f(r.get('zero_shot_sva_auc_mean'), r.get('zero_shot_sva_auc_se'))}"
                     f" / {_f(r.get('zero_shot_mlm_auc_mean'), r.get('zero_shot_mlm_auc_se'))} | "
                     f"{_recall(r, 'sva')} / {_recall(r, 'global')} | "
                     f"{_f(r['pointing_hit_rate'], r.get('pointing_hit_rate_se'))} ({_f(r['pointing_random_baseline'])}) |")
    seg = results.get("segmentation")
    if seg:
        lines += ["", "| segmentation, 20 labelled volumes, same budget | mean Dice (held-out), mean of seeds | per seed |",
                  "|---|---|---|"]
        lines += [f"| {name} | {_f(v['mean_dice'])} | "
                  + ", ".join(f"{s}: {_f(d)}" for s, d in v.get("mean_dice_per_seed", {}).items()) + " |"
                  for name, v in seg.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.synthetic_proof", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/proof")
    ap.add_argument("--pretrained", default="", help="evaluate this pre-trained bundle instead of training one")
    ap.add_argument("--preset", default="tiny", choices=("tiny", "base", "large"),
                    help="model preset to pre-train (tiny on CPU; base or large on a GPU)")
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=500, help="pre-training steps of the full run (ablations: half)")
    ap.add_argument("--cycles", type=int, default=1, help="continue the full run for this many cycles of --steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seg-steps", type=int, default=240)
    ap.add_argument("--seg-seeds", type=int, nargs="+", default=[7], help="segmentation comparison: one run per arm and seed")
    ap.add_argument("--seg-freeze-steps", type=int, default=0,
                    help="segmentation: train only the decoder for the first N steps (both arms)")
    ap.add_argument("--seg-target", default="all", choices=tuple(SEGMENTATION_TARGETS),
                    help="segmentation classes: organs and lesions (28), organs (9), the 18 findings' lesions, or "
                         "organs and one class for any lesion (11)")
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--tier", default="visible", choices=("hard", "visible"),
                    help="synthetic finding style of every run and probe: visible (large, contrasted) or hard")
    ap.add_argument("--cache-dir", default="runs/cache", help="keep each generated, preprocessed volume here (float16)")
    ap.add_argument("--curve-steps", type=int, nargs="*", default=[],
                    help="also probe the full run at these steps (a learning curve; each probe kept, resumable)")
    ap.add_argument("--num-workers", type=int, default=1,
                    help="data-loading workers of every run (synthetic volumes are made on the fly: ~13 per second "
                         "per core; a GPU needs ~10 to keep up)")
    ap.add_argument("--precision", default="32-true",
                    help="precision of every pre-training and fine-tuning run: 32-true | bf16-mixed (a GPU, or a CPU "
                         "with AVX512-BF16/AMX)")
    ap.add_argument("--shape", type=int, nargs=3, default=[80, 112, 144])
    ap.add_argument("--conv-stages", type=int, default=None,
                    help="pre-training: convolutional early encoder stages (0: the paper's Swin; 2: the hybrid; "
                         "default: the preset's)")
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="pre-training: keep a resumable checkpoint every N steps (default: four per run)")
    ap.add_argument("--lr-vision", type=float, default=LR_VISION, help="pre-training: peak learning rate of the encoder")
    ap.add_argument("--lr-fusion", type=float, default=LR_FUSION,
                    help="pre-training: peak learning rate of the fusion layers and heads")
    ap.add_argument("--scoring-rules", action="store_true",
                    help="with --pretrained: only compare zero-shot scoring rules on --held-out validation volumes "
                         "(seeds from 800000) and write OUT/zero_shot_scoring_validation.json")
    ap.add_argument("--real-reports", default="",
                    help="also probe the most trained run on phantoms rendered from these real reports (a CT-RATE "
                         "CSV, e.g. ../shared/data/reports/ct_rate_reports_train.csv; rows 0..--held-out)")
    ap.add_argument("--skip-ablation", action="store_true")
    ap.add_argument("--skip-segmentation", action="store_true")
    a = ap.parse_args(argv)
    run_with = runtime(a.num_workers, a.precision, a.cache_dir)
    pre_with = {**pretrain_runtime(run_with, a.checkpoint_every), "lr_vision": a.lr_vision, "lr_fusion": a.lr_fusion,
                **({"conv_stages": a.conv_stages} if a.conv_stages is not None else {})}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.scoring_rules:
        if not a.pretrained:
            raise SystemExit("--scoring-rules compares scoring rules of a trained bundle: give it with --pretrained")
        rules = {"bundle": a.pretrained, **scoring_rules(a.pretrained, a.held_out, a.shape, tier=a.tier)}
        (out / "zero_shot_scoring_validation.json").write_text(json.dumps(rules, indent=1))
        for name, r in rules["variants"].items():
            print(f"{name}: mean AUC {r['mean_auc']:.3f}")
        return rules
    full = ("mim", "mlm", "sfr", "cml", "ssm", "dfa", "sva")
    half = a.steps // 2
    if a.pretrained:
        runs = {"given bundle": (Path(a.pretrained), None)}
    else:
        curve = {}
        if a.curve_steps:
            curve = learning_curve(out / "full", a.pairs, a.steps, a.curve_steps + ([] if a.skip_ablation else [half]),
                                   full, a.shape, a.batch_size, a.held_out, tier=a.tier, preset=a.preset, **pre_with)
            bundles = {a.steps: out / "full" / "bundle", half: out / "full" / "bundle_step" / f"{half}"}
        else:
            bundles = run_pretrain(out / "full", a.pairs, a.steps, full, a.shape, a.batch_size,
                                   snapshot=0 if a.skip_ablation else half, preset=a.preset, tier=a.tier, **pre_with)
        runs = {"random init": (None, 0), "full (six + sva)": (bundles[a.steps], a.steps)}
        for bundle, steps in continue_cycles(out / "full", bundles[a.steps], a.cycles, a.pairs, a.steps, full,
                                             a.shape, a.batch_size, tier=a.tier, **pre_with):
            runs[f"full (six + sva), {steps // a.steps} cycles"] = (bundle, steps)
        snapshot = out / "full" / "bundle_step" / f"{half}"
        if a.skip_ablation and snapshot.exists():  # left by an earlier run with ablations
            runs["full (six + sva), half"] = (snapshot, half)
        if not a.skip_ablation:
            runs["full (six + sva), half"] = (bundles[half], half)
            for name, objectives in (("paper's six (no sva)", full[:6]),
                                     ("no SSM+DFA", ("mim", "mlm", "sfr", "cml", "sva")),
                                     ("no MIM+MLM", ("sfr", "cml", "ssm", "dfa", "sva"))):
                folder = out / name.split(" (")[0].replace("'", "").replace(" ", "_").replace("+", "_")
                runs[name] = (snapshot_run(folder, a.pairs, a.steps, half, objectives, a.shape, a.batch_size,
                                           preset=a.preset, tier=a.tier, **pre_with), half)
        runs["random init"] = (random_init_bundle(out / "random_init", bundles[a.steps]), 0)
    results: dict = {"runs": {}}
    if not a.pretrained and curve:
        results["learning_curve"] = {str(k): v for k, v in curve.items()}
    for name, (bundle, steps) in runs.items():
        known = curve.get(steps) if not a.pretrained and curve and name.startswith("full") else None
        results["runs"][name] = known or {"steps": steps, **probe(bundle, a.held_out, a.shape, tier=a.tier)}
        print(name, json.dumps(results["runs"][name]), flush=True)
    if a.real_reports:
        most_trained = max(runs.values(), key=lambda run: run[1] or 0)[0]
        results["real_reports"] = probe(most_trained, a.held_out, a.shape, tier=a.tier, real_reports=a.real_reports)
        print("real reports", json.dumps(results["real_reports"]), flush=True)
    if not a.skip_segmentation:
        main_bundle = max(runs.values(), key=lambda run: run[1] or 0)[0]  # the most trained
        main_config = load_bundle(main_bundle).config
        size = main_config.input_size
        results["segmentation"] = seg_compare(main_bundle, out, a.seg_steps, a.shape, size, tuple(a.seg_seeds),
                                              a.seg_freeze_steps, a.seg_target, main_config.preset, run_with, a.tier,
                                              main_config.conv_stages)
    results["settings"] = vars(a)
    results["wall_clock_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    table = to_markdown(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
