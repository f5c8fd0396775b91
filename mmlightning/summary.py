"""The end-of-run summary: test metrics, where the checkpoint and the W&B run are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mmlightning.runs import SUMMARY_FILE


def wandb_run_dir(trainer: Any) -> str | None:
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            return str(Path(logger.experiment.dir).parent)
    return None


def print_summary(cfg: dict[str, Any], run_dir: Path, trainer: Any, test_metrics: dict[str, float],
                  fit_seconds: float, best_checkpoint: str | None) -> dict[str, Any]:
    summary = {
        "recipe": cfg["recipe"],
        "run_dir": str(run_dir.resolve()),
        "global_step": trainer.global_step,
        "fit_seconds": round(fit_seconds, 1),
        "test": {k: float(v) for k, v in sorted(test_metrics.items())},
        "best_checkpoint": best_checkpoint,
        "last_checkpoint": str((run_dir / "checkpoints" / "last.ckpt").resolve()),
        "wandb_run": wandb_run_dir(trainer),
    }
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    table = Table()
    columns, rows = trainer.lightning_module.summary_rows(summary["test"])
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(f"{cfg['recipe']}: test split, after {trainer.global_step} steps in {fit_seconds:.0f}s")
    console.print(table)
    console.print(f"run directory:   {run_dir}")
    console.print(f"best checkpoint: {best_checkpoint or '(none: no monitored metric)'}")
    console.print(f"last checkpoint: {summary['last_checkpoint']}")
    console.print(f"W&B run:         {summary['wandb_run'] or '(W&B logger off)'}")
    return summary
