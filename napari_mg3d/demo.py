"""Headless end-to-end demo on built-in defaults: python -m napari_mg3d.demo

1. generates a synthetic chest CT with a report and writes it as NIfTI;
2. reads it back and runs MG-3D (the shipped demo bundle unless --bundle is given): segmentation,
   abnormality scores, a drafted report and a heat map for every sentence -- of the drafted report and of
   the sample's own report;
3. writes every output on the CT's voxel grid (NIfTI), the report (txt), scores (CSV/JSON), timings, and,
   when a display can be had (Xvfb), PNG screenshots of napari with each overlay and with the MG-3D panel;
4. prints where everything is.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from .export import write_result
from .inference import Predictor, default_bundle_path
from .io import read_volume
from .labels import LABELS
from .model_card import summary_line, synthetic_tier
from .synthetic import generate_sample, save_sample


def _say(msg: str) -> None:
    print(msg, flush=True)


def _start_display():
    """A virtual X display for screenshots, or None (with the reason printed)."""
    if os.environ.get("DISPLAY"):
        return "existing"
    try:
        from pyvirtualdisplay import Display
    except ImportError:
        _say("screenshots skipped: no DISPLAY and pyvirtualdisplay is not installed (pip install 'napari-mg3d[test]')")
        return None
    try:
        display = Display(visible=False, size=(1600, 1000))
        display.start()
        return display
    except Exception as err:  # noqa: BLE001 - any failure just means no screenshots
        _say(f"screenshots skipped: could not start Xvfb ({err}); install it with `make sysdeps`")
        return None


def screenshots(volume, result, sample, out: Path, bundle: Path) -> list[Path]:
    display = _start_display()
    if display is None:
        return []
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    try:
        import napari
    except ImportError:
        _say("screenshots skipped: napari is not installed (pip install 'napari-mg3d[napari]')")
        return []
    from ._layers import TRANSFORM_KEYS, volume_to_layer_data
    from ._widget import MG3DWidget

    for old in out.glob("screenshot_*.png"):  # an earlier demo's pictures in the demo's own folder would mislead
        old.unlink()
    viewer = napari.Viewer(show=True)
    files = []
    try:
        data, kwargs, _ = volume_to_layer_data(volume, name="synthetic chest CT")
        image = viewer.add_image(data, **kwargs)
        lesion = sample.lesion_label_map() > 0
        z = int(np.argmax(lesion.sum((1, 2)))) if lesion.any() else volume.shape[0] // 2
        world = image.data_to_world((z, volume.shape[1] / 2, volume.shape[2] / 2))
        viewer.dims.set_point(0, float(world[0]))
        viewer.window._qt_window.resize(1600, 1000)
        viewer.reset_view()

        from qtpy.QtWidgets import QApplication

        widget = None

        def settle() -> None:  # the widget resamples heat maps in a worker; wait for it
            QApplication.processEvents()
            while widget is not None and widget.worker is not None:
                time.sleep(0.01)
                QApplication.processEvents()

        def shot(name: str, canvas_only: bool = True) -> None:
            settle()
            path = out / f"screenshot_{name}.png"
            viewer.screenshot(str(path), canvas_only=canvas_only, flash=False)
            files.append(path)

        shot("ct")
        # the sample's ground truth as an outline on the image's transform, so each heat map can be judged
        truth = viewer.add_labels(sample.lesion_label_map(), name="true lesions (outline)", opacity=0.9,
                                  **{k: kwargs[k] for k in TRANSFORM_KEYS if k in kwargs})
        truth.contour = 1
        widget = MG3DWidget(viewer)
        widget.bundle_edit.setText(str(bundle))
        viewer.window.add_dock_widget(widget, name="MG-3D")
        widget.show_result(result, image)
        settle()
        for layer in viewer.layers:
            layer.visible = layer is image
        if result.labels is not None:
            viewer.layers["MG-3D segmentation"].visible = True
            shot("segmentation")
            viewer.layers["MG-3D segmentation"].visible = False
        truth.visible = True
        all_lesions = truth.data
        for i in heatmap_shots(result.sentences, sample):
            # the outline of this sentence's own lesions (all of the sample's for a sentence without one), on the
            # slice where they are largest
            linked = _linked_lesions(result.sentences[i], sample)
            outline = all_lesions
            if linked:
                outline = all_lesions * np.logical_or.reduce([sample.lesions[n] for n in linked])
            truth.data = outline
            if outline.any():
                z = int(np.argmax((outline > 0).sum((1, 2))))
                viewer.dims.set_point(0, float(image.data_to_world((z, 0, 0))[0]))
            widget.sentence_list.setCurrentRow(i)
            settle()
            widget.layers.heatmap_layer.visible = True
            viewer.layers.move(viewer.layers.index(truth), len(viewer.layers))  # the outline above the heat map
            shot(f"heatmap_{i:02d}")
        shot("window_with_panel", canvas_only=False)
    finally:
        viewer.close()
        if display != "existing":
            display.stop()
    return files


def _linked_lesions(sentence: str, sample) -> list[str]:
    """The sample's lesions a sentence of its own report describes ([] for any other sentence)."""
    return sample.sentence_links[sample.sentences.index(sentence)] if sentence in sample.sentences else []


