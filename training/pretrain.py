"""MG-3D pre-training (MIM, MLM, SFR, CML, SSM, DFA) on one device, several GPUs or several nodes.

    python -m training.pretrain --data synthetic:2000 --preset tiny --max-steps 2000
    python -m training.pretrain --config my_run.yaml --devices 4 --strategy ddp --precision bf16-mixed
    torchrun / srun launch the same command on many nodes (Lightning reads the environment).

Writes OUT_DIR/checkpoints/{last,best}.ckpt (for exact resume with --resume last), OUT_DIR/logs (CSV and
TensorBoard, every loss separately) and, at the end, OUT_DIR/bundle: the model bundle the napari plugin loads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from napari_mg3d.checkpoint import Bundle, load_bundle, save_bundle
from napari_mg3d.model import ConfigError, MG3DConfig, build_model_config
from napari_mg3d.preprocess import PreprocessConfig, preprocess_config_of

from .data import StepIndexedSampler, build_dataset, collate_keeping_empty
from .module import NonFiniteLossError, PretrainModule
from .params import (
    PretrainParams,
    model_overrides,
    option_name,
    parse_devices,
    parse_params,
    resolve_strategy,
    run_cli,
    validate_params,
)

log = logging.getLogger("training.pretrain")


def model_config(p: PretrainParams, init: MG3DConfig | None = None) -> MG3DConfig:
    """The model config of a run: the preset, or ``init`` (the --init-from bundle's config), with the run's
    model overrides (``params.model_overrides``)."""
    return build_model_config(p.preset, model_overrides(p), base=init,
                              base_name=f"--init-from {p.init_from}" if init is not None else "", spell=option_name)


def load_init_heads(module: PretrainModule, b: Bundle) -> None:
    """Start ``module``'s pre-training heads from a bundle's (heads it lacks stay as initialised)."""
    heads = {"mim_decoder": module.pretrainer.mim_decoder, "mlm_head": module.pretrainer.mlm_head}
    for name, head in heads.items():
        if name in b.head_state:
            head.load_state_dict(b.head_state[name])
        else:
            log.warning("--init-from %s has no %s; it starts from random weights", b.path, name)


class StopAfterSteps(L.Callback):
    """End the run after ``n`` more optimiser steps, writing last.ckpt first (as a kill would find it)."""

    def __init__(self, n: int, path: Path) -> None:
        self.n, self.path, self.start = n, path, None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None and trainer.global_step - self.start >= self.n and not trainer.should_stop:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


class TrainingClock(L.Callback):
    """Wall-clock seconds of the run, kept in its checkpoints, so a resumed run's total counts every part."""

    def __init__(self) -> None:
        self.earlier, self.started = 0.0, time.perf_counter()

    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self.started

    def state_dict(self) -> dict:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state: dict) -> None:
        self.earlier = float(state.get("seconds", 0.0))


class _Progress:
    """Callable handed to the sampler: (consumed, total, rank, world) from the trainer's restored state."""

    def __init__(self, params: PretrainParams) -> None:
        self.params = params
        self.trainer: L.Trainer | None = None

    def __call__(self):
        p, t = self.params, self.trainer
        per_step = p.batch_size * max(1, p.accumulate)
        step = t.global_step if t is not None else 0
        rank = t.global_rank if t is not None else 0
        world = t.world_size if t is not None else 1
        return step * per_step, p.max_steps * per_step, rank, world


def make_trainer(p: PretrainParams, out: Path, val: bool) -> L.Trainer:
    monitor = "val/total" if val else "train/total"
    last = ModelCheckpoint(dirpath=out / "checkpoints", filename="last", every_n_train_steps=p.checkpoint_every,
                           save_top_k=1, enable_version_counter=False)
    best = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor, mode="min",
                           every_n_train_steps=None if val else p.checkpoint_every, save_top_k=1,
                           enable_version_counter=False)
    callbacks = [last, best, LearningRateMonitor(logging_interval="step"), TrainingClock()]
    if p.progress:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    if p.stop_after_steps:
        callbacks.append(StopAfterSteps(p.stop_after_steps, out / "checkpoints" / "last.ckpt"))
    devices = parse_devices(p.devices)
    return L.Trainer(
        max_steps=p.max_steps, accelerator=p.accelerator, devices=devices, num_nodes=p.num_nodes,
        strategy=resolve_strategy(p.strategy, DDPStrategy), precision=p.precision, accumulate_grad_batches=p.accumulate,
        gradient_clip_val=p.grad_clip or None, log_every_n_steps=p.log_every, callbacks=callbacks,
        logger=[CSVLogger(out, name="logs"), TensorBoardLogger(out, name="tb")],
        use_distributed_sampler=False, enable_progress_bar=p.progress, default_root_dir=out,
        val_check_interval=p.val_every or None, check_val_every_n_epoch=None if p.val_every else 1,
        num_sanity_val_steps=0, deterministic=False, enable_model_summary=False,
    )


