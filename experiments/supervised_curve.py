"""What learns the labels most per CPU second? Supervised learning curves of candidate encoders.

    python -m experiments.supervised_curve --arm swin:tiny --steps 1500 --batch-size 8 --eval-every 250
    python -m experiments.supervised_curve --arm swin:tiny:24 ...     # a wider tiny (feature_size 24)
    python -m experiments.supervised_curve --arm swin:tiny:12:1-2-4-8 ...   # the tiny with 1, 2, 4, 8 heads
    python -m experiments.supervised_curve --arm cnn ...              # a plain 3D CNN, the reference learner
    python -m experiments.supervised_curve --arm hybrid:tiny:2 ...    # the tiny Swin, its first 2 stages convolutions

Each arm is trained end to end on the 18 labels of the cached synthetic volumes (seeds 0.., the model input of
the tiny preset, 64³), with AdamW at one learning rate, bf16 autocast and the classifier read-out the product
uses (mean of the volume tokens, per-dimension batch standardisation, a linear layer started at the label
prior). Every ``--eval-every`` steps it records the held-out mean AUC (seeds 900000..), a few findings, the
training loss and the seconds spent, so arms compare at equal CPU time. The volumes are read into memory once,
so the seconds are the encoder's, not the generator's. The CNN (four stages of two 3x3x3 convolutions,
instance norm, GELU, widths 16-128) is not a product option; it shows what a fast learner reaches with the
same samples, which separates "the tier is too hard" from "this encoder learns slowly".
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_mg3d.labels import LABELS
from napari_mg3d.model.config import preset_config
from napari_mg3d.preprocess import preprocess_config_of
from training import metrics
from training.data import SyntheticDataset

from .synthetic_proof import HELD_OUT_SEED

SHOWN = ("Emphysema", "Mosaic attenuation pattern", "Lung nodule", "Consolidation", "Lung opacity")


class SmallCNN(nn.Module):
    """Reference learner: four stride-2 stages of two 3x3x3 convolutions; mean-pooled, standardised, linear."""

    def __init__(self, n_labels: int, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        layers, cin = [], in_channels
        for k in range(4):
            c = width * 2 ** k
            layers += [nn.Conv3d(cin, c, 3, stride=2, padding=1), nn.InstanceNorm3d(c, affine=True), nn.GELU(),
                       nn.Conv3d(c, c, 3, padding=1), nn.GELU()]
            cin = c
        self.features = nn.Sequential(*layers)
        self.bn = nn.BatchNorm1d(cin)
        self.fc = nn.Linear(cin, n_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.features(x).mean((2, 3, 4))))


class SwinClassifier(nn.Module):
    """The product's encoder (MG3DModel.encode_volume) and a read-out of its volume tokens: ``mean`` (the
    finetune --head-norm batch read-out: mean of the tokens, standardised, linear) or ``lse`` (each token
    standardised and scored by one linear layer, the token scores pooled per finding by a log-sum-exp of
    sharpness ``r``: between the mean (r -> 0) and the max (r -> inf), so a lesion in one token of 64 counts)."""

    def __init__(self, n_labels: int, preset: str = "tiny", feature_size: int | None = None,
                 readout: str = "mean", r: float = 4.0, num_heads: tuple[int, ...] | None = None,
                 conv_stages: int = 0) -> None:
        super().__init__()
        from napari_mg3d.model import MG3DModel

        if readout not in ("mean", "lse"):
            raise SystemExit(f"read-out {readout!r}: choose mean or lse")
        overrides = {"feature_size": feature_size} if feature_size else {}
        if num_heads:
            overrides["num_heads"] = tuple(num_heads)
        overrides["conv_stages"] = conv_stages  # the Swin arms stay Swin whatever the preset's default
        self.model = MG3DModel(preset_config(preset, **overrides))
        d = self.model.config.fusion_dim
        self.readout, self.r = readout, r
        self.bn = nn.BatchNorm1d(d)
        self.fc = nn.Linear(d, n_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.encode_volume(x).tokens.float()  # (B, N, d)
        with torch.autocast(x.device.type, enabled=False):  # the read-out in float32
            if self.readout == "mean":
                return self.fc(self.bn(tokens.mean(1)))
            b, n, d = tokens.shape
            scores = self.fc(self.bn(tokens.reshape(b * n, d))).reshape(b, n, -1)
            return (torch.logsumexp(self.r * scores, dim=1) - math.log(n)) / self.r


LUNG_WINDOW_HU = (-1000.0, -200.0)


class LungWindow(nn.Module):
    """Adds a lung-window channel: the [0, 1] input (-1000..1000 HU) re-windowed to -1000..-200 HU."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.fc = net, net.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = LUNG_WINDOW_HU
        lung = ((x * 2000.0 - 1000.0 - lo) / (hi - lo)).clamp(0, 1)
        return self.net(torch.cat([x, lung], dim=1))


