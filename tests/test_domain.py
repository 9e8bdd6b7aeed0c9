"""The domain check: each reason's threshold, on small arrays the test builds, and on the real CTs."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mg3d import domain
from napari_mg3d.synthetic import generate_sample


@pytest.fixture(scope="module")
def chest():
    s = generate_sample(0, shape=(64, 80, 96))  # a 250 x 250 x 330 mm field of view, lungs in it
    return s.volume, s.affine


def codes(data, affine, **kw):
    return [i.code for i in domain.check_domain(data, affine, **kw)]


def test_a_chest_ct_in_hu_passes(chest):
    assert codes(*chest) == []


@pytest.mark.parametrize("make, code", [
    (lambda v: np.clip((v + 1000) / 8, 0, 255).astype(np.uint8), "windowed_8bit"),
    (lambda v: np.clip((v + 1000) / 8, 0, 255).astype(np.float32), "not_hu"),
    (lambda v: np.clip((v + 1000) / 2000, 0, 1).astype(np.float32), "not_hu"),
    (lambda v: (v + 1024).clip(0).astype(np.float32), "not_hu"),            # raw stored values, no rescale
    (lambda v: np.full_like(v, 40.0), "constant"),
    (lambda v: np.full_like(v, -1000.0) + np.random.default_rng(0).normal(0, 5, v.shape).astype(np.float32), "all_air"),
])
def test_input_that_is_not_ct_in_hu_is_refused_with_its_reason(chest, make, code):
    issues = domain.check_domain(make(chest[0]), chest[1])
    assert code in [i.code for i in issues]
    assert all(i.severity == "refuse" for i in issues if i.code == code)


def test_the_hint_names_the_likely_cause(chest):
    msg = {i.code: i.message for i in domain.check_domain(np.clip((chest[0] + 1000) / 2000, 0, 1), chest[1])}
    assert "values lie in [0, 1]" in msg["not_hu"]
    msg = {i.code: i.message for i in domain.check_domain(np.clip((chest[0] + 1000) / 8, 0, 255), chest[1])}
    assert "[0, 255]: an 8-bit or screen export" in msg["not_hu"]


def test_the_intensity_check_follows_the_declared_modality(chest):
    mr_like = (chest[0] + 1024).clip(0).astype(np.float32)
    assert "not_hu" in codes(mr_like, chest[1], modality="CT")
    assert codes(mr_like, chest[1], modality="MR") == []


def test_nan_voxels_are_refused_with_their_count(chest):
    data = chest[0].copy()
    data[0, 0, :7] = np.nan
    issue = domain.check_domain(data, chest[1])[-1]
    assert issue.code == "non_finite" and issue.severity == "refuse" and "7 NaN/inf voxels" in issue.message


def test_geometry_too_few_slices_thin_slab_and_singular_affine(chest):
    data, affine = chest
    three = codes(data[:3], affine)
    assert "too_few_slices" in three and "thin_slab" in three
    assert domain.check_domain(data[:3], affine)[0].severity == "refuse"
    slab = data[20:40]  # 20 slices of ~3.9 mm: 78 mm, enough slices but a thin slab
    assert codes(slab, affine) == ["thin_slab"] or "thin_slab" in codes(slab, affine)
    assert [i.severity for i in domain.check_domain(slab, affine) if i.code == "thin_slab"] == ["warn"]
    for bad in (np.zeros((4, 4)), np.diag([1.0, 0.0, 1.0, 1.0])):
        issues = domain.check_domain(data, bad)
        assert issues[0].code == "singular_affine" and issues[0].severity == "refuse"


def test_a_volume_without_lungs_is_warned_not_a_chest(chest):
    data = chest[0].copy()
    data[(data > domain.LUNG_LOW_HU) & (data < domain.LUNG_HIGH_HU)] = 30.0  # lungs filled with soft tissue
    issues = domain.check_domain(data, chest[1])
    assert [(i.code, i.severity) for i in issues] == [("not_chest", "warn")]


def test_the_real_abdominal_ct_is_warned_and_the_real_dicom_slab_too(shared_data):
    from napari_mg3d.io import read_volume

    abdomen = read_volume(shared_data / "ct" / "example_ct_sm.nii.gz")
    assert set(codes(abdomen.data, abdomen.affine)) == {"thin_slab", "not_chest"}
    series = read_volume(shared_data / "ct" / "example_ct_dicom")
    assert "not_chest" in codes(series.data, series.affine)
