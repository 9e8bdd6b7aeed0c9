"""Model bundles: safetensors + config.json + tokenizer; round trips across processes; lenient loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from napari_mg3d.checkpoint import BundleError, load_bundle, save_bundle
from napari_mg3d.model import MG3DModel, tokenize_reports
from napari_mg3d.model.pretraining import MIMDecoder

SENTENCES = [["Small nodule in the left lower lobe.", "No pleural effusion."]]


def _outputs(model: MG3DModel) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    volume = torch.rand(1, 1, 32, 32, 32)
    text = tokenize_reports(model.text.tokenizer, SENTENCES)
    with torch.no_grad():
        enc = model.encode_volume(volume)
        _, sent = model.encode_sentences_separately(text)
        return {"tokens": enc.tokens, "heat": model.sentence_heatmaps(enc, sent, text.sentence_valid),
                "text": model.global_text(model.encode_text(text))}


def test_bundle_written_here_loads_in_another_process_bit_identical(tiny_model, tmp_path):
    tiny_model.eval()
    bundle = save_bundle(tmp_path / "bundle", tiny_model, meta={"labels": ["Lung nodule"]})
    assert {p.name for p in bundle.iterdir()} >= {"config.json", "model.safetensors", "tokenizer", "text_encoder"}
    assert not list(bundle.rglob("*.bin")) and not list(bundle.rglob("*.pt")) and not list(bundle.rglob("*.pkl"))
    save_file({k: v.contiguous() for k, v in _outputs(tiny_model).items()}, str(tmp_path / "here.safetensors"))
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from safetensors.torch import save_file
        from test_checkpoint import _outputs
        from napari_mg3d.checkpoint import from_pretrained
        model = from_pretrained({str(bundle)!r})
        save_file({{k: v.contiguous() for k, v in _outputs(model).items()}}, {str(tmp_path / 'there.safetensors')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ})
    here, there = load_file(str(tmp_path / "here.safetensors")), load_file(str(tmp_path / "there.safetensors"))
    for key in here:
        assert torch.equal(here[key], there[key]), key


def test_zip_bundle_with_heads_round_trips(tiny_model, tmp_path):
    head = MIMDecoder(tiny_model.config.fusion_dim)
    path = save_bundle(tmp_path / "model.zip", tiny_model, heads={"mim_decoder": head}, meta={"provenance": {"steps": 3}})
    loaded = load_bundle(path)
    assert loaded.heads == ["mim_decoder"] and loaded.meta["provenance"] == {"steps": 3}
    restored = MIMDecoder(tiny_model.config.fusion_dim)
    restored.load_state_dict(loaded.head_state["mim_decoder"])
    for (k, a), b in zip(head.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), k
    assert not loaded.missing_keys and not loaded.unexpected_keys


def test_float16_bundle_is_half_the_size_and_close(tiny_model, tmp_path):
    full = save_bundle(tmp_path / "fp32", tiny_model, embed_text_encoder=False)
    half = save_bundle(tmp_path / "fp16", tiny_model, embed_text_encoder=False, dtype=torch.float16)
    ratio = (half / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.6  # safetensors header adds a little
    loaded = load_bundle(half).model
    a, b = _outputs(tiny_model.eval()), _outputs(loaded)
    torch.testing.assert_close(a["tokens"], b["tokens"], atol=0.05, rtol=0.05)


def test_harmless_key_differences_are_reported_not_fatal(tiny_model, tmp_path, caplog):
    path = save_bundle(tmp_path / "b", tiny_model)
    weights = load_file(str(path / "model.safetensors"))
    weights.pop("model.pool_text.score.0.bias")
    weights["model.some_old_head.weight"] = torch.zeros(3)
    save_file(weights, str(path / "model.safetensors"))
    loaded = load_bundle(path)
    assert loaded.missing_keys == ["pool_text.score.0.bias"]
    assert loaded.unexpected_keys == ["some_old_head.weight"]
    assert "missing" in caplog.text and "unexpected" in caplog.text


def test_weights_that_do_not_fit_the_config_are_a_clear_error(tiny_model, tmp_path):
    path = save_bundle(tmp_path / "b", tiny_model)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model"]["fusion_dim"] = 64
    cfg["model"]["fusion_heads"] = 4
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="do not fit the architecture"):
        load_bundle(path)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("not a zip", "neither a bundle directory nor"),
])
def test_unreadable_bundles_name_the_path(tmp_path, content, message):
    path = tmp_path / "thing.zip"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BundleError, match=message):
        load_bundle(path)


def test_newer_bundle_format_says_to_update(tiny_model, tmp_path):
    path = save_bundle(tmp_path / "b", tiny_model)
    cfg = json.loads((path / "config.json").read_text())
    cfg["format_version"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="update napari-mg3d"):
        load_bundle(path)


def test_tied_weights_are_stored_once_and_restored(gui_bundle):
    import json as _json

    from napari_mg3d.inference import Predictor

    meta = _json.loads((gui_bundle / "config.json").read_text())
    assert meta["tied_weights"] == {"report.lm.weight": "report.embed.weight"}
    assert "report.lm.weight" not in load_file(str(gui_bundle / "model.safetensors"))
    head = Predictor(gui_bundle, device="cpu").heads["report"]
    assert head.lm.weight is head.embed.weight and head.embed.weight.abs().sum() > 0


def test_a_bundle_with_non_finite_weights_is_refused_naming_the_tensors(tiny_model, tmp_path):
    import pytest

    from napari_mg3d.checkpoint import BundleError

    with torch.no_grad():
        tiny_model.proj16.weight[0, 0] = float("nan")
        tiny_model.token_norm.bias[0] = float("inf")
    bundle = save_bundle(tmp_path / "diverged", tiny_model)
    with pytest.raises(BundleError, match=r"diverged: 2 weight tensors hold NaN or inf values \(.*model.proj16.weight"):
        load_bundle(bundle)


def test_every_bundle_has_a_model_card_written_or_derived_from_its_provenance(tiny_model, tmp_path):
    from napari_mg3d.model_card import derive_model_card, score_heading, summary_line

    synthetic = load_bundle(save_bundle(tmp_path / "s", tiny_model, meta={
        "provenance": {"stage": "pretrain", "data": "synthetic:2000", "steps": 300,
                       "metrics": {"mean_auc": 0.6}, "params": {"val_data": "synthetic:16"}}}))
    written = json.loads((tmp_path / "s" / "config.json").read_text())["model_card"]
    assert written == synthetic.model_card
    assert written["trained_on"] == {"modality": "CT", "body_region": "chest", "data": ["synthetic:2000"],
                                     "synthetic": True, "steps": [{"stage": "pretrain", "steps": 300}],
                                     "preset": "tiny"}
    assert written["quality"] == [{"metric": "mean_auc", "value": 0.6, "stage": "pretrain", "on": "synthetic:16"}]
    assert written["clinical_use"] == "not for clinical use: trained on synthetic phantoms only"
    assert "tiny CT model, chest, trained 300 steps on synthetic:2000; not for clinical use" in summary_line(written)
    assert score_heading(written, "classifier") == "score (classifier, synthetic-trained)"
    assert score_heading({**written, "scores_calibrated": True}, "classifier") == "Probability"
    real = load_bundle(save_bundle(tmp_path / "r", tiny_model, meta={
        "provenance": {"stage": "pretrain", "data": "ctrate:/data/vols,reports.csv", "steps": 100000}}))
    assert real.model_card["clinical_use"] == "not validated for clinical use"
    legacy = tmp_path / "s" / "config.json"  # a bundle written before model cards: derived on load
    meta = json.loads(legacy.read_text())
    del meta["model_card"]
    legacy.write_text(json.dumps(meta))
    assert load_bundle(tmp_path / "s").model_card == written
    chain = {"provenance_chain": [{"stage": "pretrain", "data": "synthetic:8", "steps": 300},
                                  {"stage": "finetune-segment", "data": "synthetic:8", "steps": 200}],
             "provenance": {"stage": "finetune-segment", "data": "synthetic:8", "steps": 200}}
    assert "trained 700 steps" in summary_line(derive_model_card(chain))  # a stage done twice counts twice
    # ... unless the earlier one trained only its head (frozen or its own encoder), which the later one replaced
    head_only = {"stage": "finetune-report", "data": "synthetic:8", "steps": 50, "params": {"freeze_encoder": True}}
    redone = {"provenance_chain": [*chain["provenance_chain"], chain["provenance"], head_only],
              "provenance": {"stage": "finetune-report", "data": "synthetic:8", "steps": 80}}
    card = derive_model_card(redone)
    assert "trained 780 steps" in summary_line(card)
    assert [s.get("superseded", False) for s in card["trained_on"]["steps"]] == [False, False, False, True, False]


def test_a_misspelt_config_key_is_warned_naming_it_and_errors_name_the_users_zip(tiny_model, tmp_path, caplog):
    import zipfile

    from napari_mg3d.model import MG3DConfig

    with caplog.at_level("WARNING"):
        MG3DConfig.from_dict({**tiny_model.config.to_dict(), "windw_size": 7})
    assert "unknown key 'windw_size'" in caplog.text and "did you mean 'window_size'" in caplog.text
    archive = save_bundle(tmp_path / "model.zip", tiny_model)
    with zipfile.ZipFile(archive) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["model.safetensors"] = b"not safetensors"
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(BundleError) as err:
        load_bundle(bad)
    assert str(err.value).startswith(f"{bad}: its model.safetensors could not be read") and "mg3d-bundle-" not in str(err.value)


def test_a_bundle_by_hub_name_loads_from_the_hub_cache_offline(tiny_model, tmp_path, monkeypatch):
    import shutil

    from napari_mg3d.checkpoint import resolve_bundle

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--mg3d--tiny-demo"
    save_bundle(tmp_path / "b", tiny_model, meta={"labels": ["Lung nodule"]})
    shutil.copytree(tmp_path / "b", repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name in ("hf://mg3d/tiny-demo", "mg3d/tiny-demo"):
        assert resolve_bundle(name) == repo / "snapshots" / commit
        assert load_bundle(name).labels == ["Lung nodule"]
    with pytest.raises(BundleError, match="hf://mg3d/missing: could not get Hub repository 'mg3d/missing'"):
        load_bundle("hf://mg3d/missing")


def test_a_bundle_keeps_the_attention_heads_it_was_trained_with_when_the_preset_changes(tiny_config, tmp_path):
    from napari_mg3d.model.config import preset_config

    assert preset_config("tiny").num_heads == (1, 2, 4, 8)  # the preset today: 12 channels per head
    torch.manual_seed(0)
    older = MG3DModel(tiny_config.replace(num_heads=(3, 6, 12, 24), conv_stages=0))  # the preset before 2026-12-07
    path = save_bundle(tmp_path / "older", older)
    loaded = load_bundle(path).model.eval()
    assert loaded.config.num_heads == (3, 6, 12, 24)
    assert loaded.vision.swin.layers1[0].blocks[0].attn.num_heads == 3
    before, after = _outputs(older.eval()), _outputs(loaded)
    assert torch.equal(before["tokens"], after["tokens"])


def test_a_bundle_with_convolutional_stages_round_trips_and_older_configs_load_as_all_swin(tiny_config, tmp_path):
    from napari_mg3d.model.config import ConfigError, MG3DConfig, build_model_config
    from napari_mg3d.model.vision import ConvStage

    torch.manual_seed(0)
    hybrid = MG3DModel(tiny_config.replace(conv_stages=2))
    loaded = load_bundle(save_bundle(tmp_path / "hybrid", hybrid)).model.eval()
    assert loaded.config.conv_stages == 2 and isinstance(loaded.vision.swin.layers2[0], ConvStage)
    assert torch.equal(_outputs(hybrid.eval())["tokens"], _outputs(loaded)["tokens"])
    older = {k: v for k, v in tiny_config.to_dict().items() if k != "conv_stages"}  # a config.json of before
    assert MG3DConfig.from_dict(older).conv_stages == 0
    with pytest.raises(ConfigError, match="conv_stages differs"):
        build_model_config("tiny", {"conv_stages": 0}, base=loaded.config)
