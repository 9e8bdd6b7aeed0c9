"""The report decoder: its word vocabulary, decoding with cached keys/values, and the drafts' finding F1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.decoding import greedy_by_recomputing
from napari_mg3d.model.heads import GenerationSettings, ReportDecoder, build_head
from napari_mg3d.model.words import WordVocabulary, report_text, words_of

REPORTS = ["No pleural effusion. A 12 mm ground-glass nodule in the right upper lobe.",
           "Cardiomegaly. No pleural effusion, no nodule.", "A nodule (8 mm) in the left lower lobe."]


def test_the_vocabulary_keeps_frequent_words_and_punctuation_and_round_trips_text():
    assert words_of("A 3.5 mm ground-glass nodule (right).") == ["a", "3.5", "mm", "ground-glass", "nodule", "(",
                                                                  "right", ")", "."]
    v = WordVocabulary.build(REPORTS, min_count=2)
    assert {"no", "pleural", "effusion", ".", "nodule", "mm", "lobe"} <= set(v.itos)
    assert "cardiomegaly" not in v.stoi and "12" not in v.stoi  # seen once: below the threshold
    ids = v.encode("No pleural effusion. Cardiomegaly.", max_len=20)
    assert ids[0] == v.bos_id and ids[-1] == v.eos_id and v.unk_id in ids
    assert v.decode(ids) == "No pleural effusion.."  # the unknown word is dropped, punctuation is glued
    every = WordVocabulary.build([*REPORTS, "a nodule (in the right lobe), no effusion."], min_count=1)
    assert every.decode(every.encode("a nodule (in the right lobe), no effusion.", 30)) == \
        "A nodule (in the right lobe), no effusion."
    assert len(v.encode(" ".join(["nodule"] * 50), max_len=10)) == 10  # cut, <eos> kept
    again = WordVocabulary.from_json(v.to_json())
    assert again.itos == v.itos
    with pytest.raises(ValueError, match="not an MG-3D word vocabulary"):
        WordVocabulary.from_json({"words": "x"})
    with pytest.raises(ValueError, match="no word occurs 5 times"):
        WordVocabulary.build(["one report"], min_count=5)


def _decoder(vocab: int = 300, seed: int = 0) -> ReportDecoder:
    torch.manual_seed(seed)
    d = ReportDecoder(64, vocab, layers=2, heads=4, max_len=60, bos_id=1, eos_id=2, pad_id=0, unk_id=3).eval()
    with torch.no_grad():
        for p in d.parameters():  # away from the small init, so that the logits differ between positions
            p.add_(0.05 * torch.randn_like(p))
    return d


def test_cached_decoding_gives_the_logits_of_the_full_forward_pass_at_every_position():
    d = _decoder()
    memory = torch.randn(2, 27, 64)
    tokens = torch.randint(4, 300, (2, 9))
    tokens[:, 0] = 1
    with torch.no_grad():
        full = d(tokens, memory)
        kv, cache, steps = d.memory_keys_values(memory), None, []
        for t in range(tokens.shape[1]):
            logits, cache = d.step(tokens[:, t], t, cache, kv)
            steps.append(logits)
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)
    assert cache[0][0].shape == (2, 4, 9, 16)  # (beams, heads, positions, head dim)


def test_generation_matches_recomputing_the_prefix_and_never_emits_special_or_unknown_tokens():
    d = _decoder()
    memory = torch.randn(3, 27, 64)
    s = GenerationSettings(max_len=40, min_len=2, beams=1, repetition_penalty=1.0, no_repeat_ngram=0)
    with torch.no_grad():
        fast = d.generate(memory, s)
        assert fast == [greedy_by_recomputing(d, memory[b:b + 1], s) for b in range(3)]
        d.lm.bias.data[[0, 1, 3]] = 50.0  # pad, bos and unk made the most likely tokens
        for beams in (1, 3):
            for ids in d.generate(memory, GenerationSettings(max_len=20, beams=beams)):
                assert ids and not {0, 1, 2, 3} & set(ids)


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy():
    d = _decoder(seed=3)
    memory = torch.randn(1, 27, 64)
    plain = GenerationSettings(max_len=12, min_len=1, beams=1, repetition_penalty=1.0, no_repeat_ngram=0,
                               length_penalty=0.0)

    def log_likelihood(ids):
        seq = torch.tensor([[1, *ids, 2]]) if len(ids) < 12 else torch.tensor([[1, *ids]])
        out = d(seq[:, :-1], memory).log_softmax(-1)
        out[..., [0, 1, 3]] = float("-inf")
        return float(out[0].gather(1, seq[0, 1:, None]).sum())

    with torch.no_grad():
        greedy = d.generate(memory, plain)[0]
        beam = d.generate(memory, GenerationSettings(**{**plain.__dict__, "beams": 4}))[0]
        assert log_likelihood(beam) >= log_likelihood(greedy) - 1e-4


def test_a_word_vocabulary_head_is_rebuilt_from_its_spec_and_decodes_to_words(tiny_config):
    v = WordVocabulary.build(REPORTS, min_count=2)
    spec = {"type": "report", "layers": 1, "heads": 4, "max_len": 40, "bos_id": 1, "eos_id": 2, "pad_id": 0,
            "unk_id": 3, "vocab_size": len(v), "vocabulary": v.to_json()}
    head = build_head(spec, tiny_config, vocab_size=30522)  # the text encoder's size is not the decoder's
    assert head.embed.num_embeddings == len(v) and head.unk_id == 3
    with torch.no_grad():
        ids = head.generate(torch.randn(1, 8, tiny_config.fusion_dim), GenerationSettings(max_len=15))[0]
    text = report_text(ids, spec)
    assert set(words_of(text)) <= set(v.itos)
    with pytest.raises(ValueError, match="needs the text tokenizer"):
        report_text([5, 6], {"type": "report"})


def test_finding_f1_counts_what_a_draft_asserts_against_the_true_labels():
    from napari_mg3d.labels import LABELS
    from training.metrics import asserted_findings, finding_f1

    assert asserted_findings("No pleural effusion. There is cardiomegaly. A nodule in the left lobe.") == {
        "Cardiomegaly", "Lung nodule"}
    truth = np.zeros((3, len(LABELS)))
    truth[0, LABELS.index("Cardiomegaly")] = 1
    truth[1, LABELS.index("Cardiomegaly")] = 1
    truth[2, LABELS.index("Lung nodule")] = 1
    drafts = ["Cardiomegaly.", "No cardiomegaly. Pleural effusion on the left.", "A lung nodule. Cardiomegaly."]
    res = finding_f1(drafts, truth, LABELS)
    cardio, effusion, nodule = (res["per_finding"][k] for k in ("Cardiomegaly", "Pleural effusion", "Lung nodule"))
    assert cardio["precision"] == pytest.approx(0.5) and cardio["recall"] == pytest.approx(0.5)
    assert effusion["f1"] == 0.0 and effusion["support"] == 0 and nodule["f1"] == 1.0
    assert res["per_finding"]["Emphysema"]["f1"] is None  # neither true nor said: no F1, not a perfect one
    assert res["macro_f1"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert res["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    # draft 1 denies cardiomegaly, which volume 1 has: one wrong denial of one
    assert (res["denials"], res["wrong_denials"], res["wrong_denial_share"]) == (1, 1, 1.0)
    assert finding_f1(["No pleural effusion."], truth[:1], LABELS)["wrong_denial_share"] == 0.0
    # yes/no calls (a classifier's at p > 0.5) scored the same way: the same numbers as the drafts' assertions
    from training.metrics import call_f1

    said = np.zeros_like(truth, bool)
    said[0, LABELS.index("Cardiomegaly")] = said[2, LABELS.index("Lung nodule")] = True
    said[2, LABELS.index("Cardiomegaly")] = said[1, LABELS.index("Pleural effusion")] = True
    assert call_f1(said, truth, LABELS) == {k: res[k] for k in ("macro_f1", "micro_f1", "per_finding")}


def test_the_report_decoder_learns_finding_sentences_first_in_label_order():
    from napari_mg3d.labels import LABELS
    from training.data import findings_first
    from training.metrics import asserted_findings

    report = ("No emphysema. Subsegmental atelectasis in the right middle lobe. Heart size is normal. "
              "There is a pericardial effusion. No medical material is seen.")
    assert findings_first(report) == (
        "There is a pericardial effusion. Subsegmental atelectasis in the right middle lobe. "
        "No emphysema. Heart size is normal. No medical material is seen.")
    assert LABELS.index("Pericardial effusion") < LABELS.index("Atelectasis")
    assert asserted_findings(findings_first(report)) == asserted_findings(report)  # nothing said or lost
    assert findings_first("No acute findings.") == "No acute findings."
    assert findings_first("") == ""


def test_the_report_fine_tune_scores_the_findings_first_order(tiny_config):
    """The loss TaskStep returns is the decoder's loss on the reordered report, not the written one."""
    from napari_mg3d.model.heads import build_head
    from napari_mg3d.model.mg3d import MG3DModel
    from napari_mg3d.model.words import WordVocabulary
    from training.data import findings_first
    from training.finetune import TaskStep

    written = "No emphysema. Heart size is normal. There is a pericardial effusion."
    words = WordVocabulary.build([written], min_count=1)
    spec = {"type": "report", "layers": 1, "heads": 2, "max_len": 40, "bos_id": words.bos_id,
            "eos_id": words.eos_id, "pad_id": words.pad_id, "unk_id": words.unk_id, "vocab_size": len(words),
            "vocabulary": words.to_json()}
    torch.manual_seed(0)
    model = MG3DModel(tiny_config).eval()
    head = build_head(spec, tiny_config, model.text.vocab_size).eval()
    step = TaskStep("report", model, head, spec, None, multiclass=False, data="test").eval()
    volume = torch.rand(1, 1, *tiny_config.input_size)
    with torch.no_grad():
        loss = step({"volume": volume, "report": [written]})
        tokens = model.encode_volume(volume).tokens
        reordered = head.loss(words.batch([findings_first(written)], 40), tokens)
        as_written = head.loss(words.batch([written], 40), tokens)
    assert loss.item() == pytest.approx(reordered.item(), rel=1e-5)
    assert loss.item() != pytest.approx(as_written.item(), rel=1e-5)


