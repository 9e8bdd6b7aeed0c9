"""Shared pieces of the benchmarks: machine description, peak-memory sampling, timers, test volumes, bundles."""

from __future__ import annotations

import os
import platform
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

CACHE = Path(os.environ.get("MG3D_BENCH_CACHE", Path(__file__).parent / ".cache"))


def machine() -> dict:
    """Where the numbers come from."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu": _cpu_name(), "device": "cpu"}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Peak RSS (sampled every ``interval`` s in a thread) and peak CUDA memory within a ``with`` block."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_rss = 0
        self.start_rss = 0
        self.peak_gpu = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self.start_rss = self.peak_rss = rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak_gpu = torch.cuda.max_memory_allocated()
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, rss_bytes())


@contextmanager
def stage(rows: list[dict], name: str, **fields):
    """Time a block (wall clock, CUDA synchronised) and record its peak memory as one row."""
    with PeakMemory() as mem:
        t = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    rows.append({"stage": name, "seconds": seconds, "peak_rss_gib": mem.peak_rss / 2**30,
                 "start_rss_gib": mem.start_rss / 2**30,
                 "peak_gpu_gib": mem.peak_gpu / 2**30 if torch.cuda.is_available() else None, **fields})


def synthetic_ct(shape=(300, 512, 512)) -> Path:
    """A synthetic chest CT of ``shape`` (slices, rows, columns) written once as int16 .nii.gz and reused."""
    import nibabel as nib

    from napari_mg3d.synthetic import generate_sample

    path = CACHE / f"ct_{'x'.join(map(str, shape))}.nii.gz"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        s = generate_sample(11, shape=tuple(shape), spacing=(1.0, 0.7, 0.7), findings=["Lung nodule", "Pleural effusion"])
        hu = np.clip(np.round(s.volume), -1024, 3071).astype(np.int16)  # stored like scanner output
        img = nib.Nifti1Image(np.transpose(hu, (2, 1, 0)), s.affine[:, [2, 1, 0, 3]])
        img.set_sform(img.affine, code=1)
        img.set_qform(img.affine, code=1)
        tmp = CACHE / f"tmp_{path.name}"
        nib.save(img, str(tmp))
        tmp.replace(path)
    return path


def bundle_for(preset: str) -> Path:
    """A bundle of ``preset`` with the demo bundle's heads (segmentation of 28 classes, 18-label classifier,
    report decoder). The tiny preset is the trained demo bundle; other presets are randomly initialised —
    timings and memory do not depend on the weights, except that random report heads always draft the
    maximum length (the slowest case)."""
    from napari_mg3d.checkpoint import load_bundle, save_bundle
    from napari_mg3d.inference import DEMO_BUNDLE_DIR
    from napari_mg3d.model import MG3DModel, preset_config
    from napari_mg3d.model.heads import build_head

    if preset == "tiny":
        return DEMO_BUNDLE_DIR
    path = CACHE / f"bundle_{preset}"
    if not path.exists():
        demo = load_bundle(DEMO_BUNDLE_DIR)
        torch.manual_seed(0)
        model = MG3DModel(preset_config(preset))
        specs = demo.meta["head_specs"]
        heads = {name: build_head(spec, model.config, model.text.vocab_size) for name, spec in specs.items()}
        meta = {k: v for k, v in demo.meta.items() if k in ("labels", "classes", "head_specs")}
        meta["preprocessing"] = {**demo.meta["preprocessing"], "target_size": list(model.config.input_size)}
        meta["made_by"] = "bench/common.py: random initialisation, for timing only"
        save_bundle(path, model, heads=heads, meta=meta)
    return path


def fmt_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table of ``rows`` with (key, title) columns; floats to 3 significant places."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(t for _, t in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)
