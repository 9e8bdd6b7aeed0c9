"""The phantom thorax: anatomy and findings in HU on a canonical grid, with ground-truth masks.

Geometry: the phantom is built on a canonical grid whose array axes (a0, a1, a2) point to patient
Superior, Posterior and Left ("SPL"; napari shows axial slices with anterior up and the patient's right
on the image's left). World coordinates are RAS millimetres (NIfTI convention). A sample may then be
re-oriented to another source orientation; its affine follows, so it always describes the same anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..labels import LABELS, ORGANS
from .vocabulary import LOBES

CANONICAL_AXCODES = ("S", "P", "L")


@dataclass(frozen=True)
class FindingStyle:
    """How large and how contrasted the findings are drawn (mm, HU). Two tiers: ``HARD`` (the default, sizes
    as in real CTs, several findings smaller than a voxel of a 64³ model input) and ``VISIBLE`` (every finding
    large and contrasted enough to be seen at a 64³ model grid of a ~250 x 250 x 330 mm field: a voxel of
    ~4 x 4 x 5 mm). Both tiers draw the same random numbers in the same order, so a seed gives the same
    anatomy, findings and report templates in either; only sizes (also those the sentences quote) and densities
    differ."""

    name: str
    nodule_sizes_mm: tuple[float, ...]
    solid_nodules_only: bool
    opacity_size_mm: tuple[float, float]
    emphysema_hu: float
    emphysema_texture_vox: float
    mosaic_hu: tuple[float, float]
    mosaic_texture_vox: float
    septal_period_mm: tuple[float, float]
    septal_half_width_vox: float
    septal_hu: float
    septal_rim_mm: float
    strand_radius_mm: float
    airway_lumen_wall_mm: dict[str, tuple[float, float]]
    effusion_depth_mm: tuple[float, float]
    pericardial_thickness_mm: tuple[float, float]
    pericardial_hu: float
    calcification_radius_mm: float
    calcification_hu: float
    arterial_calcification_hu: float
    arterial_calcification_threshold: float
    node_size_mm: tuple[float, float]
    hernia_size_mm: tuple[float, float]
    hernia_air_level_mm: float  # the air-fluid level, anterior(-)/posterior(+) of the sac's centre
    line_radius_mm: float


HARD = FindingStyle(
    name="hard", nodule_sizes_mm=(6, 8, 10, 12, 15, 20, 25), solid_nodules_only=False,
    opacity_size_mm=(25, 45), emphysema_hu=-975.0, emphysema_texture_vox=4.0, mosaic_hu=(-920.0, -720.0),
    mosaic_texture_vox=5.0, septal_period_mm=(12, 15), septal_half_width_vox=0.6, septal_hu=-250.0,
    septal_rim_mm=20.0, strand_radius_mm=1.8,
    airway_lumen_wall_mm={"Bronchiectasis": (4.0, 6.0), "Peribronchial thickening": (1.8, 4.8)},
    effusion_depth_mm=(15, 35), pericardial_thickness_mm=(6, 12), pericardial_hu=10.0,
    calcification_radius_mm=2.5, calcification_hu=700.0, arterial_calcification_hu=600.0,
    arterial_calcification_threshold=0.3, node_size_mm=(15, 25), hernia_size_mm=(30, 45), hernia_air_level_mm=-3.0,
    line_radius_mm=1.5,
)

# Larger lesions; density findings pushed >=150 HU from lung in patches a few model voxels wide; thin lines and
# calcifications thick enough to fill a 4-5 mm voxel; nodules solid (a ground-glass nodule keeps its words).
VISIBLE = FindingStyle(
    name="visible", nodule_sizes_mm=(18, 20, 22, 25, 28, 30, 32), solid_nodules_only=True,
    opacity_size_mm=(45, 65), emphysema_hu=-1000.0, emphysema_texture_vox=9.0, mosaic_hu=(-1000.0, -600.0),
    mosaic_texture_vox=10.0, septal_period_mm=(16, 20), septal_half_width_vox=1.6, septal_hu=20.0,
    septal_rim_mm=24.0, strand_radius_mm=4.5,
    airway_lumen_wall_mm={"Bronchiectasis": (7.0, 11.0), "Peribronchial thickening": (2.0, 8.0)},
    effusion_depth_mm=(25, 45), pericardial_thickness_mm=(14, 22), pericardial_hu=0.0,
    calcification_radius_mm=5.0, calcification_hu=1000.0, arterial_calcification_hu=1000.0,
    arterial_calcification_threshold=-0.2, node_size_mm=(28, 40), hernia_size_mm=(45, 60), hernia_air_level_mm=8.0,
    line_radius_mm=4.0,
)

TIERS = {"hard": HARD, "visible": VISIBLE}


def finding_style(tier: str) -> FindingStyle:
    """The FindingStyle of ``tier`` ("hard" or "visible")."""
    if tier not in TIERS:
        raise ValueError(f"unknown synthetic tier {tier!r}; choose one of {sorted(TIERS)}")
    return TIERS[tier]


@dataclass
class SyntheticSample:
    """One sample. ``volume`` float32 HU (a0, a1, a2); ``affine`` 4x4 array index -> RAS mm.
    ``sentence_links[i]`` lists the lesion names (keys of ``lesions``) sentence i describes."""

    volume: np.ndarray
    affine: np.ndarray
    report: str
    sentences: list[str]
    labels: dict[str, int]
    organs: dict[str, np.ndarray]
    lesions: dict[str, np.ndarray]
    lesion_labels: dict[str, str]
    sentence_links: list[list[str]]
    seed: int
    axcodes: tuple[str, str, str] = CANONICAL_AXCODES
    findings: list[dict] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def lesion_label_map(self) -> np.ndarray:
        """uint8 map: 0 background, k+1 for the k-th of LABELS (later findings overwrite earlier)."""
        out = np.zeros(self.volume.shape, np.uint8)
        for name, mask in self.lesions.items():
            out[mask] = LABELS.index(self.lesion_labels[name]) + 1
        return out

    def organ_label_map(self) -> np.ndarray:
        """uint8 map: 0 outside, k+1 for the k-th of ORGANS (inner organs overwrite the body)."""
        out = np.zeros(self.volume.shape, np.uint8)
        for name, mask in self.organs.items():
            out[mask] = ORGANS.index(name) + 1
        return out


class _Canvas:
    """Millimetre coordinates of the canonical grid, centred on the thorax."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        self.shape = shape
        self.spacing = spacing
        axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
        # s: superior(+), p: posterior(+), l: patient left(+)
        self.s, self.p, self.l = np.meshgrid(*[a.astype(np.float32) for a in axes], indexing="ij", sparse=True)

    def ellipsoid(self, centre, radii) -> np.ndarray:
        cs, cp, cl = centre
        rs, rp, rl = radii
        return ((self.s - cs) / rs) ** 2 + ((self.p - cp) / rp) ** 2 + ((self.l - cl) / rl) ** 2 <= 1.0

    def tube_z(self, cp, cl, radius, s_range=None) -> np.ndarray:
        """Cylinder along the superior-inferior axis."""
        m = (self.p - cp) ** 2 + (self.l - cl) ** 2 <= radius ** 2
        m = np.broadcast_to(m, self.shape)
        if s_range is not None:
            m = m & ((self.s >= s_range[0]) & (self.s <= s_range[1]))
        return m

    def _box(self, lo_mm, hi_mm) -> tuple[slice, slice, slice]:
        """Index slices covering the mm box [lo, hi] (clipped to the grid)."""
        out = []
        for axis, (lo, hi) in enumerate(zip(lo_mm, hi_mm)):
            n, sp = self.shape[axis], self.spacing[axis]
            i0 = int(np.floor(lo / sp + (n - 1) / 2)) - 1
            i1 = int(np.ceil(hi / sp + (n - 1) / 2)) + 2
            out.append(slice(min(max(i0, 0), n), min(max(i1, 0), n)))
        return tuple(out)  # type: ignore[return-value]

    def segment(self, a, b, radius) -> np.ndarray:
        """Capsule between points a and b (s, p, l) in mm, evaluated inside its bounding box only."""
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        out = np.zeros(self.shape, bool)
        box = self._box(np.minimum(a, b) - radius, np.maximum(a, b) + radius)
        if any(sl.start >= sl.stop for sl in box):
            return out
        s, p, l = self.s[box[0]], self.p[:, box[1]], self.l[:, :, box[2]]
        d = b - a
        t = ((s - a[0]) * d[0] + (p - a[1]) * d[1] + (l - a[2]) * d[2]) / max(float(d @ d), 1e-6)
        t = np.clip(t, 0, 1)
        out[box] = ((s - a[0] - t * d[0]) ** 2 + (p - a[1] - t * d[1]) ** 2 + (l - a[2] - t * d[2]) ** 2) <= radius ** 2
        return out


