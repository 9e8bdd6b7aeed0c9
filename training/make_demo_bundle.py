"""Make the demo bundle the napari widget and `make demo` use by default:

    python -m training.make_demo_bundle            # ~40 min on 2 CPU cores; minutes on a GPU

Pre-trains the tiny preset on synthetic chest CTs, then fine-tunes, one after another, a segmentation head
(9 organs + 18 findings), a classifier for the 18 CT-RATE abnormalities and a report decoder; validates each
on held-out synthetic volumes, and writes the result (float16, without the pre-training-only heads) to
napari_mg3d/assets/demo_bundle with every stage's metrics in its config.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from napari_mg3d.checkpoint import load_bundle, save_bundle

from . import finetune, pretrain
from .params import PretrainParams

DEST = Path(__file__).resolve().parents[1] / "napari_mg3d" / "assets" / "demo_bundle"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m training.make_demo_bundle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/demo_bundle", help="working folder for the stages")
    ap.add_argument("--out", default=str(DEST), help="where the final bundle goes")
    ap.add_argument("--pairs", type=int, default=2000, help="synthetic volume-report pairs for pre-training")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--finetune-steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--input-size", type=int, nargs=3, default=None, help="override the tiny preset's 64x64x64")
    ap.add_argument("--synthetic-shape", type=int, nargs=3, default=[80, 112, 144])
    ap.add_argument("--text-encoder", default="", help="text encoder (default: the preset's)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--from-bundle", default="", help="skip pre-training and start the fine-tunes from this bundle")
    ap.add_argument("--tasks", nargs="+", default=["segment", "classify", "report"],
                    help="fine-tunes to run, in order (segment, classify, report)")
    a = ap.parse_args(argv)
    work = Path(a.work)
    shape = list(a.synthetic_shape)
    size = list(a.input_size) if a.input_size else None

    bundle = Path(a.from_bundle) if a.from_bundle else pretrain.run(PretrainParams(
        data=f"synthetic:{a.pairs}", max_steps=a.pretrain_steps, batch_size=a.batch_size, input_size=size,
        text_encoder=a.text_encoder, num_workers=a.workers, out_dir=str(work / "pretrain"), synthetic_shape=shape,
        warmup_steps=max(1, a.pretrain_steps // 10), lr_vision=2e-4, lr_fusion=5e-4, checkpoint_every=50,
        log_every=5, progress=False))
    settings = {"segment": {"seg_target": "all", "lr": 1e-3, "lr_encoder": 1e-4},
                "classify": {"lr": 1e-3, "lr_encoder": 5e-5},
                "report": {"lr": 5e-4, "lr_encoder": 0.0, "freeze_encoder": True}}
    stages = [(task, settings[task]) for task in a.tasks]
    for i, (task, extra) in enumerate(stages):
        bundle = finetune.run(finetune.FinetuneParams(
            task=task, bundle=str(bundle), data=f"synthetic:{a.pairs}", val_data="synthetic:16",
            steps=a.finetune_steps, batch_size=max(1, a.batch_size // 2), seed=100 + i, num_workers=a.workers,
            synthetic_shape=shape, out_dir=str(work / task), log_every=10, **extra))

    final = load_bundle(bundle)
    heads, specs = final.build_heads(skip=("mim_decoder", "mlm_head"))  # pre-training heads: not needed
    meta = {**final.meta, "head_specs": specs}
    meta["made_by"] = "python -m training.make_demo_bundle " + " ".join(argv or [])
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    save_bundle(out, final.model, heads=heads, meta=meta, embed_text_encoder=False, dtype=torch.float16)
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"demo bundle: {out} ({size_mb:.1f} MB)")
    print(json.dumps({m["stage"]: m.get("metrics", m.get("final_metrics")) for m in
                      [*meta.get("provenance_chain", []), meta["provenance"]]}, indent=1, default=str)[:3000])
    return out


if __name__ == "__main__":
    main()
