"""Report-conditioned synthetic chest CT: a phantom thorax in HU with findings at known places, a report
whose sentences describe them, and ground truth (labels, organ masks, lesion masks, sentence -> mask links).

Geometry: the phantom is built on a canonical grid whose array axes (a0, a1, a2) point to patient
Superior, Posterior and Left ("SPL"; napari shows axial slices with anterior up and the patient's right
on the image's left). World coordinates are RAS millimetres (NIfTI convention). A sample may then be
re-oriented to another source orientation; its affine follows, so it always describes the same anatomy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .reports import is_negated

LABELS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
]
ORGANS = ["body", "lung_right", "lung_left", "heart", "aorta", "spine", "ribs", "trachea", "liver"]
LOBES = {
    "right upper lobe": ("right", "upper"), "right middle lobe": ("right", "middle"),
    "right lower lobe": ("right", "lower"), "left upper lobe": ("left", "upper"),
    "left lower lobe": ("left", "lower"),
}
CANONICAL_AXCODES = ("S", "P", "L")

# Several phrasings per finding; {loc} is a lobe or side, {size} a size in mm.
TEMPLATES: dict[str, list[str]] = {
    "Medical material": ["A central venous catheter is seen in the superior vena cava.",
                         "Port catheter with its tip in the superior vena cava.",
                         "Medical material is present in the right chest."],
    "Arterial wall calcification": ["Calcified plaques are present in the wall of the thoracic aorta.",
                                    "Atherosclerotic calcification of the aortic wall.",
                                    "Arterial wall calcification along the descending aorta."],
    "Cardiomegaly": ["The heart is enlarged.", "Cardiomegaly is present.", "Heart size is increased."],
    "Pericardial effusion": ["Pericardial effusion measuring {size} mm in thickness.",
                             "There is a pericardial effusion.", "Fluid is seen in the pericardial space."],
    "Coronary artery wall calcification": ["Coronary artery calcification is present.",
                                           "Calcified plaques in the coronary arteries.",
                                           "There are coronary artery wall calcifications."],
    "Hiatal hernia": ["A hiatal hernia is seen.", "Small sliding hiatal hernia.",
                      "Part of the stomach herniates through the esophageal hiatus."],
    "Lymphadenopathy": ["An enlarged mediastinal lymph node measuring {size} mm.",
                        "Mediastinal lymphadenopathy is present.", "Enlarged lymph nodes in the mediastinum."],
    "Emphysema": ["Emphysema in the {loc}.", "Centrilobular emphysematous changes in the {loc}.",
                  "Low attenuation areas of emphysema are seen in the {loc}."],
    "Atelectasis": ["Atelectasis in the {loc}.", "Subsegmental atelectasis in the {loc}.",
                    "Band-like atelectasis is seen in the {loc}."],
    "Lung nodule": ["A {size} mm {kind} nodule in the {loc}.", "There is a {kind} nodule of {size} mm in the {loc}.",
                    "A {kind} pulmonary nodule measuring {size} mm is seen in the {loc}."],
    "Lung opacity": ["Ground glass opacity in the {loc}.", "Patchy opacity is seen in the {loc}.",
                     "There is an area of increased density in the {loc}."],
    "Pulmonary fibrotic sequela": ["Fibrotic sequelae in the {loc}.", "Fibrotic bands are seen in the {loc}.",
                                   "Linear fibrotic changes in the {loc}."],
    "Pleural effusion": ["{side_cap} pleural effusion measuring {size} mm.", "There is a {side} pleural effusion.",
                         "Fluid is seen in the {side} pleural space."],
    "Mosaic attenuation pattern": ["Mosaic attenuation pattern in the {loc}.",
                                   "Heterogeneous mosaic attenuation is seen in the {loc}."],
    "Peribronchial thickening": ["Peribronchial thickening in the {loc}.",
                                 "Bronchial wall thickening is seen in the {loc}."],
    "Consolidation": ["Consolidation in the {loc}.", "There is consolidation with air bronchograms in the {loc}.",
                      "Consolidative area in the {loc}."],
    "Bronchiectasis": ["Bronchiectasis in the {loc}.", "Dilated bronchi are seen in the {loc}.",
                       "Cylindrical bronchiectasis in the {loc}."],
    "Interlobular septal thickening": ["Interlobular septal thickening in the {loc}.",
                                       "Thickened interlobular septa are seen in the {loc}."],
}
NEGATIVES: dict[str, list[str]] = {
    "Medical material": ["No medical material is seen."],
    "Arterial wall calcification": ["No calcification of the aortic wall."],
    "Cardiomegaly": ["Heart size is normal.", "The heart is not enlarged."],
    "Pericardial effusion": ["No pericardial effusion.", "Pericardial effusion was not observed."],
    "Coronary artery wall calcification": ["No coronary artery calcification."],
    "Hiatal hernia": ["No hiatal hernia."],
    "Lymphadenopathy": ["No enlarged lymph nodes in the mediastinum.", "No lymphadenopathy."],
    "Emphysema": ["No emphysema."],
    "Atelectasis": ["No atelectasis."],
    "Lung nodule": ["No pulmonary nodule is seen.", "No nodular lesion in the lungs."],
    "Lung opacity": ["No lung opacity."],
    "Pulmonary fibrotic sequela": ["No fibrotic changes."],
    "Pleural effusion": ["No pleural effusion.", "Pleural effusion was not detected."],
    "Mosaic attenuation pattern": ["No mosaic attenuation."],
    "Peribronchial thickening": ["No peribronchial thickening."],
    "Consolidation": ["No consolidation.", "No consolidation is seen in the lungs."],
    "Bronchiectasis": ["No bronchiectasis."],
    "Interlobular septal thickening": ["No interlobular septal thickening."],
}
NORMAL_FILLER = ["Trachea and both main bronchi are patent.", "Thoracic aorta diameter is normal.",
                 "Bone structures are intact.", "Upper abdominal organs in the sections are normal."]
# Keywords that tie a sentence of a real report to a finding (negated sentences are not linked).
KEYWORDS: dict[str, tuple[str, ...]] = {
    "Medical material": ("catheter", "port", "tube", "medical material", "pacemaker", "stent", "suture"),
    "Arterial wall calcification": ("aort", "arterial wall calcif", "atheroscl"),
    "Cardiomegaly": ("cardiomegaly", "heart is enlarged", "heart size is increased", "enlarged heart"),
    "Pericardial effusion": ("pericardial",),
    "Coronary artery wall calcification": ("coronary",),
    "Hiatal hernia": ("hiatal", "hernia"),
    "Lymphadenopathy": ("lymph",),
    "Emphysema": ("emphysem", "bulla"),
    "Atelectasis": ("atelectas",),
    "Lung nodule": ("nodul",),
    "Lung opacity": ("opacit", "ground glass", "ground-glass", "density"),
    "Pulmonary fibrotic sequela": ("fibro", "sequel"),
    "Pleural effusion": ("pleural effusion", "pleural space", "pleural fluid"),
    "Mosaic attenuation pattern": ("mosaic",),
    "Peribronchial thickening": ("peribronchial", "bronchial wall thick"),
    "Consolidation": ("consolidat",),
    "Bronchiectasis": ("bronchiectas", "dilated bronch"),
    "Interlobular septal thickening": ("septal", "interlobular"),
}


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

    def __init__(self, rng: np.random.Generator, shape, spacing) -> None:
        self.rng = rng
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
        c, rng, k = self.c, self.rng, self.size
        lungs = self.organs["lung_right"] | self.organs["lung_left"]
        loc = loc or str(rng.choice(list(LOBES)))
        side = LOBES[loc][0]
        lobe = self.lobe_mask(loc)
        info: dict = {"label": label, "loc": loc, "side": side}
        name = label.lower().replace(" ", "_")
        if label == "Lung nodule":
            size = float(rng.choice([6, 8, 10, 12, 15, 20, 25]))
            kind = str(rng.choice(["solid", "ground-glass"]))
            centre = self._point_in(lobe, size / 2 + 3)
            mask = c.ellipsoid(centre, (size / 2,) * 3) & lungs
            self.add(name, label, mask, 35.0 if kind == "solid" else -450.0)
            info.update(size=int(size), kind=kind)
        elif label in ("Consolidation", "Lung opacity", "Atelectasis"):
            size = float(rng.uniform(25, 45))
            if label == "Atelectasis":
                centre = self._point_in(lobe & (c.p > 30), 8)
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
            tex = _smooth_noise(rng, c.shape, 4.0)
            mask = lobe & (tex > 0.1)
            self.add(name, label, mask, -975.0)
        elif label == "Mosaic attenuation pattern":
            tex = _smooth_noise(rng, c.shape, 5.0)
            mask = lobe
            hu = np.where(tex > 0, -920.0, -720.0).astype(np.float32)
            self.add(name, label, mask, hu)
        elif label == "Interlobular septal thickening":
            # Polygonal lines ~1 voxel thick, 12-15 mm apart, in the subpleural rim of the lobe.
            from scipy.ndimage import binary_erosion

            period = float(rng.uniform(12, 15))
            half = 0.6 * float(np.mean(c.spacing))
            # oblique planes, so no axial slice lies inside one of them
            u, v, w = c.s + 0.5 * c.p + 0.3 * c.l, c.p - 0.45 * c.l + 0.35 * c.s, c.l + 0.4 * c.s - 0.3 * c.p
            grid = ((np.abs((u % period) - period / 2) < half) | (np.abs((v % period) - period / 2) < half)
                    | (np.abs((w % period) - period / 2) < half))
            rim_vox = max(1, int(round(20.0 / max(c.spacing))))
            rim = lobe & ~binary_erosion(lobe, iterations=rim_vox)
            mask = rim & grid
            self.add(name, label, mask, -250.0)
        elif label == "Pulmonary fibrotic sequela":
            mask = np.zeros(c.shape, bool)
            for _ in range(4):
                a = self._point_in(lobe, 4)
                b = np.add(a, rng.uniform(-25, 25, 3))
                mask |= c.segment(a, b, 1.8)
            mask &= lobe
            self.add(name, label, mask, 20.0)
        elif label in ("Bronchiectasis", "Peribronchial thickening"):
            mask = np.zeros(c.shape, bool)
            air = np.zeros(c.shape, bool)
            for _ in range(3):
                a = self._point_in(lobe, 10)
                b = np.add(a, rng.uniform(-25, 25, 3))
                lumen = 4.0 if label == "Bronchiectasis" else 1.8
                wall = lumen + (2.0 if label == "Bronchiectasis" else 3.0)
                mask |= c.segment(a, b, wall)
                air |= c.segment(a, b, lumen)
            mask &= lobe
            hu = np.full(c.shape, 30.0, np.float32)
            hu[air] = -950.0
            self.add(name, label, mask, hu)
        elif label == "Pleural effusion":
            lung = self.organs[f"lung_{side}"]
            depth = float(rng.uniform(15, 35))
            posterior_edge = np.where(lung.any(axis=1, keepdims=True),
                                      lung.shape[1] - 1 - np.argmax(lung[:, ::-1, :], axis=1)[:, None, :], -1)
            p_idx = np.arange(lung.shape[1])[None, :, None]
            mask = lung & (p_idx >= posterior_edge - depth / c.spacing[1]) & (c.s < self.dome_s + 80)
            self.add(name, label, mask, 12.0)
            info.update(size=int(depth), loc=f"{side} pleural space")
        elif label == "Pericardial effusion":
            cs, cp, cl = self.heart_centre
            r = self.heart_scale
            thick = float(rng.uniform(6, 12))
            outer = c.ellipsoid(self.heart_centre, (55 * k * r + thick, 42 * k * r + thick, 55 * k * r + thick))
            mask = outer & ~self.organs["heart"] & (c.s > self.dome_s - 10) & ~self.organs["spine"]
            self.add(name, label, mask, 10.0)
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
                mask |= c.ellipsoid(centre, (2.5, 2.5, 2.5))
            self.add(name, label, mask, 700.0)
            info.update(loc="coronary arteries")
        elif label == "Arterial wall calcification":
            aorta = self.aorta
            shell = aorta & ~np.roll(aorta, 2, axis=2) | aorta & ~np.roll(aorta, -2, axis=1)
            mask = shell & (_smooth_noise(rng, c.shape, 3.0) > 0.3)
            if not mask.any():
                mask = shell
            self.add(name, label, mask, 600.0)
            info.update(loc="aorta")
        elif label == "Lymphadenopathy":
            size = float(rng.uniform(15, 25))
            centre = (self.extent_s * 0.15, -5 * k, float(rng.choice([-22, 22])) * k)
            mask = c.ellipsoid(centre, (size / 2, size / 2.4, size / 2.2)) & ~self.organs["trachea"] & ~self.aorta
            self.add(name, label, mask, 42.0)
            info.update(size=int(size), loc="mediastinum")
        elif label == "Hiatal hernia":
            size = float(rng.uniform(30, 45))
            centre = (float(self.dome_s.max()) - 5, 35 * k, 8 * k)
            sac = c.ellipsoid(centre, (size / 2, size / 2.5, size / 2.2))
            air = sac & (c.p < centre[1] - 3)
            hu = np.full(c.shape, 25.0, np.float32)
            hu[air] = -800.0
            mask = sac & ~self.organs["spine"] & ~self.aorta
            self.add(name, label, mask, hu)
            info.update(size=int(size), loc="esophageal hiatus")
        elif label == "Medical material":
            tip = (self.heart_centre[0] + 55, -20 * k, -12 * k)
            entry = (self.extent_s * 0.8, -35 * k, -55 * k)
            mask = c.segment(entry, tip, 1.5)
            self.add(name, label, mask, 1500.0)
            info.update(loc="superior vena cava")
        else:  # pragma: no cover - LABELS and this function are kept in step by a test
            raise ValueError(f"unknown finding {label!r}")
        return info

    def finish(self, noise_hu: float) -> np.ndarray:
        noise = self.rng.standard_normal(self.c.shape).astype(np.float32) * noise_hu
        return np.clip(self.hu + noise, -1024, 3071).astype(np.float32)


def _describe(rng: np.random.Generator, info: dict) -> str:
    template = str(rng.choice(TEMPLATES[info["label"]]))
    side = info.get("side", "right")
    return template.format(loc=info.get("loc", ""), size=info.get("size", ""), kind=info.get("kind", "solid"),
                           side=side, side_cap=side.capitalize())


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


DEFAULT_N_FINDINGS = (1, 4)  # a sample shows this many of the 18 findings (inclusive range, uniform)


def finding_prevalence(n_findings: tuple[int, int] = DEFAULT_N_FINDINGS) -> float:
    """Probability that a given finding is in a sample: the findings are drawn uniformly, so it is the mean
    number of findings per sample over the 18 labels."""
    return (n_findings[0] + n_findings[1]) / 2 / len(LABELS)


def generate_sample(
    seed: int,
    shape: tuple[int, int, int] = (96, 128, 160),
    spacing: tuple[float, float, float] | None = None,
    findings: list[str] | None = None,
    n_findings: tuple[int, int] = DEFAULT_N_FINDINGS,
    report: str | None = None,
    noise_hu: float | None = None,
    axcodes: tuple[str, str, str] = CANONICAL_AXCODES,
) -> SyntheticSample:
    """One deterministic sample for ``seed``.

    shape is (a0, a1, a2) = (superior-inferior, anterior-posterior, left-right) voxels of the canonical
    grid; spacing in mm (default: random, covering a ~250 x 250 x 320 mm field). ``findings`` fixes which of
    LABELS appear (default: a random 1-4). ``report`` (real-report mode) uses that text as the report and
    links its sentences to the rendered findings by keyword. ``axcodes`` re-orients the output.
    """
    from .reports import sentence_texts

    rng = np.random.default_rng(seed)
    if spacing is None:
        fov = (rng.uniform(230, 280), 250.0, 330.0)
        spacing = tuple(f / n for f, n in zip(fov, shape))
    if findings is None:
        n = int(rng.integers(n_findings[0], n_findings[1] + 1))
        findings = sorted(rng.choice(LABELS, size=n, replace=False).tolist(), key=LABELS.index)
    unknown = [f for f in findings if f not in LABELS]
    if unknown:
        raise ValueError(f"unknown findings {unknown}; choose from the 18 CT-RATE labels {LABELS}")
    builder = PhantomBuilder(rng, shape, spacing)
    builder.build_anatomy(cardiomegaly="Cardiomegaly" in findings)
    infos = [builder.finding(label) for label in findings]
    volume = builder.finish(noise_hu if noise_hu is not None else float(rng.uniform(8, 20)))
    labels = {name: int(name in findings) for name in LABELS}
    lesion_names = list(builder.lesions)

    if report is None:
        sentences, links = [], []
        for info, name in zip(infos, lesion_names):
            sentences.append(_describe(rng, info))
            links.append([name])
        negatives = [lab for lab in LABELS if lab not in findings]
        for lab in rng.choice(negatives, size=min(len(negatives), int(rng.integers(2, 6))), replace=False):
            sentences.append(str(rng.choice(NEGATIVES[str(lab)])))
            links.append([])
        for filler in rng.choice(NORMAL_FILLER, size=int(rng.integers(0, 3)), replace=False):
            sentences.append(str(filler))
            links.append([])
        order = rng.permutation(len(sentences))
        sentences = [sentences[i] for i in order]
        links = [links[i] for i in order]
        report = " ".join(sentences)
    else:
        sentences = sentence_texts(report)
        links = [link_sentence(s, findings, lesion_names, builder.lesion_labels) for s in sentences]

    affine = canonical_affine(shape, spacing)
    organs, lesions = builder.organs, builder.lesions
    if tuple(axcodes) != CANONICAL_AXCODES:
        volume, new_affine = reorient(volume, affine, axcodes)
        organs = {k: reorient(v, affine, axcodes)[0] for k, v in organs.items()}
        lesions = {k: reorient(v, affine, axcodes)[0] for k, v in lesions.items()}
        affine = new_affine
    return SyntheticSample(volume, affine, report, sentences, labels, organs, lesions, dict(builder.lesion_labels),
                           links, seed, tuple(axcodes), infos)  # type: ignore[arg-type]


def link_sentence(sentence: str, findings: list[str], lesion_names: list[str], lesion_labels: dict[str, str]) -> list[str]:
    """Lesions a (real-report) sentence describes: keyword match, skipping negated sentences."""
    if is_negated(sentence):
        return []
    low = f" {sentence.lower()} "
    return [name for name in lesion_names
            if lesion_labels[name] in findings and any(kw in low for kw in KEYWORDS[lesion_labels[name]])]


def real_report_sample(seed: int, reports_csv: str | Path, index: int | None = None, **kwargs) -> SyntheticSample:
    """Real-report mode: a CT-RATE report (with its 18 labels) rendered into a phantom showing exactly
    those findings."""
    import csv

    with open(reports_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{reports_csv} has no reports")
    missing = [lab for lab in LABELS if lab not in rows[0]]
    if missing:
        raise ValueError(f"{reports_csv} lacks the label columns {missing}; expected the CT-RATE layout")
    rng = np.random.default_rng(seed)
    row = rows[index if index is not None else int(rng.integers(len(rows)))]
    findings = [lab for lab in LABELS if str(row[lab]).strip() in ("1", "1.0")]
    text = row.get("report_text") or row.get("Findings_EN") or ""
    return generate_sample(seed, findings=findings, report=text, **kwargs)


def save_sample(sample: SyntheticSample, out_dir: str | Path, name: str) -> dict:
    """Write volume, organ and lesion label maps as NIfTI; returns the manifest row."""
    import nibabel as nib

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, data in (("ct", sample.volume.astype(np.int16)), ("organs", sample.organ_label_map()),
                       ("lesions", sample.lesion_label_map())):
        # NIfTI stores (x, y, z) = our (a2, a1, a0); the affine's columns are reordered to match.
        img = nib.Nifti1Image(np.transpose(data, (2, 1, 0)), sample.affine[:, [2, 1, 0, 3]])
        img.header.set_xyzt_units("mm")
        if kind == "ct":
            img.header["descrip"] = b"MG-3D synthetic chest CT (HU)"
        path = out_dir / f"{name}_{kind}.nii.gz"
        nib.save(img, str(path))
        paths[kind] = path.name
    return {
        "volume": paths["ct"], "mask": paths["lesions"], "organs": paths["organs"], "report": sample.report,
        "labels": sample.labels, "sentences": sample.sentences, "sentence_links": sample.sentence_links,
        "lesion_labels": sample.lesion_labels, "seed": sample.seed,
    }


GEOMETRY_CHOICES = (("S", "P", "L"), ("L", "P", "S"), ("R", "A", "S"), ("I", "P", "L"))


def _sample_geometry(seed: int, shape: tuple[int, int, int], vary: bool):
    """(shape, axcodes) for sample ``seed``: with ``vary``, slice count x0.75-1.25 and a source orientation
    drawn from GEOMETRY_CHOICES (deterministic per seed)."""
    if not vary:
        return shape, CANONICAL_AXCODES
    rng = np.random.default_rng([seed, 7])
    n_slices = int(round(shape[0] * rng.uniform(0.75, 1.25)))
    return (n_slices, shape[1], shape[2]), GEOMETRY_CHOICES[int(rng.integers(len(GEOMETRY_CHOICES)))]


def _write_one(args) -> dict:
    out_dir, seed, shape, vary = args
    sample_shape, axcodes = _sample_geometry(seed, shape, vary)
    return save_sample(generate_sample(seed, shape=sample_shape, axcodes=axcodes), out_dir, f"synth_{seed:06d}")


def write_dataset(out_dir: str | Path, n: int, seed: int = 0, shape=(96, 128, 160), progress: bool = True,
                  vary_geometry: bool = False, workers: int = 0) -> Path:
    """Write ``n`` samples plus ``manifest.jsonl`` (the training loaders read it). Returns the manifest.

    ``vary_geometry`` varies slice count and source orientation per sample; ``workers`` > 0 uses that many
    processes (the output does not depend on it)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.jsonl"
    jobs = [(out_dir, seed + i, tuple(shape), vary_geometry) for i in range(n)]
    with open(manifest, "w") as fh:
        if workers > 0:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                rows = pool.imap(_write_one, jobs, chunksize=4)
                for row in tqdm(rows, total=n, desc="synthetic CTs", disable=not progress):
                    fh.write(json.dumps(row) + "\n")
        else:
            for job in tqdm(jobs, desc="synthetic CTs", disable=not progress):
                fh.write(json.dumps(_write_one(job)) + "\n")
    return manifest


