"""Readers and writers on real files (../shared/data/ct) and on DICOM series written here with pydicom."""

from __future__ import annotations

import gzip
import random
import warnings

import nibabel as nib
import numpy as np
import pytest

from napari_mg3d.io import VolumeReadError, read_dicom_series, read_nifti, read_nrrd, read_volume, write_nifti
from napari_mg3d.volume import Volume


# ----- real files -----------------------------------------------------------------------------------
def test_real_nifti_ct(shared_data):
    vol = read_volume(shared_data / "ct" / "example_ct_sm.nii.gz")
    assert vol.shape == (30, 101, 122)  # (k, j, i) of the 122x101x30 file
    assert vol.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert vol.data.dtype == np.float32
    assert vol.data.min() < -900  # air
    assert 0 < np.median(vol.data[vol.data > -200]) < 100  # soft tissue
    # same voxel, same world point as nibabel's own affine
    img = nib.load(str(shared_data / "ct" / "example_ct_sm.nii.gz"))
    i, j, k = 10, 20, 5
    assert np.allclose(vol.index_to_world([k, j, i]), img.affine[:3, :3] @ [i, j, k] + img.affine[:3, 3])
    assert vol.data[k, j, i] == pytest.approx(float(img.get_fdata()[i, j, k]))


def test_real_jpeg2000_dicom_series(shared_data):
    vol = read_volume(shared_data / "ct" / "example_ct_dicom")
    assert vol.shape == (20, 512, 512)
    assert vol.spacing[1:] == pytest.approx((0.9765625, 0.9765625))
    assert vol.metadata["transfer_syntax"] == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    assert vol.data.min() <= -1000 + 30
    body = vol.data[:, 200:300, 200:300]
    assert -200 < np.median(body) < 150
    assert vol.axcodes == ("S", "P", "L")
    # slices ascend along the normal whatever the file order
    positions = vol.index_to_world(np.array([[k, 0, 0] for k in range(20)]))[:, 2]
    assert np.all(np.diff(positions) > 0)


def test_dicom_label_map_written_as_nifti_overlays_the_same_world_point(shared_data, tmp_path):
    vol = read_volume(shared_data / "ct" / "example_ct_dicom")
    labels = np.zeros(vol.shape, np.uint8)
    labels[7, 100, 300] = 3
    path = write_nifti(tmp_path / "labels.nii.gz", labels, vol)
    img = nib.load(str(path))
    ijk = np.argwhere(np.asarray(img.dataobj) == 3)[0]
    world_nifti = img.affine[:3, :3] @ ijk + img.affine[:3, 3]
    assert np.allclose(world_nifti, vol.index_to_world([7, 100, 300]), atol=1e-4)
    assert img.header.get_intent()[0] == "label"
    back = read_nifti(path)
    assert np.allclose(back.affine, vol.affine, atol=1e-5) and back.data[7, 100, 300] == 3


# ----- hand-made DICOM ------------------------------------------------------------------------------
def _write_series(folder, n=6, spacing=2.5, series_uid="1.2.3.4", rows=16, cols=20, iop=(1, 0, 0, 0, 1, 0),
                  skip=(), slope=2.0, intercept=-1024.0, description="AXIAL", localizer=False, seed=0, tilt_mm=0.0):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    iop = np.asarray(iop, float)
    normal = np.cross(iop[:3], iop[3:])
    rng = np.random.default_rng(seed)
    truth = []
    for k in range(n):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"x{k}"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if localizer else "AXIAL"]
        ds.InstanceNumber = n - k  # deliberately reversed: ordering must use positions
        ds.ImagePositionPatient = list(np.array([-50.0, -60.0 + tilt_mm * k, 100.0]) + normal * spacing * k)
        ds.ImageOrientationPatient = list(iop)
        ds.PixelSpacing = [0.8, 0.7]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        raw = rng.integers(0, 1000, (rows, cols)).astype(np.uint16)
        raw[0, 0] = k  # slice marker
        ds.PixelData = raw.tobytes()
        ds.save_as(str(folder / f"{random.random():.12f}.dcm"), enforce_file_format=True)
        truth.append(raw.astype(np.float32) * slope + intercept)
    return truth


