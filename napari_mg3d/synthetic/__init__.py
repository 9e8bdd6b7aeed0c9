"""Report-conditioned synthetic chest CT: a phantom thorax in HU with findings at known places, a report
whose sentences describe them, and ground truth (labels, organ masks, lesion masks, sentence -> mask links).

vocabulary (report language), phantom (anatomy, findings, geometry), sample (one sample, template or
real-report mode), dataset (NIfTI + manifest on disk), contact_sheet (a picture to check realism);
``python -m napari_mg3d.synthetic OUT -n 16`` writes a data set.
"""

from .dataset import save_sample, write_dataset
from .phantom import (
    CANONICAL_AXCODES,
    TIERS,
    FindingStyle,
    SyntheticSample,
    canonical_affine,
    finding_style,
    reorient,
)
from .sample import DEFAULT_N_FINDINGS, finding_prevalence, generate_sample, real_report_sample
from .vocabulary import link_sentence

__all__ = [
    "CANONICAL_AXCODES", "DEFAULT_N_FINDINGS", "TIERS", "FindingStyle", "SyntheticSample", "canonical_affine",
    "finding_prevalence", "finding_style",
    "generate_sample", "link_sentence", "real_report_sample", "reorient", "save_sample", "write_dataset",
]
