"""The generic training loop shared by the image, detection and video tasks.

Usage::

    trainer = Trainer(MyTask(cfg), cfg, resume="auto")
    metrics = trainer.fit()

What it does: DDP over torchrun processes, bf16/fp16 autocast (GradScaler for fp16), gradient
accumulation, grad-norm clipping, activation checkpointing, optional ``torch.compile`` and EMA,
the warmup + cosine schedule per step, skip-and-count of non-finite steps (stops after saving when
there are too many), evaluation every ``eval_every`` epochs, an atomic ``last.pt`` every epoch
(and every ``ckpt_every_steps``), ``best.pt`` on the task's primary metric, and a resume that
continues exactly where the interrupted run was (data order, augmentation, RNG, step; the lr
schedule is the resuming config's, so ``epochs`` may change). Under multi-GPU DDP BatchNorm layers
become SyncBatchNorm; unreadable samples are skipped, counted per epoch and named once.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from mvitv2.engine.checkpoint import (
    BEST,
    LAST,
    ResumeChoice,
    capture_rng,
    find_resume,
    read_training_checkpoint,
    remove_partial_writes,
    restore_rng,
    save_checkpoint,
)
from mvitv2.engine.config import TrainConfig
from mvitv2.engine.data import build_loader, first_mentions, gather_first_mentions
from mvitv2.engine.distributed import (
    DistInfo,
    cleanup_distributed,
    init_distributed,
    sync_batchnorm,
    wrap_ddp,
)
from mvitv2.engine.ema import build_ema
from mvitv2.engine.logging import RunLogger
from mvitv2.engine.optim import build_optimizer, build_scheduler
from mvitv2.engine.task import Task
from mvitv2.errors import UserValueError
from mvitv2.ops import implementation_choices, keep_training_choices
from mvitv2.utils.allocator import allocator_setting
from mvitv2.utils.precision import Precision, choose_precision, gemm_shape, kept_precision
from mvitv2.weights import CheckpointError


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps); ``last.pt`` was saved first."""


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``obj`` with every tensor (in nested lists, tuples and dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


class Trainer:
    """Runs one training job for a :class:`Task`.

    Args:
        task: builds model and data, computes losses and metrics.
        cfg: the run's configuration.
        resume: None (fresh run), a checkpoint path (or run folder), or ``auto``: the newest
            ``last.pt`` under ``cfg.output`` of the same experiment (config and task metadata
            equal apart from :data:`~mvitv2.engine.checkpoint.RESUME_MAY_CHANGE`); a fresh run if
            there is none, an error naming the run when only other experiments' runs are there.
    """

    def __init__(self, task: Task, cfg: TrainConfig, resume: str | None = None) -> None:
        self.task, self.cfg = task, cfg
        self.dist: DistInfo = init_distributed(cfg.device)
        d = self.dist
        device = d.device
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        train_ds, val_ds = task.build_datasets()
        model = task.build_model()
        notes: list[str] = []  # said once the logger exists
        if cfg.finetune:
            notes.append(f"fine-tuning from {self._init_weights(model, cfg.finetune)}")
        if cfg.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise UserValueError(
                    "grad_checkpointing=true but the model has no set_grad_checkpointing"
                )
            model.set_grad_checkpointing(True)
        model, bn_note = sync_batchnorm(model, d)
        notes += [bn_note] if bn_note else []
        self.model = model.to(device)

        def loader(dataset: Dataset, train: bool) -> DataLoader:
            return build_loader(
                dataset,
                batch_size=cfg.batch_size if train else task.eval_batch_size or cfg.batch_size,
                train=train,
                rank=d.rank,
                world_size=d.world_size,
                seed=cfg.seed,
                workers=cfg.workers,
                collate_fn=task.collate_fn(),
                strict=cfg.strict_data,
                pin_memory=device.type == "cuda",
            )

        self.train_loader = loader(train_ds, train=True)
        self.val_loader = loader(val_ds, train=False) if val_ds is not None else None
        self.steps_per_epoch = len(self.train_loader) // cfg.accum_steps
        if self.steps_per_epoch == 0:
            raise UserValueError(
                f"the training set ({len(train_ds)} samples over {d.world_size} process(es)) is "
                f"smaller than one step of batch_size={cfg.batch_size} x accum_steps="
                f"{cfg.accum_steps}; lower batch_size"
            )
        if cfg.warmup_epochs >= cfg.epochs:
            notes.append(
                f"warning: warmup_epochs={cfg.warmup_epochs:g} >= epochs={cfg.epochs}: the lr "
                f"rises for the whole run and never reaches its peak {cfg.lr(d.world_size):.3g}; "
                f"set warmup_epochs below epochs"
            )
        self.optimizer = build_optimizer(self.model, cfg, d.world_size)
        # Rank 0 decides (and fails) for everyone, so no rank waits forever on a missing file.
        found: ResumeChoice | Exception | None = None
        if d.is_main:
            try:
                found = find_resume(
                    resume,
                    cfg.output,
                    cfg.name,
                    cfg.to_dict(),
                    task.checkpoint_meta(),
                    task.upgrade_meta,
                )
            except Exception as e:
                found = e
        found = d.broadcast_object(found)
        if isinstance(found, Exception):
            raise found
        state = read_training_checkpoint(found.path, map_location=device) if found else {}
        # A resumed run computes as the run before the kill did: the precision and the kernels
        # that run measured come from its checkpoint, not from measuring again.
        recorded = state.get("implementation") or {}
        # bf16 on a CPU only where it is faster; rank 0 measures, so every process agrees.
        precision = None
        if d.is_main:
            precision = kept_precision(cfg.amp, device, recorded) or choose_precision(
                cfg.amp, device, gemm_shape(self.model)
            )
        self.precision: Precision = d.broadcast_object(precision)
        same_precision = recorded.get("precision") == self.precision.name
        keep_training_choices(recorded if same_precision else {}, self.precision.dtype)
        notes += [f"note: {self.precision.note}"] if self.precision.note else []
        self.autocast_dtype = self.precision.dtype
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=self.autocast_dtype == torch.float16
        )
        # The kernels in force (attention path, GEMM backend, precision) and why: logged and
        # checkpointed.
        kernels = implementation_choices(device, self.autocast_dtype or torch.float32, True)
        notes.append("kernels: " + ", ".join(f"{k}={v}" for k, v in kernels.items()))
        self.implementation = {
            **kernels,
            **self.precision.metadata(),
            "allocator": allocator_setting(),
        }

        # Progress (what a checkpoint restores).
        self.epoch = 0  # epoch in progress (or next to start)
        self.step_in_epoch = 0  # optimizer steps done in self.epoch
        self.global_step = 0
        # This epoch's finite steps so far (loss sum, count): a mid-epoch checkpoint keeps them,
        # so the epoch's train_loss after a resume covers the whole epoch, not its last steps.
        self.epoch_loss: tuple[float, int] = (0.0, 0)
        self.counters = {"nonfinite_total": 0, "nonfinite_consecutive": 0, "skipped_total": 0}
        self.best: float | None = None
        self.metrics: dict[str, float] = {}
        self._rng_to_restore = None
        self._bad_pending: list[tuple[str, str]] = []  # unreadable samples not yet logged
        self._bad_named: set[str] = set()

        self.ema = None
        if found is not None:
            self.run_dir = found.path.parent
            notes += self._load_state(found, state)
        else:
            name = cfg.name or time.strftime("%Y%m%d-%H%M%S")
            self.run_dir = Path(cfg.output) / d.broadcast_object(name)
        if self.ema is None and cfg.ema_decay > 0:
            self.ema = build_ema(self.model, cfg.ema_decay)
        self.scheduler = build_scheduler(
            self.optimizer, cfg, self.steps_per_epoch, d.world_size, start_step=self.global_step
        )
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if found is not None and (stale := remove_partial_writes(self.run_dir)):
                notes.append(
                    f"removed {len(stale)} partly written checkpoint file(s) of the interrupted "
                    f"run: {', '.join(p.name for p in stale)}"
                )
        d.barrier()
        self.log = RunLogger(self.run_dir, d.is_main, cfg.tensorboard, cfg.progress)
        for note in notes:
            self.log.info(note)

        self.train_model: nn.Module = self.model
        if d.distributed:
            self.train_model = wrap_ddp(self.model, d)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)

    def _init_weights(self, model: nn.Module, source: str) -> Any:
        """The task's :meth:`~mvitv2.engine.task.Task.init_weights`; a checkpoint that cannot be
        read or does not fit is the user's mistake (one message naming the tensors)."""
        try:
            return self.task.init_weights(model, source)
        except CheckpointError as e:
            raise UserValueError(f"finetune={source}: {e}") from e

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue (tensors and plain values only)."""
        rngs = self.dist.all_gather_object(capture_rng())
        # The processes' mean sum: every process resumes from it (each has the same count), so
        # the epoch's mean over processes comes out the same for any number of processes.
        loss_sum = self.dist.all_reduce_mean({"sum": self.epoch_loss[0]})["sum"]
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step": self.global_step,
            "epoch_loss": [loss_sum, self.epoch_loss[1]],
            "rng": rngs,
            "config": self.cfg.to_dict(),
            "meta": self.task.checkpoint_meta(),
            "counters": dict(self.counters),
            "metrics": dict(self.metrics),
            "best": self.best,
            "world_size": self.dist.world_size,
            "implementation": dict(self.implementation),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def _load_state(self, found: ResumeChoice, state: dict[str, Any]) -> list[str]:
        """Continue from a checkpoint; returns the lines that say what was (not) restored."""
        cfg, d = self.cfg, self.dist
        lines = []
        if found.differences:
            lines.append(
                f"warning: resuming {found.path}, whose config differs in {found.differences}"
            )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise UserValueError(
                f"--resume {found.path}: its weights do not fit this run's model (the config "
                f"differs in {found.differences}): {str(e).splitlines()[0]}"
            ) from e
        # Moments from the checkpoint; lr, weight decay and betas from this run's config.
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, h in zip(self.optimizer.param_groups, hyper):
            group.update(h)
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if cfg.ema_decay > 0:
            self.ema = build_ema(self.model, cfg.ema_decay)
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
        self.counters.update(state.get("counters", {}))
        self.metrics = dict(state.get("metrics", {}))
        self.best = state.get("best")

        # Position: the samples of the epoch already trained on, in this run's global batches.
        saved_world = int(state.get("world_size", d.world_size))
        saved_cfg = state.get("config") or {}
        per_step = (
            saved_world
            * int(saved_cfg.get("batch_size", cfg.batch_size))
            * int(saved_cfg.get("accum_steps", cfg.accum_steps))
        )
        seen = int(state["step_in_epoch"]) * per_step
        self.epoch, self.step_in_epoch = int(state["epoch"]), seen // cfg.global_batch(d.world_size)
        self.global_step = self.epoch * self.steps_per_epoch + self.step_in_epoch
        if self.step_in_epoch and "epoch_loss" in state:
            loss_sum, loss_n = state["epoch_loss"]
            self.epoch_loss = (float(loss_sum), int(loss_n))

        restored = "weights, optimizer, grad scaler, EMA, lr schedule position, data position"
        rngs = state.get("rng") or []
        where = f"from {found.path} at epoch {self.epoch + 1}, step {self.global_step}"
        if saved_world == d.world_size and len(rngs) > d.rank:
            self._rng_to_restore = rngs[d.rank]
            lines.append(f"resumed {where}: {restored} and RNG state restored")
        else:
            lines.append(
                f"resumed {where} on {d.world_size} process(es), trained on {saved_world}: "
                f"{restored} restored; the RNG state (dropout, drop path, mixup) is per process "
                f"and not restored, so the rest of the run is not bit-identical to an uninterrupted one"
            )
        if self.epoch >= cfg.epochs:
            lines.append(f"the run already completed its {cfg.epochs} epochs; nothing to train")
        return lines

    def save(self, best: bool = False) -> None:
        """Write ``last.pt`` (and ``best.pt``) in the run folder, on rank 0, atomically."""
        state = self.state_dict()  # collective (RNG gather): every rank calls it
        if self.dist.is_main:
            save_checkpoint(state, self.run_dir / LAST)
            if best:
                save_checkpoint(state, self.run_dir / BEST)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        """Train until ``cfg.epochs``; returns the last evaluation metrics plus ``wall_s``."""
        cfg, t0 = self.cfg, time.perf_counter()
        try:
            while self.epoch < cfg.epochs:
                epoch = self.epoch
                epoch_seed = cfg.seed + 7919 * (epoch + 1) + 104729 * self.dist.rank
                if self.step_in_epoch == 0:
                    seed_everything(epoch_seed)
                elif self._rng_to_restore is not None:
                    restore_rng(self._rng_to_restore)
                else:  # a mid-epoch resume whose RNG state cannot be restored
                    seed_everything(epoch_seed + 15485863 * self.step_in_epoch)
                self._rng_to_restore = None
                train_stats = self._train_epoch(epoch)
                self.epoch, self.step_in_epoch = epoch + 1, 0
                record = {"epoch": epoch + 1, "step": self.global_step, **train_stats}
                last = self.epoch == cfg.epochs
                is_best = False
                if self.val_loader is not None and (
                    last or (cfg.eval_every > 0 and self.epoch % cfg.eval_every == 0)
                ):
                    self.metrics = self.evaluate()
                    record.update({f"val_{k}": v for k, v in self.metrics.items()})
                    score = self.metrics.get(self.task.primary_metric)
                    if score is not None and (self.best is None or score > self.best):
                        self.best, is_best = score, True
                record["time_s"] = round(time.perf_counter() - t0, 2)
                self.save(best=is_best)
                self.log.epoch_metrics(record)
                self.log.scalars("epoch", record, self.epoch)
        finally:
            self.log.close()
        self.dist.barrier()
        return {**self.metrics, "wall_s": time.perf_counter() - t0}

    def evaluate(self) -> dict[str, float]:
        """The task's metrics on the validation set (EMA metrics too, prefixed ``ema_``)."""
        if self.val_loader is None:
            return {}
        skipped_before = self.val_loader.dataset.skipped
        self.model.eval()
        with torch.no_grad(), self._autocast():
            metrics = self.task.evaluate(self.model, self.val_loader, self.dist)
            # One pass's skips: the EMA pass reads the same samples again.
            skipped = self._skipped_since(self.val_loader, skipped_before)
            if self.ema is not None:
                ema_metrics = self.task.evaluate(self.ema.module, self.val_loader, self.dist)
                metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        if skipped:
            metrics["skipped_samples"] = skipped
        return metrics

    def _skipped_since(self, loader: DataLoader, before: int) -> int:
        """Samples of ``loader`` skipped over all processes since its count was ``before``;
        names the new ones (collective: every rank calls it)."""
        self._name_bad_samples(loader, gather=True)
        local = torch.tensor([loader.dataset.skipped - before])
        return int(self.dist.all_reduce_sum(local).item())

    def _name_bad_samples(self, loader: DataLoader, gather: bool = False) -> None:
        """Log each newly skipped sample once, with its path and reason, on rank 0: its own at
        once, the other ranks' at the next ``gather`` (a collective, at epoch ends)."""
        self._bad_pending += loader.dataset.take_new_bad()
        if gather:
            new = gather_first_mentions(self.dist, self._bad_pending, self._bad_named)
        elif self.dist.is_main:
            new = first_mentions(self._bad_pending, self._bad_named)
        else:
            return
        self._bad_pending = []
        for path, reason in new:
            self.log.info(f"skipped unreadable sample {path}: {reason}")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, d, device = self.cfg, self.dist, self.dist.device
        accum, start = cfg.accum_steps, self.step_in_epoch
        self.train_loader.sampler.set_epoch(epoch, start * accum * cfg.batch_size)
        self.model.train()
        self.log.start_epoch(epoch, cfg.epochs, self.steps_per_epoch, start)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not start:
            self.epoch_loss = (0.0, 0)
        skipped_before = self.train_loader.dataset.skipped
        batches = iter(self.train_loader)
        for _ in range(start, self.steps_per_epoch):
            step_loss, images, finite, extra = 0.0, 0, True, {}
            for micro in range(accum):
                batch = to_device(next(batches), device, non_blocking=True)
                images += self.task.batch_size(batch)
                sync = micro == accum - 1
                no_sync = self.train_model.no_sync if isinstance(self.train_model, DDP) else None
                with no_sync() if (no_sync and not sync) else contextlib.nullcontext():
                    with self._autocast():
                        loss, extra = self.task.training_loss(self.train_model, batch)
                    ok = d.all_true(torch.isfinite(loss.detach()).all())
                    if ok:
                        self.scaler.scale(loss / accum).backward()
                        step_loss += float(loss.detach()) / accum
                    finite = finite and ok
            if finite:
                self.scaler.unscale_(self.optimizer)
                max_norm = cfg.clip_grad if cfg.clip_grad else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                # With fp16 the scaler skips overflowing steps itself (normal, not counted).
                if cfg.amp != "fp16" and not torch.isfinite(grad_norm):
                    finite = False
                else:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.global_step += 1
            self.step_in_epoch += 1
            if finite:
                self.counters["nonfinite_consecutive"] = 0
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
                loss_sum, loss_n = self.epoch_loss
                self.epoch_loss = (loss_sum + step_loss, loss_n + 1)
            else:
                self._count_nonfinite()
            self._name_bad_samples(self.train_loader)
            lr = self.optimizer.param_groups[0]["lr"]
            self.log.step(self.global_step, step_loss, lr, images, extra)
            if self.global_step % max(1, cfg.log_every) == 0:
                self.log.scalars("train", {"loss": step_loss, "lr": lr, **extra}, self.global_step)
            if (
                cfg.ckpt_every_steps
                and self.global_step % cfg.ckpt_every_steps == 0
                and self.step_in_epoch < self.steps_per_epoch
            ):
                self.save()
        self.log.end_epoch()
        loss_sum, loss_n = self.epoch_loss
        self.epoch_loss = (0.0, 0)  # the next epoch starts its own
        stats = d.all_reduce_mean(
            {"train_loss": loss_sum / max(1, loss_n), "images_per_s": self.log.images_per_s}
        )
        stats["images_per_s"] *= d.world_size
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        stats["nonfinite_total"] = self.counters["nonfinite_total"]
        skipped = self._skipped_since(self.train_loader, skipped_before)
        self.counters["skipped_total"] += skipped
        stats["skipped_samples"] = skipped  # this epoch's (all processes)
        stats["skipped_samples_total"] = self.counters["skipped_total"]  # the run's
        return stats

    def _count_nonfinite(self) -> None:
        c, cfg = self.counters, self.cfg
        c["nonfinite_total"] += 1
        c["nonfinite_consecutive"] += 1
        self.log.info(
            f"step {self.global_step}: non-finite loss or gradient, step skipped "
            f"({c['nonfinite_consecutive']} in a row, {c['nonfinite_total']} in total)"
        )
        too_many = (
            c["nonfinite_consecutive"] >= cfg.max_nonfinite_consecutive
            or c["nonfinite_total"] >= cfg.max_nonfinite_total
        )
        if too_many:
            self.save()
            self.log.close()
            raise TrainingStopped(
                f"stopping: {c['nonfinite_consecutive']} non-finite steps in a row, "
                f"{c['nonfinite_total']} in total (limits: max_nonfinite_consecutive="
                f"{cfg.max_nonfinite_consecutive}, max_nonfinite_total={cfg.max_nonfinite_total}); "
                f"state saved to {self.run_dir / LAST}. Lower base_lr, enable clip_grad or use "
                f"amp=bf16, then resume with --resume {self.run_dir / LAST}"
            )

    def close(self) -> None:
        """Leave the process group."""
        cleanup_distributed()
