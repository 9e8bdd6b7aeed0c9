"""Where the time goes: torch.profiler tables of one pre-training step and one model pass.

    python -m bench.profile --what pretrain --preset base --batch 8 --bf16
    python -m bench.profile --what model --preset base --bf16
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile


def _pretrain_step(preset: str, batch: int, bf16: bool, device: torch.device):
    from napari_mg3d.model import ALL_OBJECTIVES, MG3DModel, MG3DPretrainer, preset_config, tokenize_reports

    from . import pretrain

    torch.manual_seed(0)
    cfg = preset_config(preset, objectives=ALL_OBJECTIVES)
    pre = MG3DPretrainer(MG3DModel(cfg)).to(device).train()
    opt = torch.optim.AdamW([p for _, p in pre.trainable_named_parameters()], lr=1e-4, fused=device.type == "cuda")
    x = torch.rand(batch, 1, *cfg.input_size, device=device)
    text = tokenize_reports(pre.model.text.tokenizer, pretrain._reports(batch), cfg.max_words, cfg.max_sentences,
                            cfg.max_sentence_words).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = pre(x, text, torch.Generator().manual_seed(0))
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        opt.step()
    return step


def _model_pass(preset: str, bf16: bool, device: torch.device):
    from napari_mg3d.inference import Predictor

    from .common import bundle_for
    from .model_time import ModelPass

    predictor = Predictor(bundle_for(preset), device=str(device), precision="bf16" if bf16 else "fp32")
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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