def run(p: PretrainParams) -> Path:
    """Train; returns the bundle directory."""
    import warnings

    # Resuming mid-epoch is exact here: StepIndexedSampler derives the data position from the global step.
    warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
    # The frozen text encoder stays in eval mode on purpose.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    validate_params(p)
    out = Path(p.out_dir)
    ckpt = resume_checkpoint(p, out)
    L.seed_everything(p.seed, workers=True)
    init = load_bundle(p.init_from) if p.init_from else None
    try:
        cfg = model_config(p, init.config if init is not None else None)
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    pre_cfg = preprocess_config_of(init.meta if init is not None else None, cfg)
    train_set = build_dataset(p.data, pre_cfg, p.cache_dir or None, p.seed, tuple(p.synthetic_shape), with_mask=False)
    val_set = build_dataset(p.val_data, pre_cfg, p.cache_dir or None, p.seed + 10_000_000,
                            tuple(p.synthetic_shape), with_mask=False) if p.val_data else None

    progress = _Progress(p)
    sampler = StepIndexedSampler(len(train_set), p.seed, progress)
    loader_kw = dict(num_workers=p.num_workers, collate_fn=collate_keeping_empty, pin_memory=torch.cuda.is_available(),
                     persistent_workers=p.num_workers > 0)
    train_loader = DataLoader(train_set, batch_size=p.batch_size, sampler=sampler, drop_last=False, **loader_kw)
    val_loader = DataLoader(val_set, batch_size=p.batch_size, shuffle=False, **loader_kw) if val_set else None

    module = PretrainModule(cfg, p, model=init.model if init is not None else None)
    if init is not None and not p.resume:  # a resumed run restores its own weights from the checkpoint
        load_init_heads(module, init)
    trainer = make_trainer(p, out, val_set is not None)
    progress.trainer = trainer
    try:
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt)
    except NonFiniteLossError as err:
        raise SystemExit(diverged_message(err, out)) from None

    used, skipped = module.sample_counts or (module.samples_used, module.samples_skipped)
    if used == 0:
        raise SystemExit(f"pre-training had no usable sample: all {skipped} samples it drew failed to load (see the "
                         f"warnings above for the files and reasons); nothing was trained and no bundle was written")
    bundle = out / "bundle"
    if trainer.global_step < p.max_steps:
        if trainer.is_global_zero:
            print(f"stopped at step {trainer.global_step} of {p.max_steps}; continue with --resume last", flush=True)
        return out / "checkpoints" / "last.ckpt"
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        metrics.update(samples_used=used, samples_skipped=skipped,
                       **{f"text_{k}": v for k, v in module.text_stats.items()})
        print(module.text_summary(), flush=True)
        share = skipped / max(1, used + skipped)
        if share > SKIPPED_WARN_SHARE:
            print(f"warning: {skipped} of {used + skipped} samples ({100 * share:.0f}%) failed to load and were "
                  "skipped; the bundle's provenance records it", flush=True)
        clock = next(c for c in trainer.callbacks if isinstance(c, TrainingClock))
        save_pretrained_bundle(bundle, module, pre_cfg, trainer.global_step, metrics, round(clock.seconds(), 1))
        from . import figures

        figures.loss_curves(logged_losses(out), out / "loss_curves.png", "pre-training losses per step")
        (out / "params.json").write_text(json.dumps(p.to_dict(), indent=2))
        print(f"pre-training finished at step {trainer.global_step}; bundle: {bundle.resolve()}", flush=True)
    return bundle


SKIPPED_WARN_SHARE = 0.05  # a run that skipped more than this share of its samples says so at the end


