"""Fine-tune MG-3D for a downstream task and write a bundle the napari plugin loads.

    python -m training.finetune --task segment  --bundle runs/pretrain/bundle --data manifest:train.jsonl
    python -m training.finetune --task classify --bundle runs/seg/bundle --data synthetic:200   # adds a head
    python -m training.finetune --task report | prognosis | vocabfine ...

Tasks: classify / prognosis (linear classifier on the pooled visual feature; frozen or full fine-tuning;
multi-label or multi-class), segment (SwinUNETR decoder, Dice+CE, sliding-window validation with Dice per
class), report (transformer decoder over the visual tokens, the text encoder's tokenizer), vocabfine
(prompt pair "{finding} is present." / "is not present.", softmax over the pair, few-shot).
Heads already in the input bundle are kept, so several fine-tunes combine into one bundle.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from napari_mg3d.checkpoint import load_bundle, save_bundle
from napari_mg3d.labels import LABELS, SEGMENTATION_TARGETS
from napari_mg3d.model import ConfigError, MG3DModel, build_model_config
from napari_mg3d.model.heads import (CLASSIFIER_NORMS, PROMPT_PAIR, build_head, classifier_probabilities,
                                     prompt_batch, report_memory)
from napari_mg3d.model.losses import present_class_dice_ce
from napari_mg3d.model.mg3d import VolumeEncoder
from napari_mg3d.model.words import WordVocabulary
from napari_mg3d.preprocess import preprocess_config_of

from . import metrics as M
from .data import build_dataset, collate, findings_first, label_prevalence, training_reports
from .params import (
    PRECISIONS,
    model_overrides,
    option_name,
    parse_devices,
    parse_params,
    resolve_strategy,
    run_cli,
    validate_params,
)

log = logging.getLogger("training.finetune")
TASKS = ("classify", "prognosis", "segment", "report", "vocabfine")


@dataclass
class FinetuneParams:
    task: str = field(default="classify", metadata={"help": f"one of {', '.join(TASKS)}"})
    bundle: str = field(default="", metadata={"help": "pre-trained bundle to start from (empty: --preset from scratch)"})
    preset: str = field(default="tiny", metadata={"help": "preset when training from scratch"})
    input_size: list[int] | None = field(default=None, metadata={"model": "input_size", "help": "input size (z y x) when training from scratch (default: the preset's)"})
    text_encoder: str = field(default="", metadata={"model": "text_encoder", "help": "text encoder when training from scratch (default: the preset's)"})
    conv_stages: int | None = field(default=None, metadata={"model": "conv_stages", "help": "convolutional early encoder stages (0-3) when training from scratch (default: the preset's)"})
    data: str = field(default="synthetic:64", metadata={"help": "training data (same syntax as pretrain)"})
    val_data: str = field(default="", metadata={"help": "validation data"})
    label_names: list[str] | None = field(default=None, metadata={"help": "class/label names (default: the 18 CT-RATE names, or the lesion classes for segment)"})
    multiclass: bool = field(default=False, metadata={"help": "classify: one class per volume (softmax) instead of multi-label"})
    head_norm: str = field(default="layer", metadata={"help": (
        "classify / prognosis: normalisation before the linear layer: layer (LayerNorm per volume, as in the "
        "paper's head) | batch (each dimension standardised across volumes; keeps a new head from predicting "
        "the prior for every volume when the encoder's features are nearly the same for all of them)")})
    freeze_encoder: bool = field(default=False, metadata={"help": "train only the head (linear probing)"})
    own_encoder: bool = field(default=False, metadata={"help": (
        "classify / prognosis: the head gets its own copy of the volume encoder and fine-tunes that (at "
        "--lr-encoder); the bundle's shared encoder, and with it the heat maps, zero-shot scores and other "
        "heads, stays as it was")})
    finding_prompts: bool = field(default=False, metadata={"help": (
        "report: the decoder also reads the classifier's probability of each finding (one token per finding), "
        "so drafts follow the classifier; needs a classifier head in --bundle, which stays as it is")})
    freeze_encoder_steps: int = field(default=0, metadata={"min": 0, "help": (
        "train only the head for the first N steps, then the volume encoder too (linear probing, then "
        "fine-tuning): a new head's first, large gradients do not reach the pre-trained encoder; those steps "
        "also skip the encoder's backward pass")})
    steps: int = field(default=200, metadata={"min": 1, "help": "optimizer steps"})
    batch_size: int = field(default=2, metadata={"min": 1, "help": "volumes per step"})
    lr: float = field(default=1e-4, metadata={"min": 0, "help": "learning rate of the head"})
    lr_encoder: float = field(default=2e-5, metadata={"min": 0, "help": "learning rate of the encoder when not frozen"})
    weight_decay: float = field(default=0.01, metadata={"min": 0, "help": "AdamW weight decay"})
    report_min_count: int = field(default=2, metadata={"min": 1, "help": (
        "report: the decoder's vocabulary is the words occurring at least this many times in the training "
        "reports (rarer ones become <unk>, which is never generated)")})
    shots: int = field(default=0, metadata={"min": 0, "help": "vocabfine: use only this many training volumes (0: all)"})
    device: str = field(default="auto", metadata={"help": "accelerator: cuda | mps | cpu | auto"})
    devices: str = field(default="1", metadata={"help": "devices per node: a count, a list like 0,1, or auto (several: DDP)"})
    num_nodes: int = field(default=1, metadata={"min": 1, "help": "nodes (SLURM or torchrun provides the rendezvous)"})
    strategy: str = field(default="auto", metadata={"help": "Lightning Fabric strategy: auto | ddp | ddp_spawn | ..."})
    precision: str = field(default="32-true", metadata={"choices": PRECISIONS, "help": "32-true | bf16-mixed | 16-mixed"})
    num_workers: int = field(default=0, metadata={"min": 0, "help": "data-loading workers"})
    cache_dir: str = field(default="", metadata={"help": "preprocessed-volume cache"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    synthetic_shape: list[int] = field(default_factory=lambda: [96, 128, 160], metadata={"help": "voxels of synthetic CTs"})
    seg_target: str = field(default="lesions", metadata={"choices": tuple(SEGMENTATION_TARGETS), "help": (
        "segment on synthetic data: lesions (18 kinds) | organs (9) | all (organs and 18 lesion kinds) | "
        "organs+lesion (organs and one class for a lesion of any kind)")})
    out_dir: str = field(default="runs/finetune", metadata={"help": "output folder; the bundle goes to OUT_DIR/bundle"})
    log_every: int = field(default=10, metadata={"min": 1, "help": "print the loss every N steps"})
    checkpoint_every: int = field(default=250, metadata={"min": 1, "help": (
        "save OUT_DIR/checkpoints/last.ckpt (weights, optimiser, step, loss history, data position) every N steps")})
    resume: str = field(default="", metadata={"help": (
        "continue the run in OUT_DIR from its checkpoint: 'last' (OUT_DIR/checkpoints/last.ckpt) or a path; the "
        "run's other options must be the ones it was started with")})
    stop_after_steps: int = field(default=0, metadata={"min": 0, "help": (
        "end this run after N more steps with a checkpoint and no bundle, e.g. before a time limit; continue "
        "with --resume last")})

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def load_start(p: FinetuneParams):
    """(model, existing heads {name: module}, head specs, meta) from --bundle or from scratch."""
    overrides = model_overrides(p)
    if p.bundle:
        b = load_bundle(p.bundle)
        try:  # a from-scratch option given with --bundle must agree with the bundle's architecture
            build_model_config(p.preset, overrides, base=b.config, base_name=f"--bundle {p.bundle}",
                               spell=option_name)
        except ConfigError as err:
            raise SystemExit(str(err)) from None
        heads, specs = b.build_heads()
        return b.model, heads, specs, b.meta
    return MG3DModel(build_model_config(p.preset, overrides)), {}, {}, {}


def init_bias_from_prevalence(head: nn.Module, train_set, multiclass: bool) -> None:
    """Start a classifier at the training data's label prior, where that is known without loading volumes."""
    prior = label_prevalence(train_set, multiclass)
    if prior is None or len(prior) != head.linear.bias.numel():
        log.info("label prevalence unknown without loading the data (or not one value per class): the "
                 "classifier's bias keeps PyTorch's initialisation")
        return
    head.init_prior(prior)
    log.info("classifier bias set to the training prevalence (%s)", ", ".join(f"{v:.3f}" for v in prior))


