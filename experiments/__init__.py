"""Benchmark harnesses and studies of napari-mg3d (not installed; run from the repository root:
``python -m experiments.synthetic_proof``). Results: ``experiments/results/`` and ``docs/benchmark.md``."""
