"""experiments.linear_probe: the logistic regression it fits, and the probe of a bundle's tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torchmetrics")

from experiments import linear_probe  # noqa: E402
from napari_mg3d.labels import LABELS  # noqa: E402


def _data(n: int, seed: int):
    """Feature 0 decides label 0 (offset and scale far from standard); label 1 is noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = np.stack([(x[:, 0] > 0).numpy(), torch.rand(n, generator=g).numpy() > 0.5], 1).astype(np.float32)
    return x * 0.01 + 3.0, y


def test_logistic_fit_finds_the_informative_feature_and_only_it():
    x, y = _data(300, 0)
    fit = linear_probe.fit_logistic(x, y, c=1.0)
    x_new, y_new = _data(200, 1)
    scores = fit.logits(x_new).numpy()
    from training.metrics import auc

    assert auc(y_new[:, 0], scores[:, 0]) > 0.99
    assert abs(auc(y_new[:, 1], scores[:, 1]) - 0.5) < 0.15
    assert int(fit.weight[:, 0].abs().argmax()) == 0
    shrunk = linear_probe.fit_logistic(x, y, c=1e-4)
    assert float(shrunk.weight.abs().sum()) < 0.1 * float(fit.weight.abs().sum())


def test_probe_reports_held_out_auc_per_pooling(gui_bundle):
    out = linear_probe.probe(gui_bundle, n_train=6, n_val=6, n_test=6, shape=(40, 48, 56), cs=(0.1, 1.0))
    assert set(out["poolings"]) == {"mean", "max", "mean+max"}
    for r in out["poolings"].values():
        assert r["c"] in (0.1, 1.0) and set(r["validation_mean_auc"]) == {0.1, 1.0}
        assert set(r["held_out_auc_per_finding"]) <= set(LABELS)
        assert all(0.0 <= v <= 1.0 for v in r["held_out_auc_per_finding"].values())
        assert r["held_out_mean_auc"] == pytest.approx(np.mean(list(r["held_out_auc_per_finding"].values())))


def test_probe_by_training_set_size_uses_the_first_volumes_of_one_set(tmp_path, monkeypatch):
    calls = []

    def fake_features(model, first_seed, n, shape, tier="hard", cache_dir=None):
        calls.append((first_seed, n, tier))
        g = torch.Generator().manual_seed(first_seed)
        x = torch.randn(n, 3, 4, generator=g)
        y = np.zeros((n, len(LABELS)), np.float32)
        y[:, 0] = (x[:, :, 0].mean(1) > 0).numpy()
        y[: n // 2, 1] = 1
        return x, y

    monkeypatch.setattr(linear_probe, "token_features", fake_features)
    out = linear_probe.probe("random:tiny", n_train=[5, 20], n_val=30, n_test=40, cs=(1.0,), tier="visible")
    assert calls[0] == (0, 20, "visible") and len(calls) == 3  # the training volumes are read once, for the largest
    assert set(out["by_train_size"]) == {"5", "20"} and out["tier"] == "visible"
    for size in ("5", "20"):
        assert set(out["by_train_size"][size]) == {"mean", "max", "mean+max"}
    # the informative finding is learnt better from 20 volumes than from 5
    assert (out["by_train_size"]["20"]["mean"]["held_out_auc_per_finding"][LABELS[0]]
            >= out["by_train_size"]["5"]["mean"]["held_out_auc_per_finding"][LABELS[0]])


def test_label_efficiency_draws_the_same_random_subsets_for_every_bundle_and_reports_their_spread(monkeypatch):
    def fake_features(model, first_seed, n, shape, tier="hard", cache_dir=None):
        g = torch.Generator().manual_seed(first_seed)
        x = torch.randn(n, 3, 4, generator=g)
        y = np.zeros((n, len(LABELS)), np.float32)
        y[:, 0] = (x[:, :, 0].mean(1) > 0).numpy()
        return x, y

    monkeypatch.setattr(linear_probe, "token_features", fake_features)
    out = linear_probe.probe("random:tiny", n_train=[5, 20], n_val=30, n_test=40, cs=(1.0,), draws=4, pool=60)
    assert out["draws"] == 4 and out["pool"] == 60
    for size in ("5", "20"):
        r = out["by_train_size"][size]["mean"]
        assert len(r["per_draw"]) == 4 and len(set(r["per_draw"])) > 1  # different subsets, different results
        assert r["held_out_mean_auc"] == pytest.approx(np.mean(r["per_draw"]))
        assert r["se"] == pytest.approx(np.std(r["per_draw"], ddof=1) / 2)
    first = [linear_probe.subset(60, 5, k) for k in range(4)]
    assert all(len(set(i)) == 5 and i.max() < 60 for i in first)
    assert all((a == b).all() for a, b in zip(first, [linear_probe.subset(60, 5, k) for k in range(4)]))
    assert not (first[0] == first[1]).all()


def test_paired_lead_differences_the_same_draws_and_refuses_probes_drawn_differently(tmp_path):
    import json

    def result(per_draw_5, per_draw_20, draws=3):
        return {"draws": draws, "pool": 200, "by_train_size": {
            "5": {"mean+max": {"per_draw": per_draw_5}}, "20": {"mean+max": {"per_draw": per_draw_20}}}}

    pretrained, scratch = result([0.60, 0.70, 0.65], [0.80, 0.82, 0.84]), result([0.50, 0.60, 0.58], [0.60, 0.60, 0.60])
    lead = linear_probe.paired_lead(pretrained, scratch)
    assert lead["5"]["lead"] == pytest.approx(0.09) and lead["20"]["lead"] == pytest.approx(0.22)
    assert lead["5"]["se"] == pytest.approx(np.std([0.10, 0.10, 0.07], ddof=1) / np.sqrt(3))
    with pytest.raises(ValueError, match="drawn differently"):
        linear_probe.paired_lead(pretrained, result([0.5] * 4, [0.5] * 4, draws=4))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(pretrained))
    b.write_text(json.dumps(scratch))
    assert linear_probe.main(["--compare", str(a), str(b)]) == lead
    with pytest.raises(SystemExit, match="give --bundle"):
        linear_probe.main([])
