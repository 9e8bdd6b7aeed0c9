"""Model time per volume: the network forward passes of one Run MG-3D on an already preprocessed input
(B=1, 1, Z, Y, X) on the model grid: the Swin encoder and fusion tokens, the segmentation decoder, the
abnormality scores and the heat maps of four sentences. Reading, preprocessing, host copies and mapping
labels back to the CT grid are excluded (they are timed per stage in the inference section); the report is
drafted token by token and is timed separately, per generated token.

Variants of the same code side by side: eager fp32, bf16 autocast, bf16 + channels_last decoder, and
bf16 + torch.compile of the encoder and decoder (compile time reported separately, never in the timing), and
bf16 with the encoder and decoder replayed as CUDA graphs (the Predictor's default on a GPU; CUDA only).
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_mg3d.inference import Predictor, pick_device
from napari_mg3d.model.heads import GenerationSettings, use_channels_last
from napari_mg3d.model.text import tokenize_reports

from .common import bundle_for, sync
from .inference import SENTENCES
from .pretrain import peak_flops

VARIANTS = {
    "eager fp32": {"bf16": False, "channels_last": False, "compile": False},
    "bf16 autocast": {"bf16": True, "channels_last": False, "compile": False},
    "bf16 + channels_last decoder": {"bf16": True, "channels_last": True, "compile": False},
    "bf16 + torch.compile": {"bf16": True, "channels_last": True, "compile": True},
    "bf16 + CUDA graphs": {"bf16": True, "channels_last": False, "compile": False, "cuda_graphs": True},
    "fp32 + CUDA graphs": {"bf16": False, "channels_last": False, "compile": False, "cuda_graphs": True},
}


class ModelPass:
    """One volume's forward passes through the encoder and every head, from the preprocessed tensor."""

    def __init__(self, predictor: Predictor, bf16: bool, channels_last: bool, compile: bool) -> None:
        self.device = predictor.device
        self.bf16 = bf16
        self.model = predictor.model
        self.heads = predictor.heads
        use_channels_last(self.heads["segmentation"], channels_last)
        c = predictor.config
        self.text = tokenize_reports(self.model.text.tokenizer, [SENTENCES], c.max_words, len(SENTENCES),
                                     c.max_sentence_words).to(self.device)
        self.encode = self.model.encode_volume
        self.segment = self.heads["segmentation"]
        if predictor.cuda_graphs:
            self.encode = predictor._encode_volume
            self.segment = lambda x, feats: predictor._graphed("segment", self.heads["segmentation"], x, list(feats))
        if compile:
            self.encode = torch.compile(self.model.encode_volume)
            self.segment = torch.compile(self.heads["segmentation"])

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            enc = self.encode(x)
            logits = self.segment(x, enc.features)
            clf = self.heads["classifier"]
            probs = clf.probabilities(clf.classify(enc))
            _, feats = self.model.encode_sentences_separately(self.text)
            heat = self.model.sentence_heatmaps(enc, feats, self.text.sentence_valid)
        return {"labels": logits.argmax(1), "scores": probs.float(), "heat": heat.float()}


def time_call(fn, device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``repeats`` synchronised calls."""
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def one_setting(preset: str, variant: str, device: str, repeats: int) -> tuple[dict, dict]:
    v = VARIANTS[variant]
    predictor = Predictor(bundle_for(preset), device=device, precision="bf16" if v["bf16"] else "fp32",
                          cuda_graphs=v.get("cuda_graphs", False))
    dev = predictor.device
    torch.manual_seed(0)
    x = torch.rand(1, 1, *predictor.config.input_size, device=dev)
    run = ModelPass(predictor, v["bf16"], v["channels_last"], v["compile"])
    t = time.perf_counter()
    out = run(x)  # warm-up (and compilation)
    sync(dev)
    first_call = time.perf_counter() - t
    run(x)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = time_call(lambda: run(x), dev, repeats)
    row = {"preset": preset, "variant": variant, "model_ms": seconds * 1e3, "first_call_s": first_call,
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None}
    if not (v["compile"] or v.get("cuda_graphs")):
        flops = FlopCounterMode(display=False)
        with flops:
            run(x)
        row["gflop"] = flops.get_total_flops() / 1e9
    row.update(_draft_rate(predictor, x, v["bf16"]))
    return row, {k: t.cpu() for k, t in out.items()}


def _draft_rate(predictor: Predictor, x: torch.Tensor, bf16: bool) -> dict:
    """Report drafting (greedy), in ms per generated token: it runs one decoder step per token."""
    if "report" not in predictor.heads:
        return {}
    head = predictor.heads["report"]
    dev = predictor.device
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        tokens = predictor.model.encode_volume(x).tokens
        settings = GenerationSettings(max_len=32)
        head.generate(tokens, settings)
        sync(dev)
        t = time.perf_counter()
        ids = head.generate(tokens, settings)[0]
        sync(dev)
    n = max(1, len(ids) + 1)  # the EOS step counts
    return {"draft_tokens": n, "draft_ms_per_token": (time.perf_counter() - t) * 1e3 / n}


def agreement(ref: dict, out: dict) -> dict:
    return {"label_agreement": float((ref["labels"] == out["labels"]).float().mean()),
            "score_max_abs_diff": float((ref["scores"] - out["scores"]).abs().max()),
            "heat_max_abs_diff": float((ref["heat"] - out["heat"]).abs().max())}


def run(presets=("tiny", "base"), variants=tuple(VARIANTS), device: str = "auto", repeats: int = 10) -> dict:
    rows = []
    dev = pick_device(device)
    peak = peak_flops(dev)
    for preset in presets:
        ref = None
        eager_ms = gflop = None
        for variant in variants:
            try:
                row, out = one_setting(preset, variant, str(dev), repeats)
            except Exception as err:  # a variant that cannot run here (e.g. no compiler) is reported, not fatal
                rows.append({"preset": preset, "variant": variant, "error": f"{type(err).__name__}: {err}"[:200]})
                print(rows[-1], flush=True)
                continue
            if variant == "eager fp32":
                ref, eager_ms = out, row["model_ms"]
            gflop = row.get("gflop", gflop)
            row["gflop"] = gflop
            if ref is not None:
                row.update(agreement(ref, out))
            if eager_ms:
                row["speedup_vs_eager"] = eager_ms / row["model_ms"]
            if peak and gflop:
                row["fraction_of_bf16_peak"] = gflop * 1e9 / (row["model_ms"] / 1e3) / peak
            rows.append(row)
            print(row, flush=True)
    return {"rows": rows, "repeats": repeats}
