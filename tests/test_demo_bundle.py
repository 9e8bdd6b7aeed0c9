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