def test_shuffled_dicom_files_are_ordered_by_position_with_rescale_applied(tmp_path):
    truth = _write_series(tmp_path / "s")
    vol = read_dicom_series(tmp_path / "s")
    assert vol.shape == (6, 16, 20)
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))
    np.testing.assert_allclose(vol.data, np.stack(truth))
    assert vol.data[:, 0, 0].tolist() == [k * 2.0 - 1024 for k in range(6)]
    # LPS (-50, -60, 100) -> RAS (50, 60, 100)
    assert vol.origin == pytest.approx((50.0, 60.0, 100.0))


def test_a_list_of_files_reads_like_the_folder(tmp_path):
    _write_series(tmp_path / "s")
    files = sorted((tmp_path / "s").iterdir())
    a, b = read_dicom_series(files), read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(a.data, b.data)


def test_oblique_series_keeps_its_direction_cosines(tmp_path):
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    _write_series(tmp_path / "s", iop=(c, s, 0, -s, c, 0))
    vol = read_dicom_series(tmp_path / "s")
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))
    row_ras = vol.direction[:, 2]
    assert np.allclose(row_ras, [-c, -s, 0], atol=1e-6)  # LPS row cosine in RAS


def test_gantry_tilted_series_is_rejected_with_the_angle(tmp_path):
    _write_series(tmp_path / "s", tilt_mm=0.5)  # slices drift 0.5 mm in y per 2.5 mm step: ~11 degrees
    with pytest.raises(VolumeReadError, match=r"gantry tilt of 11\.3 degrees"):
        read_dicom_series(tmp_path / "s")


def test_missing_slice_is_detected_and_named(tmp_path):
    _write_series(tmp_path / "s", n=8, skip=(4,))
    with pytest.raises(VolumeReadError, match="uneven slice spacing.*typical 2.500 mm"):
        read_dicom_series(tmp_path / "s")
    with pytest.warns(UserWarning, match="uneven"):
        vol = read_dicom_series(tmp_path / "s", allow_uneven=True)
    assert vol.shape[0] == 7


def test_folder_with_two_series_reads_the_largest_and_names_the_other(tmp_path):
    _write_series(tmp_path / "mixed", n=6, series_uid="1.1.1", description="big")
    _write_series(tmp_path / "mixed", n=3, series_uid="2.2.2", description="small", cols=12)
    with pytest.warns(UserWarning, match=r"2 series.*2\.2\.2 \(3 slices, small\)"):
        vol = read_dicom_series(tmp_path / "mixed")
    assert vol.shape == (6, 16, 20)


def test_localizer_images_are_skipped(tmp_path):
    _write_series(tmp_path / "s", n=5)
    _write_series(tmp_path / "s", n=1, series_uid="1.2.3.4", localizer=True, iop=(1, 0, 0, 0, 0, -1))
    vol = read_dicom_series(tmp_path / "s")
    assert vol.shape[0] == 5 and vol.metadata["skipped"] == {"localizer/scout": 1}


def test_mixed_slice_sizes_in_one_series_are_rejected(tmp_path):
    _write_series(tmp_path / "s", n=4)
    _write_series(tmp_path / "s2", n=4, rows=10)
    for f in (tmp_path / "s2").iterdir():
        f.rename(tmp_path / "s" / ("b" + f.name))
    with pytest.raises(VolumeReadError, match="different sizes"):
        read_dicom_series(tmp_path / "s")


# ----- bad input ------------------------------------------------------------------------------------
def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeReadError, match="empty folder"):
        read_volume(tmp_path / "empty")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("hello")
    with pytest.raises(VolumeReadError, match="no DICOM image slices"):
        read_volume(tmp_path / "d")


