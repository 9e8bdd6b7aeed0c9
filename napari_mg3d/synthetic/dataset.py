"""Synthetic samples on disk: NIfTI volumes and masks, and a ``manifest.jsonl`` the training loaders read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..io import write_nifti
from .phantom import CANONICAL_AXCODES, SyntheticSample
from .sample import generate_sample


def save_sample(sample: SyntheticSample, out_dir: str | Path, name: str) -> dict:
    """Write volume, organ and lesion label maps as NIfTI; returns the manifest row."""
    out_dir = Path(out_dir)
    paths = {}
    write_nifti(out_dir / f"{name}_ct.nii.gz", sample.volume, sample.affine, label=False, dtype=np.int16,
                description="MG-3D synthetic chest CT (HU)")
    paths["ct"] = f"{name}_ct.nii.gz"
    for kind, data in (("organs", sample.organ_label_map()), ("lesions", sample.lesion_label_map())):
        paths[kind] = write_nifti(out_dir / f"{name}_{kind}.nii.gz", data, sample.affine, label=True).name
    return {
        "volume": paths["ct"], "mask": paths["lesions"], "organs": paths["organs"], "report": sample.report,
        "labels": sample.labels, "sentences": sample.sentences, "sentence_links": sample.sentence_links,
        "lesion_labels": sample.lesion_labels, "seed": sample.seed,
    }


GEOMETRY_CHOICES = (("S", "P", "L"), ("L", "P", "S"), ("R", "A", "S"), ("I", "P", "L"))


def _sample_geometry(seed: int, shape: tuple[int, int, int], vary: bool):
    """(shape, axcodes) for sample ``seed``: with ``vary``, slice count x0.75-1.25 and a source orientation
    drawn from GEOMETRY_CHOICES (deterministic per seed)."""
    if not vary:
        return shape, CANONICAL_AXCODES
    rng = np.random.default_rng([seed, 7])
    n_slices = int(round(shape[0] * rng.uniform(0.75, 1.25)))
    return (n_slices, shape[1], shape[2]), GEOMETRY_CHOICES[int(rng.integers(len(GEOMETRY_CHOICES)))]


def _write_one(args) -> dict:
    out_dir, seed, shape, vary, tier = args
    sample_shape, axcodes = _sample_geometry(seed, shape, vary)
    return save_sample(generate_sample(seed, shape=sample_shape, axcodes=axcodes, tier=tier), out_dir, f"synth_{seed:06d}")


def write_dataset(out_dir: str | Path, n: int, seed: int = 0, shape=(96, 128, 160), progress: bool = True,
                  vary_geometry: bool = False, workers: int = 0, tier: str = "hard") -> Path:
    """Write ``n`` samples plus ``manifest.jsonl`` (the training loaders read it). Returns the manifest.

    ``vary_geometry`` varies slice count and source orientation per sample; ``workers`` > 0 uses that many
    processes (the output does not depend on it); ``tier`` is the finding style (hard or visible)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.jsonl"
    jobs = [(out_dir, seed + i, tuple(shape), vary_geometry, tier) for i in range(n)]
    with open(manifest, "w") as fh:
        if workers > 0:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                rows = pool.imap(_write_one, jobs, chunksize=4)
                for row in tqdm(rows, total=n, desc="synthetic CTs", disable=not progress):
                    fh.write(json.dumps(row) + "\n")
        else:
            for job in tqdm(jobs, desc="synthetic CTs", disable=not progress):
                fh.write(json.dumps(_write_one(job)) + "\n")
    return manifest
