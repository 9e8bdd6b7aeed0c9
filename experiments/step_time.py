"""What does one training step of each encoder shape cost on this CPU? Forward and backward of the vision
encoder (bf16 autocast, a random 64³ batch), the shapes alternated in one process so that a noisy machine
shifts them alike; the median after a warm-up round is reported.

    python -m experiments.step_time --shapes 12:3-6-12-24 12:1-2-4-8 24:1-2-4-8 --threads 1 --batch-size 4

A shape is FEATURE_SIZE:HEADS (attention heads per stage, e.g. 1-2-4-8) on the tiny preset.
"""

from __future__ import annotations

import argparse
import time

import torch

from napari_mg3d.model import MG3DModel
from napari_mg3d.model.config import preset_config


def parse_shape(text: str) -> dict:
    width, _, heads = text.partition(":")
    try:
        shape = {"feature_size": int(width)}
        if heads:
            shape["num_heads"] = tuple(int(h) for h in heads.split("-"))
    except ValueError:
        raise SystemExit(f"--shapes {text!r}: write FEATURE_SIZE:HEADS, e.g. 12:1-2-4-8") from None
    return shape


def step_seconds(shapes: list[str], batch: int = 4, threads: int = 1, rounds: int = 3) -> dict[str, float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.rand(batch, 1, 64, 64, 64)
    models = {s: MG3DModel(preset_config("tiny", conv_stages=0, **parse_shape(s))) for s in shapes}
    times: dict[str, list[float]] = {s: [] for s in shapes}
    for _ in range(rounds + 1):
        for s, model in models.items():
            model.zero_grad()
            t0 = time.perf_counter()
            with torch.autocast("cpu", torch.bfloat16):
                tokens = model.encode_volume(x).tokens.float()
            tokens.square().mean().backward()
            times[s].append(time.perf_counter() - t0)
    return {s: sorted(t[1:])[len(t[1:]) // 2] for s, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(prog="python -m experiments.step_time", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["12:3-6-12-24", "12:1-2-4-8", "24:1-2-4-8", "24:2-4-8-16"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    result = step_seconds(a.shapes, a.batch_size, a.threads, a.rounds)
    first = result[a.shapes[0]]
    for s, t in result.items():
        print(f"{s:>14s}: {t:.2f} s per forward + backward ({first / t:.2f}x the speed of {a.shapes[0]})")
    return result


if __name__ == "__main__":
    main()
