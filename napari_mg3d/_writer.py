"""napari writer contributions: label and image layers -> NIfTI on the source image's geometry."""

from __future__ import annotations

import numpy as np

from ._layers import layer_source_affine
from .io import write_nifti


def write_labels(path: str, data, meta: dict) -> list[str]:
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"only 3D label layers can be written as NIfTI volumes; this one is {data.ndim}D")
    return [str(write_nifti(path, data.astype(np.int32), layer_source_affine(meta), label=True))]


def write_image(path: str, data, meta: dict) -> list[str]:
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"only 3D image layers can be written as NIfTI volumes; this one is {data.ndim}D")
    return [str(write_nifti(path, data.astype(np.float32), layer_source_affine(meta), label=False))]
