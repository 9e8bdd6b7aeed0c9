"""MG-3D training package: data loaders (and, to come, pretrain / finetune / evaluate entry points).

Imports the napari_mg3d core; the core never imports this package.
"""