def heatmap_shots(sentences: list[str], sample, drafted: int = 1) -> list[int]:
    """Which sentences' heat maps the demo photographs: the first ``drafted`` of the draft (which come first)
    and every sentence of the sample's report that describes a lesion, whose outline the picture shows."""
    first = [i for i in range(min(drafted, len(sentences))) if sentences[i] not in sample.sentences]
    return first + [i for i, s in enumerate(sentences) if _linked_lesions(s, sample)]


DEMO_FINDINGS = ("Lung nodule", "Pleural effusion", "Cardiomegaly")


def demo_sample(seed: int = 0, tier: str = "hard"):
    """The demo's synthetic chest CT: a nodule, a pleural effusion and cardiomegaly, drawn in ``tier``'s style."""
    return generate_sample(seed, findings=list(DEMO_FINDINGS), tier=tier)


def finding_sentence_pointing(sentences: list[str], heatmap, sample) -> list[dict]:
    """For each of ``sentences`` that describes a lesion of ``sample``: does its heat map (``heatmap(i)``, on
    the sample's voxel grid) peak inside that lesion?"""
    hits = []
    for i, sentence in enumerate(sentences):
        linked = _linked_lesions(sentence, sample)
        if linked:
            heat = heatmap(i)
            peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
            hits.append({"sentence": sentence, "peak_in_lesion": bool(any(sample.lesions[n][peak] for n in linked))})
    return hits


