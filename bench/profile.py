"""Where the time goes: torch.profiler tables of one pre-training step and one model pass.

    python -m bench.profile --what pretrain --preset base --batch 8 --bf16
    python -m bench.profile --what model --preset base --bf16
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from napari_mg3d.inference import pick_device


def _pretrain_step(preset: str, batch: int, bf16: bool, device: torch.device):
    from . import pretrain

    return pretrain.build_step(preset, batch, pretrain.VARIANTS["bf16 autocast" if bf16 else "eager fp32"], device)


def _model_pass(preset: str, bf16: bool, device: torch.device):
    from napari_mg3d.inference import Predictor

    from .common import bundle_for
    from .model_time import ModelPass

    # the plain path (no CUDA graphs): the profile is for seeing which kernels the pass launches
    predictor = Predictor(bundle_for(preset), device=str(device), precision="bf16" if bf16 else "fp32",
                          cuda_graphs=False)
    run = ModelPass(predictor, bf16, channels_last=False, compile=False)
    x = torch.rand(1, 1, *predictor.config.input_size, device=predictor.device)
    return lambda: run(x)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=["pretrain", "model"], default="pretrain")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args(argv)
    device = pick_device("auto")
    fn = (_pretrain_step(args.preset, args.batch, args.bf16, device) if args.what == "pretrain"
          else _model_pass(args.preset, args.bf16, device))
    for _ in range(2):
        fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    if device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
