"""Model bundles: a directory (or a .zip of one) holding config.json, safetensors weights and tokenizer files.

Layout::

    config.json           format, model config, text encoder, preprocessing, labels, heads, provenance
    model.safetensors     weights: "model.*" for MG3DModel (without the frozen text encoder unless
                          embedded), "<head>.*" for each extra head (e.g. "mim_decoder.*", "classifier.*")
    tokenizer/            the text encoder's tokenizer files
    text_encoder/         (optional) the frozen text encoder itself, safetensors

Nothing here unpickles: a bundle from elsewhere cannot run code when loaded.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .model.config import MG3DConfig
from .model.mg3d import MG3DModel
from .model.text import PACKAGED_ENCODERS, FrozenTextEncoder, load_hf_text_model

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "mg3d-bundle"
BUNDLE_VERSION = 1


class BundleError(RuntimeError):
    """A bundle that cannot be read; the message names the file and the problem."""


@dataclass
class Bundle:
    """A loaded bundle: the model, the raw metadata and the weights of extra heads by name."""

    model: MG3DModel
    meta: dict[str, Any]
    head_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    path: Path | None = None
    messages: list[str] = field(default_factory=list)  # what a user of its results must know (naming its path)
    failed_heads: dict[str, str] = field(default_factory=dict)  # head -> why it could not be used

    @property
    def config(self) -> MG3DConfig:
        return self.model.config

    @property
    def model_card(self) -> dict[str, Any]:
        """What the model was trained on, its measured quality and intended use (napari_mg3d.model_card)."""
        from .model_card import model_card_of

        return model_card_of(self.meta)

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "bundle"

    @property
    def heads(self) -> list[str]:
        return list(self.meta.get("heads", []))

    @property
    def labels(self) -> list[str]:
        return list(self.meta.get("labels", []))

    def _note_failed(self, name: str, why: str) -> None:
        if name not in self.failed_heads:
            self.failed_heads[name] = why
            self.messages.append(f"bundle {self.path}: the {name} head is not used: {why}")
            log.warning("%s", self.messages[-1])

    def build_heads(self, skip: tuple[str, ...] = ()) -> tuple[dict[str, nn.Module], dict[str, dict]]:
        """Rebuild the bundle's heads with their weights: ({name: module}, {name: spec}). A head without a
        description or whose weights do not fit is left out with a logged warning (its output is disabled)."""
        from .model.heads import build_head

        known = {"mim_decoder": {"type": "mim"}, "mlm_head": {"type": "mlm"}}  # pre-training heads
        specs = dict(self.meta.get("head_specs", {}))
        heads: dict[str, nn.Module] = {}
        for name, state in self.head_state.items():
            if name in skip:
                continue
            spec = specs.get(name) or known.get(name)
            if spec is None:
                self._note_failed(name, "it has no description in config.json (head_specs)")
                continue
            try:
                head = build_head(spec, self.config, self.model.text.vocab_size)
                head.load_state_dict(state)
            except RuntimeError as err:  # load_state_dict: sizes or names that do not fit
                wrong = [line.strip() for line in str(err).splitlines() if "size mismatch" in line][:2]
                why = ("its weights have the wrong shape for its description (" + "; ".join(wrong) + ")") if wrong \
                    else f"its weights do not fit its description ({str(err).splitlines()[0]})"
                self._note_failed(name, why)
                continue
            except (ValueError, KeyError) as err:
                self._note_failed(name, f"its description cannot be built ({err})")
                continue
            heads[name], specs[name] = head, spec
        return heads, {k: v for k, v in specs.items() if k in heads}


def _should_embed_text_encoder(name: str) -> bool:
    """Embed encoders that another machine could not resolve by name (local directories)."""
    return name not in PACKAGED_ENCODERS and Path(name).expanduser().is_dir()


def save_bundle(
    path: str | Path,
    model: MG3DModel,
    heads: dict[str, nn.Module] | None = None,
    meta: dict[str, Any] | None = None,
    embed_text_encoder: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model`` (+ ``heads``) as a bundle directory, or a zip archive when ``path`` ends in .zip.

    ``dtype`` float16 halves the file size; loading casts back to float32. The write is atomic: the
    bundle appears complete or not at all.
    """
    path = Path(path)
    heads = heads or {}
    if embed_text_encoder is None:
        embed_text_encoder = _should_embed_text_encoder(model.text.name_or_path)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if name.startswith("text.") and not embed_text_encoder:
            continue
        if not name.startswith("text."):
            tensors[f"model.{name}"] = value
    for head_name, module in heads.items():
        if "." in head_name:
            raise ValueError(f"head name {head_name!r} must not contain '.'")
        for name, value in module.state_dict().items():
            tensors[f"{head_name}.{name}"] = value
    # Tied weights (one tensor under two names) are stored once; config.json records the alias.
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, v in list(tensors.items()):
        ident = (v.data_ptr(), v.shape, v.stride())
        if v.numel() and ident in seen:
            tied[k] = seen[ident]
            del tensors[k]
        else:
            seen[ident] = k
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().clone().contiguous()
               for k, v in tensors.items()}

    config = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "package_version": __version__,
        "model": model.config.to_dict(),
        "text_encoder": {"name": model.text.name_or_path, "embedded": bool(embed_text_encoder)},
        "weights_dtype": str(dtype).replace("torch.", ""),
        "heads": sorted(set((meta or {}).get("heads", [])) | set(heads)),
        "tied_weights": tied,
    }
    for key, value in (meta or {}).items():
        if key not in ("heads",):
            config.setdefault(key, value)
    from .model_card import derive_model_card

    # Derived from the provenance at every save (a fine-tune adds its stage); fields given in meta win.
    config["model_card"] = {**derive_model_card(config), **((meta or {}).get("model_card") or {})}

    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"))
        model.text.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        if embed_text_encoder:
            model.text.model.save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if path.suffix == ".zip":
            tmp_zip = parent / f".{path.name}.tmp"
            with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
                for file in sorted(tmp.rglob("*")):
                    if file.is_file():
                        zf.write(file, file.relative_to(tmp).as_posix())
            tmp_zip.replace(path)
        else:
            if path.exists():
                backup = parent / f".{path.name}.old"
                shutil.rmtree(backup, ignore_errors=True)
                path.rename(backup)
                tmp.rename(path)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote MG-3D bundle %s", path)
    return path


