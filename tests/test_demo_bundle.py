"""The demo bundle shipped in the package: loads by default, has every head, is small, records its metrics."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mg3d.inference import DEMO_BUNDLE_DIR, Predictor


@pytest.fixture(scope="module")
def demo():
    if not (DEMO_BUNDLE_DIR / "config.json").is_file():
        pytest.skip(f"no demo bundle at {DEMO_BUNDLE_DIR}; make it with python -m training.make_demo_bundle")
    return Predictor(device="cpu")


def test_demo_bundle_is_the_default_and_has_every_output(demo):
    assert demo.capabilities() == {"segmentation": "", "scores": "", "report": "", "heatmaps": ""}
    assert demo.config.preset == "tiny" and len(demo.label_names) == 18
    assert demo.class_names[:3] == ["background", "body", "lung_right"]


def test_demo_bundle_is_small_and_records_how_it_was_made(demo):
    size = sum(f.stat().st_size for f in DEMO_BUNDLE_DIR.rglob("*") if f.is_file())
    assert size <= 25 * 10**6
    meta = demo.bundle.meta
    assert meta["made_by"].startswith("python -m training.make_demo_bundle")
    stages = [p["stage"] for p in meta["provenance_chain"]] + [meta["provenance"]["stage"]]
    assert stages[0] == "pretrain" and "finetune-segment" in stages and stages[-1] == "finetune-report"
    seg = next(p for p in meta["provenance_chain"] if p["stage"] == "finetune-segment")
    assert seg["metrics"]["dice_per_class"]["lung_left"] > 0.8  # organs are learned even by the demo model


def test_demo_prints_the_truth_beside_the_draft_and_ranks_the_true_findings():
    from napari_mg3d.demo import truth_beside_outputs

    summary = {"sample_report": "Cardiomegaly. A nodule.", "report_draft": ["No effusion."],
               "sample_findings": ["Cardiomegaly", "Lung nodule"],
               "scores": {"heading": "Classifier probability",
                          "values": {"Cardiomegaly": 0.9, "Emphysema": 0.6, "Lung nodule": 0.2, "Atelectasis": 0.1}}}
    text = "\n".join(truth_beside_outputs(summary))
    assert text.index("Cardiomegaly. A nodule.") < text.index("drafted by the model:") < text.index("No effusion.")
    assert "  0.90  #1  Cardiomegaly" in text and "  0.20  #3  Lung nodule" in text
    others = text.split("the highest of the other findings")[1]
    assert "0.60  #2  Emphysema" in others and "Cardiomegaly" not in others
    assert "(a denial" not in text
    marked = "\n".join(truth_beside_outputs({**summary, "report_draft": ["Cardiomegaly.", "No effusion."],
                                             "sentences": [{"drafted_denial": False}, {"drafted_denial": True}],
                                             "cautions": ["The draft's denials are not rule-outs."]}))
    assert "  Cardiomegaly.\n  No effusion.   (a denial: not a rule-out)\n  The draft's denials" in marked
    bare = "\n".join(truth_beside_outputs({**summary, "report_draft": [], "scores": {}}))
    assert "drafted by the model: (no report head)" in bare and "rank of" not in bare


def test_demo_measures_the_segmented_lesions_against_the_true_ones():
    from types import SimpleNamespace

    from napari_mg3d.demo import lesion_overlap, truth_beside_outputs
    from napari_mg3d.labels import ORGAN_LESION_CLASSES, ORGANS

    nodule, effusion, heart = (np.zeros((4, 6, 8), bool) for _ in range(3))
    nodule[1, 1, 1:3] = True  # 2 voxels
    effusion[2:4, 3:5, 4:8] = True  # 16 voxels
    heart[0] = True
    sample = SimpleNamespace(lesions={"nodule_1": nodule, "effusion_right": effusion, "heart": heart,
                                      "emphysema": np.zeros_like(nodule)},
                             lesion_labels={"nodule_1": "Lung nodule", "effusion_right": "Pleural effusion",
                                            "heart": "Cardiomegaly", "emphysema": "Emphysema"})
    lesion = ORGAN_LESION_CLASSES.index("lesion")
    labels = np.where(effusion, lesion, 0)
    labels[0, 0, :4] = lesion  # 4 voxels labelled a lesion where there is none (in the enlarged heart)
    labels[1, 1, 1] = ORGANS.index("heart") + 1
    found = lesion_overlap(labels, ORGAN_LESION_CLASSES, sample)
    assert found["dice"] == pytest.approx(2 * 16 / (20 + 18))
    assert found["share_of_each_lesion"] == {"Lung nodule": 0.0, "Pleural effusion": 1.0}  # cardiomegaly: no lesion
    assert lesion_overlap(labels, ["background", *ORGANS], sample) is None  # an organs-only head
    text = "\n".join(truth_beside_outputs({"sample_report": "", "report_draft": [], "segmented_lesions": found}))
    assert "labelled as a lesion against the sample's true lesions: Dice 0.84" in text
    assert "100% of the pleural effusion labelled" in text and "  0% of the lung nodule labelled" in text


def test_demo_targets_say_met_missed_or_not_measured_for_each_output():
    from napari_mg3d.labels import ORGANS
    from training.make_demo_bundle import demo_targets

    res = {"dice_per_class": {**{o: 0.9 for o in ORGANS}, "aorta": 0.4, "Lung nodule": 0.6, "Pleural effusion": 0.2},
           "classifier_auc": {"value": 0.93, "low": 0.9, "high": 0.96},
           "drafts": [{"generated": "No broffusion. Cardiomegaly.", "reference": "Cardiomegaly."}],
           "finding_f1": {"macro_f1": 0.5, "micro_f1": 0.8}, "pointing": {"value": 0.7, "chance": 0.1, "n_sentences": 9}}
    hits = [{"sentence": "a", "peak_in_lesion": True}, {"sentence": "b", "peak_in_lesion": False}]
    rows = {(r["output"], r["metric"]): r for r in demo_targets(res, {"no", "cardiomegaly"}, hits)}
    assert rows[("organ: heart", "Dice")]["met"] is True and rows[("organ: aorta", "Dice")]["met"] is False
    lesions = rows[("lesions (every lesion class present, mean)", "Dice")]
    assert lesions["measured"] == pytest.approx(0.4) and lesions["met"] is False and lesions["classes"] == 2
    assert rows[("abnormality scores (classifier)", "mean AUC over the 18 findings")]["met"] is True
    words = rows[("drafted report", "share of drafted words that occur in reports")]
    assert words["measured"] == pytest.approx(2 / 3) and words["met"] is False  # "broffusion" is no word
    assert rows[("drafted report", "finding F1 (macro over findings)")]["met"] is False
    assert rows[("heat maps", "pointing game: peak in the sentence's lesion")]["met"] is True
    demo_row = rows[("heat maps on the demo's own sample", "finding sentences peaking in their lesion")]
    assert (demo_row["measured"], demo_row["of"], demo_row["met"]) == (1.0, 2, False)
    # each miss carries where it comes from, measured; a met target carries nothing
    assert words["shortfall"] == "not report words: broffusion" and demo_row["shortfall"] == "missed: b"
    assert "shortfall" not in rows[("heat maps", "pointing game: peak in the sentence's lesion")]
    detailed = {**res, "finding_f1": {"macro_f1": 0.5, "per_finding": {
        "Cardiomegaly": {"f1": 1.0}, "Lung nodule": {"f1": 0.1}, "Emphysema": {"f1": None}, "Atelectasis": {"f1": 0.0}}},
        "classifier_finding_f1": {"macro_f1": 0.73}}
    f1_row = next(r for r in demo_targets(detailed, {"no", "cardiomegaly"}, hits) if r["metric"].startswith("finding F1"))
    assert f1_row["shortfall"] == ("lowest: Atelectasis 0.00, Lung nodule 0.10, Cardiomegaly 1.00; the classifier's "
                                   "own calls (p > 0.5), which the drafts read, reach 0.73")
    bare = {(r["output"], r["metric"]): r for r in demo_targets({}, set(), None)}
    assert all(r["met"] is None and r["measured"] is None for r in bare.values())  # no head: not measured, not met
    one_class = {**res, "dice_per_class": {**{o: 0.9 for o in ORGANS}, "lesion": 0.62}}
    rows = {(r["output"], r["metric"]): r for r in demo_targets(one_class, set(), None)}
    lesion = rows[("lesions (one class, any kind)", "Dice, mean over the volumes with a lesion")]
    assert lesion["measured"] == pytest.approx(0.62) and lesion["met"] is True
    assert not any(key[0].startswith("lesions (every") for key in rows)


def test_the_demo_sample_is_drawn_in_the_tier_the_model_was_trained_on():
    from napari_mg3d.model_card import synthetic_tier

    assert synthetic_tier({"trained_on": {"data": ["synthetic:8000,visible", "synthetic:16, visible"]}}) == "visible"
    assert synthetic_tier({"trained_on": {"data": ["synthetic:2000", "synthetic:16,visible"]}}) == "hard"
    assert synthetic_tier({"trained_on": {"data": ["manifest:ct.csv"]}}) == "hard"
    assert synthetic_tier({}) == "hard"


def test_make_demo_bundle_writes_measured_targets_into_the_card_and_reruns_nothing_done(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    from napari_mg3d.checkpoint import load_bundle, read_model_card
    from training import finetune, make_demo_bundle

    args = ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "bundle"), "--pairs", "4",
            "--pretrain-steps", "2", "--finetune-steps", "2", "--batch-size", "2", "--held-out", "3",
            "--synthetic-shape", "40", "48", "56", "--cache-dir", str(tmp_path / "cache"), "--workers", "0",
            "--precision", "32-true"]
    out = make_demo_bundle.main(args)
    name, card = read_model_card(out)
    assert card["held_out"]["data"] == "synthetic:3,visible" and card["held_out"]["seeds"] == [900000, 900002]
    targets = {(t["output"], t["metric"]): t for t in card["targets"]}
    assert len(targets) == 15 and all(t["met"] in (True, False) for t in targets.values())
    auc = targets[("abnormality scores (classifier)", "mean AUC over the 18 findings")]
    assert 0 <= auc["measured"] <= 1 and auc["target"] == 0.9
    assert targets[("drafted report", "share of drafted words that occur in reports")]["measured"] == 1.0
    assert card["trained_on"]["data"] == ["synthetic:4,visible"]  # the training data of every stage
    # the wall time from nothing: every stage's recorded seconds and the measurement's
    stage_seconds = [s["seconds"] for s in card["trained_on"]["steps"]]
    assert len(stage_seconds) == 4 and min(stage_seconds) > 0
    assert card["made_in_seconds"] == pytest.approx(sum(stage_seconds) + card["held_out"]["seconds"], abs=0.2)
    made = load_bundle(out).meta
    assert made["made_by"].startswith("python -m training.make_demo_bundle --work")
    report = made["provenance"]["params"]  # the report stage drafts from the classifier's findings
    assert (report["task"], report["seed"], report["finding_prompts"]) == ("report", 102, True)
    assert made["head_specs"]["report"]["findings"] == made["head_specs"]["classifier"]["labels"]

    def no_training(*a, **k):
        raise AssertionError("a stage made with the same settings ran again")

    monkeypatch.setattr(finetune, "run", no_training)
    monkeypatch.setattr(make_demo_bundle.pretrain, "run", no_training)
    again = make_demo_bundle.main(args)
    assert read_model_card(again)[1]["targets"] == card["targets"]
    # the last stage alone, from the stage before it: its seed is the stage's own, as in the whole recipe, so
    # it is the stage already made (before, the seed came from its position in --tasks: 100, and it ran again)
    alone = [*args, "--from-bundle", str(tmp_path / "work" / "classify" / "bundle"), "--tasks", "report"]
    assert read_model_card(make_demo_bundle.main(alone))[1]["targets"] == card["targets"]


def test_a_finished_benchmark_run_counts_as_the_demo_bundles_pre_training_stage(tmp_path):
    """The demo pre-trains with the recipe the synthetic benchmark measured: the documented benchmark command's
    run (docs/benchmark.md) is accepted as the stage, and a run with another learning rate is not."""
    import json

    from experiments import synthetic_proof as bench
    from training.make_demo_bundle import pretrain_params
    from training.params import made_with

    run_with = bench.runtime(1, "bf16-mixed", "runs/cache")
    pre_with = {**bench.pretrain_runtime(run_with, 100), "lr_vision": bench.LR_VISION, "lr_fusion": bench.LR_FUSION}
    full = ("mim", "mlm", "sfr", "cml", "ssm", "dfa", "sva")
    shape = [80, 112, 144]

    def bundle_trained_with(params, name):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"provenance": {"params": params.to_dict()}}))
        return folder

    measured = bench.pretrain_params(tmp_path / "full", 8000, 3000, full, shape, 8, tier="visible", preset="tiny",
                                     resume="last", **pre_with)
    demo = pretrain_params(tmp_path / "demo", "synthetic:8000,visible", 3000, 8, shape, run_with,
                           input_size=None, text_encoder="")
    assert made_with(bundle_trained_with(measured, "benchmark"), demo)
    slower = bench.pretrain_params(tmp_path / "slow", 8000, 3000, full, shape, 8, tier="visible", preset="tiny",
                                   **{**pre_with, "lr_vision": 2e-4})
    assert not made_with(bundle_trained_with(slower, "other_lr"), demo)
    hybrid = bench.pretrain_params(tmp_path / "hybrid", 8000, 3000, full, shape, 8, tier="visible", preset="tiny",
                                   **{**pre_with, "conv_stages": 2})
    assert not made_with(bundle_trained_with(hybrid, "hybrid"), demo)
    assert made_with(bundle_trained_with(hybrid, "hybrid_again"),
                     pretrain_params(tmp_path / "demo", "synthetic:8000,visible", 3000, 8, shape, run_with,
                                     input_size=None, text_encoder="", conv_stages=2))


def test_an_interrupted_stage_is_continued_with_the_same_settings_and_set_aside_with_others(tmp_path, capsys):
    import torch

    from training import finetune
    from training.make_demo_bundle import continue_or_set_aside

    def stage_with_checkpoint(name, **recorded_params):
        stage = tmp_path / name
        (stage / "checkpoints").mkdir(parents=True)
        torch.save({"step": 3, "params": recorded_params}, finetune.checkpoint_path(stage))
        return stage

    params = finetune.FinetuneParams(task="classify", data="synthetic:8,visible", steps=1500, batch_size=2)
    same = stage_with_checkpoint("same", **params.to_dict())
    assert continue_or_set_aside(params, same).resume == "last" and finetune.checkpoint_path(same).is_file()

    fresh = finetune.FinetuneParams(task="classify", data="synthetic:8,visible", steps=1500, batch_size=2)
    other = stage_with_checkpoint("classify", **{**fresh.to_dict(), "steps": 600})
    assert continue_or_set_aside(fresh, other).resume == ""
    assert not other.exists()
    (aside,) = tmp_path.glob("classify.stale-*")
    assert finetune.checkpoint_path(aside).is_file()  # the interrupted work is kept, not deleted
    assert "steps" in capsys.readouterr().out
