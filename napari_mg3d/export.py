"""Write a Predictor Result to a folder: NIfTI on the source grid, the report, the scores, and ``result.json``,
the one record of the run that the other files are written from. Shared by the widget's Export button, the
demo and the predict CLI.

A folder that already holds files is refused unless ``overwrite``; overwriting first removes what an earlier
MG-3D export wrote there (and nothing else), so no heat map of another CT stays beside a new index.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import __version__
from .io import write_nifti
from .volume import Volume

if TYPE_CHECKING:
    from .inference import Result

OWN_FILES = ("result.json", "scores.csv", "scores.json", "report.txt", "heatmaps.json", "segmentation.nii.gz",
             "segmentation.dcm",
             "segmentation_classes.json", "timings.json", "heatmap_*.nii.gz", "heatmap_*.dcm")


class ExportError(OSError):
    """The output folder cannot take the export; the message names it and what to do."""


def check_output_folder(folder: str | Path, overwrite: bool = False) -> Path:
    """``folder`` if an export may write there: a folder (or not yet there), empty unless ``overwrite``.
    Call it before a long run, so a bad --out fails at once."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} is a file, not a folder: choose a folder for the outputs")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ExportError(f"{folder} already holds files; choose an empty or new folder, or replace an earlier "
                          "MG-3D export there with --overwrite")
    parent = folder if folder.is_dir() else next((p for p in folder.parents if p.exists()), Path("."))
    if not _writable(parent):
        raise ExportError(f"{folder}: cannot write in {parent} (permission denied); choose another folder")
    return folder


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK | os.X_OK)


def _remove_earlier_export(folder: Path) -> None:
    for pattern in OWN_FILES:
        for file in folder.glob(pattern):
            file.unlink()


def _dicom_seg(result: Result, volume: Volume, folder: Path, written: list[Path]) -> dict[str, str]:
    from .dicom_seg import DicomSegError, write_dicom_seg

    try:
        path, notes = write_dicom_seg(result.labels, result.class_names, volume, folder / "segmentation.dcm",
                                      result.bundle_name)
    except DicomSegError as err:
        result.messages.append(f"no DICOM SEG written: {err}")
        return {}
    result.messages.extend(notes)
    written.append(path)
    return {"segmentation_dicom_seg": path.name}


class _DicomHeatmaps:
    """Heat maps as DICOM Parametric Maps (heatmap_NN.dcm) referencing the source series, its headers read
    once; after the first failure it writes no more and says why once."""

    def __init__(self, result: Result, volume: Volume, folder: Path) -> None:
        self.result, self.volume, self.folder = result, volume, folder
        self.source: tuple | None = None
        self.failed = False
        self.notes: set[str] = set()

    def write(self, index: int, heatmap: np.ndarray) -> Path | None:
        from .dicom_seg import DicomSegError, source_datasets, write_dicom_parametric_map

        if self.failed:
            return None
        try:
            self.source = self.source or source_datasets(self.volume)
            path, said = write_dicom_parametric_map(heatmap, self.result.sentences[index], self.volume,
                                                    self.folder / f"heatmap_{index:02d}.dcm", self.result.bundle_name,
                                                    self.source)
        except DicomSegError as err:
            self.failed = True
            self.result.messages.append(f"no DICOM Parametric Map written: {err}")
            return None
        self.notes.update(said)
        return path

    def finish(self) -> None:
        self.result.messages.extend(sorted(self.notes))


def _spans(sentences: list[str], report: str) -> list[list[int] | None]:
    """Each sentence's [start, end) character span in ``report`` (searched in order), None where it is not
    there (a typed sentence, or the report was edited)."""
    spans, start = [], 0
    for sentence in sentences:
        at = report.find(sentence, start)
        if at < 0:
            at = report.find(sentence)
        spans.append([at, at + len(sentence)] if at >= 0 else None)
        if at >= 0:
            start = at + len(sentence)
    return spans