HUB_PREFIX = "hf://"


def resolve_bundle(name_or_path: str | Path) -> Path:
    """A bundle's local path: a folder or .zip as given, or a Hugging Face Hub repository (``hf://owner/name``,
    or a plain ``owner/name`` that is not a local path) fetched with ``huggingface_hub.snapshot_download``
    into its cache (offline with HF_HUB_OFFLINE=1: the cached snapshot)."""
    text = str(name_or_path)
    local = Path(text).expanduser()
    is_hub = text.startswith(HUB_PREFIX) or (not local.exists() and text.count("/") == 1
                                             and not text.startswith((".", "/", "~")))
    if not is_hub:
        return local
    repo = text[len(HUB_PREFIX):] if text.startswith(HUB_PREFIX) else text
    repo, _, revision = repo.partition("@")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo, revision=revision or None))
    except Exception as err:  # noqa: BLE001 - offline, unknown repository, no cache: one message
        raise BundleError(f"model bundle {text}: could not get Hub repository {repo!r} ({type(err).__name__}: "
                          f"{err}); download it where the Hub is reachable, or give a local folder") from err


def _open_bundle_dir(path: Path, workdir: list[Path]) -> Path:
    if not path.exists():
        raise BundleError(f"model bundle {path} does not exist")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise BundleError(f"{path} is neither a bundle directory nor a .zip bundle archive")
        tmp = Path(tempfile.mkdtemp(prefix="mg3d-bundle-"))
        workdir.append(tmp)
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                target = (tmp / member).resolve()
                if not str(target).startswith(str(tmp.resolve())):
                    raise BundleError(f"{path}: archive member {member!r} points outside the bundle")
            zf.extractall(tmp)
        return tmp
    return path


