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
        try:
            return any(f.is_file() and (_looks_like_dicom(f) or f.suffix.lower() == ".dcm") for f in list(p.iterdir())[:50])
        except OSError:  # unreadable (permission denied): ours to read, so that the user hears why it fails
            return True
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
    return _reported(path, lambda: [volume_to_layer_data(read_volume(path))])


def _read_series(paths):
    return _reported(paths[0], lambda: [volume_to_layer_data(read_volume([str(p) for p in paths]),
                                                             name=Path(paths[0]).parent.name)])


def _reported(path, read):
    """Never raise into napari: a file that cannot be read becomes a notification naming it and the cause,
    and napari's empty-file sentinel."""
    try:
        return read()
    except (VolumeReadError, OSError, ValueError) as err:
        from napari.utils.notifications import show_error

        cause = err if isinstance(err, VolumeReadError) else f"{type(err).__name__}: {err}"
        show_error(f"MG-3D could not open {path}: {cause}")
        return [(None,)]


__all__ = ["napari_get_reader", "VolumeReadError"]
