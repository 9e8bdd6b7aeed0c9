"""Readers and writers: NIfTI, DICOM series, NRRD -> Volume; label and float maps -> NIfTI on the source grid.

No napari or Qt here. Every failure raises :class:`VolumeReadError` naming the file and what to do.
"""

from __future__ import annotations

import gzip
import logging
import os
import warnings
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .volume import Volume

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
METAIMAGE_SUFFIXES = (".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", "")
SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series (folder or files)"
# Tags kept as source metadata (no patient-identifying fields).
DICOM_TAGS = ("Modality", "SeriesDescription", "SeriesInstanceUID", "StudyInstanceUID", "Manufacturer",
              "ManufacturerModelName", "KVP", "SliceThickness", "ConvolutionKernel", "PatientPosition",
              "RescaleType", "BodyPartExamined", "ImageType", "FrameOfReferenceUID")


class VolumeReadError(ValueError):
    """A file or folder that cannot be read as a 3D medical image."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_volume(path: str | Path | Sequence[str | Path], **kwargs) -> Volume:
    """Read a NIfTI/NRRD file, a DICOM folder or a list of DICOM files into a :class:`Volume`.

    Every reader refuses a zero or singular affine (a geometry it cannot know), and records in the metadata
    ``intensity_units``: "HU" only when the data is Hounsfield units (a CT series whose rescale gives HU, or
    values with air near -1000), else "unknown"; and ``stored_dtype``, the voxel type in the file."""
    volume = _read_any(path, **kwargs)
    det = abs(float(np.linalg.det(volume.affine[:3, :3])))
    if not np.isfinite(det) or det < 1e-9:
        raise VolumeReadError(f"{volume.metadata.get('source', path)} has a zero or singular affine (voxel volume "
                              f"{det:.3g} mm^3: a spacing of 0 or parallel axes); fix its header's spacing and "
                              "direction before using it")
    volume.metadata.setdefault("intensity_units", _intensity_units(volume))
    return volume


def _intensity_units(volume: Volume) -> str:
    """'HU' when the voxels are Hounsfield units, as far as the file says or the values show, else 'unknown'."""
    if volume.metadata.get("format") == "dicom":
        tags = volume.metadata.get("tags", {})
        if tags.get("Modality") == "CT" and tags.get("RescaleType", "HU") in ("HU", "", None):
            return "HU"
        return "unknown"
    from .domain import looks_like_hu

    return "HU" if looks_like_hu(volume.data) else "unknown"


def check_declared_size(shape: Sequence[int], path: Path, bytes_per_voxel: int = 4) -> None:
    """Refuse, from the header alone, a volume that could not be held in memory (before any allocation)."""
    from .inference import available_memory_bytes

    need = int(np.prod([int(s) for s in shape], dtype=np.float64)) * bytes_per_voxel
    have = available_memory_bytes()
    if need > have:
        raise VolumeReadError(f"{path}: its header declares {tuple(int(s) for s in shape)} voxels, "
                              f"{need / 2**30:.1f} GiB as float32, more than the {have / 2**30:.1f} GiB of memory "
                              "available; the header is wrong, or crop the volume first")


def _read_any(path, **kwargs) -> Volume:
    if isinstance(path, (list, tuple)):
        return read_dicom_series(path, **kwargs)
    path = Path(path).expanduser()
    if not path.exists():
        raise VolumeReadError(f"{path} does not exist")
    if path.is_dir():
        return read_dicom_series(path, **kwargs)
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return read_nifti(path, **kwargs)
    if suffix in NRRD_SUFFIXES:
        return read_nrrd(path, **kwargs)
    if suffix in METAIMAGE_SUFFIXES:
        return read_metaimage(path, **kwargs)
    if _looks_like_dicom(path):
        return read_dicom_series([path], **kwargs)
    raise VolumeReadError(f"{path} is not a supported medical image; expected {SUPPORTED}")


def _check_voxels(data: np.ndarray, path: Path, nan_policy: str) -> np.ndarray:
    bad = ~np.isfinite(data)
    if bad.any():
        n = int(bad.sum())
        if nan_policy == "raise":
            raise VolumeReadError(
                f"{path} has {n} NaN/inf voxels of {data.size}; fix the file, or read it with "
                f"nan_policy='fill' to replace them with the image minimum"
            )
        fill = float(np.nanmin(np.where(bad, np.nan, data))) if n < data.size else 0.0
        log.warning("%s: replaced %d NaN/inf voxels with %g", path, n, fill)
        data = np.where(bad, fill, data).astype(np.float32)
    return data


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    """Squeeze trailing singleton axes; reject 2D, RGB and true 4D images with a message naming the axis."""
    if data.dtype.names is not None:
        raise VolumeReadError(f"{path} holds RGB/vector voxels ({data.dtype}); MG-3D needs a grey-value CT or MR volume")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim < 3 or (data.ndim == 3 and min(data.shape) == 1):
        raise VolumeReadError(f"{path} is a 2D image (shape {data.shape}); MG-3D needs a 3D volume")
    if data.ndim > 3:
        raise VolumeReadError(
            f"{path} is {data.ndim}D with shape {data.shape}: axis 3 has {data.shape[3]} entries "
            "(time points or channels). Extract one 3D volume first (e.g. data[..., 0] with nibabel)."
        )
    return data


def _load_nifti_image(path: Path):
    """nibabel image of ``path``; .nii.gz is inflated with ISA-L when the ``isal`` package is there (2-3x
    faster than zlib: ~1 s instead of ~3 s for a 512x512x300 CT). Anything unusual goes through nib.load."""
    import nibabel as nib

    if path.name.endswith(".gz"):
        try:
            from isal import igzip

            with open(path, "rb") as fh:
                return nib.Nifti1Image.from_bytes(igzip.decompress(fh.read()))
        except Exception:  # noqa: BLE001 - NIfTI-2, corrupt files, no isal: nib.load reads or names the problem
            pass
    return nib.load(str(path))


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def header_rescales(metadata: dict) -> bool:
    """Whether a NIfTI header's scl_slope/scl_inter changed the stored values (nibabel applies them)."""
    slope, inter = metadata.get("scl_slope"), metadata.get("scl_inter")
    return slope not in (None, 0.0, 1.0) or inter not in (None, 0.0)


