"""python -m napari_mg3d.synthetic OUT_DIR [-n N]: write report-conditioned synthetic chest CTs."""

from __future__ import annotations

from pathlib import Path

from .contact_sheet import contact_sheet
from .dataset import write_dataset
from .sample import generate_sample


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m napari_mg3d.synthetic",
                                     description="Write report-conditioned synthetic chest CTs (NIfTI + manifest.jsonl).")
    parser.add_argument("out_dir", help="folder to write into")
    parser.add_argument("-n", type=int, default=16, help="number of samples (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed+i")
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 128, 160), metavar=("SI", "AP", "LR"),
                        help="voxels (superior-inferior, anterior-posterior, left-right)")
    parser.add_argument("--vary-geometry", action="store_true",
                        help="vary slice count and source orientation between samples")
    parser.add_argument("--tier", default="hard", choices=("hard", "visible"),
                        help="finding style: hard (realistic sizes) or visible (large, contrasted findings)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default 0: in this process)")
    parser.add_argument("--contact-sheet", action="store_true", help="also write contact_sheet.png of 8 samples")
    args = parser.parse_args(argv)
    manifest = write_dataset(args.out_dir, args.n, args.seed, tuple(args.shape), vary_geometry=args.vary_geometry,
                             workers=args.workers, tier=args.tier)
    print(f"wrote {args.n} samples and {manifest}")
    if args.contact_sheet:
        sheet = contact_sheet([generate_sample(args.seed + i, shape=tuple(args.shape), tier=args.tier) for i in range(min(8, args.n))],
                              Path(args.out_dir) / "contact_sheet.png")
        print(f"wrote {sheet}")


if __name__ == "__main__":
    main()
