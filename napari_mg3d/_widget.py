"""The MG-3D dock widget. Thin: layout and wiring here, layer handling in :class:`OutputLayers`, inference in
napari_mg3d.inference.Predictor (run off the GUI thread). torch is imported only when a run starts."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ._layers import layer_affine_ras

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)
OUTPUT_LABELS = {"segmentation": "Segmentation", "scores": "Abnormality scores", "report": "Draft report",
                 "heatmaps": "Sentence heat maps"}
HEATMAP_LAYER = "MG-3D heat map"
LABELS_LAYER = "MG-3D segmentation"


def _notify(kind: str, message: str) -> None:
    from napari.utils import notifications

    {"error": notifications.show_error, "warning": notifications.show_warning,
     "info": notifications.show_info}[kind](message)


class OutputLayers:
    """Creates or updates the output layers; each copies the source image layer's transform exactly."""

    def __init__(self, viewer: napari.Viewer) -> None:
        self.viewer = viewer

    @staticmethod
    def transform_of(layer) -> dict:
        return {"scale": layer.scale, "translate": layer.translate, "rotate": layer.rotate, "shear": layer.shear,
                "affine": layer.affine}

    def _upsert(self, name: str, kind: str, data, source, **kwargs):
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = data
            for key, value in {**self.transform_of(source), **kwargs}.items():
                if key not in ("colormap", "blending", "opacity", "features"):
                    setattr(layer, key, value)
            return layer
        add = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
        return add(data, name=name, **self.transform_of(source), **kwargs)

    def show_labels(self, labels: np.ndarray, class_names: list[str], source) -> None:
        layer = self._upsert(LABELS_LAYER, "labels", labels, source, opacity=0.45)
        layer.metadata["class_names"] = list(class_names)
        layer.metadata["mg3d"] = dict(source.metadata.get("mg3d", {}))
        try:  # napari >= 0.4.19: names appear in the status bar on hover
            import pandas as pd

            layer.features = pd.DataFrame({"index": range(len(class_names)), "class": class_names})
        except Exception:  # noqa: BLE001 - features are a nicety; the layer works without them
            pass

    @staticmethod
    def world_matrix(layer) -> np.ndarray:
        """The layer's full data -> world matrix (its scale/translate/rotate/shear, then its affine)."""
        from napari.utils.transforms import Affine

        physical = Affine(scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear)
        return layer.affine.affine_matrix @ physical.affine_matrix

    def show_heatmap(self, heat: np.ndarray, index_to_source: np.ndarray, sentence: str, source) -> None:
        """``heat`` at model resolution; ``index_to_source`` maps its voxel indices to the source image's.
        The layer's affine is the image's world matrix composed with that map, so it overlays the image
        without resampling to the image grid (napari interpolates on display)."""
        identity = {"scale": np.ones(3), "translate": np.zeros(3), "rotate": np.eye(3), "shear": np.zeros(3)}
        affine = self.world_matrix(source) @ index_to_source
        if HEATMAP_LAYER in self.viewer.layers:
            layer = self.viewer.layers[HEATMAP_LAYER]
            layer.data = heat
            for key, value in {**identity, "affine": affine}.items():
                setattr(layer, key, value)
        else:
            layer = self.viewer.add_image(heat, name=HEATMAP_LAYER, affine=affine, colormap="inferno", opacity=0.5,
                                          blending="additive", contrast_limits=(0.0, 1.0), interpolation2d="linear",
                                          interpolation3d="linear")
        layer.contrast_limits = (0.0, 1.0)
        layer.metadata["sentence"] = sentence
        layer.metadata["mg3d"] = dict(source.metadata.get("mg3d", {}))


class _Signals(QObject):
    progress = Signal(str, float)


