"""Training-side dataset loaders: manifest, CT-RATE, CTRG-Chest, MSD, synthetic; the preprocessed cache."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_mg3d.labels import LABELS
from napari_mg3d.preprocess import PreprocessConfig
from napari_mg3d.synthetic import write_dataset
from training import data as D

CFG = PreprocessConfig(target_size=(32, 32, 32))


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, 3, seed=0, shape=(40, 48, 56), progress=False)
    return out


def test_manifest_jsonl_gives_model_space_examples(synthetic_dir):
    records = D.manifest_records(synthetic_dir / "manifest.jsonl")
    ds = D.VolumeReportDataset(records, CFG)
    item = ds[0]
    assert item["volume"].shape == (1, 32, 32, 32) and item["volume"].dtype == torch.float32
    assert 0 <= float(item["volume"].min()) and float(item["volume"].max()) <= 1
    assert item["labels"].shape == (18,) and item["mask"].shape == (32, 32, 32)
    row = json.loads((synthetic_dir / "manifest.jsonl").read_text().splitlines()[0])
    assert item["labels"].tolist() == [float(row["labels"][n]) for n in LABELS]
    assert item["sentences"] == row["sentences"]
    present = {LABELS.index(n) + 1 for n, v in row["labels"].items() if v}
    assert set(np.unique(item["mask"].numpy())) - {0} <= present
    batch = D.collate([ds[0], ds[1]])
    assert batch["volume"].shape == (2, 1, 32, 32, 32) and len(batch["sentences"]) == 2


def test_missing_and_unreadable_rows_are_skipped_and_counted(synthetic_dir, tmp_path, caplog):
    rows = [json.loads(line) for line in (synthetic_dir / "manifest.jsonl").read_text().splitlines()]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    manifest = tmp_path / "m.jsonl"
    lines = [dict(rows[0], volume=str(synthetic_dir / rows[0]["volume"]), mask=None),
             dict(rows[1], volume=str(tmp_path / "gone.nii.gz"), mask=None),
             dict(rows[2], volume=str(broken), mask=None)]
    manifest.write_text("\n".join(json.dumps(r) for r in lines))
    ds = D.VolumeReportDataset(D.manifest_records(manifest), CFG, name="m")
    assert len(ds) == 2 and ds.skips.missing == 1
    assert ds[1] is None and ds.skips.unreadable == 1
    batch = D.collate([ds[0], ds[1]])
    assert batch["volume"].shape[0] == 1
    assert "skipping" in caplog.text and "broken.nii.gz" in caplog.text


def test_cache_serves_later_epochs_without_decoding_and_is_keyed_by_parameters(synthetic_dir, tmp_path, monkeypatch):
    records = D.manifest_records(synthetic_dir / "manifest.jsonl")
    ds = D.VolumeReportDataset(records, CFG, cache_dir=tmp_path / "cache")
    first = ds[0]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(D, "read_volume", no_decoding)
    second = ds[0]
    torch.testing.assert_close(first["volume"], second["volume"], atol=1e-3, rtol=0)  # float16 storage
    assert torch.equal(first["mask"], second["mask"])
    other = D.VolumeReportDataset(records, PreprocessConfig(target_size=(32, 32, 64)), cache_dir=tmp_path / "cache")
    with pytest.raises(AssertionError, match="decoded again"):
        other[0]
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_csv_manifest_with_label_columns(tmp_path, synthetic_dir):
    rows = [json.loads(line) for line in (synthetic_dir / "manifest.jsonl").read_text().splitlines()]
    path = tmp_path / "m.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["volume", "report", *LABELS])
        w.writeheader()
        w.writerow({"volume": str(synthetic_dir / rows[0]["volume"]), "report": rows[0]["report"], **rows[0]["labels"]})
    records = D.manifest_records(path, label_names=LABELS)
    assert records[0].labels == [float(rows[0]["labels"][n]) for n in LABELS]


def test_ct_rate_layout_applies_rescale_and_spacing_from_metadata(tmp_path):
    vol_dir = tmp_path / "train" / "train_1" / "train_1_a"
    vol_dir.mkdir(parents=True)
    raw = np.full((40, 40, 40), 1024, np.int16)  # stored value; HU = value - 1024 = 0
    raw[:5] = 24  # -1000 HU
    nib.save(nib.Nifti1Image(raw, np.eye(4)), str(vol_dir / "train_1_a_1.nii.gz"))
    with open(tmp_path / "reports.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["VolumeName", "Findings_EN", "Impressions_EN"])
        w.writerow(["train_1_a_1.nii.gz", "Small nodule in the right upper lobe.", "Nodule."])
    with open(tmp_path / "meta.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"])
        w.writerow(["train_1_a_1.nii.gz", "1", "-1024", "[0.75, 0.75]", "1.5"])
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["VolumeName", *LABELS])
        w.writerow(["train_1_a_1.nii.gz", *[1 if n == "Lung nodule" else 0 for n in LABELS]])
    records = D.ct_rate_records(tmp_path / "train", tmp_path / "reports.csv", tmp_path / "meta.csv", tmp_path / "labels.csv")
    r = records[0]
    assert r.rescale == (1.0, -1024.0) and r.spacing == (1.5, 0.75, 0.75)
    assert r.report == "Small nodule in the right upper lobe. Nodule."
    item = D.VolumeReportDataset(records, PreprocessConfig(target_size=(32, 32, 32), crop_ratios=(1, 1, 1)))[0]
    values = np.unique(np.round(item["volume"].numpy(), 3))
    assert values.min() == 0.0 and 0.5 in values  # -1000 HU -> 0, 0 HU -> 0.5
    assert item["labels"][LABELS.index("Lung nodule")] == 1


def test_ctrg_chest_json_and_msd_dataset_json(tmp_path, shared_data):
    items = json.loads((shared_data / "reports" / "ctrg_chest_reports_train.json").read_text())["train"][:2]
    (tmp_path / "vols").mkdir()
    for it in items:
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(tmp_path / "vols" / it["id"]))
    (tmp_path / "ctrg.json").write_text(json.dumps({"train": items}))
    records = D.ctrg_chest_records(tmp_path / "ctrg.json", tmp_path / "vols")
    assert len(records) == 2 and records[0].report.endswith(items[0]["result"])
    assert D.VolumeReportDataset(records, CFG)[0]["volume"].shape == (1, 32, 32, 32)

    msd = tmp_path / "Task06"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    img = np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[5:15, 5:15, 5:15] = 1
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(msd / "imagesTr" / "lung_001.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(msd / "labelsTr" / "lung_001.nii.gz"))
    (msd / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "cancer"}, "training": [
        {"image": "./imagesTr/lung_001.nii.gz", "label": "./labelsTr/lung_001.nii.gz"}]}))
    records, names = D.msd_records(msd / "dataset.json")
    assert names == ["background", "cancer"]
    item = D.VolumeReportDataset(records, CFG, require_report=False)[0]
    assert item["mask"].shape == (32, 32, 32) and set(np.unique(item["mask"].numpy())) == {0, 1}


def test_synthetic_dataset_is_deterministic():
    ds = D.SyntheticDataset(2, CFG, seed=5, shape=(40, 48, 56))
    a, b = ds[1], ds[1]
    assert torch.equal(a["volume"], b["volume"]) and a["report"] == b["report"]
    assert a["volume"].shape == (1, 32, 32, 32) and a["labels"].sum() >= 1


def test_iterating_a_synthetic_dataset_ends_after_its_items():
    ds = D.SyntheticDataset(2, CFG, seed=5, shape=(40, 48, 56), with_mask=False)
    with pytest.raises(IndexError, match="item 2 of a dataset of 2"):  # first: without the check the loop never ends
        ds[2]
    assert [item["id"] for item in ds] == ["synthetic_5", "synthetic_6"]  # it generated seeds forever before


def test_label_prevalence_comes_from_the_records_or_the_generator_without_loading(synthetic_dir, monkeypatch):
    from napari_mg3d.synthetic import finding_prevalence, generate_sample

    records = D.manifest_records(synthetic_dir / "manifest.jsonl")
    ds = D.VolumeReportDataset(records, CFG)
    monkeypatch.setattr(D.VolumeReportDataset, "__getitem__", lambda self, i: pytest.fail("a volume was loaded"))
    y = np.array([r.labels for r in records])
    assert np.allclose(D.label_prevalence(ds), y.mean(0))
    assert np.allclose(D.label_prevalence(torch.utils.data.Subset(ds, [0, 2])), y[[0, 2]].mean(0))
    one_class = D.label_prevalence(ds, multiclass=True)  # the class the loss takes: the first label set
    assert one_class.sum() == pytest.approx(1) and np.allclose(one_class, np.bincount(y.argmax(1), minlength=18) / 3)
    synthetic = D.SyntheticDataset(10, CFG)
    assert np.allclose(D.label_prevalence(synthetic), finding_prevalence()) and D.label_prevalence(synthetic, True) is None
    monkeypatch.undo()
    # the generator's design: 1-4 of the 18 findings, uniformly, so 2.5 per sample (60 samples: sd 0.14)
    counts = [sum(generate_sample(seed, shape=(24, 32, 40)).labels.values()) for seed in range(60)]
    assert finding_prevalence() == pytest.approx(2.5 / 18) and abs(np.mean(counts) - 2.5) < 0.45


def test_synthetic_spec_takes_a_tier_and_a_bad_one_is_named():
    ds = D.build_dataset("synthetic:3,visible", CFG)
    assert isinstance(ds, D.SyntheticDataset) and len(ds) == 3 and ds.tier == "visible"
    assert D.build_dataset("synthetic:3", CFG).tier == "hard"
    with pytest.raises(ValueError, match="unknown synthetic tier 'easy'"):
        D.build_dataset("synthetic:3,easy", CFG)
    with pytest.raises(ValueError, match="synthetic:N,TIER"):
        D.build_dataset("synthetic:many", CFG)


def test_synthetic_examples_are_made_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    ds = D.SyntheticDataset(2, CFG, seed=5, shape=(40, 48, 56), tier="visible", cache_dir=tmp_path)
    first = ds[1]
    assert len(list((tmp_path / "synthetic").rglob("*.npz"))) == 1
    monkeypatch.setattr(D, "generate_sample", lambda *a, **k: pytest.fail("a cached example was made again"))
    again = D.SyntheticDataset(2, CFG, seed=5, shape=(40, 48, 56), tier="visible", cache_dir=tmp_path)[1]
    # float16 storage: the [0, 1] intensities survive to ~1e-3
    assert torch.allclose(first["volume"], again["volume"], atol=1e-3)
    assert again["report"] == first["report"] and again["sentences"] == first["sentences"]
    assert torch.equal(again["mask"], first["mask"]) and torch.equal(again["labels"], first["labels"])
    monkeypatch.undo()
    other_tier = D.SyntheticDataset(2, CFG, seed=5, shape=(40, 48, 56), cache_dir=tmp_path)[1]
    assert len(list((tmp_path / "synthetic").rglob("*.npz"))) == 2  # the hard tier is its own entry
    assert not torch.allclose(other_tier["volume"], first["volume"], atol=1e-3)
