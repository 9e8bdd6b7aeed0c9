"""Dataset loaders for MG-3D training: generic manifest (CSV/JSONL), CT-RATE, CTRG-Chest, Medical
Segmentation Decathlon and on-the-fly synthetic data, with an on-disk cache of preprocessed volumes.

Every dataset yields dicts::

    {"id": str, "volume": (1, Z, Y, X) float32 in [0, 1] (model space), "report": str,
     "sentences": list[str], "labels": (L,) float32 or None, "mask": (Z, Y, X) int64 or None}

A row whose file is missing is dropped when the dataset is built; one that cannot be read is skipped when
it is loaded (``collate`` drops it) -- both are counted and logged, never a crash mid-epoch.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from napari_mg3d.domain import looks_like_hu
from napari_mg3d.io import VolumeReadError, header_rescales, read_volume
from napari_mg3d.labels import LABELS, ORGANS, SEGMENTATION_TARGETS
from napari_mg3d.preprocess import PreprocessConfig, labels_to_model, preprocess
from napari_mg3d.reports import sentence_texts
from napari_mg3d.synthetic import finding_prevalence, finding_style, generate_sample
from napari_mg3d.volume import Volume

log = logging.getLogger(__name__)


@dataclass
class Record:
    """One training example before loading: where the volume is and what goes with it."""

    id: str
    volume: str
    report: str = ""
    labels: list[float] | None = None
    mask: str | None = None
    rescale: tuple[float, float] | None = None  # (slope, intercept) applied after reading (CT-RATE)
    spacing: tuple[float, float, float] | None = None  # override (a0, a1, a2) mm from metadata
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SkipCounter:
    missing: int = 0
    unreadable: int = 0
    empty_report: int = 0

    def log(self, name: str) -> None:
        if self.missing or self.unreadable or self.empty_report:
            log.warning("%s: skipped %d rows with missing files, %d unreadable, %d with empty reports",
                        name, self.missing, self.unreadable, self.empty_report)


class PreprocessedCache:
    """Model-space volumes on disk as float16 .npy, keyed by file identity and preprocessing parameters,
    so epochs after the first never decode NIfTI/DICOM again. A change of any preprocessing parameter
    (or of the source file's size/mtime) gives a new key."""

    def __init__(self, root: str | Path, config: PreprocessConfig) -> None:
        self.root = Path(root) / config.fingerprint()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "preprocess.json").write_text(json.dumps(config.to_dict()))

    def key(self, record: Record) -> str:
        parts = [record.volume, str(record.rescale), str(record.spacing), str(record.mask)]
        for p in (record.volume, record.mask):
            if p and os.path.exists(p):
                st = os.stat(p)
                parts += [str(st.st_size), str(int(st.st_mtime))]
        return hashlib.sha1("|".join(parts).encode()).hexdigest()

    def get(self, record: Record) -> tuple[np.ndarray, np.ndarray | None] | None:
        path = self.root / f"{self.key(record)}.npz"
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                return z["volume"], (z["mask"] if "mask" in z.files else None)
        except (OSError, ValueError, KeyError):
            return None

    def put(self, record: Record, volume: np.ndarray, mask: np.ndarray | None) -> None:
        arrays = {"volume": volume.astype(np.float16)}
        if mask is not None:
            arrays["mask"] = mask.astype(np.uint8 if mask.max() < 256 else np.int16)
        save_npz_atomically(self.root / f"{self.key(record)}.npz", arrays)