def run_demo(out: Path, bundle: Path, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(bundle)
    tier = synthetic_tier(predictor.model_card)
    t0 = time.perf_counter()
    sample = demo_sample(seed, tier)
    row = save_sample(sample, out, "sample")
    (out / "sample_report.txt").write_text(sample.report + "\n")
    volume = read_volume(out / row["volume"])
    t_read = time.perf_counter() - t0
    _say(f"generated and read back a synthetic chest CT ({tier} findings, as the model was trained on): "
         f"{volume.shape} voxels, {tuple(round(s, 2) for s in volume.spacing)} mm; its report: {sample.report}")

    _say(f"model: {summary_line(predictor.model_card, predictor.bundle.name)} ({bundle})")
    outputs = ("segmentation", "scores", "report")  # heat maps below, once, for the draft and the sample's report
    result = predictor.run(volume, outputs=outputs, progress=lambda stage, f: _say(f"  [{int(100 * f):3d}%] {stage}"))
    t = time.perf_counter()
    result.sentences = list(result.report) + list(sample.sentences)
    result.heatmaps_model = predictor.sentence_heatmaps(result.sentences)
    result.timings["heatmaps"] = time.perf_counter() - t
    files = write_result(result, volume, out, overwrite=True)  # the demo's own folder: its earlier outputs go
    shots = screenshots(volume, result, sample, out, bundle)

    hits = finding_sentence_pointing(result.sentences, result.heatmap, sample)
    lesions_found = lesion_overlap(result.labels, result.class_names, sample) if result.labels is not None else None
    # the run's one record (result.json), with what only the demo knows: the sample's truth and the pointing
    summary = {**json.loads((out / "result.json").read_text()),
               "timings_s": {"generate + read": t_read, **result.timings}, "report_draft": result.report,
               "sample_report": sample.report, "sample_tier": tier, "sample_findings": [k for k in LABELS if sample.labels[k]],
               "pointing": hits, "segmented_lesions": lesions_found, "files": [str(f) for f in files + shots]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def lesion_overlap(labels: np.ndarray, class_names: list[str], sample) -> dict | None:
    """The segmentation's lesion voxels (class "lesion" or a finding's name) against the sample's true
    lesions, on the sample's grid: the Dice of the two unions and, per true lesion, the share of its voxels
    labelled as a lesion. Cardiomegaly, a whole-heart finding, is no lesion here. None without lesion classes."""
    lesion_ids = [i for i, n in enumerate(class_names) if n == "lesion" or (n in LABELS and n != "Cardiomegaly")]
    if not lesion_ids:
        return None
    found = np.isin(labels, lesion_ids)
    true: dict[str, np.ndarray] = {}
    for key, mask in sample.lesions.items():  # keyed by the drawing's name; lesion_labels gives the finding
        finding = sample.lesion_labels.get(key, key)
        if finding != "Cardiomegaly" and mask.any():
            true[finding] = true[finding] | mask if finding in true else mask
    union = np.logical_or.reduce(list(true.values())) if true else np.zeros_like(found)
    denominator = int(found.sum() + union.sum())
    return {"dice": 2 * float((found & union).sum()) / denominator if denominator else None,
            "labelled_voxels": int(found.sum()),
            "share_of_each_lesion": {n: float(found[m].mean()) for n, m in true.items()}}


def truth_beside_outputs(summary: dict) -> list[str]:
    """Console lines: the sample's true report beside the draft, and the scores of its true findings (with
    their rank among all findings) beside the highest of the rest, so a reader sees at once what the model
    got right."""
    lines = ["", "the sample's report (the truth the phantom was drawn from):", f"  {summary['sample_report']}"]
    draft = summary.get("report_draft") or []
    denied = {i for i, s in enumerate(summary.get("sentences") or []) if s.get("drafted_denial")}
    lines += (["drafted by the model:", *(f"  {s}{'   (a denial: not a rule-out)' if i in denied else ''}"
                                         for i, s in enumerate(draft))] if draft
              else ["drafted by the model: (no report head)"])
    lines += [f"  {c}" for c in summary.get("cautions") or []]
    values = summary.get("scores", {}).get("values") or {}
    if values:
        ranked = [name for name, _ in sorted(values.items(), key=lambda kv: -kv[1])]
        true = [k for k in summary.get("sample_findings", []) if k in values]
        lines += ["", f"{summary['scores']['heading']} (rank of {len(ranked)}):", "  the sample's findings:"]
        lines += [f"    {values[k]:5.2f}  #{ranked.index(k) + 1:<2d} {k}" for k in true]
        others = [k for k in ranked if k not in true][:3]
        lines += ["  the highest of the other findings (absent from the sample):"]
        lines += [f"    {values[k]:5.2f}  #{ranked.index(k) + 1:<2d} {k}" for k in others]
    found = summary.get("segmented_lesions")
    if found:
        dice = "-" if found["dice"] is None else f"{found['dice']:.2f}"
        lines += ["", f"segmentation: voxels labelled as a lesion against the sample's true lesions: Dice {dice}"]
        lines += [f"  {share:4.0%} of the {name.lower()} labelled" for name, share in found["share_of_each_lesion"].items()]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m napari_mg3d.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("mg3d_demo_output"), help="output folder")
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle (default: the shipped demo bundle)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = run_demo(args.out, args.bundle or default_bundle_path(), args.seed)
    for line in truth_beside_outputs(summary):
        _say(line)
    for m in summary["messages"]:
        _say(f"note: {m}")
    if summary["pointing"]:
        _say("\ndoes each finding sentence's heat map peak inside its lesion?")
        for h in summary["pointing"]:
            _say(f"  [{'yes' if h['peak_in_lesion'] else ' no'}] {h['sentence']}")
    _say("\ntimings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in summary["timings_s"].items()))
    _say(f"\n{len(summary['files'])} files written to {args.out.resolve()} "
         "(segmentation/heat maps as NIfTI on the CT grid, report, scores, screenshots, summary.json)")



def cli() -> None:
    """The console script: ``main`` without its return value (which the script would print as an error)."""
    main()


if __name__ == "__main__":
    main()
