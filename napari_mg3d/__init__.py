"""napari-mg3d: MG-3D 3D CT vision-language model as a napari plugin and a training package.

The core (model, I/O, preprocessing, inference) never imports napari or Qt.
"""

__version__ = "0.1.0"
