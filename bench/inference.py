"""Inference per stage on a synthetic 512x512x300 CT (.nii.gz): the plain eager fp32 path and the optimised
path of the same Predictor, side by side, with peak memory per stage and the Predictor's memory estimate."""

from __future__ import annotations

import numpy as np
import torch

from napari_mg3d.inference import Predictor, estimate_memory_bytes
from napari_mg3d.io import read_volume

from .common import bundle_for, stage, synthetic_ct

SENTENCES = ["A 12 mm solid nodule in the right upper lobe.", "There is a left pleural effusion.",
             "Heart size is normal.", "No consolidation."]
QUERY = "Ground glass opacity in the left lower lobe."

PATHS = {
    # name: (Predictor keyword arguments, how the typed sentence's heat map reaches the screen)
    "eager": ({"precision": "fp32", "class_by_class": True, "channels_last": False, "cuda_graphs": False},
              "resampled to the CT grid"),
    "optimised": ({"precision": "auto", "class_by_class": False}, "model grid + transform"),
}


WORST_CASE = "map labels, random-weight head's scores (worst case; not in the whole run)"


def trained_like_logits(volume, size, device: str) -> torch.Tensor:
    """Class logits with the structure of a trained model's on the grid of ``size``: the trained demo (tiny)
    model's logits for ``volume``, interpolated up. Presets without trained weights are timed with these for
    mapping labels back to the CT grid: a random-weight head's salt-and-pepper map makes every cell a
    boundary cell, which is not what a user ever sees (it is timed too, as the worst case)."""
    demo = Predictor(bundle_for("tiny"), device=device, precision="fp32")
    demo.encode(volume)
    logits = demo._segment_logits()
    return torch.nn.functional.interpolate(logits[None], size=tuple(size), mode="trilinear", align_corners=False)[0]


def run_path(preset: str, path_name: str, ct_path, device: str, repeats: int = 2) -> tuple[list[dict], dict]:
    """Every stage once cold, then ``repeats`` warm full runs; rows hold the fastest warm time per stage."""
    kwargs, query_mode = PATHS[path_name]
    rows: list[dict] = []
    with stage(rows, "read .nii.gz"):
        volume = read_volume(ct_path)
    with stage(rows, "load bundle"):
        predictor = Predictor(bundle_for(preset), device=device, **kwargs)
    trained_like = None if preset == "tiny" else trained_like_logits(volume, predictor.config.input_size, device)
    outputs = {}
    best: dict[str, dict] = {}
    for _ in range(repeats + 1):  # first pass warms caches and kernels
        predictor._cache_key = None
        trial: list[dict] = []
        with stage(trial, "preprocess + encode"):
            predictor.encode(volume)
        with stage(trial, "segmentation decoder (model grid)"):
            logits = predictor._segment_logits()
        outputs["decoder argmax (model grid)"] = logits.argmax(0).numpy().astype(np.uint8)
        with stage(trial, "map labels to CT grid"):
            outputs["segmentation (to CT grid)"] = predictor._segment(logits if trained_like is None else trained_like)
        if trained_like is not None:
            with stage(trial, WORST_CASE):
                predictor._segment(logits)
        for name, fn in (("scores", predictor._scores), ("report draft", lambda: predictor._draft(None)),
                         ("all sentence heat maps (4)", lambda: predictor.sentence_heatmaps(SENTENCES))):
            with stage(trial, name):
                outputs[name] = fn()
        query = predictor.heatmap_overlay if query_mode.startswith("model") else predictor.heatmap
        with stage(trial, f"re-query one sentence ({query_mode})"):
            outputs["query"] = query(QUERY)
        for row in trial:
            if row["stage"] not in best or row["seconds"] < best[row["stage"]]["seconds"]:
                best[row["stage"]] = row
    rows += list(best.values())
    model_stages = [r for r in rows if r["stage"] not in ("read .nii.gz", "load bundle", WORST_CASE)
                    and not r["stage"].startswith("re-query")]
    total = {"stage": "whole run (read + all outputs)", "seconds": sum(r["seconds"] for r in model_stages) + rows[0]["seconds"],
             "peak_rss_gib": max(r["peak_rss_gib"] for r in rows),
             "peak_gpu_gib": max((r["peak_gpu_gib"] or 0) for r in rows) if torch.cuda.is_available() else None}
    rows.append(total)
    for r in rows:
        r.update(preset=preset, path=path_name, precision=predictor.precision)
    estimate = estimate_memory_bytes(volume.shape, predictor.config, predictor.weight_bytes,
                                     predictor.class_by_class) + volume.data.nbytes
    memory = {"preset": preset, "path": path_name, "estimate_gib": estimate / 2**30,
              "measured_peak_gib": total["peak_rss_gib"] - rows[0]["start_rss_gib"]}
    memory["ratio"] = memory["estimate_gib"] / memory["measured_peak_gib"]
    return rows, {"memory": memory, "outputs": outputs}


def agreement(eager: dict, fast: dict) -> dict:
    """How far the optimised outputs are from the eager ones."""
    seg_e, seg_f = eager["segmentation (to CT grid)"], fast["segmentation (to CT grid)"]
    heat_e = np.asarray(eager["all sentence heat maps (4)"])
    heat_f = np.asarray(fast["all sentence heat maps (4)"])
    se, sf = eager["scores"][0], fast["scores"][0]
    dec_e, dec_f = eager["decoder argmax (model grid)"], fast["decoder argmax (model grid)"]
    return {"segmentation_voxel_agreement": float((seg_e == seg_f).mean()),
            "decoder_argmax_agreement": float((dec_e == dec_f).mean()),
            "heatmap_max_abs_diff": float(np.abs(heat_e - heat_f).max()),
            "score_max_abs_diff": float(max(abs(se[k] - sf[k]) for k in se)),
            "report_identical": eager["report draft"] == fast["report draft"]}


def _in_fresh_process(preset: str, path_name: str, ct, device: str, repeats: int):
    """run_path in this (fresh) process; outputs travel back as plain arrays and lists."""
    rows, extra = run_path(preset, path_name, ct, device, repeats)
    out = extra["outputs"]
    keep = {k: out[k] for k in ("segmentation (to CT grid)", "decoder argmax (model grid)",
                                "all sentence heat maps (4)", "scores", "report draft")}
    keep["segmentation (to CT grid)"] = keep["segmentation (to CT grid)"].astype(np.uint8)
    return rows, extra["memory"], keep


def run(presets=("tiny", "base"), device: str = "auto", shape=(300, 512, 512), repeats: int = 2) -> dict:
    """Each (preset, path) runs in its own process, so that peak memory is not flattered or inflated by what
    an earlier run left in the allocator."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ct = synthetic_ct(shape)
    rows, memory, agree = [], [], {}
    for preset in presets:
        outs = {}
        for path_name in PATHS:
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
                r, mem, outs[path_name] = pool.submit(_in_fresh_process, preset, path_name, ct, device, repeats).result()
            rows += r
            memory.append(mem)
        agree[preset] = agreement(outs["eager"], outs["optimised"])
    return {"volume": {"shape": list(shape), "file": ct.name}, "rows": rows, "memory": memory, "agreement": agree}
