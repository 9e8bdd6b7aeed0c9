"""napari sample data: a synthetic chest CT (HU) with its report in the layer metadata."""

from __future__ import annotations

from ._layers import volume_to_layer_data
from .synthetic import generate_sample
from .volume import Volume


def make_sample_data(seed: int = 0):
    s = generate_sample(seed, findings=["Lung nodule", "Pleural effusion", "Cardiomegaly"])
    vol = Volume(s.volume, s.affine, {"source": f"synthetic chest CT (seed {seed})", "report": s.report})
    data, kwargs, kind = volume_to_layer_data(vol, name="synthetic chest CT")
    kwargs["metadata"]["mg3d"]["report"] = s.report
    kwargs["metadata"]["mg3d"]["sentences"] = s.sentences
    return [(data, kwargs, kind)]
