"""python -m training.pretrain: a few steps write a bundle; exact resume; DDP (gloo, 2 processes); bf16."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from napari_mg3d.checkpoint import load_bundle  # noqa: E402
from training.data import StepIndexedSampler  # noqa: E402
from training.module import lr_lambda  # noqa: E402
from training.params import PretrainParams, build_parser  # noqa: E402
from training.pretrain import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _params(tmp: Path, text_encoder: Path, **kw) -> PretrainParams:
    base = dict(data="synthetic:5", max_steps=4, batch_size=2, input_size=[32, 32, 32], num_workers=0,
                checkpoint_every=1, synthetic_shape=[40, 48, 56], progress=False, log_every=1, warmup_steps=2,
                text_encoder=str(text_encoder), out_dir=str(tmp))
    base.update(kw)
    return PretrainParams(**base)


def _losses(out: Path) -> dict[int, float]:
    values = {}
    for path in sorted((out / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(open(path)):
            if row.get("train/total"):
                values[int(row["step"])] = float(row["train/total"])
    return values


def test_a_few_steps_write_a_loadable_bundle_with_every_loss_logged(tmp_path, tiny_text_encoder_dir):
    bundle = run(_params(tmp_path, tiny_text_encoder_dir, max_steps=3))
    loaded = load_bundle(bundle)
    assert set(loaded.heads) == {"mim_decoder", "mlm_head"}
    assert loaded.meta["provenance"]["steps"] == 3 and loaded.config.input_size == (32, 32, 32)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "checkpoints" / "best.ckpt").is_file()
    header = next(csv.reader(open(next((tmp_path / "logs").glob("version_*/metrics.csv")))))
    for name in ("mim", "mlm", "sfr", "cml", "ssm", "dfa", "total"):
        assert f"train/{name}" in header
    assert len(_losses(tmp_path)) == 3


def test_killed_and_resumed_run_continues_with_the_same_losses(tmp_path, tiny_text_encoder_dir):
    kw = dict(max_steps=5, objectives=["mim", "mlm", "sfr", "cml", "ssm", "dfa", "sva"])
    straight = tmp_path / "straight"
    run(_params(straight, tiny_text_encoder_dir, **kw))
    split = tmp_path / "split"
    stopped = run(_params(split, tiny_text_encoder_dir, stop_after_steps=2, **kw))
    assert stopped.name == "last.ckpt" and not (split / "bundle").exists()
    state = torch.load(stopped, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    first_part = next(v for k, v in state["callbacks"].items() if "TrainingClock" in k)["seconds"]
    assert first_part > 0
    done = run(_params(split, tiny_text_encoder_dir, resume="last", **kw))
    a, b = _losses(straight), _losses(split)
    assert sorted(b) == [0, 1, 2, 3, 4]
    for step in (2, 3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    # the bundle records the run's wall time, both parts together
    assert load_bundle(done).meta["provenance"]["seconds"] > first_part


def test_missing_resume_checkpoint_is_a_clear_error(tmp_path, tiny_text_encoder_dir):
    with pytest.raises(SystemExit, match="does not exist"):
        run(_params(tmp_path, tiny_text_encoder_dir, resume="last"))


def test_init_from_a_bundle_continues_its_weights_and_keeps_its_architecture(tmp_path, tiny_text_encoder_dir):
    from safetensors.torch import load_file

    first = run(_params(tmp_path / "first", tiny_text_encoder_dir, max_steps=2))
    # lr 0: the continued run must end where it started, so every weight it wrote comes from the first bundle.
    second = run(_params(tmp_path / "second", tiny_text_encoder_dir, max_steps=1, init_from=str(first), seed=1,
                         lr_vision=0.0, lr_fusion=0.0, input_size=None, objectives=["mim", "mlm", "sva"]))
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    loaded = load_bundle(second)
    assert loaded.config.input_size == (32, 32, 32) and loaded.config.objectives == ("mim", "mlm", "sva")
    assert loaded.meta["provenance"]["init_from"] == str(first)
    with pytest.raises(SystemExit, match="--input-size differs from the architecture of --init-from"):
        run(_params(tmp_path / "third", tiny_text_encoder_dir, init_from=str(first), input_size=[64, 64, 64]))


def test_bf16_mixed_precision_step_runs_on_cpu(tmp_path, tiny_text_encoder_dir):
    run(_params(tmp_path, tiny_text_encoder_dir, max_steps=1, precision="bf16-mixed"))
    losses = _losses(tmp_path)
    assert len(losses) == 1 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path, tiny_text_encoder_dir):
    cmd = [sys.executable, "-m", "training.pretrain", "--data", "synthetic:8", "--max-steps", "2", "--batch-size", "2",
           "--input-size", "32", "32", "32", "--num-workers", "0", "--synthetic-shape", "40", "48", "56",
           "--no-progress", "--log-every", "1", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
           "--text-encoder", str(tiny_text_encoder_dir), "--out-dir", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished at step 2" in result.stdout
    assert load_bundle(tmp_path / "bundle").meta["provenance"]["steps"] == 2


@pytest.mark.slow
def test_ddp_ablation_leaves_parameters_unused(tmp_path, tiny_text_encoder_dir):
    # Without MIM and MLM their heads get no gradient (DDP must be told).
    objectives = ["sfr", "cml", "ssm", "dfa", "sva"]
    cmd = [sys.executable, "-m", "training.pretrain", "--data", "synthetic:8", "--max-steps", "2", "--batch-size", "2",
           "--input-size", "32", "32", "32", "--num-workers", "0", "--synthetic-shape", "40", "48", "56",
           "--no-progress", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--objectives",
           *objectives, "--checkpoint-every", "1", "--text-encoder", str(tiny_text_encoder_dir),
           "--out-dir", str(tmp_path / "ddp")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished at step 2" in result.stdout


@pytest.mark.slow
def test_ddp_step_where_one_device_has_no_readable_sample_is_skipped_not_hung(tmp_path, tiny_text_encoder_dir):
    # Two processes, one sample each per step. The second step's sample of rank 1 is unreadable: rank 1 must
    # still join rank 0's feature gathers and gradient all-reduce (it replays its last batch with weight 0).
    import json

    from napari_mg3d.synthetic import write_dataset

    write_dataset(tmp_path / "data", 4, seed=0, shape=(40, 48, 56), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "data" / "manifest.jsonl").read_text().splitlines()]
    seed = 5
    order = torch.randperm(4, generator=torch.Generator().manual_seed(seed * 100003)).tolist()
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    for i, row in enumerate(rows):
        row["volume"] = str(broken if i == order[1::2][1] else tmp_path / "data" / row["volume"])
        row["mask"] = None
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    cmd = [sys.executable, "-m", "training.pretrain", "--data", f"manifest:{manifest}", "--max-steps", "2",
           "--batch-size", "1", "--input-size", "32", "32", "32", "--num-workers", "0", "--no-progress",
           "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--seed", str(seed),
           "--text-encoder", str(tiny_text_encoder_dir), "--out-dir", str(tmp_path / "out")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished at step 2" in result.stdout
    assert "broken.nii.gz" in result.stderr + result.stdout


def test_ddp_strategies_are_built_to_find_unused_parameters():
    # one resolution for both entry points: pretrain (Trainer) and finetune (Fabric)
    from lightning.fabric.strategies import DDPStrategy as FabricDDP
    from lightning.pytorch.strategies import DDPStrategy as TrainerDDP

    from training.params import resolve_strategy

    for cls in (TrainerDDP, FabricDDP):
        for name in ("ddp", "ddp_spawn"):
            strategy = resolve_strategy(name, cls)
            assert isinstance(strategy, cls) and strategy._ddp_kwargs["find_unused_parameters"] is True
        assert resolve_strategy("auto", cls) == "auto"


def test_help_explains_every_option():
    text = build_parser("pretrain", "").format_help()
    for name in PretrainParams.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in text


def test_removed_options_are_unknown_and_checkpoints_that_carry_them_still_load():
    from training.params import model_overrides, parse_params

    for removed in ("--negation-flag", "--sva-memory", "--sva-affirmed-only"):
        with pytest.raises(SystemExit):
            parse_params([removed], "pretrain", "")
    old = {**PretrainParams().to_dict(), "negation_flag": True, "sva_memory": 8}
    assert PretrainParams.from_dict(old) == PretrainParams()
    # model options reach the model config as one mapping, and only those given
    p = parse_params(["--window-size", "7", "--lambdas", "1", "0.5", "0.25", "--objectives", "mim", "sva"],
                     "pretrain", "")
    assert model_overrides(p) == {"window_size": 7, "lambda_alpha": 1.0, "lambda_beta": 0.5, "lambda_gamma": 0.25,
                                  "objectives": ("mim", "sva")}
    assert model_overrides(PretrainParams()) == {}
    with pytest.raises(SystemExit, match="--lambdas needs 3 values"):
        model_overrides(PretrainParams(lambdas=[1.0]))


def test_help_states_each_default_once():
    text = build_parser("pretrain", "").format_help()
    assert "(default: None)" not in text and "(default: 1000)" in text and "configs/base.yaml" not in text


def test_yaml_config_and_command_line_overrides(tmp_path):
    from training.params import parse_params

    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: base\nmax_steps: 50\nlambdas: [1.0, 0.2, 0.3]\n")
    p = parse_params(["--config", str(cfg), "--max-steps", "7"], "pretrain", "")
    assert (p.preset, p.max_steps, p.lambdas) == ("base", 7, [1.0, 0.2, 0.3])
    cfg.write_text("max_stepz: 5\n")
    with pytest.raises(SystemExit, match="unknown options"):
        parse_params(["--config", str(cfg)], "pretrain", "")


def test_learning_rate_warms_up_then_decays_to_zero():
    f = lr_lambda(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)


def test_step_indexed_sampler_resumes_exactly_and_splits_ranks():
    def make(consumed, total, rank=0, world=1):
        return list(StepIndexedSampler(7, 3, lambda: (consumed, total, rank, world)))

    full = make(0, 20)
    assert make(9, 20) == full[9:]
    assert sorted(full[:7]) == list(range(7)) and sorted(full[7:14]) == list(range(7))
    r0, r1 = make(0, 3, 0, 2), make(0, 3, 1, 2)
    assert not set(r0) & set(r1)


def test_devices_option_takes_auto_a_count_or_a_list_and_names_a_bad_value():
    from training.params import parse_devices

    assert (parse_devices("auto"), parse_devices("4"), parse_devices("0,1")) == ("auto", 4, [0, 1])
    with pytest.raises(SystemExit, match="--devices 'two'"):
        parse_devices("two")


# ----- runs that diverge, have nothing to learn from, or would overwrite an earlier run -------------
def test_a_nan_loss_stops_the_run_naming_step_and_term_and_keeps_the_last_good_checkpoint(
        tmp_path, tiny_text_encoder_dir, monkeypatch):
    from napari_mg3d.model import losses

    real, calls = losses.mim_loss, []

    def mim_loss(*args):  # finite for two steps, then NaN
        calls.append(1)
        value = real(*args)
        return value * float("nan") if len(calls) > 2 else value

    monkeypatch.setattr(losses, "mim_loss", mim_loss)
    with pytest.raises(SystemExit, match=r"diverged at step 2: non-finite loss \(mim = nan\).*last good checkpoint"):
        run(_params(tmp_path, tiny_text_encoder_dir, max_steps=4))
    assert not (tmp_path / "bundle").exists()
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in state["state_dict"].values() if v.is_floating_point())


def _broken_manifest(tmp: Path, n_broken: int, n_good: int = 0) -> Path:
    import json

    from napari_mg3d.synthetic import write_dataset

    rows = []
    if n_good:
        write_dataset(tmp / "good", n_good, seed=0, shape=(40, 48, 56), progress=False)
        rows = [json.loads(line) for line in (tmp / "good" / "manifest.jsonl").read_text().splitlines()]
        for row in rows:
            row["volume"], row["mask"] = str(tmp / "good" / row["volume"]), None
    for i in range(n_broken):
        (tmp / f"broken{i}.nii.gz").write_bytes(b"\x1f\x8b not a volume")
        rows.append({"volume": str(tmp / f"broken{i}.nii.gz"), "report": "A nodule in the right upper lobe."})
    manifest = tmp / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    return manifest


def test_a_run_without_one_readable_sample_fails_with_the_counts(tmp_path, tiny_text_encoder_dir):
    data = f"manifest:{_broken_manifest(tmp_path, 2)}"
    with pytest.raises(SystemExit, match="no usable sample: all 6 samples it drew failed to load"):
        run(_params(tmp_path / "out", tiny_text_encoder_dir, data=data, max_steps=3))
    assert not (tmp_path / "out" / "bundle").exists()


def test_a_run_that_skipped_many_samples_says_so_and_records_it(tmp_path, tiny_text_encoder_dir, capsys):
    data = f"manifest:{_broken_manifest(tmp_path, 1, n_good=3)}"
    bundle = run(_params(tmp_path / "out", tiny_text_encoder_dir, data=data, max_steps=4))
    metrics = load_bundle(bundle).meta["provenance"]["final_metrics"]
    assert metrics["samples_used"] + metrics["samples_skipped"] == 8 and metrics["samples_skipped"] >= 1
    assert "failed to load and were skipped" in capsys.readouterr().out


def test_an_earlier_run_is_not_replaced_without_overwrite(tmp_path, tiny_text_encoder_dir):
    run(_params(tmp_path, tiny_text_encoder_dir, max_steps=1))
    before = (tmp_path / "bundle" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run.*--resume last.*--overwrite"):
        run(_params(tmp_path, tiny_text_encoder_dir, max_steps=1, seed=3))
    assert (tmp_path / "bundle" / "model.safetensors").read_bytes() == before
    run(_params(tmp_path, tiny_text_encoder_dir, max_steps=1, seed=3, overwrite=True))
    assert (tmp_path / "bundle" / "model.safetensors").read_bytes() != before


def test_a_corrupt_last_checkpoint_is_named_with_best_as_the_way_out(tmp_path, tiny_text_encoder_dir):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    (tmp_path / "checkpoints" / "best.ckpt").write_bytes(b"x")
    with pytest.raises(SystemExit, match=r"last.ckpt is empty or corrupt.*best.ckpt may be used instead"):
        run(_params(tmp_path, tiny_text_encoder_dir, resume="last"))


@pytest.mark.parametrize("argv, message", [
    (["--max-steps", "0"], "--max-steps 0: must be at least 1"),
    (["--lr-vision=-1e-4"], "--lr-vision -0.0001: must be at least 0"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--precision", "fp8"], "--precision 'fp8': choose one of"),
])
def test_impossible_values_are_refused_when_parsed(argv, message):
    from training.params import parse_params

    with pytest.raises(SystemExit, match=message):
        parse_params(argv, "pretrain", "")


def test_yaml_values_are_read_by_each_option_type(tmp_path):
    from training.params import parse_params

    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr_vision: 1e-4\nmax_steps: '20'\ninput_size: [64, 64, 64]\n")  # YAML reads 1e-4 as text
    p = parse_params(["--config", str(cfg)], "pretrain", "")
    assert p.lr_vision == pytest.approx(1e-4) and isinstance(p.lr_vision, float) and p.max_steps == 20
    for text, message in (("lr_vision: fast\n", "lr_vision: 'fast' is not a valid float"),
                          ("max_steps: 2.5\n", "max_steps: 2.5 is not a valid int"),
                          ("input_size: 64\n", "input_size: 64 is not a list"),
                          ("progress: 'no'\n", "progress: 'no' is not a valid bool"),
                          ("max_steps: -3\n", "--max-steps -3: must be at least 1")):
        cfg.write_text(text)
        with pytest.raises(SystemExit, match=message):
            parse_params(["--config", str(cfg)], "pretrain", "")


def test_the_training_clis_say_a_user_error_in_one_line_and_exit_2(tmp_path, capsys):
    from training import evaluate, finetune, pretrain

    cases = [(pretrain.main, ["--data", f"manifest:{tmp_path / 'nope.jsonl'}", "--out-dir", str(tmp_path / "p")],
              "nope.jsonl does not exist"),
             (finetune.main, ["--bundle", str(tmp_path / "no_bundle"), "--out-dir", str(tmp_path / "f")],
              "no_bundle does not exist"),
             (evaluate.main, ["--bundle", str(tmp_path / "no_bundle")], "no_bundle not found")]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err, (main, err)
    with pytest.raises(FileNotFoundError):  # --debug: the traceback, for a bug report
        pretrain.main(cases[0][1] + ["--debug"])


def test_pretraining_and_fine_tuning_draw_their_loss_curves(tmp_path, tiny_text_encoder_dir, gui_bundle):
    import imageio.v3 as iio

    from training.finetune import FinetuneParams
    from training.finetune import run as finetune

    run(_params(tmp_path / "pre", tiny_text_encoder_dir, max_steps=3))
    image = iio.imread(tmp_path / "pre" / "loss_curves.png")
    assert image.shape[0] > 200 and image[..., :3].std() > 5
    finetune(FinetuneParams(task="classify", bundle=str(gui_bundle), data="synthetic:4", steps=3, batch_size=2,
                            synthetic_shape=[40, 48, 56], out_dir=str(tmp_path / "ft"), log_every=1))
    rows = (tmp_path / "ft" / "loss_history.csv").read_text().splitlines()
    assert rows[0] == "step,loss" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    assert (tmp_path / "ft" / "loss_curve.png").is_file() and list((tmp_path / "ft" / "tb").glob("events.*"))


def test_print_config_round_trips_and_the_shipped_configs_parse(tmp_path, capsys):
    from training.finetune import FinetuneParams
    from training.params import parse_params

    with pytest.raises(SystemExit) as done:
        parse_params(["--print-config", "--max-steps", "7", "--objectives", "mim", "sva"], "pretrain", "")
    assert done.value.code == 0
    (tmp_path / "c.yaml").write_text(capsys.readouterr().out)
    again = parse_params(["--config", str(tmp_path / "c.yaml")], "pretrain", "")
    assert again == PretrainParams(max_steps=7, objectives=["mim", "sva"])
    shipped = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.name for p in shipped} >= {"pretrain_ctrate_base.yaml", "finetune_classify.yaml", "finetune_segment.yaml",
                                         "finetune_report.yaml", "finetune_vocabfine.yaml"}
    for path in shipped:
        cls = PretrainParams if path.name.startswith("pretrain") else FinetuneParams
        params = parse_params(["--config", str(path)], "x", "", cls)
        assert params.data.startswith(("ctrate:", "msd:")), path.name


def test_a_mid_run_checkpoint_exports_a_bundle_with_its_weights_and_config_even_from_older_checkpoints(
        tmp_path, tiny_text_encoder_dir):
    """The benchmark's learning curve exports last.ckpt at each probe step; the checkpoint's model config was
    once dropped from it (saved under a key Lightning's ignore list removed), so every export failed."""
    from training.pretrain import bundle_from_checkpoint

    last = run(_params(tmp_path / "run", tiny_text_encoder_dir, stop_after_steps=2, input_size=[32, 32, 64]))
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["model_config"]["input_size"] == [32, 32, 64]
    bundle = load_bundle(bundle_from_checkpoint(last, tmp_path / "bundle"))
    assert bundle.config.input_size == (32, 32, 64) and bundle.meta["provenance"]["steps"] == 2
    weights = bundle.model.state_dict()
    for name, value in state["state_dict"].items():
        if name.startswith("model.") and not name.startswith("model.text."):
            assert torch.equal(weights[name.removeprefix("model.")], value), name

    del state["hyper_parameters"]["model_config"]  # as checkpoints written before 2026-12-07
    older = tmp_path / "older.ckpt"
    torch.save(state, older)
    again = load_bundle(bundle_from_checkpoint(older, tmp_path / "again"))
    assert again.config == bundle.config
