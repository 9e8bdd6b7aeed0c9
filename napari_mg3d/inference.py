"""Predictor: a model bundle + a Volume (+ sentences) -> segmentation, abnormality scores, drafted report and
per-sentence heat maps, all on the volume's own voxel grid. No napari or Qt.

The encoder output is cached per volume, so a new sentence's heat map costs only the text encoder and one
attention step. Long stages report progress through a callback and stop between stages when ``cancel`` is set.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import Bundle, load_bundle, resolve_bundle
from .cuda_graphs import GraphedCall
from .domain import check_domain, refusals
from .labels import LABELS
from .model.config import MG3DConfig
from .model.heads import GenerationSettings, classifier_probabilities, report_memory, use_channels_last
from .model.mg3d import VolumeEncoding
from .model.scoring import SOURCE_TITLES, choose_score_source, finding_scores
from .model.text import tokenize_reports
from .model_card import denial_caution, modality_of, score_heading
from .preprocess import PreprocessRecord, preprocess, preprocess_config_of, to_original, to_source_axes
from .reports import is_negated
from .volume import Volume

log = logging.getLogger(__name__)

OUTPUTS = ("segmentation", "scores", "report", "heatmaps")
DRAFT_READS_SCORES = ("The draft's findings follow the classifier's scores (its report decoder reads them): draft "
                      "and scores agree by construction and are one opinion, not two.")
ProgressFn = Callable[[str, float], None]
DEMO_BUNDLE_DIR = Path(__file__).parent / "assets" / "demo_bundle"


class Cancelled(RuntimeError):
    """The run was cancelled between stages."""


class PredictorError(ValueError):
    """Input or bundle the predictor cannot use; the message says what and what to do."""


def default_bundle_path() -> Path:
    """The bundle the plugin uses unless told otherwise: $MG3D_BUNDLE, else the shipped demo bundle."""
    env = os.environ.get("MG3D_BUNDLE")
    return Path(env).expanduser() if env else DEMO_BUNDLE_DIR


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.insert(0, "cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.insert(0, "mps")
    return devices


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device(available_devices()[0])
    kind, _, index = name.partition(":")
    if kind not in available_devices() or (kind == "cuda" and index and int(index) >= torch.cuda.device_count()):
        raise PredictorError(f"device {name!r} is not available here; available: {available_devices()}")
    return torch.device(name)


def auto_precision(device: torch.device) -> str:
    """bf16 autocast where the hardware has bf16 matrix units (CUDA; CPUs with AMX), else fp32: on other
    CPUs bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return "bf16"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if device.type == "cpu" and amx is not None and amx():
        return "bf16"
    return "fp32"


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def estimate_memory_bytes(shape: tuple[int, int, int], config: MG3DConfig | None = None, weight_bytes: int = 0,
                          class_by_class: bool = False) -> int:
    """Peak host memory of one run on a volume of ``shape`` voxels, beyond the volume itself (bytes).

    Source-grid part: ~2.6 float32-sized arrays per voxel (canonical crop, its scaled copy, the label map and
    its canvas), ~4 when segmentation scores are mapped back class by class (running max and argmax).
    Model part: the weights plus ~6 feature-size maps at the model input (encoder and segmentation-decoder
    activations, class scores). Calibrated against bench/ peaks
    (tiny and base on a 512x512x300 CT: within 25%).
    """
    n = int(np.prod(shape))
    if config is not None:
        activations = int(np.prod(config.input_size)) * int(config.feature_size) * 4 * 6
    else:
        activations = 512 * 2**20
    return int(n * 4 * (4.0 if class_by_class else 2.6)) + activations + int(weight_bytes) + 64 * 2**20


