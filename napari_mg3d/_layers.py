"""Volume <-> napari layer data, without importing napari: geometry goes into layer kwargs and metadata.

The layer shows world axes (S, P, L) in millimetres; ``metadata["mg3d"]["affine"]`` keeps the exact RAS
affine so that writers and the widget can rebuild the Volume bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .volume import RAS_TO_NAPARI, Volume


def volume_to_layer_data(volume: Volume, name: str = "", **kwargs) -> tuple[np.ndarray, dict[str, Any], str]:
    """(data, kwargs, 'image') for napari: HU data, transform from the geometry, metadata kept."""
    units = volume.metadata.get("intensity_units", "unknown")
    meta = {"mg3d": {"affine": volume.affine.tolist(), "units": units, "source": volume.metadata}}
    kw = {"name": name or str(volume.metadata.get("source", "volume")).rstrip("/").split("/")[-1],
          "metadata": meta, "colormap": "gray", "contrast_limits": _window(volume.data), **volume.napari_transform()}
    kw.update(kwargs)
    return volume.data, kw, "image"


def _window(data: np.ndarray) -> tuple[float, float]:
    """A soft-tissue window for CT in HU, else the data's robust range."""
    lo, hi = float(np.percentile(data[:: max(1, data.size // 200_000)], 0.5)), float(data.max())
    if lo < -500 and hi > 300:
        return (-400.0, 600.0)
    return (lo, hi if hi > lo else lo + 1)


TRANSFORM_KEYS = ("scale", "translate", "rotate", "shear", "affine")


def layer_world_matrix(state: Mapping[str, Any]) -> np.ndarray:
    """A layer's full data -> world matrix (4x4) from its public transform: scale, translate, rotate and
    shear, then its affine (napari's order). ``state``: a layer's attributes by name, or the ``meta`` dict
    napari hands a writer; absent entries are the identity."""
    from napari.utils.transforms import Affine

    physical = Affine(**{k: state[k] for k in TRANSFORM_KEYS[:4] if state.get(k) is not None}, ndim=3)
    affine = state.get("affine")
    outer = np.eye(4) if affine is None else np.asarray(getattr(affine, "affine_matrix", affine), float)
    return outer @ physical.affine_matrix


def layer_source_affine(state: Mapping[str, Any]) -> np.ndarray:
    """The RAS affine (voxel index -> RAS mm) of a layer's data: exact from our metadata where the layer has
    it (``state["metadata"]["mg3d"]["affine"]``), else its world matrix read as napari's (S, P, L) mm."""
    mg3d = (state.get("metadata") or {}).get("mg3d", {})
    if "affine" in mg3d:
        return np.asarray(mg3d["affine"], float)
    return np.linalg.inv(RAS_TO_NAPARI) @ layer_world_matrix(state)


def layer_state(layer) -> dict[str, Any]:
    """The public transform and metadata of a napari layer, as :func:`layer_source_affine` takes them."""
    return {**{k: getattr(layer, k) for k in TRANSFORM_KEYS}, "metadata": layer.metadata}
