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
    """Save every rank's Python, NumPy, torch CPU and CUDA generator states with each
    checkpoint and put each rank's back when the resumed run starts training (after the
    sanity check, before the first batch is fetched), so dropout draws the same numbers as the uninterrupted run would have.
    (Augmentation does not draw from these: each sample has its own seed, see
    ``transforms.apply_transform``.) Resumed on another number of ranks, a run keeps going
    with a warning; exactness then cannot hold anyway."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # every rank builds the checkpoint (rank 0 writes it), so the states can be gathered here
        own = _rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, own)
        else:
            ranks = [own]
        return {"ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._pending is None:
            return
        ranks, self._pending = self._pending.get("ranks") or [self._pending], None  # older checkpoints: rank 0's
        if len(ranks) != trainer.world_size:
            warnings.warn(f"the checkpoint carries the random state of {len(ranks)} rank(s) and this run has "
                          f"{trainer.world_size}: the resumed run goes on, but not as the uninterrupted one would",
                          stacklevel=2)
        _set_rng_state(ranks[trainer.global_rank % len(ranks)])


def _rng_state() -> dict[str, Any]:
    # tensors and plain Python values only: Lightning loads checkpoints with weights_only=True
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the checkpoint's directory, flush it to disk, then rename:
    a save killed half-way leaves the previous checkpoint whole and no partial file under the
    checkpoint's name. Reads sharded FSDP and DeepSpeed checkpoints as well (``load_checkpoint``),
    so a run trained sharded is tested, evaluated or fine-tuned from on one device."""

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if Path(path).is_dir():
            return load_checkpoint(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

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
    """A torch checkpoint file is a zip archive (truncation destroys its central directory);
    a sharded one is a folder with its index (see ``load_checkpoint``)."""
    if path.is_dir():
        return sharded_checkpoint_kind(path) is not None
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def sharded_checkpoint_kind(path: Path) -> str | None:
    """``"fsdp"`` for Lightning's sharded FSDP layout (torch.distributed.checkpoint's
    ``.metadata`` and shards, plus Lightning's ``meta.pt``), ``"deepspeed"`` for a DeepSpeed
    folder (its ``latest`` tag), None otherwise."""
    if (path / ".metadata").is_file():
        return "fsdp"
    if (path / "latest").is_file():
        return "deepspeed"
    return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint as one dictionary of CPU tensors, however it was saved: a file, a folder of
    FSDP shards (gathered into full tensors with Lightning's own reader; the whole model must
    fit in CPU memory) or a DeepSpeed ZeRO folder (consolidated by DeepSpeed's zero_to_fp32,
    through Lightning's converter). Every command that reads checkpoints reads them here."""
    path = Path(path)
    kind = sharded_checkpoint_kind(path) if path.is_dir() else None
    if kind == "fsdp":
        from lightning.fabric.utilities.load import _load_distributed_checkpoint
        from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint

        return _format_checkpoint(_load_distributed_checkpoint(path))
    if kind == "deepspeed":
        try:
            from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError(f"{path} is a DeepSpeed checkpoint: reading it needs the deepspeed package "
                            "(pip install deepspeed), or consolidate it where it was trained "
                            "(python zero_to_fp32.py, in the folder).") from None
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            single = Path(scratch) / "consolidated.ckpt"
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(single))
            return torch.load(single, map_location="cpu", weights_only=False)  # written just now, by us
    return torch.load(path, map_location="cpu", weights_only=True)


def newest_readable(candidates: list[Path]) -> Path | None:
    """The newest readable checkpoint, warning about each newer one that is not."""
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if readable_checkpoint(path):
            return path
        warnings.warn(f"skipping {path}: not a readable checkpoint (truncated or corrupt); trying the previous one",
                      stacklevel=2)
    return None


class NonFiniteLoss(Exception):
    """Raised at the first logging step after a step whose loss or gradients were NaN/inf;
    that step's update was skipped, so the weights and every checkpoint stay finite."""


class NonFiniteGuard(L.Callback):
    """Before every optimizer step: the gradients' global norm, computed once on the device
    for two uses, clipping (``trainer.gradient_clip_val``, which this takes over from
    Lightning) and the NaN/inf check, with no host-device sync.

    A non-finite norm skips the update on the device, the way a GradScaler's ``found_inf``
    does: optimizers that accept it (torch's fused AdamW/Adam/SGD, this project's default where
    the parameters allow) leave weights, moments and step count as they were. The verdict
    is read back only at logging steps, epoch ends and before validation, where Lightning
    syncs anyway. ``stop`` (default) then raises ``NonFiniteLoss`` naming the first bad step
    and the last good checkpoint; ``skip`` counts such steps (``train/nonfinite_skipped``) and
    goes on; ``allow`` checks nothing (clipping still applies).

    Under DDP the gradients are averaged before this hook, so every rank reaches the same
    verdict; under FSDP each rank holds a shard, so the squared norm is summed across ranks
    (an all-reduce queued on the device, no host wait). An optimizer without ``found_inf``
    (unfused) gets the check with a host sync at each step instead. DeepSpeed partitions
    gradients out of reach of this hook: there the guard steps aside (DeepSpeed clips, and
    its fp16 loss scaler skips overflowing steps itself)."""

    MODES = ("stop", "skip", "allow")

    def __init__(self, mode: str = "stop", clip_value: float | None = None, clip_algorithm: str | None = None) -> None:
        if mode not in self.MODES:
            raise UserError(f"run.on_nonfinite: {mode!r} is not one of {', '.join(self.MODES)}.")
        algorithm = clip_algorithm or "norm"
        if algorithm not in ("norm", "value"):
            raise UserError(f"trainer.gradient_clip_algorithm: {clip_algorithm!r} is not one of norm, value.")
        if clip_value is not None and not float(clip_value) > 0:
            raise UserError(f"trainer.gradient_clip_val must be > 0 (or null: no clipping), got {clip_value}.")
        self.mode, self.clip_value, self.clip_algorithm = mode, clip_value, algorithm
        self._bad_steps: torch.Tensor | None = None  # on the device: steps skipped so far
        self._first_bad: torch.Tensor | None = None  # on the device: the first such step, -1 if none

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._bad_steps = torch.tensor(float(state.get("skipped", 0)))

    @property
    def skipped(self) -> int:
        """Steps skipped so far (a host sync: read it at a logging step)."""
        return 0 if self._bad_steps is None else int(self._bad_steps)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(trainer.strategy, DeepSpeedStrategy):
            self.mode, self.clip_value = "allow", None  # DeepSpeed clips from trainer.gradient_clip_val itself

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        optimizer.__dict__.pop("found_inf", None)  # never a stale verdict from an earlier step
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # 16-mixed: overflowing gradients are routine there, and its GradScaler skips those steps
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        checks = self.mode != "allow" and scaler is None
        if not params or not (checks or self.clip_value):
            return
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # Lightning leaves a fused optimizer's gradients scaled (its kernel unscales); clip
            # the true ones, as open_clip does: the scaler's step then passes no scale to the kernel
            scaler.unscale_(optimizer)
        if self.clip_value and self.clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, self.clip_value, foreach=True)
        norm = global_grad_norm(params, sharded=_shards_gradients(trainer))
        if self.clip_value and self.clip_algorithm == "norm":
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_value, norm, foreach=True)
        if not checks:
            return
        found_inf = (~norm.isfinite()).float()
        if self._bad_steps is None:
            self._bad_steps = torch.zeros((), device=norm.device)
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, device=norm.device, dtype=torch.long)
        self._bad_steps = self._bad_steps.to(norm.device) + found_inf
        self._first_bad = self._first_bad.masked_fill((self._first_bad < 0) & found_inf.bool(), trainer.global_step)
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = found_inf  # read by the fused kernel: a bad step changes nothing
        elif bool(found_inf):  # an optimizer that cannot skip on the device: decide now (a host sync)
            optimizer.zero_grad(set_to_none=True)  # the optimizer leaves gradient-less parameters alone
            self._stop_if_bad(trainer)
        if self.mode == "skip":
            pl_module.log("train/nonfinite_skipped", self._bad_steps)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._stop_if_bad(trainer)

    def on_validation_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._stop_if_bad(trainer)  # before a checkpoint is chosen on the validation metric

    def on_train_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._stop_if_bad(trainer)

    def _stop_if_bad(self, trainer: L.Trainer) -> None:
        if self.mode != "stop" or self._first_bad is None or (first := int(self._first_bad)) < 0:
            return
        last_good = _last_checkpoint(trainer)
        raise NonFiniteLoss(f"non-finite loss or gradients at step {first}; that step's update was skipped, so "
                            f"the weights stayed finite (noticed at step {trainer.global_step}, epoch "
                            f"{trainer.current_epoch}). Last good checkpoint: {last_good or 'none yet'}. "
                            "run.on_nonfinite=skip steps over such batches instead.")


def global_grad_norm(params: list[torch.Tensor], sharded: bool = False) -> torch.Tensor:
    """The 2-norm of all of ``params``' gradients as one vector, as a device tensor. With
    ``sharded`` each rank holds a disjoint part of them (FSDP): the squares are summed over
    ranks."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]  # FSDP2's DTensors
    norms = torch._foreach_norm(grads)  # one kernel per device and dtype, not one per tensor
    if len({(n.dtype, n.device) for n in norms}) > 1:
        norms = [n.float().to(norms[0].device) for n in norms]
    total = torch.linalg.vector_norm(torch.stack(norms).float())
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        squares = total.square()
        torch.distributed.all_reduce(squares)
        total = squares.sqrt()
    return total


def _shards_gradients(trainer: L.Trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))


def _last_checkpoint(trainer: L.Trainer) -> str | None:
    paths = [p for cb in trainer.checkpoint_callbacks for p in (cb.last_model_path, cb.best_model_path) if p]
    existing = [Path(p) for p in paths if Path(p).is_file()]
    return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None
