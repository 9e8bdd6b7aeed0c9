"""Check a training data set before the GPU hours: read every record as pre-training will, without training.

    python -m training.check_data --data ctrate:VOLS,reports.csv,metadata.csv --out summary.json
    python -m training.check_data --data manifest:pairs.jsonl --sample 200 --preset base

Writes a JSON summary and prints it as a short table: records, unreadable ones (the first few with their
reasons), report sentences in total / dropped / cut, reports truncated, Hounsfield units after the rescale
(1st and 99th percentile over the voxels read), orientations and spacings, and where each record's rescale
and orientation came from (header / metadata / none). Accepts every --data form the training CLIs accept.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np

from napari_mg3d.model import build_model_config
from napari_mg3d.model.text import load_hf_text_model, tokenize_reports
from napari_mg3d.preprocess import preprocess_config_of
from napari_mg3d.reports import sentence_texts
from napari_mg3d.volume import Volume

from .data import SyntheticDataset, build_dataset, load_record_volume
from .params import run_cli

VOXELS_PER_VOLUME = 20_000  # the HU percentiles pool this many voxels of every volume read
FIRST_UNREADABLE = 10


def _voxels(data: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    flat = data.reshape(-1)
    return flat[rng.integers(0, flat.size, min(VOXELS_PER_VOLUME, flat.size))]


def _volume_and_report(dataset, index: int) -> tuple[Volume, str, str]:
    if isinstance(dataset, SyntheticDataset):
        sample = dataset.sample(index)
        return Volume(sample.volume, sample.affine, {"rescale_source": "none (synthetic HU)",
                                                     "orientation_source": "header"}), sample.report, str(index)
    record = dataset.records[index]
    return load_record_volume(record), record.report, record.volume


def check(spec: str, preset: str = "tiny", sample: int = 0, seed: int = 0, text_encoder: str = "",
          synthetic_shape=(96, 128, 160), progress: bool = True) -> dict:
    """The summary of data ``spec`` read as pre-training with ``preset`` reads it."""
    from tqdm import tqdm

    cfg = build_model_config(preset, {"text_encoder": text_encoder} if text_encoder else {})
    dataset = build_dataset(spec, preprocess_config_of(None, cfg), None, seed, tuple(synthetic_shape), with_mask=False)
    indices = list(range(len(dataset)))
    if sample and sample < len(indices):
        indices = sorted(random.Random(seed).sample(indices, sample))
    tokenizer, _ = load_hf_text_model(cfg.text_encoder)
    rng = np.random.default_rng(seed)
    text = Counter()
    voxels, unreadable, axcodes, sources, orientation_sources, spacings = [], [], Counter(), Counter(), Counter(), []
    for i in tqdm(indices, desc="checking records", disable=not progress):
        try:
            volume, report, name = _volume_and_report(dataset, i)
        except (ValueError, OSError) as err:
            records = getattr(dataset, "records", None)
            unreadable.append({"path": records[i].volume if records else str(i), "reason": str(err)})
            continue
        sentences = sentence_texts(report) if report.strip() else []
        if sentences:
            text.update(tokenize_reports(tokenizer, [sentences], cfg.max_words, cfg.max_sentences,
                                         cfg.max_sentence_words).stats)
        else:
            text["reports_without_sentences"] += 1
        voxels.append(_voxels(volume.data, rng))
        axcodes["".join(volume.axcodes)] += 1
        sources[volume.metadata.get("rescale_source", "none")] += 1
        orientation_sources[volume.metadata.get("orientation_source", "header")] += 1
        spacings.append(volume.spacing)
    pooled = np.concatenate(voxels) if voxels else np.zeros(0, np.float32)
    skips = getattr(dataset, "skips", None)
    sp = np.asarray(spacings) if spacings else np.zeros((0, 3))
    return {
        "data": spec, "preset": preset, "records": len(dataset), "checked": len(indices),
        "missing_files": int(getattr(skips, "missing", 0)), "empty_reports": int(getattr(skips, "empty_report", 0)),
        "unreadable": {"count": len(unreadable), "first": unreadable[:FIRST_UNREADABLE]},
        "sentences_total": int(text["sentences"]), "sentences_dropped": int(text["sentences_dropped"]),
        "sentences_cut": int(text["sentences_cut"]), "reports_truncated": int(text["reports_truncated"]),
        "reports_without_sentences": int(text["reports_without_sentences"]),
        "hu_p1": float(np.percentile(pooled, 1)) if pooled.size else None,
        "hu_p99": float(np.percentile(pooled, 99)) if pooled.size else None,
        "orientation": dict(axcodes), "orientation_source": dict(orientation_sources),
        "rescale_source": dict(sources),
        "spacing_mm": {axis: {"min": float(sp[:, k].min()), "median": float(np.median(sp[:, k])),
                              "max": float(sp[:, k].max())} for k, axis in enumerate(("a0", "a1", "a2"))} if len(sp) else {},
    }


def format_summary(s: dict) -> str:
    rows = [("records (checked)", f"{s['records']} ({s['checked']})"),
            ("missing files / empty reports", f"{s['missing_files']} / {s['empty_reports']}"),
            ("unreadable", str(s["unreadable"]["count"])),
            ("sentences: total / dropped / cut", f"{s['sentences_total']} / {s['sentences_dropped']} / {s['sentences_cut']}"),
            ("reports truncated", str(s["reports_truncated"])),
            ("HU after rescale, p1 .. p99", f"{s['hu_p1']:.0f} .. {s['hu_p99']:.0f}" if s["hu_p1"] is not None else "-"),
            ("orientation", ", ".join(f"{k} {v}" for k, v in s["orientation"].items()) or "-"),
            ("rescale from", ", ".join(f"{k} {v}" for k, v in s["rescale_source"].items()) or "-"),
            ("orientation from", ", ".join(f"{k} {v}" for k, v in s["orientation_source"].items()) or "-")]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"  unreadable: {u['path']}: {u['reason']}" for u in s["unreadable"]["first"][:3]]
    return "\n".join(lines)


def _main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m training.check_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="data spec, as pretrain --data takes it")
    ap.add_argument("--preset", default="tiny", help="model preset whose input the data is read for (default: tiny)")
    ap.add_argument("--text-encoder", default="", help="text encoder whose tokenizer counts the report text")
    ap.add_argument("--sample", type=int, default=0, help="check this many records drawn at random (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic-shape", type=int, nargs=3, default=[96, 128, 160])
    ap.add_argument("--out", default="", help="write the summary as JSON here")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    a = ap.parse_args(argv)
    summary = check(a.data, a.preset, a.sample, a.seed, a.text_encoder, a.synthetic_shape, not a.no_progress)
    print(format_summary(summary))
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1))
        print(f"wrote {a.out}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    return run_cli(_main, argv)



def cli() -> None:
    """The console script: ``main`` without its return value (which the script would print as an error)."""
    main()


if __name__ == "__main__":
    main()
