"""Is fused attention (scaled_dot_product_attention) faster than MONAI's explicit softmax in a *training*
step on the CPU? One forward and backward of the tiny encoder, batch 4, bf16 autocast, one thread, both
paths alternated in one process (the ratio is what counts on a noisy machine); also how far the outputs and
gradients differ.

    python -m experiments.sdpa_training_step
"""

from __future__ import annotations

import time

import monai.networks.nets.swin_unetr as swin
import torch
import torch.nn.functional as F

from napari_mg3d.model import MG3DModel
from napari_mg3d.model.config import preset_config

EXPLICIT = swin.WindowAttention.forward


def fused_forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MONAI's window attention with the relative-position bias (and shift mask) as SDPA's additive mask."""
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    index = self.relative_position_index[:n, :n].reshape(-1)
    bias = self.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1)
    if mask is None:
        bias = bias.unsqueeze(0)
    else:
        nw = mask.shape[0]
        bias = bias.view(1, 1, self.num_heads, n, n) + mask.reshape(1, nw, 1, n, n)
        bias = bias.expand(b // nw, nw, self.num_heads, n, n).reshape(b, self.num_heads, n, n)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


def main(reps: int = 3) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MG3DModel(preset_config("tiny", conv_stages=0))  # the Swin's attention is what this measures
    model.vision.use_fused_attention(False)
    x = torch.rand(4, 1, 64, 64, 64)
    probe = model.vision.swin.layers1[0].blocks[0].attn.qkv.weight

    def step():
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            tokens = model.encode_volume(x).tokens.float()
        tokens.square().mean().backward()
        return tokens.detach(), probe.grad.clone()

    paths = {"explicit": EXPLICIT, "fused": fused_forward}
    outputs, times = {}, {name: [] for name in paths}
    for _ in range(reps + 1):  # the first round also warms up and keeps the outputs
        for name, forward in paths.items():
            swin.WindowAttention.forward = forward
            t0 = time.perf_counter()
            outputs[name] = step()
            times[name].append(time.perf_counter() - t0)
    swin.WindowAttention.forward = EXPLICIT
    median = {name: sorted(t[1:])[len(t[1:]) // 2] for name, t in times.items()}
    result = {"seconds": times, "median_s": median, "speed_up": median["explicit"] / median["fused"],
              "max_token_difference": float((outputs["explicit"][0] - outputs["fused"][0]).abs().max()),
              "gradient_relative_difference": float((outputs["explicit"][1] - outputs["fused"][1]).norm()
                                                    / outputs["explicit"][1].norm())}
    print(result)
    return result


if __name__ == "__main__":
    main()
