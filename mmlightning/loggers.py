"""Logger set-up: W&B (online when credentials exist, else offline) with a CSV log beside it,
and closing them at the end of a command. Imported by ``build`` and ``report``."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from mmlightning.errors import UserError
from mmlightning.registry import did_you_mean


def wandb_mode(requested: str) -> str:
    """'auto': online when credentials exist (WANDB_API_KEY or a netrc entry), else offline.
    WANDB_MODE in the environment wins, as wandb itself does."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` (a resumed run's) is continued
    under its own header, where Lightning's deletes it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))


class AppendingCSVLogger(CSVLogger):
    """``csv/metrics.csv`` keeps every step across resumes (steps after the last checkpoint of
    an interrupted run appear twice: as first trained, and as trained again)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def build_loggers(cfg: dict[str, Any], run_dir: Path, wandb_id: str | None) -> list[Any]:
    spec = dict(cfg.get("logger") or {"name": "none"})
    kind = spec.pop("name", "none")
    if kind == "none":
        return []
    if kind == "csv":
        return [AppendingCSVLogger(save_dir=str(run_dir), name="csv", version="")]
    if kind != "wandb":
        raise UserError(f"logger.name: unknown logger {kind!r}. Valid: wandb, csv, none.")
    mode = wandb_mode(str(spec.pop("mode", "auto")))
    run_dir = run_dir.resolve()  # wandb's service process has its own working directory
    valid = {"project", "entity", "group", "tags", "notes"}
    for key in spec:
        if key not in valid:
            raise UserError(f"logger.{key}: unknown option for wandb.{did_you_mean(key, sorted(valid))} Valid: {', '.join(sorted(valid))}, mode.")
    os.environ["WANDB_DIR"] = str(run_dir)  # the W&B run lives in the run directory, whatever the environment says
    wandb_logger = WandbLogger(
        name=run_dir.name, save_dir=str(run_dir), id=wandb_id, resume="allow", mode=mode, config=cfg,
        project=spec.get("project") or "mmlightning", entity=spec.get("entity"), group=spec.get("group"),
        tags=list(spec.get("tags") or []), notes=spec.get("notes"),
    )
    # Lightning passes wandb.init `anonymous=None`, which wandb >= 0.19 warns about on every run
    # whatever its value; leaving it out is the same setting
    wandb_logger._wandb_init.pop("anonymous", None)
    # CSV beside W&B: a plain-text record that needs no tool to read
    return [wandb_logger, AppendingCSVLogger(save_dir=str(run_dir), name="csv", version="")]


def finish_loggers(trainer: Any, status: str = "success") -> None:
    """Flush and close the W&B run now (marked failed if the run raised), so a second run in
    this process starts a new one."""
    for logger in trainer.loggers:
        logger.finalize(status)
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
            logger.experiment.finish(exit_code=0 if status == "success" else 1)
