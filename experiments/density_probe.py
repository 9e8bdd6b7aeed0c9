"""Can the encoder tell densities apart? Two uniform regions of different HU through the Swin encoder.

    python -m experiments.density_probe [--preset tiny] [--seed 0]

A volume (the preset's input size) is split into two halves of uniform HU (plus scanner-like noise); each
pair of densities is passed through a randomly initialised encoder, and for the patch embedding and every
stage the mean feature of each half's interior tokens is compared: the cosine distance between the two
halves' mean features, divided by the spread of features within a half (a signal-to-noise ratio; below ~1
a linear read-out cannot tell the halves apart). Both the raw stage outputs and the per-token
LayerNorm'd ones (what MG-3D uses: ``proj_out(x, normalize=True)``) are measured.
"""

from __future__ import annotations

import argparse
import json

import torch

from napari_mg3d.model import preset_config
from napari_mg3d.model.vision import SwinVisionEncoder

PAIRS = {  # (HU a, HU b, what they stand for)
    "heart vs liver": (38, 58),
    "lung vs emphysema": (-850, -950),
    "lung vs ground glass": (-850, -600),
    "soft tissue vs fluid": (40, 5),
    "lung vs soft tissue": (-850, 40),
}


def to_input(hu: torch.Tensor) -> torch.Tensor:
    """The preprocessing contract's intensity step: HU window [-1000, 1000] -> [0, 1]."""
    return ((hu.clamp(-1000, 1000) + 1000) / 2000).float()


@torch.no_grad()
def stage_features(encoder: SwinVisionEncoder, x: torch.Tensor, normalize: bool) -> list[torch.Tensor]:
    swin = encoder.swin
    x0 = swin.pos_drop(swin.patch_embed(x))
    out, h = [swin.proj_out(x0, normalize)], x0
    for layer in (swin.layers1, swin.layers2, swin.layers3, swin.layers4):
        h = layer[0](h.contiguous())
        out.append(swin.proj_out(h, normalize))
    return out


def separation(features: torch.Tensor) -> float:
    """(C, z, y, x) with the halves split on y: |mean_a - mean_b| / mean within-half std (over tokens)."""
    y = features.shape[2]
    border = 1 if y >= 8 else 0  # leave out the tokens next to the edge and to the boundary where there is room
    a = features[:, :, border: y // 2 - border].flatten(1).t()
    b = features[:, :, y // 2 + border: y - border].flatten(1).t()
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    gap = (a.mean(0) - b.mean(0)).norm()
    spread = 0.5 * (a.std(0).norm() + b.std(0).norm())
    return float(gap / spread.clamp_min(1e-12))


def probe(preset: str = "tiny", seed: int = 0, noise_hu: float = 15.0) -> dict:
    torch.manual_seed(seed)
    cfg = preset_config(preset, conv_stages=0)  # the Swin's patch embedding and stages are what this probes
    encoder = SwinVisionEncoder(cfg).eval()
    z, y, x = cfg.input_size
    out: dict = {"preset": preset, "noise_hu": noise_hu, "pairs": {}}
    for name, (a, b) in PAIRS.items():
        hu = torch.empty(1, 1, z, y, x)
        hu[:, :, :, : y // 2], hu[:, :, :, y // 2:] = a, b
        hu += noise_hu * torch.randn_like(hu)
        row = {}
        for normalize in (False, True):
            feats = stage_features(encoder, to_input(hu), normalize)
            row["normalised" if normalize else "raw"] = [separation(f[0]) for f in feats]
        out["pairs"][name] = row
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.density_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise-hu", type=float, default=15.0)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    res = probe(a.preset, a.seed, a.noise_hu)
    print(f"separation (gap between the halves' mean features / spread within a half), {a.preset}, noise {a.noise_hu} HU")
    print(f"{'pair':<24} {'features':<11} " + " ".join(f"{s:>7}" for s in ("embed", "stage1", "stage2", "stage3", "stage4")))
    for name, row in res["pairs"].items():
        for kind, values in row.items():
            print(f"{name:<24} {kind:<11} " + " ".join(f"{v:7.2f}" for v in values))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
