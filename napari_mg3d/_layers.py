"""Volume <-> napari layer data, without importing napari: geometry goes into layer kwargs and metadata.

The layer shows world axes (S, P, L) in millimetres; ``metadata["mg3d"]["affine"]`` keeps the exact RAS
affine so that writers and the widget can rebuild the Volume bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .volume import RAS_TO_NAPARI, Volume


def volume_to_layer_data(volume: Volume, name: str = "", **kwargs) -> tuple[np.ndarray, dict[str, Any], str]:
    """(data, kwargs, 'image') for napari: HU data, transform from the geometry, metadata kept."""
    meta = {"mg3d": {"affine": volume.affine.tolist(), "units": "HU", "source": volume.metadata}}
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


def layer_affine_ras(metadata: dict | None, data_to_world: np.ndarray | None) -> np.ndarray:
    """The RAS affine of a layer: exact from our metadata, else derived from napari's data-to-world."""
    mg3d = (metadata or {}).get("mg3d", {})
    if "affine" in mg3d:
        return np.asarray(mg3d["affine"], float)
    if data_to_world is None:
        return np.linalg.inv(RAS_TO_NAPARI)
    return np.linalg.inv(RAS_TO_NAPARI) @ np.asarray(data_to_world, float)