def read_nifti(path: str | Path, nan_policy: str = "raise") -> Volume:
    """NIfTI (.nii/.nii.gz) -> Volume; scl_slope/scl_inter applied; axes (k, j, i)."""
    path = Path(path)
    try:
        img = _load_nifti_image(path)
        raw = img.dataobj
        check_declared_size(raw.shape, path)
        if img.get_data_dtype().names is not None:
            raise VolumeReadError(f"{path} holds RGB/vector voxels ({img.get_data_dtype()}); MG-3D needs a "
                                  "grey-value CT or MR volume")
        if len(raw.shape) >= 4 and raw.shape[3] > 1:
            _as_3d(np.empty(raw.shape, np.uint8), path)  # raises with the 4D message without decoding
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except VolumeReadError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise VolumeReadError(f"{path} is truncated or corrupt ({err}); download or copy it again") from err
    except Exception as err:  # nibabel raises several types for non-NIfTI content
        raise VolumeReadError(f"{path} could not be read as NIfTI: {err}") from err
    data = _check_voxels(_as_3d(data, path), path, nan_policy)
    data = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    affine = img.affine[:, [2, 1, 0, 3]]
    header = img.header
    meta = {
        "source": str(path), "format": "nifti", "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]), "descrip": header["descrip"].tobytes().rstrip(b"\0").decode("latin-1"),
        "spatial_units": header.get_xyzt_units()[0], "stored_dtype": str(header.get_data_dtype()),
        # nibabel moves the header's scl_slope/scl_inter into the data proxy (and applies them): read them there
        "scl_slope": _finite_or_none(getattr(img.dataobj, "slope", np.nan)),
        "scl_inter": _finite_or_none(getattr(img.dataobj, "inter", np.nan)),
    }
    return Volume(data.astype(np.float32, copy=False), affine, meta)


