"""Sentence splitting with character spans, on hand-made cases and real CT-RATE / CTRG-Chest reports."""

from __future__ import annotations

import csv
import json

import pytest

from napari_mg3d.reports import is_negated, sentence_texts, split_sentences


def _texts(report):
    sentences = split_sentences(report)
    for s in sentences:
        assert report[s.start:s.end] == s.text
    return [s.text for s in sentences]


def test_decimals_and_measurements_stay_inside_a_sentence():
    assert _texts("A 0.8 cm nodule. Mass of 1.5x2 cm in the liver. Size 2.3 x 1.1 mm.") == [
        "A 0.8 cm nodule.", "Mass of 1.5x2 cm in the liver.", "Size 2.3 x 1.1 mm."]


def test_abbreviations_do_not_end_sentences():
    assert _texts("Nodule, e.g. granuloma, is seen. Approx. 3 mm nodule vs. vessel.") == [
        "Nodule, e.g. granuloma, is seen.", "Approx. 3 mm nodule vs. vessel."]


def test_headers_enumerations_line_breaks_and_missing_final_period():
    report = "FINDINGS:\n1. Cardiomegaly.\n2. Small hiatal hernia\n\nIMPRESSION:\nNo acute findings"
    assert _texts(report) == ["Cardiomegaly.", "Small hiatal hernia", "No acute findings"]


def test_semicolon_before_a_capital_splits_but_lists_do_not():
    assert _texts("When examined in the lung window; Aeration is normal.") == [
        "When examined in the lung window", "Aeration is normal."]
    assert _texts("Nodules in the right; left and middle lobes.") == ["Nodules in the right; left and middle lobes."]


def test_report_without_punctuation_is_one_sentence_and_empty_report_is_an_error():
    assert _texts("no acute cardiopulmonary process") == ["no acute cardiopulmonary process"]
    assert split_sentences("  \n ") == []
    with pytest.raises(ValueError, match="report is empty"):
        sentence_texts(" ")


def test_real_ct_rate_reports(shared_data):
    with open(shared_data / "reports" / "ct_rate_reports_train.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    counts = []
    for row in rows[:200]:
        report = row["report_text"]
        sentences = split_sentences(report)
        counts.append(len(sentences))
        for s in sentences:
            assert report[s.start:s.end] == s.text
            assert s.text.strip() == s.text and len(s.text) > 1
        covered = sum(len(s.text) for s in sentences)
        assert covered > 0.9 * len(report.replace('"', "").strip()) - 3 * len(sentences)
    assert 8 <= sorted(counts)[len(counts) // 2] <= 30  # typical CT-RATE reports: a dozen or two sentences
    first = [s.text for s in split_sentences(rows[0]["report_text"])]
    assert first[0] == "Trachea, both main bronchi are open."
    assert "Thoracic CT examination within normal limits" in first


def test_real_ctrg_chest_reports(shared_data):
    data = json.loads((shared_data / "reports" / "ctrg_chest_reports_train.json").read_text())
    items = data["train"]
    for item in items[:200]:
        for field in ("report", "result"):
            text = item[field]
            sentences = split_sentences(text)
            assert sentences, text
            for s in sentences:
                assert text[s.start:s.end] == s.text
                assert not s.text[0].isspace()
    example = next(i for i in items if i["id"] == "910.nii.gz")
    texts = [s.text for s in split_sentences(example["report"])]
    assert texts[0] == "Thorax is symmetrical."
    assert any("about 0.8 in size × 1.0cm" in t for t in texts)  # decimal not split


@pytest.mark.parametrize("sentence", [
    "No pleural effusion.", "The heart is not enlarged.", "Heart size is normal.", "Pleural effusion was not detected.",
    "Effusion isn't seen.", "NO PNEUMOTHORAX.", "Lungs are free of nodules.", "Negative for pulmonary embolism.",
    "Without evidence of lymphadenopathy.", "Mediastinum is unremarkable.", "Lung nodule is not present.",
])
def test_denials_and_normality_statements_are_negated(sentence):
    assert is_negated(sentence)


@pytest.mark.parametrize("sentence", [
    "Cardiomegaly is present.", "Abnormal opacity in the right lower lobe.", "A 5 mm solid nodule in the left lobe.",
    "No change in the 8 mm nodule.", "Not only effusion but also consolidation.", "Non-specific ground glass opacity.",
    "Nodular thickening of the pleura.", "Bone structures are intact.",
])
def test_findings_pseudo_negations_and_lookalike_words_are_not_negated(sentence):
    assert not is_negated(sentence)