class MG3DWidget(QWidget):
    """Image picker, bundle, device, outputs, Run/Cancel, scores, report, sentence heat maps, export."""

    _said_cpu = False  # "no GPU" is said once per session, not at every run

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.layers = OutputLayers(napari_viewer)
        self.predictor = None
        self._predictor_key = None
        self.result = None
        self.source_layer = None
        self.worker = None
        self._pending_heatmap = None
        self.cancel_event = threading.Event()
        self.signals = _Signals()
        self.signals.progress.connect(self._on_progress)
        self._build()
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()
        self.destroyed.connect(lambda *_: self.cancel_event.set())

    # ----- layout -----------------------------------------------------------------------------------
    def _build(self) -> None:
        from .inference import available_devices, default_bundle_path

        root = QVBoxLayout(self)
        form = QFormLayout()
        self.image_combo = QComboBox()
        form.addRow("Image", self.image_combo)
        bundle_row = QHBoxLayout()
        self.bundle_edit = QLineEdit(str(default_bundle_path()))
        self.bundle_edit.setToolTip("MG-3D model bundle (a folder or .zip written by training)")
        browse = QPushButton("…")
        browse.setMaximumWidth(32)
        browse.clicked.connect(self._browse_bundle)
        bundle_row.addWidget(self.bundle_edit)
        bundle_row.addWidget(browse)
        form.addRow("Model", bundle_row)
        self.bundle_edit.textChanged.connect(self._reset_outputs)
        self.device_combo = QComboBox()
        self.device_combo.addItems(available_devices())
        form.addRow("Device", self.device_combo)
        root.addLayout(form)

        outputs = QHBoxLayout()
        self.output_boxes = {}
        for key, text in OUTPUT_LABELS.items():
            box = QCheckBox(text)
            box.setChecked(True)
            self.output_boxes[key] = box
            outputs.addWidget(box)
        root.addLayout(outputs)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run MG-3D")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        root.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        root.addWidget(self.progress)
        root.addWidget(self.status)

        scores_box = QGroupBox("Abnormality scores")
        scores_layout = QVBoxLayout(scores_box)
        self.scores_table = QTableWidget(0, 2)
        self.scores_table.setHorizontalHeaderLabels(["Finding", "Probability"])
        self.scores_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.Stretch)
        self.scores_table.verticalHeader().setVisible(False)
        self.scores_source = QLabel("")
        scores_layout.addWidget(self.scores_table)
        scores_layout.addWidget(self.scores_source)
        root.addWidget(scores_box)

        report_box = QGroupBox("Report (editable) and its sentences")
        report_layout = QVBoxLayout(report_box)
        self.report_edit = QPlainTextEdit()
        self.report_edit.setPlaceholderText("The drafted report appears here; edit it freely.")
        self.sentence_list = QListWidget()
        self.sentence_list.currentRowChanged.connect(self._on_sentence_selected)
        report_layout.addWidget(self.report_edit)
        report_layout.addWidget(self.sentence_list)
        query = QHBoxLayout()
        self.query_edit = QLineEdit()
        self.query_edit.setPlaceholderText("Type a sentence to see where it looks…")
        self.query_edit.returnPressed.connect(self.query_sentence)
        query_button = QPushButton("Heat map")
        query_button.clicked.connect(self.query_sentence)
        query.addWidget(self.query_edit)
        query.addWidget(query_button)
        report_layout.addLayout(query)
        root.addWidget(report_box)

        self.export_button = QPushButton("Export…")
        self.export_button.clicked.connect(self._export_dialog)
        self.export_button.setEnabled(False)
        root.addWidget(self.export_button)
        self.timing_label = QLabel("")
        self.timing_label.setWordWrap(True)
        root.addWidget(self.timing_label)

    def _reset_outputs(self, *_) -> None:
        """Another bundle may have other heads: offer every output again until a run says otherwise."""
        for box in getattr(self, "output_boxes", {}).values():
            box.setEnabled(True)
            box.setToolTip("")

    def _browse_bundle(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose an MG-3D bundle folder", self.bundle_edit.text())
        if path:
            self.bundle_edit.setText(path)

    def _refresh_layers(self, *_) -> None:
        from napari.layers import Image

        current = self.image_combo.currentText()
        names = [layer.name for layer in self.viewer.layers
                 if isinstance(layer, Image) and layer.name != HEATMAP_LAYER]
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)

    # ----- input checks -----------------------------------------------------------------------------
    def _source_volume(self):
        """(layer, Volume) of the chosen image, or raise ValueError with what is expected."""
        from napari.layers import Image


        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise ValueError("no image layer chosen: open a CT (File > Open, or File > Open Sample > MG-3D)")
        layer = self.viewer.layers[name]
        if not isinstance(layer, Image):
            raise ValueError(f"layer {name!r} is a {type(layer).__name__} layer; MG-3D needs a grey-value 3D image")
        if layer.rgb:
            raise ValueError(f"layer {name!r} is an RGB image; MG-3D needs a grey-value CT/MR volume in HU")
        if layer.multiscale:
            raise ValueError(f"layer {name!r} is multiscale; open the full-resolution volume")
        if layer.ndim != 3:
            raise ValueError(f"layer {name!r} is {layer.ndim}D; MG-3D needs a 3D volume (z, y, x)"
                             + (" - pick one time point/channel first" if layer.ndim == 4 else ""))
        return self._source_volume_of(layer)

    def _get_predictor(self):
        from .inference import Predictor

        key = (self.bundle_edit.text(), self.device_combo.currentText())
        if self.predictor is None or key != self._predictor_key:
            self.predictor = Predictor(key[0] or None, device=key[1])
            self._predictor_key = key
        return self.predictor

    # ----- run --------------------------------------------------------------------------------------
    def run(self) -> None:
        """Start a run off the GUI thread; results arrive in :meth:`_on_result`."""
        if self.worker is not None:
            _notify("warning", "MG-3D is already running; cancel it first")
            return
        try:
            layer, volume = self._source_volume()
        except ValueError as err:
            _notify("warning", str(err))
            return
        outputs = tuple(k for k, box in self.output_boxes.items() if box.isChecked())
        if not outputs:
            _notify("warning", "choose at least one output")
            return
        self.source_layer = layer
        self.cancel_event.clear()
        report = self.report_edit.toPlainText().strip()
        sentences = None
        if layer.metadata.get("mg3d", {}).get("sentences") and "report" not in outputs:
            sentences = list(layer.metadata["mg3d"]["sentences"])
        elif report and "report" not in outputs:
            from .reports import sentence_texts

            sentences = sentence_texts(report)

        def job():
            predictor = self._get_predictor()
            return predictor.run(volume, sentences=sentences, outputs=outputs, cancel=self.cancel_event,
                                 progress=lambda stage, f: self.signals.progress.emit(stage, f))

        self._start_worker(job, self._on_result)

    def _start_worker(self, job, on_result) -> None:
        from napari.qt.threading import create_worker

        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setValue(0)
        self.status.setText("starting…")
        # errors go to _on_error (a notification), never re-raised into the Qt event loop
        worker = create_worker(job, _start_thread=False, _connect={"returned": on_result, "errored": self._on_error,
                                              "finished": self._on_finished})
        self.worker = worker
        worker.start()

    def cancel(self) -> None:
        self.cancel_event.set()
        self.status.setText("cancelling after the current stage…")

    def _on_progress(self, stage: str, fraction: float) -> None:
        self.progress.setValue(int(100 * fraction))
        self.status.setText(f"{stage}…" if stage != "done" else "done")

    def _on_error(self, err: Exception) -> None:
        from .inference import Cancelled

        if isinstance(err, Cancelled):
            self.status.setText("cancelled")
            _notify("info", "MG-3D run cancelled")
        else:
            self.status.setText(f"error: {err}")
            _notify("error", f"MG-3D: {err}")

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        pending, self._pending_heatmap = self._pending_heatmap, None
        if pending is not None:
            self._heatmap_async(*pending)

    def _on_result(self, result) -> None:
        self.result = result
        source = self.source_layer
        if result.labels is not None:
            self.layers.show_labels(result.labels, result.class_names, source)
        self._show_scores(result.scores, result.score_source)
        if result.report:
            self.report_edit.setPlainText(" ".join(result.report))
        self.sentence_list.clear()
        self.sentence_list.addItems(result.sentences)
        if result.sentences:
            self.sentence_list.setCurrentRow(0)
        for message in result.messages:
            _notify("info", message)
        if self.predictor is not None:  # outputs this bundle cannot give: unticked, greyed out, with the reason
            for key, why in self.predictor.capabilities().items():
                box = self.output_boxes[key]
                box.setEnabled(not why)
                box.setToolTip(why)
                if why:
                    box.setChecked(False)
        self.timing_label.setText("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))
        self.export_button.setEnabled(True)
        self.status.setText("done")
        if not MG3DWidget._said_cpu and self.device_combo.count() == 1:
            MG3DWidget._said_cpu = True
            _notify("info", "MG-3D: no GPU found, running on the CPU")

    def _show_scores(self, scores: dict[str, float], source: str) -> None:
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        self.scores_table.setRowCount(len(ranked))
        for row, (name, p) in enumerate(ranked):
            self.scores_table.setItem(row, 0, QTableWidgetItem(name))
            bar = QProgressBar()
            bar.setRange(0, 1000)
            bar.setValue(int(round(1000 * p)))
            bar.setFormat(f"{p:.2f}")
            self.scores_table.setCellWidget(row, 1, bar)
        self.scores_source.setText(f"source: {source}" if source else "")

    # ----- heat maps --------------------------------------------------------------------------------
    def _on_sentence_selected(self, row: int) -> None:
        if self.result is None or row < 0 or row >= len(self.result.sentences):
            return
        if self.result.heatmaps_model is None:
            return
        result = self.result
        self._heatmap_async(result.sentences[row], lambda: result.heatmap_overlay(row))

    def _heatmap_async(self, sentence: str, compute) -> None:
        """Compute a heat map off the GUI thread (text encoder + one attention step; tens of ms). While
        another job runs, only the latest request is kept and starts when that job ends."""
        if self.worker is not None:
            self._pending_heatmap = (sentence, compute)
            return
        source = self.source_layer
        self._start_worker(lambda: (sentence, compute()),
                           lambda out: self.layers.show_heatmap(*out[1], out[0], source))

    def query_sentence(self) -> None:
        """Heat map for the typed sentence (encoder output is cached: text encoder + one attention step)."""
        sentence = self.query_edit.text().strip()
        if not sentence:
            _notify("warning", "type a sentence first")
            return
        if self.predictor is None or self.result is None:
            _notify("warning", "run MG-3D on an image first; the typed sentence's heat map uses its encoding")
            return
        predictor = self.predictor  # errors in the worker become notifications (_on_error)
        self._heatmap_async(sentence, lambda: predictor.heatmap_overlay(sentence))

    # ----- export -----------------------------------------------------------------------------------
    def _export_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export MG-3D results to…")
        if folder:
            self.export(folder)

    def export(self, folder: str | Path) -> list[Path]:
        """Write labels and heat maps (NIfTI on the source grid), the report (txt, as edited) and scores
        (CSV and JSON) into ``folder``; returns the files written."""
        from .export import write_result

        if self.result is None or self.source_layer is None:
            _notify("warning", "nothing to export yet: run MG-3D first")
            return []
        _, volume = self._source_volume_of(self.source_layer)
        try:
            written = write_result(self.result, volume, folder, report_text=self.report_edit.toPlainText())
        except OSError as err:
            _notify("error", f"MG-3D export to {folder} failed: {err}")
            return []
        _notify("info", f"MG-3D: wrote {len(written)} files to {folder}")
        return written

    def _source_volume_of(self, layer):
        from .volume import Volume

        matrix = None
        try:
            matrix = layer._data_to_world.simplified.affine_matrix  # napari's composed data->world transform
        except AttributeError:
            pass
        return layer, Volume(np.asarray(layer.data, np.float32), layer_affine_ras(layer.metadata, matrix))

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        self.cancel_event.set()
        if self.worker is not None:
            self.worker.quit()
        super().closeEvent(event)
