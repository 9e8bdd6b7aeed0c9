"""Does MG-3D pre-training work? The synthetic benchmark (rerunnable; results as JSON + markdown).

    python -m training.synthetic_proof --out runs/proof                  # everything, from scratch
    python -m training.synthetic_proof --pretrained runs/x/bundle --skip-ablation   # evaluate a bundle

On held-out report-conditioned synthetic chest CTs (ground truth known):
 (a) zero-shot anomaly AUC per finding and mean ("{finding} is present." vs "is not present.", scored by
     the pre-trained MLM head's volume-conditioned pseudo-likelihood; no fine-tuning);
 (b) report -> volume Recall@10 (cosine of global features, as in the paper) against chance;
 (c) segmentation fine-tuned on 20 labelled volumes from the pre-trained encoder vs from scratch, same
     budget, Dice on held-out volumes;
 (d) pointing game: does the token cell a finding sentence attends to most overlap the lesion it describes,
     against a random cell (the expected hit rate of a uniformly random cell);
 (e) ablations with the same budget: without SSM+DFA, and without MIM+MLM.
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
from napari_mg3d.model.heads import zero_shot_scores
from napari_mg3d.model.text import tokenize_reports
from napari_mg3d.preprocess import PreprocessConfig, labels_to_model, preprocess
from napari_mg3d.synthetic import LABELS, generate_sample
from napari_mg3d.volume import Volume

from . import finetune, metrics, pretrain
from .params import PretrainParams

HELD_OUT_SEED = 900_000


@torch.no_grad()
def probe(bundle: str | Path, n: int, shape, seed: int = HELD_OUT_SEED) -> dict:
    """(a), (b) and (d) on ``n`` held-out samples."""
    b = load_bundle(bundle)
    model = b.model.eval()
    cfg = model.config
    pre_cfg = PreprocessConfig(target_size=cfg.input_size)
    mlm = None
    if "mlm_head" in b.head_state:
        from napari_mg3d.model.mg3d import MLMHead

        mlm = MLMHead(cfg.fusion_dim, model.text.vocab_size)
        mlm.load_state_dict(b.head_state["mlm_head"])
        mlm.eval()
    labels, zs, gv, gt, hits, chance = [], [], [], [], [], []
    for i in range(n):
        s = generate_sample(seed + i, shape=tuple(shape))
        x, rec = preprocess(Volume(s.volume, s.affine), pre_cfg)
        enc = model.encode_volume(x[None])
        text = tokenize_reports(model.text.tokenizer, [s.sentences], cfg.max_words, cfg.max_sentences,
                                cfg.max_sentence_words)
        gv.append(enc.global_feature[0])
        gt.append(model.global_text(model.encode_text(text))[0])
        labels.append([s.labels[k] for k in LABELS])
        if mlm is not None:
            zs.append(zero_shot_scores(model, mlm, enc.tokens, LABELS).numpy())
        _, sent = model.encode_sentences_separately(text)
        heat = model.sentence_heatmaps(enc, sent, text.sentence_valid)[0]  # (S, gz, gy, gx)
        for k, names in enumerate(s.sentence_links):
            if not names:
                continue
            mask = np.zeros(s.volume.shape, np.uint8)
            for name in names:
                mask[s.lesions[name]] = 1
            m = torch.from_numpy(labels_to_model(mask, rec, representation="probabilities")[1])
            cells = F.adaptive_max_pool3d(m[None, None], heat.shape[1:])[0, 0] > 0.25  # lesion overlaps cell
            if not cells.any():
                continue
            top = int(heat[k].flatten().argmax())
            hits.append(bool(cells.flatten()[top]))
            chance.append(float(cells.float().mean()))
    Y = np.array(labels)
    out: dict = {"n": n}
    if zs:
        P = np.stack(zs)
        per = {name: metrics.auc(Y[:, j], P[:, j]) for j, name in enumerate(LABELS) if 0 < Y[:, j].sum() < n}
        out["zero_shot_auc_mean"] = float(np.mean(list(per.values())))
        out["zero_shot_auc_per_finding"] = per
    S = (F.normalize(torch.stack(gt), dim=-1) @ F.normalize(torch.stack(gv), dim=-1).t()).numpy()
    out["recall@10"] = metrics.recall_at_k(S, 10)
    out["recall@10_chance"] = 10 / n
    out["pointing_hit_rate"] = float(np.mean(hits)) if hits else None
    out["pointing_random_baseline"] = float(np.mean(chance)) if chance else None
    out["pointing_n"] = len(hits)
    return out


def run_pretrain(out: Path, pairs: int, steps: int, objectives, shape, batch: int) -> Path:
    return pretrain.run(PretrainParams(
        data=f"synthetic:{pairs}", max_steps=steps, batch_size=batch, out_dir=str(out), synthetic_shape=list(shape),
        objectives=list(objectives), warmup_steps=max(1, steps // 10), lr_vision=2e-4, lr_fusion=5e-4,
        checkpoint_every=max(1, steps // 4), log_every=5, progress=False, num_workers=1))


def seg_compare(pretrained: Path, out: Path, steps: int, shape, preset_size) -> dict:
    common = dict(task="segment", data="synthetic:20", val_data="synthetic:10", steps=steps, batch_size=2,
                  seg_target="all", synthetic_shape=list(shape), lr=1e-3, lr_encoder=1e-4, log_every=20, seed=7)
    res = {}
    for name, extra in (("pretrained", {"bundle": str(pretrained)}),
                        ("scratch", {"preset": "tiny", "input_size": list(preset_size)})):
        b = finetune.run(finetune.FinetuneParams(out_dir=str(out / f"seg_{name}"), **common, **extra))
        m = load_bundle(b).meta["provenance"]["metrics"]
        res[name] = {"mean_dice": m.get("mean_dice"), "dice_per_class": m.get("dice_per_class")}
    return res


def to_markdown(results: dict) -> str:
    lines = ["| run | zero-shot AUC | Recall@10 (chance) | pointing hit rate (random) | seg Dice: pre-trained / scratch |",
             "|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        seg = results.get("segmentation", {}) if name == "full" else {}
        seg_cell = (f"{seg['pretrained']['mean_dice']:.3f} / {seg['scratch']['mean_dice']:.3f}"
                    if seg else "-")
        lines.append(f"| {name} | {r.get('zero_shot_auc_mean', float('nan')):.3f} | {r['recall@10']:.3f} "
                     f"({r['recall@10_chance']:.3f}) | {r['pointing_hit_rate'] or float('nan'):.3f} "
                     f"({r['pointing_random_baseline'] or float('nan'):.3f}) | {seg_cell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m training.synthetic_proof", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/proof")
    ap.add_argument("--pretrained", default="", help="evaluate this pre-trained bundle instead of training one")
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=300, help="pre-training steps per run")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seg-steps", type=int, default=150)
    ap.add_argument("--held-out", type=int, default=100)
    ap.add_argument("--shape", type=int, nargs=3, default=[80, 112, 144])
    ap.add_argument("--skip-ablation", action="store_true")
    ap.add_argument("--skip-segmentation", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = {"full": Path(a.pretrained) if a.pretrained else
            run_pretrain(out / "full", a.pairs, a.steps, ("mim", "mlm", "sfr", "cml", "ssm", "dfa"), a.shape, a.batch_size)}
    if not a.skip_ablation:
        runs["no SSM+DFA"] = run_pretrain(out / "no_ssm_dfa", a.pairs, a.steps, ("mim", "mlm", "sfr", "cml"),
                                          a.shape, a.batch_size)
        runs["no MIM+MLM"] = run_pretrain(out / "no_mim_mlm", a.pairs, a.steps, ("sfr", "cml", "ssm", "dfa"),
                                          a.shape, a.batch_size)
    results: dict = {"runs": {name: probe(b, a.held_out, a.shape) for name, b in runs.items()}}
    if not a.skip_segmentation:
        size = load_bundle(runs["full"]).config.input_size
        results["segmentation"] = seg_compare(runs["full"], out, a.seg_steps, a.shape, size)
    results["settings"] = vars(a)
    results["wall_clock_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    table = to_markdown(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