def build_arm(arm: str, n_labels: int) -> nn.Module:
    """``cnn``, ``cnn+lung`` (a lung-window channel beside the input), ``hybrid:PRESET:K`` (the Swin with a
    convolutional stem and its first K stages convolutional), ``swin:PRESET``,
    ``swin:PRESET:FEATURE_SIZE`` or ``swin:PRESET:FEATURE_SIZE:HEADS`` (attention heads per stage, e.g.
    1-2-4-8); a Swin arm may end in ``@lse`` for the token read-out."""
    arm, _, readout = arm.partition("@")
    if arm == "cnn":
        return SmallCNN(n_labels)
    if arm == "cnn+lung":
        return LungWindow(SmallCNN(n_labels, in_channels=2))
    if arm.startswith("hybrid:"):
        preset, _, stages = arm.removeprefix("hybrid:").partition(":")
        if stages not in ("1", "2", "3"):
            raise SystemExit(f"--arm {arm!r}: give hybrid:PRESET:K with K = 1..3 convolutional stages")
        return SwinClassifier(n_labels, preset, conv_stages=int(stages))  # the model config's conv_stages
    kind, _, rest = arm.partition(":")
    if kind != "swin" or not rest:
        raise SystemExit(f"--arm {arm!r}: choose cnn, swin:PRESET or swin:PRESET:FEATURE_SIZE")
    preset, _, shape = rest.partition(":")
    width, _, heads = shape.partition(":")
    try:
        num_heads = tuple(int(h) for h in heads.split("-")) if heads else None
        return SwinClassifier(n_labels, preset, int(width) if width else None, readout or "mean", num_heads=num_heads)
    except ValueError as err:
        raise SystemExit(f"--arm {arm!r}: {err}") from None


def load_volumes(n: int, seed: int, tier: str, cache_dir: str | None, shape=(80, 112, 144)):
    """(volumes (n, 1, 64, 64, 64) float16, labels (n, 18)) of the tiny preset's input."""
    config = preprocess_config_of(None, preset_config("tiny"))
    data = SyntheticDataset(n, config, seed=seed, shape=tuple(shape), with_mask=False, tier=tier, cache_dir=cache_dir)
    items = [data[i] for i in range(n)]
    return torch.stack([it["volume"] for it in items]).half(), torch.stack([it["labels"] for it in items])


@torch.no_grad()
def held_out_auc(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 20) -> dict:
    net.eval()
    with torch.autocast("cpu", torch.bfloat16):
        scores = torch.cat([net(x[i:i + batch].float()).float() for i in range(0, len(x), batch)]).numpy()
    net.train()
    per = metrics.auc_per_label(y.numpy(), scores, LABELS)
    boot = metrics.bootstrap_mean_auc(y.numpy(), scores, LABELS, n=500)
    return {"mean_auc": float(np.mean(list(per.values()))), "se": (boot["high"] - boot["low"]) / 3.92,
            "auc_per_finding": per}


