"""Layer handling for the MG-3D panel: output layers that copy the image layer's transform, and the image
layer read back as a Volume on its source geometry."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._layers import layer_source_affine, layer_state, layer_world_matrix

if TYPE_CHECKING:
    import napari

HEATMAP_LAYER = "MG-3D heat map"  # the heat map layer's name starts with this, then says its sentence
LABELS_LAYER = "MG-3D segmentation"
SENTENCE_IN_NAME = 48  # characters of the sentence in the heat map layer's name


def layer_volume(layer):
    """The Volume (float32 data, RAS affine) of a napari image layer."""
    from .volume import Volume

    return Volume(np.asarray(layer.data, np.float32), layer_source_affine(layer_state(layer)))


def check_image_layer(layer, name: str) -> None:
    """Raise ValueError saying what MG-3D needs when ``layer`` is not a grey-value 3D image."""
    from napari.layers import Image

    if not isinstance(layer, Image):
        raise ValueError(f"layer {name!r} is a {type(layer).__name__} layer; MG-3D needs a grey-value 3D image")
    if layer.rgb:
        raise ValueError(f"layer {name!r} is an RGB image; MG-3D needs a grey-value CT/MR volume in HU")
    if layer.multiscale:
        raise ValueError(f"layer {name!r} is multiscale; open the full-resolution volume")
    if layer.ndim != 3:
        raise ValueError(f"layer {name!r} is {layer.ndim}D; MG-3D needs a 3D volume (z, y, x)"
                         + (" - pick one time point/channel first" if layer.ndim == 4 else ""))


class OutputLayers:
    """Creates or updates the output layers; each copies the source image layer's transform exactly."""

    def __init__(self, viewer: napari.Viewer) -> None:
        self.viewer = viewer

    @staticmethod
    def transform_of(layer) -> dict:
        return {"scale": layer.scale, "translate": layer.translate, "rotate": layer.rotate, "shear": layer.shear,
                "affine": layer.affine}

    def image_names(self) -> list[str]:
        from napari.layers import Image

        return [layer.name for layer in self.viewer.layers
                if isinstance(layer, Image) and layer.metadata.get("mg3d_output") != "heatmap"]

    @property
    def heatmap_layer(self):
        """The heat map layer, found by its role (its name changes with the sentence it shows)."""
        return next((layer for layer in self.viewer.layers if layer.metadata.get("mg3d_output") == "heatmap"), None)

    def _place_above(self, layer, source) -> None:
        """Keep an output layer just above its image, so that it is visible over it."""
        layers = self.viewer.layers
        if source in layers and layers.index(layer) < layers.index(source):
            layers.move(layers.index(layer), layers.index(source) + 1)

    def _upsert(self, name: str, kind: str, data, source, **kwargs):
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = data
            for key, value in {**self.transform_of(source), **kwargs}.items():
                if key not in ("colormap", "blending", "opacity", "features"):
                    setattr(layer, key, value)
            return layer
        add = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
        return add(data, name=name, **self.transform_of(source), **kwargs)

    def show_labels(self, labels: np.ndarray, class_names: list[str], source) -> None:
        layer = self._upsert(LABELS_LAYER, "labels", labels, source, opacity=0.45)
        self._place_above(layer, source)
        layer.metadata["class_names"] = list(class_names)
        layer.metadata["mg3d"] = dict(source.metadata.get("mg3d", {}))
        try:  # napari >= 0.4.19: names appear in the status bar on hover
            import pandas as pd

            layer.features = pd.DataFrame({"index": range(len(class_names)), "class": class_names})
        except Exception:  # noqa: BLE001 - features are a nicety; the layer works without them
            pass

    def show_heatmap(self, heat: np.ndarray, index_to_source: np.ndarray, sentence: str, source) -> None:
        """``heat`` at model resolution; ``index_to_source`` maps its voxel indices to the source image's.
        The layer's affine is the image's world matrix composed with that map, so it overlays the image
        without resampling to the image grid (napari interpolates on display)."""
        identity = {"scale": np.ones(3), "translate": np.zeros(3), "rotate": np.eye(3), "shear": np.zeros(3)}
        affine = layer_world_matrix(layer_state(source)) @ index_to_source
        short = sentence if len(sentence) <= SENTENCE_IN_NAME else sentence[: SENTENCE_IN_NAME - 1] + "…"
        layer = self.heatmap_layer
        if layer is not None:
            layer.data = heat
            for key, value in {**identity, "affine": affine}.items():
                setattr(layer, key, value)
        else:
            layer = self.viewer.add_image(heat, affine=affine, colormap="inferno", opacity=0.5,
                                          blending="additive", contrast_limits=(0.0, 1.0), interpolation2d="linear",
                                          interpolation3d="linear", metadata={"mg3d_output": "heatmap"})
        layer.name = f"{HEATMAP_LAYER}: {short}"
        self._place_above(layer, source)
        layer.contrast_limits = (0.0, 1.0)
        layer.metadata["sentence"] = sentence
        layer.metadata["mg3d"] = dict(source.metadata.get("mg3d", {}))
