"""Volume: voxels plus geometry, the data contract between readers, preprocessing, inference and napari.

* ``data``: float32, axis order (a0, a1, a2) = (slice, row, column) as stored: NIfTI's (k, j, i),
  DICOM's (slice, row, column). Intensities in Hounsfield units for CT (raw for MR).
* ``affine``: 4x4, maps an index (a0, a1, a2, 1) to world millimetres in RAS+ (the NIfTI convention:
  +x towards the patient's Right, +y Anterior, +z Superior). DICOM's LPS is converted on reading.
* napari shows world axes in the order (S, P, L) -- superior, posterior, patient-left -- so an axial slice
  appears with anterior up and the patient's right on the image's left (radiological convention).
  :meth:`Volume.napari_affine` gives the index -> (S, P, L) matrix; for axis-aligned data it is a pure
  scale + translate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

# RAS (x, y, z) -> napari world (S, P, L) = (z, -y, -x)
RAS_TO_NAPARI = np.array([[0, 0, 1, 0], [0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


@dataclass
class Volume:
    """A 3D image with geometry. See the module docstring for axis and world conventions."""

    data: np.ndarray
    affine: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=float)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.data.ndim != 3:
            raise ValueError(f"a Volume is 3D; got an array of shape {self.data.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along (a0, a1, a2) in mm."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        """RAS mm of the centre of voxel (0, 0, 0)."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3x3, column k = RAS unit vector of array axis k."""
        return self.affine[:3, :3] / np.array(self.spacing)

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Nearest anatomical direction of each array axis, e.g. ('S', 'P', 'L')."""
        import nibabel as nib

        return tuple(nib.orientations.aff2axcodes(self.affine))  # type: ignore[return-value]

    def index_to_world(self, index: ArrayLike) -> np.ndarray:
        """(..., 3) voxel indices (a0, a1, a2) -> (..., 3) RAS mm."""
        idx = np.asarray(index, dtype=float)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, world: ArrayLike) -> np.ndarray:
        """(..., 3) RAS mm -> (..., 3) fractional voxel indices."""
        inv = np.linalg.inv(self.affine)
        return np.asarray(world, dtype=float) @ inv[:3, :3].T + inv[:3, 3]

    def napari_affine(self) -> np.ndarray:
        """4x4 index -> napari world (S, P, L) mm."""
        return RAS_TO_NAPARI @ self.affine

    def napari_transform(self) -> dict[str, Any]:
        """Layer keyword arguments: ``scale``/``translate`` when axis-aligned, else ``affine``."""
        aff = self.napari_affine()
        lin = aff[:3, :3]
        if np.allclose(lin, np.diag(np.diag(lin)), atol=1e-6) and np.all(np.diag(lin) > 0):
            return {"scale": tuple(float(v) for v in np.diag(lin)), "translate": tuple(float(v) for v in aff[:3, 3])}
        return {"affine": aff}

    def with_data(self, data: np.ndarray, **metadata: Any) -> Volume:
        """A volume on the same grid with other voxels (e.g. a label map)."""
        if data.shape[-3:] != self.shape:
            raise ValueError(f"data shape {data.shape} does not match the volume grid {self.shape}")
        return Volume(data, self.affine.copy(), {**self.metadata, **metadata})
