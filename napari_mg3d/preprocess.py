"""The preprocessing contract (one implementation for training, evaluation and the plugin), invertible.

Volume (any orientation, HU) -> model space:
  1. reorient to canonical (a0, a1, a2) = (Superior, Posterior, Left) by axis permutation/flips only;
  2. clip HU to [-1000, 1000] and scale to [0, 1];
  3. centre-crop with ratios (0.88, 0.66, 0.88) over (superior-inferior, anterior-posterior, left-right);
  4. resize (trilinear) to the model input, e.g. (128, 96, 128) for the base preset.
Every step is written into a :class:`PreprocessRecord`; :func:`to_original` maps any model-space map
(heat map, probabilities, labels) back onto the source voxel grid.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .model.config import MG3DConfig

from .volume import Volume

CANONICAL_AXCODES = ("S", "P", "L")


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters of the contract. Sizes (a0, a1, a2) in voxels; HU window in Hounsfield units."""

    target_size: tuple[int, int, int] = (128, 96, 128)
    crop_ratios: tuple[float, float, float] = (0.88, 0.66, 0.88)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    axcodes: tuple[str, str, str] = CANONICAL_AXCODES

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessConfig:
        return cls(**{k: tuple(v) for k, v in data.items() if k in cls.__dataclass_fields__})

    def fingerprint(self) -> str:
        """Short hash that changes whenever a parameter changes (cache keys)."""
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def preprocess_config_of(meta: dict | None, config: MG3DConfig) -> PreprocessConfig:
    """The one source of a model's preprocessing: what its bundle's ``config.json`` records under
    "preprocessing" (``meta``), else the contract's defaults at the model's input size (``config``: an
    MG3DConfig). Training, evaluation and the Predictor all call this."""
    recorded = (meta or {}).get("preprocessing")
    if recorded:
        return PreprocessConfig.from_dict(recorded)
    return PreprocessConfig(target_size=tuple(config.input_size))


@dataclass
class PreprocessRecord:
    """What preprocessing did, enough to invert it exactly.

    ornt: nibabel orientation transform source -> canonical; source_shape / canonical_shape: grids;
    crop_start / crop_stop: canonical-grid indices kept; target_size: model grid;
    source_affine / model_affine: index -> RAS mm of the source and of the model grid.
    """

    source_shape: tuple[int, int, int]
    ornt: list[list[float]]
    canonical_shape: tuple[int, int, int]
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]
    target_size: tuple[int, int, int]
    source_affine: list[list[float]]
    model_affine: list[list[float]] = field(default_factory=list)

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.crop_start, self.crop_stop))  # type: ignore[return-value]

    @property
    def model_spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(np.asarray(self.model_affine)[:3, :3], axis=0))  # type: ignore


def orientation_transform(affine: np.ndarray, axcodes: tuple[str, str, str] = CANONICAL_AXCODES) -> np.ndarray:
    """nibabel orientation transform from ``affine``'s axes to ``axcodes``."""
    import nibabel as nib

    return nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(axcodes))


