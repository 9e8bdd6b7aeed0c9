"""The real CT-RATE layout, read right: a small tree the test writes with CT-RATE's real file layout and
column names (one volume rescaled by its header, one by the metadata, one without a metadata row, one
scanned feet first), through the loader, ``training.check_data`` and a 2-step pre-training."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from napari_mg3d.labels import LABELS
from napari_mg3d.preprocess import PreprocessConfig, preprocess
from napari_mg3d.synthetic import generate_sample
from training import data as D

SHAPE = (40, 48, 56)  # (S-I, A-P, L-R) voxels of the phantom
Z_MM, ROW_MM, COL_MM = 5.0, 0.7, 0.9  # non-square pixels: XYSpacing is [row spacing, column spacing]


def _write_nifti(path, arr_a0a1a2, scl=None):
    """A NIfTI without orientation (qform and sform codes 0), its stored values scaled by ``scl`` (slope,
    intercept) in the header, as a converter writes them (nibabel would rescale on save, so it is patched in)."""
    import gzip
    import shutil

    img = nib.Nifti1Image(np.ascontiguousarray(arr_a0a1a2.transpose(2, 1, 0)), np.eye(4))
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = path.with_name(path.name[: -len(".gz")])
    nib.save(img, str(plain))
    with open(plain, "r+b") as fh:
        header = nib.Nifti1Header.from_fileobj(fh)
        header["qform_code"], header["sform_code"] = 0, 0
        if scl is not None:
            header["scl_slope"], header["scl_inter"] = scl
        fh.seek(0)
        header.write_to(fh)
    with open(plain, "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain.unlink()


@pytest.fixture(scope="module")
def ctrate(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("ctrate")
    hu = np.round(np.clip(generate_sample(5, shape=SHAPE, spacing=(Z_MM, ROW_MM, COL_MM)).volume, -1024, 3071))
    ipp = [-20.0, -15.0, -100.0]  # LPS mm of the first stored voxel
    top = [ipp[0], ipp[1], ipp[2] + (SHAPE[0] - 1) * Z_MM]
    cases = {  # name: (stored values, header scl, metadata row or None)
        "train_1_a_1.nii.gz": ((hu + 1024).astype(np.int16), None, ("1", "-1024", ipp, "HFS")),
        "train_2_a_1.nii.gz": ((hu + 8192).astype(np.int16), (1.0, -8192.0), ("1", "-8192", ipp, "HFS")),
        "train_3_a_1.nii.gz": ((hu + 1024).astype(np.int16), None, None),
        "train_4_a_1.nii.gz": ((hu + 1024).astype(np.int16)[::-1], None, ("1", "-1024", top, "FFS")),
    }
    for name, (stored, scl, _) in cases.items():
        patient = name.rsplit("_", 2)[0]
        _write_nifti(root / "dataset" / "train" / patient / name[: -len("_1.nii.gz")] / name, stored, scl)
    real = next(csv.DictReader(open(shared_data / "reports" / "ct_rate_reports_train.csv", encoding="utf-8")))
    long_text = max((v for v in real.values()), key=len)
    (root / "radiology_text_reports").mkdir()
    with open(root / "radiology_text_reports" / "train_reports.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"])
        for k, name in enumerate(cases):
            findings = long_text if k == 0 else "A 6 mm nodule in the right upper lobe. No pleural effusion."
            w.writerow([name, "Cough.", "Non-contrast chest CT.", findings, "Pulmonary nodule."])
    (root / "metadata").mkdir()
    with open(root / "metadata" / "train_metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing",
                    "ImageOrientationPatient", "ImagePositionPatient", "PatientPosition"])
        for name, (_, _, meta) in cases.items():
            if meta is not None:
                slope, intercept, position, patient_position = meta
                w.writerow([name, slope, intercept, f"[{ROW_MM}, {COL_MM}]", Z_MM, "[1, 0, 0, 0, 1, 0]",
                            str(position), patient_position])
    (root / "multi_abnormality_labels").mkdir()
    with open(root / "multi_abnormality_labels" / "train_predicted_labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["VolumeName", *LABELS])
        for name in cases:
            w.writerow([name, *[int(n == "Lung nodule") for n in LABELS]])
    spec = (f"ctrate:{root / 'dataset' / 'train'},{root / 'radiology_text_reports' / 'train_reports.csv'},"
            f"{root / 'metadata' / 'train_metadata.csv'},{root / 'multi_abnormality_labels' / 'train_predicted_labels.csv'}")
    return root, spec, hu, long_text


def _records(spec):
    return {r.id: r for r in D.ct_rate_records(*spec.partition(":")[2].split(","))}


def test_one_rescale_from_header_or_metadata_and_a_missing_row_is_refused(ctrate, caplog):
    _, spec, hu, _ = ctrate
    with caplog.at_level("WARNING"):
        records = _records(spec)
    assert "1 of 4 volumes have no row" in caplog.text and "train_3_a_1.nii.gz" in caplog.text
    by_metadata = D.load_record_volume(records["train_1_a_1.nii.gz"])
    by_header = D.load_record_volume(records["train_2_a_1.nii.gz"])
    assert by_metadata.metadata["rescale_source"] == "metadata" and by_header.metadata["rescale_source"] == "header"
    for volume in (by_metadata, by_header):  # HU once: air at -1024, not -9216 (a second rescale)
        np.testing.assert_allclose(volume.data, hu, atol=0.5)
    with pytest.raises(ValueError, match="train_3_a_1.nii.gz: its VolumeName has no row in the metadata CSV"):
        D.load_record_volume(records["train_3_a_1.nii.gz"])


def test_xy_spacing_is_row_then_column_and_feet_first_lands_like_head_first(ctrate):
    _, spec, hu, _ = ctrate
    records = _records(spec)
    assert records["train_1_a_1.nii.gz"].spacing == (Z_MM, ROW_MM, COL_MM)
    head, feet = (D.load_record_volume(records[n]) for n in ("train_1_a_1.nii.gz", "train_4_a_1.nii.gz"))
    assert head.metadata["orientation_source"] == feet.metadata["orientation_source"] == "metadata"
    assert head.axcodes == ("S", "P", "L") and feet.axcodes == ("I", "P", "L")
    assert head.spacing == pytest.approx((Z_MM, ROW_MM, COL_MM))
    config = PreprocessConfig(target_size=(32, 32, 32))
    (x_head, r_head), (x_feet, r_feet) = preprocess(head, config), preprocess(feet, config)
    np.testing.assert_allclose(x_head.numpy(), x_feet.numpy(), atol=1e-6)  # the same canonical volume
    np.testing.assert_allclose(r_head.model_affine, r_feet.model_affine, atol=1e-6)
    naive = D.Record(id="x", volume=records["train_4_a_1.nii.gz"].volume, rescale=(1.0, -1024.0))
    x_naive, _ = preprocess(D.load_record_volume(naive), config)  # header only: feet first read as head first
    assert not np.allclose(x_naive.numpy(), x_head.numpy(), atol=1e-3)


def test_check_data_reports_what_pretraining_will_read(ctrate, tmp_path):
    import json

    from training.check_data import main

    _, spec, _, _ = ctrate
    summary = main(["--data", spec, "--out", str(tmp_path / "summary.json"), "--no-progress"])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["records"] == 4 and summary["unreadable"]["count"] == 1
    assert "train_3_a_1.nii.gz" in summary["unreadable"]["first"][0]["path"]
    assert summary["rescale_source"] == {"metadata": 2, "header": 1}
    assert summary["orientation_source"] == {"metadata": 3}
    assert summary["orientation"] == {"SPL": 2, "IPL": 1}
    assert summary["spacing_mm"]["a1"]["median"] == pytest.approx(ROW_MM)
    assert summary["hu_p1"] == pytest.approx(-1024, abs=30) and summary["hu_p99"] > 0
    assert summary["sentences_total"] > 20 and summary["sentences_dropped"] >= 0
    for key in ("records", "unreadable", "sentences_total", "sentences_dropped", "reports_truncated", "hu_p1",
                "hu_p99"):
        assert key in summary


def test_two_steps_of_pretraining_on_the_ctrate_layout(ctrate, tmp_path, tiny_text_encoder_dir, capsys):
    from napari_mg3d.checkpoint import load_bundle
    from training.params import PretrainParams
    from training.pretrain import run

    _, spec, _, _ = ctrate
    bundle = run(PretrainParams(data=spec, max_steps=2, batch_size=2, input_size=[32, 32, 32], num_workers=0,
                                checkpoint_every=1, progress=False, log_every=1, warmup_steps=1,
                                text_encoder=str(tiny_text_encoder_dir), out_dir=str(tmp_path / "run")))
    metrics = load_bundle(bundle).meta["provenance"]["final_metrics"]
    assert metrics["samples_used"] + metrics["samples_skipped"] == 4
    assert metrics["text_sentences"] > 0 and "text_sentences_dropped" in metrics
    assert "report text this run" in capsys.readouterr().out
