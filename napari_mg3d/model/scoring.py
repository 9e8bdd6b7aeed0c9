"""Abnormality scores: which of a bundle's read-outs gives them, and the scores themselves.

One policy for the whole project (the Predictor, ``training.evaluate`` and the benchmark call it): a trained
classifier first, then the few-shot prompt head (CT-VocabFine), then zero-shot read-outs of the pre-trained
model, sentence-volume alignment ("sva") before the MLM pseudo-likelihood.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MG3DConfig
from .heads import alignment_zero_shot_scores, prompt_batch, zero_shot_scores
from .mg3d import MG3DModel, VolumeEncoding

SCORE_SOURCES = ("classifier", "prompt", "sva", "mlm")
ZERO_SHOT_SOURCES = ("prompt", "sva", "mlm")
SOURCE_TITLES = {
    "classifier": "classifier",
    "prompt": "prompt (CT-VocabFine)",
    "sva": "zero-shot (sentence-volume alignment)",
    "mlm": "zero-shot (MLM pseudo-likelihood)",
}


def available_score_sources(heads: dict[str, nn.Module], config: MG3DConfig) -> list[str]:
    """The sources a model with ``heads`` and ``config`` (MG3DConfig) can score with, in policy order."""
    have = {"classifier": "classifier" in heads, "prompt": "prompt" in heads,
            "sva": "sva" in config.objectives, "mlm": "mlm_head" in heads}
    return [s for s in SCORE_SOURCES if have[s]]


def choose_score_source(heads: dict[str, nn.Module], config: MG3DConfig, zero_shot: bool = False) -> str | None:
    """The source to score with (``zero_shot``: among the label-free read-outs only), or None."""
    allowed = ZERO_SHOT_SOURCES if zero_shot else SCORE_SOURCES
    return next((s for s in available_score_sources(heads, config) if s in allowed), None)


@torch.no_grad()
def finding_scores(source: str, model: MG3DModel, heads: dict[str, nn.Module], encoding: VolumeEncoding,
                   names: list[str]) -> torch.Tensor:
    """(B, F) p(present) of each finding in ``names`` for the encoded volumes, read out by ``source``."""
    if source == "classifier":
        head = heads["classifier"]
        return head.probabilities(head.classify(encoding))
    if source == "prompt":
        _, prompts = model.encode_sentences_separately(prompt_batch(model.text.tokenizer, names).to(encoding.tokens.device))
        return heads["prompt"](encoding.global_feature, prompts).softmax(-1)[..., 0]
    if source == "sva":
        return torch.stack([alignment_zero_shot_scores(model, t[None], names) for t in encoding.tokens])
    if source == "mlm":
        return torch.stack([zero_shot_scores(model, heads["mlm_head"], t[None], names) for t in encoding.tokens])
    raise ValueError(f"unknown score source {source!r}; choose from {SCORE_SOURCES}")