def result_record(result: Result, volume: Volume, files: dict[str, str], report_text: str) -> dict:
    """The run as one JSON-able record: what ran, on what, what it found and how far to trust it."""
    denied = result.denied_rows
    return {
        "package_version": __version__,
        "bundle": {"name": result.bundle_name, "path": result.bundle_path, "model_card": result.model_card},
        "source": {"path": str(volume.metadata.get("source", "")), "shape": list(volume.shape),
                   "format": volume.metadata.get("format", ""),
                   "study_instance_uid": (volume.metadata.get("tags") or {}).get("StudyInstanceUID"),
                   "series_instance_uid": (volume.metadata.get("tags") or {}).get("SeriesInstanceUID"),
                   "intensity_units": volume.metadata.get("intensity_units", "unknown"),
                   "spacing_mm": [round(s, 6) for s in volume.spacing], "affine_ras": np.asarray(volume.affine).tolist()},
        "domain_warnings": list(result.domain_warnings),
        "overrides": list(result.overrides),
        "messages": list(result.messages),
        "cautions": list(result.cautions),
        "scores": {"source": result.score_source, "heading": result.score_heading, "values": dict(result.scores)},
        "report": report_text,
        "sentences": [{"text": s, "span": span, "heatmap": files.get(f"heatmap_{i:02d}"),
                       "heatmap_dicom": files.get(f"heatmap_{i:02d}_dicom"), "drafted_denial": i in denied}
                      for i, (s, span) in enumerate(zip(result.sentences, _spans(result.sentences, report_text)))],
        "options": dict(result.options),
        "segmentation": {"file": files.get("segmentation"), "dicom_seg": files.get("segmentation_dicom_seg"),
                         "classes": list(result.class_names)},
        "timings_s": dict(result.timings),
    }


def write_result(result: Result, volume: Volume, folder: str | Path, report_text: str | None = None,
                 overwrite: bool = False) -> list[Path]:
    """Files written: segmentation.nii.gz (+ class names), heatmap_NN.nii.gz (+ heatmaps.json: file ->
    sentence), report.txt (``report_text`` if given, e.g. as edited, else the draft), scores.csv/json, and
    result.json (everything, with the model card and the domain check's warnings)."""
    folder = check_output_folder(folder, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_earlier_export(folder)
    written: list[Path] = []
    files: dict[str, str] = {}

    def text_file(name: str, content: str) -> None:
        (folder / name).write_text(content)
        written.append(folder / name)

    if result.labels is not None:
        written.append(write_nifti(folder / "segmentation.nii.gz", result.labels, volume, label=True))
        files["segmentation"] = "segmentation.nii.gz"
        text_file("segmentation_classes.json", json.dumps(dict(enumerate(result.class_names)), indent=1))
        if volume.metadata.get("format") == "dicom":  # DICOM in: a DICOM SEG out, beside the NIfTI
            files.update(_dicom_seg(result, volume, folder, written))
    dicom_maps = _DicomHeatmaps(result, volume, folder) if volume.metadata.get("format") == "dicom" else None
    for i in range(len(result.sentences)):
        heat = result.heatmap(i)  # resampled to the source grid once, for both files
        written.append(write_nifti(folder / f"heatmap_{i:02d}.nii.gz", heat, volume, label=False))
        files[f"heatmap_{i:02d}"] = f"heatmap_{i:02d}.nii.gz"
        if dicom_maps is not None and (path := dicom_maps.write(i, heat)) is not None:  # for PACS
            written.append(path)
            files[f"heatmap_{i:02d}_dicom"] = path.name
    if dicom_maps is not None:
        dicom_maps.finish()
    if result.sentences:
        text_file("heatmaps.json", json.dumps({f"heatmap_{i:02d}.nii.gz": s for i, s in enumerate(result.sentences)},
                                              indent=1))
    report = (report_text if report_text is not None else " ".join(result.report)).strip()
    if report:
        text_file("report.txt", report + "\n")
    record = result_record(result, volume, files, report)
    if result.scores:
        with open(folder / "scores.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["finding", result.score_heading])
            for name, p in sorted(result.scores.items(), key=lambda kv: -kv[1]):
                w.writerow([name, f"{p:.6f}"])
        written.append(folder / "scores.csv")
        text_file("scores.json", json.dumps({**record["scores"], "scores": record["scores"]["values"],
                                             "model_card": record["bundle"]["model_card"]}, indent=1))
    text_file("result.json", json.dumps(record, indent=1, default=float))
    return written