def contact_sheet(samples: list[SyntheticSample], path: str | Path, columns: int = 4) -> Path:
    """PNG of mid-slices (axial through the largest lesion) with the reports, to judge realism."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = int(np.ceil(len(samples) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 5.2 * rows), squeeze=False)
    for ax, s in zip(axes.ravel(), samples):
        lesion = s.lesion_label_map() > 0
        z = int(np.argmax(lesion.sum((1, 2)))) if lesion.any() else s.volume.shape[0] // 2
        ax.imshow(np.clip(s.volume[z], -1000, 400), cmap="gray", vmin=-1000, vmax=400)
        if lesion[z].any():
            ax.contour(lesion[z], levels=[0.5], colors="red", linewidths=0.6)
        text = "\n".join(t[:60] for t in s.sentences[:6])
        ax.set_title(f"seed {s.seed}", fontsize=8)
        ax.text(0, -0.02, text, transform=ax.transAxes, fontsize=6, va="top")
        ax.axis("off")
    for ax in axes.ravel()[len(samples):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m napari_mg3d.synthetic",
                                     description="Write report-conditioned synthetic chest CTs (NIfTI + manifest.jsonl).")
    parser.add_argument("out_dir", help="folder to write into")
    parser.add_argument("-n", type=int, default=16, help="number of samples (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed+i")
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 128, 160), metavar=("SI", "AP", "LR"),
                        help="voxels (superior-inferior, anterior-posterior, left-right)")
    parser.add_argument("--vary-geometry", action="store_true",
                        help="vary slice count and source orientation between samples")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default 0: in this process)")
    parser.add_argument("--contact-sheet", action="store_true", help="also write contact_sheet.png of 8 samples")
    args = parser.parse_args(argv)
    manifest = write_dataset(args.out_dir, args.n, args.seed, tuple(args.shape), vary_geometry=args.vary_geometry,
                             workers=args.workers)
    print(f"wrote {args.n} samples and {manifest}")
    if args.contact_sheet:
        sheet = contact_sheet([generate_sample(args.seed + i, shape=tuple(args.shape)) for i in range(min(8, args.n))],
                              Path(args.out_dir) / "contact_sheet.png")
        print(f"wrote {sheet}")


if __name__ == "__main__":
    main()