def test_a_decoder_prompted_with_findings_reads_one_token_per_finding_moved_by_its_probability(tiny_config):
    from napari_mg3d.model.heads import LinearClassifier, classifier_probabilities, report_memory
    from napari_mg3d.model.mg3d import VolumeEncoding

    names = ["Cardiomegaly", "Lung nodule", "Pleural effusion"]
    spec = {"type": "report", "layers": 1, "heads": 4, "max_len": 40, "vocab_size": 50, "findings": names}
    head = build_head(spec, tiny_config, vocab_size=30522)
    d = tiny_config.fusion_dim
    tokens = torch.randn(2, 8, d)
    p = torch.tensor([[0.0, 1.0, 0.25], [1.0, 0.0, 0.5]])
    memory = head.prompted_memory(tokens, p)
    assert memory.shape == (2, 8 + 3, d)
    torch.testing.assert_close(memory[:, :8], tokens)
    absent, present = head.finding_tokens.detach()
    torch.testing.assert_close(memory[0, 8], absent[0])  # probability 0: the finding's "absent" token
    torch.testing.assert_close(memory[0, 9], present[1])  # probability 1: its "present" token
    torch.testing.assert_close(memory[1, 10], (absent[2] + present[2]) / 2)
    with pytest.raises(ValueError, match="takes 3 finding probabilities per volume; got 18"):
        head.prompted_memory(tokens, torch.zeros(2, 18))

    # report_memory: the classifier's probabilities, or the tokens alone for a decoder without findings
    classifier = LinearClassifier(d, 3).eval()
    encoding = VolumeEncoding([], tokens, (2, 2, 2))
    with torch.no_grad():
        classifier.linear.bias.copy_(torch.tensor([30.0, -30.0, 0.0]))
        classifier.linear.weight.zero_()
    probabilities = classifier_probabilities(classifier, encoding)
    torch.testing.assert_close(report_memory(head, tokens, probabilities)[:, 8:],
                               torch.stack([absent + torch.tensor([1.0, 0.0, 0.5])[:, None] * (present - absent)] * 2))
    with pytest.raises(ValueError, match="drafts from the classifier's findings, and the bundle has no classifier"):
        report_memory(head, tokens, None)
    plain = build_head({k: v for k, v in spec.items() if k != "findings"}, tiny_config, vocab_size=30522)
    assert plain.findings is None and report_memory(plain, tokens, probabilities) is tokens
    assert "finding_tokens" not in plain.state_dict()  # bundles made before findings prompts load as before
