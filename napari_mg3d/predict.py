"""Run MG-3D on a CT file or DICOM folder and write every output:

    python -m napari_mg3d.predict CT.nii.gz --out results/ [--bundle BUNDLE] [--sentence "..."]...

Writes segmentation.nii.gz and heatmap_NN.nii.gz on the CT's own grid, report.txt, scores.csv/json,
heatmaps.json (file -> sentence) and timings.json.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .export import write_result
from .inference import OUTPUTS, Predictor, default_bundle_path
from .io import read_volume


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    ap = argparse.ArgumentParser(prog="python -m napari_mg3d.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="NIfTI/NRRD/MetaImage file or DICOM folder")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--bundle", type=Path, default=None, help=f"model bundle (default {default_bundle_path()})")
    ap.add_argument("--device", default="auto", help="cuda | mps | cpu | auto")
    ap.add_argument("--sentence", action="append", default=None,
                    help="sentence to map (repeatable); default: the drafted report's sentences")
    ap.add_argument("--outputs", nargs="+", default=list(OUTPUTS), choices=OUTPUTS)
    a = ap.parse_args(argv)
    volume = read_volume(a.input)
    predictor = Predictor(a.bundle, device=a.device)
    result = predictor.run(volume, sentences=a.sentence, outputs=tuple(a.outputs),
                           progress=lambda stage, f: print(f"[{int(100 * f):3d}%] {stage}", flush=True))
    a.out.mkdir(parents=True, exist_ok=True)
    write_result(result, volume, a.out)
    (a.out / "timings.json").write_text(json.dumps(result.timings, indent=1))
    for m in result.messages:
        print(f"note: {m}")
    print(f"outputs in {a.out.resolve()}")
    return a.out


if __name__ == "__main__":
    main()
