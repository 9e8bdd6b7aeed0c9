"""bench/: the model-time section reports FLOPs and agreement with eager fp32; bad variant names are named."""

from __future__ import annotations

import pytest


def test_model_time_rows_report_flops_speed_and_agreement_with_eager():
    from bench import model_time

    res = model_time.run(presets=("tiny",), variants=("eager fp32", "bf16 autocast"), device="cpu", repeats=1)
    eager, bf16 = res["rows"]
    assert eager["variant"] == "eager fp32" and eager["speedup_vs_eager"] == 1.0
    assert eager["label_agreement"] == 1.0 and eager["score_max_abs_diff"] == 0.0
    # tiny: ~16 GFLOP per Run MG-3D (encoder + 28-class decoder at 64^3 + heads), counted, not guessed
    assert 10 < eager["gflop"] < 25 and bf16["gflop"] == eager["gflop"]
    # the tolerances tests/test_inference.py promises for bf16
    assert bf16["label_agreement"] > 0.97 and bf16["score_max_abs_diff"] < 0.05 and bf16["heat_max_abs_diff"] < 0.1
    assert eager["model_ms"] > 0 and eager["draft_ms_per_token"] > 0


def test_unknown_variant_is_named(capsys, tmp_path):
    from bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["--sections", "model", "--model-variants", "bf16 turbo", "--out", str(tmp_path)])
    assert "unknown variant(s) ['bf16 turbo']" in capsys.readouterr().err


def test_cached_decoding_bench_checks_that_both_paths_draft_the_same_tokens():
    from bench import decoding

    res = decoding.run(tokens=6, vocab=50, repeats=1)
    assert [r["decoder"] for r in res["rows"]] == ["tiny", "base"]
    assert all(r["same_output"] and r["recompute_s"] > 0 and r["cached_s"] > 0 for r in res["rows"])