def test_dicom_without_pixel_data(tmp_path):
    _write_series(tmp_path / "s", n=2)
    import pydicom

    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(str(f))
        del ds.PixelData
        del ds.Rows
        ds.save_as(str(f))
    with pytest.raises(VolumeReadError, match="no pixel data"):
        read_volume(tmp_path / "s")


def test_not_a_medical_image(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG....")
    with pytest.raises(VolumeReadError, match=r"photo.png is not a supported medical image"):
        read_volume(path)


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "cut.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4)), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeReadError, match="cut.nii.gz"):
        read_volume(path)


def test_2d_and_4d_images(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.float32), np.eye(4)), str(tmp_path / "flat.nii"))
    with pytest.raises(VolumeReadError, match="2D image"):
        read_volume(tmp_path / "flat.nii")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(tmp_path / "t.nii.gz"))
    with pytest.raises(VolumeReadError, match="axis 3 has 3 entries"):
        read_volume(tmp_path / "t.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 1), np.float32), np.eye(4)), str(tmp_path / "one.nii.gz"))
    assert read_volume(tmp_path / "one.nii.gz").shape == (8, 8, 8)


def test_nan_voxels_are_an_error_unless_filled(tmp_path):
    data = np.full((6, 6, 6), -500, np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "n.nii.gz"))
    with pytest.raises(VolumeReadError, match="1 NaN/inf voxels"):
        read_volume(tmp_path / "n.nii.gz")
    filled = read_volume(tmp_path / "n.nii.gz", nan_policy="fill")
    assert np.isfinite(filled.data).all() and filled.data[3, 2, 1] == -500


def test_gzip_is_not_confused_with_nifti_content(tmp_path):
    path = tmp_path / "fake.nii.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b"this is not a nifti header" * 20)
    with pytest.raises(VolumeReadError, match="fake.nii.gz"):
        read_volume(path)


# ----- NRRD and writers -----------------------------------------------------------------------------
def test_nrrd_lps_and_nifti_agree_on_world_coordinates(tmp_path):
    import nrrd

    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(7, 8, 9)).astype(np.float32)
    lps_dirs = np.diag([0.7, 0.8, 2.5])
    origin_lps = np.array([10.0, 20.0, -30.0])
    nrrd.write(str(tmp_path / "v.nrrd"), xyz, {"space": "left-posterior-superior",
                                               "space directions": lps_dirs, "space origin": origin_lps})
    vol = read_nrrd(tmp_path / "v.nrrd")
    assert vol.shape == (9, 8, 7)
    assert vol.origin == pytest.approx((-10.0, -20.0, -30.0))
    assert vol.axcodes == ("S", "P", "L")
    path = write_nifti(tmp_path / "v.nii.gz", vol.data, vol)
    again = read_volume(path)
    np.testing.assert_array_equal(again.data, vol.data)
    np.testing.assert_allclose(again.index_to_world([3, 4, 5]), vol.index_to_world([3, 4, 5]), atol=1e-5)


def test_float_map_written_on_source_grid_round_trips(tmp_path):
    affine = np.array([[0, 0, -0.7, 5], [0, -0.8, 0, 6], [2.5, 0, 0, 7], [0, 0, 0, 1]], float)
    vol = Volume(np.zeros((4, 5, 6), np.float32), affine)
    heat = np.random.default_rng(1).random((4, 5, 6)).astype(np.float32)
    back = read_volume(write_nifti(tmp_path / "heat.nii.gz", heat, vol))
    np.testing.assert_allclose(back.data, heat)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)


