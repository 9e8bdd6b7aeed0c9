"""Label and class names shared by the core, the synthetic generator and training.

``LABELS``: the 18 CT-RATE abnormality findings, in CT-RATE's column order (multi-label targets and
abnormality scores). ``ORGANS``: the organ classes of the synthetic phantom. ``ALL_CLASSES``: the class of
every value of a combined organ + lesion label map (0 background, organs 1..9, lesions 10..27).
"""

from __future__ import annotations

LABELS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
]
ORGANS = ["body", "lung_right", "lung_left", "heart", "aorta", "spine", "ribs", "trachea", "liver"]
ALL_CLASSES = ["background", *ORGANS, *LABELS]
LESION_CLASSES = ["background", *LABELS]