def resume_checkpoint(p: PretrainParams, out: Path) -> str | None:
    """The checkpoint --resume names (checked to exist and to be readable), or None for a new run; a new run
    into a folder that holds an earlier run is refused unless --overwrite."""
    if not p.resume:
        earlier = [f for f in (out / "checkpoints", out / "bundle") if f.exists() and any(f.iterdir())]
        if earlier and not p.overwrite:
            raise SystemExit(f"--out-dir {out} already holds a run ({earlier[0]}); continue it with --resume last, "
                             "choose another --out-dir, or replace it with --overwrite")
        for folder in earlier:  # --overwrite: nothing of the earlier run may sit beside the new one
            shutil.rmtree(folder)
        return None
    ckpt = out / "checkpoints" / "last.ckpt" if p.resume == "last" else Path(p.resume)
    if not ckpt.is_file():
        raise SystemExit(f"--resume {p.resume}: checkpoint {ckpt} does not exist")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        if "state_dict" not in state:
            raise KeyError("state_dict")
    except Exception as err:  # noqa: BLE001 - any failure to read it is the same message to the user
        best = ckpt.parent / "best.ckpt"
        hint = f"; {best} may be used instead (--resume {best})" if best.is_file() and best != ckpt else ""
        raise SystemExit(f"--resume {p.resume}: checkpoint {ckpt} is empty or corrupt ({type(err).__name__}: "
                         f"{err}){hint}") from None
    return str(ckpt)


def logged_losses(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every train/<loss> the CSV logger wrote under OUT/logs, as (step, value) per loss."""
    import csv

    curves: dict[str, dict[int, float]] = {}
    for path in sorted((out / "logs").glob("version_*/metrics.csv")):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                for key, value in row.items():
                    if key.startswith("train/") and value not in ("", None) and row.get("step"):
                        curves.setdefault(key[len("train/"):], {})[int(row["step"])] = float(value)
    return {name: sorted(points.items()) for name, points in curves.items()}


def diverged_message(err: NonFiniteLossError, out: Path) -> str:
    last = out / "checkpoints" / "last.ckpt"
    kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written before it"
    return (f"pre-training diverged at {err}; the run stopped without a bundle and {kept}. Continue from it with "
            "--resume last and a lower learning rate (--lr-vision, --lr-fusion) or --grad-clip")


def save_pretrained_bundle(bundle: Path, module: PretrainModule, pre_cfg: PreprocessConfig, step: int,
                           metrics: dict, seconds: float | None = None) -> Path:
    """The plugin-loadable bundle of a pre-training module (with its MIM decoder and MLM head)."""
    p = module.params
    save_bundle(bundle, module.model, heads={"mim_decoder": module.pretrainer.mim_decoder,
                                             "mlm_head": module.pretrainer.mlm_head},
                meta={"preprocessing": pre_cfg.to_dict(), "labels": [],
                      "provenance": {"stage": "pretrain", "steps": step, "data": p.data, "init_from": p.init_from,
                                     "params": p.to_dict(), "final_metrics": metrics, "seconds": seconds}})
    return bundle


def checkpoint_model_config(hyper_parameters: dict, params: PretrainParams) -> MG3DConfig:
    """The model config a checkpoint was trained with. Checkpoints written before 2026-12-07 lost it (saved
    under a key that Lightning's ignore list dropped): rebuilt from the run's params as the run built it."""
    saved = hyper_parameters.get("model_config") or hyper_parameters.get("model")
    if saved:
        return MG3DConfig.from_dict(saved)
    return model_config(params, load_bundle(params.init_from).config if params.init_from else None)


def bundle_from_checkpoint(checkpoint: str | Path, bundle: str | Path) -> Path:
    """Export the model of a Lightning checkpoint (e.g. a mid-run last.ckpt) as a bundle."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    hp = state["hyper_parameters"]
    params = PretrainParams.from_dict(hp["params"])
    module = PretrainModule(checkpoint_model_config(hp, params), params)
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise ConfigError(f"{checkpoint}: its weights do not fit the model config it was rebuilt with ({err}); "
                          "it predates model configs in checkpoints and its preset has changed since") from None
    pre_cfg = preprocess_config_of(None, module.model.config)
    return save_pretrained_bundle(Path(bundle), module, pre_cfg, int(state["global_step"]), {})


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(lambda args: run(parse_params(args, "python -m training.pretrain", __doc__)), argv)



def cli() -> None:
    """The console script: ``main`` without its return value (which the script would print as an error)."""
    main()


if __name__ == "__main__":
    main()
