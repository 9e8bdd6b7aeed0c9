"""Label and class names shared by the core, the synthetic generator and training.

``LABELS``: the 18 CT-RATE abnormality findings, in CT-RATE's column order (multi-label targets and
abnormality scores). ``ORGANS``: the organ classes of the synthetic phantom. ``ALL_CLASSES``: the class of
every value of a combined organ + lesion label map (0 background, organs 1..9, lesions 10..27).
``ORGAN_LESION_CLASSES``: organs and one class for a lesion of any kind (0 background, organs 1..9, lesion 10).
``SEGMENTATION_TARGETS``: the class list of each synthetic segmentation target.
"""

from __future__ import annotations

LABELS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
]
# Findings of the lung parenchyma, which reports place in a lobe ("Atelectasis in the left lower lobe."), and
# the lobes: the zero-shot read-out asks for such a finding lobe by lobe (napari_mg3d.model.heads).
LUNG_FINDINGS = ("Emphysema", "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela",
                 "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
                 "Interlobular septal thickening")
LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")
ORGANS = ["body", "lung_right", "lung_left", "heart", "aorta", "spine", "ribs", "trachea", "liver"]
ALL_CLASSES = ["background", *ORGANS, *LABELS]
LESION_CLASSES = ["background", *LABELS]
ORGAN_LESION_CLASSES = ["background", *ORGANS, "lesion"]
SEGMENTATION_TARGETS = {"lesions": LESION_CLASSES, "organs": ["background", *ORGANS], "all": ALL_CLASSES,
                        "organs+lesion": ORGAN_LESION_CLASSES}


def segmentation_target(classes: list[str]) -> str | None:
    """The synthetic segmentation target whose classes are ``classes`` (None for other class lists)."""
    return next((name for name, listed in SEGMENTATION_TARGETS.items() if listed == list(classes)), None)
