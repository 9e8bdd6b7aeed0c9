"""The preprocessing contract: canonical orientation, HU window, crop, resize, and its exact inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mg3d.preprocess import (
    PreprocessConfig,
    labels_to_model,
    preprocess,
    resample_to_spacing,
    to_original,
)
from napari_mg3d.synthetic import generate_sample, reorient
from napari_mg3d.volume import Volume

ORIENTATIONS = [("S", "P", "L"), ("R", "A", "S"), ("L", "P", "S"), ("A", "I", "R")]


def _ball_volume(axcodes, centre_mm=(0.0, 0.0, 60.0), radius_mm=6.0, shape=(60, 120, 150), spacing=(2.0, 1.5, 1.25)):
    """A canonical (S, P, L) grid at 2 x 1.5 x 1.25 mm with a ball at centre_mm (S, P, L offsets),
    re-laid in ``axcodes``. Patient-left is +L."""
    from napari_mg3d.synthetic import canonical_affine

    aff = canonical_affine(shape, spacing)
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    ball = sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= radius_mm ** 2
    hu = np.where(ball, 50.0, -800.0).astype(np.float32)
    data, affine = reorient(hu, aff, axcodes)
    labels, _ = reorient(ball.astype(np.uint8), aff, axcodes)
    return Volume(data, affine), labels


def test_model_input_is_the_preset_size_in_unit_range():
    vol, _ = _ball_volume(("R", "A", "S"))
    x, rec = preprocess(vol, PreprocessConfig(target_size=(64, 64, 64)))
    assert x.shape == (1, 64, 64, 64)
    assert float(x.min()) == pytest.approx(0.1, abs=1e-3)  # -800 HU
    assert float(x.max()) <= 1.0
    assert rec.crop_shape == (53, 79, 132)  # 0.88, 0.66, 0.88 of (60, 120, 150)


def test_hu_window_clips_and_scales():
    vol = Volume(np.array([-3000, -1000, 0, 1000, 3000], np.float32).reshape(5, 1, 1).repeat(4, 1).repeat(4, 2),
                 np.diag([1.0, 1.0, 1.0, 1.0]))
    x, _ = preprocess(vol, PreprocessConfig(target_size=(4, 4, 5), crop_ratios=(1, 1, 1)))
    # canonical a0 is Superior; the RAS source's a0 is R -> values end up along the last axis, reversed
    assert sorted(np.unique(np.round(x.numpy(), 4)).tolist()) == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("axcodes", ORIENTATIONS)
def test_the_record_from_the_geometry_alone_is_the_one_preprocessing_makes(axcodes):
    from napari_mg3d.preprocess import preprocess_record

    vol, _ = _ball_volume(axcodes, centre_mm=(0.0, 0.0, 60.0))
    config = PreprocessConfig(target_size=(32, 64, 64))
    _, rec = preprocess(vol, config)
    assert preprocess_record(vol.data.shape, vol.affine, config) == rec
    with pytest.raises(ValueError, match="expected a 3D volume, got shape \\(4, 4\\)"):
        preprocess_record((4, 4), vol.affine, config)


@pytest.mark.parametrize("axcodes", ORIENTATIONS)
def test_a_marker_at_the_patients_left_stays_on_the_left(axcodes):
    vol, labels = _ball_volume(axcodes, centre_mm=(0.0, 0.0, 60.0))  # +60 mm towards patient left
    x, rec = preprocess(vol, PreprocessConfig(target_size=(32, 64, 64)))
    model_labels = labels_to_model(labels, rec, representation="labels")
    centre = np.argwhere(model_labels > 0).mean(0)
    assert centre[2] > 32 + 10  # canonical a2 points to the patient's left
    back = to_original(model_labels, rec, kind="label")
    assert back.shape == labels.shape
    world_back = vol.index_to_world(np.argwhere(back > 0).mean(0))
    world_truth = vol.index_to_world(np.argwhere(labels > 0).mean(0))
    assert world_truth[0] < -50  # RAS x: left is negative
    np.testing.assert_allclose(world_back, world_truth, atol=1.0)


@pytest.mark.parametrize("axcodes", ORIENTATIONS)
def test_label_round_trip_keeps_dice_for_10mm_blobs(axcodes):
    # a chest-CT field of view (300 x 358 x 358 mm) at the base input: model voxels of 2.1 x 2.5 x 2.5 mm
    vol, labels = _ball_volume(axcodes, centre_mm=(10.0, -20.0, 30.0), radius_mm=5.0,
                               shape=(150, 256, 256), spacing=(2.0, 1.4, 1.4))
    _, rec = preprocess(vol)
    back = to_original(labels_to_model(labels, rec), rec, kind="scores")
    a, b = labels > 0, back > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.95


def test_synthetic_lesions_round_trip_at_base_size():
    sample = generate_sample(3, findings=["Lung nodule", "Lymphadenopathy"], axcodes=("L", "P", "S"))
    vol = Volume(sample.volume, sample.affine)
    _, rec = preprocess(vol)  # base preset size
    for name, mask in sample.lesions.items():
        back = to_original(labels_to_model(mask.astype(np.uint8), rec), rec, kind="scores") > 0
        dice = 2 * (mask & back).sum() / (mask.sum() + back.sum())
        assert dice >= 0.9, (name, dice)


def test_model_affine_maps_model_voxels_to_the_same_world_point():
    vol, labels = _ball_volume(("A", "I", "R"), centre_mm=(5.0, 10.0, -40.0))
    _, rec = preprocess(vol, PreprocessConfig(target_size=(32, 64, 64)))
    centre_model = np.argwhere(labels_to_model(labels, rec, representation="labels") > 0).mean(0)
    world = np.asarray(rec.model_affine)[:3, :3] @ centre_model + np.asarray(rec.model_affine)[:3, 3]
    np.testing.assert_allclose(world, vol.index_to_world(np.argwhere(labels > 0).mean(0)), atol=1.0)


def test_continuous_maps_map_back_with_fill_outside_the_crop():
    vol, _ = _ball_volume(("R", "A", "S"))
    _, rec = preprocess(vol, PreprocessConfig(target_size=(32, 64, 64)))
    ones = to_original(np.ones((32, 64, 64), np.float32), rec, fill=-1.0)
    assert ones.shape == vol.shape
    inside = (ones == 1.0).sum() / ones.size
    assert inside == pytest.approx(0.88 * 0.66 * 0.88, rel=0.05)
    assert set(np.unique(ones)) == {-1.0, 1.0}
    multi = to_original(np.ones((3, 32, 64, 64), np.float32), rec)
    assert multi.shape == (3, *vol.shape)


def test_resample_to_spacing_keeps_world_geometry():
    vol, labels = _ball_volume(("R", "A", "S"), centre_mm=(0.0, 0.0, 30.0))
    res = resample_to_spacing(Volume(labels.astype(np.float32), vol.affine), (3.0, 3.0, 3.0))
    assert res.spacing == pytest.approx((3.0, 3.0, 3.0), rel=0.03)
    assert res.axcodes == ("S", "P", "L")
    np.testing.assert_allclose(res.index_to_world(np.argwhere(res.data > 0.5).mean(0)),
                               vol.index_to_world(np.argwhere(labels > 0).mean(0)), atol=1.5)


def test_fingerprint_changes_with_parameters():
    a, b = PreprocessConfig(), PreprocessConfig(target_size=(64, 64, 64))
    assert a.fingerprint() != b.fingerprint() and a.fingerprint() == PreprocessConfig().fingerprint()


@pytest.mark.parametrize("grid,size", [((8, 6, 10), (27, 20, 33)), ((5, 7, 4), (5, 19, 13)), ((6, 6, 6), (7, 40, 11))])
def test_fast_upsampled_argmax_gives_the_labels_of_resizing_every_class(grid, size):
    from napari_mg3d.preprocess import _argmax_class_by_class, upsampled_argmax

    torch.manual_seed(0)
    scores = torch.nn.functional.interpolate(torch.randn(1, 9, 3, 3, 3), size=grid, mode="trilinear")[0] * 4
    scores[0] += 0.5  # a dominant background, as in segmentation logits
    fast = upsampled_argmax(scores, size, chunk=17)  # small chunks: several batches of boundary cells
    plain = _argmax_class_by_class(scores, size, "smooth-linear")
    assert fast.dtype == torch.int32 and fast.shape == size
    assert (fast != plain).sum() <= 1  # the same up to a float rounding at an exact tie
    assert len(torch.unique(fast)) > 3  # a real multi-class map, not one class everywhere


def test_fast_argmax_falls_back_when_an_axis_shrinks():
    from napari_mg3d.preprocess import _argmax_class_by_class, upsampled_argmax

    scores = torch.randn(4, 10, 10, 10)
    torch.testing.assert_close(upsampled_argmax(scores, (12, 6, 14)), _argmax_class_by_class(scores, (12, 6, 14), "smooth-linear"))


@pytest.mark.parametrize("codes", [("S", "P", "L"), ("L", "P", "S"), ("R", "A", "S"), ("P", "I", "R")])
def test_heatmap_overlay_matrix_puts_each_model_voxel_at_its_world_point(codes):
    from napari_mg3d.preprocess import to_source_axes
    from napari_mg3d.synthetic import canonical_affine as synth_affine
    from napari_mg3d.synthetic import reorient

    rng = np.random.default_rng(0)
    data, affine = reorient(rng.random((40, 50, 60)).astype(np.float32), synth_affine((40, 50, 60), (2.0, 1.0, 0.8)), codes)
    vol = Volume(data, affine)
    _, rec = preprocess(vol, PreprocessConfig(target_size=(32, 32, 32)))
    model_map = rng.random((32, 32, 32)).astype(np.float32)
    small, matrix = to_source_axes(model_map, rec)
    assert np.all(np.diag(matrix)[:3] > 0) and np.allclose(matrix[:3, :3], np.diag(np.diag(matrix)[:3]))
    for k in [(0, 0, 0), (3, 7, 11), (31, 30, 29)]:
        model_index = np.argwhere(model_map == small[k])[0]
        world_small = vol.affine @ matrix @ np.array([*k, 1.0])
        world_model = np.asarray(rec.model_affine) @ np.array([*model_index, 1.0])
        np.testing.assert_allclose(world_small, world_model, atol=1e-9)
