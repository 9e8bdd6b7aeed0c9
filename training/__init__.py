"""MG-3D training: ``python -m training.pretrain | finetune | evaluate | make_demo_bundle``, the data
loaders (``data``), the Lightning module (``module``), parameters (``params``) and metrics (``metrics``).

Imports the napari_mg3d core; the core never imports this package.
"""