def save_npz_atomically(path: Path, arrays: dict) -> None:
    """np.savez to a temporary file beside ``path``, then renamed: parallel workers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class VolumeReportDataset(Dataset):
    """Records -> model-space examples, through the one preprocessing contract (and the cache)."""

    def __init__(self, records: Sequence[Record], preprocess_config: PreprocessConfig,
                 cache_dir: str | Path | None = None, name: str = "dataset", require_report: bool = True) -> None:
        self.config = preprocess_config
        self.name = name
        self.skips = SkipCounter()
        kept = []
        for r in records:
            if not os.path.exists(r.volume) or (r.mask and not os.path.exists(r.mask)):
                self.skips.missing += 1
                continue
            if require_report and not r.report.strip():
                self.skips.empty_report += 1
                continue
            kept.append(r)
        self.records = kept
        self.cache = PreprocessedCache(cache_dir, preprocess_config) if cache_dir else None
        self.skips.log(name)
        if not self.records:
            raise ValueError(f"{name}: no usable rows (missing files: {self.skips.missing}, "
                             f"empty reports: {self.skips.empty_report})")

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, r: Record) -> tuple[np.ndarray, np.ndarray | None]:
        vol = load_record_volume(r)
        x, record = preprocess(vol, self.config)
        mask = None
        if r.mask:
            m = read_volume(r.mask)
            if m.shape != vol.shape:
                raise VolumeReadError(f"{r.mask}: mask grid {m.shape} differs from the volume's {vol.shape}")
            mask = labels_to_model(np.rint(m.data).astype(np.int64), record, representation="labels")
        return x.numpy(), mask

    def __getitem__(self, index: int) -> dict | None:
        r = self.records[index]
        try:
            cached = self.cache.get(r) if self.cache else None
            if cached is None:
                volume, mask = self._load(r)
                if self.cache:
                    self.cache.put(r, volume, mask)
            else:
                volume, mask = cached
            sentences = sentence_texts(r.report) if r.report.strip() else []
        except (VolumeReadError, ValueError, OSError) as err:
            self.skips.unreadable += 1
            log.warning("%s: skipping %s (%s)", self.name, r.id, err)
            return None
        return {
            "id": r.id,
            "volume": torch.from_numpy(np.asarray(volume, np.float32)),
            "report": r.report,
            "sentences": sentences,
            "labels": torch.tensor(r.labels, dtype=torch.float32) if r.labels is not None else None,
            "mask": torch.from_numpy(mask.astype(np.int64)) if mask is not None else None,
        }


def load_record_volume(r: Record) -> Volume:
    """A record's volume in HU on its true geometry: one rescale, decided from the header and the metadata
    together (``metadata["rescale_source"]``: header, metadata, or none), the metadata's spacing, and its
    orientation where the header carries none (``metadata["orientation_source"]``)."""
    vol = read_volume(r.volume)
    meta = dict(vol.metadata)
    data, affine = vol.data, vol.affine.copy()
    if header_rescales(meta):
        meta["rescale_source"] = "header"  # nibabel applied scl_slope/scl_inter: the metadata's would be a second
    elif r.rescale is not None:
        data = data * np.float32(r.rescale[0]) + np.float32(r.rescale[1])
        meta["rescale_source"] = "metadata"
    else:
        meta["rescale_source"] = "none"
        if r.extra.get("metadata_missing") and not looks_like_hu(data):
            raise VolumeReadError(f"{r.volume}: its VolumeName has no row in the metadata CSV, the NIfTI header has "
                                  "no rescale, and its values are not Hounsfield units (no air near -1000); add "
                                  "its RescaleSlope/RescaleIntercept to the metadata")
    orientation = r.extra.get("orientation")
    if orientation and not _header_orients(vol):
        affine = affine_from_dicom_geometry(orientation, r.spacing or vol.spacing, data.shape)
        meta["orientation_source"] = "metadata"
    else:
        meta["orientation_source"] = "header"
        if r.spacing is not None:
            affine[:3, :3] = vol.direction * np.asarray(r.spacing)
    return Volume(data, affine, meta)


def _header_orients(vol: Volume) -> bool:
    """Whether the NIfTI header says how the volume lies: a qform or sform that is more than the identity."""
    if vol.metadata.get("format") != "nifti":
        return True
    if not vol.metadata.get("qform_code") and not vol.metadata.get("sform_code"):
        return False
    return not np.allclose(vol.direction, np.eye(3)[::-1])  # NIfTI's identity, in (k, j, i) order


FEET_FIRST = ("FFS", "FFP", "FFDR", "FFDL")


def affine_from_dicom_geometry(orientation: dict, spacing, shape) -> np.ndarray:
    """Index (a0, a1, a2) -> RAS mm from DICOM geometry: ``ImageOrientationPatient`` (row then column
    direction cosines, LPS), ``ImagePositionPatient`` (LPS mm of the first voxel) and ``PatientPosition``.
    a2 runs along a row, a1 down the columns, a0 through the slices along row x column; for a feet-first
    position (FFS, FFP, ...) the slices are taken as stacked the other way (a0 along -(row x column)).
    ``spacing``: (a0, a1, a2) mm."""
    iop = np.asarray(orientation["ImageOrientationPatient"], float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    if str(orientation.get("PatientPosition", "HFS")).upper() in FEET_FIRST:
        normal = -normal
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = normal * spacing[0], col * spacing[1], row * spacing[2]
    lps[:3, 3] = np.asarray(orientation.get("ImagePositionPatient", (0.0, 0.0, 0.0)), float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def collate(items: list[dict | None]) -> dict | None:
    """Stack a batch, dropping examples that failed to load (None)."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    out: dict[str, Any] = {
        "id": [it["id"] for it in items],
        "volume": torch.stack([it["volume"] for it in items]),
        "report": [it["report"] for it in items],
        "sentences": [it["sentences"] for it in items],
    }
    for key in ("labels", "mask"):
        vals = [it[key] for it in items]
        out[key] = torch.stack(vals) if all(v is not None for v in vals) else None
    return out


