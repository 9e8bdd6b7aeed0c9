"""Lightning module for MG-3D pre-training: the core's MG3DPretrainer, the paper's optimiser, gathered
contrastive features, deterministic masks per step."""

from __future__ import annotations

import math

import lightning as L
import torch

from napari_mg3d.model import MG3DConfig, MG3DModel, MG3DPretrainer, tokenize_reports

from .params import PretrainParams


class NonFiniteLossError(RuntimeError):
    """A loss term or a gradient became NaN or inf; the message names the step and the term."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"step {step}: {what}")
        self.step = step


def lr_lambda(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


class PretrainModule(L.LightningModule):
    """Wraps MG3DPretrainer. ``training_step`` tokenises the batch's sentences, seeds the MIM/MLM masks from
    (seed, global step, micro-batch, rank) so that a resumed run draws the same masks, and logs every loss."""

    def __init__(self, config: MG3DConfig, params: PretrainParams, model: MG3DModel | None = None) -> None:
        """``model``: start from this model (e.g. an --init-from bundle's, its config replaced by ``config``)
        instead of building a new one."""
        super().__init__()
        # Not under the key "model": ignore=["model"] (the module's `model` argument) would drop that key too.
        self.save_hyperparameters({"model_config": config.to_dict(), "params": params.to_dict()}, ignore=["model"])
        self.params = params
        if model is None:
            model = MG3DModel(config)
        else:
            model.config = config
        self.pretrainer = MG3DPretrainer(model, gather=self._gather_keys)
        self._last_batch: dict | None = None
        self.samples_used = 0  # this device's samples that reached a training step, and those that failed to load
        self.samples_skipped = 0
        self.sample_counts: tuple[int, int] | None = None  # over every device, set when training ends
        self.text_stats: dict[str, int] = {}  # what tokenisation dropped or cut (text.tokenize_reports)

    @property
    def model(self) -> MG3DModel:
        return self.pretrainer.model

    def _gather_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys from every device for InfoNCE, local rows first (gradients flow back to each device)."""
        if self._world_size() <= 1:
            return keys
        gathered = self.all_gather(keys, sync_grads=True)  # (world, B, d)
        rank = self.trainer.global_rank
        others = [gathered[i] for i in range(gathered.shape[0]) if i != rank]
        return torch.cat([keys, *others], dim=0)

    def _mask_generator(self, batch_idx: int) -> torch.Generator:
        micro = batch_idx % max(1, self.params.accumulate)
        rank = self._trainer.global_rank if self._trainer is not None else 0
        seed = ((self.params.seed * 1_000_003 + self.global_step) * 101 + micro) * 1009 + rank
        return torch.Generator().manual_seed(seed % (2**63 - 1))

    def _losses(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.model.config
        text = tokenize_reports(self.model.text.tokenizer, batch["sentences"], cfg.max_words, cfg.max_sentences,
                                cfg.max_sentence_words).to(self.device)
        if self.training:
            for key, value in text.stats.items():
                self.text_stats[key] = self.text_stats.get(key, 0) + value
        return self.pretrainer(batch["volume"], text, generator)

    def _on(self, losses: dict) -> dict:
        """The losses of the objectives this run trains, and the total (objectives that are off stay unlogged)."""
        keep = set(self.pretrainer.config.objectives) | {"total"}
        return {k: v for k, v in losses.items() if k in keep}

    def training_step(self, batch: dict, batch_idx: int):
        self.samples_skipped += int(batch.get("skipped", 0))
        if "volume" not in batch:  # every example of the batch failed to load (already logged and counted)
            return self._empty_step_loss(batch_idx)
        self._last_batch = batch
        self.samples_used += batch["volume"].shape[0]
        losses = self._losses(batch, self._mask_generator(batch_idx))
        self._stop_if_not_finite(losses)
        bs = batch["volume"].shape[0]
        for name, value in self._on(losses).items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False, batch_size=bs,
                     prog_bar=name == "total", sync_dist=False)
        return losses["total"]

    def _stop_if_not_finite(self, losses: dict[str, torch.Tensor]) -> None:
        """Raise NonFiniteLossError before a NaN/inf loss reaches the weights (every device decides
        together, so none is left waiting in a collective)."""
        bad = {k: float(v.detach()) for k, v in self._on(losses).items() if not bool(torch.isfinite(v).all())}
        if self._world_size() > 1:
            if not self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
                return
        elif not bad:
            return
        terms = ", ".join(f"{k} = {v}" for k, v in bad.items() if k != "total") or "on another device"
        raise NonFiniteLossError(self.global_step, f"non-finite loss ({terms})")

    def on_before_optimizer_step(self, optimizer) -> None:
        """Non-finite gradients (with finite losses) would make every weight NaN at this step's update."""
        if self.params.precision.startswith("16"):  # the fp16 grad scaler skips such steps on purpose
            return
        bad = [n for n, p in self.pretrainer.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if bad:
            raise NonFiniteLossError(self.global_step, f"non-finite gradients in {len(bad)} tensors ({', '.join(bad[:3])})")

    def text_summary(self) -> str:
        t = self.text_stats
        cfg = self.model.config
        return (f"report text this run: {t.get('sentences', 0)} sentences in {t.get('reports', 0)} reports; "
                f"{t.get('sentences_dropped', 0)} dropped from {t.get('reports_truncated', 0)} reports with more "
                f"than {cfg.max_sentences} sentences (the first and last ones are kept), {t.get('sentences_cut', 0)} "
                f"sentences cut to {cfg.max_sentence_words} tokens")

    def on_train_end(self) -> None:
        keys = ("reports", "sentences", "sentences_dropped", "sentences_cut", "reports_truncated")
        counts = torch.tensor([self.samples_used, self.samples_skipped, *(self.text_stats.get(k, 0) for k in keys)],
                              dtype=torch.long, device=self.device)
        if self._world_size() > 1:  # every device's counts, summed
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.sample_counts = (int(counts[0]), int(counts[1]))
        self.text_stats = {k: int(v) for k, v in zip(keys, counts[2:])}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mg3d_samples"] = [self.samples_used, self.samples_skipped]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.samples_used, self.samples_skipped = checkpoint.get("mg3d_samples", [0, 0])

    def _empty_step_loss(self, batch_idx: int) -> torch.Tensor | None:
        """A step without data. On one device it is skipped. Under DDP every device must make the same
        collective calls (the feature gathers inside the losses, then the gradient all-reduce), so this
        device replays its last good batch with weight zero: it adds nothing to the gradients."""
        if self._world_size() <= 1:
            return None
        if self._last_batch is None:
            raise RuntimeError(
                f"rank {self.trainer.global_rank}: every sample of its first batch failed to load (see the "
                "warnings above). Under DDP a step cannot be skipped on one device alone; remove or fix the "
                "unreadable samples, or use a larger --batch-size.")
        losses = self._losses(self._last_batch, self._mask_generator(batch_idx))
        self._stop_if_not_finite(losses)  # the other devices take part in the same decision
        return losses["total"] * 0.0

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def validation_step(self, batch: dict, batch_idx: int):
        if "volume" not in batch:
            return None
        losses = self._losses(batch, torch.Generator().manual_seed(self.params.seed + batch_idx))
        for name, value in self._on(losses).items():
            self.log(f"val/{name}", value, on_epoch=True, batch_size=batch["volume"].shape[0], sync_dist=True,
                     prog_bar=name == "total")

    def configure_optimizers(self):
        vision, other = [], []
        for name, p in self.pretrainer.trainable_named_parameters():
            (vision if name.startswith("model.vision.") else other).append(p)
        p = self.params
        opt = torch.optim.AdamW([{"params": vision, "lr": p.lr_vision, "name": "vision"},
                                 {"params": other, "lr": p.lr_fusion, "name": "fusion_and_heads"}],
                                weight_decay=p.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p.warmup_steps, p.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