def read_nrrd(path: str | Path, nan_policy: str = "raise") -> Volume:
    """NRRD -> Volume, honouring 'space', 'space directions' and 'space origin'."""
    import nrrd

    path = Path(path)
    try:
        declared = nrrd.read_header(str(path)).get("sizes")
    except Exception as err:
        raise VolumeReadError(f"{path} could not be read as NRRD: {err}") from err
    if declared is not None:
        check_declared_size(declared, path)
    try:
        data, header = nrrd.read(str(path))
    except Exception as err:
        raise VolumeReadError(f"{path} could not be read as NRRD: {err}") from err
    stored = str(np.asarray(data).dtype)
    data = _as_3d(np.asarray(data), path).astype(np.float32)
    data = _check_voxels(data, path, nan_policy)
    dirs = header.get("space directions")
    if dirs is None:
        lin = np.diag([float(s) for s in header.get("spacings", (1, 1, 1))[:3]])
    else:
        lin = np.array([d for d in dirs if d is not None and not (isinstance(d, float) and np.isnan(d))], float)[:3].T
        if lin.shape != (3, 3) or np.isnan(lin).any():
            raise VolumeReadError(f"{path}: 'space directions' {dirs} do not describe a 3D grid")
    origin = np.asarray(header.get("space origin", np.zeros(3)), float)
    space = str(header.get("space", "left-posterior-superior")).lower()
    to_ras = {"left-posterior-superior": [-1, -1, 1], "right-anterior-superior": [1, 1, 1],
              "left-anterior-superior": [-1, 1, 1], "lps": [-1, -1, 1], "ras": [1, 1, 1]}.get(space)
    if to_ras is None:
        raise VolumeReadError(f"{path}: NRRD space {space!r} is not supported; expected RAS, LPS or LAS")
    flip = np.diag(to_ras)
    affine = np.eye(4)
    affine[:3, :3] = flip @ lin
    affine[:3, 3] = flip @ origin
    data = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    return Volume(data, affine[:, [2, 1, 0, 3]], {"source": str(path), "format": "nrrd", "space": space,
                                                     "stored_dtype": stored})


