"""Pre-training step throughput (volumes/s), peak memory and model FLOPs per volume, for every objective on.

One step = forward of all objectives, backward, AdamW update (the work Lightning wraps). Variants of the same
code side by side: eager fp32, bf16 autocast, gradient checkpointing, channels_last_3d, and torch.compile of the
vision encoder (compile time reported as the first step's seconds, never in the timing; FLOPs of compiled
variants are those of the same step counted eagerly).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_mg3d.inference import pick_device
from napari_mg3d.model import ALL_OBJECTIVES, MG3DModel, MG3DPretrainer, preset_config, tokenize_reports
from napari_mg3d.synthetic import generate_sample

from .common import PeakMemory, sync

# dense bf16 tensor-core peak (FLOP/s) of GPUs we may meet, for the utilisation column
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}

VARIANTS = {
    "eager fp32": {"bf16": False, "checkpointing": False, "channels_last": False},
    "bf16 autocast": {"bf16": True, "checkpointing": False, "channels_last": False},
    "bf16 + grad checkpointing": {"bf16": True, "checkpointing": True, "channels_last": False},
    "fp32 + grad checkpointing": {"bf16": False, "checkpointing": True, "channels_last": False},
    "bf16 + channels_last_3d": {"bf16": True, "checkpointing": False, "channels_last": True},
    "bf16 + torch.compile": {"bf16": True, "checkpointing": False, "channels_last": False, "compile": True},
}


def _reports(n: int) -> list[list[str]]:
    return [generate_sample(1000 + i, shape=(24, 32, 40)).sentences for i in range(n)]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def build_step(preset: str, batch: int, v: dict, device: torch.device) -> Callable[[], torch.Tensor]:
    """One pre-training step of ``preset`` at ``batch`` with variant settings ``v`` (a VARIANTS value):
    forward of every objective, backward, AdamW update; returns the detached total loss."""
    torch.manual_seed(0)
    cfg = preset_config(preset, objectives=ALL_OBJECTIVES, gradient_checkpointing=v["checkpointing"])
    pre = MG3DPretrainer(MG3DModel(cfg)).to(device).train()
    if v["channels_last"]:
        pre = pre.to(memory_format=torch.channels_last_3d)
    if v.get("compile"):
        pre.model.vision.compile()
    opt = torch.optim.AdamW([p for _, p in pre.trainable_named_parameters()], lr=1e-4, weight_decay=0.01,
                            fused=device.type == "cuda")
    x = torch.rand(batch, 1, *cfg.input_size, device=device)
    if v["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    text = tokenize_reports(pre.model.text.tokenizer, _reports(batch), cfg.max_words, cfg.max_sentences,
                            cfg.max_sentence_words).to(device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=v["bf16"]):
            out = pre(x, text, torch.Generator().manual_seed(0))
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        opt.step()
        return out["total"].detach()

    return step


def one_setting(preset: str, batch: int, variant: str, device: torch.device, steps: int, warmup: int) -> dict:
    v = VARIANTS[variant]
    step = build_step(preset, batch, v, device)
    t = time.perf_counter()
    step()
    sync(device)
    first_step = time.perf_counter() - t
    for _ in range(warmup):
        step()
    flops = None
    if not v.get("compile"):
        flops = FlopCounterMode(display=False)
        with flops:
            step()
    with PeakMemory() as mem:
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync(device)
        seconds = (time.perf_counter() - t) / steps
    row = {"preset": preset, "batch": batch, "variant": variant, "s_per_step": seconds, "first_step_s": first_step,
           "volumes_per_s": batch / seconds,
           "gflop_per_volume": flops.get_total_flops() / batch / 1e9 if flops else None,
           "peak_rss_gib": mem.peak_rss / 2**30, "peak_gpu_gib": mem.peak_gpu / 2**30 if device.type == "cuda" else None,
           "loss": float(loss)}
    return row


def run(presets=("tiny",), batches=(4, 8), variants=tuple(VARIANTS), device: str = "auto",
        steps: int = 3, warmup: int = 1) -> dict:
    dev = pick_device(device)
    rows = []
    peak = peak_flops(dev)
    for preset in presets:
        for batch in batches:
            eager = None
            for variant in variants:
                try:
                    row = one_setting(preset, batch, variant, dev, steps, warmup)
                except torch.OutOfMemoryError:
                    row = {"preset": preset, "batch": batch, "variant": variant, "error": "out of memory"}
                    torch.cuda.empty_cache()
                except Exception as err:  # e.g. torch.compile without a working compiler: reported, not fatal
                    row = {"preset": preset, "batch": batch, "variant": variant,
                           "error": f"{type(err).__name__}: {err}"[:200]}
                if variant == "eager fp32":
                    eager = row
                if eager and "volumes_per_s" in row and "volumes_per_s" in eager:
                    row["speedup_vs_eager"] = row["volumes_per_s"] / eager["volumes_per_s"]
                    row["gflop_per_volume"] = row["gflop_per_volume"] or eager["gflop_per_volume"]
                    if peak and row["gflop_per_volume"]:
                        row["fraction_of_bf16_peak"] = row["gflop_per_volume"] * 1e9 * row["volumes_per_s"] / peak
                rows.append(row)
                print(row, flush=True)
    return {"rows": rows}
