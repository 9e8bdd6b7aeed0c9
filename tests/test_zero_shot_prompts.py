"""experiments.zero_shot_prompts: the rules it compares, and that its "pair" is the product's zero-shot rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments import zero_shot_prompts as zsp
from napari_mg3d.labels import LABELS


def test_lung_findings_take_their_best_lobe_and_the_rest_keep_the_plain_rule():
    findings = ["Cardiomegaly", "Lung nodule"]
    V = 3
    rng = np.random.default_rng(0)
    s = {k: rng.normal(size=(V, 2)) for k in ("present", "absent", "bare", "denied")}
    s["lobes"] = rng.normal(size=(V, 2, len(zsp.LOBES)))
    s["lobes"][1, 1, 3] = 50.0  # the nodule sentence of one lobe fits volume 1 by far
    m = zsp.rule_margins(s, findings)
    assert set(m) == set(zsp.RULES)
    pair = s["present"] - s["absent"]
    np.testing.assert_allclose(m["pair"], pair)
    np.testing.assert_allclose(m["lobes/pair"][:, 0], pair[:, 0])  # cardiomegaly has no lobe
    np.testing.assert_allclose(m["lobes/pair"][:, 1], s["lobes"][:, 1].max(-1) - s["absent"][:, 1])
    assert m["lobes/no-style"][1, 1] == pytest.approx(50.0 - s["denied"][1, 1])
    np.testing.assert_allclose(m["pair centred"].mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(m["ensemble"], (m["pair"] + m["no-style"] + m["lobes/pair"] + m["lobes/no-style"]) / 4)


def test_sentences_are_made_per_finding_with_every_lobe():
    s = zsp.prompt_sentences(["Lung nodule", "Emphysema"])
    assert s["present"] == ["Lung nodule is present.", "Emphysema is present."]
    assert s["denied"] == ["No lung nodule.", "No emphysema."]
    assert s["lobes"][:2] == ["Lung nodule in the right upper lobe.", "Lung nodule in the right middle lobe."]
    assert len(s["lobes"]) == 2 * len(zsp.LOBES)
    assert set(zsp.LUNG_FINDINGS) <= set(LABELS)


def test_lobes_pair_rule_is_the_products_zero_shot_margin_and_pair_its_old_one(tmp_path, tiny_config):
    from napari_mg3d.model import MG3DModel
    from napari_mg3d.model.heads import alignment_zero_shot_margins

    torch.manual_seed(0)
    model = MG3DModel(tiny_config.replace(objectives=("sva",))).eval()
    tokens = torch.randn(3, 8, tiny_config.fusion_dim)
    s = zsp.sentence_scores(model, tokens, zsp.prompt_sentences(list(LABELS)))
    margins = zsp.rule_margins(s, list(LABELS))
    product = torch.stack([alignment_zero_shot_margins(model, t[None], list(LABELS)) for t in tokens]).numpy()
    np.testing.assert_allclose(margins["lobes/pair"], product, rtol=1e-4, atol=1e-4)
    old = torch.stack([alignment_zero_shot_margins(model, t[None], list(LABELS), by_lobe=False) for t in tokens])
    np.testing.assert_allclose(margins["pair"], old.numpy(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(margins["pair"], product)  # the lung findings read differently
    assert s["lobes"].shape == (3, len(LABELS), len(zsp.LOBES))


def test_a_bundle_without_sva_is_refused_by_name(tmp_path, tiny_config):
    from napari_mg3d.checkpoint import save_bundle
    from napari_mg3d.model import MG3DModel

    bundle = tmp_path / "no_sva"
    save_bundle(bundle, MG3DModel(tiny_config.replace(objectives=("mim", "mlm"))))
    with pytest.raises(SystemExit, match="no_sva.*sva objective"):
        zsp.load_sva_model(bundle)


def test_paired_difference_of_a_rule_with_itself_is_zero_and_a_perfect_rule_gains():
    rng = np.random.default_rng(1)
    y = (rng.random((60, 3)) < 0.4).astype(float)
    noise = rng.normal(size=y.shape)
    same = zsp.paired_difference(y, noise, noise, boot=50)
    assert same["difference"] == 0.0 and same["se"] == 0.0
    better = zsp.paired_difference(y, y + 0.01 * noise, noise, boot=50)
    assert better["difference"] > 0.3 and better["se"] < better["difference"]
