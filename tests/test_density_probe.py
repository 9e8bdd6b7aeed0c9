"""experiments.density_probe: separations are finite and follow the density difference."""

from __future__ import annotations

from experiments import density_probe


def test_larger_density_differences_separate_more():
    res = density_probe.probe("tiny", seed=0)["pairs"]
    for kind in ("raw", "normalised"):
        far, near = res["lung vs soft tissue"][kind], res["heart vs liver"][kind]
        assert len(far) == len(near) == 5 and all(v == v for v in far + near)  # no NaN at any stage
        assert min(f / n for f, n in zip(far, near)) > 2