def read_bundle_config(path: str | Path) -> dict[str, Any]:
    """config.json of a bundle directory, with a clear error when it is missing or not MG-3D."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise BundleError(f"{path} has no config.json: not an MG-3D model bundle")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{file} is not valid JSON: {err}") from err
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{file}: format is {meta.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    if int(meta.get("format_version", 0)) > BUNDLE_VERSION:
        raise BundleError(
            f"{file}: bundle format version {meta['format_version']} is newer than this napari-mg3d "
            f"({__version__}) reads (version {BUNDLE_VERSION}); update napari-mg3d"
        )
    return meta


def from_pretrained(name_or_path: str | Path, device: str | torch.device = "cpu") -> MG3DModel:
    """The MG-3D model of a bundle directory or .zip (written by :func:`save_bundle` or by training)."""
    return load_bundle(name_or_path, device=device).model


def read_model_card(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(name, model card) of a bundle folder or .zip from its config.json alone, without the weights (the
    widget shows it as soon as a bundle is chosen)."""
    from .model_card import model_card_of

    path = Path(path).expanduser()
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if "config.json" not in zf.namelist():
                raise BundleError(f"{path} has no config.json: not an MG-3D model bundle")
            meta = json.loads(zf.read("config.json"))
    elif path.is_dir():
        meta = read_bundle_config(path)
    else:
        raise BundleError(f"model bundle {path} does not exist")
    return path.name, model_card_of(meta)


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle written by :func:`save_bundle` (a folder, a .zip, or a Hub repository: see
    :func:`resolve_bundle`); missing/unexpected keys are logged, not fatal."""
    path = resolve_bundle(path)
    workdir: list[Path] = []
    try:
        root = _open_bundle_dir(path, workdir)
        meta = read_bundle_config(root)
        config = MG3DConfig.from_dict(meta["model"])
        text_meta = meta.get("text_encoder", {})
        if (root / "text_encoder").is_dir():
            tokenizer, hf_model = load_hf_text_model(root / "text_encoder")
        else:
            _, hf_model = load_hf_text_model(text_meta.get("name", config.text_encoder))
            tokenizer = None
        if (root / "tokenizer").is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        if tokenizer is None:
            tokenizer, _ = load_hf_text_model(text_meta.get("name", config.text_encoder))
        text = FrozenTextEncoder(text_meta.get("name", config.text_encoder), tokenizer=tokenizer, model=hf_model)
        model = MG3DModel(config, text_encoder=text)

        weights = root / "model.safetensors"
        if not weights.is_file():
            raise BundleError(f"{path} has no model.safetensors")
        try:
            tensors = load_file(str(weights))
        except Exception as err:  # safetensors raises its own error types
            raise BundleError(f"{path}: its model.safetensors could not be read as safetensors: {err}") from err
        for alias, target in (meta.get("tied_weights") or {}).items():
            if target in tensors:
                tensors[alias] = tensors[target]
        broken = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if broken:
            raise BundleError(f"{path}: {len(broken)} weight tensors hold NaN or inf values ({', '.join(broken[:5])}"
                              f"{', ...' if len(broken) > 5 else ''}); the run that wrote it diverged. Use a "
                              "checkpoint from before it diverged, or retrain with a lower learning rate")
    finally:
        for tmp in workdir:
            shutil.rmtree(tmp, ignore_errors=True)

    model_state = {k[len("model."):]: v.float() if v.is_floating_point() else v
                   for k, v in tensors.items() if k.startswith("model.")}
    own = model.state_dict()
    mismatched = [f"{k}: bundle {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in model_state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise BundleError(f"{path}: weights do not fit the architecture in its config.json: {mismatched[:5]}")
    result = model.load_state_dict(model_state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("text.")]
    messages = []
    if missing:
        parts = sorted({k.split(".")[0] for k in missing})
        messages.append(f"bundle {path}: {len(missing)} weights of the model ({', '.join(parts)}) are missing and "
                        "were left at random initial values; its outputs that use them mean nothing")
    if result.unexpected_keys:
        messages.append(f"bundle {path}: {len(result.unexpected_keys)} unexpected weights are not used by this model "
                        f"({', '.join(result.unexpected_keys[:3])})")
    for message in messages:
        log.warning("%s", message)
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("model."):
            continue
        head, _, rest = key.partition(".")
        heads.setdefault(head, {})[rest] = value.float() if value.is_floating_point() else value
    model.to(device).eval()
    return Bundle(model, meta, heads, missing, list(result.unexpected_keys), path, messages)