def curve(arm: str, steps: int, batch: int, lr: float, eval_every: int, n_train: int, n_test: int, tier: str,
          cache_dir: str | None, seed: int = 0, weights: str | Path = "", out: str | Path = "",
          schedule: str = "constant", warmup: int = 0, checkpoint: str | Path = "") -> dict:
    """Train ``arm`` for ``steps`` and evaluate every ``eval_every``. ``schedule``: ``constant`` lr, or ``cosine``
    (linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``). With ``checkpoint``, the run's
    state is saved there at every evaluation and, if the file exists, the run continues from it."""
    from training.module import lr_lambda

    torch.manual_seed(seed)
    x_train, y_train = load_volumes(n_train, 0, tier, cache_dir)
    x_test, y_test = load_volumes(n_test, HELD_OUT_SEED, tier, cache_dir)
    net = build_arm(arm, len(LABELS))
    prior = y_train.mean(0).clamp(0.01, 0.99)
    with torch.no_grad():
        net.fc.bias.copy_(torch.log(prior / (1 - prior)))
    params = [p for n, p in net.named_parameters() if not n.startswith("model.text.")]  # the frozen text encoder
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if schedule not in ("constant", "cosine"):
        raise SystemExit(f"--schedule {schedule!r}: choose constant or cosine")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, steps) if schedule == "cosine" else lambda _: 1.0)
    order = torch.Generator().manual_seed(seed)
    points, losses, spent, start = [], [], 0.0, 1
    settings = {"arm": arm, "tier": tier, "batch_size": batch, "lr": lr, "schedule": schedule, "warmup": warmup,
                "steps": steps, "n_train": n_train, "n_test": n_test, "seed": seed}
    provenance = {"auc": "ranks"}  # AUCs from ranks (training.metrics.auc since 2026-12-06), not squashed logits
    if checkpoint and Path(checkpoint).exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["settings"] != settings:
            raise SystemExit(f"{checkpoint} was saved by a run with other settings ({state['settings']}); "
                             "delete it or rerun with those settings")
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        order.set_state(state["order"])
        points, losses, spent, start = state["points"], state["losses"], state["spent"], state["step"] + 1
        print(f"{arm}: resumed from {checkpoint} at step {state['step']}", flush=True)
    net.train()
    for step in range(start, steps + 1):
        t0 = time.perf_counter()
        idx = torch.randint(0, n_train, (batch,), generator=order)
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.binary_cross_entropy_with_logits(net(x_train[idx].float()).float(), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        spent += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise SystemExit(f"{arm}: the training loss is {losses[-1]} at step {step}; stopped (a diverged run "
                             "decides nothing)")
        if step % 25 == 0:
            print(f"{arm} step {step} ({spent:.0f} s) loss {np.mean(losses[-25:]):.4f}", flush=True)
        if step % eval_every == 0 or step == steps:
            r = held_out_auc(net, x_test, y_test)
            points.append({"step": step, "samples": step * batch, "train_seconds": round(spent, 1),
                           "train_loss": float(np.mean(losses[-eval_every:])), **r})
            print(f"{arm} step {step} ({spent:.0f} s) loss {points[-1]['train_loss']:.4f} held-out mean AUC "
                  f"{r['mean_auc']:.3f} ± {r['se']:.3f}; " + ", ".join(f"{k} {r['auc_per_finding'].get(k, float('nan')):.2f}" for k in SHOWN), flush=True)
            if out:  # the curve so far, so a stopped run keeps its points
                _write(out, {**settings, **provenance, "seconds_per_step": spent / step, "curve": points})
            if checkpoint:
                Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
                torch.save({"settings": settings, "net": net.state_dict(), "opt": opt.state_dict(),
                            "sched": sched.state_dict(), "order": order.get_state(), "points": points,
                            "losses": losses, "spent": spent, "step": step}, checkpoint)
    if weights:
        torch.save(net.state_dict(), weights)
    return {**settings, **provenance, "seconds_per_step": spent / steps, "curve": points}


def _write(path: str | Path, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.supervised_curve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", default="swin:tiny", help="cnn | cnn+lung | swin:PRESET | swin:PRESET:FEATURE_SIZE")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--train", type=int, default=2000, help="training volumes (seeds 0..), drawn with replacement")
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--tier", default="visible", choices=("hard", "visible"))
    ap.add_argument("--cache-dir", default="runs/cache")
    ap.add_argument("--out", default="")
    ap.add_argument("--weights", default="", help="save the trained network's state dict here")
    ap.add_argument("--schedule", default="cosine", choices=("constant", "cosine"),
                    help="cosine: linear warm-up over --warmup steps, then cosine decay to 0 at --steps")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--checkpoint", default="",
                    help="save the run's state here at every evaluation; an existing file is resumed from")
    a = ap.parse_args(argv)
    r = curve(a.arm, a.steps, a.batch_size, a.lr, a.eval_every, a.train, a.held_out, a.tier, a.cache_dir or None,
              weights=a.weights, out=a.out, schedule=a.schedule, warmup=a.warmup, checkpoint=a.checkpoint)
    if a.out:
        _write(a.out, r)
    return r


if __name__ == "__main__":
    main()