class EpochSampler(torch.utils.data.Sampler):
    """Endless indices: epoch e is a permutation seeded by (seed, e), this process's share of it (rank::world).
    It starts ``start`` indices in, so a resumed run reads the volumes an uninterrupted one would have read,
    without loading the ones before."""

    def __init__(self, n: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.start, self.rank, self.world = n, seed, start, rank, world

    def __iter__(self):
        share = len(range(self.rank, self.n, self.world))
        epoch, skip = divmod(self.start, share) if share else (0, 0)
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            yield from order[self.rank::self.world][skip:].tolist()
            epoch, skip = epoch + 1, 0


def _infinite(loader, batches_per_epoch: int):
    """Non-empty batches of an endless loader; a whole epoch of batches without one volume is an error."""
    empty = 0
    for batch in loader:
        if batch is not None:
            empty = 0
            yield batch
        else:
            empty += 1
            if empty >= max(1, batches_per_epoch):
                raise RuntimeError("the training data produced no loadable batch")


class TaskStep(nn.Module):
    """The encoder and the task's head as one module whose forward is one batch's task loss: the unit that
    Fabric wraps for DDP (gradients of everything the loss touches are synchronised across devices)."""

    def __init__(self, task: str, model: MG3DModel, head: nn.Module, spec: dict, names, multiclass: bool,
                 data: str, finding_classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.task, self.model, self.head, self.spec = task, model, head, spec
        self.finding_classifier = finding_classifier  # frozen; its probabilities prompt the report decoder
        self.names, self.multiclass, self.data = names, multiclass, data
        self._prompt_raw: torch.Tensor | None = None
        self.encoder_frozen = False  # set by the training loop during --freeze-encoder-steps
        self.words = WordVocabulary.from_json(spec["vocabulary"]) if task == "report" else None

    def train(self, mode: bool = True) -> TaskStep:
        super().train(mode)
        if self.finding_classifier is not None:  # it only reads: no dropout, fixed statistics
            self.finding_classifier.eval()
        return self

    def _prompts(self, device: torch.device) -> torch.Tensor:
        if self._prompt_raw is None:  # frozen text features of the prompts: once; the projection trains
            with torch.no_grad():
                batch = prompt_batch(self.model.text.tokenizer, self.names).to(device)
                self._prompt_raw = self.model.text.separate_sentence_features(batch)
        return self.model.text_proj(self._prompt_raw)  # (F, 2, d)

    def forward(self, batch: dict) -> torch.Tensor:
        x = batch["volume"]
        own = getattr(self.head, "encoder", None)  # a classifier's own copy of the encoder
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            enc = own(x) if own is not None else self.model.encode_volume(x)
        if self.task in ("classify", "prognosis", "vocabfine"):
            if batch["labels"] is None:
                raise SystemExit(f"--task {self.task} needs labels in the data ({self.data} has none)")
            y = batch["labels"]
            if self.task == "vocabfine":
                logits = self.head(enc.global_feature, self._prompts(x.device))  # (B, F, 2); class 0 = present
                return F.cross_entropy(logits.reshape(-1, 2).float(), (1 - y.long()).reshape(-1))
            logits = self.head(enc.global_feature).float()  # enc is already the head's encoder's
            if not self.multiclass:
                return F.binary_cross_entropy_with_logits(logits, y.float())
            return F.cross_entropy(logits, y.argmax(-1) if y.dim() > 1 else y.long())
        if self.task == "segment":
            if batch["mask"] is None:
                raise SystemExit(f"--task segment needs masks in the data ({self.data} has none)")
            return present_class_dice_ce(self.head(x, enc.features), batch["mask"].long())
        target = self.words.batch([findings_first(r) for r in batch["report"]], self.spec["max_len"]).to(x.device)
        probabilities = (classifier_probabilities(self.finding_classifier, enc)
                         if self.finding_classifier is not None else None)
        return self.head.loss(target, report_memory(self.head, enc.tokens, probabilities))


def finding_prompt_labels(heads: dict, specs: dict, bundle: str) -> list[str]:
    """The classifier's label names, which a report decoder prompted with findings reads in this order."""
    spec = specs.get("classifier") or {}
    if "classifier" not in heads or not spec.get("multilabel", True):
        raise SystemExit(f"--finding-prompts: {bundle or 'the start'} has no multi-label classifier head whose "
                         "probabilities could prompt the report decoder; run --task classify on it first")
    return list(spec.get("labels") or LABELS)


def make_fabric(p: FinetuneParams):
    """Lightning Fabric for --device/--devices/--num-nodes/--strategy/--precision (DDP finds the parameters
    a task does not use, e.g. the fusion layers when segmenting)."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    accelerator = {"cuda": "cuda", "gpu": "cuda", "mps": "mps", "cpu": "cpu", "auto": "auto"}.get(p.device)
    if accelerator is None:
        raise SystemExit(f"--device {p.device!r}: choose cuda, mps, cpu or auto")
    devices = parse_devices(p.devices)
    return Fabric(accelerator=accelerator, devices=devices, num_nodes=p.num_nodes,
                  strategy=resolve_strategy(p.strategy, DDPStrategy), precision=p.precision)


def run(p: FinetuneParams) -> Path:
    """Fine-tune; returns the bundle directory (written by the first process only)."""
    validate_params(p)
    if p.task not in TASKS:
        raise SystemExit(f"--task {p.task!r}: choose one of {TASKS}")
    if not 0 <= p.freeze_encoder_steps <= p.steps:
        raise SystemExit(f"--freeze-encoder-steps {p.freeze_encoder_steps}: choose 0 to --steps ({p.steps})")
    if p.head_norm not in CLASSIFIER_NORMS:
        raise SystemExit(f"--head-norm {p.head_norm!r}: choose one of {', '.join(CLASSIFIER_NORMS)}")
    if p.own_encoder and p.task not in ("classify", "prognosis"):
        raise SystemExit(f"--own-encoder is for --task classify or prognosis, not {p.task}")
    if p.finding_prompts and p.task != "report":
        raise SystemExit(f"--finding-prompts is for --task report, not {p.task}")
    if p.own_encoder and p.freeze_encoder:
        raise SystemExit("--own-encoder fine-tunes a copy of the encoder and --freeze-encoder trains none: "
                         "choose one")
    fabric = make_fabric(p)
    fabric.launch()
    started = time.perf_counter()  # with the seconds of the parts before a resume: the stage's wall time
    torch.manual_seed(p.seed)
    model, heads, specs, meta = load_start(p)
    cfg = model.config
    pre_cfg = preprocess_config_of(meta, cfg)
    train_set = build_dataset(p.data, pre_cfg, p.cache_dir or None, p.seed, tuple(p.synthetic_shape),
                              with_mask=p.task == "segment")  # other tasks: no label maps made or cached
    if p.task == "segment" and p.data.startswith("synthetic"):
        train_set.target = p.seg_target  # type: ignore[attr-defined]
    if p.shots:
        train_set = torch.utils.data.Subset(train_set, list(range(min(p.shots, len(train_set)))))
    out = Path(p.out_dir)
    resumed = read_checkpoint(p, out)
    start_step = resumed["step"] if resumed else 0
    sampler = EpochSampler(len(train_set), p.seed, start_step * p.batch_size, fabric.global_rank, fabric.world_size)
    loader = DataLoader(train_set, batch_size=p.batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=p.num_workers, pin_memory=fabric.device.type == "cuda")

    names = p.label_names
    if p.task in ("classify", "prognosis"):
        names = names or LABELS
        head_name = "classifier" if p.task == "classify" else "prognosis"
        spec = {"type": "classifier", "n_classes": len(names), "multilabel": not p.multiclass, "labels": names,
                "norm": p.head_norm}
    elif p.task == "segment":
        names = names or SEGMENTATION_TARGETS[p.seg_target]
        head_name, spec = "segmentation", {"type": "segmentation", "n_classes": len(names), "classes": names}
    elif p.task == "report":
        head_name = "report"
        words = WordVocabulary.build(training_reports(train_set), p.report_min_count)
        log.info("report decoder vocabulary: %d words occurring at least %d times in the training reports",
                 len(words) - 4, p.report_min_count)
        spec = {"type": "report", "layers": 2, "heads": 4, "max_len": 160, "bos_id": words.bos_id,
                "eos_id": words.eos_id, "pad_id": words.pad_id, "unk_id": words.unk_id, "vocab_size": len(words),
                "vocabulary": words.to_json()}
        if p.finding_prompts:
            spec["findings"] = finding_prompt_labels(heads, specs, p.bundle)
    else:
        names = names or LABELS
        head_name, spec = "prompt", {"type": "prompt", "labels": names, "pair": list(PROMPT_PAIR)}
    if p.task == "segment" and min(cfg.input_size) < 64:
        raise SystemExit(f"--task segment needs an input of at least 64 voxels per axis (got {cfg.input_size}): "
                         "the decoder's 1/32 bottleneck must have more than one voxel")
    head = build_head(spec, cfg, model.text.vocab_size)
    if p.own_encoder:  # the bundle rebuilds it from the spec; here it starts as the shared encoder's copy
        head.encoder = VolumeEncoder.copy_of(model)
        spec["own_encoder"] = True
    if p.task in ("classify", "prognosis"):
        init_bias_from_prevalence(head, train_set, p.multiclass)

    stale = sorted(set(heads) - {head_name, "mim_decoder", "mlm_head"})
    if stale and not (p.freeze_encoder or p.own_encoder):
        log.warning("fine-tuning the encoder changes the features that the bundle's other heads %s were trained "
                    "on; fine-tune them again afterwards (or use --freeze-encoder or --own-encoder)", stale)
    shared = [q for _, q in model.trainable_named_parameters()]
    for q in shared:
        q.requires_grad_(not (p.freeze_encoder or p.own_encoder))
    encoder_params = list(head.encoder.parameters()) if p.own_encoder else shared
    own_ids = {id(q) for q in encoder_params} if p.own_encoder else set()
    groups = [{"params": [q for q in head.parameters() if id(q) not in own_ids], "lr": p.lr}]
    if not p.freeze_encoder:
        groups.append({"params": encoder_params, "lr": p.lr_encoder})
    finding_classifier = heads["classifier"].requires_grad_(False) if p.finding_prompts else None
    step_module = TaskStep(p.task, model, head, spec, names, multiclass=p.multiclass, data=p.data,
                           finding_classifier=finding_classifier)
    task_step, opt = fabric.setup(step_module, torch.optim.AdamW(groups, weight_decay=p.weight_decay))
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)  # EpochSampler shares by rank
    history: list[float] = []
    earlier_seconds = float(resumed["state"].get("seconds", 0.0)) if resumed else 0.0
    if resumed:
        rest = resumed["state"]
        missing, unexpected = step_module.load_state_dict(rest["weights"], strict=False)
        if unexpected or any(not k.startswith(FROZEN_TEXT) for k in missing):
            raise SystemExit(f"--resume {p.resume}: {resumed['path']} does not fit this model (missing "
                             f"{[k for k in missing if not k.startswith(FROZEN_TEXT)][:3]}, unexpected {unexpected[:3]})")
        opt.load_state_dict(rest["optimizer"])
        history = list(rest["history"])
        torch.set_rng_state(rest["torch_rng"])
        log.info("resumed %s at step %d of %d", resumed["path"], start_step, p.steps)
    task_step.train()
    model.text.eval()  # frozen, and without dropout

    from tqdm import tqdm

    t0 = time.perf_counter()
    batches = _infinite(loader, -(-len(train_set) // max(1, p.batch_size * fabric.world_size)))
    last_step = p.steps if not p.stop_after_steps else min(p.steps, start_step + p.stop_after_steps)
    bar = tqdm(total=p.steps, initial=start_step, desc=f"fine-tuning ({p.task})", disable=not fabric.is_global_zero)
    for step in range(start_step + 1, last_step + 1):
        step_module.encoder_frozen = step <= p.freeze_encoder_steps
        loss = task_step(next(batches))
        if not bool(torch.isfinite(loss.detach())):
            raise SystemExit(f"fine-tuning diverged at step {step}: the {p.task} loss is {float(loss)}; no bundle "
                             "was written. Try a lower --lr / --lr-encoder")
        opt.zero_grad(set_to_none=True)
        fabric.backward(loss)
        opt.step()
        history.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if step % p.log_every == 0 or step == p.steps:
            fabric.print(f"step {step}/{p.steps} loss {np.mean(history[-p.log_every:]):.4f} "
                         f"({(time.perf_counter() - t0) / (step - start_step):.2f} s/step)", flush=True)
        if step % p.checkpoint_every == 0 or step == last_step < p.steps:
            save_checkpoint(fabric, out, step, p, step_module, opt, history,
                            earlier_seconds + time.perf_counter() - started)
    bar.close()

    fabric.barrier()
    if last_step < p.steps:
        print(f"fine-tuning ({p.task}) stopped at step {last_step} of {p.steps}; continue with --resume last "
              f"(checkpoint {checkpoint_path(out)})", flush=True)
        return checkpoint_path(out)
    if not fabric.is_global_zero:
        return out / "bundle"
    write_loss_history(out, history, p.task)
    metrics = {"final_loss": float(np.mean(history[-max(1, p.log_every):]))}
    if p.task in ("classify", "prognosis"):
        with fabric.autocast():
            used = recalibrate_head(model, head, train_set, p, fabric.device)
        if used:
            metrics["head_statistics_volumes"] = used
    if p.val_data:
        try:
            with fabric.autocast():
                metrics.update(validate(p, model, head, spec, names, pre_cfg, fabric.device))
            print("validation: " + json.dumps(metrics), flush=True)
        except Exception as err:  # noqa: BLE001 - the trained head is kept whatever the validation does
            metrics["validation_error"] = f"{type(err).__name__}: {err}"
            log.error("validation on %s failed (%s); the bundle is written without validation metrics; evaluate "
                      "it with python -m training.evaluate", p.val_data, metrics["validation_error"])

    heads[head_name] = head
    specs[head_name] = spec
    provenance = list(meta.get("provenance_chain", []))
    if meta.get("provenance"):
        provenance.append(meta["provenance"])
    new_meta = dict(meta)  # save_bundle rewrites the keys it owns (format, model, heads, ...)
    new_meta.pop("model_card", None)  # derived again from the provenance, with this stage in it
    new_meta.update({"head_specs": specs, "preprocessing": pre_cfg.to_dict(), "provenance_chain": provenance,
                     "provenance": {"stage": f"finetune-{p.task}", "steps": p.steps, "data": p.data,
                                    "params": p.to_dict(), "metrics": metrics,
                                    "world_size": fabric.world_size,
                                    "seconds": round(earlier_seconds + time.perf_counter() - started, 1)}})
    if spec.get("labels"):
        new_meta["labels"] = spec["labels"]
    if spec.get("classes"):
        new_meta["classes"] = spec["classes"]
    bundle = save_bundle(out / "bundle", model.cpu(), heads={k: v.cpu() for k, v in heads.items()}, meta=new_meta)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(checkpoint_path(out).parent, ignore_errors=True)  # the finished run lives on as its bundle
    print(f"fine-tuning ({p.task}) finished; bundle: {bundle.resolve()}", flush=True)
    return bundle


RUN_DEFINING = ("task", "bundle", "preset", "input_size", "text_encoder", "data", "label_names", "multiclass",
                "head_norm", "freeze_encoder", "own_encoder", "finding_prompts", "freeze_encoder_steps", "steps",
                "batch_size", "lr", "lr_encoder", "weight_decay", "report_min_count", "shots", "seed",
                "synthetic_shape", "seg_target")


FROZEN_TEXT = "model.text."  # the frozen text encoder: the same weights in every checkpoint, so not stored


def checkpoint_path(out: Path) -> Path:
    return out / "checkpoints" / "last.ckpt"


def save_checkpoint(fabric, out: Path, step: int, p: FinetuneParams, task_step: nn.Module, opt, history,
                    seconds: float = 0.0) -> None:
    """OUT/checkpoints/last.ckpt: everything a resumed run needs to continue as if never stopped. Written to a
    temporary name and renamed, so a run killed while saving keeps the checkpoint before."""
    path = checkpoint_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name("last.ckpt.partial")
    weights = {k: v for k, v in task_step.state_dict().items() if not k.startswith(FROZEN_TEXT)}
    fabric.save(partial, {"weights": weights, "optimizer": opt.state_dict(), "step": step,
                          "history": list(history), "torch_rng": torch.get_rng_state(), "seconds": seconds,
                          "params": {k: getattr(p, k) for k in RUN_DEFINING}})
    if fabric.is_global_zero:
        partial.replace(path)
    fabric.barrier()


def differing_options(recorded: dict, p: FinetuneParams) -> list[str]:
    """The run-defining options whose value in a checkpoint's ``recorded`` params differs from ``p``'s."""
    return [k for k in RUN_DEFINING if k in recorded and recorded[k] != getattr(p, k)]


def read_checkpoint(p: FinetuneParams, out: Path) -> dict | None:
    """The checkpoint --resume names, checked to be readable and to belong to a run with these options; None
    for a new run, which is refused where OUT holds an earlier run's checkpoint (its work would be lost)."""
    if not p.resume:
        if checkpoint_path(out).is_file():
            raise SystemExit(f"--out-dir {out} holds an earlier fine-tuning run ({checkpoint_path(out)}); continue it "
                             "with --resume last, or choose another --out-dir")
        return None
    path = checkpoint_path(out) if p.resume == "last" else Path(p.resume)
    if not path.is_file():
        raise SystemExit(f"--resume {p.resume}: checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        step, recorded = int(state["step"]), dict(state["params"])
    except Exception as err:  # noqa: BLE001 - any failure to read it is the same message to the user
        raise SystemExit(f"--resume {p.resume}: checkpoint {path} is empty or corrupt ({type(err).__name__}: {err})") from None
    differ = differing_options(recorded, p)
    if differ:
        raise SystemExit(f"--resume {p.resume}: the run in {path} was started with other options: " + ", ".join(
            f"{option_name(k)} {recorded[k]!r} (now {getattr(p, k)!r})" for k in differ)
            + "; resume with the options it was started with, or start a new run in another --out-dir")
    return {"path": path, "step": step, "state": state}


def write_loss_history(out: Path, history: list[float], task: str) -> None:
    """The loss of every step: loss_history.csv, TensorBoard events under OUT/tb and loss_curve.png."""
    from . import figures

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "loss_history.csv", "w") as fh:
        fh.write("step,loss\n" + "".join(f"{k},{v:.6g}\n" for k, v in enumerate(history, start=1)))
    try:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(out / "tb")) as writer:
            for k, v in enumerate(history, start=1):
                writer.add_scalar(f"train/{task}_loss", v, k)
    except ImportError:  # tensorboard is in the [train] extra
        log.info("tensorboard is not installed: the loss history is in loss_history.csv only")
    figures.loss_curves({f"{task} loss": list(enumerate(history, start=1))}, out / "loss_curve.png",
                        f"fine-tuning ({task}) loss per step")


RECALIBRATION_VOLUMES = 256


@torch.no_grad()
def recalibrate_head(model: MG3DModel, head: nn.Module, train_set, p: FinetuneParams, device,
                     max_volumes: int = RECALIBRATION_VOLUMES) -> int:
    """A --head-norm batch classifier's standardisation, re-estimated with the final encoder on up to
    ``max_volumes`` training volumes (as batch norm is after weight averaging): the statistics kept during
    training trail an encoder that moved. Returns the volumes used (0 for a LayerNorm head)."""
    if p.head_norm != "batch":
        return 0
    model.eval()
    loader = DataLoader(train_set, batch_size=max(2, p.batch_size), collate_fn=collate, num_workers=p.num_workers)

    def encodings():
        seen = 0
        for batch in loader:
            if batch is None:
                continue
            yield model.encode_volume(batch["volume"].to(device))
            seen += batch["volume"].shape[0]
            if seen >= max_volumes:
                return

    used = head.recalibrate_statistics(encodings())
    log.info("classifier standardisation re-estimated on %d training volumes with the final encoder", used)
    return used


@torch.no_grad()
def validate(p: FinetuneParams, model, head, spec, names, pre_cfg, device) -> dict:
    """Task metrics on --val-data: Dice per class (sliding window) for segment, AUC for classification."""
    val_set = build_dataset(p.val_data, pre_cfg, p.cache_dir or None, p.seed + 10_000_000, tuple(p.synthetic_shape),
                            with_mask=p.task == "segment")
    if p.task == "segment" and p.val_data.startswith("synthetic"):
        val_set.target = p.seg_target  # type: ignore[attr-defined]
    model.eval()
    head.eval()
    loader = DataLoader(val_set, batch_size=1, collate_fn=collate)
    if p.task == "segment":
        from monai.inferers import sliding_window_inference

        def predictor(x):
            return head(x, model.encode_volume(x).features)

        scores = []
        for batch in loader:
            if batch is None:
                continue
            x = batch["volume"].to(device)
            logits = sliding_window_inference(x, model.config.input_size, 1, predictor, overlap=0.25)
            scores.append(M.dice_per_class(logits.argmax(1).cpu(), batch["mask"], spec["n_classes"]))
        per_class = [M.mean_defined(column) for column in zip(*scores)]
        mean = M.mean_defined(per_class)
        return {"dice_per_class": {n: (None if v != v else v) for n, v in zip(names[1:], per_class)},
                "mean_dice": None if mean != mean else mean}
    if p.task in ("classify", "prognosis"):
        probs, labels = [], []
        for batch in loader:
            if batch is None:
                continue
            logits = head.classify(model.encode_volume(batch["volume"].to(device)))
            probs.append(head.probabilities(logits).float().cpu())  # numpy has no bfloat16
            labels.append(batch["labels"])
        P, Y = torch.cat(probs).numpy(), torch.cat(labels).numpy()
        per = M.auc_per_label(Y, P, names)
        return {"auc_per_label": per, "mean_auc": M.mean_defined(per.values()) if per else None}
    return {}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_cli(lambda args: run(parse_params(args, "python -m training.finetune", __doc__, FinetuneParams)), argv)



def cli() -> None:
    """The console script: ``main`` without its return value (which the script would print as an error)."""
    main()


if __name__ == "__main__":
    main()