def test_writer_refuses_a_map_on_another_grid(tmp_path):
    vol = Volume(np.zeros((4, 5, 6), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="does not match the reference grid"):
        write_nifti(tmp_path / "x.nii.gz", np.zeros((4, 5, 7), np.uint8), vol)


def test_napari_transform_is_scale_translate_for_canonical_data():
    vol = Volume(np.zeros((4, 5, 6), np.float32),
                 np.array([[0, 0, -0.7, 5], [0, -0.8, 0, 6], [2.5, 0, 0, 7], [0, 0, 0, 1]], float))
    assert vol.axcodes == ("S", "P", "L")
    t = vol.napari_transform()
    assert t["scale"] == pytest.approx((2.5, 0.8, 0.7)) and t["translate"] == pytest.approx((7, -6, -5))
    warnings.simplefilter("error")
    ras = Volume(np.zeros((4, 5, 6), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    assert "affine" in ras.napari_transform()


def test_metaimage_agrees_with_nifti_on_world_coordinates(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    arr = np.random.default_rng(2).normal(size=(5, 6, 7)).astype(np.float32)  # (z, y, x)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, 20.0, -30.0))  # LPS
    sitk.WriteImage(img, str(tmp_path / "v.mha"))
    vol = read_volume(tmp_path / "v.mha")
    np.testing.assert_array_equal(vol.data, arr)
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7)) and vol.origin == pytest.approx((-10.0, -20.0, -30.0))
    # voxel (z=1, y=2, x=3) in ITK's own physical space (LPS) equals ours in RAS with x, y negated
    lps = img.TransformIndexToPhysicalPoint((3, 2, 1))
    np.testing.assert_allclose(vol.index_to_world([1, 2, 3]), [-lps[0], -lps[1], lps[2]], atol=1e-6)
    again = read_volume(write_nifti(tmp_path / "v.nii.gz", vol.data, vol))
    np.testing.assert_allclose(again.affine, vol.affine, atol=1e-5)


def test_fast_gzip_path_reads_the_same_voxels_scaling_and_geometry_as_nibabel(tmp_path, monkeypatch):
    import builtins

    import nibabel as nib

    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(6, 5, 4) - 100
    img = nib.Nifti1Image(data, np.diag([-0.7, -0.8, 2.5, 1.0]))
    img.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, str(path))
    fast = read_nifti(path)
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "isal" else real_import(name, *a, **k))
    slow = read_nifti(path)
    np.testing.assert_array_equal(fast.data, slow.data)
    np.testing.assert_array_equal(fast.affine, slow.affine)
    assert fast.data[0, 0, 0] == -100 * 2.0 - 1024.0 and fast.shape == (4, 5, 6)


def test_a_tiny_header_that_declares_a_huge_volume_is_refused_before_any_allocation(tmp_path):
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    header.set_data_dtype(np.int16)
    path = tmp_path / "huge.nii"
    with open(path, "wb") as fh:
        header.write_to(fh)
    assert path.stat().st_size < 1024
    with pytest.raises(VolumeReadError, match=r"huge.nii: its header declares \(4000, 4000, 4000\) voxels, 238.4 GiB"):
        read_volume(path)


def test_a_zero_or_singular_affine_is_refused_naming_the_file(tmp_path):
    import nibabel as nib

    for name, affine in (("zero.nii", np.diag([0.0, 0.0, 0.0, 1.0])), ("flat.nii", np.diag([1.0, 1.0, 0.0, 1.0]))):
        nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), str(tmp_path / name))
        with open(tmp_path / name, "r+b") as fh:  # nibabel refuses to write such a header: patch it in
            header = nib.Nifti1Header.from_fileobj(fh)
            header["qform_code"], header["sform_code"] = 0, 1
            for row, key in enumerate(("srow_x", "srow_y", "srow_z")):
                header[key] = affine[row]
            fh.seek(0)
            header.write_to(fh)
        with pytest.raises(VolumeReadError, match=f"{name} has a zero or singular affine"):
            read_volume(tmp_path / name)


