"""One report-conditioned sample: a phantom with findings and the report that describes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..labels import LABELS
from .phantom import (
    CANONICAL_AXCODES,
    PhantomBuilder,
    SyntheticSample,
    canonical_affine,
    finding_style,
    reorient,
)
from .vocabulary import NEGATIVES, NORMAL_FILLER, describe, link_sentence

DEFAULT_N_FINDINGS = (1, 4)  # a sample shows this many of the 18 findings (inclusive range, uniform)


def finding_prevalence(n_findings: tuple[int, int] = DEFAULT_N_FINDINGS) -> float:
    """Probability that a given finding is in a sample: the findings are drawn uniformly, so it is the mean
    number of findings per sample over the 18 labels."""
    return (n_findings[0] + n_findings[1]) / 2 / len(LABELS)


def generate_sample(
    seed: int,
    shape: tuple[int, int, int] = (96, 128, 160),
    spacing: tuple[float, float, float] | None = None,
    findings: list[str] | None = None,
    n_findings: tuple[int, int] = DEFAULT_N_FINDINGS,
    report: str | None = None,
    noise_hu: float | None = None,
    axcodes: tuple[str, str, str] = CANONICAL_AXCODES,
    tier: str = "hard",
) -> SyntheticSample:
    """One deterministic sample for ``seed``.

    shape is (a0, a1, a2) = (superior-inferior, anterior-posterior, left-right) voxels of the canonical
    grid; spacing in mm (default: random, covering a ~250 x 250 x 320 mm field). ``findings`` fixes which of
    LABELS appear (default: a random 1-4). ``report`` (real-report mode) uses that text as the report and
    links its sentences to the rendered findings by keyword. ``axcodes`` re-orients the output. ``tier``:
    "hard" (realistic sizes) or "visible" (every finding large and contrasted enough for a 64³ model grid;
    same anatomy and findings per seed, see :class:`FindingStyle`).
    """
    from ..reports import sentence_texts

    style = finding_style(tier)
    rng = np.random.default_rng(seed)
    if spacing is None:
        fov = (rng.uniform(230, 280), 250.0, 330.0)
        spacing = tuple(f / n for f, n in zip(fov, shape))
    if findings is None:
        n = int(rng.integers(n_findings[0], n_findings[1] + 1))
        findings = sorted(rng.choice(LABELS, size=n, replace=False).tolist(), key=LABELS.index)
    unknown = [f for f in findings if f not in LABELS]
    if unknown:
        raise ValueError(f"unknown findings {unknown}; choose from the 18 CT-RATE labels {LABELS}")
    builder = PhantomBuilder(rng, shape, spacing, style)
    builder.build_anatomy(cardiomegaly="Cardiomegaly" in findings)
    infos = [builder.finding(label) for label in findings]
    volume = builder.finish(noise_hu if noise_hu is not None else float(rng.uniform(8, 20)))
    labels = {name: int(name in findings) for name in LABELS}
    lesion_names = list(builder.lesions)

    if report is None:
        sentences, links = [], []
        for info, name in zip(infos, lesion_names):
            sentences.append(describe(rng, info))
            links.append([name])
        negatives = [lab for lab in LABELS if lab not in findings]
        for lab in rng.choice(negatives, size=min(len(negatives), int(rng.integers(2, 6))), replace=False):
            sentences.append(str(rng.choice(NEGATIVES[str(lab)])))
            links.append([])
        for filler in rng.choice(NORMAL_FILLER, size=int(rng.integers(0, 3)), replace=False):
            sentences.append(str(filler))
            links.append([])
        order = rng.permutation(len(sentences))
        sentences = [sentences[i] for i in order]
        links = [links[i] for i in order]
        report = " ".join(sentences)
    else:
        sentences = sentence_texts(report)
        links = [link_sentence(s, findings, lesion_names, builder.lesion_labels) for s in sentences]

    affine = canonical_affine(shape, spacing)
    organs, lesions = builder.organs, builder.lesions
    if tuple(axcodes) != CANONICAL_AXCODES:
        volume, new_affine = reorient(volume, affine, axcodes)
        organs = {k: reorient(v, affine, axcodes)[0] for k, v in organs.items()}
        lesions = {k: reorient(v, affine, axcodes)[0] for k, v in lesions.items()}
        affine = new_affine
    return SyntheticSample(volume, affine, report, sentences, labels, organs, lesions, dict(builder.lesion_labels),
                           links, seed, tuple(axcodes), infos)  # type: ignore[arg-type]


def real_report_sample(seed: int, reports_csv: str | Path, index: int | None = None, **kwargs) -> SyntheticSample:
    """Real-report mode: a CT-RATE report (with its 18 labels) rendered into a phantom showing exactly
    those findings."""
    import csv

    with open(reports_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{reports_csv} has no reports")
    missing = [lab for lab in LABELS if lab not in rows[0]]
    if missing:
        raise ValueError(f"{reports_csv} lacks the label columns {missing}; expected the CT-RATE layout")
    rng = np.random.default_rng(seed)
    row = rows[index if index is not None else int(rng.integers(len(rows)))]
    findings = [lab for lab in LABELS if str(row[lab]).strip() in ("1", "1.0")]
    text = row.get("report_text") or row.get("Findings_EN") or ""
    return generate_sample(seed, findings=findings, report=text, **kwargs)
