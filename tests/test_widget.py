"""The napari plugin: manifest, reader, writers, sample data, and the MG-3D dock widget (pytest-qt, Xvfb)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from napari_mg3d._widget import HEATMAP_LAYER, LABELS_LAYER, MG3DWidget  # noqa: E402
from napari_mg3d.io import read_volume  # noqa: E402
from napari_mg3d.labels import LABELS  # noqa: E402
from napari_mg3d.synthetic import generate_sample  # noqa: E402
from napari_mg3d.volume import Volume  # noqa: E402


@pytest.fixture()
def viewer_with_sample(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    from napari_mg3d._layers import volume_to_layer_data

    s = generate_sample(4, shape=(48, 64, 80), findings=["Lung nodule", "Pleural effusion"])
    data, kwargs, _ = volume_to_layer_data(Volume(s.volume, s.affine), name="ct")
    viewer.add_image(data, **kwargs)
    return viewer, s


def _widget(viewer, bundle, qtbot):
    widget = MG3DWidget(viewer)
    widget.bundle_edit.setText(str(bundle))
    widget.device_combo.setCurrentText("cpu")
    viewer.window.add_dock_widget(widget)
    return widget


def _run(widget, qtbot, timeout=120_000):
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


def test_widget_docks_through_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-mg3d", "MG-3D")
    assert isinstance(widget, MG3DWidget)


def test_run_produces_layers_on_the_image_geometry_scores_and_report(viewer_with_sample, gui_bundle, qtbot):
    viewer, _ = viewer_with_sample
    widget = _widget(viewer, gui_bundle, qtbot)
    _run(widget, qtbot)
    image = viewer.layers["ct"]
    labels, heat = viewer.layers[LABELS_LAYER], widget.layers.heatmap_layer
    np.testing.assert_allclose(labels.scale, image.scale)
    np.testing.assert_allclose(labels.translate, image.translate)
    np.testing.assert_allclose(labels.affine.affine_matrix, image.affine.affine_matrix)
    assert labels.data.shape == image.data.shape
    # the heat map stays at model resolution; its transform lands each of its voxels on the same world point
    # as the heat map resampled onto the image grid (what export writes)
    small, to_source = widget.result.heatmap_overlay(0)
    assert heat.data.shape == small.shape and sorted(small.shape) == sorted(widget.predictor.config.input_size)
    corner = np.array(small.shape, float) - 1
    for k in (np.zeros(3), corner, corner / 2):
        np.testing.assert_allclose(heat.data_to_world(k), image.data_to_world((to_source @ [*k, 1.0])[:3]), atol=1e-6)
    assert labels.metadata["class_names"][0] == "background"
    assert tuple(heat.contrast_limits) == (0.0, 1.0)
    assert widget.scores_table.rowCount() == 18
    probs = [widget.scores_table.cellWidget(r, 1).value() for r in range(18)]
    assert probs == sorted(probs, reverse=True)
    assert {widget.scores_table.item(r, 0).text() for r in range(18)} == set(LABELS)
    assert widget.report_edit.toPlainText().strip()
    assert widget.sentence_list.count() == len(widget.result.sentences) > 0
    assert "preprocess + encode" in widget.timing_label.text()
    # running again updates the layers instead of adding new ones
    n = len(viewer.layers)
    _run(widget, qtbot)
    assert len(viewer.layers) == n


def test_selecting_a_sentence_and_typing_one_switch_the_heat_map(viewer_with_sample, gui_bundle, qtbot):
    viewer, _ = viewer_with_sample
    widget = _widget(viewer, gui_bundle, qtbot)
    widget.output_boxes["report"].setChecked(False)
    widget.report_edit.setPlainText("Nodule in the right upper lobe. The heart is enlarged. Left pleural effusion.")
    _run(widget, qtbot)
    assert widget.sentence_list.count() == 3
    first = np.array(widget.layers.heatmap_layer.data)
    widget.sentence_list.setCurrentRow(2)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    second = np.array(widget.layers.heatmap_layer.data)
    assert widget.layers.heatmap_layer.metadata["sentence"] == "Left pleural effusion."
    assert widget.layers.heatmap_layer.name == f"{HEATMAP_LAYER}: Left pleural effusion."
    assert widget.sentence_list.item(2).font().bold() and not widget.sentence_list.item(0).font().bold()
    assert not np.allclose(first, second)
    widget.query_edit.setText("Consolidation in the left lower lobe.")
    start = time.perf_counter()
    widget.query_sentence()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    assert time.perf_counter() - start < 1.0
    assert widget.layers.heatmap_layer.metadata["sentence"] == "Consolidation in the left lower lobe."
    # the typed sentence joins the result, so that it is listed, drawn bold and exported
    assert widget.result.sentences[-1] == "Consolidation in the left lower lobe." and widget.sentence_list.count() == 4
    assert widget.sentence_list.item(3).font().bold() and widget.result.heatmaps_model.shape[0] == 4


def test_cancel_stops_a_run_and_creates_no_layers(viewer_with_sample, gui_bundle, qtbot):
    viewer, _ = viewer_with_sample
    widget = _widget(viewer, gui_bundle, qtbot)
    widget.signals.progress.connect(lambda stage, f: widget.cancel() if stage == "encode" else None)
    _run(widget, qtbot)
    assert widget.status.text() == "cancelled"
    assert LABELS_LAYER not in viewer.layers and widget.run_button.isEnabled()


def test_viewer_stays_responsive_during_a_run(viewer_with_sample, gui_bundle, qtbot):
    from qtpy.QtCore import QTimer

    viewer, _ = viewer_with_sample
    widget = _widget(viewer, gui_bundle, qtbot)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(widget.worker is not None))
    timer.start(20)
    _run(widget, qtbot)
    timer.stop()
    assert sum(ticks) >= 3  # the event loop kept running while the worker was busy


def test_bad_layers_get_a_notification_not_an_exception(make_napari_viewer, gui_bundle, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="flat")
    viewer.add_image(np.zeros((3, 16, 16, 16), np.float32), name="four_d")
    viewer.add_image(np.zeros((16, 16, 3), np.uint8), name="rgb", rgb=True)
    widget = _widget(viewer, gui_bundle, qtbot)
    messages = []
    monkeypatch.setattr("napari_mg3d._widget._notify", lambda kind, msg: messages.append((kind, msg)))
    for name in ("flat", "four_d", "rgb"):
        widget.image_combo.setCurrentText(name)
        widget.run()
    assert widget.worker is None
    assert "2D" in messages[0][1] and "4D" in messages[1][1] and "RGB" in messages[2][1]


def test_the_drafts_denials_are_greyed_with_the_reason_in_the_banner(viewer_with_sample, gui_bundle, qtbot,
                                                                      monkeypatch):
    from napari_mg3d.inference import Predictor

    monkeypatch.setattr(Predictor, "_draft", lambda self, settings: ["Heart size is increased.", "No atelectasis."])
    viewer, _ = viewer_with_sample
    widget = _widget(viewer, gui_bundle, qtbot)
    _run(widget, qtbot)
    finding, denial = widget.sentence_list.item(0), widget.sentence_list.item(1)
    assert widget.report_edit.toPlainText() == "Heart size is increased. No atelectasis."
    assert denial.font().italic() and not finding.font().italic()
    assert "not rule-outs" in denial.toolTip() and not finding.toolTip()
    assert widget.banner.isVisibleTo(widget) and "not rule-outs" in widget.banner.text()


def test_export_writes_nifti_on_source_geometry_report_and_scores(viewer_with_sample, gui_bundle, qtbot, tmp_path):
    viewer, _ = viewer_with_sample
    widget = _widget(viewer, gui_bundle, qtbot)
    _run(widget, qtbot)
    widget.report_edit.setPlainText("Edited by the radiologist.")
    (tmp_path / "earlier.txt").write_text("the user's file")
    target = widget.export(tmp_path)  # off the GUI thread, into a new subfolder: nothing is overwritten
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert target.parent == tmp_path and target.name.startswith("MG-3D ct ")
    names = {f.name for f in target.iterdir()}
    assert {"segmentation.nii.gz", "report.txt", "scores.csv", "scores.json", "heatmap_00.nii.gz", "result.json"} <= names
    seg = read_volume(target / "segmentation.nii.gz")
    np.testing.assert_allclose(seg.affine, np.asarray(viewer.layers["ct"].metadata["mg3d"]["affine"]), atol=1e-5)
    np.testing.assert_array_equal(seg.data.astype(np.int32), viewer.layers[LABELS_LAYER].data)
    assert (target / "report.txt").read_text().strip() == "Edited by the radiologist."
    assert set(json.loads((target / "scores.json").read_text())["scores"]) == set(LABELS)
    assert json.loads((target / "result.json").read_text())["bundle"]["model_card"]["trained_on"]["modality"] == "CT"
    second = widget.export(tmp_path)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert second != target and (tmp_path / "earlier.txt").read_text() == "the user's file"


def test_screenshot_after_run_is_not_blank(viewer_with_sample, gui_bundle, qtbot):
    viewer, _ = viewer_with_sample
    widget = _widget(viewer, gui_bundle, qtbot)
    _run(widget, qtbot)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot[..., :3].std() > 10


def test_reader_opens_real_nifti_and_dicom_with_geometry(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    nifti = viewer.open(str(shared_data / "ct" / "example_ct_sm.nii.gz"), plugin="napari-mg3d")[0]
    dicom = viewer.open(str(shared_data / "ct" / "example_ct_dicom"), plugin="napari-mg3d")[0]
    assert nifti.data.shape == (30, 101, 122) and dicom.data.shape == (20, 512, 512)
    np.testing.assert_allclose(dicom.scale, (2.0, 0.9765625, 0.9765625))
    assert nifti.metadata["mg3d"]["units"] == "HU"
    # the NIfTI is stored RAS: napari gets an affine whose flips show it in (S, P, L) like the DICOM
    m = nifti.affine.affine_matrix
    assert m[1, 1] < 0 and m[2, 2] < 0 and abs(m[0, 0]) == 3.0


def test_writer_contribution_round_trips_a_label_layer(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    from napari_mg3d._layers import volume_to_layer_data

    aff = np.array([[0, 0, -0.7, 5], [0, -0.8, 0, 6], [2.5, 0, 0, 7], [0, 0, 0, 1]], float)
    data, kwargs, _ = volume_to_layer_data(Volume(np.zeros((4, 5, 6), np.float32), aff), name="img")
    image = viewer.add_image(data, **kwargs)
    labels = viewer.add_labels(np.arange(120).reshape(4, 5, 6) % 3, scale=image.scale, translate=image.translate,
                               metadata=image.metadata)
    path = tmp_path / "lab.nii.gz"
    napari.save_layers(str(path), [labels], plugin="napari-mg3d")
    back = read_volume(path)
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    np.testing.assert_array_equal(back.data.astype(int), labels.data)


def test_one_geometry_helper_follows_rotate_and_shear_of_a_layer_without_our_metadata(make_napari_viewer, tmp_path):
    # A layer made by another plugin: no mg3d metadata, only napari's transform. The writer and the widget
    # take its geometry from the same helper, which must agree with napari's own data -> world mapping.
    from napari_mg3d._layers import layer_source_affine, layer_state
    from napari_mg3d._widget_layers import layer_volume
    from napari_mg3d.volume import RAS_TO_NAPARI

    viewer = make_napari_viewer()
    c, s_ = np.cos(0.3), np.sin(0.3)
    rotate = np.array([[1, 0, 0], [0, c, -s_], [0, s_, c]])
    layer = viewer.add_labels(np.arange(120).reshape(4, 5, 6) % 3, scale=(2.0, 0.8, 0.7), translate=(3, -4, 5),
                              rotate=rotate, shear=(0.1, 0.0, 0.2))
    image = viewer.add_image(np.zeros((4, 5, 6), np.float32), scale=(2.0, 0.8, 0.7), translate=(3, -4, 5),
                             rotate=rotate, shear=(0.1, 0.0, 0.2))
    for index in ((0, 0, 0), (3, 4, 5), (1, 2, 3)):
        world = np.asarray(layer.data_to_world(index), float)  # napari's public mapping, (S, P, L) mm
        ras = layer_source_affine(layer_state(layer)) @ np.array([*index, 1.0])
        np.testing.assert_allclose((RAS_TO_NAPARI @ ras)[:3], world, atol=1e-6)
    path = tmp_path / "lab.nii.gz"
    napari.save_layers(str(path), [layer], plugin="napari-mg3d")
    np.testing.assert_allclose(read_volume(path).affine, layer_source_affine(layer_state(layer)), atol=1e-5)
    np.testing.assert_allclose(layer_volume(image).affine, layer_source_affine(layer_state(layer)), atol=1e-9)


def test_sample_data_has_a_report(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-mg3d", "synthetic_chest_ct")
    assert layers[0].metadata["mg3d"]["report"] and layers[0].ndim == 3


def test_closing_the_viewer_during_a_run_stops_the_worker(gui_bundle, qtbot):
    from qtpy.QtCore import QThreadPool

    from napari_mg3d._layers import volume_to_layer_data

    viewer = napari.Viewer(show=True)  # closed by the test itself, so not the fixture's viewer
    s = generate_sample(4, shape=(48, 64, 80))
    data, kwargs, _ = volume_to_layer_data(Volume(s.volume, s.affine), name="ct")
    viewer.add_image(data, **kwargs)
    widget = _widget(viewer, gui_bundle, qtbot)
    event = widget.cancel_event
    widget.run()
    viewer.close()
    qtbot.waitUntil(event.is_set, timeout=10_000)
    assert QThreadPool.globalInstance().waitForDone(60_000)  # nothing hangs


def test_headless_demo_writes_outputs_and_screenshots(gui_bundle, tmp_path):
    import imageio.v3 as iio

    from napari_mg3d.demo import run_demo

    summary = run_demo(tmp_path, gui_bundle, seed=1)
    assert (tmp_path / "segmentation.nii.gz").is_file() and (tmp_path / "scores.csv").is_file()
    seg = read_volume(tmp_path / "segmentation.nii.gz")
    ct = read_volume(tmp_path / "sample_ct.nii.gz")
    assert seg.shape == ct.shape and np.allclose(seg.affine, ct.affine)
    shots = sorted(tmp_path.glob("screenshot_*.png"))
    assert {p.name for p in shots} >= {"screenshot_ct.png", "screenshot_segmentation.png"}
    # a heat map of each finding sentence of the sample's own report, with its lesion outlined
    texts = [s["text"] for s in summary["sentences"]]
    finding_shots = [f"screenshot_heatmap_{texts.index(h['sentence']):02d}.png" for h in summary["pointing"]]
    assert len(finding_shots) == 3 and set(finding_shots) <= {p.name for p in shots}
    for p in shots:
        assert iio.imread(p)[..., :3].std() > 10, p.name
    assert summary["pointing"] and "preprocess + encode" in summary["timings_s"]
    assert summary["sample_findings"] == ["Cardiomegaly", "Lung nodule", "Pleural effusion"]


def test_outputs_a_bundle_cannot_give_are_disabled_with_the_reason(viewer_with_sample, gui_bundle, qtbot, tmp_path):
    from napari_mg3d.checkpoint import load_bundle, save_bundle

    viewer, _ = viewer_with_sample
    bare = save_bundle(tmp_path / "bare", load_bundle(gui_bundle).model)
    widget = _widget(viewer, bare, qtbot)
    widget.report_edit.setPlainText("Nodule in the right upper lobe.")
    widget.output_boxes["report"].setChecked(False)
    _run(widget, qtbot)
    seg = widget.output_boxes["segmentation"]
    assert not seg.isEnabled() and not seg.isChecked() and "no segmentation head" in seg.toolTip()
    assert widget.output_boxes["heatmaps"].isEnabled()
    assert widget.layers.heatmap_layer is not None and LABELS_LAYER not in viewer.layers


def test_after_a_run_the_panel_says_done_shows_the_model_card_and_names_the_scores(viewer_with_sample, gui_bundle, qtbot):
    viewer, _ = viewer_with_sample
    widget = _widget(viewer, gui_bundle, qtbot)
    assert "tiny CT model, chest" in widget.model_card_label.text()
    assert "not validated for clinical use" in widget.model_card_label.text() or "not for clinical" in widget.model_card_label.text()
    _run(widget, qtbot)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)  # the first sentence's heat map too
    assert widget.progress.value() == 100 and widget.status.text() == "done"
    assert widget.scores_table.horizontalHeaderItem(1).text() == widget.result.score_heading
    assert widget.scores_table.horizontalHeaderItem(1).text() != "Probability"
    labels = viewer.layers[LABELS_LAYER]
    assert viewer.layers.index(labels) > viewer.layers.index(viewer.layers["ct"])  # above its image


def test_input_the_model_was_not_made_for_is_refused_on_a_banner_and_warnings_stay_visible(
        make_napari_viewer, gui_bundle, qtbot):
    from napari_mg3d._layers import volume_to_layer_data

    viewer = make_napari_viewer()
    s = generate_sample(4, shape=(48, 64, 80))
    data, kwargs, _ = volume_to_layer_data(Volume(np.clip((s.volume + 1000) / 8, 0, 255), s.affine), name="export8")
    viewer.add_image(data, **kwargs)
    data, kwargs, _ = volume_to_layer_data(Volume(s.volume[:12], s.affine), name="slab")
    viewer.add_image(data, **kwargs)
    widget = _widget(viewer, gui_bundle, qtbot)
    widget.image_combo.setCurrentText("export8")
    _run(widget, qtbot)
    assert not widget.banner.isHidden() and "does not look like CT in Hounsfield units" in widget.banner.text()
    assert widget.result is None and LABELS_LAYER not in viewer.layers
    widget.image_combo.setCurrentText("slab")
    _run(widget, qtbot)
    assert not widget.banner.isHidden() and "covers only" in widget.banner.text()
    assert widget.result is not None and widget.result.domain_warnings


def test_a_new_run_forgets_the_previous_images_results(viewer_with_sample, gui_bundle, qtbot):
    viewer, _ = viewer_with_sample
    widget = _widget(viewer, gui_bundle, qtbot)
    _run(widget, qtbot)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    assert widget.export_button.isEnabled() and widget.sentence_list.count()
    widget.signals.progress.connect(lambda stage, f: widget.cancel() if stage == "encode" else None)
    _run(widget, qtbot)
    assert widget.status.text() == "cancelled"
    assert widget.result is None and not widget.export_button.isEnabled() and widget.sentence_list.count() == 0


def test_the_reader_never_raises_into_napari(tmp_path, monkeypatch):
    from napari_mg3d._reader import napari_get_reader

    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", lambda msg: shown.append(msg))
    corrupt = tmp_path / "scan.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not a volume")
    locked = tmp_path / "locked_series"
    locked.mkdir()
    (locked / "1.dcm").write_bytes(b"x")
    assert napari_get_reader(str(corrupt))(str(corrupt)) == [(None,)]
    assert "MG-3D could not open" in shown[-1] and "scan.nii.gz" in shown[-1]
    import os

    real_iterdir, real_listdir = type(locked).iterdir, os.listdir

    def denied(*_):
        raise PermissionError(13, "Permission denied")

    # root may read anything, so the test plays the refusal a user without permission would get
    monkeypatch.setattr(type(locked), "iterdir", lambda self: denied() if self == locked else real_iterdir(self))
    monkeypatch.setattr(os, "listdir", lambda p=".": denied() if str(p) == str(locked) else real_listdir(p))
    reader = napari_get_reader(str(locked))
    assert reader is not None and reader(str(locked)) == [(None,)]
    assert "locked_series" in shown[-1] and "Permission denied" in shown[-1]


def test_closing_the_panel_cancels_its_run(viewer_with_sample, gui_bundle, qtbot):
    from qtpy.QtCore import QThreadPool

    viewer, _ = viewer_with_sample
    dock, widget = viewer.window.add_plugin_dock_widget("napari-mg3d", "MG-3D")
    widget.bundle_edit.setText(str(gui_bundle))
    widget.device_combo.setCurrentText("cpu")
    event = widget.cancel_event
    widget.run()
    viewer.window.remove_dock_widget(dock)  # what the dock's close button does
    qtbot.waitUntil(event.is_set, timeout=10_000)
    assert QThreadPool.globalInstance().waitForDone(60_000)


def test_progress_reaches_napari_activity_dock(viewer_with_sample, gui_bundle, qtbot, monkeypatch):
    import napari.utils

    bars = []

    class Bar:  # napari.utils.progress, recording what the activity dock would show
        def __init__(self, total, desc):
            self.total, self.desc, self.values, self.closed, self.n = total, desc, [], False, 0
            bars.append(self)

        def set_description(self, text):
            self.values.append((text, self.n))

        def close(self):
            self.closed = True

    monkeypatch.setattr(napari.utils, "progress", Bar)
    viewer, _ = viewer_with_sample
    widget = _widget(viewer, gui_bundle, qtbot)
    _run(widget, qtbot)
    assert len(bars) == 1 and bars[0].total == 100 and bars[0].closed
    assert ("MG-3D: encode", 0) in bars[0].values and any(t == "MG-3D: heatmaps" for t, _ in bars[0].values)


def test_an_updated_segmentation_layer_moves_above_its_newer_image(viewer_with_sample, gui_bundle, qtbot):
    from napari_mg3d._layers import volume_to_layer_data

    viewer, _ = viewer_with_sample
    widget = _widget(viewer, gui_bundle, qtbot)
    _run(widget, qtbot)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    s = generate_sample(6, shape=(48, 64, 80))
    data, kwargs, _ = volume_to_layer_data(Volume(s.volume, s.affine), name="second")
    viewer.add_image(data, **kwargs)  # opened later: on top of the segmentation layer
    widget.image_combo.setCurrentText("second")
    _run(widget, qtbot)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    layers = viewer.layers
    assert layers.index(layers[LABELS_LAYER]) > layers.index(layers["second"])
    assert layers.index(widget.layers.heatmap_layer) > layers.index(layers["second"])
