"""How large and how contrasted is each synthetic finding once a volume is resampled to the model's input?

    python -m experiments.finding_sizes --input-size 64 64 64 --n 40

A finding that covers no voxel of the model input (after the resampling that preprocessing does) cannot be
learned or scored by any model at that input size; one that covers hundreds of voxels with a clear
intensity difference can. For each finding label: how many volumes (of ``n`` held-out synthetic ones) have
it, the median number of source voxels, the median number of model-input voxels that are at least half
lesion, and the median contrast: |mean intensity inside − mean intensity of a 2-voxel shell around it|
in HU (the model sees intensities scaled from the preprocessing HU window).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
from scipy import ndimage

from napari_mg3d.preprocess import PreprocessConfig, labels_to_model, preprocess
from napari_mg3d.synthetic import generate_sample
from napari_mg3d.volume import Volume

from .synthetic_proof import HELD_OUT_SEED


def lesion_in_model_space(lesion: np.ndarray, record) -> np.ndarray:
    """Source-grid bool mask -> model-grid bool mask of voxels at least half covered by it."""
    fractions = labels_to_model(lesion.astype(np.uint8), record, representation="probabilities")
    return fractions[1] >= 0.5


def contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """|mean inside − mean of the 2-voxel shell around| (image units); 0 for an empty mask."""
    if not mask.any():
        return 0.0
    shell = ndimage.binary_dilation(mask, iterations=2) & ~mask
    return float(abs(image[mask].mean() - image[shell].mean())) if shell.any() else 0.0


def finding_sizes(input_size, n: int = 40, shape=(80, 112, 144), seed: int = HELD_OUT_SEED, tier: str = "hard") -> dict:
    """Per finding label: volumes, median source voxels, median model voxels, median contrast (HU)."""
    config = PreprocessConfig(target_size=tuple(input_size))
    hu_per_unit = config.hu_window[1] - config.hu_window[0]
    rows: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    for i in range(n):
        s = generate_sample(seed + i, shape=tuple(shape), tier=tier)
        x, record = preprocess(Volume(s.volume, s.affine), config)
        image = x[0].numpy()
        for name, lesion in s.lesions.items():
            model_mask = lesion_in_model_space(lesion, record)
            rows[s.lesion_labels[name]].append((int(lesion.sum()), int(model_mask.sum()),
                                                contrast(image, model_mask) * hu_per_unit))
    out = {}
    for label, values in sorted(rows.items()):
        a = np.array(values, dtype=float)
        out[label] = {"volumes": len(a), "median_source_voxels": float(np.median(a[:, 0])),
                      "median_model_voxels": float(np.median(a[:, 1])), "min_model_voxels": float(a[:, 1].min()),
                      "median_contrast_hu": float(np.median(a[:, 2])), "min_contrast_hu": float(a[:, 2].min())}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.finding_sizes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-size", type=int, nargs=3, default=[64, 64, 64], help="model input (z, y, x) voxels")
    ap.add_argument("--n", type=int, default=40, help="held-out synthetic volumes (seeds 900000..)")
    ap.add_argument("--shape", type=int, nargs=3, default=[80, 112, 144], help="voxels of the synthetic CTs")
    ap.add_argument("--tier", default="hard", choices=("hard", "visible"), help="the generator's finding style")
    ap.add_argument("--out", default="", help="write the table as JSON here")
    a = ap.parse_args(argv)
    table = finding_sizes(a.input_size, a.n, a.shape, tier=a.tier)
    print(f"{'finding':34s} {'volumes':>7s} {'source vox':>10s} {'model vox: median':>17s} {'min':>5s} "
          f"{'contrast HU: median':>19s} {'min':>5s}")
    for label, r in table.items():
        print(f"{label:34s} {r['volumes']:7d} {r['median_source_voxels']:10.0f} {r['median_model_voxels']:17.0f} "
              f"{r['min_model_voxels']:5.0f} {r['median_contrast_hu']:19.0f} {r['min_contrast_hu']:5.0f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(table, f, indent=1)
    return table


if __name__ == "__main__":
    main()