@dataclass
class Result:
    """Outputs on the source grid of ``volume``. ``heatmaps_model`` (S, z, y, x) stay at model resolution;
    :meth:`heatmap` maps one back (float32 in [0, 1], the source grid)."""

    volume_shape: tuple[int, int, int]
    labels: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    score_source: str = ""
    report: list[str] = field(default_factory=list)
    sentences: list[str] = field(default_factory=list)
    heatmaps_model: np.ndarray | None = None
    record: PreprocessRecord | None = None
    timings: dict[str, float] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    domain_warnings: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    model_card: dict = field(default_factory=dict)
    bundle_name: str = ""
    bundle_path: str = ""
    options: dict = field(default_factory=dict)
    draft_reads_scores: bool = False  # the report decoder read the classifier's probabilities (finding prompts)

    @property
    def score_heading(self) -> str:
        """What the scores are, for a column heading: e.g. "score (classifier, synthetic-trained)"."""
        return score_heading(self.model_card, self.score_source)

    @property
    def draft_denials(self) -> list[int]:
        """Indices of :attr:`report` (the draft) that deny a finding or state normality ("No atelectasis.")."""
        return [i for i, s in enumerate(self.report) if is_negated(s)]

    @property
    def cautions(self) -> list[str]:
        """What a reader of the draft must be told: its denials are not rule-outs (with the model card's
        measure of how often they were wrong); a draft that read the classifier is no second opinion on it."""
        out = [denial_caution(self.model_card)] if self.draft_denials else []
        if self.draft_reads_scores and self.report:
            out.append(DRAFT_READS_SCORES)
        return out

    @property
    def denied_rows(self) -> set[int]:
        """Indices of :attr:`sentences` that are the draft's denials ("No atelectasis."), which the model card
        says not to read as rule-outs (:attr:`cautions`)."""
        return {i for i in self.draft_denials if i < len(self.sentences) and self.sentences[i] == self.report[i]}

    def _model_map(self, index: int) -> np.ndarray:
        if self.heatmaps_model is None or self.record is None:
            raise PredictorError("this result has no heat maps")
        return self.heatmaps_model[index]

    def heatmap(self, index: int) -> np.ndarray:
        """Heat map ``index`` resampled onto the source grid (for export; ~1 s for a 512x512x300 CT)."""
        return to_original(self._model_map(index), self.record).astype(np.float32)

    def heatmap_overlay(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Heat map ``index`` at model resolution in the source's axis order, and the 4x4 matrix from its
        voxel indices to source voxel indices (compose it with the image's transform to display it)."""
        return self.overlay(self._model_map(index))

    def overlay(self, model_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A model-grid map of this result's volume as :meth:`heatmap_overlay` gives it."""
        if self.record is None:
            raise PredictorError("this result has no preprocessing record")
        return to_source_axes(model_map, self.record)

    def add_sentence(self, sentence: str, model_map: np.ndarray) -> int:
        """Keep a sentence's heat map (e.g. one the user typed) with the result, so that it is exported too;
        returns its index."""
        maps = model_map[None].astype(np.float32)
        self.heatmaps_model = maps if self.heatmaps_model is None else np.concatenate([self.heatmaps_model, maps])
        self.sentences.append(sentence)
        return len(self.sentences) - 1


def volume_fingerprint(volume: Volume) -> str:
    """A key that changes whenever the voxels or the geometry change (not the Python object's identity)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((volume.shape, str(volume.data.dtype))).encode())
    digest.update(np.ascontiguousarray(volume.affine, np.float64).tobytes())
    digest.update(np.ascontiguousarray(volume.data).data)
    return digest.hexdigest()


def _encoding_tensors(encoding: VolumeEncoding) -> tuple[list[torch.Tensor], torch.Tensor]:
    return list(encoding.features), encoding.tokens


class Predictor:
    """Runs a bundle on volumes. ``bundle``: a path (directory or .zip) or a loaded Bundle; default: the
    demo bundle. ``device``: 'auto' (cuda, then mps, then cpu), or a name. ``precision``: 'fp32', 'bf16'
    (autocast), or 'auto' (:func:`auto_precision`: bf16 on CUDA and on CPUs with AMX, else fp32).
    ``class_by_class``: map segmentation scores back by resizing every class (the plain path; same labels,
    slower; see preprocess.upsampled_argmax). ``channels_last``: run the segmentation decoder on
    channels-last memory (default: bf16 on the CPU, where oneDNN wants it, ~2x; on an H100 it was slower).
    ``cuda_graphs``: replay the encoder and the segmentation decoder as captured CUDA graphs (default: on a
    CUDA device; at batch 1 the plain path waits on the CPU to launch its kernels). A capture that fails
    falls back to the plain path with a logged warning. ``allow_out_of_domain``: run on input the domain
    check refuses (:mod:`napari_mg3d.domain`: not CT in HU, too few slices, ...); the override is recorded in
    the result."""

    def __init__(self, bundle: str | Path | Bundle | None = None, device: str = "auto",
                 memory_limit_bytes: int | None = None, precision: str = "auto", class_by_class: bool = False,
                 channels_last: bool | None = None, cuda_graphs: bool | None = None,
                 allow_out_of_domain: bool = False) -> None:
        self.allow_out_of_domain = allow_out_of_domain
        self.device = pick_device(device)
        if cuda_graphs and self.device.type != "cuda":
            raise PredictorError(f"cuda_graphs=True needs a CUDA device; this Predictor runs on {self.device}")
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[str, GraphedCall] = {}
        self._grid: tuple[int, int, int] | None = None
        if precision not in ("auto", "fp32", "bf16"):
            raise PredictorError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
        self.precision = auto_precision(self.device) if precision == "auto" else precision
        self.class_by_class = class_by_class
        if not isinstance(bundle, Bundle):
            path = resolve_bundle(bundle) if bundle is not None else default_bundle_path()
            if not path.exists():
                raise PredictorError(
                    f"model bundle {path} not found. Make the demo bundle with `python -m training.make_demo_bundle`, "
                    "or choose a bundle written by training (python -m training.pretrain / finetune)")
            bundle = load_bundle(path)
        self.bundle = bundle
        self.model_card = bundle.model_card
        self.model = bundle.model.to(self.device).eval()
        self.config = bundle.config
        self.preprocess_config = preprocess_config_of(bundle.meta, self.config)
        self.memory_limit = memory_limit_bytes
        heads, _ = bundle.build_heads()
        self.heads = {name: head.to(self.device).eval() for name, head in heads.items()}
        if "segmentation" in self.heads:
            use_channels_last(self.heads["segmentation"], self.precision == "bf16" and self.device.type == "cpu"
                              if channels_last is None else channels_last)
        self.weight_bytes = sum(p.numel() * p.element_size() for m in (self.model, *self.heads.values())
                                for p in m.parameters()) if self.device.type == "cpu" else 0
        self._cache_key = None
        self._encoding = None
        self._classifier_probs: torch.Tensor | None = None
        self._record: PreprocessRecord | None = None
        self._input: torch.Tensor | None = None
        if self.device.type == "cpu" and "cuda" not in available_devices():
            log.info("no GPU found: running MG-3D on the CPU")

    # ----- heads --------------------------------------------------------------------------------------
    def capabilities(self) -> dict[str, str]:
        """Each output -> '' if available, else why not."""
        h = self.heads
        return {
            "segmentation": self._why_no_head("segmentation", "segment"),
            "scores": "" if choose_score_source(h, self.config) else
                      "the bundle has neither a classifier, a prompt head, the MLM head nor sentence-volume "
                      "alignment pre-training for zero-shot scores",
            "report": self._why_no_head("report", "report") or self._why_no_report_prompts(),
            "heatmaps": "",
        }

    def _why_no_report_prompts(self) -> str:
        """'' unless the report decoder reads the classifier's findings and the classifier is not usable."""
        if self.heads["report"].findings is None or "classifier" in self.heads:
            return ""
        return f"its report decoder drafts from the classifier's findings: {self._why_no_head('classifier', 'classify')}"

    def _why_no_head(self, head: str, task: str) -> str:
        """'' when the bundle's ``head`` is usable, else why not: it is missing, or it does not fit."""
        if head in self.heads:
            return ""
        if head in self.bundle.failed_heads:
            return f"the bundle's {head} head cannot be used: {self.bundle.failed_heads[head]}"
        return f"the bundle has no {head} head (fine-tune with --task {task})"

    @property
    def class_names(self) -> list[str]:
        spec = self.bundle.meta.get("head_specs", {}).get("segmentation", {})
        return list(spec.get("classes") or self.bundle.meta.get("classes") or [])

    @property
    def label_names(self) -> list[str]:
        specs = self.bundle.meta.get("head_specs", {})
        for name in ("classifier", "prompt"):
            if name in self.heads and specs.get(name, {}).get("labels"):
                return list(specs[name]["labels"])
        return list(self.bundle.meta.get("labels") or LABELS)

    # ----- checks -------------------------------------------------------------------------------------
    def check_volume(self, volume: Volume) -> None:
        data = volume.data
        if data.ndim != 3:
            raise PredictorError(f"expected a 3D volume (z, y, x); got shape {data.shape}")
        if min(data.shape) < 2:
            raise PredictorError(f"volume of shape {data.shape} is a single slice; MG-3D needs a 3D volume")
        if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
            raise PredictorError(f"volume dtype {data.dtype} is not a grey-value image")
        need = estimate_memory_bytes(volume.shape, self.config, self.weight_bytes, self.class_by_class)
        limit = self.memory_limit if self.memory_limit is not None else available_memory_bytes()
        if need > limit:
            raise PredictorError(
                f"a volume of {volume.shape} voxels needs about {need / 2**30:.1f} GiB of memory to process; "
                f"{limit / 2**30:.1f} GiB are available. Crop or downsample it first.")

    def check_domain(self, volume: Volume, name: str = "the volume") -> tuple[list[str], list[str]]:
        """(warnings, overrides) of the domain check for this bundle's modality; raises PredictorError with
        every reason when a check refuses the volume and ``allow_out_of_domain`` is off."""
        issues = check_domain(volume.data, volume.affine, modality_of(self.model_card), name,
                              volume.metadata.get("stored_dtype"))
        refused = refusals(issues)
        if refused and not self.allow_out_of_domain:
            reasons = "; ".join(str(i) for i in refused)
            raise PredictorError(f"{reasons}. If you know better, run anyway with allow_out_of_domain=True "
                                 "(napari_mg3d.predict --force); the override is recorded with the results")
        overrides = [f"override: ran although {i}" for i in refused]
        return [f"warning: {i}" for i in issues if i.severity == "warn"], overrides

    # ----- stages -------------------------------------------------------------------------------------
    def encode(self, volume: Volume, progress: ProgressFn | None = None) -> None:
        """Preprocess and encode ``volume``, cached until another volume comes (keyed by its content and
        geometry). The memory check runs before anything reads the voxels."""
        self.check_volume(volume)
        key = volume_fingerprint(volume)
        if key == self._cache_key:
            return
        x, record = preprocess(volume, self.preprocess_config)
        self._input = x[None].to(self.device)
        with torch.inference_mode(), self._autocast():
            self._encoding = self._encode_volume(self._input)
        self._record, self._cache_key = record, key
        self._classifier_probs = None

    def _classifier_probabilities(self) -> torch.Tensor:
        """(1, F) the classifier's probabilities for the cached volume: one pass (a classifier with its own
        encoder encodes the volume again) for the scores and the draft that reads them."""
        if self._classifier_probs is None:
            with torch.inference_mode(), self._autocast():
                self._classifier_probs = classifier_probabilities(self.heads["classifier"], self._encoding)
        return self._classifier_probs

    def _graphed(self, name: str, fn: Callable, *args):
        """``fn(*args)``, replayed from a CUDA graph when cuda_graphs is on (captured on first use)."""
        if not self.cuda_graphs:
            return fn(*args)
        graph = self._graphs.get(name)
        if graph is None or not graph.matches(*args):
            try:
                graph = self._graphs[name] = GraphedCall(
                    fn, *args, dtype=torch.bfloat16 if self.precision == "bf16" else None)
            except RuntimeError as err:
                log.warning("CUDA graph capture of %s failed (%s); running without CUDA graphs", name, err)
                self.cuda_graphs = False
                self._graphs.clear()
                return fn(*args)
        return graph(*args)

    def _encode_volume(self, x: torch.Tensor) -> VolumeEncoding:
        if not self.cuda_graphs:
            return self.model.encode_volume(x)
        if self._grid is None:  # one plain pass: the token grid, and the warm-up
            self._grid = tuple(self.model.encode_volume(x).grid)
        feats, tokens = self._graphed("encode", lambda v: _encoding_tensors(self.model.encode_volume(v)), x)
        return VolumeEncoding(list(feats), tokens, self._grid, x)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def sentence_heatmaps(self, sentences: list[str]) -> np.ndarray:
        """(S, Z, Y, X) model-grid heat maps for the cached volume: each sentence's attention over the volume
        tokens, scaled to [0, 1] (its least to its most attended region), interpolated to the model grid."""
        if self._encoding is None:
            raise PredictorError("no volume encoded yet: call run() or encode() first")
        sentences = [s for s in sentences if s and s.strip()]
        if not sentences:
            raise PredictorError("no sentence given: type a sentence with some text in it")
        c = self.config
        text = tokenize_reports(self.model.text.tokenizer, [sentences], c.max_words, len(sentences),
                                c.max_sentence_words).to(self.device)
        with torch.inference_mode(), self._autocast():
            _, feats = self.model.encode_sentences_separately(text)
            grid = self.model.sentence_heatmaps(self._encoding, feats, text.sentence_valid)[0]
            # per sentence, min-max over the volume: shows where it looks *more*, even when attention is broad
            lo = grid.flatten(1).amin(1)[:, None, None, None]
            hi = grid.flatten(1).amax(1)[:, None, None, None]
            grid = (grid - lo) / (hi - lo).clamp_min(1e-12)
            up = F.interpolate(grid[:, None], size=c.input_size, mode="trilinear", align_corners=False)[:, 0]
        return up.float().cpu().numpy()

    def _cut_sentences(self, sentences: list[str]) -> list[str]:
        """Say which sentences are longer than the text encoder reads for one sentence (the rest is cut)."""
        limit = self.config.max_sentence_words
        lengths = [len(ids) for ids in self.model.text.tokenizer(sentences, truncation=False)["input_ids"]]
        return [f"sentence {i + 1} has {n} tokens; its heat map reads only the first {limit} "
                f"(\"{s[:40]}…\")" for i, (s, n) in enumerate(zip(sentences, lengths)) if n > limit]

    def heatmap(self, sentence: str) -> np.ndarray:
        """One sentence's heat map on the source grid of the cached volume (float32 in [0, 1])."""
        return to_original(self.sentence_heatmaps([sentence])[0], self._record).astype(np.float32)

    def heatmap_overlay(self, sentence: str) -> tuple[np.ndarray, np.ndarray]:
        """One sentence's heat map at model resolution in the source's axis order, with the 4x4 matrix from
        its voxel indices to source voxel indices (no resampling: what the widget shows)."""
        return to_source_axes(self.sentence_heatmaps([sentence])[0], self._record)

    def _scores(self) -> tuple[dict[str, float], str]:
        names = self.label_names
        source = choose_score_source(self.heads, self.config)
        if source == "classifier":
            probs = self._classifier_probabilities()[0]
        else:
            with torch.inference_mode(), self._autocast():
                probs = finding_scores(source, self.model, self.heads, self._encoding, names)[0]
        return dict(zip(names, probs.float().cpu().tolist())), SOURCE_TITLES[source]

    def _segment_logits(self) -> torch.Tensor:
        """(C, Z, Y, X) float32 class logits on the model grid (CPU)."""
        head = self.heads["segmentation"]
        with torch.inference_mode(), self._autocast():
            logits = self._graphed("segment", head, self._input, list(self._encoding.features))
            return logits[0].float().cpu().contiguous()

    def _segment(self, logits: torch.Tensor | None = None) -> np.ndarray:
        """int32 labels on the source grid of the cached volume."""
        logits = self._segment_logits() if logits is None else logits
        return to_original(logits, self._record, kind="scores", class_by_class=self.class_by_class)

    def _draft(self, settings: GenerationSettings | None) -> list[str]:
        from .model.words import report_text
        from .reports import split_sentences

        head = self.heads["report"]
        with torch.inference_mode(), self._autocast():
            probabilities = self._classifier_probabilities() if head.findings is not None else None
            memory = report_memory(head, self._encoding.tokens, probabilities)
            ids = head.generate(memory, settings)[0]
        spec = self.bundle.meta.get("head_specs", {}).get("report", {})
        text = report_text(ids, spec, self.model.text.tokenizer)
        return [s.text for s in split_sentences(text)] if text else []

    def run(
        self,
        volume: Volume,
        sentences: list[str] | str | None = None,
        outputs: tuple[str, ...] = OUTPUTS,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        generation: GenerationSettings | None = None,
    ) -> Result:
        """Run the chosen outputs. ``sentences`` get heat maps (default: the drafted report's sentences).
        ``cancel``: anything with is_set() (threading.Event), checked between stages."""
        if isinstance(sentences, str):  # one report as text, not a list of one-letter sentences
            from .reports import sentence_texts

            sentences = sentence_texts(sentences)
        unknown = set(outputs) - set(OUTPUTS)
        if unknown:
            raise PredictorError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUTS}")
        caps = self.capabilities()
        result = Result(volume_shape=volume.shape, model_card=self.model_card, bundle_name=self.bundle.name,
                        bundle_path=str(self.bundle.path or ""),
                        options={"outputs": list(outputs), "device": str(self.device), "precision": self.precision,
                                 "allow_out_of_domain": self.allow_out_of_domain,
                                 "sentences_given": sentences is not None})
        self.check_volume(volume)  # memory and shape, from the header alone
        result.domain_warnings, result.overrides = self.check_domain(
            volume, str(volume.metadata.get("source") or "the volume"))
        result.messages += result.domain_warnings + result.overrides + list(self.bundle.messages)
        stages = ["encode"] + [o for o in ("segmentation", "scores", "report", "heatmaps") if o in outputs]

        def step(name: str, i: int) -> float:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled before {name}")
            if progress:
                progress(name, i / len(stages))
            return time.perf_counter()

        t = step("encode", 0)
        self.encode(volume)
        result.timings["preprocess + encode"] = time.perf_counter() - t
        result.record = self._record
        for i, stage in enumerate(stages[1:], start=1):
            if caps[stage]:
                result.messages.append(f"{stage} disabled: {caps[stage]}")
                continue
            t = step(stage, i)
            if stage == "segmentation":
                result.labels = self._segment()
                result.class_names = self.class_names or [f"class {k}" for k in range(int(result.labels.max()) + 1)]
            elif stage == "scores":
                result.scores, result.score_source = self._scores()
            elif stage == "report":
                result.report = self._draft(generation)
                result.draft_reads_scores = self.heads["report"].findings is not None
            elif stage == "heatmaps":
                result.sentences = [s for s in (sentences if sentences is not None else result.report) if s.strip()]
                if result.sentences:
                    result.heatmaps_model = self.sentence_heatmaps(result.sentences)
                    result.messages += self._cut_sentences(result.sentences)
                else:
                    result.messages.append("heat maps skipped: no sentences (no report drafted and none given)")
            result.timings[stage] = time.perf_counter() - t
        if progress:
            progress("done", 1.0)
        for stage, seconds in result.timings.items():
            log.info("MG-3D %s: %.2f s", stage, seconds)
        return result
