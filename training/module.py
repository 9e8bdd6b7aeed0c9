"""Lightning module for MG-3D pre-training: the core's MG3DPretrainer, the paper's optimiser, gathered
contrastive features, deterministic masks per step."""

from __future__ import annotations

import math

import lightning as L
import torch

from napari_mg3d.model import MG3DConfig, MG3DModel, MG3DPretrainer, tokenize_reports

from .params import PretrainParams


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
        self.save_hyperparameters({"model": config.to_dict(), "params": params.to_dict()}, ignore=["model"])
        self.params = params
        if model is None:
            model = MG3DModel(config)
        else:
            model.config = config
        self.pretrainer = MG3DPretrainer(model, gather=self._gather_keys)
        self._last_batch: dict | None = None

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
        return self.pretrainer(batch["volume"], text, generator)

    def _on(self, losses: dict) -> dict:
        """The losses of the objectives this run trains, and the total (objectives that are off stay unlogged)."""
        keep = set(self.pretrainer.config.objectives) | {"total"}
        return {k: v for k, v in losses.items() if k in keep}

    def training_step(self, batch: dict, batch_idx: int):
        if not batch:  # every example of the batch failed to load (already logged and counted)
            return self._empty_step_loss(batch_idx)
        self._last_batch = batch
        losses = self._losses(batch, self._mask_generator(batch_idx))
        bs = batch["volume"].shape[0]
        for name, value in self._on(losses).items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False, batch_size=bs,
                     prog_bar=name == "total", sync_dist=False)
        return losses["total"]

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
        return self._losses(self._last_batch, self._mask_generator(batch_idx))["total"] * 0.0

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def validation_step(self, batch: dict, batch_idx: int):
        if not batch:
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
