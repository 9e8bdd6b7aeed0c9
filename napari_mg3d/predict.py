"""Run MG-3D on a CT file or DICOM folder and write every output:

    python -m napari_mg3d.predict CT.nii.gz --out results/ [--bundle BUNDLE] [--sentence "..."]...

Writes segmentation.nii.gz and heatmap_NN.nii.gz on the CT's own grid, report.txt, scores.csv/json,
heatmaps.json (file -> sentence), timings.json and result.json (the whole run: the model card, the domain
check's warnings, scores with their source). --out must be empty or new (--overwrite replaces an earlier
export). Input the model was not made for (not CT in Hounsfield units, too few slices, ...) is refused with
the reason; --force runs anyway and records it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .checkpoint import BundleError
from .export import ExportError, check_output_folder, write_result
from .inference import OUTPUTS, Cancelled, Predictor, PredictorError, default_bundle_path
from .io import VolumeReadError, read_volume
from .model_card import summary_line

USER_ERRORS = (PredictorError, BundleError, VolumeReadError, ExportError, FileNotFoundError, PermissionError,
               Cancelled)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m napari_mg3d.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="NIfTI/NRRD/MetaImage file or DICOM folder")
    ap.add_argument("--out", type=Path, required=True, help="output folder (empty or new)")
    ap.add_argument("--bundle", type=Path, default=None, help=f"model bundle (default: {default_bundle_path()})")
    ap.add_argument("--device", default="auto", help="cuda | mps | cpu | auto (default: auto)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="auto: bf16 on CUDA and on CPUs with AMX, else fp32 (default: auto)")
    ap.add_argument("--sentence", action="append", default=None,
                    help="sentence to map (repeatable); default: the drafted report's sentences")
    ap.add_argument("--outputs", nargs="+", default=list(OUTPUTS), choices=OUTPUTS)
    ap.add_argument("--force", action="store_true",
                    help="run on input the domain check refuses (the override is recorded in result.json)")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier MG-3D export in --out")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return ap


def run(a: argparse.Namespace) -> Path:
    check_output_folder(a.out, a.overwrite)  # before the model runs: a bad --out fails at once
    predictor = Predictor(a.bundle, device=a.device, precision=a.precision, allow_out_of_domain=a.force)
    print(f"model: {summary_line(predictor.model_card, predictor.bundle.name)}", flush=True)
    volume = read_volume(a.input)
    result = predictor.run(volume, sentences=a.sentence, outputs=tuple(a.outputs),
                           progress=lambda stage, f: print(f"[{int(100 * f):3d}%] {stage}", flush=True))
    write_result(result, volume, a.out, overwrite=a.overwrite)
    (a.out / "timings.json").write_text(json.dumps(result.timings, indent=1))
    for m in result.messages:
        print(m if m.startswith(("warning:", "override:")) else f"note: {m}")
    for c in result.cautions:
        print(f"caution: {c}")
    print(f"outputs in {a.out.resolve()}")
    return a.out


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    a = build_parser().parse_args(argv)
    try:
        return run(a)
    except USER_ERRORS as err:
        if a.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None



def cli() -> None:
    """The console script: ``main`` without its return value (which the script would print as an error)."""
    main()


if __name__ == "__main__":
    main()
