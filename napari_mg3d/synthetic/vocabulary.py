"""The report language of the synthetic generator: sentence templates per finding, denials, normal filler,
and the keywords that tie a sentence of a real report to a finding."""

from __future__ import annotations

import numpy as np

from ..reports import is_negated

LOBES = {
    "right upper lobe": ("right", "upper"), "right middle lobe": ("right", "middle"),
    "right lower lobe": ("right", "lower"), "left upper lobe": ("left", "upper"),
    "left lower lobe": ("left", "lower"),
}
# Several phrasings per finding; {loc} is a lobe or side, {size} a size in mm.
TEMPLATES: dict[str, list[str]] = {
    "Medical material": ["A central venous catheter is seen in the superior vena cava.",
                         "Port catheter with its tip in the superior vena cava.",
                         "Medical material is present in the right chest."],
    "Arterial wall calcification": ["Calcified plaques are present in the wall of the thoracic aorta.",
                                    "Atherosclerotic calcification of the aortic wall.",
                                    "Arterial wall calcification along the descending aorta."],
    "Cardiomegaly": ["The heart is enlarged.", "Cardiomegaly is present.", "Heart size is increased."],
    "Pericardial effusion": ["Pericardial effusion measuring {size} mm in thickness.",
                             "There is a pericardial effusion.", "Fluid is seen in the pericardial space."],
    "Coronary artery wall calcification": ["Coronary artery calcification is present.",
                                           "Calcified plaques in the coronary arteries.",
                                           "There are coronary artery wall calcifications."],
    "Hiatal hernia": ["A hiatal hernia is seen.", "Small sliding hiatal hernia.",
                      "Part of the stomach herniates through the esophageal hiatus."],
    "Lymphadenopathy": ["An enlarged mediastinal lymph node measuring {size} mm.",
                        "Mediastinal lymphadenopathy is present.", "Enlarged lymph nodes in the mediastinum."],
    "Emphysema": ["Emphysema in the {loc}.", "Centrilobular emphysematous changes in the {loc}.",
                  "Low attenuation areas of emphysema are seen in the {loc}."],
    "Atelectasis": ["Atelectasis in the {loc}.", "Subsegmental atelectasis in the {loc}.",
                    "Band-like atelectasis is seen in the {loc}."],
    "Lung nodule": ["A {size} mm {kind} nodule in the {loc}.", "There is a {kind} nodule of {size} mm in the {loc}.",
                    "A {kind} pulmonary nodule measuring {size} mm is seen in the {loc}."],
    "Lung opacity": ["Ground glass opacity in the {loc}.", "Patchy opacity is seen in the {loc}.",
                     "There is an area of increased density in the {loc}."],
    "Pulmonary fibrotic sequela": ["Fibrotic sequelae in the {loc}.", "Fibrotic bands are seen in the {loc}.",
                                   "Linear fibrotic changes in the {loc}."],
    "Pleural effusion": ["{side_cap} pleural effusion measuring {size} mm.", "There is a {side} pleural effusion.",
                         "Fluid is seen in the {side} pleural space."],
    "Mosaic attenuation pattern": ["Mosaic attenuation pattern in the {loc}.",
                                   "Heterogeneous mosaic attenuation is seen in the {loc}."],
    "Peribronchial thickening": ["Peribronchial thickening in the {loc}.",
                                 "Bronchial wall thickening is seen in the {loc}."],
    "Consolidation": ["Consolidation in the {loc}.", "There is consolidation with air bronchograms in the {loc}.",
                      "Consolidative area in the {loc}."],
    "Bronchiectasis": ["Bronchiectasis in the {loc}.", "Dilated bronchi are seen in the {loc}.",
                       "Cylindrical bronchiectasis in the {loc}."],
    "Interlobular septal thickening": ["Interlobular septal thickening in the {loc}.",
                                       "Thickened interlobular septa are seen in the {loc}."],
}
NEGATIVES: dict[str, list[str]] = {
    "Medical material": ["No medical material is seen."],
    "Arterial wall calcification": ["No calcification of the aortic wall."],
    "Cardiomegaly": ["Heart size is normal.", "The heart is not enlarged."],
    "Pericardial effusion": ["No pericardial effusion.", "Pericardial effusion was not observed."],
    "Coronary artery wall calcification": ["No coronary artery calcification."],
    "Hiatal hernia": ["No hiatal hernia."],
    "Lymphadenopathy": ["No enlarged lymph nodes in the mediastinum.", "No lymphadenopathy."],
    "Emphysema": ["No emphysema."],
    "Atelectasis": ["No atelectasis."],
    "Lung nodule": ["No pulmonary nodule is seen.", "No nodular lesion in the lungs."],
    "Lung opacity": ["No lung opacity."],
    "Pulmonary fibrotic sequela": ["No fibrotic changes."],
    "Pleural effusion": ["No pleural effusion.", "Pleural effusion was not detected."],
    "Mosaic attenuation pattern": ["No mosaic attenuation."],
    "Peribronchial thickening": ["No peribronchial thickening."],
    "Consolidation": ["No consolidation.", "No consolidation is seen in the lungs."],
    "Bronchiectasis": ["No bronchiectasis."],
    "Interlobular septal thickening": ["No interlobular septal thickening."],
}
NORMAL_FILLER = ["Trachea and both main bronchi are patent.", "Thoracic aorta diameter is normal.",
                 "Bone structures are intact.", "Upper abdominal organs in the sections are normal."]
# Keywords that tie a sentence of a real report to a finding (negated sentences are not linked).
KEYWORDS: dict[str, tuple[str, ...]] = {
    "Medical material": ("catheter", "port", "tube", "medical material", "pacemaker", "stent", "suture"),
    "Arterial wall calcification": ("aort", "arterial wall calcif", "atheroscl"),
    "Cardiomegaly": ("cardiomegaly", "heart is enlarged", "heart size is increased", "enlarged heart"),
    "Pericardial effusion": ("pericardial",),
    "Coronary artery wall calcification": ("coronary",),
    "Hiatal hernia": ("hiatal", "hernia"),
    "Lymphadenopathy": ("lymph",),
    "Emphysema": ("emphysem", "bulla"),
    "Atelectasis": ("atelectas",),
    "Lung nodule": ("nodul",),
    "Lung opacity": ("opacit", "ground glass", "ground-glass", "density"),
    "Pulmonary fibrotic sequela": ("fibro", "sequel"),
    "Pleural effusion": ("pleural effusion", "pleural space", "pleural fluid"),
    "Mosaic attenuation pattern": ("mosaic",),
    "Peribronchial thickening": ("peribronchial", "bronchial wall thick"),
    "Consolidation": ("consolidat",),
    "Bronchiectasis": ("bronchiectas", "dilated bronch"),
    "Interlobular septal thickening": ("septal", "interlobular"),
}


def describe(rng: np.random.Generator, info: dict) -> str:
    template = str(rng.choice(TEMPLATES[info["label"]]))
    side = info.get("side", "right")
    return template.format(loc=info.get("loc", ""), size=info.get("size", ""), kind=info.get("kind", "solid"),
                           side=side, side_cap=side.capitalize())


def link_sentence(sentence: str, findings: list[str], lesion_names: list[str], lesion_labels: dict[str, str]) -> list[str]:
    """Lesions a (real-report) sentence describes: keyword match, skipping negated sentences."""
    if is_negated(sentence):
        return []
    low = f" {sentence.lower()} "
    return [name for name in lesion_names
            if lesion_labels[name] in findings and any(kw in low for kw in KEYWORDS[lesion_labels[name]])]
