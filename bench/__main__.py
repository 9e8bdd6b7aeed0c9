"""Benchmarks (not tests): ``python -m bench`` prints markdown tables and writes bench/results/<device>.{json,md}.

    python -m bench                                    # inference (tiny, base), pre-training (tiny), data
    python -m bench --sections inference --presets base
    python -m bench --sections pretrain --pretrain-presets base --batches 4 8      # on a GPU

Every optimised path is measured next to the plain eager fp32 path of the same code in the same run; compare
ratios, not absolute times across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .common import fmt_table, machine

RESULTS = Path(__file__).parent / "results"


def inference_section(args) -> tuple[dict, str]:
    from . import inference

    res = inference.run(presets=tuple(args.presets), device=args.device, shape=tuple(args.shape), repeats=args.repeats)
    md = [f"### Inference per stage, synthetic {'x'.join(map(str, res['volume']['shape']))} CT (.nii.gz int16)",
          "Fastest of the warm repeats; peak RSS (process) and peak GPU memory per stage.", "",
          fmt_table(res["rows"], [("preset", "preset"), ("path", "path"), ("precision", "precision"), ("stage", "stage"),
                                  ("seconds", "seconds"), ("peak_rss_gib", "peak RSS GiB"), ("peak_gpu_gib", "peak GPU GiB")])]
    ratios = []
    for preset in args.presets:
        by = {(r["path"], r["stage"].split(" (")[0]): r["seconds"] for r in res["rows"] if r["preset"] == preset}
        for stage in sorted({s for _, s in by}):
            if ("eager", stage) in by and ("optimised", stage) in by and by[("optimised", stage)] > 0:
                ratios.append({"preset": preset, "stage": stage, "eager_s": by[("eager", stage)],
                               "optimised_s": by[("optimised", stage)],
                               "speedup": by[("eager", stage)] / by[("optimised", stage)]})
    md += ["", "Eager fp32 vs optimised, same run:", "",
           fmt_table(ratios, [("preset", "preset"), ("stage", "stage"), ("eager_s", "eager s"),
                              ("optimised_s", "optimised s"), ("speedup", "speed-up")])]
    md += ["", "Optimised vs eager outputs: " + "; ".join(f"{p}: {json.dumps(a)}" for p, a in res["agreement"].items())]
    md += ["", "Predictor memory estimate vs measured peak (RSS above the process before reading the CT):", "",
           fmt_table(res["memory"], [("preset", "preset"), ("path", "path"), ("estimate_gib", "estimate GiB"),
                                     ("measured_peak_gib", "measured GiB"), ("ratio", "estimate / measured")])]
    res["ratios"] = ratios
    return res, "\n".join(md)


def model_section(args) -> tuple[dict, str]:
    from . import model_time

    res = model_time.run(presets=tuple(args.presets), variants=tuple(args.model_variants), device=args.device,
                         repeats=max(3, args.repeats * 5))
    md = ["### Model time per volume (encoder, segmentation decoder, scores, 4 sentence heat maps; batch 1)",
          "Median of the timed calls, from the preprocessed model-grid input; reading, preprocessing and mapping "
          "back to the CT grid are in the inference table. Report drafting is per generated token.", "",
          fmt_table(res["rows"], [("preset", "preset"), ("variant", "variant"), ("model_ms", "model ms"),
                                  ("speedup_vs_eager", "vs eager"), ("gflop", "GFLOP"),
                                  ("fraction_of_bf16_peak", "of bf16 peak"), ("peak_gpu_gib", "peak GPU GiB"),
                                  ("first_call_s", "first call s"), ("label_agreement", "labels = eager"),
                                  ("score_max_abs_diff", "max |d score|"), ("heat_max_abs_diff", "max |d heat|"),
                                  ("draft_ms_per_token", "draft ms/token"), ("error", "note")])]
    return res, "\n".join(md)


def pretrain_section(args) -> tuple[dict, str]:
    from . import pretrain

    res = pretrain.run(presets=tuple(args.pretrain_presets), batches=tuple(args.batches), device=args.device,
                       variants=tuple(args.pretrain_variants),
                       steps=args.steps)
    md = ["### Pre-training step (all seven objectives, AdamW)", "",
          fmt_table(res["rows"], [("preset", "preset"), ("batch", "batch"), ("variant", "variant"),
                                  ("s_per_step", "s/step"), ("volumes_per_s", "volumes/s"), ("first_step_s", "first step s"),
                                  ("speedup_vs_eager", "vs eager"), ("gflop_per_volume", "GFLOP/volume"),
                                  ("fraction_of_bf16_peak", "of bf16 peak"), ("peak_rss_gib", "peak RSS GiB"),
                                  ("peak_gpu_gib", "peak GPU GiB"), ("error", "note")])]
    return res, "\n".join(md)


def data_section(args) -> tuple[dict, str]:
    from . import data

    res = data.run(n=args.data_volumes)
    v = res["volumes"]
    md = [f"### Data loading, {v['n']} synthetic CTs of {'x'.join(map(str, v['shape']))} -> "
          f"{'x'.join(map(str, v['model_input']))}", "",
          fmt_table(res["rows"], [("source", "source"), ("workers", "workers"), ("volumes_per_s", "volumes/s")])]
    return res, "\n".join(md)


def decoding_section(args) -> tuple[dict, str]:
    from . import decoding

    res = decoding.run()
    md = [f"### Report drafting: {res['greedy_tokens']} greedy tokens, batch 1", "",
          fmt_table(res["rows"], [("decoder", "decoder"), ("recompute_s", "recompute prefix s"),
                                  ("cached_s", "cached keys/values s"), ("speedup", "speed-up"),
                                  ("same_output", "same tokens")])]
    return res, "\n".join(md)


SECTIONS = {"model": model_section, "inference": inference_section, "pretrain": pretrain_section, "data": data_section,
            "decoding": decoding_section}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--presets", nargs="+", default=["tiny", "base"], help="inference presets")
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], help="inference CT (slices, rows, cols)")
    ap.add_argument("--repeats", type=int, default=2, help="warm inference repeats (the fastest is kept)")
    ap.add_argument("--model-variants", nargs="+", default=None,
                    help="model-time variants (default: all on a GPU; no torch.compile on a CPU)")
    ap.add_argument("--pretrain-variants", nargs="+", default=None, help="pre-training variants (default: all)")
    ap.add_argument("--pretrain-presets", nargs="+", default=None,
                    help="default: base on a GPU, tiny on a CPU (a base step takes minutes on 2 cores)")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--steps", type=int, default=3, help="timed pre-training steps per setting")
    ap.add_argument("--data-volumes", type=int, default=24)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    from .model_time import VARIANTS as MODEL_VARIANTS
    from .pretrain import VARIANTS as PRETRAIN_VARIANTS

    if args.model_variants is None:
        args.model_variants = [v for v in MODEL_VARIANTS if torch.cuda.is_available() or not ("compile" in v or "CUDA" in v)]
    if args.pretrain_variants is None:
        args.pretrain_variants = [v for v in PRETRAIN_VARIANTS if torch.cuda.is_available() or "compile" not in v]
    for name, chosen, known in (("--model-variants", args.model_variants, MODEL_VARIANTS),
                                ("--pretrain-variants", args.pretrain_variants, PRETRAIN_VARIANTS)):
        unknown = [v for v in chosen if v not in known]
        if unknown:
            ap.error(f"{name}: unknown variant(s) {unknown}; choose from {list(known)}")
    if args.pretrain_presets is None:
        args.pretrain_presets = ["base"] if torch.cuda.is_available() else ["tiny"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    info = machine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu" if torch.cuda.is_available() else "cpu"
    # sections run now replace those of an earlier run on the same kind of machine; the others are kept
    previous = json.loads((out / f"{stem}.json").read_text()) if (out / f"{stem}.json").exists() else {}
    results: dict = {"machine": info, "sections": previous.get("sections", {}), "markdown": previous.get("markdown", {})}
    for name in args.sections:
        res, text = SECTIONS[name](args)
        res["date"] = time.strftime("%Y-%m-%d %H:%M")
        results["sections"][name] = res
        results["markdown"][name] = text
        print(text, flush=True)
    md = [f"## Benchmarks on {info['device']} ({info['cpu']}, {info['cpu_count']} CPUs, torch {info['torch']})"]
    md += ["\n" + f"(measured {results['sections'][n].get('date', '?')})\n\n" + results["markdown"][n]
           for n in SECTIONS if n in results["markdown"]]
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=_jsonable))
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print(f"written: {out / stem}.json, {out / stem}.md")
    return results


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    main()
