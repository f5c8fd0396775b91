"""Recipe -> objects: task module, data module, Trainer (callbacks, loggers, precision).

The CLI calls these; nothing here parses arguments or prints.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks import ProgressBar as ProgressBarBase
from torch import nn

from mmlightning.data_modules.base import TaskData
from mmlightning.errors import UserError
from mmlightning.fault_tolerance import AtomicCheckpointIO, CarryRNGState, NonFiniteGuard, StopOnSignal
from mmlightning.loggers import build_loggers
from mmlightning.registry import DATA_MODULES, TASKS, check_kwargs


def import_components(imports: list[str] | None = None) -> None:
    """Import the built-in components and the user's modules (``imports:`` in the recipe,
    module names or paths to .py files), whose decorators register new names."""
    import mmlightning.data_modules.classification  # noqa: F401
    import mmlightning.data_modules.coco  # noqa: F401
    import mmlightning.data_modules.coco_karpathy  # noqa: F401
    import mmlightning.data_modules.conversations  # noqa: F401
    import mmlightning.data_modules.shapes  # noqa: F401
    import mmlightning.data_modules.shards  # noqa: F401
    import mmlightning.data_modules.tables  # noqa: F401
    import mmlightning.data_modules.videos  # noqa: F401
    import mmlightning.data_modules.vqav2  # noqa: F401
    import mmlightning.encoders  # noqa: F401
    import mmlightning.fusion  # noqa: F401
    import mmlightning.losses  # noqa: F401
    import mmlightning.optim  # noqa: F401
    import mmlightning.prompts  # noqa: F401
    import mmlightning.tasks  # noqa: F401


    for name in imports or []:
        try:
            if name.endswith(".py"):
                path = Path(name).resolve()
                loaded = sys.modules.get(path.stem)
                if loaded is not None and getattr(loaded, "__file__", None) == str(path):
                    continue  # already registered its names in this process
                spec = importlib.util.spec_from_file_location(path.stem, path)
                if spec is None or not path.is_file():
                    raise FileNotFoundError(name)
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            else:
                importlib.import_module(name)
        except (ImportError, FileNotFoundError) as err:
            raise UserError(f"imports: cannot import {name!r}: {err}") from None


def build_task(cfg: dict[str, Any], load_pretrained: bool = True):
    """The task's keyword arguments are the recipe's ``model:`` section plus its loss,
    optimizer and schedule. ``load_pretrained=False`` skips ``model.init_from``: when a
    checkpoint of this very run is about to be loaded, the pretraining run is not needed."""
    import_components(cfg.get("imports"))
    task_cls = TASKS.get(str(cfg["task"]), "task")
    # the data section's names and loader numbers fail now, not after the towers have loaded
    DATA_MODULES.check(cfg["data"], "data")
    TaskData.check_loader_options(cfg["data"])
    nonfinite_guard(cfg)  # run.on_nonfinite and the clipping settings, likewise
    model = dict(cfg.get("model") or {})
    if not load_pretrained and model.get("init_from"):
        model["init_from"] = None
    check_kwargs(task_cls, model, "model")
    task = task_cls(**model, loss=cfg["loss"], optimizer=cfg["optimizer"], scheduler=cfg.get("scheduler"))
    task.recipe = cfg
    if cfg.get("compile"):
        compile_trainable_parts(task, dict(cfg.get("compile_options") or {}))
    return task


def check_data(datamodule: Any) -> None:
    """Before anything is created or trained: one epoch holds a training batch, and the
    validation and test splits the run will use are not empty."""
    if not isinstance(datamodule, TaskData):
        return
    datamodule.setup("fit")
    if datamodule.train_batches_per_rank() < 1:
        raise UserError(f"data: one training epoch makes no full batch of data.batch_size="
                        f"{getattr(datamodule, 'batch_size', '?')} (the last short batch is dropped): give more "
                        f"training samples or a smaller data.batch_size.")
    datamodule.setup("test")
    for split, loader in (("val", datamodule.val_dataloader()), ("test", datamodule.test_dataloader())):
        if isinstance(loader, list):  # this data has no such split configured, and the run will not use it
            continue
        try:
            batches = len(loader)
        except TypeError:  # a stream of unknown length
            continue
        if batches == 0:
            raise UserError(f"data: the {split} split is empty; the run would train and then have nothing to "
                            f"{'validate' if split == 'val' else 'test'} on. Check the data's {split} files or "
                            f"split names.")


def compile_trainable_parts(task: nn.Module, options: dict[str, Any]) -> None:
    """``compile: true``: torch.compile every top-level part of the task that trains (towers,
    projections, heads), in place (``Module.compile``), so state-dict keys and checkpoints
    are the same as without it; the loss and metrics stay eager."""
    for child in task.children():
        if isinstance(child, nn.ModuleDict) or not any(p.requires_grad for p in child.parameters()):
            continue
        child.compile(**options)


def build_datamodule(cfg: dict[str, Any], task) -> L.LightningDataModule:
    """The data module follows the task's tokenizer and image settings; then the task sizes
    whatever depends on the data (``bind_data``)."""
    spec = task.data_spec()
    name = str((cfg.get("data") or {}).get("name"))
    reads_videos = [n for n, fn in DATA_MODULES.entries() if "max_frames" in inspect.signature(fn).parameters]
    if spec.max_frames is not None and name in DATA_MODULES and name not in reads_videos:
        raise UserError(f"model.temporal reads videos; data module {name} has images. Video data modules: "
                          f"{', '.join(reads_videos)}; or drop model.temporal.")
    datamodule = DATA_MODULES.build(cfg["data"], "data", **spec.as_kwargs(),
                                    shuffle_seed=int(cfg.get("seed", 0)))  # the order follows the run's seed alone
    task.bind_data(datamodule)
    return datamodule


def inference_device(trainer_cfg: dict[str, Any]) -> torch.device:
    """Where a single-process command (``mml predict``) runs: the recipe's accelerator, the
    first GPU when it is ``auto``/``gpu``/``cuda`` and one is there, else the CPU."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", 0)
    if accelerator in ("auto", "mps") and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(precision: str | int) -> str | int:
    """'auto': bf16-mixed where the hardware runs bf16 fast, else full fp32."""
    if str(precision) != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` after every validation. Its own class, so that its state in a checkpoint
    never shares a key with the best-checkpoint callback (Lightning keys them by class and
    arguments, which coincide when ``checkpoint.monitor`` is null)."""


class ProgressBar(RichProgressBar):
    """Rich's bar (elapsed, time left), with the loss and training samples per second, redrawn
    every ``every`` training batches rather than every one: each redraw turns the logged
    tensors into Python numbers, a host-device sync per step on a GPU."""

    def __init__(self, every: int) -> None:
        super().__init__(leave=True)
        self.every = max(1, int(every))
        self.samples = 0  # training samples since the last redraw
        self.since = time.perf_counter()
        self.samples_per_second: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.samples += batch_size_of(batch)
        if (batch_idx + 1) % self.every == 0 or batch_idx + 1 == self.total_train_batches:
            now = time.perf_counter()
            self.samples_per_second = self.samples * trainer.world_size / max(now - self.since, 1e-9)
            self.samples, self.since = 0, now
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def configure_columns(self, trainer: L.Trainer) -> list:
        # Rich's batches/s reads 0 when redrawn every few batches; samples/s (metrics) replaces it
        return [c for c in super().configure_columns(trainer) if type(c).__name__ != "ProcessingSpeedColumn"]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.samples, self.since = 0, time.perf_counter()  # validation time is not training speed

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        # the loss is logged without prog_bar=True, which would make Lightning itself convert
        # it every step; read here, it costs one conversion per redraw
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: the run directory already says it
        loss = trainer.logged_metrics.get("train/loss")
        if loss is not None:
            metrics["loss"] = f"{float(loss):.4g}"
        if self.samples_per_second is not None:
            metrics["samples/s"] = f"{self.samples_per_second:.0f}"
        return metrics


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the length of its images or videos (every task's batches carry one)."""
    visual = (batch.get("image", batch.get("video")) if isinstance(batch, dict) else None)
    return int(visual.shape[0]) if visual is not None else 0


class FitHeader(L.Callback):
    """One line before training: the model's size, precision and devices (in place of
    Lightning's model-summary table and hardware lines)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        total = sum(p.numel() for p in pl_module.parameters())
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        recipe = (getattr(pl_module, "recipe", None) or {}).get("recipe", type(pl_module).__name__)
        print(f"{recipe}: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), precision "
              f"{trainer.precision}, {trainer.world_size} x {trainer.strategy.root_device.type}, "
              f"{trainer.num_training_batches if trainer.num_training_batches != float('inf') else '?'} "
              f"batches per epoch", flush=True)


def warn_about_cpu_processes(trainer_kwargs: dict[str, Any]) -> None:
    devices, accelerator = trainer_kwargs.get("devices"), str(trainer_kwargs.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    cores = os.cpu_count() or 1
    if on_cpu and isinstance(devices, int) and devices * int(trainer_kwargs.get("num_nodes") or 1) > cores:
        warnings.warn(f"trainer.devices={devices} starts {devices} training processes on this machine's {cores} CPU "
                      f"cores: each runs slower than one process alone would.", stacklevel=2)


class PlainProgress(ProgressBarBase):
    """Progress for logs (stdout not a terminal: a file, nohup, SLURM): a plain line every
    ``every`` training batches with the step, loss, samples/s and the epoch's time left."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = max(1, int(every))
        self.enabled = True
        self.samples, self.epoch_start = 0, time.perf_counter()

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.samples, self.epoch_start = 0, time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.samples += batch_size_of(batch)
        total = self.total_train_batches
        if not self.enabled or not trainer.is_global_zero or ((batch_idx + 1) % self.every and batch_idx + 1 != total):
            return
        elapsed = time.perf_counter() - self.epoch_start
        loss = trainer.logged_metrics.get("train/loss")
        left = elapsed / (batch_idx + 1) * (total - batch_idx - 1) if isinstance(total, int) else float("nan")
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} batch {batch_idx + 1}/{total} "
              f"step {trainer.global_step}" + (f" loss {float(loss):.4g}" if loss is not None else "")
              + f" samples/s {self.samples * trainer.world_size / max(elapsed, 1e-9):.0f}"
              + (f" epoch left {left:.0f}s" if left == left else ""), flush=True)


class EpochMetrics(L.Callback):
    """The validation metrics (the task's ``epoch_line_metrics``), one line at each
    validation's end (rank 0), so a log shows how the run goes without opening W&B; every
    metric is in ``csv/metrics.csv`` and W&B."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        chosen = getattr(pl_module, "epoch_line_metrics", ())
        shown = {k[4:]: float(v) for k, v in sorted(trainer.callback_metrics.items())
                 if k.startswith("val/") and (not chosen or k[4:] in chosen)}
        if shown:
            print(f"validation, epoch {trainer.current_epoch + 1}: "
                  + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()), flush=True)


def _deepspeed(cfg: dict[str, Any]) -> bool:
    return str((cfg.get("trainer") or {}).get("strategy", "auto")).startswith("deepspeed")


def nonfinite_guard(cfg: dict[str, Any]) -> NonFiniteGuard:
    """The recipe's ``run.on_nonfinite`` and gradient clipping (``trainer.gradient_clip_val``,
    ``trainer.gradient_clip_algorithm``), which the guard does with the norm it computes
    anyway; under DeepSpeed, DeepSpeed's engine clips instead."""
    trainer = cfg.get("trainer") or {}
    clipping = {} if _deepspeed(cfg) else {"clip_value": trainer.get("gradient_clip_val"),
                                           "clip_algorithm": trainer.get("gradient_clip_algorithm")}
    return NonFiniteGuard((cfg.get("run") or {}).get("on_nonfinite") or "stop", **clipping)


def build_trainer(cfg: dict[str, Any], run_dir: Path | None, wandb_id: str | None = None,
                  enable_checkpointing: bool = True, task: Any = None, datamodule: Any = None) -> L.Trainer:
    """``datamodule.callbacks()``, where a data module has one, joins the Trainer's callbacks
    (e.g. the shard reader's bad-sample log)."""
    trainer_kwargs = dict(cfg.get("trainer") or {})
    check_kwargs(L.Trainer.__init__, trainer_kwargs, "trainer")
    if task is not None:
        trainer_kwargs = task.configure_trainer(trainer_kwargs)
    trainer_kwargs["precision"] = resolve_precision(trainer_kwargs.get("precision", "auto"))
    warn_about_cpu_processes(trainer_kwargs)
    trainer_kwargs.setdefault("enable_model_summary", False)  # FitHeader says it in one line
    every = trainer_kwargs.get("log_every_n_steps") or 50
    progress = ProgressBar(every) if sys.stdout.isatty() else PlainProgress(every)
    guard = nonfinite_guard(cfg)
    if not _deepspeed(cfg):  # the guard clips: Lightning must not as well
        trainer_kwargs.pop("gradient_clip_val", None)
        trainer_kwargs.pop("gradient_clip_algorithm", None)
    callbacks: list[Any] = [FitHeader(), progress, EpochMetrics(), CarryRNGState(), guard]
    if isinstance(datamodule, TaskData):
        callbacks += datamodule.callbacks()
    plugins: list[Any] = []
    if not str(trainer_kwargs.get("strategy", "auto")).startswith(("fsdp", "deepspeed")):  # those save shards their own way
        plugins.append(AtomicCheckpointIO())
    loggers: list[Any] = []
    if run_dir is not None:
        callbacks.append(StopOnSignal(run_dir / "checkpoints" / "last.ckpt"))
        loggers = build_loggers(cfg, run_dir, wandb_id)
        if loggers:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if enable_checkpointing:
            ckpt = dict(cfg.get("checkpoint") or {})
            check_kwargs(ModelCheckpoint.__init__, ckpt, "checkpoint")
            ckpt.pop("save_last", None)
            folder = str(run_dir / "checkpoints")
            callbacks.append(ModelCheckpoint(dirpath=folder, filename="best-{step}", **ckpt))  # trainer.checkpoint_callback
            # last.ckpt after every validation (or epoch): ModelCheckpoint(save_last=True) only
            # refreshes it when a best checkpoint is written, so a run whose metric stopped
            # improving would resume from an old epoch
            callbacks.append(LastCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1,
                                            enable_version_counter=False))
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(
            default_root_dir=str(run_dir) if run_dir else None, callbacks=callbacks, logger=loggers or False,
            plugins=plugins, enable_checkpointing=enable_checkpointing and run_dir is not None, **trainer_kwargs,
        )
    except (ValueError, MisconfigurationException) as err:  # e.g. fsdp without a GPU, devices=3 on 2 GPUs
        settings = {k: trainer_kwargs.get(k) for k in ("accelerator", "devices", "strategy", "precision")}
        raise UserError(f"trainer: {err} (trainer settings: {settings})") from None
