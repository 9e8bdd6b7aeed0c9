"""The MG-3D panel's layout: its controls and how results are drawn in them. No model logic, no napari."""

from __future__ import annotations

from collections.abc import Collection

from qtpy.QtGui import QColor
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

OUTPUT_LABELS = {"segmentation": "Segmentation", "scores": "Abnormality scores", "report": "Draft report",
                 "heatmaps": "Sentence heat maps"}


class MG3DPanel(QWidget):
    """Image picker, bundle, device, outputs, Run/Cancel, progress, scores, report, sentences, export."""

    def __init__(self, devices: list[str], bundle: str) -> None:
        super().__init__()
        root = QVBoxLayout(self)
        root.addLayout(self._inputs(devices, bundle))
        self.model_card_label = QLabel("")  # what the chosen model is, under the model picker
        self.model_card_label.setWordWrap(True)
        self.model_card_label.setStyleSheet("color: #c9a227;")
        root.addWidget(self.model_card_label)
        self.banner = QLabel("")  # warnings about the input or the model that the user must see
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet("background: #5a1f1f; color: white; padding: 6px; border-radius: 3px;")
        self.banner.setVisible(False)
        root.addWidget(self.banner)
        root.addLayout(self._outputs())
        root.addLayout(self._buttons())
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        root.addWidget(self.progress)
        root.addWidget(self.status)
        root.addWidget(self._scores_box())
        root.addWidget(self._report_box())
        self.export_button = QPushButton("Export…")
        self.export_button.setEnabled(False)
        root.addWidget(self.export_button)
        self.timing_label = QLabel("")
        self.timing_label.setWordWrap(True)
        root.addWidget(self.timing_label)

    # ----- building ---------------------------------------------------------------------------------
    def _inputs(self, devices: list[str], bundle: str) -> QFormLayout:
        form = QFormLayout()
        self.image_combo = QComboBox()
        form.addRow("Image", self.image_combo)
        row = QHBoxLayout()
        self.bundle_edit = QLineEdit(bundle)
        self.bundle_edit.setToolTip("MG-3D model bundle (a folder or .zip written by training)")
        browse = QPushButton("…")
        browse.setMaximumWidth(32)
        browse.clicked.connect(self._browse_bundle)
        row.addWidget(self.bundle_edit)
        row.addWidget(browse)
        form.addRow("Model", row)
        self.bundle_edit.textChanged.connect(self.offer_every_output)
        self.device_combo = QComboBox()
        self.device_combo.addItems(devices)
        form.addRow("Device", self.device_combo)
        return form

    def _outputs(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.output_boxes: dict[str, QCheckBox] = {}
        for key, text in OUTPUT_LABELS.items():
            box = QCheckBox(text)
            box.setChecked(True)
            self.output_boxes[key] = box
            row.addWidget(box)
        return row

    def _buttons(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.run_button = QPushButton("Run MG-3D")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        return row

    def _scores_box(self) -> QGroupBox:
        box = QGroupBox("Abnormality scores")
        layout = QVBoxLayout(box)
        self.scores_table = QTableWidget(0, 2)
        self.scores_table.setHorizontalHeaderLabels(["Finding", "Probability"])
        self.scores_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.Stretch)
        self.scores_table.verticalHeader().setVisible(False)
        self.scores_source = QLabel("")
        layout.addWidget(self.scores_table)
        layout.addWidget(self.scores_source)
        return box

    def _report_box(self) -> QGroupBox:
        box = QGroupBox("Report (editable) and its sentences")
        layout = QVBoxLayout(box)
        self.report_edit = QPlainTextEdit()
        self.report_edit.setPlaceholderText("The drafted report appears here; edit it freely.")
        self.sentence_list = QListWidget()
        layout.addWidget(self.report_edit)
        layout.addWidget(self.sentence_list)
        query = QHBoxLayout()
        self.query_edit = QLineEdit()
        self.query_edit.setPlaceholderText("Type a sentence to see where it looks…")
        self.query_button = QPushButton("Heat map")
        query.addWidget(self.query_edit)
        query.addWidget(self.query_button)
        layout.addLayout(query)
        return box

    def _browse_bundle(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose an MG-3D bundle folder", self.bundle_edit.text())
        if path:
            self.bundle_edit.setText(path)

    # ----- state ------------------------------------------------------------------------------------
    def chosen_outputs(self) -> tuple[str, ...]:
        return tuple(k for k, box in self.output_boxes.items() if box.isChecked())

    def offer_every_output(self, *_) -> None:
        """Another bundle may have other heads: offer every output again until a run says otherwise."""
        for box in self.output_boxes.values():
            box.setEnabled(True)
            box.setToolTip("")

    def limit_outputs(self, capabilities: dict[str, str]) -> None:
        """Outputs the bundle cannot give: unticked, greyed out, with the reason as the tooltip."""
        for key, why in capabilities.items():
            box = self.output_boxes[key]
            box.setEnabled(not why)
            box.setToolTip(why)
            if why:
                box.setChecked(False)

    def set_busy(self, busy: bool, label: str = "") -> None:
        """``label``: a run's first status (the progress bar restarts); empty for a short job (a heat map,
        an export), which leaves the bar as it is."""
        self.run_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        if busy and label:
            self.progress.setValue(0)
            self.status.setText(label)

    def show_banner(self, lines: list[str]) -> None:
        """Warnings the user must see (not only a toast): shown on the panel until the next run."""
        self.banner.setText("\n".join(lines))
        self.banner.setVisible(bool(lines))

    def clear_results(self) -> None:
        """Forget the shown results (a new run starts): nothing of another image stays clickable."""
        self.scores_table.setRowCount(0)
        self.scores_source.setText("")
        self.sentence_list.clear()
        self.export_button.setEnabled(False)
        self.timing_label.setText("")
        self.show_banner([])

    def mark_drawn_sentence(self, row: int) -> None:
        """Bold the sentence whose heat map is drawn."""
        for i in range(self.sentence_list.count()):
            item = self.sentence_list.item(i)
            font = item.font()
            font.setBold(i == row)
            item.setFont(font)

    def show_progress(self, stage: str, fraction: float) -> None:
        self.progress.setValue(int(100 * fraction))
        self.status.setText(f"{stage}…" if stage != "done" else "done")

    def set_image_names(self, names: list[str]) -> None:
        current = self.image_combo.currentText()
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)

    def show_scores(self, scores: dict[str, float], source: str, heading: str = "Probability") -> None:
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        self.scores_table.setHorizontalHeaderLabels(["Finding", heading])
        self.scores_table.setRowCount(len(ranked))
        for row, (name, p) in enumerate(ranked):
            self.scores_table.setItem(row, 0, QTableWidgetItem(name))
            bar = QProgressBar()
            bar.setRange(0, 1000)
            bar.setValue(int(round(1000 * p)))
            bar.setFormat(f"{p:.2f}")
            self.scores_table.setCellWidget(row, 1, bar)
        self.scores_source.setText(f"source: {source}" if source else "")

    def show_sentences(self, sentences: list[str], greyed: Collection[int] = (), why: str = "") -> None:
        """List ``sentences``; rows in ``greyed`` (the draft's denials) are grey and italic, ``why`` their
        tooltip."""
        self.sentence_list.clear()
        self.sentence_list.addItems(sentences)
        for row in greyed:
            item = self.sentence_list.item(row)
            font = item.font()
            font.setItalic(True)
            item.setFont(font)
            item.setForeground(QColor("gray"))
            item.setToolTip(why)
        if sentences:
            self.sentence_list.setCurrentRow(0)

    def show_timings(self, timings: dict[str, float]) -> None:
        self.timing_label.setText("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