def collate_keeping_empty(items: list[dict | None]) -> dict:
    """:func:`collate`, with the number of examples that failed to load under "skipped"; a batch whose every
    example failed is ``{"skipped": n}`` rather than None. Lightning
    skips a None batch without calling ``training_step``, and under DDP the other devices would then wait
    in a collective that this device never joins."""
    batch = collate(items) or {}
    batch["skipped"] = sum(it is None for it in items)  # counted by pre-training, reported at its end
    return batch


# ----- layouts --------------------------------------------------------------------------------------
def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def _parse_labels(value: Any, names: Sequence[str] | None) -> list[float] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, dict):
        keys = names or list(value)
        return [float(value.get(k, 0)) for k in keys]
    return [float(v) for v in value]


def manifest_records(path: str | Path, label_names: Sequence[str] | None = None) -> list[Record]:
    """Generic manifest: CSV or JSONL with ``volume``, ``report``, optional ``labels`` (JSON list or
    dict, or one column per name in ``label_names``) and optional ``mask``. Paths are relative to the
    manifest's folder."""
    path = Path(path)
    base = path.parent
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        raise ValueError(f"manifest {path}: expected .csv or .jsonl")
    if rows and "volume" not in rows[0]:
        raise ValueError(f"manifest {path} has no 'volume' column; columns are {sorted(rows[0])}")
    records = []
    for i, row in enumerate(rows):
        labels = row.get("labels")
        if labels is None and label_names and all(n in row for n in label_names):
            labels = [row[n] for n in label_names]
        records.append(Record(
            id=str(row.get("id", f"{path.stem}_{i}")), volume=_resolve(base, row["volume"]),
            report=str(row.get("report", "") or ""), labels=_parse_labels(labels, label_names or LABELS),
            mask=_resolve(base, row["mask"]) if row.get("mask") else None))
    return records


