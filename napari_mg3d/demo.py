"""End-to-end demo on built-in defaults: python -m napari_mg3d.demo

1. generates report-conditioned synthetic chest CTs and writes them as NIfTI (+ reports);
2. reads one back through the NIfTI reader and applies the preprocessing contract;
3. pre-trains the tiny MG-3D model for a few steps on the generated pairs, printing every loss;
4. writes a model bundle, reloads it, and maps each report sentence's heat map back onto the CT grid
   (NIfTI), reporting whether its peak falls inside the lesion the sentence describes.
After only a few steps the heat maps are not yet meaningful; the point is that every stage runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_bundle, save_bundle
from .io import read_volume, write_nifti
from .model import MG3DModel, MG3DPretrainer, preset_config, tokenize_reports
from .preprocess import PreprocessConfig, preprocess, to_original
from .synthetic import generate_sample, save_sample


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(out_dir: Path, steps: int, n_pairs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = preset_config("tiny")
    pre_cfg = PreprocessConfig(target_size=cfg.input_size)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    samples = [generate_sample(seed + i, shape=(80, 112, 144)) for i in range(n_pairs)]
    rows = [save_sample(s, out_dir / "data", f"case_{i:02d}") for i, s in enumerate(samples)]
    for i, s in enumerate(samples):
        (out_dir / "data" / f"case_{i:02d}_report.txt").write_text(s.report + "\n")
    timings["generate + write NIfTI"] = time.perf_counter() - t0
    _say(f"generated {n_pairs} synthetic chest CTs with reports in {out_dir / 'data'}")

    t0 = time.perf_counter()
    volumes = [read_volume(out_dir / "data" / r["volume"]) for r in rows]
    batch, records = zip(*(preprocess(v, pre_cfg) for v in volumes))
    x = torch.stack(batch)
    timings["read + preprocess"] = time.perf_counter() - t0
    _say(f"read and preprocessed: source {volumes[0].shape} voxels at "
         f"{tuple(round(s, 2) for s in volumes[0].spacing)} mm -> model input {tuple(x.shape[2:])}")

    t0 = time.perf_counter()
    model = MG3DModel(cfg)
    pretrainer = MG3DPretrainer(model)
    text = tokenize_reports(model.text.tokenizer, [s.sentences for s in samples], cfg.max_words,
                            cfg.max_sentences, cfg.max_sentence_words)
    groups = [
        {"params": [p for n, p in pretrainer.trainable_named_parameters() if n.startswith("model.vision.")], "lr": 2e-4},
        {"params": [p for n, p in pretrainer.trainable_named_parameters() if not n.startswith("model.vision.")], "lr": 1e-3},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    _say(f"pre-training the tiny MG-3D model for {steps} steps on {n_pairs} volume-report pairs "
         f"(text encoder {cfg.text_encoder}, frozen)")
    _say("step   total     mim      mlm      sfr      cml      ssm      dfa")
    history = []
    pretrainer.train()
    for step in range(1, steps + 1):
        out = pretrainer(x, text)
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        opt.step()
        vals = {k: float(v.detach()) for k, v in out.items()}
        history.append(vals)
        _say(f"{step:4d} " + " ".join(f"{vals[k]:8.4f}" for k in ("total", "mim", "mlm", "sfr", "cml", "ssm", "dfa")))
    timings["pre-training"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    bundle_dir = save_bundle(out_dir / "mg3d_tiny_demo_bundle", model,
                             meta={"preprocessing": pre_cfg.to_dict(),
                                   "provenance": {"steps": steps, "pairs": n_pairs, "data": "synthetic"}})
    reloaded = load_bundle(bundle_dir).model
    timings["save + reload bundle"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    case = 0
    sample, vol, rec = samples[case], volumes[case], records[case]
    with torch.no_grad():
        enc = reloaded.encode_volume(x[case:case + 1])
        one = tokenize_reports(reloaded.text.tokenizer, [sample.sentences])
        _, sent = reloaded.encode_sentences_separately(one)
        heat = reloaded.sentence_heatmaps(enc, sent, one.sentence_valid)[0]
    lesion = sample.lesion_label_map()
    lines = []
    for i, sentence in enumerate(sample.sentences):
        grid_map = torch.nn.functional.interpolate(heat[i][None, None], size=cfg.input_size, mode="trilinear",
                                                   align_corners=False)[0, 0]
        on_ct = to_original(grid_map / grid_map.max(), rec)
        write_nifti(out_dir / f"heatmap_case00_sentence{i:02d}.nii.gz", on_ct, vol)
        peak = np.unravel_index(int(np.argmax(on_ct)), on_ct.shape)
        linked = sample.sentence_links[i]
        hit = bool(linked) and any(sample.lesions[name][peak] for name in linked)
        lines.append({"sentence": sentence, "peak_voxel": [int(p) for p in peak], "linked_lesions": linked,
                      "peak_in_lesion": hit if linked else None})
    write_nifti(out_dir / "lesions_case00.nii.gz", lesion, vol)
    timings["heat maps -> CT grid"] = time.perf_counter() - t0

    summary = {"first_losses": history[0], "last_losses": history[-1], "timings_s": timings, "heatmaps": lines,
               "bundle": str(bundle_dir)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m napari_mg3d.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("mg3d_demo_output"), help="output folder")
    parser.add_argument("--steps", type=int, default=10, help="pre-training steps (default 10)")
    parser.add_argument("--pairs", type=int, default=4, help="synthetic volume-report pairs (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = run_demo(args.out, args.steps, args.pairs, args.seed)
    _say("\nsentence heat maps of case 0 (peak inside the described lesion?):")
    for item in summary["heatmaps"]:
        verdict = {True: "yes", False: "no", None: "-"}[item["peak_in_lesion"]]
        _say(f"  [{verdict:>3}] {item['sentence']}")
    _say("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["timings_s"].items()))
    first, last = summary["first_losses"]["total"], summary["last_losses"]["total"]
    _say(f"total loss {first:.3f} -> {last:.3f}")
    _say(f"\noutputs in {args.out.resolve()}: data/ (CTs, masks, reports), heatmap_*.nii.gz, lesions_case00.nii.gz, "
         f"{Path(summary['bundle']).name}/ (model bundle), summary.json")


if __name__ == "__main__":
    main()
