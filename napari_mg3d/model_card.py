"""The model card of a bundle: what it was trained on, how good it measured, what it is for.

Training writes it into ``config.json["model_card"]``; a bundle written before model cards existed gets one
derived from its provenance. The widget, the CLI, every export and ``summary.json`` show it.
"""

from __future__ import annotations

from typing import Any

SYNTHETIC_NOTICE = "not for clinical use: trained on synthetic phantoms only"
UNVALIDATED_NOTICE = "not validated for clinical use"


def _stages(meta: dict) -> list[dict]:
    return [*meta.get("provenance_chain", []), *([meta["provenance"]] if meta.get("provenance") else [])]


def _superseded(stages: list[dict], i: int) -> bool:
    """Whether stage ``i`` left nothing in the model: it trained only its own head (its encoder frozen, or its
    own copy of the encoder), and a later stage of the same name replaced that head."""
    params = stages[i].get("params") or {}
    head_only = bool(params.get("freeze_encoder") or params.get("own_encoder"))
    return head_only and any(s.get("stage") == stages[i].get("stage") for s in stages[i + 1:])


def _is_synthetic(data: str) -> bool:
    return str(data).startswith("synthetic")


def derive_model_card(meta: dict) -> dict[str, Any]:
    """A model card from a bundle's provenance (every training stage's data, steps and metrics)."""
    stages = _stages(meta)
    data = sorted({str(s.get("data", "")) for s in stages if s.get("data")})
    synthetic = bool(data) and all(_is_synthetic(d) for d in data)
    quality = []
    for s in stages:
        metrics = s.get("metrics") or {}
        for key in ("mean_auc", "mean_dice"):
            if metrics.get(key) is not None:
                quality.append({"metric": key, "value": metrics[key], "stage": s.get("stage"),
                                "on": (s.get("params") or {}).get("val_data") or "its validation data"})
    model = meta.get("model", {})
    return {
        "trained_on": {
            "modality": "CT", "body_region": "chest", "data": data or ["unknown"], "synthetic": synthetic,
            "steps": [{"stage": str(s.get("stage")), "steps": s.get("steps"),
                       **({"seconds": s["seconds"]} if s.get("seconds") is not None else {}),
                       **({"superseded": True} if _superseded(stages, i) else {})}
                      for i, s in enumerate(stages) if s.get("stage")],
            "preset": model.get("preset", "unknown"),
        },
        "quality": quality,
        "intended_use": ("demonstration and research on synthetic chest CTs" if synthetic else
                         "research on chest CT"),
        "clinical_use": SYNTHETIC_NOTICE if synthetic else UNVALIDATED_NOTICE,
        "scores_calibrated": False,
    }


def model_card_of(meta: dict) -> dict[str, Any]:
    """The bundle's model card: the one it carries, completed from its provenance where fields are missing."""
    derived = derive_model_card(meta)
    card = dict(meta.get("model_card") or {})
    for key, value in derived.items():
        card.setdefault(key, value)
    return card


def modality_of(card: dict) -> str:
    return str((card.get("trained_on") or {}).get("modality", "CT"))


def trained_on_synthetic(card: dict) -> bool:
    return bool((card.get("trained_on") or {}).get("synthetic"))


def synthetic_tier(card: dict) -> str:
    """The synthetic finding tier a model was trained on: "visible" when every synthetic data spec of its
    training says so (``synthetic:N,visible``), else "hard" (the generator's default)."""
    specs = [str(d) for d in (card.get("trained_on") or {}).get("data") or [] if _is_synthetic(d)]
    return "visible" if specs and all(d.replace(" ", "").endswith(",visible") for d in specs) else "hard"


def summary_line(card: dict, name: str = "") -> str:
    """One line for a panel, a console or a report: what the model is and how far to trust it."""
    t = card.get("trained_on") or {}
    steps = sum(s.get("steps") or 0 for s in t.get("steps") or [] if isinstance(s, dict) and not s.get("superseded"))
    data = ", ".join(t.get("data") or ["unknown data"])
    head = f"{name}: " if name else ""
    return (f"{head}{t.get('preset', '?')} {t.get('modality', 'CT')} model, {t.get('body_region', '?')}, trained "
            f"{steps} steps on {data}; {card.get('clinical_use', UNVALIDATED_NOTICE)}")


def wrong_denial_share(card: dict) -> float | None:
    """The share of a model's drafted denials ("No atelectasis.") that denied a finding the held-out volume had,
    as its model card records it (None where it was not measured)."""
    for row in card.get("targets") or []:
        if isinstance(row, dict) and row.get("wrong_denial_share") is not None:
            return float(row["wrong_denial_share"])
    return None


def denial_caution(card: dict) -> str:
    """What to tell a reader of a drafted report about its denials: a denial is not a rule-out."""
    share = wrong_denial_share(card)
    measured = (f"{share:.0%} of this model's drafted denials on held-out volumes denied a finding the volume had"
                if share is not None else "this model's drafted denials were not measured")
    return f"The draft's denials (sentences such as \"No ...\") are not rule-outs: {measured}."


def score_heading(card: dict, source: str) -> str:
    """The scores column's heading: what the numbers are (a probability only where the bundle says they are
    calibrated)."""
    if card.get("scores_calibrated"):
        return "Probability"
    kind = source.split(" (")[0] if source else "score"
    trained = "synthetic-trained" if trained_on_synthetic(card) else "uncalibrated"
    return f"score ({kind}, {trained})"
