"""A segmentation of a DICOM series as a DICOM SEG, and a heat map as a DICOM Parametric Map, each referencing
the source series, so that 3D Slicer, OHIF and PACS open them beside the CT. Needs highdicom (``pip install highdicom``; in ``napari-mg3d[all]``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .volume import Volume

TYPE_2_PATIENT_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "AccessionNumber", "StudyID")
ORGAN_WORDS = ("body", "lung", "heart", "aorta", "spine", "rib", "trachea", "liver")


class DicomSegError(RuntimeError):
    """A DICOM SEG cannot be written for this result; the message says why."""


def source_datasets(volume: Volume) -> tuple[list, list[str]]:
    """The series' headers in the volume's slice order, and what had to be made up (anonymised series). Made-up
    UIDs derive from the file paths, so every export of the same files references the same UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    slices = volume.metadata.get("slices") or []
    if volume.metadata.get("format") != "dicom" or len(slices) != volume.shape[0]:
        raise DicomSegError("a DICOM SEG needs the DICOM series the volume was read from (slice by slice)")
    datasets = [pydicom.dcmread(s["file"], stop_before_pixels=True) for s in slices]
    made_up = []
    folder = str(Path(slices[0]["file"]).parent)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not all(getattr(ds, key, "") for ds in datasets):
            uid = generate_uid(entropy_srcs=[folder, key])
            for ds in datasets:
                if not getattr(ds, key, ""):
                    setattr(ds, key, uid)
            made_up.append(key)
    if not all(getattr(ds, "SOPInstanceUID", "") for ds in datasets):
        for ds, s in zip(datasets, slices):
            ds.SOPInstanceUID = ds.get("SOPInstanceUID") or generate_uid(entropy_srcs=[s["file"]])
        made_up.append("SOPInstanceUID")
    for ds in datasets:
        if not getattr(ds, "SOPClassUID", ""):
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        for key in TYPE_2_PATIENT_STUDY:  # an anonymised series may lack them; DICOM allows them empty
            if key not in ds:
                setattr(ds, key, "")
        if "SliceThickness" not in ds:
            ds.SliceThickness = round(float(volume.spacing[0]), 6)
    return datasets, made_up


def _description(number: int, name: str, bundle_name: str, version: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    organ = any(w in name.lower() for w in ORGAN_WORDS)
    category = codes.SCT.AnatomicalStructure if organ else codes.SCT.MorphologicallyAbnormalStructure
    kind = codes.SCT.Organ if organ else codes.SCT.Lesion  # a generic code: MG-3D's names are in the label
    algorithm = hd.AlgorithmIdentificationSequence(name=f"MG-3D ({bundle_name})", version=version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    return hd.seg.SegmentDescription(segment_number=number, segment_label=name[:64], segmented_property_category=category,
                                     segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                     algorithm_identification=algorithm)


def write_dicom_seg(labels: np.ndarray, class_names: list[str], volume: Volume, path: str | Path,
                    bundle_name: str = "bundle") -> tuple[Path, list[str]]:
    """Write ``labels`` (the volume's grid, a0 = the series' slice order) as a DICOM SEG at ``path``: one
    segment per class present, named, coded with a generic category and type, the algorithm identified as
    MG-3D with the bundle's name and the package version. Returns (path, notes), e.g. which UIDs of an
    anonymised series had to be generated."""
    try:
        import highdicom as hd
    except ImportError as err:
        raise DicomSegError("writing a DICOM SEG needs highdicom: pip install highdicom") from err
    from . import __version__

    if labels.shape != volume.shape:
        raise DicomSegError(f"labels {labels.shape} do not lie on the series' grid {volume.shape}")
    datasets, made_up = source_datasets(volume)
    present = [int(c) for c in np.unique(labels) if c > 0]
    if not present:
        raise DicomSegError("the segmentation is empty: no segment to write")
    segment_of = np.zeros(int(labels.max()) + 1, np.uint8 if len(present) < 256 else np.uint16)
    for number, c in enumerate(present, start=1):
        segment_of[c] = number
    descriptions = [_description(number, class_names[c] if c < len(class_names) else f"class {c}", bundle_name,
                                 __version__) for number, c in enumerate(present, start=1)]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=segment_of[labels], segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="napari-mg3d", manufacturer_model_name=f"MG-3D {bundle_name}"[:64],
        software_versions=__version__, device_serial_number="none", series_description="MG-3D segmentation",
        omit_empty_frames=False)
    path = Path(path)
    seg.save_as(str(path))
    notes = [f"the source series had no {', '.join(made_up)}: generated UIDs were used in the DICOM SEG"] if made_up else []
    return path, notes


def write_dicom_parametric_map(heatmap: np.ndarray, sentence: str, volume: Volume, path: str | Path,
                               bundle_name: str = "bundle", source: tuple[list, list[str]] | None = None
                               ) -> tuple[Path, list[str]]:
    """Write one sentence's heat map (float in [0, 1] on the volume's grid, a0 = the series' slice order) as a
    DICOM Parametric Map that references the source series, its value labelled with the sentence (unitless,
    0 = not looked at, 1 = the strongest response). ``source``: :func:`source_datasets` of the volume, read
    once for several maps. Returns (path, notes), as :func:`write_dicom_seg`."""
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError as err:
        raise DicomSegError("writing a DICOM Parametric Map needs highdicom: pip install highdicom") from err
    from . import __version__

    if heatmap.shape != volume.shape:
        raise DicomSegError(f"heat map {heatmap.shape} does not lie on the series' grid {volume.shape}")
    datasets, made_up = source if source is not None else source_datasets(volume)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="MG3D_HEAT", lut_explanation=f"MG-3D attention to: {sentence}"[:64],
        unit=codes.UCUM.NoUnits, value_range=(0.0, 1.0), slope=1.0, intercept=0.0)
    pm = hd.pm.ParametricMap(
        source_images=datasets, pixel_array=np.clip(heatmap, 0.0, 1.0).astype(np.float32),
        series_instance_uid=hd.UID(), series_number=901, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="napari-mg3d", manufacturer_model_name=f"MG-3D {bundle_name}"[:64], software_versions=__version__,
        device_serial_number="none", contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="MG3DHEATMAP",
        content_description=f"MG-3D heat map: {sentence}"[:64], series_description="MG-3D heat map")
    path = Path(path)
    pm.save_as(str(path))
    notes = [f"the source series had no {', '.join(made_up)}: generated UIDs were used in the DICOM Parametric Map"] \
        if made_up else []
    return path, notes
