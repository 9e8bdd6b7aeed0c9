"""Is a volume what the model was made for? Checks with reasons, before any inference.

Each check has a documented threshold (the constants below) and gives a :class:`DomainIssue`: ``refuse``
issues stop a run unless the user overrides them (``Predictor(..., allow_out_of_domain=True)``, CLI
``--force``), ``warn`` issues run and travel with the outputs. Intensity checks follow the modality the
bundle declares (CT for every bundle so far), so a future MR bundle is not refused MR.

Thresholds (CT):
* NaN/inf voxels: any (refuse).
* constant volume: max - min < CONSTANT_RANGE_HU (refuse); all air: more than ALL_AIR_FRACTION of the
  voxels below AIR_HU (refuse).
* not Hounsfield units: the 0.5th percentile above NO_AIR_HU, i.e. no air around or inside the patient
  (refuse); the hint names the likely cause: values in [0, 1] (normalised), in [0, 255] (an 8-bit
  export), other non-negative values (raw stored values without the rescale, or MR).
* 8-bit integer voxels (uint8/int8): data windowed to 256 grey values (refuse).
* too few slices: fewer than MIN_SLICES along any axis (refuse); a thin slab: superior-inferior extent
  below MIN_CHEST_EXTENT_MM (warn; a chest CT covers ~250-350 mm).
* zero or singular affine: |det| of its 3x3 part below 1e-6 mm^3 (refuse).
* not a chest: lung-density voxels (between LUNG_LOW_HU and LUNG_HIGH_HU) inside the body below
  MIN_LUNG_FRACTION of the body's volume (warn; a chest CT has 15-40%, an abdomen a few percent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONSTANT_RANGE_HU = 1.0
AIR_HU = -900.0
ALL_AIR_FRACTION = 0.98
NO_AIR_HU = -500.0
MIN_SLICES = 8
MIN_CHEST_EXTENT_MM = 150.0
LUNG_LOW_HU, LUNG_HIGH_HU = -950.0, -600.0
BODY_HU = -300.0
MIN_LUNG_FRACTION = 0.05
SAMPLE_VOXELS = 2_000_000  # the intensity checks look at a regular subsample of at most this many voxels


@dataclass(frozen=True)
class DomainIssue:
    """One reason a volume is outside what the model was made for. ``severity``: 'refuse' or 'warn'."""

    code: str
    severity: str
    message: str

    def __str__(self) -> str:
        return self.message


def check_domain(data: np.ndarray, affine: np.ndarray, modality: str = "CT", name: str = "the volume",
                 stored_dtype: str | None = None) -> list[DomainIssue]:
    """Every issue of ``data`` (a0, a1, a2) with ``affine`` (index -> RAS mm) for a ``modality`` model.
    ``stored_dtype``: the voxel type in the file (readers record it; ``data`` itself is float32)."""
    issues: list[DomainIssue] = []
    issues += _geometry_issues(data.shape, np.asarray(affine, float), name)
    sample = _subsample(data)
    if _has_non_finite(data):
        n = int((~np.isfinite(data)).sum())
        return issues + [DomainIssue("non_finite", "refuse", f"{name} has {n} NaN/inf voxels; replace them (e.g. "
                                                             "with -1000 HU for air) before running")]
    if modality.upper() == "CT":
        issues += _ct_intensity_issues(np.dtype(stored_dtype or data.dtype), sample.astype(np.float32), name)
        if not any(i.severity == "refuse" for i in issues):
            issues += _chest_issues(sample.astype(np.float32), name)
    return issues


def looks_like_hu(data: np.ndarray) -> bool:
    """Whether values are Hounsfield units as far as they show: the 0.5th percentile (over a subsample) is air,
    between -1100 HU and NO_AIR_HU. Readers and the training loaders decide ``intensity_units`` with it."""
    sample = _subsample(data)
    return bool(sample.size) and -1100 <= float(np.percentile(sample, 0.5)) <= NO_AIR_HU


def refusals(issues: list[DomainIssue]) -> list[DomainIssue]:
    return [i for i in issues if i.severity == "refuse"]


def _has_non_finite(data: np.ndarray) -> bool:
    return bool(np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all())


def _subsample(data: np.ndarray) -> np.ndarray:
    step = max(1, int(np.ceil((data.size / SAMPLE_VOXELS) ** (1 / 3))))
    return np.asarray(data[::step, ::step, ::step])


def _geometry_issues(shape, affine: np.ndarray, name: str) -> list[DomainIssue]:
    det = abs(float(np.linalg.det(affine[:3, :3]))) if affine.shape == (4, 4) else 0.0
    if det < 1e-6:
        return [DomainIssue("singular_affine", "refuse", f"{name} has a zero or singular affine (voxel volume "
                            f"{det:.2g} mm^3): its geometry is unknown. Fix the file's header (spacing, direction)")]
    issues = []
    if min(shape) < MIN_SLICES:
        issues.append(DomainIssue("too_few_slices", "refuse", f"{name} has only {min(shape)} slices along one axis "
                                  f"(shape {tuple(shape)}); the model needs a 3D volume of at least {MIN_SLICES} "
                                  "slices (a whole-chest series, not a few slices or a localizer)"))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    si_axis = int(np.argmax(np.abs(affine[2, :3]) / np.maximum(spacing, 1e-12)))  # the axis closest to S-I
    extent = float(shape[si_axis] * spacing[si_axis])
    if extent < MIN_CHEST_EXTENT_MM:
        issues.append(DomainIssue("thin_slab", "warn", f"{name} covers only {extent:.0f} mm from head to feet; the "
                                  f"model was made for whole-chest CTs (~250-350 mm), so a slab this thin is "
                                  "stretched to fill its input"))
    return issues


def _ct_intensity_issues(dtype: np.dtype, sample: np.ndarray, name: str) -> list[DomainIssue]:
    lo, hi = float(sample.min()), float(sample.max())
    if hi - lo < CONSTANT_RANGE_HU:
        return [DomainIssue("constant", "refuse", f"{name} is constant ({lo:g} everywhere): there is no image in it")]
    if float((sample < AIR_HU).mean()) > ALL_AIR_FRACTION:
        return [DomainIssue("all_air", "refuse", f"{name} is all air ({100 * (sample < AIR_HU).mean():.1f}% of voxels "
                            f"below {AIR_HU:g} HU): there is no patient in it")]
    issues = []
    if np.dtype(dtype) in (np.dtype(np.uint8), np.dtype(np.int8)):
        issues.append(DomainIssue("windowed_8bit", "refuse", f"{name} has 8-bit voxels ({np.dtype(dtype)}): it was "
                                  "windowed to 256 grey values, so Hounsfield units are lost. Open the original "
                                  "CT series (DICOM or NIfTI in HU)"))
    p_low = float(np.percentile(sample, 0.5))
    if p_low > NO_AIR_HU:
        if lo >= 0 and hi <= 1.0:
            why = "the values lie in [0, 1]: a normalised image"
        elif lo >= 0 and hi <= 255:
            why = "the values lie in [0, 255]: an 8-bit or screen export"
        elif lo >= 0:
            why = "the values are all non-negative: raw stored values without the scanner's rescale, or MR"
        else:
            why = f"its lowest values ({p_low:.0f}) are far above air (-1000 HU)"
        issues.append(DomainIssue("not_hu", "refuse", f"{name} does not look like CT in Hounsfield units ({why}; "
                                  f"0.5th percentile {p_low:.1f}, range {lo:g} to {hi:g}). The model reads HU; "
                                  "open the original CT, or use a bundle made for this modality"))
    return issues


def _chest_issues(sample: np.ndarray, name: str) -> list[DomainIssue]:
    from scipy import ndimage

    body = sample > BODY_HU
    filled = ndimage.binary_fill_holes(body)
    for axis in range(3):  # lungs open to the edge of the field of view: close them slice by slice too
        filled |= np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(body, axis, 0)], axis=axis)
    lung = filled & (sample > LUNG_LOW_HU) & (sample < LUNG_HIGH_HU)
    fraction = float(lung.sum()) / max(1, int(filled.sum()))
    if fraction < MIN_LUNG_FRACTION:
        return [DomainIssue("not_chest", "warn", f"{name} does not look like a chest CT: lung-density tissue is "
                            f"{100 * fraction:.1f}% of the body (a chest has 15-40%). The model was made for "
                            "chest CTs; its findings and report mean little here")]
    return []