def ct_rate_records(volumes_root: str | Path, reports_csv: str | Path, metadata_csv: str | Path | None = None,
                    labels_csv: str | Path | None = None) -> list[Record]:
    """CT-RATE layout: NIfTI volumes somewhere under ``volumes_root`` (found by VolumeName), reports CSV
    (VolumeName, Findings_EN, Impressions_EN), metadata CSV (VolumeName, RescaleSlope, RescaleIntercept,
    XYSpacing, ZSpacing, ImageOrientationPatient, ImagePositionPatient, PatientPosition) and the 18-label CSV
    (VolumeName + one column per abnormality).

    XYSpacing is DICOM's PixelSpacing: [row spacing, column spacing] in mm, i.e. the spacing along a1
    (between rows) then a2 (between columns). A VolumeName without a metadata row is counted and logged; it
    is read without a metadata rescale, and refused when loaded unless its values are already HU."""
    root = Path(volumes_root)
    files = {p.name: p for p in root.rglob("*.nii.gz")}
    meta: dict[str, dict] = {}
    if metadata_csv:
        with open(metadata_csv, newline="", encoding="utf-8") as fh:
            meta = {row["VolumeName"]: row for row in csv.DictReader(fh)}
    labels: dict[str, list[float]] = {}
    if labels_csv:
        with open(labels_csv, newline="", encoding="utf-8") as fh:
            labels = {row["VolumeName"]: [float(row[n]) for n in LABELS] for row in csv.DictReader(fh)}
    records, missing_meta = [], []
    with open(reports_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            name = row["VolumeName"]
            text = " ".join(t for t in (row.get("Findings_EN", ""), row.get("Impressions_EN", "")) if t and t.strip())
            m = meta.get(name, {})
            extra: dict[str, Any] = {}
            if metadata_csv and not m:
                missing_meta.append(name)
                extra["metadata_missing"] = True
            if m.get("ImageOrientationPatient"):
                extra["orientation"] = {
                    "ImageOrientationPatient": _number_list(m["ImageOrientationPatient"]),
                    "ImagePositionPatient": _number_list(m.get("ImagePositionPatient") or "[0, 0, 0]"),
                    "PatientPosition": str(m.get("PatientPosition") or "HFS").strip()}
            rescale = None
            if m.get("RescaleSlope") not in (None, "") and m.get("RescaleIntercept") not in (None, ""):
                rescale = (float(m["RescaleSlope"]), float(m["RescaleIntercept"]))
            spacing = None
            if m.get("XYSpacing") and m.get("ZSpacing"):
                rows_mm, cols_mm = _number_list(m["XYSpacing"])[:2]
                spacing = (float(m["ZSpacing"]), rows_mm, cols_mm)
            records.append(Record(id=name, volume=str(files.get(name, root / name)), report=text,
                                  labels=labels.get(name), rescale=rescale, spacing=spacing, extra=extra))
    if missing_meta:
        log.warning("CT-RATE: %d of %d volumes have no row in %s (e.g. %s); they get no metadata rescale and are "
                    "refused when loaded unless their values are already HU", len(missing_meta), len(records),
                    metadata_csv, ", ".join(missing_meta[:3]))
    return records


def _number_list(text) -> list[float]:
    """'[0.75, 0.75]', '(1, 0, 0, 0, 1, 0)' or '0.75\\0.75' (DICOM's separator) -> floats."""
    import re

    return [float(v) for v in re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", str(text))]


def ctrg_chest_records(reports_json: str | Path, volumes_root: str | Path, split: str = "train") -> list[Record]:
    """CTRG-Chest: JSON {split: [{id, report, result, image_path}]}; report = findings + impression."""
    data = json.loads(Path(reports_json).read_text())
    items = data.get(split, []) if isinstance(data, dict) else data
    root = Path(volumes_root)
    records = []
    for item in items:
        name = Path(item.get("image_path") or item["id"]).name
        text = " ".join(t for t in (item.get("report", ""), item.get("result", "")) if t and t.strip())
        records.append(Record(id=str(item["id"]), volume=str(root / name), report=text))
    return records


def msd_records(dataset_json: str | Path, split: str = "training") -> tuple[list[Record], list[str]]:
    """Medical Segmentation Decathlon dataset.json -> (records with masks, class names)."""
    path = Path(dataset_json)
    data = json.loads(path.read_text())
    names = [data.get("labels", {}).get(str(i), f"class_{i}") for i in range(len(data.get("labels", {})))]
    records = []
    for i, item in enumerate(data.get(split, [])):
        image = item["image"] if isinstance(item, dict) else item
        records.append(Record(id=Path(image).name.split(".")[0] or str(i), volume=_resolve(path.parent, image),
                              mask=_resolve(path.parent, item["label"]) if isinstance(item, dict) and item.get("label") else None))
    return records, names


@functools.cache
def generator_fingerprint() -> str:
    """A hash of the synthetic generator's source: a cached example made by another version of the generator
    is never read as this one's."""
    import napari_mg3d.synthetic as synthetic

    digest = hashlib.sha1()
    for path in sorted(Path(synthetic.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class SyntheticDataset(Dataset):
    """Report-conditioned synthetic chest CTs generated on the fly, deterministic per index. ``tier``: the
    generator's finding style ("hard" or "visible"). With ``cache_dir`` each example is generated and
    preprocessed once and kept as float16 (volume), uint8 (mask) and its report, so later epochs and later
    runs with the same settings read it instead of making it again."""

    def __init__(self, n: int, preprocess_config: PreprocessConfig, seed: int = 0,
                 shape: tuple[int, int, int] = (96, 128, 160), with_mask: bool = True, tier: str = "hard",
                 cache_dir: str | Path | None = None) -> None:
        finding_style(tier)  # an unknown tier fails here, with the choices
        self.n, self.config, self.seed, self.shape, self.with_mask = n, preprocess_config, seed, tuple(shape), with_mask
        self.tier = tier
        self.target = "lesions"  # the "mask": a key of SEGMENTATION_TARGETS (napari_mg3d.labels)
        self.cache_root = Path(cache_dir) / "synthetic" / preprocess_config.fingerprint() if cache_dir else None

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int):
        """The synthetic sample behind item ``index`` (source grid, HU)."""
        return generate_sample(self.seed + index, shape=self.shape, tier=self.tier)

    def _cache_path(self, index: int) -> Path | None:
        if self.cache_root is None:
            return None
        key = f"{generator_fingerprint()}|{self.tier}|{self.seed + index}|{self.shape}|{self.target}"
        return self.cache_root / f"{hashlib.sha1(key.encode()).hexdigest()}.npz"

    def _make(self, index: int) -> dict:
        s = self.sample(index)
        x, record = preprocess(Volume(s.volume, s.affine), self.config)
        mask = None
        if self.with_mask:
            label_map = target_label_map(s, self.target)
            mask = labels_to_model(label_map, record, representation="labels")
        return {"volume": x.numpy(), "mask": mask, "report": s.report, "sentences": s.sentences,
                "labels": [s.labels[n] for n in LABELS]}

    def _cached(self, index: int, arrays: bool) -> dict | None:
        """The cache entry of item ``index`` (text; with ``arrays`` also volume and, if asked for, the mask), or
        None when there is none usable (absent, damaged, or made without the mask this dataset needs)."""
        path = self._cache_path(index)
        if path is None or not path.exists():
            return None
        try:
            with np.load(path) as z:
                if arrays and self.with_mask and "mask" not in z.files:
                    return None
                item = json.loads(str(z["text"]))
                if arrays:
                    item.update(volume=z["volume"], mask=z["mask"] if self.with_mask else None)
                return item
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is made again

    def _read_or_make(self, index: int) -> dict:
        item = self._cached(index, arrays=True)
        if item is not None:
            return item
        item = self._make(index)
        path = self._cache_path(index)
        if path is not None:
            arrays = {"volume": item["volume"].astype(np.float16),
                      "text": json.dumps({k: item[k] for k in ("report", "sentences", "labels")})}
            if item["mask"] is not None:
                arrays["mask"] = item["mask"].astype(np.uint8)
            save_npz_atomically(path, arrays)
        return item

    def report(self, index: int) -> str:
        """The report of item ``index``, from the cache when it is there (no volume is preprocessed)."""
        item = self._cached(index, arrays=False)
        return item["report"] if item is not None else self.sample(index).report

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:  # also ends a plain ``for item in dataset`` after n items
            raise IndexError(f"synthetic item {index} of a dataset of {self.n}")
        item = self._read_or_make(index)
        mask = item["mask"]
        return {"id": f"synthetic_{self.seed + index}", "volume": torch.from_numpy(np.asarray(item["volume"], np.float32)),
                "report": item["report"], "sentences": list(item["sentences"]),
                "labels": torch.tensor(item["labels"], dtype=torch.float32),
                "mask": torch.from_numpy(mask.astype(np.int64)) if mask is not None else None}


def training_reports(dataset: Dataset) -> list[str]:
    """Every report text of a training set without loading its volumes (synthetic reports: from the cache, or
    generated without preprocessing)."""
    indices = None
    if isinstance(dataset, torch.utils.data.Subset):
        dataset, indices = dataset.dataset, list(dataset.indices)
    order = indices if indices is not None else range(len(dataset))
    if isinstance(dataset, SyntheticDataset):
        return [dataset.report(i) for i in order]
    records = getattr(dataset, "records", None)
    if records is None:
        raise ValueError(f"cannot list the reports of {type(dataset).__name__} without loading it")
    return [records[i].report for i in order if records[i].report.strip()]


def label_prevalence(dataset: Dataset, multiclass: bool = False) -> np.ndarray | None:
    """Fraction of the training examples with each label, known without loading a volume: from the records'
    labels, or from the synthetic generator's design. Multi-label: the mean of each label column;
    ``multiclass``: how often each class is the example's class (the first label that is set, as the loss
    takes it). None where it is not known without loading (no labels in the records, synthetic multi-class)."""
    indices = None
    if isinstance(dataset, torch.utils.data.Subset):
        dataset, indices = dataset.dataset, list(dataset.indices)
    if isinstance(dataset, SyntheticDataset):
        return None if multiclass else np.full(len(LABELS), finding_prevalence())
    records = getattr(dataset, "records", None)
    if not records:
        return None
    rows = [records[i].labels for i in (indices if indices is not None else range(len(records)))]
    if any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
        return None
    y = np.asarray(rows, dtype=np.float64)
    if not multiclass:
        return y.mean(0)
    return np.bincount(y.argmax(1), minlength=y.shape[1]) / len(y)


def combined_label_map(sample) -> np.ndarray:
    """Organs 1..9, lesions 10..27 drawn over them (class names: ALL_CLASSES). Cardiomegaly is left out:
    its "lesion" is the whole heart, which a voxel classifier cannot tell from a normal heart; it is a
    volume-level finding for the classifier."""
    out = sample.organ_label_map()
    lesions = sample.lesion_label_map()
    lesions[lesions == LABELS.index("Cardiomegaly") + 1] = 0
    out[lesions > 0] = lesions[lesions > 0] + len(ORGANS)
    return out


def target_label_map(sample, target: str) -> np.ndarray:
    """The label map of a synthetic ``sample`` for a segmentation ``target`` (classes: SEGMENTATION_TARGETS)."""
    if target == "organs":
        return sample.organ_label_map()
    if target == "lesions":
        return sample.lesion_label_map()
    combined = combined_label_map(sample)
    if target == "all":
        return combined
    if target == "organs+lesion":  # every lesion kind is one class, after the organs
        combined[combined > len(ORGANS)] = len(ORGANS) + 1
        return combined
    raise ValueError(f"unknown segmentation target {target!r}; choose one of {', '.join(SEGMENTATION_TARGETS)}")


class StepIndexedSampler(torch.utils.data.Sampler):
    """Data order as a pure function of how many examples this rank has consumed, so a resumed run sees
    exactly the examples an uninterrupted one would. Epoch e is a permutation seeded by (seed, e); rank r
    takes every world-th index of it. ``start_fn`` returns (consumed, total, rank, world) when iteration
    begins (the training module computes it from the restored global step)."""

    def __init__(self, n: int, seed: int, start_fn) -> None:
        self.n, self.seed, self.start_fn = n, seed, start_fn

    def _epoch_indices(self, epoch: int, rank: int, world: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        share = perm[rank::world]
        return share or perm[:1]

    def __len__(self) -> int:
        consumed, total, _, _ = self.start_fn()
        return max(0, total - consumed)

    def __iter__(self):
        consumed, total, rank, world = self.start_fn()
        per_epoch = len(self._epoch_indices(0, rank, world))
        k = consumed
        while k < total:
            epoch, offset = divmod(k, per_epoch)
            indices = self._epoch_indices(epoch, rank, world)
            for i in indices[offset:]:
                if k >= total:
                    return
                yield i
                k += 1


def build_dataset(spec: str, preprocess_config: PreprocessConfig, cache_dir: str | None = None, seed: int = 0,
                  synthetic_shape: tuple[int, int, int] = (96, 128, 160), with_mask: bool = True) -> Dataset:
    """A dataset from a spec string: synthetic:N[,TIER] | manifest:PATH | ctrate:VOLS,REPORTS[,META[,LABELS]] |
    ctrg:JSON,VOLS | msd:DATASET_JSON. ``with_mask=False`` skips making label maps for synthetic data
    (pre-training does not use them). TIER: the synthetic generator's finding style, hard (default) or visible."""
    kind, _, arg = spec.partition(":")
    parts = [p for p in arg.split(",") if p]
    if kind == "synthetic":
        count = parts[0] if parts else "256"
        if not count.isdigit() or len(parts) > 2:
            raise ValueError(f"cannot read data spec {spec!r}; expected synthetic:N or synthetic:N,TIER "
                             "(N a number of volumes, TIER hard or visible)")
        tier = parts[1] if len(parts) == 2 else "hard"
        return SyntheticDataset(int(count), preprocess_config, seed=seed, shape=synthetic_shape, with_mask=with_mask,
                                tier=tier, cache_dir=cache_dir)
    if kind == "manifest" and parts:
        return VolumeReportDataset(manifest_records(parts[0]), preprocess_config, cache_dir, name=parts[0])
    if kind == "ctrate" and len(parts) >= 2:
        return VolumeReportDataset(ct_rate_records(*parts[:4]), preprocess_config, cache_dir, name="CT-RATE")
    if kind == "ctrg" and len(parts) == 2:
        return VolumeReportDataset(ctrg_chest_records(parts[0], parts[1]), preprocess_config, cache_dir, name="CTRG-Chest")
    if kind == "msd" and parts:
        records, _ = msd_records(parts[0])
        return VolumeReportDataset(records, preprocess_config, cache_dir, name=parts[0], require_report=False)
    raise ValueError(f"cannot read data spec {spec!r}; expected synthetic:N, manifest:PATH, "
                     "ctrate:VOLUMES_DIR,REPORTS_CSV[,METADATA_CSV[,LABELS_CSV]], ctrg:REPORTS_JSON,VOLUMES_DIR or msd:DATASET_JSON")


def findings_first(report: str) -> str:
    """``report`` with the sentences that assert a finding first, in the order of the 18 CT-RATE labels (a
    sentence asserting several sorts by its first), then every other sentence as written.

    The report decoder learns on this order. Trained on the written order, where a report's finding sentences
    fall anywhere among its negations, greedy decoding starts every draft with the most common opening ("No
    ...") and never asserts a finding; with the findings first, the first words of a draft are the decision
    of whether, and which, finding the volume shows."""
    from .metrics import sentence_findings

    if not report.strip():
        return report
    sentences = sentence_texts(report)
    rank = [min((LABELS.index(f) for f in sentence_findings(s)), default=len(LABELS)) for s in sentences]
    order = sorted(range(len(sentences)), key=lambda i: (rank[i], i))
    return " ".join(sentences[i] for i in order)
