"""experiments.synthetic_proof: reuse of a finished fine-tune only when its settings match; the results table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")

from experiments import synthetic_proof  # noqa: E402
from training import finetune  # noqa: E402
from training.params import made_with  # noqa: E402


def _params(tmp, **kw) -> finetune.FinetuneParams:
    base = dict(task="segment", data="synthetic:20", val_data="synthetic:10", steps=240, batch_size=2, seed=7,
                seg_target="all", preset="tiny", out_dir=str(tmp / "seg_scratch_seed7"))
    return finetune.FinetuneParams(**{**base, **kw})


def test_a_finished_fine_tune_is_reused_only_with_the_same_settings(tmp_path):
    bundle = tmp_path / "seg_scratch_seed7" / "bundle"
    assert not made_with(bundle, _params(tmp_path))  # nothing there yet
    bundle.mkdir(parents=True)
    done = _params(tmp_path).to_dict()
    (bundle / "config.json").write_text(json.dumps({"provenance": {"params": {**done, "out_dir": "elsewhere",
                                                                              "checkpoint_every": 500}}}))
    assert made_with(bundle, _params(tmp_path))  # where it was written, and how often it checkpointed, do not matter
    assert not made_with(bundle, _params(tmp_path, steps=80))
    assert not made_with(bundle, _params(tmp_path, bundle="runs/other/bundle"))
    older = {k: v for k, v in done.items() if k != "freeze_encoder_steps"}  # written before the option existed
    (bundle / "config.json").write_text(json.dumps({"provenance": {"params": older}}))
    assert made_with(bundle, _params(tmp_path))
    assert not made_with(bundle, _params(tmp_path, freeze_encoder_steps=60))


def test_results_table_has_one_row_per_run_and_the_segmentation_comparison():
    probe = {"zero_shot_sva_auc_mean": 0.61, "zero_shot_mlm_auc_mean": None, "recall@10_sva": 0.3,
             "recall@10_global": 0.1, "recall@10_chance": 0.1, "pointing_hit_rate": 0.25,
             "pointing_random_baseline": 0.107, "n": 100}
    pooled = {**probe, "n": 200, "recall@10_chance": 0.05, "zero_shot_sva_auc_se": 0.012, "recall@10_of_100_sva": 0.4,
              "recall@10_of_100_sva_se": 0.035, "recall@10_of_100_global": 0.2, "recall@10_of_100_global_se": 0.028,
              "pointing_hit_rate_se": 0.02}
    table = synthetic_proof.to_markdown({
        "runs": {"random init": {"steps": 0, **probe}, "full (six + sva), 2 cycles": {"steps": 1000, **probe},
                 "full, 200 held out": {"steps": 500, **pooled}},
        "segmentation": {"pretrained": {"mean_dice": 0.4, "mean_dice_per_seed": {"7": 0.45, "8": 0.35}},
                         "scratch": {"mean_dice": 0.35, "mean_dice_per_seed": {"7": 0.35}}}})
    rows = table.splitlines()
    assert ("| full (six + sva), 2 cycles | 1000 | 0.610 / - | 0.300 (of 100, chance 0.10) / 0.100 (of 100, chance "
            "0.10) | 0.250 (0.107) |") in rows
    assert ("| full, 200 held out | 500 | 0.610 ± 0.012 / - | 0.400 ± 0.035 / 0.200 ± 0.028 | 0.250 ± 0.020 (0.107) |"
            in rows)
    assert "| pretrained | 0.400 | 7: 0.450, 8: 0.350 |" in rows and "| scratch | 0.350 | 7: 0.350 |" in rows


def test_probe_scores_every_route_on_held_out_volumes(tmp_path, tiny_config):
    import math

    import torch

    from napari_mg3d.checkpoint import save_bundle
    from napari_mg3d.model import MG3DModel

    torch.manual_seed(0)
    bundle = tmp_path / "bundle"
    save_bundle(bundle, MG3DModel(tiny_config.replace(objectives=("mim", "sva"))))
    out = synthetic_proof.probe(bundle, n=3, shape=(40, 48, 56))
    assert out["n"] == 3 and out["objectives"] == ["mim", "sva"]
    assert "zero_shot_mlm_auc_mean" not in out  # no MLM head in this bundle: that route is skipped, not faked
    for key in ("zero_shot_sva", "zero_shot_sva_centred"):
        per = out[f"{key}_auc_per_finding"]
        assert per and all(0.0 <= v <= 1.0 for v in per.values())
        assert math.isclose(out[f"{key}_auc_mean"], sum(per.values()) / len(per))
    # With 3 volumes every report finds its volume in the top 10; chance is reported as 10/n.
    assert out["recall@10_sva"] == 1.0 and out["recall@10_chance"] == 10 / 3
    assert out["pointing_n"] > 0 and 0.0 < out["pointing_random_baseline"] <= 1.0
    assert sum(f["n"] for f in out["pointing_per_finding"].values()) == out["pointing_n"]


def test_scoring_rules_pair_matches_the_probe_and_needs_a_bundle(tmp_path, tiny_config):
    import pytest
    import torch

    from napari_mg3d.checkpoint import save_bundle
    from napari_mg3d.model import MG3DModel

    torch.manual_seed(0)
    bundle = tmp_path / "bundle"
    save_bundle(bundle, MG3DModel(tiny_config.replace(objectives=("sva",))))
    shape = (40, 48, 56)
    rules = synthetic_proof.scoring_rules(bundle, n=4, shape=shape, seed=synthetic_proof.HELD_OUT_SEED)
    probe = synthetic_proof.probe(bundle, n=4, shape=shape)
    assert set(rules["variants"]) == {"pair", "pair centred", "present only", "present only centred"}
    # Same volumes, same margins: the pair rules rank exactly as the probe's scores (a sigmoid of them) do.
    assert rules["variants"]["pair"]["auc_per_finding"] == pytest.approx(probe["zero_shot_sva_auc_per_finding"])
    assert rules["variants"]["pair centred"]["auc_per_finding"] == pytest.approx(
        probe["zero_shot_sva_centred_auc_per_finding"])
    assert rules["seeds"] == [synthetic_proof.HELD_OUT_SEED, synthetic_proof.HELD_OUT_SEED + 3]
    with pytest.raises(SystemExit, match="--pretrained"):
        synthetic_proof.main(["--out", str(tmp_path / "x"), "--scoring-rules"])


def test_segmentation_comparison_gives_both_arms_the_same_target_and_seeds(tmp_path, monkeypatch):
    from types import SimpleNamespace

    seen = []

    def fake_run(params):
        seen.append(params)
        return tmp_path / params.out_dir / "bundle"

    dice = {"pretrained": {7: 0.4, 8: 0.2}, "scratch": {7: 0.3, 8: 0.3}}

    def fake_load(path):
        arm, seed = path.parent.name.split("_")[1], int(path.parent.name.split("seed")[1])
        metrics = {"mean_dice": dice[arm][seed], "dice_per_class": {"pleural effusion": dice[arm][seed]}}
        return SimpleNamespace(meta={"provenance": {"metrics": metrics}})

    monkeypatch.setattr(finetune, "run", fake_run)
    monkeypatch.setattr(synthetic_proof, "load_bundle", fake_load)
    res = synthetic_proof.seg_compare(tmp_path / "pre", tmp_path, 240, (80, 112, 144), (128, 96, 128), seeds=(7, 8),
                                      target="lesions", preset="base")
    assert [(p.seg_target, p.seed, p.bundle or p.preset) for p in seen] == [
        ("lesions", 7, str(tmp_path / "pre")), ("lesions", 8, str(tmp_path / "pre")),
        ("lesions", 7, "base"), ("lesions", 8, "base")]
    assert seen[2].input_size == [128, 96, 128]  # the scratch arm has the pre-trained model's architecture
    assert res["pretrained"]["mean_dice"] == pytest.approx(0.3) and res["scratch"]["mean_dice"] == pytest.approx(0.3)
    assert res["pretrained"]["mean_dice_per_seed"] == {"7": 0.4, "8": 0.2}


def test_workers_and_precision_reach_every_pre_training_and_fine_tuning_run(tmp_path, monkeypatch):
    # A GPU run needs many workers to make synthetic volumes fast enough, and bf16; every run must get them.
    from types import SimpleNamespace

    from training import pretrain

    pre, fine = [], []

    def fake_pretrain(params):
        pre.append(params)
        if params.stop_after_steps:  # a snapshot: the checkpoint is exported by bundle_from_checkpoint
            return tmp_path / "last.ckpt"
        (tmp_path / params.out_dir / "bundle").mkdir(parents=True, exist_ok=True)
        return tmp_path / params.out_dir / "bundle"

    def fake_finetune(params):
        fine.append(params)
        return tmp_path / params.out_dir / "bundle"

    bundle = SimpleNamespace(config=SimpleNamespace(input_size=(64, 64, 64), preset="tiny", conv_stages=2),
                             meta={"provenance": {"metrics": {"mean_dice": 0.5, "dice_per_class": {}}}})
    monkeypatch.setattr(pretrain, "run", fake_pretrain)
    monkeypatch.setattr(pretrain, "bundle_from_checkpoint", lambda last, out: out.mkdir(parents=True))
    monkeypatch.setattr(finetune, "run", fake_finetune)
    monkeypatch.setattr(synthetic_proof, "load_bundle", lambda path: bundle)
    monkeypatch.setattr(synthetic_proof, "random_init_bundle", lambda out, like: out)
    tiers = []
    monkeypatch.setattr(synthetic_proof, "probe", lambda b, n, shape, tier: tiers.append(tier) or {
        "recall@10_global": 0.1, "recall@10_chance": 0.1, "pointing_hit_rate": 0.1, "pointing_random_baseline": 0.1})
    synthetic_proof.main(["--out", str(tmp_path / "proof"), "--steps", "8", "--cycles", "2", "--num-workers", "12",
                          "--precision", "bf16-mixed", "--tier", "visible", "--cache-dir", str(tmp_path / "cache")])
    # full run (snapshot at 4, then to 8), cycle 2, three ablations; then both segmentation arms
    assert len(pre) == 6 and len(fine) == 2
    assert [p.conv_stages for p in fine] == [None, 2]  # from scratch: the pre-trained encoder's architecture
    assert {(p.num_workers, p.precision, p.cache_dir) for p in pre + fine} == {(12, "bf16-mixed", str(tmp_path / "cache"))}
    # every run and every probe is on the tier asked for
    assert {p.data.split(",")[1] for p in pre + fine} | {p.val_data.split(",")[1] for p in fine} == {"visible"}
    assert set(tiers) == {"visible"} and len(tiers) == 7
    assert synthetic_proof.pretrain_params(tmp_path, 10, 8, ["mim"], (8, 8, 8), 2).num_workers == 1  # the CPU default


def test_learning_curve_stops_at_each_step_count_and_an_interrupted_curve_continues(tmp_path, monkeypatch):
    import torch

    runs, probed = [], []
    state = {"step": 0}

    def fake_run(params):
        runs.append((params.stop_after_steps, params.resume, params.data))
        state["step"] = params.max_steps if not params.stop_after_steps else state["step"] + params.stop_after_steps
        ckpt = tmp_path / "full" / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": state["step"]}, ckpt)
        if not params.stop_after_steps:
            (tmp_path / "full" / "bundle").mkdir(parents=True, exist_ok=True)
            (tmp_path / "full" / "bundle" / "config.json").write_text("{}")
            return tmp_path / "full" / "bundle"
        return ckpt

    def fake_export(ckpt, bundle):
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text(json.dumps({"step": state["step"]}))
        return bundle

    def fake_probe(bundle, n, shape, tier="hard"):
        probed.append((bundle.name, tier))
        return {"recall@10_sva": 0.1 * len(probed), "n": n}

    monkeypatch.setattr(synthetic_proof.pretrain, "run", fake_run)
    monkeypatch.setattr(synthetic_proof.pretrain, "bundle_from_checkpoint", fake_export)
    monkeypatch.setattr(synthetic_proof, "probe", fake_probe)
    out = tmp_path / "full"
    curve = synthetic_proof.learning_curve(out, 40, 6, [2, 4], ("mim", "sva"), (40, 48, 56), 2, held_out=5,
                                           tier="visible")
    # to step 2 (a new run), 2 more steps (resumed), then the rest of the schedule; one probe per step count
    assert runs == [(2, "", "synthetic:40,visible"), (2, "last", "synthetic:40,visible"), (0, "last", "synthetic:40,visible")]
    assert sorted(curve) == [2, 4, 6] and [p[1] for p in probed] == ["visible"] * 3
    assert json.loads((out / "probe_step4.json").read_text())["steps"] == 4
    # interrupted after the probe at step 2: the others are made again, that one is read back
    (out / "probe_step4.json").unlink()
    (out / "probe_step6.json").unlink()
    runs.clear()
    probed.clear()
    again = synthetic_proof.learning_curve(out, 40, 6, [2, 4], ("mim", "sva"), (40, 48, 56), 2, held_out=5,
                                           tier="visible")
    assert runs == [] and [p[0] for p in probed] == ["4", "bundle"]  # the bundles exist: only the probes rerun
    assert again[2] == curve[2]


def test_an_interrupted_ablation_continues_from_its_checkpoint(tmp_path, monkeypatch):
    """An ablation stops half-way through its schedule; killed at step 3 of 5, the rerun resumes and runs the
    2 steps left (before, it started again without --resume, which pre-training refuses in a used folder)."""
    import torch

    runs = []
    out = tmp_path / "no_SSM_DFA"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 3}, out / "checkpoints" / "last.ckpt")

    def fake_run(params):
        runs.append((params.resume, params.stop_after_steps, params.max_steps, tuple(params.objectives)))
        return out / "checkpoints" / "last.ckpt"

    def fake_export(ckpt, bundle):
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text("{}")
        return bundle

    monkeypatch.setattr(synthetic_proof.pretrain, "run", fake_run)
    monkeypatch.setattr(synthetic_proof.pretrain, "bundle_from_checkpoint", fake_export)
    objectives = ("mim", "mlm", "sfr", "cml", "sva")
    bundle = synthetic_proof.snapshot_run(out, 40, 10, 5, objectives, (40, 48, 56), 2, tier="visible")
    assert runs == [("last", 2, 10, objectives)] and bundle == out / "bundle_step" / "5"
    assert synthetic_proof.snapshot_run(out, 40, 10, 5, objectives, (40, 48, 56), 2, tier="visible") == bundle
    assert len(runs) == 1  # exported: nothing runs again


def test_supervised_curve_records_auc_loss_and_seconds_at_each_evaluation(tmp_path):
    from experiments.supervised_curve import build_arm, curve

    r = curve("cnn", steps=3, batch=2, lr=1e-3, eval_every=2, n_train=6, n_test=6, tier="visible", cache_dir=None,
              out=tmp_path / "curve.json")
    assert json.loads((tmp_path / "curve.json").read_text())["curve"] == json.loads(json.dumps(r["curve"]))
    assert [p["step"] for p in r["curve"]] == [2, 3] and [p["samples"] for p in r["curve"]] == [4, 6]
    assert r["curve"][0]["train_seconds"] <= r["curve"][1]["train_seconds"] and r["seconds_per_step"] > 0
    assert all(0.0 <= p["mean_auc"] <= 1.0 and np.isfinite(p["train_loss"]) for p in r["curve"])
    assert all(p["se"] > 0 for p in r["curve"])
    assert build_arm("swin:tiny:24", 18).model.config.feature_size == 24
    assert build_arm("swin:tiny:12:1-2-4-8", 18).model.config.num_heads == (1, 2, 4, 8)
    with pytest.raises(SystemExit, match="--arm 'swin:tiny:12:1-x'"):
        build_arm("swin:tiny:12:1-x", 18)
    assert (build_arm("swin:tiny@lse", 18).readout, build_arm("swin:tiny", 18).readout) == ("lse", "mean")
    with pytest.raises(SystemExit, match="choose cnn, swin:PRESET"):
        build_arm("resnet", 18)
    with pytest.raises(SystemExit, match="read-out 'max': choose mean or lse"):
        build_arm("swin:tiny@max", 18)


def test_supervised_curve_resumes_from_its_checkpoint_to_the_same_curve(tmp_path, monkeypatch):
    from experiments import supervised_curve

    kw = dict(arm="cnn", steps=4, batch=2, lr=1e-3, eval_every=2, n_train=6, n_test=6, tier="visible",
              cache_dir=None, schedule="cosine", warmup=1)
    whole = supervised_curve.curve(**kw)
    real, calls = supervised_curve.held_out_auc, []

    def stops_at_the_second_evaluation(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(supervised_curve, "held_out_auc", stops_at_the_second_evaluation)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        supervised_curve.curve(**kw, checkpoint=ckpt)
    monkeypatch.setattr(supervised_curve, "held_out_auc", real)
    resumed = supervised_curve.curve(**kw, checkpoint=ckpt)
    assert [p["step"] for p in resumed["curve"]] == [2, 4]
    for a, b in zip(whole["curve"], resumed["curve"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["auc_per_finding"] == b["auc_per_finding"]
    with pytest.raises(SystemExit, match="saved by a run with other settings"):
        supervised_curve.curve(**{**kw, "lr": 1e-2}, checkpoint=ckpt)


def test_supervised_curve_stops_when_the_loss_is_not_finite(monkeypatch):
    from experiments import supervised_curve

    real = supervised_curve.build_arm

    def poisoned(arm, n_labels):
        net = real(arm, n_labels)
        with torch.no_grad():
            net.fc.weight.fill_(float("nan"))
        return net

    monkeypatch.setattr(supervised_curve, "build_arm", poisoned)
    with pytest.raises(SystemExit, match="cnn: the training loss is nan at step 1; stopped"):
        supervised_curve.curve("cnn", steps=3, batch=2, lr=1e-3, eval_every=2, n_train=6, n_test=6, tier="visible",
                               cache_dir=None)


def test_probe_in_real_report_mode_renders_row_i_of_the_reports(tmp_path, gui_bundle, monkeypatch):
    import csv

    from napari_mg3d.labels import LABELS

    path = tmp_path / "reports.csv"
    texts = ["Pleural effusion on the right. No nodule.", "Cardiomegaly. Lungs are clear.", "Normal study."]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["AccessionNo", "report_text", *LABELS])
        w.writeheader()
        for k, (text, finding) in enumerate(zip(texts, ["Pleural effusion", "Cardiomegaly", None])):
            w.writerow({"AccessionNo": k, "report_text": text, **{lab: int(lab == finding) for lab in LABELS}})
    seen = []
    real = synthetic_proof.real_report_sample
    monkeypatch.setattr(synthetic_proof, "real_report_sample",
                        lambda *a, **kw: seen.append(s := real(*a, **kw)) or s)
    out = synthetic_proof.probe(gui_bundle, 3, (40, 48, 56), tier="visible", real_reports=path)
    assert out["real_reports"] == str(path) and out["n"] == 3
    assert [s.report for s in seen] == texts
    assert [s.labels["Pleural effusion"] for s in seen] == [1, 0, 0] and seen[1].labels["Cardiomegaly"] == 1
    with pytest.raises(SystemExit, match="holds 3 reports"):
        synthetic_proof.probe(gui_bundle, 4, (40, 48, 56), real_reports=path)


def test_pretraining_curve_reads_probes_in_step_order_and_draws_them(tmp_path):
    from experiments import plot_pretraining

    names = ["Lung nodule", "Cardiomegaly"]
    for step, auc in ((500, 0.6), (1000, 0.7), (2500, 0.8)):  # 1000 and 2500 sort before 500 as text
        point = {"steps": step, "n": 200, "pointing_hit_rate": auc - 0.3, "pointing_hit_rate_se": 0.02,
                 "pointing_random_baseline": 0.13, "recall@10_of_100_sva": auc - 0.2, "recall@10_of_100_sva_se": 0.03}
        for key in ("zero_shot_sva_auc", "zero_shot_sva_centred_auc"):
            point.update({f"{key}_mean": auc, f"{key}_se": 0.01, f"{key}_per_finding": dict.fromkeys(names, auc)})
        (tmp_path / f"probe_step{step}.json").write_text(json.dumps(point))
    points = plot_pretraining.probe_points(tmp_path)
    assert [p["steps"] for p in points] == [500, 1000, 2500]
    assert [p["zero_shot_sva_auc_mean"] for p in points] == [0.6, 0.7, 0.8]
    out = plot_pretraining.main([str(tmp_path), "--out", str(tmp_path / "curve.png"),
                                 "--reference", "supervised Swin tiny=0.837"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert plot_pretraining.parse_reference("a=b=0.5") == ("a=b", 0.5)
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        plot_pretraining.parse_reference("0.837")
    with pytest.raises(SystemExit, match="no probe_step"):
        plot_pretraining.probe_points(tmp_path / "empty")


def test_hybrid_arm_is_the_models_conv_stages_option():
    from experiments.supervised_curve import build_arm

    mixed = build_arm("hybrid:tiny:2", 18)
    assert mixed.model.config.conv_stages == 2
    with torch.no_grad():
        assert mixed(torch.rand(2, 1, 64, 64, 64)).shape == (2, 18)
    with pytest.raises(SystemExit, match="K = 1..3"):
        build_arm("hybrid:tiny:5", 18)