def read_metaimage(path: str | Path, nan_policy: str = "raise") -> Volume:
    """MetaImage (.mha/.mhd) -> Volume through SimpleITK (pip install 'napari-mg3d[metaimage]')."""
    path = Path(path)
    try:
        import SimpleITK as sitk
    except ImportError as err:
        raise VolumeReadError(f"{path}: reading MetaImage needs SimpleITK: pip install SimpleITK") from err
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise VolumeReadError(f"{path} could not be read as MetaImage: {str(err).strip().splitlines()[-1]}") from err
    check_declared_size(reader.GetSize(), path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise VolumeReadError(f"{path} could not be read as MetaImage: {str(err).strip().splitlines()[-1]}") from err
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeReadError(f"{path} holds {img.GetNumberOfComponentsPerPixel()}-component (RGB/vector) "
                              "voxels; MG-3D needs a grey-value CT or MR volume")
    if img.GetDimension() != 3:
        raise VolumeReadError(f"{path} is {img.GetDimension()}D (size {img.GetSize()}); MG-3D needs a 3D volume")
    stored = sitk.GetArrayViewFromImage(img).dtype
    data = _check_voxels(sitk.GetArrayFromImage(img).astype(np.float32), path, nan_policy)  # (z, y, x)
    data = _as_3d(data, path)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(img.GetDirection(), float).reshape(3, 3) @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # ITK world is LPS
    return Volume(np.ascontiguousarray(data), affine[:, [2, 1, 0, 3]], {"source": str(path), "format": "metaimage",
                                                                     "stored_dtype": str(stored)})


# ----- DICOM ----------------------------------------------------------------------------------------
def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _dicom_files(source: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(source, (str, Path)):
        root = Path(source).expanduser()
        if not root.exists():
            raise VolumeReadError(f"{root} does not exist")
        if root.is_dir():
            try:  # rglob skips a folder it may not list, which would make it look empty
                os.listdir(root)
            except OSError as err:
                raise VolumeReadError(f"{root} cannot be read ({err.strerror or err}); check its permissions") from err
        files = [p for p in sorted(root.rglob("*")) if p.is_file()] if root.is_dir() else [root]
        if root.is_dir() and not files:
            raise VolumeReadError(f"{root} is an empty folder; expected a DICOM series")
    else:
        files = [Path(p) for p in source]
    return files


def _is_localizer(ds) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type or "SCOUT" in str(ds.get("SeriesDescription", "")).upper()


def _series_key(ds) -> tuple:
    iop = tuple(np.round(np.asarray(ds.ImageOrientationPatient, float), 4))
    return (str(ds.get("SeriesInstanceUID", "")), iop)


def read_dicom_series(
    source: str | Path | Iterable[str | Path],
    nan_policy: str = "raise",
    allow_uneven: bool = False,
) -> Volume:
    """Read a DICOM series (a folder, a list of files, or a folder holding several series).

    Slices are ordered by ImagePositionPatient projected on the slice normal; RescaleSlope/Intercept are
    applied per slice; localizers are skipped; with several series the largest is read and the others are
    named in a warning. Uneven or missing slices raise (``allow_uneven=True`` reads them with the median
    spacing and a warning). Compressed transfer syntaxes decode through pylibjpeg (JPEG 2000, JPEG-LS, RLE).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = _dicom_files(source)
    label = str(source) if isinstance(source, (str, Path)) else f"{len(files)} DICOM files"
    headers, skipped, unreadable = [], defaultdict(int), []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))  # once: the pixels are decoded later from this same dataset
        except (InvalidDicomError, OSError, EOFError, ValueError):
            skipped["not DICOM"] += 1
            unreadable.append(f.name)
            continue
        if not hasattr(ds, "Rows"):
            skipped["no pixel data"] += 1
            continue
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            skipped["no position/orientation (not a cross-sectional image)"] += 1
            continue
        if _is_localizer(ds):
            skipped["localizer/scout"] += 1
            continue
        headers.append((f, ds))
    if skipped:
        log.info("%s: skipped %s", label, dict(skipped))
    if not headers:
        raise VolumeReadError(f"{label}: no DICOM image slices found (skipped: {dict(skipped) or 'nothing'}); "
                              "expected a CT/MR DICOM series")
    series: dict[tuple, list] = defaultdict(list)
    for f, ds in headers:
        series[_series_key(ds)].append((f, ds))
    chosen_key = max(series, key=lambda k: len(series[k]))
    if len(series) > 1:
        others = [f"{k[0] or '?'} ({len(v)} slices, {v[0][1].get('SeriesDescription', '')!s})"
                  for k, v in series.items() if k != chosen_key]
        msg = f"{label} holds {len(series)} series; reading the largest ({len(series[chosen_key])} slices), ignoring: {others}"
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    slices = series[chosen_key]

    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
    if len(sizes) > 1:
        raise VolumeReadError(f"{label}: slices of one series have different sizes {sorted(sizes)}; "
                              "the series is mixed or corrupt")
    iop = np.asarray(slices[0][1].ImageOrientationPatient, float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([np.asarray(ds.ImagePositionPatient, float) for _, ds in slices])
    order = np.argsort(positions @ normal)
    slices = [slices[i] for i in order]
    positions = positions[order]
    proj = positions @ normal
    if len(np.unique(np.round(proj, 3))) != len(proj):
        raise VolumeReadError(f"{label}: several slices share a position; the folder may hold duplicate "
                              "or multi-phase images of one series")

    n = len(slices)
    if n > 1:
        steps = np.diff(positions, axis=0)
        along = steps @ normal
        off_axis = np.linalg.norm(steps - np.outer(along, normal), axis=1)
        if np.max(off_axis / np.abs(along)) > 0.01:
            raise VolumeReadError(f"{label}: slice positions are not along the slice normal (gantry tilt of "
                                  f"{np.degrees(np.arctan(np.max(off_axis / np.abs(along)))):.1f} degrees); "
                                  "resample the series to remove the tilt before reading")
        gap = float(np.median(along))
        uneven = np.abs(along - gap) > max(0.01 * gap, 0.01)
        if uneven.any():
            where = [f"{proj[i]:.2f}->{proj[i + 1]:.2f} mm" for i in np.flatnonzero(uneven)[:5]]
            msg = (f"{label}: uneven slice spacing (typical {gap:.3f} mm; at {where}); "
                   "a slice may be missing")
            if unreadable:
                msg += (f" ({len(unreadable)} files there could not be read as DICOM, e.g. "
                        f"{', '.join(unreadable[:3])}: a corrupt slice is the likely cause)")
            if not allow_uneven:
                raise VolumeReadError(msg + ". Pass allow_uneven=True to read it with the typical spacing.")
            warnings.warn(msg, stacklevel=2)
    else:
        gap = float(slices[0][1].get("SpacingBetweenSlices", slices[0][1].get("SliceThickness", 1.0)) or 1.0)

    shape = (n, *sizes.pop())
    check_declared_size(shape, Path(label))
    pixels = np.empty(shape, np.float32)
    for k, (f, ds) in enumerate(slices):
        header = ds
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise VolumeReadError(f"{f} has no pixel data (a header without an image); remove it from the series "
                                  "folder or export the series again")
        try:
            arr = ds.pixel_array
        except Exception as err:
            ts = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", "?")
            raise VolumeReadError(
                f"{f}: pixel data could not be decoded (transfer syntax {ts}): {err}. Compressed DICOM needs "
                "pylibjpeg with pylibjpeg-openjpeg (JPEG 2000) / pylibjpeg-libjpeg (JPEG, JPEG-LS), or GDCM"
            ) from err
        if arr.ndim != 2:
            raise VolumeReadError(f"{f}: expected one 2D frame per file, got pixel array {arr.shape}")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        pixels[k] = arr.astype(np.float32) * slope + intercept
        stored = str(arr.dtype)
    pixels = _check_voxels(pixels, Path(label), nan_policy)

    spacing = [float(v) for v in slices[0][1].PixelSpacing]  # (row spacing, column spacing)
    lps = np.eye(4)
    lps[:3, 0] = normal * gap
    lps[:3, 1] = col_dir * spacing[0]
    lps[:3, 2] = row_dir * spacing[1]
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    first = slices[0][1]
    meta = {"source": label, "format": "dicom", "n_files": n, "skipped": dict(skipped), "stored_dtype": stored,
            "transfer_syntax": str(getattr(getattr(first, "file_meta", None), "TransferSyntaxUID", "")),
            "tags": {t: _jsonable(first.get(t)) for t in DICOM_TAGS if t in first},
            # per slice, in the volume's a0 order: what a DICOM SEG of this volume must reference
            "slices": [{"file": str(f), "sop_instance_uid": str(ds.get("SOPInstanceUID", ""))} for f, ds in slices]}
    return Volume(pixels, affine, meta)


def _jsonable(value):
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


# ----- writers --------------------------------------------------------------------------------------
def write_nifti(path: str | Path, data: np.ndarray, reference: Volume | np.ndarray, *, label: bool | None = None,
                dtype: np.dtype | type | None = None, description: str = "") -> Path:
    """Write ``data`` (a0, a1, a2), on the grid of ``reference`` (a Volume or its 4x4 affine), as NIfTI.

    Integer/bool data is written as a label map (uint8, uint16 or uint32, the smallest that holds its largest
    value; NIfTI intent 'label'); other data (or
    ``label=False``) as ``dtype`` intensities (default float32). ``description`` goes into the header's
    ``descrip`` (at most 80 characters). The file overlays the source image exactly in any viewer (same
    affine, sform and qform).
    """
    import nibabel as nib

    path = Path(path)
    affine = reference.affine if isinstance(reference, Volume) else np.asarray(reference, float)
    if isinstance(reference, Volume) and data.shape != reference.shape:
        raise ValueError(f"data shape {data.shape} does not match the reference grid {reference.shape}")
    is_label = label if label is not None else (data.dtype == bool or np.issubdtype(data.dtype, np.integer))
    if is_label:
        top = int(data.max()) if data.size else 0
        if data.size and int(data.min()) < 0:
            raise ValueError(f"label maps must be >= 0; got minimum {int(data.min())}")
        out = data.astype(np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32)  # never wraps
    else:
        out = data.astype(dtype or np.float32)
    img = nib.Nifti1Image(np.transpose(out, (2, 1, 0)), affine[:, [2, 1, 0, 3]])
    if description:
        img.header["descrip"] = description[:80].encode("latin-1", "replace")
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    if is_label:
        img.header.set_intent("label")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        path = path.with_name(path.name + ".nii.gz")
    nib.save(img, str(path))
    return path