def _smooth_noise(rng: np.random.Generator, shape, scale_vox: float) -> np.ndarray:
    """Band-limited noise in about [-1, 1]: a random coarse grid upsampled trilinearly (cheap texture)."""
    import torch
    import torch.nn.functional as F

    coarse = [max(2, int(np.ceil(n / scale_vox)) + 1) for n in shape]
    g = torch.from_numpy(rng.standard_normal(coarse).astype(np.float32))[None, None]
    up = F.interpolate(g, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].numpy()
    return np.clip(up / 2.0, -1, 1)


class PhantomBuilder:
    """Builds the normal anatomy, then adds findings; keeps masks for every structure."""

    def __init__(self, rng: np.random.Generator, shape, spacing, style: FindingStyle = HARD) -> None:
        self.rng = rng
        self.style = style
        self.c = _Canvas(shape, spacing)
        self.hu = np.full(shape, -1000.0, np.float32)
        self.organs: dict[str, np.ndarray] = {}
        self.lesions: dict[str, np.ndarray] = {}
        self.lesion_labels: dict[str, str] = {}
        self.size = rng.uniform(0.85, 1.15)
        self.extent_s = (shape[0] - 1) * spacing[0] / 2

    # ----- anatomy ----------------------------------------------------------------------------
    def build_anatomy(self, cardiomegaly: bool = False) -> None:
        c, k, rng = self.c, self.size, self.rng
        zs = self.extent_s
        body_ap, body_lr = 105 * k, 150 * k
        body = ((c.p - 5) / body_ap) ** 2 + (c.l / body_lr) ** 2 <= 1.0
        body = np.broadcast_to(body, c.shape)
        inner = ((c.p - 5) / (body_ap - 14)) ** 2 + (c.l / (body_lr - 16)) ** 2 <= 1.0
        inner = np.broadcast_to(inner, c.shape)
        self.hu[body] = -100.0  # subcutaneous fat
        muscle = inner & ~(((c.p - 5) / (body_ap - 24)) ** 2 + (c.l / (body_lr - 28)) ** 2 <= 1.0)
        self.hu[muscle] = 45.0
        self.hu[inner & ~muscle] = -60.0  # mediastinal fat by default
        self.organs["body"] = body.copy()

        # Diaphragm dome: lungs stop below; liver dome rises higher on the right (patient left < 0).
        dome_s = -zs * 0.35 + 30 * np.exp(-((c.p + 10) / 80) ** 2) + np.where(c.l < 0, 18, 0) * np.exp(-(c.l / 90) ** 2)
        self.dome_s = dome_s
        lung_r = (((c.p - 10) / (78 * k)) ** 2 + ((c.l + 62 * k) / (52 * k)) ** 2 <= 1.0) & (c.s > dome_s) & (c.s < zs * 0.92)
        lung_l = (((c.p - 10) / (78 * k)) ** 2 + ((c.l - 62 * k) / (50 * k)) ** 2 <= 1.0) & (c.s > dome_s) & (c.s < zs * 0.88)
        heart_r = 1.3 if cardiomegaly else 1.0
        heart_c = (-zs * 0.18, -38 * k, 18 * k)
        heart = c.ellipsoid(heart_c, (55 * k * heart_r, 42 * k * heart_r, 55 * k * heart_r)) & (c.s > dome_s - 10)
        lung_l &= ~heart
        lung_r &= ~heart
        self.hu[lung_r | lung_l] = -850.0
        self.organs["lung_right"], self.organs["lung_left"] = lung_r, lung_l
        self.hu[heart] = 38.0
        self.organs["heart"] = heart
        self.heart_centre, self.heart_scale = heart_c, heart_r

        liver = ((c.s < dome_s) & ((c.l + 30) ** 2 / (110 * k) ** 2 + ((c.p + 5) / (85 * k)) ** 2 <= 1.0)
                 & (c.s > dome_s - 90))
        liver &= inner
        self.hu[liver] = 58.0
        self.organs["liver"] = liver

        spine = c.tube_z(70 * k, 0, 17 * k)
        canal = c.tube_z(92 * k, 0, 7 * k)
        self.hu[spine] = 250.0
        self.hu[spine & ~c.tube_z(70 * k, 0, 13 * k)] = 650.0  # cortical rim
        self.hu[canal] = 20.0
        self.organs["spine"] = spine | canal

        aorta_desc = c.tube_z(50 * k, 22 * k, 12 * k, (dome_s.min() - 40, zs * 0.45))
        arch = c.segment((zs * 0.45, 50 * k, 22 * k), (zs * 0.5, -15 * k, 5 * k), 12 * k)
        aorta_asc = c.segment((zs * 0.5, -15 * k, 5 * k), (heart_c[0] + 20, -30 * k, 5 * k), 14 * k)
        aorta = aorta_desc | arch | aorta_asc
        self.hu[aorta] = 42.0
        self.organs["aorta"] = aorta
        self.aorta = aorta

        trachea = c.tube_z(-5 * k, 0, 9 * k, (zs * 0.3, zs))
        bronchus_r = c.segment((zs * 0.3, -5 * k, 0), (zs * 0.05, 5 * k, -55 * k), 6 * k)
        bronchus_l = c.segment((zs * 0.3, -5 * k, 0), (zs * 0.0, 5 * k, 55 * k), 6 * k)
        airway = trachea | bronchus_r | bronchus_l
        wall = c.tube_z(-5 * k, 0, 11 * k, (zs * 0.3, zs)) & ~trachea
        self.hu[wall] = 30.0
        self.hu[airway] = -1000.0
        self.organs["trachea"] = airway

        ribs = np.zeros(c.shape, bool)
        shell = (((c.p - 5) / (body_ap - 18)) ** 2 + (c.l / (body_lr - 20)) ** 2 <= 1.0) & \
                ~(((c.p - 5) / (body_ap - 26)) ** 2 + (c.l / (body_lr - 28)) ** 2 <= 1.0)
        period = rng.uniform(28, 34)
        phase = rng.uniform(0, period)
        band = np.abs(((c.s + phase + 0.25 * c.p) % period) - period / 2) < 5
        ribs = np.broadcast_to(shell, c.shape) & band & (np.broadcast_to(c.p, c.shape) > -body_ap * 0.9)
        self.hu[ribs] = 550.0
        self.organs["ribs"] = ribs

        # Pulmonary vessels: a few capsules from each hilum, visible in the lung window.
        for side in (-1, 1):
            hilum = (zs * 0.02, 0.0, side * 40 * k)
            for _ in range(14):
                tip = (hilum[0] + rng.uniform(-90, 90), rng.uniform(-60, 70) * k, side * rng.uniform(60, 110) * k)
                vessel = c.segment(hilum, tip, rng.uniform(1.5, 3.5)) & (lung_r | lung_l)
                self.hu[vessel] = 35.0
        lung_tex = _smooth_noise(rng, c.shape, 6.0) * 25
        lungs = lung_r | lung_l
        self.hu[lungs] += lung_tex[lungs]

    # ----- lobes -------------------------------------------------------------------------------
    def lobe_mask(self, lobe: str) -> np.ndarray:
        side, part = LOBES[lobe]
        c = self.c
        lung = self.organs["lung_right" if side == "right" else "lung_left"]
        fissure = c.s - 0.9 * (c.p - 20)  # oblique fissure: upper lobes are superior-anterior
        upper_like = fissure > self.dome_s + 40 + (0 if side == "left" else 10)
        if part == "lower":
            return lung & ~upper_like
        if side == "left":
            return lung & upper_like
        horizontal = c.s > -self.extent_s * 0.02
        return lung & upper_like & (horizontal if part == "upper" else ~horizontal)

    def _point_in(self, mask: np.ndarray, margin_mm: float = 0.0) -> tuple[float, float, float]:
        from scipy.ndimage import distance_transform_edt

        idx = np.argwhere(mask)
        if margin_mm > 0 and len(idx):
            lo, hi = idx.min(0), idx.max(0) + 1
            box = np.pad(mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], 1)  # EDT on the bounding box only
            dist = distance_transform_edt(box, sampling=self.c.spacing)[1:-1, 1:-1, 1:-1]
            deep = dist >= margin_mm
            idx = np.argwhere(deep if deep.any() else dist >= dist.max() * 0.6) + lo
        if len(idx) == 0:
            idx = np.argwhere(self.organs["lung_right"] | self.organs["lung_left"])
        pick = idx[self.rng.integers(len(idx))]
        return tuple(float(v) for v in self.index_to_mm(pick))  # type: ignore[return-value]

    def index_to_mm(self, index) -> np.ndarray:
        shape, sp = np.array(self.c.shape), np.array(self.c.spacing)
        return (np.asarray(index) - (shape - 1) / 2) * sp

    def add(self, name: str, label: str, mask: np.ndarray, hu: float | np.ndarray | None = None) -> None:
        if not mask.any():  # coarse grids can miss a thin structure: keep at least a small blob
            centre = self._point_in(self.organs["lung_right"] | self.organs["lung_left"], 0)
            mask = self.c.ellipsoid(centre, tuple(1.6 * s for s in self.c.spacing))
        if hu is not None:
            self.hu[mask] = hu if np.isscalar(hu) else hu[mask]
        self.lesions[name] = mask
        self.lesion_labels[name] = label

    # ----- findings ----------------------------------------------------------------------------
    def finding(self, label: str, loc: str | None = None) -> dict:
        """Render one finding; returns its description values (loc, size, kind, side)."""
        c, rng, k, st = self.c, self.rng, self.size, self.style
        lungs = self.organs["lung_right"] | self.organs["lung_left"]
        loc = loc or str(rng.choice(list(LOBES)))
        side = LOBES[loc][0]
        lobe = self.lobe_mask(loc)
        info: dict = {"label": label, "loc": loc, "side": side}
        name = label.lower().replace(" ", "_")
        if label == "Lung nodule":
            size = float(rng.choice(list(st.nodule_sizes_mm)))
            kind = str(rng.choice(["solid", "ground-glass"]))
            if st.solid_nodules_only:  # the draw is kept so both tiers stay in step
                kind = "solid"
            centre = self._point_in(lobe, size / 2 + 3)
            mask = c.ellipsoid(centre, (size / 2,) * 3) & lungs
            self.add(name, label, mask, 35.0 if kind == "solid" else -450.0)
            info.update(size=int(size), kind=kind)
        elif label in ("Consolidation", "Lung opacity", "Atelectasis"):
            size = float(rng.uniform(*st.opacity_size_mm))
            if label == "Atelectasis":
                dependent = lobe & (c.p > 30)  # the posterior part; the middle lobe has none, so the whole lobe
                centre = self._point_in(dependent if dependent.any() else lobe, 8)
                mask = c.ellipsoid(centre, (size * 0.4, size * 0.25, size * 0.6)) & lobe
                hu = 30.0
            else:
                centre = self._point_in(lobe, size * 0.3)
                blob = c.ellipsoid(centre, (size / 2, size * 0.4, size / 2))
                mask = blob & lobe
                hu = 35.0 if label == "Consolidation" else -550.0
            hu_map = np.full(c.shape, hu, np.float32)
            if label == "Consolidation":  # air bronchograms
                hu_map[self.c.segment(centre, np.add(centre, (0, -size * 0.4, 0)), 2.0)] = -900
            self.add(name, label, mask, hu_map)
            info.update(size=int(size))
        elif label == "Emphysema":
            tex = _smooth_noise(rng, c.shape, st.emphysema_texture_vox)
            mask = lobe & (tex > 0.1)
            self.add(name, label, mask, st.emphysema_hu)
        elif label == "Mosaic attenuation pattern":
            tex = _smooth_noise(rng, c.shape, st.mosaic_texture_vox)
            mask = lobe
            hu = np.where(tex > 0, *st.mosaic_hu).astype(np.float32)
            self.add(name, label, mask, hu)
        elif label == "Interlobular septal thickening":
            # Polygonal lines ~1 voxel thick, 12-15 mm apart, in the subpleural rim of the lobe.
            from scipy.ndimage import binary_erosion

            period = float(rng.uniform(*st.septal_period_mm))
            half = st.septal_half_width_vox * float(np.mean(c.spacing))
            # oblique planes, so no axial slice lies inside one of them
            u, v, w = c.s + 0.5 * c.p + 0.3 * c.l, c.p - 0.45 * c.l + 0.35 * c.s, c.l + 0.4 * c.s - 0.3 * c.p
            grid = ((np.abs((u % period) - period / 2) < half) | (np.abs((v % period) - period / 2) < half)
                    | (np.abs((w % period) - period / 2) < half))
            rim_vox = max(1, int(round(st.septal_rim_mm / max(c.spacing))))
            rim = lobe & ~binary_erosion(lobe, iterations=rim_vox)
            mask = rim & grid
            self.add(name, label, mask, st.septal_hu)
        elif label == "Pulmonary fibrotic sequela":
            mask = np.zeros(c.shape, bool)
            for _ in range(4):
                a = self._point_in(lobe, 4)
                b = np.add(a, rng.uniform(-25, 25, 3))
                mask |= c.segment(a, b, st.strand_radius_mm)
            mask &= lobe
            self.add(name, label, mask, 20.0)
        elif label in ("Bronchiectasis", "Peribronchial thickening"):
            mask = np.zeros(c.shape, bool)
            air = np.zeros(c.shape, bool)
            for _ in range(3):
                a = self._point_in(lobe, 10)
                b = np.add(a, rng.uniform(-25, 25, 3))
                lumen, wall = st.airway_lumen_wall_mm[label]
                mask |= c.segment(a, b, wall)
                air |= c.segment(a, b, lumen)
            mask &= lobe
            hu = np.full(c.shape, 30.0, np.float32)
            hu[air] = -950.0
            self.add(name, label, mask, hu)
        elif label == "Pleural effusion":
            lung = self.organs[f"lung_{side}"]
            depth = float(rng.uniform(*st.effusion_depth_mm))
            posterior_edge = np.where(lung.any(axis=1, keepdims=True),
                                      lung.shape[1] - 1 - np.argmax(lung[:, ::-1, :], axis=1)[:, None, :], -1)
            p_idx = np.arange(lung.shape[1])[None, :, None]
            mask = lung & (p_idx >= posterior_edge - depth / c.spacing[1]) & (c.s < self.dome_s + 80)
            self.add(name, label, mask, 12.0)
            info.update(size=int(depth), loc=f"{side} pleural space")
        elif label == "Pericardial effusion":
            cs, cp, cl = self.heart_centre
            r = self.heart_scale
            thick = float(rng.uniform(*st.pericardial_thickness_mm))
            outer = c.ellipsoid(self.heart_centre, (55 * k * r + thick, 42 * k * r + thick, 55 * k * r + thick))
            mask = outer & ~self.organs["heart"] & (c.s > self.dome_s - 10) & ~self.organs["spine"]
            self.add(name, label, mask, st.pericardial_hu)
            info.update(size=int(thick), loc="pericardium")
        elif label == "Cardiomegaly":
            self.add(name, label, self.organs["heart"].copy())
            info.update(loc="heart")
        elif label == "Coronary artery wall calcification":
            cs, cp, cl = self.heart_centre
            r = self.heart_scale
            mask = np.zeros(c.shape, bool)
            for angle in rng.uniform(0, np.pi, 4):
                centre = (cs + 30 * k * r, cp - 40 * k * r * np.sin(angle), cl + 45 * k * r * np.cos(angle))
                mask |= c.ellipsoid(centre, (st.calcification_radius_mm,) * 3)
            self.add(name, label, mask, st.calcification_hu)
            info.update(loc="coronary arteries")
        elif label == "Arterial wall calcification":
            aorta = self.aorta
            shell = aorta & ~np.roll(aorta, 2, axis=2) | aorta & ~np.roll(aorta, -2, axis=1)
            mask = shell & (_smooth_noise(rng, c.shape, 3.0) > st.arterial_calcification_threshold)
            if not mask.any():
                mask = shell
            self.add(name, label, mask, st.arterial_calcification_hu)
            info.update(loc="aorta")
        elif label == "Lymphadenopathy":
            size = float(rng.uniform(*st.node_size_mm))
            centre = (self.extent_s * 0.15, -5 * k, float(rng.choice([-22, 22])) * k)
            mask = c.ellipsoid(centre, (size / 2, size / 2.4, size / 2.2)) & ~self.organs["trachea"] & ~self.aorta
            self.add(name, label, mask, 42.0)
            info.update(size=int(size), loc="mediastinum")
        elif label == "Hiatal hernia":
            size = float(rng.uniform(*st.hernia_size_mm))
            centre = (float(self.dome_s.max()) - 5, 35 * k, 8 * k)
            sac = c.ellipsoid(centre, (size / 2, size / 2.5, size / 2.2))
            air = sac & (c.p < centre[1] + st.hernia_air_level_mm)
            hu = np.full(c.shape, 25.0, np.float32)
            hu[air] = -800.0
            mask = sac & ~self.organs["spine"] & ~self.aorta
            self.add(name, label, mask, hu)
            info.update(size=int(size), loc="esophageal hiatus")
        elif label == "Medical material":
            tip = (self.heart_centre[0] + 55, -20 * k, -12 * k)
            entry = (self.extent_s * 0.8, -35 * k, -55 * k)
            mask = c.segment(entry, tip, st.line_radius_mm)
            self.add(name, label, mask, 1500.0)
            info.update(loc="superior vena cava")
        else:  # pragma: no cover - LABELS and this function are kept in step by a test
            raise ValueError(f"unknown finding {label!r}")
        return info

    def finish(self, noise_hu: float) -> np.ndarray:
        noise = self.rng.standard_normal(self.c.shape).astype(np.float32) * noise_hu
        return np.clip(self.hu + noise, -1024, 3071).astype(np.float32)


def canonical_affine(shape, spacing) -> np.ndarray:
    """Affine of the canonical SPL grid: index (a0, a1, a2) -> RAS mm, centred on the volume."""
    aff = np.zeros((4, 4))
    aff[2, 0] = spacing[0]  # a0 -> +S
    aff[1, 1] = -spacing[1]  # a1 -> +P = -A
    aff[0, 2] = -spacing[2]  # a2 -> +L = -R
    aff[3, 3] = 1
    centre = (np.array(shape) - 1) / 2
    aff[:3, 3] = -aff[:3, :3] @ centre
    return aff


def reorient(array: np.ndarray, affine: np.ndarray, axcodes: tuple[str, str, str]):
    """Re-lay ``array`` (with ``affine``) so its axes point to ``axcodes``; returns (array, affine)."""
    import nibabel as nib

    src = nib.orientations.io_orientation(affine)
    dst = nib.orientations.axcodes2ornt(axcodes)
    xform = nib.orientations.ornt_transform(src, dst)
    out = nib.orientations.apply_orientation(array, xform)
    inv = nib.orientations.inv_ornt_aff(xform, array.shape)
    return np.ascontiguousarray(out), affine @ inv
