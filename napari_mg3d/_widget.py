"""The MG-3D dock widget: wiring only. Layout in ``_widget_layout`` (the panel's controls), layer handling
in ``_widget_layers`` (output layers on the image's geometry), the run session in ``_widget_session``
(Predictor, worker thread, cancel); inference in napari_mg3d.inference.Predictor."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import QEvent, QObject, Signal
from qtpy.QtWidgets import QFileDialog

from ._widget_layers import HEATMAP_LAYER, LABELS_LAYER, OutputLayers, check_image_layer, layer_volume
from ._widget_layout import MG3DPanel
from ._widget_session import RunSession

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)
__all__ = ["HEATMAP_LAYER", "LABELS_LAYER", "MG3DWidget"]


def _notify(kind: str, message: str) -> None:
    from napari.utils import notifications

    {"error": notifications.show_error, "warning": notifications.show_warning,
     "info": notifications.show_info}[kind](message)


class _Signals(QObject):
    progress = Signal(str, float)


class MG3DWidget(MG3DPanel):
    """Run MG-3D on the chosen image layer and show its segmentation, scores, report and heat maps."""

    _said_cpu = False  # "no GPU" is said once per session, not at every run

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        from .inference import available_devices, default_bundle_path

        super().__init__(available_devices(), str(default_bundle_path()))
        self.viewer = napari_viewer
        self.layers = OutputLayers(napari_viewer)
        self.session = RunSession()
        self.result = None
        self.source_layer = None
        self.signals = _Signals()
        self.signals.progress.connect(self.show_progress)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.sentence_list.currentRowChanged.connect(self._on_sentence_selected)
        self.query_edit.returnPressed.connect(self.query_sentence)
        self.query_button.clicked.connect(self.query_sentence)
        self.export_button.clicked.connect(self._export_dialog)
        self.bundle_edit.textChanged.connect(self._describe_bundle)
        self._describe_bundle()
        self._activity = None  # the run's bar in napari's activity dock
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()
        self.destroyed.connect(lambda *_: self.session.cancel())

    # The session's state, as tests and scripts read it.
    @property
    def predictor(self):
        return self.session.predictor

    @property
    def worker(self):
        return self.session.worker

    @property
    def cancel_event(self):
        return self.session.cancel_event

    def _refresh_layers(self, *_) -> None:
        self.set_image_names(self.layers.image_names())

    def _describe_bundle(self, *_) -> None:
        """The model card of the chosen bundle, under the picker (read from its config.json only)."""
        from .checkpoint import BundleError, read_model_card
        from .inference import default_bundle_path
        from .model_card import summary_line

        path = self.bundle_edit.text() or str(default_bundle_path())
        try:
            name, card = read_model_card(path)
            self.model_card_label.setText(summary_line(card, name))
        except (BundleError, OSError, ValueError) as err:
            self.model_card_label.setText(f"model: {err}")

    def _source_volume(self):
        """(layer, Volume) of the chosen image, or raise ValueError with what is expected."""
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise ValueError("no image layer chosen: open a CT (File > Open, or File > Open Sample > MG-3D)")
        layer = self.viewer.layers[name]
        check_image_layer(layer, name)
        return layer, layer_volume(layer)

    # ----- run --------------------------------------------------------------------------------------
    def run(self) -> None:
        """Start a run off the GUI thread; its result is shown with :meth:`show_result`."""
        if self.session.busy:
            _notify("warning", "MG-3D is already running; cancel it first")
            return
        try:
            layer, volume = self._source_volume()
        except ValueError as err:
            _notify("warning", str(err))
            return
        outputs = self.chosen_outputs()
        if not outputs:
            _notify("warning", "choose at least one output")
            return
        self.source_layer = layer
        self.result = None  # nothing of an earlier image stays clickable or exportable
        self.clear_results()
        self.session.cancel_event.clear()
        sentences = self._sentences_to_map(layer, outputs)
        bundle, device = self.bundle_edit.text(), self.device_combo.currentText()

        def job():
            predictor = self.session.predictor_for(bundle, device)
            return predictor.run(volume, sentences=sentences, outputs=outputs, cancel=self.session.cancel_event,
                                 progress=lambda stage, f: self.signals.progress.emit(stage, f))

        self._start(job, lambda result: self.show_result(result, layer), label="starting…")
        self._open_activity()

    def _sentences_to_map(self, layer, outputs) -> list[str] | None:
        """Without a drafted report: the image's own report (sample data) or the one typed in the panel."""
        if "report" in outputs:
            return None
        if layer.metadata.get("mg3d", {}).get("sentences"):
            return list(layer.metadata["mg3d"]["sentences"])
        report = self.report_edit.toPlainText().strip()
        if report:
            from .reports import sentence_texts

            return sentence_texts(report)
        return None

    def _start(self, job, on_result, label: str = "") -> None:
        self.set_busy(True, label)
        self.session.start(job, on_result, self._on_error, self._on_finished)

    def _open_activity(self) -> None:
        from napari.utils import progress

        self._close_activity()
        self._activity = progress(total=100, desc="MG-3D")
        self.signals.progress.connect(self._advance_activity)

    def _advance_activity(self, stage: str, fraction: float) -> None:
        bar = self._activity  # refreshing the bar runs the event loop, which may close it meanwhile
        if bar is not None:
            bar.n = int(100 * fraction)
            bar.set_description(f"MG-3D: {stage}")

    def _close_activity(self) -> None:
        if self._activity is not None:
            self.signals.progress.disconnect(self._advance_activity)
            self._activity.close()
            self._activity = None

    def cancel(self) -> None:
        self.session.cancel()
        self.status.setText("cancelling after the current stage…")

    def _on_error(self, err: Exception) -> None:
        from .inference import Cancelled, PredictorError

        if isinstance(err, Cancelled):
            self.status.setText("cancelled")
            _notify("info", "MG-3D run cancelled")
            return
        self.status.setText(f"error: {err}")
        if isinstance(err, PredictorError):  # e.g. input the model was not made for: the reasons stay in view
            self.show_banner([f"Not run: {err}"])
        _notify("error", f"MG-3D: {err}")

    def _on_finished(self) -> None:
        self._close_activity()
        self.set_busy(False)
        pending = self.session.take_pending()
        if pending is not None:
            self._heatmap_async(*pending)

    def show_result(self, result, source_layer) -> None:
        """Show a Predictor ``result`` of ``source_layer``'s image: layers, scores, report, sentences."""
        self.result, self.source_layer = result, source_layer
        if result.labels is not None:
            self.layers.show_labels(result.labels, result.class_names, source_layer)
        self.show_scores(result.scores, result.score_source, result.score_heading)
        self.show_banner([*result.domain_warnings, *result.overrides, *result.cautions])
        if result.report:
            self.report_edit.setPlainText(" ".join(result.report))
        self.show_sentences(result.sentences, result.denied_rows, " ".join(result.cautions))
        for message in result.messages:
            if message not in result.domain_warnings and message not in result.overrides:
                _notify("info", message)
        if self.predictor is not None:
            self.limit_outputs(self.predictor.capabilities())
        self.show_timings(result.timings)
        self.export_button.setEnabled(True)
        self.show_progress("done", 1.0)
        if not MG3DWidget._said_cpu and self.device_combo.count() == 1:
            MG3DWidget._said_cpu = True
            _notify("info", "MG-3D: no GPU found, running on the CPU")

    # ----- heat maps --------------------------------------------------------------------------------
    def _on_sentence_selected(self, row: int) -> None:
        result = self.result
        if result is None or row < 0 or row >= len(result.sentences) or result.heatmaps_model is None:
            return
        self._heatmap_async(result.sentences[row], lambda: result.heatmap_overlay(row), row)

    def _heatmap_async(self, sentence: str, compute, row: int | None = None) -> None:
        """Compute a heat map off the GUI thread (text encoder + one attention step; tens of ms). While
        another job runs, only the latest request is kept and starts when that job ends. ``compute`` gives
        the overlay, or (model map, overlay) for a typed sentence, which then joins the result's sentences."""
        if self.session.busy:
            self.session.defer((sentence, compute, row))
            return
        source, result = self.source_layer, self.result

        def shown(out) -> None:
            drawn = row
            overlay = out
            if row is None:  # a typed sentence: kept with the result (exported too) and listed
                model_map, overlay = out
                if result is not self.result:
                    return  # another run has started since
                drawn = result.add_sentence(sentence, model_map)
                self.sentence_list.blockSignals(True)
                self.sentence_list.addItem(sentence)
                self.sentence_list.setCurrentRow(drawn)
                self.sentence_list.blockSignals(False)
            self.layers.show_heatmap(*overlay, sentence, source)
            self.mark_drawn_sentence(drawn)

        self._start(compute, shown)

    def query_sentence(self) -> None:
        """Heat map for the typed sentence (encoder output is cached: text encoder + one attention step)."""
        sentence = self.query_edit.text().strip()
        if not sentence:
            _notify("warning", "type a sentence first")
            return
        if self.predictor is None or self.result is None:
            _notify("warning", "run MG-3D on an image first; the typed sentence's heat map uses its encoding")
            return
        predictor, result = self.predictor, self.result  # errors in the worker become notifications (_on_error)

        def compute():
            model_map = predictor.sentence_heatmaps([sentence])[0]
            return model_map, result.overlay(model_map)

        self._heatmap_async(sentence, compute)

    # ----- export -----------------------------------------------------------------------------------
    def _export_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export MG-3D results into (a new subfolder is made)…")
        if folder:
            self.export(folder)

    def export(self, folder: str | Path) -> Path | None:
        """Write labels and heat maps (NIfTI on the source grid; typed sentences included), the report (as
        edited), the scores and result.json into a new subfolder of ``folder`` named by the image and the
        time, off the GUI thread; nothing is ever overwritten. Returns the subfolder (complete once the
        export job has finished: ``self.worker`` is None)."""
        import time

        from .export import write_result

        if self.result is None or self.source_layer is None:
            _notify("warning", "nothing to export yet: run MG-3D first")
            return None
        result, volume, report = self.result, layer_volume(self.source_layer), self.report_edit.toPlainText()
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.source_layer.name)[:40]
        target = Path(folder) / f"MG-3D {stem} {time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while target.exists():
            n += 1
            target = target.with_name(f"{target.name.split(' #')[0]} #{n}")

        def done(written) -> None:
            self.status.setText(f"exported {len(written)} files to {target}")
            _notify("info", f"MG-3D: wrote {len(written)} files to {target}")

        self._start(lambda: write_result(result, volume, target, report_text=report), done)
        return target

    def event(self, event) -> bool:
        """Closing the panel (napari's close button takes it out of its dock) cancels its run."""
        if event.type() == QEvent.Type.ParentChange and self.parent() is None and self.session.busy:
            self.session.cancel()
        return super().event(event)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        self.session.close()
        self._close_activity()
        super().closeEvent(event)
