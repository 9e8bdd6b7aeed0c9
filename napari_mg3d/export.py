"""Write a Predictor Result to a folder: NIfTI on the source grid, report text, scores as CSV and JSON.
Shared by the widget's Export button, the demo and the predict CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .io import write_nifti
from .volume import Volume


def write_result(result, volume: Volume, folder: str | Path, report_text: str | None = None) -> list[Path]:
    """Files written: segmentation.nii.gz (+ class names), heatmap_NN.nii.gz (+ heatmaps.json: file ->
    sentence), report.txt (``report_text`` if given, e.g. as edited, else the draft), scores.csv/json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def text_file(name: str, content: str) -> None:
        (folder / name).write_text(content)
        written.append(folder / name)

    if result.labels is not None:
        written.append(write_nifti(folder / "segmentation.nii.gz", result.labels, volume, label=True))
        text_file("segmentation_classes.json", json.dumps(dict(enumerate(result.class_names)), indent=1))
    for i in range(len(result.sentences)):
        written.append(write_nifti(folder / f"heatmap_{i:02d}.nii.gz", result.heatmap(i), volume, label=False))
    if result.sentences:
        text_file("heatmaps.json", json.dumps({f"heatmap_{i:02d}.nii.gz": s for i, s in enumerate(result.sentences)},
                                              indent=1))
    report = report_text if report_text is not None else " ".join(result.report)
    if report.strip():
        text_file("report.txt", report.strip() + "\n")
    if result.scores:
        with open(folder / "scores.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["finding", "probability"])
            for name, p in sorted(result.scores.items(), key=lambda kv: -kv[1]):
                w.writerow([name, f"{p:.6f}"])
        written.append(folder / "scores.csv")
        text_file("scores.json", json.dumps({"source": result.score_source, "scores": result.scores}, indent=1))
    return written
