"""The demo bundle shipped in the package: loads by default, has every head, is small, records its metrics."""

from __future__ import annotations

import pytest

from napari_mg3d.inference import DEMO_BUNDLE_DIR, Predictor


@pytest.fixture(scope="module")
def demo():
    if not (DEMO_BUNDLE_DIR / "config.json").is_file():
        pytest.skip(f"no demo bundle at {DEMO_BUNDLE_DIR}; make it with python -m training.make_demo_bundle")
    return Predictor(device="cpu")


def test_demo_bundle_is_the_default_and_has_every_output(demo):
    assert demo.capabilities() == {"segmentation": "", "scores": "", "report": "", "heatmaps": ""}
    assert demo.config.preset == "tiny" and len(demo.label_names) == 18
    assert demo.class_names[:3] == ["background", "body", "lung_right"]


def test_demo_bundle_is_small_and_records_how_it_was_made(demo):
    size = sum(f.stat().st_size for f in DEMO_BUNDLE_DIR.rglob("*") if f.is_file())
    assert size <= 25 * 10**6
    meta = demo.bundle.meta
    assert meta["made_by"].startswith("python -m training.make_demo_bundle")
    stages = [p["stage"] for p in meta["provenance_chain"]] + [meta["provenance"]["stage"]]
    assert stages[0] == "pretrain" and "finetune-segment" in stages and stages[-1] == "finetune-report"
    seg = next(p for p in meta["provenance_chain"] if p["stage"] == "finetune-segment")
    assert seg["metrics"]["dice_per_class"]["lung_left"] > 0.8  # organs are learned even by the demo model


def test_demo_prints_the_truth_beside_the_draft_and_ranks_the_true_findings():
    from napari_mg3d.demo import truth_beside_outputs

    summary = {"sample_report": "Cardiomegaly. A nodule.", "report_draft": ["No effusion."],
               "sample_findings": ["Cardiomegaly", "Lung nodule"],
               "scores": {"heading": "Classifier probability",
                          "values": {"Cardiomegaly": 0.9, "Emphysema": 0.6, "Lung nodule": 0.2, "Atelectasis": 0.1}}}
    text = "\n".join(truth_beside_outputs(summary))
    assert text.index("Cardiomegaly. A nodule.") < text.index("drafted by the model:") < text.index("No effusion.")
    assert "  0.90  #1  Cardiomegaly" in text and "  0.20  #3  Lung nodule" in text
    others = text.split("the highest of the other findings")[1]
    assert "0.60  #2  Emphysema" in others and "Cardiomegaly" not in others
    bare = "\n".join(truth_beside_outputs({**summary, "report_draft": [], "scores": {}}))
    assert "drafted by the model: (no report head)" in bare and "rank of" not in bare
