"""napari reader contribution: NIfTI, NRRD, MetaImage and DICOM series (folders) through napari_mg3d.io."""

from __future__ import annotations

from pathlib import Path

from ._layers import volume_to_layer_data
from .io import (
    METAIMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    NRRD_SUFFIXES,
    VolumeReadError,
    _looks_like_dicom,
    read_volume,
)


def _accepts(path: str) -> bool:
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return any(f.is_file() and (_looks_like_dicom(f) or f.suffix.lower() == ".dcm") for f in list(p.iterdir())[:50])
    return name.endswith(NIFTI_SUFFIXES + NRRD_SUFFIXES + METAIMAGE_SUFFIXES + (".dcm",)) or _looks_like_dicom(p)


def napari_get_reader(path):
    """Return a reader function for ``path`` (or a list of DICOM files), or None if not ours."""
    if isinstance(path, list):
        if not path:
            return None
        if len(path) > 1 and all(_accepts(p) and not str(p).lower().endswith(NIFTI_SUFFIXES) for p in path):
            return _read_series
        path = path[0]
    return _read_one if _accepts(str(path)) else None


def _read_one(path):
    path = path[0] if isinstance(path, list) else path
    return [volume_to_layer_data(read_volume(path))]


def _read_series(paths):
    return [volume_to_layer_data(read_volume([str(p) for p in paths]), name=Path(paths[0]).parent.name)]


__all__ = ["napari_get_reader", "VolumeReadError"]
