"""Replay a forward pass as one captured CUDA graph.

On a GPU the base model's forward launches thousands of small kernels (Swin window shuffles, norms, the
decoder's blocks); at batch 1 the CPU cannot issue them as fast as the GPU runs them (bench/: 33 ms of GPU
work took 67 ms of wall time). Capturing the pass once and replaying it issues the whole pass in one call.
The input shape is fixed per bundle (preprocessing resizes every volume to the model grid), so one capture
serves every volume.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map


class GraphedCall:
    """``fn(*tensors)`` captured as a CUDA graph on first use with tensors of these shapes and dtypes.

    Calling copies the inputs into static buffers, replays the graph and returns a copy of the outputs
    (a pytree of tensors, like ``fn``'s), so results stay valid after the next call. ``dtype`` enables bf16
    autocast inside the graph (weight-cast cache off, as graph capture requires)."""

    def __init__(self, fn: Callable[..., Any], *example: Any, dtype: torch.dtype | None = None,
                 warmup: int = 2) -> None:
        flat, _ = tree_flatten(example)
        if not flat or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in flat):
            raise ValueError("GraphedCall needs CUDA tensors as inputs")
        self.fn = fn
        self.dtype = dtype
        self.static_inputs = tree_map(lambda t: t.detach().clone(), example)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode(), self._autocast():
            for _ in range(warmup):  # cuDNN/cuBLAS choose their algorithms outside the capture
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), self._autocast(), torch.cuda.graph(self.graph):
            self.static_outputs = fn(*self.static_inputs)

    def _autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast("cuda", dtype=self.dtype, cache_enabled=False)

    def matches(self, *args: Any) -> bool:
        """Whether ``args`` have the shapes and dtypes the graph was captured with."""
        a, _ = tree_flatten(args)
        s, _ = tree_flatten(self.static_inputs)
        return len(a) == len(s) and all(x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
                                        for x, y in zip(a, s))

    def __call__(self, *args: Any) -> Any:
        with torch.inference_mode():
            for dst, src in zip(tree_flatten(self.static_inputs)[0], tree_flatten(args)[0]):
                dst.copy_(src)
            self.graph.replay()
            return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.static_outputs)
