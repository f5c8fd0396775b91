"""What every task module shares: optimizer and schedule from the recipe, the resolved recipe
inside each checkpoint, the contract with data modules (``data_spec``, ``bind_data``), and
pretrain-then-finetune (``init_from`` a CLIP checkpoint, freezing a tower)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from mmlightning.data_modules.base import TaskData
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.errors import UserError
from mmlightning.fault_tolerance import load_checkpoint
from mmlightning.optim import build_optimizer
from mmlightning.registry import OPTIMIZERS, SCHEDULERS, did_you_mean
from mmlightning.report_blocks import section, table
from mmlightning.runs import eval_checkpoint


@dataclass
class DataSpec:
    """What a task needs from its data: how to tokenize and how to prepare images. The build
    step passes these to the data module as keyword arguments."""

    tokenizer: Any
    max_length: int
    image_config: ImageConfig
    max_frames: int | None = None  # video tasks: the frames of a clip (video data modules take it)

    def as_kwargs(self) -> dict[str, Any]:
        frames = {} if self.max_frames is None else {"max_frames": self.max_frames}
        return {"tokenizer": self.tokenizer, "max_length": self.max_length, "image_config": self.image_config, **frames}


def read_run_checkpoint(source: str | Path, key: str) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """A run directory (its best checkpoint) or checkpoint file: its path, the checkpoint and
    its state dict with the prefixes that torch.compile and DDP wrappers add removed."""
    path = eval_checkpoint(source)
    try:
        ckpt = load_checkpoint(path)
    except Exception as err:  # noqa: BLE001  (any unreadable file gets the same message)
        raise UserError(f"{key}: cannot read checkpoint {path}: {err}") from None
    state = {k.replace("_orig_mod.", "").replace("module.", "", 1) if k.startswith("module.") else
             k.replace("_orig_mod.", ""): v for k, v in ckpt.get("state_dict", {}).items()}
    return path, ckpt, state


def most_probable_classes(logits: torch.Tensor, classnames: list[str]) -> list[str]:
    """``mml predict``'s line for each row of class logits: the most probable class and its
    probability."""
    best = logits.float().softmax(-1).max(-1)
    return [f"{classnames[i]} ({p:.3f})" for p, i in zip(best.values.tolist(), best.indices.tolist())]


class TaskModule(L.LightningModule):
    leaves_parameters_unused = False  # True: some parameters may get no gradient in a step (DDP must know)
    answers_questions = False  # True: predict_images takes a question (mml predict --question)
    epoch_line_metrics: tuple[str, ...] = ()  # validation metrics printed after each epoch (empty: all)

    def __init__(self, optimizer: dict[str, Any], scheduler: dict[str, Any] | None = None) -> None:
        super().__init__()
        # built once on a stand-in parameter, so that a bad value (lr=-1, betas=[0.9]) fails
        # now, in `mml check`, rather than after the data and model have loaded
        try:
            probe = OPTIMIZERS.build(optimizer, "optimizer", params=[torch.zeros(1, requires_grad=True)])
            if scheduler:
                SCHEDULERS.build(scheduler, "scheduler", optimizer=probe, total_steps=1)
        except UserError:
            raise
        except (TypeError, ValueError, IndexError) as err:
            raise UserError(f"optimizer/scheduler: {err} (optimizer: {dict(optimizer)}, scheduler: "
                              f"{dict(scheduler or {})}).") from None
        self.optimizer_spec = dict(optimizer)
        self.scheduler_spec = dict(scheduler) if scheduler else None
        self.recipe: dict[str, Any] | None = None  # the resolved recipe; set by build, saved in checkpoints

    def data_spec(self) -> DataSpec:
        raise NotImplementedError

    def bind_data(self, datamodule: L.LightningDataModule) -> None:
        """Called once the data module exists, before any checkpoint is loaded: for parts
        whose size comes from the data (e.g. the VQA answer vocabulary)."""

    def init_towers_from(self, source: str | Path, towers: dict[str, nn.Module],
                         optional: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Copy pretrained towers (e.g. ``{"vision": self.vision}``) from a checkpoint file or
        run directory of another task; the ``optional`` ones only where that run has them (a
        fusion encoder from fusion pretraining, not from a CLIP run). Each must be built as in
        that run; if not, the error shows the spec that run used. Returns that run's state
        dict, for what is not a module (a temperature)."""
        path, ckpt, state = read_run_checkpoint(source, "model.init_from")
        source_model = (ckpt.get("mmlightning_recipe") or {}).get("model") or {}
        for name, tower in towers.items():
            prefix = f"{name}."
            weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not weights and name in optional:
                continue
            if not weights:
                raise UserError(f"model.init_from: {path} holds no '{name}' tower "
                                  f"(its top-level modules: {sorted({k.split('.')[0] for k in state})}).")
            try:
                tower.load_state_dict(weights, strict=True)
            except RuntimeError as err:
                raise UserError(f"model.init_from: the {name} tower in {path} does not fit this recipe's "
                                  f"model.{name}; that run built it as {source_model.get(name, '(unknown)')}. "
                                  f"Use the same spec. ({str(err).splitlines()[0]})") from None
        return state

    def train(self, mode: bool = True) -> TaskModule:
        """Train mode follows trainability: every module with a trainable parameter trains (its
        dropout on, its BatchNorm learning statistics); a module marked ``frozen`` (a locked
        tower, frozen BatchNorm: see encoders.weights.freeze_tower) or whose parameters are all
        frozen (the locked layer groups of a partly frozen tower) stays in eval, with whatever
        it holds that has no parameters of its own (dropout, activations). A part that wants a
        fixed tensor and live dropout registers the tensor as a buffer."""
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
        return self

    def frozen_modules(self) -> list[nn.Module]:
        """The modules ``train()`` keeps in eval (see there), outermost first."""
        holds, trains = set(), set()  # module paths that hold parameters, and trainable ones
        for name, param in self.named_parameters(remove_duplicate=False):
            path = name.split(".")[:-1]
            for depth in range(len(path) + 1):
                prefix = ".".join(path[:depth])
                holds.add(prefix)
                if param.requires_grad:
                    trains.add(prefix)
        return [module for name, module in self.named_modules()
                if getattr(module, "frozen", False) or (name in holds and name not in trains)]

    def on_fit_start(self) -> None:
        # Lightning 2.x never calls train() on the model: it keeps each submodule's mode (and
        # restores it after validation). Towers come in whatever mode they were built or last
        # used in; AutoModel.from_pretrained returns eval, which would train with dropout off.
        self.train()

    def set_lr_scale(self, lr_scale: dict[str, float] | None, key: str = "model.lr_scale") -> None:
        """Learning rates per part of the model (``model.lr_scale: {vision: 0.1}``): each key a
        top-level part (``vision``, ``text``, ``projector``, ...) whose parameters train at
        ``optimizer.lr`` times its value; the rest at ``optimizer.lr``. Call after the parts
        are built: a key that names none fails, listing them."""
        parts = sorted({name.split(".", 1)[0] for name, _ in self.named_parameters()})
        self.lr_scale = dict(lr_scale or {})
        for part, value in self.lr_scale.items():
            if part not in parts:
                raise UserError(f"{key}.{part}: not a part of this model.{did_you_mean(part, parts)} Parts: "
                                  f"{', '.join(parts)}.")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise UserError(f"{key}.{part} must be a number >= 0, got {value!r}.")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """No weight decay on biases, norm gains and the temperature (as CLIP and open_clip);
        each part at ``lr * lr_scale`` where ``set_lr_scale`` gave it one (0: it does not train)."""
        lr_scale = getattr(self, "lr_scale", {})
        lr = float(self.optimizer_spec.get("lr", 1e-3))
        grouped: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            scale = float(lr_scale.get(name.split(".", 1)[0], 1.0))
            if p.requires_grad and scale > 0:
                grouped.setdefault((scale, p.ndim >= 2), []).append(p)
        if not grouped:
            raise UserError("model: nothing trains (every part frozen or at model.lr_scale 0).")
        return [{"params": params, **({} if scale == 1.0 else {"lr": lr * scale}),
                 **({} if decay else {"weight_decay": 0.0})} for (scale, decay), params in grouped.items()]

    # ------------------------------------------------------------------ hooks into the Trainer
    def configure_trainer(self, trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The recipe's ``trainer:`` arguments, adjusted for this task before the Trainer is
        built; a task that needs more (e.g. CLIP's own accumulation) extends this."""
        if trainer_kwargs.get("strategy") == "ddp" and self.leaves_parameters_unused:
            # e.g. a fusion head that reads grid tokens leaves the tower's pooling layer without
            # gradients, which plain DDP treats as an error
            trainer_kwargs = {**trainer_kwargs, "strategy": "ddp_find_unused_parameters_true"}
        return trainer_kwargs

    @property
    def mid_accumulation(self) -> bool:
        """Some batches' gradients wait for the optimizer step (``trainer.accumulate_grad_batches``):
        a checkpoint now would lose them, so StopOnSignal waits for the step. Read at the end of
        a training batch."""
        trainer = self.trainer
        every = trainer.accumulate_grad_batches
        if every <= 1:
            return False
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # batches begun this epoch
        return done % every != 0 and done < trainer.num_training_batches  # the epoch's last batch steps

    def optimizer_steps_per_epoch(self, batches: int) -> int:
        """Optimizer steps in an epoch of ``batches`` training batches on this rank."""
        return math.ceil(batches / self.trainer.accumulate_grad_batches)

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.optimizer_spec, self.parameter_groups())
        if not self.scheduler_spec:
            return optimizer
        scheduler = SCHEDULERS.build(self.scheduler_spec, "scheduler", optimizer=optimizer,
                                     total_steps=self.total_training_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def batch_loss(self, batch: Any) -> torch.Tensor:
        """The training loss of one batch, outside any Trainer (``mml check``)."""
        return self.training_step(batch, 0)

    def total_training_steps(self) -> int:
        """Optimizer steps this fit will take, as Lightning's ``estimated_stepping_batches``
        counts them but from the data module's size: asking Lightning builds the training
        loader early, which drops a resumed loader's mid-epoch position (Lightning #20550)."""
        trainer = self.trainer
        datamodule = trainer.datamodule
        if not isinstance(datamodule, TaskData):  # loaders passed to fit() directly
            return int(trainer.estimated_stepping_batches)
        if trainer.max_epochs in (None, -1):
            if trainer.max_steps in (None, -1):
                raise UserError("trainer.max_epochs=-1 needs trainer.max_steps: the schedule needs a length.")
            return trainer.max_steps
        batches = datamodule.train_batches_per_rank()
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif limit is not None:
            batches = int(batches * limit)
        steps = self.optimizer_steps_per_epoch(batches) * max(trainer.max_epochs, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps not in (None, -1) else steps

    # ------------------------------------------------------------------ evaluation
    # Validation and test run the same code on different splits: a task implements
    # ``evaluate_step`` and ``evaluate_epoch_end`` once, with ``stage`` "val" or "test".
    def evaluate_step(self, batch: Any, batch_idx: int, stage: str) -> None:
        raise NotImplementedError

    def evaluate_epoch_end(self, stage: str) -> None:
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self.evaluate_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self.evaluate_epoch_end("test")

    # ------------------------------------------------------------------ the perception report
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen image features for linear probes: the vision tower's pooled output,
        L2-normalised (CLIP uses its projected embedding instead)."""
        return torch.nn.functional.normalize(self.vision(images).pooled.float(), dim=-1)

    def report_sections(self, test_metrics: dict[str, float]) -> list[dict[str, Any]]:
        """This task's part of the ``mml eval`` report (see report.py), from its test metrics
        (keys without the ``test/`` prefix). By default one table of all of them."""
        return [section("Test metrics", test_metrics, [table(["metric", "value"], [[k, v] for k, v in test_metrics.items()])])]

    def predict_images(self, images: torch.Tensor, datamodule: TaskData) -> list[str]:
        """What ``mml predict`` prints for each image of a batch (normalised for the vision
        tower): a task that describes images overrides this."""
        task = (self.recipe or {}).get("task", type(self).__name__)
        raise UserError(f"mml predict has nothing to say of an image alone for a {task!r} task; it captions "
                        f"(caption) or classifies (clip) images.")

    def summary_rows(self, test_metrics: dict[str, float]) -> tuple[list[str], list[list[str]]]:
        """The table ``mml fit`` prints at the end: its columns and rows (by default each test
        metric and its value)."""
        return ["metric", "value"], [[key, f"{value:.4f}"] for key, value in test_metrics.items()]

    def log_samples(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table of examples (images as tensors normalised for the vision tower) in W&B, for
        reading what the model does, not only how much it scores."""
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in self.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not self.trainer.is_global_zero:
            return
        import wandb

        config = self.data_spec().image_config
        mean, std = torch.tensor(config.mean).view(3, 1, 1), torch.tensor(config.std).view(3, 1, 1)
        cells = [[wandb.Image((c.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
                  if isinstance(c, torch.Tensor) and c.ndim == 3 else c for c in row] for row in rows]
        loggers[0].log_table(key=key, columns=columns, data=cells, step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mmlightning_recipe"] = self.recipe

