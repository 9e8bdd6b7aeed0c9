"""Report drafting: decoding with cached keys and values (the product's path) against recomputing the whole
prefix at every token (what the decoder did before), same decoder, same memory, same output."""

from __future__ import annotations

import time

import torch

from napari_mg3d.model.heads import GenerationSettings, ReportDecoder

# the report decoders of the tiny and base presets (fusion_dim, heads), over a 4x4x4 or 8x6x8 token grid
DECODERS = {"tiny": (128, 4, 64), "base": (256, 8, 384)}


def greedy_by_recomputing(d: ReportDecoder, memory: torch.Tensor, s: GenerationSettings) -> list[int]:
    """Greedy decoding as it was before the cache: the whole prefix through the decoder for every token."""
    seq = torch.tensor([[d.bos_id]])
    for step in range(s.max_len):
        t = int(d._adjust(d(seq, memory, last_only=True)[:, -1], seq, s, step).argmax())
        seq = torch.cat([seq, torch.tensor([[t]])], 1)
        if t == d.eos_id:
            break
    return [t for t in seq[0, 1:].tolist() if t != d.eos_id]


def run(tokens: int = 96, vocab: int = 2000, repeats: int = 3) -> dict:
    rows = []
    s = GenerationSettings(max_len=tokens, min_len=tokens, beams=1, repetition_penalty=1.0, no_repeat_ngram=0)
    for name, (dim, heads, n_tokens) in DECODERS.items():
        torch.manual_seed(0)
        d = ReportDecoder(dim, vocab, 2, heads, 160, 1, 2, 0, 3).eval()
        memory = torch.randn(1, n_tokens, dim)
        times = {}
        with torch.no_grad():
            for label, fn in (("recompute prefix", lambda d=d, m=memory: greedy_by_recomputing(d, m, s)),
                              ("cached keys/values", lambda d=d, m=memory: d.generate(m, s)[0])):
                fn()  # warm
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    out = fn()
                    best = min(best, time.perf_counter() - t0)
                times[label] = (best, out)
        same = times["recompute prefix"][1] == times["cached keys/values"][1]
        rows.append({"decoder": name, "tokens": tokens, "recompute_s": times["recompute prefix"][0],
                     "cached_s": times["cached keys/values"][0],
                     "speedup": times["recompute prefix"][0] / times["cached keys/values"][0], "same_output": same})
    return {"rows": rows, "greedy_tokens": tokens}
