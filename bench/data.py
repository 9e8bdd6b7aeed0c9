"""Data loading throughput (volumes/s) of the pre-training loader: NIfTI decoding + preprocessing every time,
against the float16 preprocessed cache, with 0, 2 and N worker processes."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from napari_mg3d.preprocess import PreprocessConfig
from napari_mg3d.synthetic import write_dataset
from training.data import build_dataset, collate

from .common import CACHE


def dataset_dir(n: int, shape) -> Path:
    """``n`` synthetic CTs of ``shape`` as .nii.gz with a manifest, written once."""
    root = CACHE / f"data_{n}_{'x'.join(map(str, shape))}"
    if not (root / "manifest.jsonl").exists():
        write_dataset(root, n, seed=0, shape=tuple(shape), progress=False)
    return root


def throughput(spec: str, pre: PreprocessConfig, cache_dir: str | None, workers: int, batch: int) -> float:
    ds = build_dataset(spec, pre, cache_dir)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate,
                        pin_memory=torch.cuda.is_available(), persistent_workers=False)
    t = time.perf_counter()
    n = 0
    for b in loader:
        n += 0 if b is None else b["volume"].shape[0]
    return n / (time.perf_counter() - t)


def run(n: int = 24, shape=(160, 256, 256), target=(128, 96, 128), workers=None, batch: int = 4) -> dict:
    workers = workers or sorted({0, 2, os.cpu_count() or 2})
    root = dataset_dir(n, shape)
    spec = f"manifest:{root / 'manifest.jsonl'}"
    pre = PreprocessConfig(target_size=tuple(target))
    cache = CACHE / "preprocessed"
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for w in workers:
        rows.append({"source": "NIfTI (.nii.gz) + preprocess", "workers": w,
                     "volumes_per_s": throughput(spec, pre, None, w, batch)})
    throughput(spec, pre, str(cache), 0, batch)  # fill the cache once
    for w in workers:
        rows.append({"source": "float16 cache", "workers": w, "volumes_per_s": throughput(spec, pre, str(cache), w, batch)})
    return {"volumes": {"n": n, "shape": list(shape), "model_input": list(target)}, "rows": rows}
