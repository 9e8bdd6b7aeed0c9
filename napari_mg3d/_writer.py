"""napari writer contributions: label and image layers -> NIfTI on the source image's geometry."""

from __future__ import annotations

import numpy as np

from ._layers import layer_affine_ras
from .io import write_nifti


def _affine(meta: dict) -> np.ndarray:
    world = meta.get("affine")  # napari passes the layer's affine matrix (data -> world) when no metadata of ours
    matrix = np.asarray(world.affine_matrix if hasattr(world, "affine_matrix") else world, float) if world is not None else None
    if matrix is not None and "scale" in meta:
        sc = np.diag([*meta["scale"], 1.0])
        sc[:3, 3] = meta.get("translate", (0, 0, 0))
        matrix = matrix @ sc
    return layer_affine_ras(meta.get("metadata"), matrix)


def write_labels(path: str, data, meta: dict) -> list[str]:
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"only 3D label layers can be written as NIfTI volumes; this one is {data.ndim}D")
    return [str(write_nifti(path, data.astype(np.int32), _affine(meta), label=True))]


def write_image(path: str, data, meta: dict) -> list[str]:
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"only 3D image layers can be written as NIfTI volumes; this one is {data.ndim}D")
    return [str(write_nifti(path, data.astype(np.float32), _affine(meta), label=False))]