def test_label_values_above_255_are_written_in_a_type_that_holds_them(tmp_path):
    labels = np.zeros((4, 5, 6), np.int64)
    labels[0, 0, 0], labels[1, 1, 1], labels[2, 2, 2] = 300, 70_000, 255
    back = read_volume(write_nifti(tmp_path / "big_labels.nii.gz", labels, np.eye(4), label=True))
    assert back.metadata["stored_dtype"] == "uint32"
    np.testing.assert_array_equal(back.data.astype(np.int64), labels)


def test_units_say_hu_only_when_the_data_is_hu(tmp_path, shared_data):
    ct = read_volume(shared_data / "ct" / "example_ct_sm.nii.gz")
    assert ct.metadata["intensity_units"] == "HU"
    assert read_volume(shared_data / "ct" / "example_ct_dicom").metadata["intensity_units"] == "HU"
    windowed = np.clip((ct.data + 1000) / 8, 0, 255).astype(np.uint8)
    export = read_volume(write_nifti(tmp_path / "export.nii.gz", windowed, ct.affine, label=False, dtype=np.uint8))
    assert export.metadata["intensity_units"] == "unknown" and export.metadata["stored_dtype"] == "uint8"


def test_dicom_without_pixel_data_and_a_corrupt_slice_get_the_right_message(tmp_path):
    import pydicom

    _write_series(tmp_path / "nopix", n=4)
    first = sorted((tmp_path / "nopix").glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    del ds.PixelData
    ds.save_as(first)
    with pytest.raises(VolumeReadError, match="has no pixel data") as err:
        read_dicom_series(tmp_path / "nopix")
    assert "pylibjpeg" not in str(err.value)  # not a codec problem
    _write_series(tmp_path / "corrupt", n=6)
    files = sorted((tmp_path / "corrupt").glob("*.dcm"), key=lambda f: pydicom.dcmread(f).ImagePositionPatient[2])
    files[2].write_bytes(b"\0" * 64)  # a middle slice unreadable
    with pytest.raises(VolumeReadError, match=r"uneven slice spacing.*1 files there could not be read as DICOM.*corrupt slice"):
        read_dicom_series(tmp_path / "corrupt")


def test_an_rgb_nifti_gets_the_readers_own_message(tmp_path):
    rgb = np.zeros((4, 5, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(tmp_path / "rgb.nii.gz"))
    with pytest.raises(VolumeReadError, match="rgb.nii.gz holds RGB/vector voxels"):
        read_volume(tmp_path / "rgb.nii.gz")


def test_dicom_in_gives_a_dicom_seg_that_references_the_source_series(tmp_path, shared_data):
    pytest.importorskip("highdicom")
    import highdicom as hd
    from pydicom.uid import generate_uid

    from napari_mg3d.dicom_seg import write_dicom_seg

    series = read_volume(shared_data / "ct" / "example_ct_dicom")  # real, anonymised: it carries no SOP UIDs
    assert len(series.metadata["slices"]) == 20 and series.metadata["slices"][0]["file"].startswith(str(shared_data))
    labels = np.zeros(series.shape, np.int32)
    labels[2:9, 100:300, 120:260] = 3  # "heart"
    labels[12:15, 40:90, 300:420] = 19  # a lesion class
    names = ["background", "body", "lung_right", "heart"] + [f"c{k}" for k in range(4, 19)] + ["Lung nodule"]
    path, notes = write_dicom_seg(labels, names, series, tmp_path / "seg.dcm", bundle_name="demo")
    assert notes and "SOPInstanceUID" in notes[0] and "generated UIDs" in notes[0]
    seg = hd.seg.segread(str(path))
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["heart", "Lung nodule"]
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "MG-3D (demo)"
    source_uids = [generate_uid(entropy_srcs=[s["file"]]) for s in series.metadata["slices"]]  # the files' own
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(source_uids) and len(referenced) == 20
    again, _ = write_dicom_seg(labels, names, series, tmp_path / "seg2.dcm", bundle_name="demo")
    assert hd.seg.segread(str(again)).ReferencedSeriesSequence[0].SeriesInstanceUID == \
        seg.ReferencedSeriesSequence[0].SeriesInstanceUID  # the same made-up UIDs at every export
    for number, value in ((1, 3), (2, 19)):  # every frame against the label map, slice by slice
        frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, segment_numbers=[number])
        np.testing.assert_array_equal(frames[..., 0].astype(bool), labels == value)


def test_a_heat_map_of_a_dicom_series_is_a_parametric_map_frame_by_source_slice(tmp_path, shared_data):
    pytest.importorskip("highdicom")
    import pydicom
    from pydicom.uid import generate_uid

    from napari_mg3d.dicom_seg import write_dicom_parametric_map

    series = read_volume(shared_data / "ct" / "example_ct_dicom")
    heat = np.zeros(series.shape, np.float32)
    heat[3:7, 200:260, 150:330] = np.linspace(0.1, 1.0, 180, dtype=np.float32)
    heat[15, 10:20, 10:20] = 1.7  # out of range: clipped to 1
    path, notes = write_dicom_parametric_map(heat, "Nodule in the right upper lobe.", series, tmp_path / "h.dcm", "demo")
    assert notes and "generated UIDs" in notes[0]
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTExplanation == "MG-3D attention to: Nodule in the right upper lobe."
    assert (mapping.DoubleFloatRealWorldValueFirstValueMapped, mapping.DoubleFloatRealWorldValueLastValueMapped) == (0.0, 1.0)
    source_uids = [generate_uid(entropy_srcs=[s["file"]]) for s in series.metadata["slices"]]
    order = [source_uids.index(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
             for f in ds.PerFrameFunctionalGroupsSequence]
    assert sorted(order) == list(range(20))  # one frame per source slice, each naming its slice
    np.testing.assert_allclose(ds.pixel_array, np.clip(heat, 0, 1)[order], atol=1e-7)


def test_a_series_with_its_uids_is_referenced_as_it_is(tmp_path):
    pytest.importorskip("highdicom")
    import highdicom as hd
    import pydicom

    from napari_mg3d.dicom_seg import write_dicom_seg

    _write_series(tmp_path / "s", n=4)
    for f in (tmp_path / "s").glob("*.dcm"):  # give the hand-made series the study and frame UIDs it lacks
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = "1.2.3.9", "1.2.3.10"
        ds.save_as(f)
    series = read_volume(tmp_path / "s")
    labels = np.zeros(series.shape, np.int32)
    labels[1:3, 4:8, 5:9] = 2
    _, notes = write_dicom_seg(labels, ["background", "body", "heart"], series, tmp_path / "seg.dcm")
    assert notes == []
    seg = hd.seg.segread(str(tmp_path / "seg.dcm"))
    assert seg.StudyInstanceUID == "1.2.3.9" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.3.4"
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {s["sop_instance_uid"] for s in series.metadata["slices"]}


def test_nrrd_and_metaimage_headers_that_declare_a_huge_volume_are_refused_before_reading(tmp_path):
    import nrrd

    path = tmp_path / "huge.nhdr"
    nrrd.write(str(path), np.zeros((2, 2, 2), np.int16), detached_header=True)
    text = path.read_text().replace("sizes: 2 2 2", "sizes: 4000 4000 4000")
    path.write_text(text)
    with pytest.raises(VolumeReadError, match=r"huge.nhdr: its header declares \(4000, 4000, 4000\) voxels"):
        read_volume(path)
    pytest.importorskip("SimpleITK")
    mhd = tmp_path / "huge.mhd"
    mhd.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 4000\nElementType = MET_SHORT\n"
                   "ElementSpacing = 1 1 1\nElementDataFile = huge.raw\n")
    (tmp_path / "huge.raw").write_bytes(b"\0" * 16)
    with pytest.raises(VolumeReadError, match=r"huge.mhd: its header declares \(4000, 4000, 4000\) voxels"):
        read_volume(mhd)