def _apply_ornt(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Apply a nibabel orientation transform to the last three axes."""
    lead = array.ndim - 3
    out = array
    for ax, flip in enumerate(ornt[:, 1]):
        if flip == -1:
            out = np.flip(out, axis=lead + ax)
    perm = list(range(lead)) + [lead + int(i) for i in np.argsort(ornt[:, 0])]
    return np.ascontiguousarray(np.transpose(out, perm))


def _invert_ornt(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    lead = array.ndim - 3
    perm = list(range(lead)) + [lead + int(i) for i in ornt[:, 0]]
    out = np.transpose(array, perm)
    for ax, flip in enumerate(ornt[:, 1]):
        if flip == -1:
            out = np.flip(out, axis=lead + ax)
    return np.ascontiguousarray(out)


def centre_crop_box(shape: Sequence[int], ratios: Sequence[float]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, stop) voxel indices of the centred box holding ``ratios`` of ``shape`` per axis."""
    size = [max(1, int(round(n * r))) for n, r in zip(shape, ratios)]
    start = [(n - s) // 2 for n, s in zip(shape, size)]
    return tuple(start), tuple(a + s for a, s in zip(start, size))


def _resize(x: torch.Tensor, size, mode: str) -> torch.Tensor:
    """(C, Z, Y, X) -> (C, *size).

    'trilinear': axes that shrink are first area-averaged (anti-aliasing, like MONAI's default 'area'
    resize), axes that grow are then interpolated trilinearly (align_corners=False). 'nearest' for labels
    that must stay integer.
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-3:]) == size:
        return x
    x = x[None].float()
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")[0]
    if mode == "smooth-linear":  # already smooth fields (distances, logits): plain trilinear, no averaging
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)[0]
    inter = tuple(min(a, b) for a, b in zip(x.shape[-3:], size))
    if inter != tuple(x.shape[-3:]):
        x = F.adaptive_avg_pool3d(x, inter)
    if inter != size:
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return x[0]


def preprocess_record(shape: Sequence[int], affine: np.ndarray,
                      config: PreprocessConfig = PreprocessConfig()) -> PreprocessRecord:
    """The record :func:`preprocess` makes for a volume of ``shape`` voxels and ``affine``, from the geometry
    alone (no voxel is read): e.g. to map label maps onto the model grid of a volume encoded earlier."""
    if len(shape) != 3:
        raise ValueError(f"expected a 3D volume, got shape {tuple(shape)}")
    ornt = orientation_transform(affine, config.axcodes)
    canonical = tuple(int(shape[i]) for i in np.argsort(ornt[:, 0]))
    start, stop = centre_crop_box(canonical, config.crop_ratios)
    record = PreprocessRecord(tuple(int(n) for n in shape), ornt.tolist(), canonical, start, stop,  # type: ignore[arg-type]
                              tuple(config.target_size), np.asarray(affine).tolist())
    record.model_affine = model_affine(record).tolist()
    return record


def preprocess(volume: Volume, config: PreprocessConfig = PreprocessConfig()) -> tuple[torch.Tensor, PreprocessRecord]:
    """Volume in HU -> ((1, Z, Y, X) float32 tensor in [0, 1], record)."""
    record = preprocess_record(volume.data.shape, volume.affine, config)
    canonical = _apply_ornt(volume.data, np.asarray(record.ornt))
    (z0, y0, x0), (z1, y1, x1) = record.crop_start, record.crop_stop
    cropped = canonical[z0:z1, y0:y1, x0:x1]
    lo, hi = config.hu_window
    x = torch.from_numpy(np.ascontiguousarray(cropped, dtype=np.float32))
    x = ((x.clamp(lo, hi) - lo) / (hi - lo))[None]
    x = _resize(x, config.target_size, "trilinear").clamp_(0, 1)
    return x, record


def model_to_canonical_index(record: PreprocessRecord) -> np.ndarray:
    """4x4: model-grid index -> canonical-grid index (centres of the resized voxels, align_corners=False)."""
    scale = np.array(record.crop_shape, float) / np.array(record.target_size, float)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = np.array(record.crop_start, float) + (scale - 1) / 2
    return step


def model_affine(record: PreprocessRecord) -> np.ndarray:
    """index in model space -> RAS mm."""
    canon_affine = canonical_affine(np.asarray(record.source_affine), np.asarray(record.ornt), record.source_shape)
    return canon_affine @ model_to_canonical_index(record)


def to_original(
    model_map: np.ndarray | torch.Tensor,
    record: PreprocessRecord,
    kind: str = "continuous",
    fill: float = 0.0,
    class_by_class: bool = False,
) -> np.ndarray:
    """Map a model-space array back onto the source voxel grid.

    model_map: (Z, Y, X) or (C, Z, Y, X) on the model grid. kind:
      'continuous'    heat maps, intensities: resampled as is;
      'scores'        (C, Z, Y, X) class scores (logits, signed distances, probabilities): resampled,
                      then argmax -> int32 labels on the source grid. Logits/distances come back far more
                      accurately than probabilities or labels, which are not smooth;
      'probabilities' the same as 'scores';
      'label'         (Z, Y, X) integer labels: one-hot, resampled, argmax.
    Outside the crop the result is ``fill`` (class 0 for labels). Class scores are turned into labels by
    :func:`upsampled_argmax`; ``class_by_class`` takes the plain path instead (every class resized), which
    gives the same labels more slowly.
    """
    x = model_map if isinstance(model_map, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(model_map))
    a, b = record.crop_start, record.crop_stop
    if kind in ("label", "probabilities", "scores"):
        if kind == "label":
            if x.dim() != 3:
                raise ValueError(f"label maps must be (Z, Y, X), got {tuple(x.shape)}")
            x = F.one_hot(x.long(), max(int(x.max()) + 1, 2)).permute(3, 0, 1, 2).float()
        elif x.dim() != 4:
            raise ValueError(f"class scores must be (C, Z, Y, X), got {tuple(x.shape)}")
        mode = "trilinear" if kind == "label" else "smooth-linear"
        arg = (_argmax_class_by_class(x.float(), record.crop_shape, mode) if class_by_class else
               upsampled_argmax(x.float(), record.crop_shape, antialias=kind == "label"))
        canvas = np.full(record.canonical_shape, int(fill), np.int32)
        canvas[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = arg.numpy()
        return _invert_ornt(canvas, np.asarray(record.ornt))
    squeeze = x.dim() == 3
    up = _resize((x[None] if squeeze else x).float(), record.crop_shape, "trilinear").numpy()
    canvas = np.full((up.shape[0], *record.canonical_shape), fill, np.float32)
    canvas[:, a[0]:b[0], a[1]:b[1], a[2]:b[2]] = up
    out = _invert_ornt(canvas, np.asarray(record.ornt))
    return out[0] if squeeze else out


def to_source_axes(model_map: np.ndarray | torch.Tensor, record: PreprocessRecord) -> tuple[np.ndarray, np.ndarray]:
    """A model-grid map (Z, Y, X) in the source's axis order and direction, *without* resampling, and the
    4x4 matrix from its voxel indices to source voxel indices (a positive scale and an offset per axis).

    A viewer can show the small array over the source image with that matrix composed into the image's
    transform: what ``to_original`` gives after a second-long resampling, for the price of a flip.
    """
    x = model_map.detach().cpu().numpy() if isinstance(model_map, torch.Tensor) else np.asarray(model_map)
    import nibabel as nib

    ornt = np.asarray(record.ornt)
    small = _invert_ornt(x, ornt)
    canonical_to_source = nib.orientations.inv_ornt_aff(ornt, record.source_shape)
    small_to_model = np.linalg.inv(nib.orientations.inv_ornt_aff(ornt, small.shape))
    return small, canonical_to_source @ model_to_canonical_index(record) @ small_to_model


def _source_index(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of n_out output positions: the lower input index and the weight of the upper one, exactly as
    F.interpolate(mode='trilinear', align_corners=False) computes them (coordinates below 0 are clamped)."""
    c = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = c.floor().long().clamp_max(n_in - 1)
    return i0, (c - i0).float()


def upsampled_argmax(scores: torch.Tensor, size: Sequence[int], antialias: bool = False, chunk: int = 4096) -> torch.Tensor:
    """argmax over classes of ``scores`` (C, z, y, x) resized trilinearly to ``size``, without resizing every
    class: the same labels as resizing each class and taking the argmax (int32, ``size``).

    Inside one cell of the score grid (8 corners) trilinear interpolation is a convex combination of the
    corner values, and so is the difference of two classes. Take r, the class whose smallest corner value is
    largest: another class can only win somewhere in the cell if it beats r at one of the corners. In most
    cells no class does, and r wins in every voxel of the cell; only the voxels of the remaining (boundary)
    cells are interpolated, for the classes that can win there, ``chunk`` cells at a time. When an axis
    shrinks, falls back to resizing each class in turn (area-averaged first if ``antialias``).
    """
    size = tuple(int(v) for v in size)
    C, grid = scores.shape[0], tuple(scores.shape[1:])
    if any(o < i for o, i in zip(size, grid)) or C == 1:
        return _argmax_class_by_class(scores, size, "trilinear" if antialias else "smooth-linear")
    padded = F.pad(scores[None].float(), (0, 1, 0, 1, 0, 1), mode="replicate")[0]  # cell i: corners i, i+1
    corners = [padded[:, dz:dz + grid[0], dy:dy + grid[1], dx:dx + grid[2]]
               for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]
    lowest = torch.stack(corners).amin(0)  # (C, *grid)
    ref = lowest.argmax(0)  # (*grid)
    beats = torch.zeros(scores.shape, dtype=torch.bool)
    for corner in corners:
        beats |= corner > corner.gather(0, ref[None])
    n_cand = beats.sum(0)
    axes = [_source_index(i, o) for i, o in zip(grid, size)]
    cell_label = torch.where(n_cand == 0, ref, -1).int()
    out = cell_label[axes[0][0][:, None, None], axes[1][0][None, :, None], axes[2][0][None, None, :]]
    cells = torch.nonzero(n_cand.flatten() > 0).squeeze(1)
    if cells.numel() == 0:
        return out
    cells = cells[n_cand.flatten()[cells].argsort()]  # chunks of similar candidate counts
    boxes = [_cell_boxes(i0, w, n) for (i0, w), n in zip(axes, grid)]
    for start in range(0, cells.numel(), chunk):
        _fill_cells(out, padded, ref, beats, cells[start:start + chunk], boxes)
    return out


def _cell_boxes(i0: torch.Tensor, w: torch.Tensor, n_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell along one axis: the output indices it covers (n_cells, B), padded by repeating its last one,
    and their interpolation weights (n_cells, B, 2) for the cell's lower and upper corner."""
    counts = torch.bincount(i0, minlength=n_cells)
    first = torch.cumsum(counts, 0) - counts
    j = torch.arange(max(int(counts.max()), 1))
    idx = (first[:, None] + torch.minimum(j[None], (counts[:, None] - 1).clamp_min(0))).clamp_max(i0.numel() - 1)
    wt = w[idx]
    return idx, torch.stack([1 - wt, wt], dim=-1)


def _fill_cells(out, padded, ref, beats, cells, boxes) -> None:
    """Interpolate the candidate classes of some boundary cells densely over each cell's box of voxels."""
    C = padded.shape[0]
    gz, gy, gx = ref.shape
    kz, ky, kx = cells // (gy * gx), (cells // gx) % gy, cells % gx
    rivals = beats.flatten(1)[:, cells]  # (C, n)
    K = int(rivals.sum(0).max()) + 1
    r = ref.flatten()[cells]
    order = torch.where(rivals, torch.arange(C)[:, None], C).sort(0).values[:K - 1]
    cand = torch.cat([r[None], torch.where(order < C, order, r[None])]).t()  # (n, K): ref first
    d = torch.tensor([0, 1])
    zz = (kz[:, None] + d)[:, None, :, None, None]
    yy = (ky[:, None] + d)[:, None, None, :, None]
    xx = (kx[:, None] + d)[:, None, None, None, :]
    corners = padded[cand[:, :, None, None, None], zz, yy, xx]  # (n, K, 2, 2, 2)
    (iz, wz), (iy, wy), (ix, wx) = boxes
    values = torch.einsum("nkabc,nza,nyb,nxc->knzyx", corners, wz[kz], wy[ky], wx[kx]).contiguous()
    best, pick = values[0], torch.zeros(values.shape[1:], dtype=torch.long)
    for k in range(1, K):  # a loop over the few candidates beats argmax over a short axis on the CPU
        better = values[k] > best
        best = torch.where(better, values[k], best)
        pick.masked_fill_(better, k)
    labels = cand.gather(1, pick.flatten(1)).view(pick.shape)
    out[iz[kz][:, :, None, None], iy[ky][:, None, :, None], ix[kx][:, None, None, :]] = labels.int()


def _argmax_class_by_class(scores: torch.Tensor, size, mode: str) -> torch.Tensor:
    """The plain path: resize one class at a time, keeping a running max and argmax (~3 output-sized arrays)."""
    best = _resize(scores[:1], size, mode)[0]
    arg = torch.zeros(best.shape, dtype=torch.int32)
    for c in range(1, scores.shape[0]):
        up = _resize(scores[c:c + 1], size, mode)[0]
        better = up > best
        arg[better] = c
        best = torch.where(better, up, best)
    return arg


def labels_to_model(labels: np.ndarray, record: PreprocessRecord, representation: str = "sdf") -> np.ndarray:
    """Take a label map on the source grid to model space.

    representation:
      'sdf'           (C, Z, Y, X) class scores = signed distance in mm to each class boundary (positive
                      inside; background scores minus the nearest class). Smooth, so a 10 mm blob survives
                      the 2-3 mm model grid and comes back with Dice >= 0.95 through ``to_original(kind='scores')``;
      'probabilities' (C, Z, Y, X) partial-volume fractions (area-averaged one-hot);
      'labels'        (Z, Y, X) int32 argmax of the fractions.
    """
    from scipy.ndimage import distance_transform_edt

    canonical = _apply_ornt(labels, np.asarray(record.ornt))
    a, b = record.crop_start, record.crop_stop
    cropped = np.ascontiguousarray(canonical[a[0]:b[0], a[1]:b[1], a[2]:b[2]]).astype(np.int64)
    n_classes = max(int(cropped.max()) + 1, 2)
    if representation == "sdf":
        canon_affine = canonical_affine(np.asarray(record.source_affine), np.asarray(record.ornt), record.source_shape)
        spacing = tuple(np.linalg.norm(canon_affine[:3, :3], axis=0))
        scores = np.empty((n_classes, *cropped.shape), np.float32)
        for c in range(1, n_classes):
            inside = cropped == c
            if not inside.any():
                scores[c] = -1e3
                continue
            scores[c] = distance_transform_edt(inside, sampling=spacing) - distance_transform_edt(~inside, sampling=spacing)
        scores[0] = -scores[1:].max(0)
        out = _resize(torch.from_numpy(scores), record.target_size, "smooth-linear")
        return out.numpy()
    onehot = F.one_hot(torch.from_numpy(cropped), n_classes).permute(3, 0, 1, 2).float()
    probs = _resize(onehot, record.target_size, "trilinear")
    if representation == "probabilities":
        return probs.numpy()
    if representation == "labels":
        return probs.argmax(0).numpy().astype(np.int32)
    raise ValueError(f"representation must be 'sdf', 'probabilities' or 'labels', got {representation!r}")


def canonical_affine(affine: np.ndarray, ornt: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Affine of the canonical (re-oriented) grid of a volume with ``affine`` and ``shape``."""
    import nibabel as nib

    return affine @ nib.orientations.inv_ornt_aff(ornt, shape)


def resample_to_spacing(volume: Volume, spacing: tuple[float, float, float], order: str = "trilinear") -> Volume:
    """Canonical orientation, then resample to ``spacing`` (mm along S, P, L) -- for sliding-window
    segmentation at a fixed physical resolution. The affine of the result describes the new grid."""

    ornt = orientation_transform(volume.affine)
    canonical = _apply_ornt(volume.data, ornt)
    canon_affine = canonical_affine(volume.affine, ornt, volume.shape)
    old = np.linalg.norm(canon_affine[:3, :3], axis=0)
    size = [max(1, int(round(n * o / s))) for n, o, s in zip(canonical.shape, old, spacing)]
    x = _resize(torch.from_numpy(np.ascontiguousarray(canonical, np.float32))[None], size, order)[0].numpy()
    scale = np.array(canonical.shape, float) / np.array(size, float)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = (scale - 1) / 2
    return Volume(x, canon_affine @ step, {**volume.metadata, "resampled_spacing": list(spacing)})
