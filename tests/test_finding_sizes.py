"""experiments.finding_sizes: lesion size and contrast at the model's input resolution."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import finding_sizes


def test_contrast_is_inside_minus_shell():
    image = np.zeros((12, 12, 12), np.float32)
    mask = np.zeros_like(image, bool)
    mask[4:8, 4:8, 4:8] = True
    image[mask] = 0.3
    image[~mask] = 0.1
    assert finding_sizes.contrast(image, mask) == pytest.approx(0.2)
    assert finding_sizes.contrast(image, np.zeros_like(mask)) == 0.0


def test_a_coarser_input_leaves_fewer_voxels_per_finding():
    fine = finding_sizes.finding_sizes((64, 64, 64), n=2, shape=(48, 64, 80))
    coarse = finding_sizes.finding_sizes((32, 32, 32), n=2, shape=(48, 64, 80))
    assert fine.keys() == coarse.keys() and fine
    for label in fine:
        assert fine[label]["median_source_voxels"] == coarse[label]["median_source_voxels"]
        assert coarse[label]["median_model_voxels"] <= fine[label]["median_model_voxels"]
    largest = max(fine, key=lambda k: fine[k]["median_model_voxels"])
    ratio = coarse[largest]["median_model_voxels"] / fine[largest]["median_model_voxels"]
    assert 0.08 < ratio < 0.2  # half the voxels per axis: about an eighth
    assert fine[largest]["median_contrast_hu"] > 0
