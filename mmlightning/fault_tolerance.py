"""What keeps a long run's work: stop on a signal with a checkpoint, write checkpoints
atomically, carry the RNG state across a resume, and skip an unreadable checkpoint.

Lightning alone (2.6) stops on SIGTERM at the next batch with exit code 0 and no checkpoint;
here SIGTERM and SIGINT save ``last.ckpt`` at the next step boundary, then the process exits
143 or 130 (128 + the signal), as schedulers (SLURM, Kubernetes) and shells expect, and
``mml fit --resume`` continues exactly where it stopped.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mmlightning.errors import UserError


class Interrupted(Exception):
    """Raised after the checkpoint is saved; ``mml`` turns it into exit code 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal(L.Callback):
    """SIGTERM/SIGINT: finish the current step, save ``last.ckpt``, raise ``Interrupted`` at
the next hook (after Lightning has logged the step).

    A second signal of the same kind acts at once (the handler steps aside after the first).
    Under DDP the ranks agree on stopping at logging steps (one small all-reduce there), so
    every rank saves and stops at the same step whichever rank got the signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.received: int | None = None
        self.saved = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        # a second one acts at once: SIGTERM terminates, SIGINT raises KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here, not at fit start: Lightning installs its own SIGTERM handler (stop, exit 0,
        # no checkpoint) between the two, chained to whatever was there before
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if getattr(pl_module, "mid_accumulation", False):
            return  # wait for the optimizer step: cached batches are not in any checkpoint
        stop = self.received is not None
        if trainer.world_size > 1:
            if (trainer.global_step % max(1, trainer.log_every_n_steps)) != 0:
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.save_checkpoint(self.checkpoint)
            self.saved = True  # stop at the next hook, once Lightning has logged this step's metrics

    def _stop_if_saved(self, *args: Any) -> None:
        if self.saved:
            raise Interrupted(self.received or signal.SIGTERM, self.checkpoint)

    on_train_batch_start = on_validation_start = on_train_epoch_end = on_train_end = _stop_if_saved

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._handle:  # not stepped aside, nor restored by Lightning already
                signal.signal(signum, handler)
        self._previous.clear()


class CarryRNGState(L.Callback):
    """Save the Python, NumPy and torch RNG states with each checkpoint and put them back
    right before the first batch after a resume, so dropout and augmentation draw the same
    numbers as the uninterrupted run would have."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # tensors and plain Python values only: Lightning loads checkpoints with weights_only=True
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        return {"python": random.getstate(), "torch": torch.get_rng_state(),
                "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)},
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def on_train_batch_start(self, *args: Any) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        random.setstate(state["python"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["gauss"]))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the checkpoint's directory, flush it to disk, then rename:
    a save killed half-way leaves the previous checkpoint whole and no partial file under the
    checkpoint's name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def readable_checkpoint(path: Path) -> bool:
    """A torch checkpoint is a zip archive; truncation destroys its central directory."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def newest_readable(candidates: list[Path]) -> Path | None:
    """The newest readable checkpoint, warning about each newer one that is not."""
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if readable_checkpoint(path):
            return path
        warnings.warn(f"skipping {path}: not a readable checkpoint (truncated or corrupt); trying the previous one",
                      stacklevel=2)
    return None


class NonFiniteLoss(Exception):
    """Raised before the optimizer step that would have written NaN/inf into the weights."""


class NonFiniteGuard(L.Callback):
    """Checks the gradients before every optimizer step. A NaN or inf loss makes every
    gradient non-finite; under DDP the gradients are already averaged across ranks there, so
    every rank sees the same verdict and they stop together without another collective.

    ``stop`` (default): raise ``NonFiniteLoss`` naming the step and the last good checkpoint,
    before the step, so the weights and every checkpoint stay finite. ``skip``: drop that
    step's gradients, count it (``train/nonfinite_skipped``) and go on. ``allow``: no check.
    The check costs one host-device sync per step (as a GradScaler's does)."""

    MODES = ("stop", "skip", "allow")

    def __init__(self, mode: str = "stop") -> None:
        if mode not in self.MODES:
            raise UserError(f"run.on_nonfinite: {mode!r} is not one of {', '.join(self.MODES)}.")
        self.mode = mode
        self.skipped = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.mode == "allow" or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # 16-mixed: overflowing gradients are routine there, and its GradScaler skips those steps
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
            return
        if self.mode == "skip":
            optimizer.zero_grad(set_to_none=True)  # the optimizer leaves gradient-less parameters alone
            self.skipped += 1
            pl_module.log("train/nonfinite_skipped", float(self.skipped))
            return
        last_good = _last_checkpoint(trainer)
        raise NonFiniteLoss(f"non-finite loss or gradients at step {trainer.global_step} (epoch "
                            f"{trainer.current_epoch}); the weights were not updated. Last good checkpoint: "
                            f"{last_good or 'none yet'}. run.on_nonfinite=skip steps over such batches instead.")


def _last_checkpoint(trainer: L.Trainer) -> str | None:
    paths = [p for cb in trainer.checkpoint_callbacks for p in (cb.last_model_path, cb.best_model_path) if p]
    existing = [Path(p) for p in paths if Path(p).is_file()]
    return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None
