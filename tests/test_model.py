"""The MG-3D core: shapes, masking, gradients, frozen text encoder, losses with known values, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from napari_mg3d.model import (
    ConfigError,
    FrozenTextEncoder,
    InputError,
    MG3DPretrainer,
    TextBatch,
    TextEncoderUnavailable,
    preset_config,
    tokenize_reports,
)
from napari_mg3d.model import losses as L
from napari_mg3d.model.fusion import ModalityDominantCrossAttention

REPORTS = [
    ["No pleural effusion.", "A 12 mm solid nodule in the right upper lobe."],
    ["Cardiomegaly is present.", "Mild centrilobular emphysema in both upper lobes.", "Small hiatal hernia."],
    ["Normal study."],
]


def _tokens(model, reports):
    c = model.config
    return tokenize_reports(model.text.tokenizer, reports, c.max_words, c.max_sentences, c.max_sentence_words)


def _losses(pretrainer, volume, text, seed=0):
    pretrainer.eval()  # no dropout; masks come from the generator
    return pretrainer(volume, text, torch.Generator().manual_seed(seed))


# ----- config ---------------------------------------------------------------------------------------
def test_presets_match_the_paper():
    base = preset_config("base")
    assert base.input_size == (128, 96, 128) and base.feature_size == 48
    assert preset_config("large").feature_size == 96
    assert base.token_grid == (8, 6, 8)
    assert base.conv_stages == 0 and preset_config("tiny").conv_stages == 2  # tiny: the CPU benchmark's hybrid


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"input_size": (64, 60, 64)}, "multiple of 32"),
        ({"feature_size": 20}, "multiple of 12"),
        ({"objectives": ("mim", "clip")}, "unknown objectives"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"conv_stages": 4}, "conv_stages 4 must be 0"),
    ],
)
def test_config_rejects_bad_values_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        preset_config("tiny", **overrides)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="base"):
        preset_config("huge")


# ----- shapes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch, n_sentences", [(1, 1), (3, 20)])
def test_output_shapes(tiny_model, batch, n_sentences):
    reports = [[f"Finding number {i} is seen in segment {j}." for i in range(n_sentences)] for j in range(batch)]
    text = _tokens(tiny_model, reports)
    volume = torch.rand(batch, 1, 32, 32, 32)
    enc = tiny_model.encode_volume(volume)
    assert enc.tokens.shape == (batch, 8, 32) and enc.grid == (2, 2, 2)
    assert [f.shape[1] for f in enc.features] == [12, 24, 48, 96, 192]
    txt = tiny_model.encode_text(text)
    assert txt.sentences.shape == (batch, n_sentences, 32)
    raw, sent = tiny_model.encode_sentences_separately(text)
    assert raw.shape == (batch, n_sentences, 32) and sent.shape == (batch, n_sentences, 32)
    heat = tiny_model.sentence_heatmaps(enc, sent, text.sentence_valid)
    assert heat.shape == (batch, n_sentences, 2, 2, 2)
    torch.testing.assert_close(heat.sum(dim=(2, 3, 4)), torch.ones(batch, n_sentences))
    out = _losses(MG3DPretrainer(tiny_model), volume, text)
    assert set(out) == {"mim", "mlm", "sfr", "cml", "ssm", "dfa", "sva", "total"}
    for name, value in out.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    assert out["sva"] == 0  # not one of the paper's six: off unless asked for


def test_every_sentence_maps_to_its_own_words(tiny_model):
    text = _tokens(tiny_model, [["Small nodule.", "No effusion at all."]])
    ids = text.input_ids[0][text.word_sentence[0] == 1]
    assert tiny_model.text.tokenizer.decode(ids) == "no effusion at all."


def test_padding_with_an_extra_sentence_and_word_changes_no_loss(tiny_model):
    torch.manual_seed(1)
    pre = MG3DPretrainer(tiny_model)
    volume = torch.rand(2, 1, 32, 32, 32)
    text = _tokens(tiny_model, REPORTS[:2])
    pad_id = tiny_model.text.tokenizer.pad_token_id

    def pad(t: torch.Tensor, dim: int, value) -> torch.Tensor:
        shape = list(t.shape)
        shape[dim] = 1
        return torch.cat([t, torch.full(shape, value, dtype=t.dtype)], dim=dim)

    padded = TextBatch(
        input_ids=pad(text.input_ids, 1, pad_id),
        attention_mask=pad(text.attention_mask, 1, 0),
        word_sentence=pad(text.word_sentence, 1, -1),
        word_index=pad(text.word_index, 1, -1),
        sentence_ids=pad(text.sentence_ids, 1, pad_id),
        sentence_attention=pad(text.sentence_attention, 1, 0),
        sentence_valid=pad(text.sentence_valid, 1, False),
        window=pad(text.window, 1, -1),
        window_pos=pad(text.window_pos, 1, -1),
    )
    a, b = _losses(pre, volume, text), _losses(pre, volume, padded)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


# ----- gradients and the frozen text encoder --------------------------------------------------------
def test_gradients_reach_vision_and_fusion_but_never_the_text_encoder(tiny_model):
    pre = MG3DPretrainer(tiny_model)
    pre.train()
    text = _tokens(tiny_model, REPORTS)
    volume = torch.rand(3, 1, 32, 32, 32)
    before = {n: p.detach().clone() for n, p in tiny_model.text.named_parameters()}
    params = [p for _, p in pre.trainable_named_parameters()]
    assert not {id(p) for p in tiny_model.text.parameters()} & {id(p) for p in params}
    opt = torch.optim.AdamW(params, lr=1e-3)
    out = pre(volume, text, torch.Generator().manual_seed(0))
    out["total"].backward()
    grads = {n: p.grad for n, p in pre.named_parameters()}
    assert grads["model.vision.swin.patch_embed.net.0.weight"].abs().sum() > 0
    assert grads["model.vision.swin.layers4.0.blocks.0.attn.qkv.weight"].abs().sum() > 0
    assert grads["model.volume_fusion.layers.0.cross_attn.q.weight"].abs().sum() > 0
    assert grads["model.text_fusion.layers.0.cross_attn.v.weight"].abs().sum() > 0
    assert grads["model.sentence_attention.k.weight"].abs().sum() > 0
    assert all(p.grad is None for p in tiny_model.text.parameters())
    opt.step()
    assert tiny_model.text.model.training is False
    for n, p in tiny_model.text.named_parameters():
        assert torch.equal(p, before[n]), n


def test_each_objective_can_be_switched_off(tiny_config):
    from napari_mg3d.model import MG3DModel

    model = MG3DModel(tiny_config.replace(objectives=("mim", "mlm")))
    out = _losses(MG3DPretrainer(model), torch.rand(2, 1, 32, 32, 32), _tokens(model, REPORTS[:2]))
    assert out["mim"] > 0 and out["mlm"] > 0
    assert out["ssm"] == 0 and out["dfa"] == 0 and out["cml"] == 0 and out["sfr"] == 0 and out["sva"] == 0
    torch.testing.assert_close(out["total"], out["mim"] + out["mlm"])


def test_sentence_volume_alignment_contrasts_volumes_but_not_shared_template_sentences(tiny_config):
    from napari_mg3d.model import MG3DModel

    torch.manual_seed(0)
    model = MG3DModel(tiny_config.replace(objectives=("sva",), lambda_sva=2.0))
    pre = MG3DPretrainer(model)
    volume = torch.rand(2, 1, 32, 32, 32)
    out = _losses(pre, volume, _tokens(model, REPORTS[:2]))
    assert out["sva"] > 0.1
    torch.testing.assert_close(out["total"], 2.0 * out["sva"])
    # Both patients' reports say the same thing: the other volume is no negative, so nothing to contrast.
    same = _losses(pre, volume, _tokens(model, [["No pleural effusion."], ["No pleural effusion."]]))
    assert same["sva"].item() == 0.0
    sim = model.sentence_volume_similarity(model.encode_volume(volume).tokens, torch.randn(5, 32))
    assert sim.shape == (5, 2) and bool((sim.abs() <= 1 + 1e-5).all())


def test_sva_loss_hand_built_case():
    tau = 0.5
    sim, owner = torch.eye(2), torch.tensor([0, 1])
    none = torch.zeros(2, 2, dtype=torch.bool)
    assert L.sva_loss(sim, owner, none, tau).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    shared = torch.tensor([[False, True], [False, False]])  # volume 1's report also has sentence 0
    assert L.sva_loss(sim, owner, shared, tau).item() == pytest.approx(math.log(1 + math.exp(-2)) / 2, rel=1e-6)


def test_a_tiny_model_overfits_one_batch(tiny_model):
    torch.manual_seed(0)
    pre = MG3DPretrainer(tiny_model)
    text = _tokens(tiny_model, REPORTS[:2])
    volume = torch.rand(2, 1, 32, 32, 32)
    opt = torch.optim.AdamW([p for _, p in pre.trainable_named_parameters()], lr=3e-3)
    first = None
    for _ in range(25):
        out = pre(volume, text, torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["total"].backward()
        opt.step()
        first = float(out["total"]) if first is None else first
    assert float(out["total"]) < 0.5 * first


# ----- losses with known values ---------------------------------------------------------------------
def test_info_nce_hand_built_case_matches_its_analytic_value():
    q = torch.eye(2)
    tau = 0.5
    expected = math.log(1 + math.exp(-1 / tau))
    assert L.info_nce(q, q, tau).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_is_lower_for_matched_pairs_than_for_shuffled():
    torch.manual_seed(0)
    keys = torch.randn(8, 16)
    queries = keys + 0.1 * torch.randn(8, 16)
    matched = L.info_nce(queries, keys, 0.1)
    shuffled = L.info_nce(queries[torch.roll(torch.arange(8), 1)], keys, 0.1)
    assert matched < 0.1 < shuffled


def test_ssm_is_zero_when_similarity_matrices_agree_and_positive_otherwise():
    torch.manual_seed(0)
    text = torch.randn(3, 4, 8)
    valid = torch.ones(3, 4, dtype=torch.bool)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    assert L.ssm_loss(text, text @ rotation, valid).item() == pytest.approx(0.0, abs=1e-6)
    assert L.ssm_loss(text, torch.randn(3, 4, 8), valid) > 0.1
    assert L.ssm_loss(text[:1], text[:1], valid[:1]).item() == 0.0


def test_ssm_ignores_padded_sentences():
    torch.manual_seed(0)
    text, vis = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    garbage = vis.clone()
    garbage[0, 2] = 100 * torch.randn(8)
    assert L.ssm_loss(text, vis, valid).item() == pytest.approx(L.ssm_loss(text, garbage, valid).item())


def test_sfr_is_zero_for_identical_features_and_one_for_orthogonal():
    x = torch.randn(2, 3, 8)
    valid = torch.ones(2, 3, dtype=torch.bool)
    assert L.sfr_loss(x, x, valid).item() == pytest.approx(0.0, abs=1e-6)
    a, b = torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)
    a[..., 0], b[..., 1] = 1, 1
    assert L.sfr_loss(a, b, valid[:1, :1]).item() == pytest.approx(1.0)


def test_conv_stages_replace_the_first_swin_stages_and_keep_every_feature_shape(tiny_config):
    from napari_mg3d.model import MG3DModel
    from napari_mg3d.model.vision import ConvStage

    torch.manual_seed(0)
    swin = MG3DModel(tiny_config.replace(conv_stages=0)).vision
    hybrid = MG3DModel(tiny_config.replace(conv_stages=2)).vision
    assert isinstance(hybrid.swin.patch_embed, ConvStage) and isinstance(hybrid.swin.layers2[0], ConvStage)
    assert not isinstance(hybrid.swin.layers3[0], ConvStage) and not isinstance(swin.swin.layers1[0], ConvStage)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        shapes = [f.shape for f in hybrid(x)]
    assert shapes == [f.shape for f in swin(x)]
    assert [s[1] for s in shapes] == [12, 24, 48, 96, 192] and shapes[0][2:] == (16, 16, 16)


@pytest.mark.parametrize("conv_stages", [0, 2])
def test_masked_voxels_leave_no_trace_in_any_feature_map(tiny_config, conv_stages):
    """MIM must not see what it reconstructs: a 3x3x3 convolutional stem would read across the mask's edge."""
    from napari_mg3d.model import MG3DModel

    torch.manual_seed(0)
    vision = MG3DModel(tiny_config.replace(conv_stages=conv_stages)).vision.eval()
    x = torch.rand(1, 1, 32, 32, 32)
    mask = torch.zeros_like(x)
    mask[..., :16, :, :] = 1  # the upper half hidden
    changed = x.clone()
    changed[..., :16, :, :] = torch.rand(1, 1, 16, 32, 32)
    with torch.no_grad():
        for a, b in zip(vision(x, mask), vision(changed, mask)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert not torch.allclose(vision(x)[0], vision(changed)[0])  # unmasked, the change shows


def test_mim_loss_counts_only_masked_voxels():
    target = torch.zeros(1, 1, 4, 4, 4)
    mask = torch.zeros_like(target)
    mask[..., :2, :, :] = 1
    pred = torch.zeros_like(target)
    pred[..., 2:, :, :] = 5.0  # error only where nothing was masked
    assert L.mim_loss(pred, target, mask).item() == 0.0
    pred[..., :2, :, :] = 2.0
    assert L.mim_loss(pred, target, mask).item() == pytest.approx(4.0)


def test_cross_attention_reweights_dominant_tokens_by_received_attention():
    torch.manual_seed(0)
    attn = ModalityDominantCrossAttention(8, 2)
    with torch.no_grad():
        attn.q.weight.zero_()
        attn.q.bias.zero_()  # every query scores every token equally -> uniform attention
    dominant, queries = torch.randn(1, 5, 8), torch.randn(1, 3, 8)
    out = attn(dominant, queries, return_attention=True)
    torch.testing.assert_close(out.attention, torch.full((1, 2, 3, 5), 0.2))
    torch.testing.assert_close(out.dominant, attn.out(attn.v(dominant)))  # uniform -> identity weighting


def test_cross_attention_masks_padded_tokens():
    torch.manual_seed(0)
    attn = ModalityDominantCrossAttention(8, 2)
    dominant, queries = torch.randn(1, 5, 8), torch.randn(1, 2, 8)
    mask = torch.tensor([[True, True, True, False, False]])
    out = attn(dominant, queries, dominant_mask=mask, return_attention=True, return_queries=True)
    assert torch.all(out.attention[..., 3:] == 0)
    short = attn(dominant[:, :3], queries, return_attention=True, return_queries=True)
    torch.testing.assert_close(out.queries, short.queries)
    torch.testing.assert_close(out.dominant[:, :3], short.dominant)


# ----- bad input ------------------------------------------------------------------------------------
def test_bad_volumes_get_clear_errors(tiny_model):
    pre = MG3DPretrainer(tiny_model)
    text = _tokens(tiny_model, REPORTS[:1])
    with pytest.raises(InputError, match=r"\(B, 1, Z, Y, X\)"):
        pre(torch.rand(32, 32, 32), text)
    with pytest.raises(InputError, match="floating point"):
        pre(torch.zeros(1, 1, 32, 32, 32, dtype=torch.int16), text)
    bad = torch.rand(1, 1, 32, 32, 32)
    bad[0, 0, 3, 3, 3] = float("nan")
    with pytest.raises(InputError, match="1 NaN/inf"):
        pre(bad, text)
    with pytest.raises(InputError, match="multiple of 32"):
        pre(torch.rand(1, 1, 32, 40, 32), text)
    with pytest.raises(InputError, match="pair up"):
        pre(torch.rand(2, 1, 32, 32, 32), text)


def test_empty_report_is_an_error_and_unpunctuated_report_is_one_sentence(tiny_model):
    with pytest.raises(ValueError, match="report 1 is empty"):
        _tokens(tiny_model, [["Fine."], ["  "]])
    text = _tokens(tiny_model, [["no acute findings seen"]])
    assert text.sentence_valid.tolist() == [[True]]


def test_missing_text_encoder_names_what_was_asked_and_how_to_fix():
    with pytest.raises(TextEncoderUnavailable, match=r"(?s)no-such-org/radbert-xyz.*local"):
        FrozenTextEncoder("no-such-org/radbert-xyz")


def test_default_text_encoder_loads_offline_and_gives_meaningful_sentence_features():
    enc = FrozenTextEncoder()
    reports = [["A man is eating food."], ["A man is eating a piece of bread."], ["The girl is carrying a baby."]]
    feats = enc.separate_sentence_features(tokenize_reports(enc.tokenizer, reports))[:, 0]
    sim = torch.nn.functional.cosine_similarity(feats[:, None], feats[None], dim=-1)
    assert enc.hidden_size == 384
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.3


def test_segmentation_decoder_group_norm_equals_instance_norm_and_channels_last_equals_contiguous():
    from monai.networks.blocks import UnetrBasicBlock

    from napari_mg3d.model.heads import SegmentationDecoder, instance_norm_as_group_norm, use_channels_last

    torch.manual_seed(0)
    block = UnetrBasicBlock(3, 4, 6, kernel_size=3, stride=1, norm_name="instance", res_block=True).eval()
    x = torch.randn(2, 4, 8, 6, 10) * 3 + 1
    with torch.no_grad():
        reference = block(x)
        before = set(block.state_dict())
        instance_norm_as_group_norm(block)
        assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in block.modules())
        assert set(block.state_dict()) == before  # old bundles still load
        torch.testing.assert_close(block(x), reference, atol=1e-5, rtol=1e-5)

    decoder = SegmentationDecoder(12, 5).eval()
    volume = torch.rand(1, 1, 64, 64, 64)
    features = [torch.randn(1, 12 * 2 ** k, 32 // 2 ** k, 32 // 2 ** k, 32 // 2 ** k) for k in range(5)]
    with torch.no_grad():
        plain = decoder(volume, features)
        fast = use_channels_last(decoder)(volume, features)
    torch.testing.assert_close(fast, plain, atol=1e-3, rtol=1e-3)  # summation order differs


def test_alignment_zero_shot_scores_are_the_pair_softmax_with_lung_findings_read_by_lobe(tiny_model):
    from napari_mg3d.labels import LOBES
    from napari_mg3d.model.heads import alignment_zero_shot_scores, prompt_batch
    from napari_mg3d.model.text import tokenize_reports

    findings = ["Pleural effusion", "Cardiomegaly", "Lung nodule"]
    tokens = tiny_model.encode_volume(torch.rand(1, 1, *tiny_model.config.input_size)).tokens
    with torch.no_grad():
        _, prompts = tiny_model.encode_sentences_separately(prompt_batch(tiny_model.text.tokenizer, findings))
        cosine = tiny_model.sentence_volume_similarity(tokens, prompts.reshape(-1, prompts.shape[-1]))[:, 0]
    logits = cosine.view(3, 2) / tiny_model.config.temperature
    with torch.no_grad():
        lobe_texts = [[f"Lung nodule in the {lobe}."] for lobe in LOBES]
        _, lobed = tiny_model.encode_sentences_separately(tokenize_reports(tiny_model.text.tokenizer, lobe_texts,
                                                                           max_sentences=1))
        best_lobe = tiny_model.sentence_volume_similarity(tokens, lobed[:, 0])[:, 0].max() / tiny_model.config.temperature
    # Effusion and cardiomegaly: the pair; the nodule, a lung finding: its best lobe against "not present".
    expected = logits.clone()
    expected[2, 0] = best_lobe
    scores = alignment_zero_shot_scores(tiny_model, tokens, findings)
    assert torch.allclose(scores, expected.softmax(-1)[:, 0], atol=1e-5)
    assert torch.allclose(alignment_zero_shot_scores(tiny_model, tokens, findings, by_lobe=False),
                          logits.softmax(-1)[:, 0], atol=1e-6)


# ----- options removed after experiments, and the one scoring policy ---------------------------------
def test_configs_with_removed_options_still_load_and_warn_when_one_was_on(tiny_config, caplog):
    from napari_mg3d.model import MG3DConfig, MG3DModel

    old = {**tiny_config.to_dict(), "negation_flag": False, "sva_memory": 0, "sva_affirmed_only": False}
    config = MG3DConfig.from_dict(old)
    assert config.to_dict() == tiny_config.to_dict() and config.extra == {}
    with caplog.at_level("WARNING"):
        config = MG3DConfig.from_dict({**old, "negation_flag": True, "sva_memory": 64})
    assert "negation_flag=True is no longer supported" in caplog.text and "sva_memory=64" in caplog.text
    assert "negation_flag" not in config.extra and not hasattr(config, "negation_flag")
    assert "negation_embedding" not in MG3DModel(config).state_dict()
    assert MG3DConfig.from_dict({**old, "future_key": 3}).extra == {"future_key": 3}  # unknown keys are kept


def test_attention_pooling_in_a_bundle_is_refused_with_the_reason(tiny_config):
    from napari_mg3d.model.heads import LinearClassifier, build_head

    assert type(build_head({"type": "classifier", "n_classes": 3}, tiny_config, 10)) is LinearClassifier
    with pytest.raises(ValueError, match="pooling 'attention'.*mean-pooled classifiers only"):
        build_head({"type": "classifier", "n_classes": 3, "pooling": "attention"}, tiny_config, 10)


def test_one_policy_chooses_the_score_source(tiny_config):
    from napari_mg3d.model.scoring import available_score_sources, choose_score_source

    six, seven = tiny_config, tiny_config.replace(objectives=(*tiny_config.objectives, "sva"))
    h = {"classifier": object(), "prompt": object(), "mlm_head": object()}
    assert available_score_sources(h, seven) == ["classifier", "prompt", "sva", "mlm"]
    assert choose_score_source(h, seven) == "classifier"
    assert choose_score_source(h, seven, zero_shot=True) == "prompt"
    assert choose_score_source({"mlm_head": object()}, seven, zero_shot=True) == "sva"
    assert choose_score_source({"mlm_head": object()}, six) == "mlm"
    assert choose_score_source({}, six) is None


def test_finding_scores_of_every_source_are_probabilities_per_volume(tiny_model):
    from napari_mg3d.model.heads import LinearClassifier, PromptScorer
    from napari_mg3d.model.pretraining import MLMHead
    from napari_mg3d.model.scoring import SCORE_SOURCES, finding_scores

    d = tiny_model.config.fusion_dim
    heads = {"classifier": LinearClassifier(d, 2), "prompt": PromptScorer(d),
             "mlm_head": MLMHead(d, tiny_model.text.vocab_size)}
    enc = tiny_model.encode_volume(torch.rand(2, 1, *tiny_model.config.input_size))
    for source in SCORE_SOURCES:
        p = finding_scores(source, tiny_model, heads, enc, ["Pleural effusion", "Cardiomegaly"])
        assert p.shape == (2, 2) and bool(((p >= 0) & (p <= 1)).all()), source
    with pytest.raises(ValueError, match="unknown score source 'pixels'"):
        finding_scores("pixels", tiny_model, heads, enc, ["Cardiomegaly"])


def test_batch_norm_head_separates_volumes_that_layer_norm_leaves_at_the_prior(tiny_config):
    """Pooled features = one common vector + a 2% variation that carries the label: standardising across
    volumes gives the linear layer unit-scale inputs; LayerNorm keeps the variation 2% of the input."""
    from napari_mg3d.model.heads import LinearClassifier, build_head

    torch.manual_seed(0)
    d = tiny_config.fusion_dim
    common, direction = torch.randn(d), torch.randn(d)
    label = torch.tensor([0.0, 1.0] * 8)
    pooled = common + 0.02 * (2 * label[:, None] - 1) * direction
    batch = build_head({"type": "classifier", "n_classes": 1, "norm": "batch"}, tiny_config, 10)
    layer = build_head({"type": "classifier", "n_classes": 1}, tiny_config, 10)
    assert type(layer.norm) is torch.nn.LayerNorm  # old bundles (no "norm") keep LayerNorm
    standardised = batch.norm(pooled)
    torch.testing.assert_close(standardised.mean(0), torch.zeros(d), atol=1e-3, rtol=0)
    assert standardised.std(0)[direction.abs() > 0.5].min() > 0.9  # unit spread where the label varies it
    assert layer.norm(pooled).std(0).max() < 0.1
    # Running statistics at inference; a single volume in training mode uses them too instead of failing.
    batch.eval()
    one = batch(pooled[:1])
    batch.train()
    torch.testing.assert_close(batch(pooled[:1]), one)
    with pytest.raises(ValueError, match="norm 'group'"):
        build_head({"type": "classifier", "n_classes": 3, "norm": "group"}, tiny_config, 10)
    with pytest.raises(ValueError, match="norm 'group'"):
        LinearClassifier(d, 3, norm="group")


def test_fused_attention_inference_matches_the_explicit_path(tiny_config):
    from napari_mg3d.model.vision import SwinVisionEncoder

    torch.manual_seed(0)
    encoder = SwinVisionEncoder(tiny_config).eval()
    x = torch.rand(2, 1, *tiny_config.input_size)
    with torch.no_grad():
        fused = encoder(x)
        encoder.use_fused_attention(False)
        explicit = encoder(x)
    for a, b in zip(fused, explicit):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # With autograd on, the explicit path runs whatever the switch says, so training gets its gradients.
    encoder.use_fused_attention(True)
    out = encoder(x)[-1]  # layer-normed per token: its plain sum is a constant, whose gradient is zero
    (out * torch.randn_like(out)).sum().backward()
    assert encoder.swin.layers3[0].blocks[0].attn.relative_position_bias_table.grad.abs().sum() > 0


def test_classifier_prior_gives_each_label_its_prevalence_when_features_say_nothing():
    from napari_mg3d.model.heads import LinearClassifier

    prevalence = [0.02, 0.5, 0.9, 0.0]
    multilabel = LinearClassifier(8, 4, multilabel=True)
    multilabel.init_prior(prevalence)
    with torch.no_grad():
        multilabel.linear.weight.zero_()  # features carry no information
        p = multilabel.probabilities(multilabel(torch.randn(3, 8)))
    assert torch.allclose(p[:, :3], torch.tensor([0.02, 0.5, 0.9]).expand(3, 3), atol=1e-6)
    assert 0 < float(p[0, 3]) <= 1.001e-3  # an absent label: clipped, a finite bias
    one_class = LinearClassifier(8, 3, multilabel=False)
    one_class.init_prior([0.2, 0.2, 0.6])
    assert torch.allclose(one_class.linear.bias.softmax(-1), torch.tensor([0.2, 0.2, 0.6]), atol=1e-6)
    with pytest.raises(ValueError, match="prevalence has \\(2,\\) values; the head has 3 classes"):
        one_class.init_prior([0.5, 0.5])


def test_batch_norm_head_statistics_are_re_estimated_from_the_final_features():
    # Features spread 3e-3 between volumes around a common vector that has moved since the statistics were kept:
    # the stale statistics push every logit far out; re-estimated ones standardise the features again.
    from types import SimpleNamespace

    from napari_mg3d.model.heads import LinearClassifier

    torch.manual_seed(0)
    d = 16
    head = LinearClassifier(d, 2, norm="batch")
    with torch.no_grad():
        head.norm.running_mean.fill_(0.5)
        head.norm.running_var.fill_(1e-5)
    features = 1.0 + 3e-3 * torch.randn(12, d)
    batches = [SimpleNamespace(global_feature=f, tokens=f[:, None]) for f in features.split(4)]
    one = SimpleNamespace(global_feature=features[:1], tokens=features[:1, None])
    head.eval()
    assert head.norm(features).mean(0).abs().min() > 50  # stale: every feature far out
    assert head.recalibrate_statistics(batches + [one]) == 12  # a batch of one has no spread and is skipped
    torch.testing.assert_close(head.norm.running_mean, features.mean(0))
    z = head.norm(features)  # (the spread is below 1 only because BatchNorm's eps, 1e-5, is near the variance)
    assert z.mean(0).abs().max() < 0.1 and z.std(0).min() > 0.4
    assert not head.training and head.norm.momentum == 0.1
    kept = head.norm.running_mean.clone()
    assert head.recalibrate_statistics([one]) == 0  # nothing usable: the statistics are left as they were
    torch.testing.assert_close(head.norm.running_mean, kept)
    assert LinearClassifier(d, 2).recalibrate_statistics(batches) == 0  # a LayerNorm head has no statistics


def test_segmentation_loss_gives_absent_classes_no_dice_term():
    """A confident, correct prediction costs ~0 however many classes the volume lacks; a Dice term for every
    class (the loss before) charges each absent class ~1/C, which taught the decoder to predict no lesion."""
    from napari_mg3d.model.losses import present_class_dice_ce

    target = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6, 2:6] = 3  # one lesion class present, classes 1, 2 and 4..27 absent
    logits = torch.full((1, 28, 8, 8, 8), -20.0).scatter(1, target[:, None], 20.0)
    assert present_class_dice_ce(logits, target).item() < 1e-3

    missed = logits.clone()
    missed[:, 3], missed[:, 0] = -20.0, 20.0  # the lesion predicted as background
    loss = present_class_dice_ce(missed, target).item()
    ce = 40.0 * 64 / 512  # 64 of 512 voxels wrong by a logit margin of 40
    assert loss == pytest.approx(ce + (1 - 2 * (512 - 64) / (512 + 448)) / 2 + 1 / 2, rel=1e-3)


def test_segmentation_loss_gradient_raises_a_present_lesion():
    from napari_mg3d.model.losses import present_class_dice_ce

    target = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    target[0, 3:5, 3:5, 3:5] = 5
    logits = torch.zeros(2, 28, 8, 8, 8, requires_grad=True)
    present_class_dice_ce(logits, target).backward()
    inside = logits.grad[0, 5, 3:5, 3:5, 3:5]
    assert (inside < 0).all()  # descending the loss raises the lesion's logit where it is
    assert (logits.grad[1, 5] > 0).all()  # and lowers it where it is absent (through cross-entropy only)
