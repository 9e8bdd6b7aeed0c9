"""python -m training.finetune (every task) and python -m training.evaluate; metrics against hand values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("torchmetrics")

from napari_mg3d.checkpoint import load_bundle  # noqa: E402
from napari_mg3d.inference import Predictor  # noqa: E402
from napari_mg3d.labels import LABELS  # noqa: E402
from training import metrics as M  # noqa: E402
from training.evaluate import evaluate, format_table  # noqa: E402
from training.finetune import FinetuneParams, run  # noqa: E402
from training.params import parse_params  # noqa: E402

SHAPE = [40, 48, 56]


def _ft(tmp, bundle, task, **kw):
    settings = {"data": "synthetic:4", "steps": 2, "batch_size": 2, "synthetic_shape": SHAPE, "log_every": 1, **kw}
    return run(FinetuneParams(task=task, bundle=str(bundle), out_dir=str(tmp / task), **settings))


@pytest.fixture(scope="module")
def chained(tmp_path_factory, gui_bundle):
    """segment -> classify -> report -> vocabfine, each starting from the previous bundle."""
    tmp = tmp_path_factory.mktemp("ft")
    b = _ft(tmp, gui_bundle, "segment", seg_target="organs", val_data="synthetic:1")
    b = _ft(tmp, b, "classify", val_data="synthetic:3")
    b = _ft(tmp, b, "report")
    return _ft(tmp, b, "vocabfine", shots=2)


def test_each_task_writes_a_bundle_and_heads_accumulate(chained):
    b = load_bundle(chained)
    assert {"segmentation", "classifier", "report", "prompt"} <= set(b.heads)
    assert b.meta["head_specs"]["segmentation"]["classes"][1] == "body"
    words = b.meta["head_specs"]["report"]["vocabulary"]["words"]  # the decoder's vocabulary: report words
    assert {"no", "the", "."} <= set(words) and not any(w.startswith("##") for w in words)
    assert b.meta["head_specs"]["report"]["vocab_size"] == len(words) + 4
    assert [p["stage"] for p in b.meta["provenance_chain"]][-3:] == ["finetune-segment", "finetune-classify",
                                                                      "finetune-report"]
    assert b.meta["provenance"]["stage"] == "finetune-vocabfine"
    seg_metrics = b.meta["provenance_chain"][-3]["metrics"]
    assert "dice_per_class" in seg_metrics and "mean_dice" in seg_metrics
    assert Predictor(chained, device="cpu").capabilities() == {"segmentation": "", "scores": "", "report": "",
                                                               "heatmaps": ""}


def test_frozen_encoder_linear_probe_leaves_the_encoder_untouched(tmp_path, gui_bundle):
    before = load_bundle(gui_bundle).model.state_dict()
    probe = load_bundle(_ft(tmp_path, gui_bundle, "prognosis", freeze_encoder=True, multiclass=True, head_norm="batch",
                            label_names=["mild", "severe"] + [f"x{i}" for i in range(16)]))
    after = probe.model.state_dict()
    for key in ("vision.swin.patch_embed.net.0.weight", "proj16.weight"):
        assert np.array_equal(before[key].numpy(), after[key].numpy())
    # --head-norm batch: the bundle says so and carries the running statistics of the training volumes
    assert probe.meta["head_specs"]["prognosis"]["norm"] == "batch"
    # ... re-estimated after training with the final encoder on the training volumes
    from napari_mg3d.preprocess import PreprocessConfig
    from training.data import build_dataset, collate

    assert probe.meta["provenance"]["metrics"]["head_statistics_volumes"] == 4
    train = build_dataset("synthetic:4", PreprocessConfig(target_size=probe.config.input_size), None, 0, tuple(SHAPE))
    with torch.no_grad():
        pooled = probe.model.eval().encode_volume(collate([train[i] for i in range(4)])["volume"]).global_feature
    torch.testing.assert_close(probe.build_heads()[0]["prognosis"].norm.running_mean, pooled.mean(0), atol=1e-5, rtol=1e-4)
    with pytest.raises(SystemExit, match="--head-norm 'group': choose one of layer, batch"):
        _ft(tmp_path / "bad", gui_bundle, "classify", head_norm="group")
    with pytest.raises(SystemExit, match="--seg-target 'lesion': choose one of lesions, organs, all, organs\\+lesion"):
        _ft(tmp_path / "bad", gui_bundle, "segment", seg_target="lesion")  # before: trained on the 18 kinds silently


def test_own_encoder_classifier_trains_a_copy_and_leaves_the_shared_encoder_untouched(tmp_path, gui_bundle):
    from napari_mg3d.model.mg3d import VolumeEncoding
    from napari_mg3d.preprocess import PreprocessConfig
    from training.data import build_dataset, collate

    start = load_bundle(gui_bundle)
    before = start.model.state_dict()
    done = load_bundle(_ft(tmp_path, gui_bundle, "classify", own_encoder=True, lr_encoder=1e-2, val_data="synthetic:2"))
    assert done.meta["head_specs"]["classifier"]["own_encoder"] is True
    after = done.model.state_dict()
    for key in ("vision.swin.patch_embed.net.0.weight", "proj16.weight", "token_norm.weight", "pos_embed"):
        assert np.array_equal(before[key].numpy(), after[key].numpy()), key  # the shared encoder: as it was
    head = done.build_heads()[0]["classifier"].eval()
    own = head.encoder.state_dict()
    assert not np.array_equal(own["proj16.weight"].numpy(), before["proj16.weight"].numpy())  # its copy trained
    assert own["vision.swin.patch_embed.net.0.weight"].shape == before["vision.swin.patch_embed.net.0.weight"].shape
    # classify() reads the shared encoding's input volume and encodes it with the head's own encoder
    train = build_dataset("synthetic:2", PreprocessConfig(target_size=done.config.input_size), None, 0, tuple(SHAPE))
    x = collate([train[0], train[1]])["volume"]
    with torch.no_grad():
        shared = done.model.eval().encode_volume(x)
        torch.testing.assert_close(head.classify(shared), head(head.encoder(x).global_feature))
        assert not torch.allclose(head.classify(shared), head(shared.global_feature))
        with pytest.raises(ValueError, match="has its own volume encoder and needs the input volume"):
            head.classify(VolumeEncoding(shared.features, shared.tokens, shared.grid))
    # the plugin's scores are the own encoder's
    from napari_mg3d.synthetic import generate_sample
    from napari_mg3d.volume import Volume

    predictor = Predictor(done.path, device="cpu")
    sample = generate_sample(0, shape=SHAPE)
    result = predictor.run(Volume(sample.volume, sample.affine), outputs=("scores",))
    with torch.no_grad():
        expected = head.probabilities(head(head.encoder(predictor._input).global_feature))[0]
        from_shared = head.probabilities(head(done.model.encode_volume(predictor._input).global_feature))[0]
    assert result.score_source.startswith("classifier")
    scores = np.array(list(result.scores.values()))
    np.testing.assert_allclose(scores, expected.numpy(), atol=5e-3)  # the predictor runs in bf16 on an AMX CPU
    assert np.abs(scores - from_shared.numpy()).max() > 0.02
    with pytest.raises(SystemExit, match="--own-encoder is for --task classify or prognosis, not segment"):
        _ft(tmp_path / "bad", gui_bundle, "segment", own_encoder=True)
    with pytest.raises(SystemExit, match="--freeze-encoder trains none: choose one"):
        _ft(tmp_path / "bad", gui_bundle, "classify", own_encoder=True, freeze_encoder=True)


def test_report_prompted_with_findings_drafts_from_the_classifiers_probabilities(tmp_path, gui_bundle):
    from napari_mg3d.checkpoint import save_bundle
    from napari_mg3d.synthetic import generate_sample
    from napari_mg3d.volume import Volume

    start = load_bundle(gui_bundle)
    done = load_bundle(_ft(tmp_path, gui_bundle, "report", finding_prompts=True, freeze_encoder=True, lr=1e-2))
    assert done.meta["head_specs"]["report"]["findings"] == LABELS
    assert done.meta["provenance"]["params"]["finding_prompts"] is True
    heads = done.build_heads()[0]
    for key, value in start.build_heads()[0]["classifier"].state_dict().items():  # it read the classifier, frozen
        assert np.array_equal(value.numpy(), heads["classifier"].state_dict()[key].numpy()), key
    assert heads["report"].finding_tokens.shape == (2, 18, done.config.fusion_dim)

    # the plugin's draft reads the visual tokens and one token per finding made from the classifier's scores
    predictor = Predictor(done.path, device="cpu")
    seen = []
    generate = predictor.heads["report"].generate
    predictor.heads["report"].generate = lambda memory, settings=None: seen.append(memory) or generate(memory, settings)
    classify, passes = predictor.heads["classifier"].classify, []
    predictor.heads["classifier"].classify = lambda encoding: passes.append(1) or classify(encoding)
    sample = generate_sample(0, shape=SHAPE)
    result = predictor.run(Volume(sample.volume, sample.affine), outputs=("scores", "report"))
    assert len(passes) == 1  # one classifier pass serves the scores and the draft
    (memory,) = seen
    tokens = predictor._encoding.tokens
    assert memory.shape == (1, tokens.shape[1] + 18, tokens.shape[2])
    probabilities = torch.tensor([list(result.scores.values())])
    expected = heads["report"].prompted_memory(tokens.float(), probabilities)[:, -18:]
    torch.testing.assert_close(memory[:, -18:].float(), expected, atol=3e-2, rtol=3e-2)  # bf16 on an AMX CPU
    # without its classifier such a decoder cannot draft: the output is greyed out with the reason, not a crash
    del predictor.heads["classifier"]
    reason = predictor.capabilities()["report"]
    assert reason == ("its report decoder drafts from the classifier's findings: the bundle has no classifier head "
                      "(fine-tune with --task classify)")
    assert f"report disabled: {reason}" in predictor.run(Volume(sample.volume, sample.affine),
                                                         outputs=("report",)).messages

    with pytest.raises(SystemExit, match="--finding-prompts is for --task report, not classify"):
        _ft(tmp_path / "bad", gui_bundle, "classify", finding_prompts=True)
    rest = {k: v for k, v in start.build_heads()[0].items() if k != "classifier"}
    specs = {k: v for k, v in start.meta["head_specs"].items() if k != "classifier"}
    no_classifier = save_bundle(tmp_path / "no_classifier", start.model, heads=rest, meta={"head_specs": specs})
    with pytest.raises(SystemExit, match="has no multi-label classifier head .* run --task classify on it first"):
        _ft(tmp_path / "bad", no_classifier, "report", finding_prompts=True)


def test_classifier_starts_from_the_training_prevalence(tmp_path, gui_bundle):
    from napari_mg3d.synthetic import finding_prevalence

    def bias(**kw):  # two steps at a negligible rate: the bias is where it started
        b = load_bundle(_ft(tmp_path / str(len(kw)), gui_bundle, "classify", lr=1e-12, **kw))
        return b.build_heads()[0]["classifier"].linear.bias

    p = finding_prevalence()
    assert torch.allclose(bias(), torch.full((18,), float(np.log(p / (1 - p)))), atol=1e-4)
    for removed in ("--bias-init", "--pooling", "--lr-schedule", "--warmup-steps"):  # options without a gain
        with pytest.raises(SystemExit):
            parse_params([removed, "x", "--steps", "2"], "finetune", "", FinetuneParams)


def test_encoder_frozen_for_the_first_steps_then_fine_tuned(tmp_path, gui_bundle):
    key = "vision.swin.patch_embed.net.0.weight"
    before = load_bundle(gui_bundle).model.state_dict()[key].numpy()
    all_frozen = load_bundle(_ft(tmp_path / "a", gui_bundle, "classify", freeze_encoder_steps=2))
    assert np.array_equal(all_frozen.model.state_dict()[key].numpy(), before)
    assert all_frozen.meta["provenance"]["params"]["freeze_encoder_steps"] == 2
    one_frozen = load_bundle(_ft(tmp_path / "b", gui_bundle, "classify", freeze_encoder_steps=1))
    assert not np.array_equal(one_frozen.model.state_dict()[key].numpy(), before)
    with pytest.raises(SystemExit, match="--freeze-encoder-steps 3: choose 0 to --steps"):
        _ft(tmp_path / "c", gui_bundle, "classify", freeze_encoder_steps=3)


def test_segmentation_needs_an_input_of_64(tmp_path, tiny_config):
    from napari_mg3d.checkpoint import save_bundle
    from napari_mg3d.model import MG3DModel

    small = save_bundle(tmp_path / "small", MG3DModel(tiny_config))
    with pytest.raises(SystemExit, match="at least 64 voxels"):
        _ft(tmp_path, small, "segment")


def test_evaluate_reports_every_metric_it_can(chained):
    res = evaluate(str(chained), "synthetic:6", n_boot=20, synthetic_shape=SHAPE)
    for key in ("classifier_auc", "dice", "bleu1", "bleu4", "rougeL", "recall@5", "finding_f1"):
        assert key in res, key
    assert 0 <= res["dice"]["value"] <= 1 and res["dice"]["low"] <= res["dice"]["high"]
    assert res["recall@5"]["chance"] == pytest.approx(5 / 6)
    table = format_table(res)
    assert table.startswith("| Dice (%) | AUC (%) | BLEU-1") and "n = 6 volumes" in table
    assert "finding F1 of drafts (macro)" in table
    pointing = res["pointing"]  # synthetic data: every finding sentence's heat-map peak checked against its lesion
    assert pointing["n_sentences"] > 0 and 0 <= pointing["value"] <= 1 and 0 < pointing["chance"] < 1
    assert "pointing (%)" in table and f"(chance {100 * pointing['chance']:.2f})" in table
    per_finding = res["pointing_per_finding"]
    assert sum(f["n"] for f in per_finding.values()) == pointing["n_sentences"] and set(per_finding) <= set(LABELS)
    assert set(res["finding_f1"]["per_finding"]) == set(load_bundle(chained).meta["head_specs"]["classifier"]["labels"])
    # the classifier's own yes/no calls (p > 0.5), scored as a draft saying exactly those would be
    calls = res["classifier_finding_f1"]
    assert set(calls["per_finding"]) == set(LABELS) and 0 <= calls["micro_f1"] <= 1


def test_evaluate_names_its_zero_shot_source_and_refuses_nan_scores(chained, monkeypatch):
    res = evaluate(str(chained), "synthetic:4", n_boot=10, synthetic_shape=SHAPE)
    assert res["zero_shot_source"] == "prompt (CT-VocabFine)"  # the chained bundle has a prompt head
    assert "zero-shot scores from prompt (CT-VocabFine)" in format_table(res)

    def nan_scores(source, model, heads, encoding, names):
        return torch.full((encoding.tokens.shape[0], len(names)), float("nan"))

    monkeypatch.setattr("training.evaluate.finding_scores", nan_scores)
    with pytest.raises(SystemExit, match="4 of 4 volumes got NaN/inf scores.*no AUC is computed"):
        evaluate(str(chained), "synthetic:4", n_boot=10, synthetic_shape=SHAPE)


def test_recall_in_pools_ranks_each_report_among_its_own_pool_only():
    s = np.eye(6)
    s[0, 3] = 2.0  # report 0 prefers volume 3, which is in the other pool of 3
    assert M.recall_at_k(s, 1) == pytest.approx(5 / 6)
    assert M.recall_at_k_in_pools(s, 1, 3) == 1.0
    assert M.recall_at_k_in_pools(np.eye(7), 1, 3) == 1.0  # the 7th report, in no full pool, is left out
    with pytest.raises(ValueError, match="Recall@10 among 100 needs at least 100"):
        M.recall_at_k_in_pools(np.eye(50), 10, 100)
    assert M.binomial_se(0.5, 100) == pytest.approx(0.05)


def test_pointing_hit_is_the_peak_cell_in_the_lesion_beside_the_lesion_share():
    cells = np.zeros((2, 2, 2), bool)
    cells[0, 1, 1] = True
    heat = np.zeros((2, 2, 2))
    heat[0, 1, 1] = 1.0
    assert M.pointing_hit(heat, cells) == (True, 1 / 8)
    assert M.pointing_hit(np.roll(heat, 1, axis=0), cells) == (False, 1 / 8)
    assert M.pointing_hit(heat, np.zeros_like(cells)) is None  # no lesion cell: nothing to point at
    with pytest.raises(ValueError, match="different grids"):
        M.pointing_hit(np.zeros((4, 4, 4)), cells)


def test_sample_pointing_hits_a_heat_map_on_the_lesion_and_misses_one_away_from_it():
    from types import SimpleNamespace

    import torch.nn.functional as F

    from napari_mg3d.model.config import preset_config
    from napari_mg3d.preprocess import labels_to_model, preprocess, preprocess_config_of
    from napari_mg3d.synthetic import generate_sample
    from napari_mg3d.volume import Volume
    from training.evaluate import sample_pointing

    sample = generate_sample(3, shape=(80, 112, 144), tier="visible", findings=["Pleural effusion"])
    _, record = preprocess(Volume(sample.volume, sample.affine), preprocess_config_of(None, preset_config("tiny")))
    linked = [k for k, names in enumerate(sample.sentence_links) if names]
    mask = np.zeros(sample.volume.shape, np.uint8)
    for name in sample.sentence_links[linked[0]]:
        mask[sample.lesions[name]] = 1
    share = torch.from_numpy(labels_to_model(mask, record, representation="probabilities")[1]).float()
    densest = F.adaptive_max_pool3d(share[None, None], (4, 4, 4))[0, 0]

    def model_pointing_at(cell_map):
        heat = torch.zeros(len(sample.sentences), 4, 4, 4)
        heat[:] = cell_map
        return SimpleNamespace(encode_sentences_separately=lambda text: (None, None),
                               sentence_heatmaps=lambda enc, sent, valid: heat[None])

    text = SimpleNamespace(sentence_valid=None)
    on = sample_pointing(model_pointing_at(densest), None, text, sample, record)
    off = sample_pointing(model_pointing_at((densest == 0).float()), None, text, sample, record)
    assert len(on) == len(off) == len(linked) == 1
    assert on[0][0] and not off[0][0]
    assert on[0][1] == off[0][1] == pytest.approx(float((densest > 0.25).float().mean()))
    assert on[0].finding == off[0].finding == "Pleural effusion"


def test_pointing_per_finding_gives_each_findings_hit_rate_in_label_order():
    from training.evaluate import PointingHit, pointing_per_finding

    hits = [PointingHit(True, 0.2, "Pleural effusion"), PointingHit(False, 0.1, "Cardiomegaly"),
            PointingHit(False, 0.3, "Cardiomegaly"), PointingHit(True, 0.2, "Cardiomegaly"),
            PointingHit(False, 0.4, "Pleural effusion")]
    per = pointing_per_finding(hits)
    assert list(per) == ["Cardiomegaly", "Pleural effusion"]  # the order of LABELS
    assert per["Cardiomegaly"] == {"hit_rate": pytest.approx(1 / 3), "chance": pytest.approx(0.2), "n": 3}
    assert per["Pleural effusion"] == {"hit_rate": 0.5, "chance": pytest.approx(0.3), "n": 2}
    assert pointing_per_finding([]) == {}


def test_auc_ranks_large_logits_instead_of_squashing_them():
    # A perfectly separating classifier whose logits are all large (e.g. a classifier whose standardisation
    # shifted every logit far out): the ranking is perfect, so the AUC is 1. A sigmoid in float32 first makes
    # every score 1.0 and the AUC 0.5 (what torchmetrics' binary_auroc did).
    assert M.auc([0, 0, 1, 1, 0], [20.0, 25.0, 40.0, 35.0, 18.0]) == pytest.approx(1.0)
    assert M.auc([0, 1], [-300.0, -200.0]) == pytest.approx(1.0)
    assert M.auc([0, 0, 1, 1], [3.0, 3.0, 3.0, 3.0]) == pytest.approx(0.5)  # ties count half
    assert M.auc([1, 0, 1, 0], [0.9, 0.9, 0.2, 0.1]) == pytest.approx(0.625)  # one tied pair, 2.5 of 4 pairs
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        M.auc([0, 1, 1], [0.1, 0.2])


def test_evaluate_ranks_classifier_logits_that_a_float32_sigmoid_would_tie():
    from napari_mg3d.model.heads import LinearClassifier
    from napari_mg3d.model.mg3d import VolumeEncoding
    from training.evaluate import classifier_ranking_scores

    head = LinearClassifier(2, 1, norm="layer").eval()
    with torch.no_grad():
        head.norm = torch.nn.Identity()
        head.linear.weight.copy_(torch.tensor([[1.0, 0.0]]))
        head.linear.bias.fill_(0.0)
    tokens = torch.tensor([20.0, 30.0, 40.0])[:, None, None] * torch.tensor([1.0, 0.0])  # (3 volumes, 1 token, 2)
    enc = VolumeEncoding([], tokens, (1, 1, 1))
    assert torch.sigmoid(head.classify(enc)).unique().numel() == 1  # the probabilities tie at 1.0
    scores = classifier_ranking_scores(head, enc)[:, 0]
    assert scores.tolist() == pytest.approx([20.0, 30.0, 40.0])
    assert M.auc([0, 1, 1], scores.numpy()) == pytest.approx(1.0)


def test_metrics_match_hand_computed_values():
    assert M.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert np.isnan(M.auc([1, 1], [0.2, 0.3]))
    labels = np.array([[0, 1, 0], [0, 1, 0], [1, 1, 0], [1, 1, 0]])
    scores = np.array([[0.1, 0.5, 0.2], [0.4, 0.1, 0.3], [0.35, 0.2, 0.1], [0.8, 0.9, 0.4]])
    # A label without negatives (or positives) among the volumes has no AUC and is left out.
    assert M.auc_per_label(labels, scores, ["a", "all positive", "all negative"]) == pytest.approx({"a": 0.75})
    assert M.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2], b[1:3] = True, True
    assert M.dice(a, b) == pytest.approx(0.5)
    # One Dice convention: a class in neither mask is undefined and left out of means; predicted only: 0.
    empty = np.zeros((4, 4), bool)
    assert np.isnan(M.dice(empty, empty)) and M.dice(a, empty) == 0.0
    pred, gold = np.array([0, 1, 1, 3]), np.array([0, 1, 2, 0])
    per = M.dice_per_class(pred, gold, 5)
    assert per[:3] == [pytest.approx(2 / 3), 0.0, 0.0] and np.isnan(per[3])
    assert M.mean_defined(per) == pytest.approx(2 / 9) and np.isnan(M.mean_defined([float("nan"), None]))
    assert M.mean_auc(labels, scores) == pytest.approx(0.75)  # the same labels as auc_per_label
    assert M.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert M.bleu(["the the the"], ["the cat"], n=1) == pytest.approx(1 / 3)  # clipped unigram precision
    assert M.rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 * 1 * 0.5 / 1.5, rel=1e-5)
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.0, 0.3, 0.5]])
    assert M.recall_at_k(sim, 1) == pytest.approx(2 / 3)
    assert M.recall_at_k(sim, 2) == pytest.approx(1.0)
    ci = M.bootstrap(lambda x: float(np.mean(x)), np.arange(100, dtype=float), n=300)
    assert ci["value"] == pytest.approx(49.5) and ci["low"] < 49.5 < ci["high"] and ci["high"] - ci["low"] < 25


@pytest.mark.slow
def test_finetune_with_ddp_on_two_cpu_processes(tmp_path, gui_bundle):
    import os
    import subprocess
    import sys
    from pathlib import Path

    cmd = [sys.executable, "-m", "training.finetune", "--task", "classify", "--bundle", str(gui_bundle),
           "--data", "synthetic:4", "--steps", "2", "--batch-size", "1", "--synthetic-shape", *map(str, SHAPE),
           "--device", "cpu", "--devices", "2", "--strategy", "ddp", "--log-every", "1", "--out-dir", str(tmp_path)]
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step 2/2") == 1  # printed by the first process only
    meta = load_bundle(tmp_path / "bundle").meta
    assert meta["provenance"]["world_size"] == 2
    assert "classifier" in meta["head_specs"] and "segmentation" in meta["head_specs"]


def test_vocabfine_training_prompts_match_the_prompts_inference_reads(tiny_config):
    """The CT-VocabFine head is trained and applied on the same prompt features."""
    import torch

    from napari_mg3d.model import MG3DModel
    from napari_mg3d.model.heads import PromptScorer, prompt_batch
    from training.finetune import TaskStep

    model = MG3DModel(tiny_config)
    names = ["Pleural effusion", "Cardiomegaly"]
    step = TaskStep("vocabfine", model, PromptScorer(model.config.fusion_dim), {}, names, False, "x")
    trained = step._prompts(torch.device("cpu"))
    _, read = model.encode_sentences_separately(prompt_batch(model.text.tokenizer, names))
    torch.testing.assert_close(trained, read)
    assert not torch.allclose(trained[:, 0], trained[:, 1], atol=1e-3)


def test_metrics_cannot_flatter():
    # a collapsed encoder (every similarity equal) retrieves nothing: ties do not count as hits
    assert M.recall_at_k(np.ones((8, 8)), 5) == 0.0
    assert M.recall_at_k(np.eye(8), 1) == 1.0
    # the bootstrap averages over one fixed label set: those with both classes among all the volumes
    rng = np.random.default_rng(0)
    y = np.zeros((40, 3))
    y[:20, 0], y[0, 1] = 1, 1  # label 1 has a single positive: most resamples lack it
    p = rng.random((40, 3)) + y
    res = M.bootstrap_mean_auc(y, p, ["a", "rare", "never"], n=200)
    assert res["labels"] == ["a", "rare"] and res["n_labels"] == 2
    assert 0 < res["resamples"] < 200 and res["low"] <= res["value"] <= res["high"]
    # punctuation is split from words, as report-generation papers tokenise
    assert M.bleu(["No pleural effusion."], ["No pleural effusion ."], n=4) == pytest.approx(1.0)
    assert M.meteor(["no pleural effusion ."], ["No pleural effusion."]) == pytest.approx(1 - 0.5 * (1 / 4) ** 3)
    # METEOR by hand: 2 of 3 words match in one chunk; P = 2/3, R = 2/2
    p_, r_ = 2 / 3, 1.0
    expected = p_ * r_ / (0.9 * p_ + 0.1 * r_) * (1 - 0.5 * (1 / 2) ** 3)
    assert M.meteor(["heart is enlarged"], ["heart is"]) == pytest.approx(expected)
    assert M.meteor(["nothing"], ["heart"]) == 0.0


def test_evaluate_draws_its_figures_beside_the_json(chained, tmp_path):
    import imageio.v3 as iio

    res = evaluate(str(chained), "synthetic:6", n_boot=10, synthetic_shape=SHAPE, figures_dir=tmp_path)
    assert set(res["figures"]) >= {"roc_classifier.png", "recall_at_k.png", "dice_per_class.png", "results.md"}
    for name in res["figures"]:
        if name.endswith(".png"):
            image = iio.imread(tmp_path / name)
            assert image.shape[0] > 200 and image[..., :3].std() > 5, name  # drawn, not blank
    assert (tmp_path / "results.md").read_text().startswith("| Dice (%)")
    assert set(res["dice_per_class"]) <= set(load_bundle(chained).meta["classes"][1:])


def test_a_bf16_classifier_run_validates_and_keeps_its_bundle_if_validation_fails(tmp_path, gui_bundle, monkeypatch):
    # numpy has no bfloat16: the validation AUC used to crash after training and lose the trained head
    b = load_bundle(_ft(tmp_path, gui_bundle, "classify", val_data="synthetic:3", precision="bf16-mixed"))
    assert "mean_auc" in b.meta["provenance"]["metrics"]
    from training import finetune

    def broken(*args, **kwargs):
        raise RuntimeError("disk vanished")

    monkeypatch.setattr(finetune, "validate", broken)
    kept = load_bundle(_ft(tmp_path / "again", gui_bundle, "classify", val_data="synthetic:3"))
    assert kept.meta["provenance"]["metrics"]["validation_error"] == "RuntimeError: disk vanished"
    assert "classifier" in kept.heads


def test_a_stopped_and_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, gui_bundle):
    """Weights, optimiser state, loss history and the data order survive --stop-after-steps / --resume last."""
    common = dict(data="synthetic:5", steps=4, batch_size=2, lr=1e-3, lr_encoder=1e-3, checkpoint_every=2)
    whole = load_bundle(_ft(tmp_path / "whole", gui_bundle, "classify", **common))
    first = _ft(tmp_path / "parts", gui_bundle, "classify", stop_after_steps=3, **common)
    assert first.name == "last.ckpt" and not (first.parent.parent / "classify" / "bundle").exists()
    with pytest.raises(SystemExit, match="holds an earlier fine-tuning run.*--resume last"):
        _ft(tmp_path / "parts", gui_bundle, "classify", **common)  # a new run would lose the stopped one
    with pytest.raises(SystemExit, match=r"other options: --lr 0.001 \(now 0.01\)"):
        _ft(tmp_path / "parts", gui_bundle, "classify", resume="last", **{**common, "lr": 1e-2})
    first_part = torch.load(first, map_location="cpu", weights_only=False)["seconds"]
    parts = load_bundle(_ft(tmp_path / "parts", gui_bundle, "classify", resume="last", **common))
    assert parts.meta["provenance"]["seconds"] > first_part > 0  # the stage's wall time counts both parts
    assert parts.model_card["trained_on"]["steps"][-1]["seconds"] == parts.meta["provenance"]["seconds"]
    a, b = whole.model.state_dict(), parts.model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    head_a, head_b = whole.build_heads()[0]["classifier"], parts.build_heads()[0]["classifier"]
    assert torch.allclose(head_a.linear.weight, head_b.linear.weight, atol=1e-6)
    history = [(tmp_path / d / "classify" / "loss_history.csv").read_text() for d in ("whole", "parts")]
    assert history[0] == history[1] and history[0].count("\n") == 5  # header and 4 steps
    assert not first.exists()  # a finished run lives on as its bundle; the folder takes a new run again
    broken = tmp_path / "broken" / "classify" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="checkpoint .*last.ckpt is empty or corrupt"):
        _ft(tmp_path / "broken", gui_bundle, "classify", resume="last", **common)


def test_epoch_sampler_resumes_mid_epoch_and_shares_epochs_between_ranks():
    from itertools import islice

    from training.finetune import EpochSampler

    full = list(islice(iter(EpochSampler(5, seed=3)), 15))
    assert sorted(full[:5]) == list(range(5)) and sorted(full[5:10]) == list(range(5)) and full[:5] != full[5:10]
    assert list(islice(iter(EpochSampler(5, seed=3, start=7)), 8)) == full[7:15]
    ranks = [list(islice(iter(EpochSampler(6, seed=1, rank=r, world=2)), 3)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(6))


def test_classify_reads_the_volumes_pre_training_cached_without_making_label_maps(tmp_path, gui_bundle, monkeypatch):
    from napari_mg3d.preprocess import preprocess_config_of
    from training.data import SyntheticDataset

    config = preprocess_config_of(load_bundle(gui_bundle).meta, load_bundle(gui_bundle).config)
    cached = SyntheticDataset(4, config, seed=0, shape=tuple(SHAPE), with_mask=False, cache_dir=tmp_path / "cache")
    for i in range(4):
        cached[i]  # as pre-training caches them: volumes and reports, no label maps
    entries = sorted((tmp_path / "cache").rglob("*.npz"))

    def no_generation(self, index):
        raise AssertionError(f"volume {index} was generated again instead of read from the cache")

    monkeypatch.setattr(SyntheticDataset, "_make", no_generation)
    _ft(tmp_path, gui_bundle, "classify", seed=0, cache_dir=str(tmp_path / "cache"))
    assert sorted((tmp_path / "cache").rglob("*.npz")) == entries
